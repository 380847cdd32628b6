"""edgeprune: prune and quantize a Llama-family model into a GGUF that fits a device, with proof that it does."""

__version__ = "0.1.0"
