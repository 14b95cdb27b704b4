"""Values every layer of the package shares (kernels, data, patching, training); imports nothing."""

IGNORE_INDEX = -100
"""Label of a token that gets no loss: PyTorch's ``cross_entropy`` and Hugging Face's convention."""
