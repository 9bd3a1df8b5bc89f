"""An SAE training request checked against the model before the model boots.

``TrainSettings`` checks everything it can alone (``sae.config``). What it cannot know is the
model: how many blocks it has and how wide the hook is, so a layer the model lacks, a ``k`` at
or above ``d_sae = expansion x d_in`` or matryoshka widths that do not end at that ``d_sae`` would
only fail once the model is booted and the corpus harvested. ``config.json`` says it first:

- ``config_dims(hf_dir)``: (n_layers, hook_z width n_heads*d_head, d_model, n_heads) read from
  ``config.json`` without booting, each None when the file does not say it;
- ``check_layer(dims, site, layer)``: ConfigError in the words of ``sae.sites.check_site`` /
  ``sae.harvest.check_layer`` (the valid layers listed) when the model has no block ``layer``;
- ``site_width(dims, site)``: the width of the site's hook (hook_z: n_heads*d_head; the
  residual stream and the MLP output: d_model);
- ``check_width(settings, d_in)``: the full config's checks with the width known (ConfigError
  naming the value, the width it was checked against and the fix).

A source without ``config.json`` (an in-memory module) is checked the same way once booted,
before harvesting (``sae.jobs.prepare_training``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from analysis.errors import ConfigError
from sae.config import TrainSettings, check_fields
from sae.memory import hook_width, model_config_json
from sae.sites import DEFAULT_SITE, hook_for

_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_WIDTH_KEYS = ("hidden_size", "n_embd", "d_model")
_HEAD_KEYS = ("num_attention_heads", "n_head", "n_heads")  # as sae.memory.hook_width reads them


@dataclass(frozen=True)
class ModelDims:
    """What ``config.json`` says about the hooks (None: it does not say)."""

    n_layers: int | None
    hook_z_width: int | None  # n_heads * d_head
    d_model: int | None
    key: str = ""  # the config key n_layers came from
    n_heads: int | None = None  # attention heads (hook_z is n_heads x d_head)


def _positive(cfg: dict, keys: tuple[str, ...]) -> tuple[int | None, str]:
    for k in keys:
        v = cfg.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v, k
    return None, ""


def config_dims(hf_dir: Any) -> ModelDims | None:
    """The model's dimensions from ``hf_dir/config.json``; None without a readable JSON object."""
    if (cfg := model_config_json(hf_dir)) is None:
        return None
    n_layers, key = _positive(cfg, _LAYER_KEYS)
    d_model, _ = _positive(cfg, _WIDTH_KEYS)
    n_heads, _ = _positive(cfg, _HEAD_KEYS)
    return ModelDims(n_layers=n_layers, hook_z_width=hook_width(hf_dir), d_model=d_model, key=key, n_heads=n_heads)


def check_layer(dims: ModelDims | None, site: str, layer: int, *, fix: str | None = None) -> None:
    """ConfigError when ``config.json`` gives the model fewer blocks than ``layer + 1``; ``fix``
    replaces the advice to pass another layer (an imported file's layer is not the caller's)."""
    if dims is None or dims.n_layers is None or not isinstance(layer, int) or 0 <= layer < dims.n_layers:
        return
    valid = list(range(dims.n_layers))
    first, last = hook_for(site, valid[0]), hook_for(site, valid[-1])
    what = "attention hook_z" if site == DEFAULT_SITE else f"{site} hook ({hook_for(site, layer)})"
    fix = fix or f"pass --layer (layer=) between 0 and {dims.n_layers - 1}"
    raise ConfigError(f"layer {layer!r} has no {what}; valid layers are {valid} ({first} ... {last}; config.json "
                      f"{dims.key}={dims.n_layers}); {fix}")


def site_width(dims: ModelDims | None, site: str) -> int | None:
    """Width of the site's hook per ``config.json``, or None when it does not say."""
    if dims is None:
        return None
    return dims.hook_z_width if site == DEFAULT_SITE else dims.d_model


def check_width(settings: TrainSettings, d_in: int) -> None:
    """The SAEConfig checks that need the width (k below d_sae, matryoshka widths ending at d_sae,
    ...) with ``d_sae`` = ``settings.d_sae`` or ``expansion x d_in``; ConfigError naming both."""
    d_sae = settings.d_sae if settings.d_sae is not None else settings.expansion * d_in
    try:
        check_fields({**settings.sae_fields(), "d_in": int(d_in), "d_sae": int(d_sae), "layer": int(settings.layer)})
    except ConfigError as exc:
        hook = hook_for(settings.site, settings.layer)
        how = (f"d_sae={d_sae} as given, d_in={d_in} the width of {hook}" if settings.d_sae is not None
               else f"d_sae = expansion {settings.expansion} x d_in {d_in} (the width of {hook}) = {d_sae}")
        raise ConfigError(f"{exc} ({how}; adjust the setting to this width, or pass --d-sae / --expansion "
                          "(d_sae= / expansion=))") from None


__all__ = ["ModelDims", "check_layer", "check_width", "config_dims", "site_width"]
