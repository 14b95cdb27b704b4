"""Integrations of the lightning_fastft patches with trainers other than Lightning's.

* :mod:`lightning_fastft.integrations.hf`: ``transformers.Trainer`` (and TRL's ``SFTTrainer``).
* :mod:`lightning_fastft.integrations.axolotl`: the Axolotl plugin ``FastFTPlugin`` (imports
  Axolotl only when the plugin class is first looked up).
"""
