"""Attention-output sparse autoencoders (Kissane et al. 2024) on ``blocks.L.attn.hook_z``.

Maths: ``config`` (SAEConfig; TrainSettings, the training defaults; ``config_values`` their raw
values), ``model`` (SAE: relu, topk, jumprelu, batchtopk, matryoshka_batchtopk, gated),
``activations`` (their encoders), ``corpus`` (its texts), ``harvest`` (activation cache),
``train`` (fit / resume: ``train_state`` the step, ``train_arch`` the step of the architectures
beyond relu/topk, ``train_gated`` gated's, ``sparse`` / ``dense_relu`` its products, ``resample``,
``checkpoint``), ``metrics`` (evaluation), ``lm_loss`` (loss functions for loss recovered),
``saelens_format`` (SAELens files), ``store_io`` (SAE <-> results store), ``attribution``, ``features``;
``transcoder`` (topk, relu and jumprelu (skip) transcoders: MLP input -> MLP output),
``saelens_transcoder`` (their SAELens files).

Pipeline (through ``analysis.run``): ``pipeline`` (the stored analyses and the API functions
``sae_train``, ``sae_eval``, ``sae_features``, ``sae_prompt``, ``sae_list`` ...), ``saelens_io``
(``sae_export`` / ``sae_import``), ``requests`` (settings, corpus, checkpoint paths, models),
``preflight`` (a training request checked against the model's config.json before it boots),
``jobs`` (what each stored analysis computes), ``results`` (result types, index lookups);
``transcoder_pipeline`` (stored transcoders: ``sae_transcoder``, ``load_sae_transcoder`` ...; their
maths in ``transcoder``, the run in ``transcoder_job``, the store round trip in ``transcoder_store``,
a SAELens transcoder file stored by ``lenslab sae import`` in ``transcoder_import``).
"""

from sae.config import SAEConfig, hook_name_for
from sae.model import SAE
from sae.saelens_format import load_saelens, save_saelens

__all__ = ["SAE", "SAEConfig", "hook_name_for", "load_saelens", "save_saelens"]
