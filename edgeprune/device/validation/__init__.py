"""Validate a GGUF through llama.cpp: perplexity, KL divergence against a reference, speed and memory, in one report.

The numbers follow llama.cpp's own tools (llama-perplexity, llama-bench), so users can reproduce them on their
devices. Every model runs in a child process (edgeprune.device.llamacpp.child). The entry point is
`entry.validate_gguf`; each concern has its own module, and this package re-exports nothing.
"""
