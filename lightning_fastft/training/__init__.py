"""Training mechanisms the strategies and callbacks compose: activation checkpointing with host
offload, token-exact gradient accumulation, adapter-only checkpoints, 8-bit AdamW."""
