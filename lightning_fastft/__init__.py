"""lightning_fastft: fast, memory-lean LLM fine-tuning for PyTorch Lightning."""

__version__ = "0.1.0"
