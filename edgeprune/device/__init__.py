"""What a device runs, torch-free: validation, the llama.cpp runtime, profiles, the cost model's prediction for a GGUF, bundles, the remote runner, reports."""
