"""Where an SAE reads the model: its *site*, mapped to TransformerBridge hook names.

======================  =====================================  ==========================================
site                    hook (layer L)                         what it holds
======================  =====================================  ==========================================
``hook_z`` (default)    ``blocks.L.attn.hook_z``               attention outputs before W_O, flattened
                                                               head-major to [tokens, n_heads*d_head]
``resid_pre``           ``blocks.L.hook_resid_pre``            the residual stream entering block L
``resid_post``          ``blocks.L.hook_resid_post``           the residual stream leaving block L
``mlp_out``             ``blocks.L.hook_mlp_out``              the MLP's output, before it joins the stream
``mlp_in`` (transcoder  ``blocks.L.mlp.hook_in``               the MLP's input (the input side of a
input)                                                         transcoder: ``mlp_in`` -> ``mlp_out``)
======================  =====================================  ==========================================

Measured on TransformerLens 4.x TransformerBridge (MiniLM = BertForMaskedLM, post-LN; the tiny
Llama of ``tests/_tiny_llama.py``, pre-LN): both expose all five hooks. The MLP's input is
``blocks.L.mlp.hook_in`` on both: on post-LN BERT it equals ``blocks.L.hook_attn_out`` (the
attention block's LayerNorm output), on a pre-LN decoder it equals ``blocks.L.ln2.hook_out`` (the
normalised ``resid_mid``). ``blocks.L.hook_mlp_in`` is listed by the Llama bridge but never fires,
so it is not used. The MLP's output ``blocks.L.hook_mlp_out`` equals ``blocks.L.mlp.hook_out`` on
both; on BERT it is the output dense layer's result before the residual add and the output
LayerNorm (``hook_resid_post`` is that LayerNorm's output), on a pre-LN decoder
``resid_post = resid_mid + mlp_out``.

``check_site_name(site)`` checks the name alone (before anything boots); ``check_site(bridge,
site, layer)`` checks that the booted model has the hook at that layer (ConfigError listing the
valid layers and sites).
"""

from __future__ import annotations

import re
from typing import Any

from analysis.errors import ConfigError

DEFAULT_SITE = "hook_z"
SITE_HOOKS = {"hook_z": "blocks.{layer}.attn.hook_z", "resid_pre": "blocks.{layer}.hook_resid_pre",
              "resid_post": "blocks.{layer}.hook_resid_post", "mlp_out": "blocks.{layer}.hook_mlp_out",
              "mlp_in": "blocks.{layer}.mlp.hook_in"}
SITES = ("hook_z", "resid_pre", "resid_post", "mlp_out")  # what an SAE reconstructs
SITE_HELP = ("'hook_z' (attention outputs before W_O, per head), 'resid_pre' / 'resid_post' (the residual stream "
             "entering / leaving the block) or 'mlp_out' (the MLP's output)")
_RES = {site: re.compile("^" + re.escape(pat).replace(re.escape("{layer}"), r"(\d+)") + "$")
        for site, pat in SITE_HOOKS.items()}


def check_site_name(site: Any) -> str:
    """``site`` when it is a known site; ConfigError naming it and the valid ones otherwise."""
    if site in ("mlp_in", "transcoder", "skip_transcoder"):
        raise ConfigError(f"SAE site {site!r}: a transcoder reads the MLP input and predicts the MLP output, it is "
                          "not an SAE site; use api.sae_transcoder(source, layer, skip=...) or `lenslab sae "
                          f"transcoder SOURCE --layer L [--skip]` (SAE sites: {', '.join(SITES)})")
    if site not in SITES:
        raise ConfigError(f"SAE site {site!r} is unknown; valid sites: {', '.join(SITES)} ({SITE_HELP}); "
                          "pass e.g. site='resid_post'")
    return site


def hook_for(site: str, layer: int) -> str:
    """The hook name of ``site`` at ``layer`` (``hook_for('resid_post', 3) == 'blocks.3.hook_resid_post'``)."""
    if site not in SITE_HOOKS:
        check_site_name(site)
    return SITE_HOOKS[site].format(layer=int(layer))


def parse_hook(hook_name: str) -> tuple[str, int] | None:
    """(site, layer) of a site's hook name, or None for any other hook."""
    for site, rx in _RES.items():
        if m := rx.match(str(hook_name)):
            return site, int(m.group(1))
    return None


def site_layers(bridge: Any, site: str) -> list[int]:
    """The layers at which ``bridge`` exposes ``site``'s hook, ascending."""
    rx = _RES[site]
    return sorted(int(m.group(1)) for n in bridge.hook_dict if (m := rx.match(n)))


def check_site(bridge: Any, site: str, layer: int) -> str:
    """The hook name of ``site`` at ``layer`` when ``bridge`` has it; ConfigError listing the valid
    layers (and the sites this model has) otherwise."""
    if site not in SITE_HOOKS:
        check_site_name(site)
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ConfigError(f"layer {layer!r} must be an integer block index; pass e.g. layer=0")
    name = hook_for(site, layer)
    if name in bridge.hook_dict:
        return name
    layers = site_layers(bridge, site)
    have = [s for s in SITES if site_layers(bridge, s)]
    if not layers:
        raise ConfigError(f"this model exposes no {SITE_HOOKS[site].format(layer='L')} (site {site!r}); "
                          f"its sites are {have or 'none'}")
    raise ConfigError(f"layer {layer!r} has no {site} hook ({name}); valid layers are {layers} "
                      f"({hook_for(site, layers[0])} ... {hook_for(site, layers[-1])})")


__all__ = ["DEFAULT_SITE", "SITES", "SITE_HELP", "SITE_HOOKS", "check_site", "check_site_name", "hook_for",
           "parse_hook", "site_layers"]
