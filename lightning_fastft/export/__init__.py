"""Export fine-tuned models: merged 16-bit Hugging Face checkpoints and GGUF files."""

from lightning_fastft.export.gguf import export_gguf, permute_rotary_halves
from lightning_fastft.export.merged import merge_and_save, merged_model, merged_state_dict

__all__ = ["export_gguf", "merge_and_save", "merged_model", "merged_state_dict", "permute_rotary_halves"]
