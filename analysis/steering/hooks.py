"""Apply steering vectors and ablations to a TransformerBridge through hooks, removed on exit.

- ``steering(bridge, vector, alpha=...)``: at each chosen layer's hook, every position
  h ← h + α v (``scale="absolute"``) or h ← h + α ‖h‖ v/‖v‖ (``scale="norm"``: α is a fraction
  of each token's own activation norm).
- ``ablation(bridge, directions)``: h ← h − R̂ᵀ(R̂ h), projecting the span of the directions
  (rows of R, orthonormalised to R̂) out. By default at every site that forms the residual
  stream (``residual_sites``), so h·r̂ = 0 at every resid hook of every layer; with
  ``hook=...`` at that hook of the chosen layers instead.

  In a pre-norm model (Llama, Mixtral, ...) the stream is the plain sum of its writers
  (``hook_embed`` and each block's ``hook_attn_out`` and ``hook_mlp_out``), so projecting the
  writers suffices, and it is the runtime twin of weight orthogonalisation
  (``analysis.steering.orthogonalize``). A post-norm model (BERT/MiniLM) normalises after each add,
  h ← LayerNorm(h + f(h)): the re-centring, the per-channel gain and the bias bring the
  direction back, so the projection is also applied after every LayerNorm (the embedding
  LayerNorm's output ``hook_embed``, ``ln1``'s output, which BERT bridges also expose as
  ``hook_attn_out``, and ``hook_resid_post``, ``ln2``'s output). No weight edit reproduces that.

Both are context managers built on ``bridge.hooks``: the hooks they add are removed when the
block exits, also when it raises, and hooks attached before are left alone. They compose by
nesting. The vectors and bases are moved to the model's device when the hooks are built (the
projection runs in float64 there, float32 on MPS, which has no float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analysis.errors import ConfigError, ShapeError
from analysis.steering.vectors import SteeringVector, check_compatible
from analysis.steering.extract import check_layers, hook_name
from analysis.steering.collect import model_device

SCALES = ("absolute", "norm")
Hook = tuple[str, Callable[..., Any]]


def d_model(bridge: Any) -> int:
    return int(bridge.cfg.d_model)


def check_alpha(alpha: Any) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(alpha)):
        raise ConfigError(f"alpha={alpha!r} must be a finite number (the steering strength, e.g. 4 or -2)")
    return float(alpha)


def orthonormal_basis(directions: np.ndarray | torch.Tensor | Sequence[float], width: int) -> torch.Tensor:
    """Orthonormal rows (k, d_model) float64 spanning ``directions`` ((d_model,) or (k, d_model))."""
    r = torch.as_tensor(np.asarray(directions, dtype=np.float64))
    if r.ndim == 1:
        r = r[None]
    if r.ndim != 2 or r.shape[1] != width or r.shape[0] == 0:
        raise ShapeError(f"directions must be (d_model,) or (k, d_model) with d_model = {width}, got "
                         f"{tuple(r.shape)}; a direction from another model does not fit this one")
    if not bool(torch.isfinite(r).all()):
        raise ShapeError("directions hold NaN or inf; re-extract them")
    q, rr = torch.linalg.qr(r.T)
    diag = rr.diagonal().abs()
    if bool((diag <= 1e-10 * max(float(diag.max()), 1e-300)).any()):
        raise ConfigError(f"the {r.shape[0]} directions are linearly dependent (or zero); pass independent "
                          "directions (e.g. the top-k SVD directions)")
    return q.T.contiguous()


def _wide(device: torch.device) -> torch.dtype:
    """float64, or float32 on MPS (which has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


def project_out(h: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """h − (h R̂ᵀ) R̂ for h (..., d_model) and orthonormal R̂ (k, d_model); computed in float64
    (float32 on MPS) on ``h``'s device."""
    x = h.to(_wide(h.device))
    b = basis.to(device=x.device, dtype=x.dtype)
    return (x - (x @ b.T) @ b).to(h.dtype)


def _add_hook(delta: torch.Tensor, alpha: float, scale: str) -> Callable[..., torch.Tensor]:
    unit = delta / delta.norm().clamp_min(1e-30)

    def hook(x: torch.Tensor, hook: Any = None) -> torch.Tensor:
        if scale == "norm":
            return x + (alpha * x.norm(dim=-1, keepdim=True) * unit.to(device=x.device, dtype=x.dtype))
        return x + (alpha * delta).to(device=x.device, dtype=x.dtype)

    return hook


def steering_hooks(bridge: Any, vector: SteeringVector | np.ndarray | torch.Tensor, *, alpha: float,
                   layers: Sequence[int] | None = None, hook: str | None = None, scale: str = "absolute",
                   fingerprint: str | None = None, allow_foreign: bool = False) -> list[Hook]:
    """``(hook_name, fn)`` pairs that add α·v (see ``steering``), for ``bridge.hooks`` or
    ``analysis.models.masked_lm.masked_token_loss(fwd_hooks=...)``. Validates everything first."""
    alpha = check_alpha(alpha)
    if scale not in SCALES:
        raise ConfigError(f"scale={scale!r} must be one of {', '.join(SCALES)}")
    width = d_model(bridge)
    if isinstance(vector, SteeringVector):
        vector.require_single("steering (adding α·v)")
        check_compatible(vector, d_model=width, fingerprint=fingerprint, allow_foreign=allow_foreign)
        hook = hook or vector.hook
        layers = check_layers(bridge, layers if layers is not None else vector.layers)
        if len(vector.layers) == 1:
            rows = {layer: vector.vectors[0] for layer in layers}
        else:
            rows = {layer: vector.at(layer) for layer in layers}
    else:
        v = np.asarray(vector, dtype=np.float32)
        if v.shape != (width,):
            raise ShapeError(f"a raw steering vector must have shape (d_model,) = ({width},), got {v.shape}; "
                             "it comes from another model or layer layout")
        if not np.isfinite(v).all():
            raise ShapeError("the steering vector holds NaN or inf; re-extract it")
        if layers is None:
            raise ConfigError("a raw vector needs layers=[...]; a SteeringVector knows its own")
        layers = check_layers(bridge, layers)
        rows = {layer: v for layer in layers}
    hook = hook or "resid_post"
    device = model_device(bridge)
    out = []
    for layer, row in rows.items():
        delta = torch.from_numpy(np.array(row, dtype=np.float32)).to(device)
        if scale == "norm" and float(delta.norm()) == 0:
            raise ConfigError(f"the vector at layer {layer} is zero, so it has no direction to scale by the "
                              "activation norm; use scale='absolute' or another vector")
        out.append((hook_name(bridge, layer, hook), _add_hook(delta, alpha, scale)))
    return out


@contextmanager
def _hooked(bridge: Any, hooks: list[Hook]) -> Iterator[Any]:
    with bridge.hooks(fwd_hooks=hooks, reset_hooks_end=True):
        yield bridge


@contextmanager
def steering(bridge: Any, vector: SteeringVector | np.ndarray | torch.Tensor, *, alpha: float,
             layers: Sequence[int] | None = None, hook: str | None = None, scale: str = "absolute",
             fingerprint: str | None = None, allow_foreign: bool = False) -> Iterator[Any]:
    """Add α·v at ``hook`` of ``layers`` (default: the vector's own) for the duration of the block.

        >>> with steering(bridge, vec, alpha=4.0):
        ...     logits = bridge(ids)

    A SteeringVector with one layer can be applied at any layers; with several, only at those.
    ``fingerprint`` (the model's) refuses vectors from another model unless ``allow_foreign``.
    """
    hooks = steering_hooks(bridge, vector, alpha=alpha, layers=layers, hook=hook, scale=scale,
                           fingerprint=fingerprint, allow_foreign=allow_foreign)
    with _hooked(bridge, hooks):
        yield bridge


POST_NORM_ARCHITECTURES = ("Bert", "Roberta", "XLMRoberta", "Electra", "DistilBert", "MPNet", "Albert")


def is_post_norm(bridge: Any) -> bool:
    """True for BERT-style encoders, which apply LayerNorm after each residual add (and to the
    embeddings: their bridges have ``embed_ln``)."""
    arch = str(getattr(bridge.cfg, "architecture", "") or "")
    return arch.startswith(POST_NORM_ARCHITECTURES) or "embed_ln.hook_out" in bridge.hook_dict


def writer_sites(bridge: Any) -> list[str]:
    """Hook names of every output that writes to the residual stream: the token embedding
    (plus learned position embeddings if the model has them) and each block's attention and MLP."""
    names = ["hook_embed"]
    if getattr(bridge.cfg, "positional_embedding_type", "") == "standard" and "hook_pos_embed" in bridge.hook_dict:
        names.append("hook_pos_embed")
    for layer in range(int(bridge.cfg.n_layers)):
        names += [hook_name(bridge, layer, "attn_out"), hook_name(bridge, layer, "mlp_out")]
    return names


def residual_sites(bridge: Any) -> list[str]:
    """Hook names where ``ablation`` projects by default, in forward order.

    Pre-norm: ``writer_sites``. Post-norm: ``hook_embed`` (the embedding LayerNorm's output; the
    position embeddings before it are not projected), then per block ``ln1``'s output (the
    stream after attention), ``hook_attn_out``, ``hook_mlp_out`` (so the sum entering ``ln2``,
    the bridge's ``hook_resid_mid``, has no component either) and ``hook_resid_post``.
    """
    if not is_post_norm(bridge):
        return writer_sites(bridge)
    names = ["hook_embed"]
    for layer in range(int(bridge.cfg.n_layers)):
        ln1 = f"blocks.{layer}.ln1.hook_out"
        names += [ln1] if ln1 in bridge.hook_dict else []
        names += [hook_name(bridge, layer, h) for h in ("attn_out", "mlp_out", "resid_post")]
    return names


def bridge_fingerprint(bridge: Any) -> str | None:
    """Fingerprint of the Hugging Face directory the bridge was booted from (``cfg.model_name``;
    memoised by ``analysis.sources``), or None when that is not a readable local directory. It
    describes the checkpoint, not weights edited in memory after booting."""
    from analysis.errors import LensLabError
    from analysis.sources import open_source

    name = str(getattr(bridge.cfg, "model_name", "") or "")
    try:
        return open_source(Path(name)).fingerprint if name and Path(name).is_dir() else None
    except (LensLabError, OSError):
        return None


def ablation_hooks(bridge: Any, directions: np.ndarray | torch.Tensor | SteeringVector, *,
                   layers: Sequence[int] | None = None, hook: str | None = None, fingerprint: str | None = None,
                   allow_foreign: bool = False) -> list[Hook]:
    """``(hook_name, fn)`` pairs projecting the directions out (see ``ablation``)."""
    if isinstance(directions, SteeringVector):
        if directions.fingerprint and not allow_foreign and not fingerprint:
            fingerprint = bridge_fingerprint(bridge)
        check_compatible(directions, d_model=d_model(bridge), fingerprint=fingerprint, allow_foreign=allow_foreign)
        directions = directions.vectors
    device = model_device(bridge)
    basis = orthonormal_basis(directions, d_model(bridge)).to(device=device, dtype=_wide(device))

    def fn(x: torch.Tensor, hook: Any = None) -> torch.Tensor:
        return project_out(x, basis)

    if hook is None:
        if layers is not None:
            raise ConfigError("layers= needs hook= (e.g. hook='resid_pre'); without a hook the ablation acts on "
                              "every site that forms the residual stream, at every layer")
        return [(name, fn) for name in residual_sites(bridge)]
    return [(hook_name(bridge, layer, hook), fn) for layer in check_layers(bridge, layers)]


@contextmanager
def ablation(bridge: Any, directions: np.ndarray | torch.Tensor | SteeringVector, *,
             layers: Sequence[int] | None = None, hook: str | None = None, fingerprint: str | None = None,
             allow_foreign: bool = False) -> Iterator[Any]:
    """Project the span of ``directions`` out of the residual stream (default: at every
    ``residual_sites`` hook) or out of ``hook`` at ``layers`` for the duration of the block.

    A SteeringVector that carries a fingerprint is checked against the model's (``fingerprint``,
    or else ``bridge_fingerprint``): ConfigError for a vector from another model unless
    ``allow_foreign``; ShapeError for another width. Its rows (all k of each layer) span the
    ablated subspace."""
    hooks = ablation_hooks(bridge, directions, layers=layers, hook=hook, fingerprint=fingerprint,
                           allow_foreign=allow_foreign)
    with _hooked(bridge, hooks):
        yield bridge


def attached_hook_count(bridge: Any) -> int:
    """Removable forward hooks currently attached anywhere on the bridge (0 on a clean bridge;
    the permanent hooks some bridges wire up internally, e.g. BERT's, are not counted)."""
    return sum(not getattr(h, "is_permanent", False) for hp in set(bridge.hook_dict.values())
               for h in getattr(hp, "fwd_hooks", []))
