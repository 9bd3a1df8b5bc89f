"""Attention-output sparse autoencoders (Kissane et al. 2024) on ``blocks.L.attn.hook_z``.

Core modules: ``config`` (SAEConfig), ``model`` (SAE), ``harvest`` (activation cache),
``train`` (fit / resume; ``sparse`` holds its sparse products), ``metrics`` (evaluation),
``lm_loss`` (loss functions for loss recovered), ``saelens_format`` (SAELens files),
``store_io`` (SAE <-> results store). Surfaces: ``attribution``, ``features``.
"""

from sae.config import SAEConfig, hook_name_for
from sae.model import SAE
from sae.saelens_format import load_saelens, save_saelens

__all__ = ["SAE", "SAEConfig", "hook_name_for", "load_saelens", "save_saelens"]
