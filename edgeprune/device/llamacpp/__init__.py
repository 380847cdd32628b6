"""edgeprune's one binding to llama.cpp (llama-cpp-python): its log, the runtime's models and contexts, the child
process measurements run in, and the quantizer (real runs and dry runs). Every other module reaches llama.cpp
through these. No torch here: a device runs all of it."""
