"""Integrations of the lightning_fastft patches with trainers other than Lightning's.

* :mod:`lightning_fastft.integrations.hf`: ``transformers.Trainer`` (and TRL's ``SFTTrainer``).
"""
