"""Loader for the bilinear decomposition: GLU layers, output directions and layer inputs of a Source.

What is decomposed, per model family (tensor names as stored):

- Llama-style GLU MLPs (Llama, Mistral, Qwen2, ...): ``layers.L.mlp.{gate,up,down}_proj``:
  W = gate_proj, V = up_proj, P = down_proj. The layer's input x is the MLP's input, i.e. the
  *normalised* residual: RMSNorm(resid_mid) ⊙ γ (``post_attention_layernorm``); its output is
  the MLP's contribution to the residual stream (d_out = d_model). ``hidden_act`` in
  config.json decides: ``linear`` (the bilinear tiny LM) is exact; ``silu`` (SwiGLU) etc.
  decompose the bilinear part only (flagged, with a warning).
- Mixtral experts: ``layers.L.block_sparse_moe.experts.E.{w1,w3,w2}`` (gate, up, down): one
  expert at a time (``expert=E``); SwiGLU, so bilinear part only; routing weights not included.
- LensLab bilinear layers (``analysis.models.bilinear_digits``): ``<name>.{w,v,p}.weight`` (+ biases); the
  digits model's layer ``bilinear`` reads the embedding e = E x (+ b) of the pixels.

Layer inputs (held-out data, token inputs) live in ``analysis.bilinear.inputs``.

Direction specs (strings, so they can be typed in the CLI and stored as parameters):

- ``class:all`` | ``class:3,5``: rows of the class head (``head.weight``), with its bias as offset;
- ``token:<text>[,<text>...]`` | ``token:#17``: a token's unembedding row times the final
  RMSNorm's γ (``lm_head.weight[t] ⊙ model.norm.weight``): its direct logit direction,
  ignoring the final norm's 1/rms scale. Each text must be exactly one token;
- ``resid:i[,j]``: unit basis vectors of the layer's output (residual) space;
- ``vector:PATH``: rows of a ``.npy`` or single-tensor ``.safetensors`` file, (d_out,) or (k, d_out)
  (any direction: an SAE feature, a probe, a steering vector);
- ``sae:PATH:i[,j]``: decoder rows ``W_dec[i]`` of a SAELens-format SAE (directory with
  ``sae_weights.safetensors`` or that file);
- ``hosvd`` | ``hosvd:K``: the top K output directions of the tensor's HOSVD (default 8);
  this is what ``None`` (no direction) means.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from analysis.bilinear.decompose import BilinearWeights, as_directions
from analysis.bilinear.hosvd import hosvd
from analysis.errors import ConfigError, SourceError
from analysis.sources import Source

DEFAULT_HOSVD = 8
_FAMILIES = {  # family -> (regex on the W tensor name, suffixes of W, V, P relative to the module)
    "llama": (re.compile(r"^(?P<mod>(?:.*\.)?layers\.(?P<layer>\d+)\.mlp)\.gate_proj\.weight$"),
              ("gate_proj", "up_proj", "down_proj")),
    "mixtral": (re.compile(r"^(?P<mod>(?:.*\.)?layers\.(?P<layer>\d+)\.block_sparse_moe\.experts\.(?P<expert>\d+))"
                           r"\.w1\.weight$"), ("w1", "w3", "w2")),
    "lenslab": (re.compile(r"^(?P<mod>(?:.*\.)?[A-Za-z_]\w*)\.w\.weight$"), ("w", "v", "p")),
}
_MLP_HINT = re.compile(r"(?:^|\.)(?:mlp|ffn|feed_forward|intermediate|c_fc|fc1|block_sparse_moe)(?:\.|$)")


@dataclass(frozen=True, slots=True)
class GluRef:
    """Where one GLU / bilinear layer's tensors live in a Source."""

    layer: int  # block index (0 for a model with one unnumbered bilinear layer)
    expert: int | None  # expert index for MoE layers
    module: str  # module path, e.g. "model.layers.0.mlp"
    family: str  # "llama" | "mixtral" | "lenslab"
    w: str
    v: str
    p: str
    w_bias: str | None
    v_bias: str | None
    p_bias: str | None
    norm: str | None  # RMSNorm weight applied to the layer's input (LMs), else None


def hf_config(src: Source) -> dict[str, Any]:
    if src.hf_dir is None or not (src.hf_dir / "config.json").is_file():
        return {}
    try:
        return json.loads((src.hf_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise SourceError(f"{src.hf_dir / 'config.json'}: unreadable ({exc}); re-save the model") from exc


def _model_dir(src: Source) -> Path | None:
    files = getattr(src, "files", None)
    return src.hf_dir or (files[0].parent if files else None)


def training_info(src: Source) -> dict[str, Any]:
    """The ``lenslab_training.json`` next to the weights (LensLab-trained models), or {}."""
    d = _model_dir(src)
    p = d / "lenslab_training.json" if d is not None else None
    if p is None or not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def glu_layers(src: Source) -> list[GluRef]:
    """Every GLU / bilinear layer of ``src``, sorted by (layer, expert).

    Raises ConfigError when the model has MLPs but none is a GLU (e.g. BERT's GELU MLP),
    SourceError when it has no MLP at all.
    """
    names = {i.name for i in src.tensor_infos()}
    found: list[GluRef] = []
    for family, (pattern, (sw, sv, sp)) in _FAMILIES.items():
        for name in sorted(names):
            m = pattern.match(name)
            if not m:
                continue
            mod = m.group("mod")
            need = [f"{mod}.{s}.weight" for s in (sw, sv, sp)]
            if not all(n in names for n in need):
                continue
            bias = [f"{mod}.{s}.bias" if f"{mod}.{s}.bias" in names else None for s in (sw, sv, sp)]
            layer = int(m.group("layer")) if "layer" in m.groupdict() else -1
            norm = None
            if family in ("llama", "mixtral"):
                block = mod[:mod.index(f"layers.{layer}") + len(f"layers.{layer}")]
                norm = f"{block}.post_attention_layernorm.weight"
                norm = norm if norm in names else None
            expert = int(m.group("expert")) if "expert" in m.groupdict() else None
            found.append(GluRef(layer, expert, mod, family, *need, *bias, norm))
    if not found:
        mlp = sorted(n for n in names if _MLP_HINT.search(n))
        if mlp:
            raise ConfigError(f"{src.label}: its MLPs are not gated linear units (found {mlp[0]!r}, no gate/up/down "
                              "projections); the bilinear decomposition needs a GLU MLP (gate_proj, up_proj, "
                              "down_proj) or a LensLab bilinear layer (w, v, p)")
        raise SourceError(f"{src.label}: no MLP layers found (no tensor named like *.mlp.*, *.w.weight); the bilinear "
                          "decomposition needs a model with GLU or bilinear MLPs")
    if all(r.layer < 0 for r in found):  # unnumbered bilinear layers: number them in name order
        found = [replace(r, layer=i) for i, r in enumerate(found)]
    return sorted(found, key=lambda r: (r.layer, -1 if r.expert is None else r.expert))


def find_layer(src: Source, layer: int, expert: int | None = None) -> GluRef:
    """The GLU of block ``layer`` (and ``expert`` for an MoE block). ConfigError names the choices."""
    refs = glu_layers(src)
    at = [r for r in refs if r.layer == layer]
    layers = sorted({r.layer for r in refs})
    if not at:
        raise ConfigError(f"{src.label}: no GLU/bilinear layer {layer}; this model has layers "
                          f"{', '.join(map(str, layers))}")
    experts = [r.expert for r in at if r.expert is not None]
    if experts and expert is None:
        raise ConfigError(f"{src.label}: layer {layer} is a mixture of {len(experts)} experts; pick one with "
                          f"expert=E (--expert E), E in 0..{max(experts)}")
    if not experts and expert is not None:
        raise ConfigError(f"{src.label}: layer {layer} is not a mixture of experts; drop expert={expert}")
    if expert is not None:
        at = [r for r in at if r.expert == expert]
        if not at:
            raise ConfigError(f"{src.label}: layer {layer} has experts 0..{max(experts)}, not {expert}")
    return at[0]


def gate_activation(src: Source, ref: GluRef) -> str:
    """The gate's activation: ``linear`` for LensLab bilinear layers, config.json's
    ``hidden_act`` for HF models (``unknown`` without a config: treated as non-bilinear)."""
    if ref.family == "lenslab":
        return "linear"
    cfg = hf_config(src)
    return str(cfg.get("hidden_act") or cfg.get("hidden_activation") or "unknown")


def load_layer(src: Source, layer: int = 0, expert: int | None = None) -> tuple[GluRef, BilinearWeights]:
    """The tensors of one GLU as ``BilinearWeights`` (float64)."""
    ref = find_layer(src, layer, expert)
    t = {k: (src.tensor(n) if n is not None else None) for k, n in
         (("w", ref.w), ("v", ref.v), ("p", ref.p), ("w_bias", ref.w_bias), ("v_bias", ref.v_bias),
          ("p_bias", ref.p_bias))}
    return ref, BilinearWeights(**t, gate_act=gate_activation(src, ref), name=ref.module)


# -- directions ----------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class DirectionSet:
    """Resolved output directions for one spec."""

    spec: str  # canonical spec (stored as a parameter)
    kind: str  # class | token | resid | vector | sae | hosvd
    vectors: np.ndarray  # (k, d_out) float64
    labels: tuple[str, ...]
    digest: str  # sha256 prefix of the vectors (part of the store key for file-based specs)
    offsets: np.ndarray | None = None  # (k,) added to the outputs (class head bias)
    class_ids: np.ndarray | None = None  # (k,) class index of each direction (class specs)
    sigma: np.ndarray | None = None  # (k,) HOSVD singular values


def _ints(text: str, what: str, upper: int) -> list[int]:
    try:
        out = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise ConfigError(f"{what}: expected comma-separated integers, got {text!r}") from exc
    if not out or any(not 0 <= i < upper for i in out):
        raise ConfigError(f"{what}: indices {text!r} must lie in 0..{upper - 1}")
    return out


def tensor_or_none(src: Source, *names: str) -> torch.Tensor | None:
    have = {i.name for i in src.tensor_infos()}
    for n in names:
        if n in have:
            return src.tensor(n).to(torch.float64)
    return None


def lm_prefix(ref: GluRef) -> str:
    """``model.`` for ``model.layers.0.mlp``: where embed_tokens and norm live."""
    return ref.module[:ref.module.index(f"layers.{ref.layer}")]


def tokenizer(src: Source):
    if src.hf_dir is None or not (src.hf_dir / "tokenizer.json").is_file():
        raise SourceError(f"{src.label}: token directions need the model's tokenizer.json next to config.json; "
                          "use #id (token:#17) or save the tokenizer with the model")
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(src.hf_dir / "tokenizer.json"))


def _read_vectors(path: Path) -> np.ndarray:
    if not path.is_file():
        raise SourceError(f"{path}: no such file; give a .npy or .safetensors file holding (d_out,) or (k, d_out)")
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False).astype(np.float64)
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        arrays = load_file(str(path))
        if len(arrays) != 1:
            raise ConfigError(f"{path}: holds {len(arrays)} tensors ({', '.join(sorted(arrays))}); a vector file "
                              "must hold exactly one")
        return next(iter(arrays.values())).astype(np.float64)
    raise ConfigError(f"{path}: unsupported vector file type {path.suffix!r}; use .npy or .safetensors")


def canonical_spec(spec: str | None) -> str:
    """A direction spec in canonical form without reading the model (None -> ``hosvd:8``)."""
    spec = (spec or "hosvd").strip()
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "class" and arg.strip() in ("", "all"):
        return "class:all"
    if kind == "hosvd" and not arg.strip():
        return f"hosvd:{DEFAULT_HOSVD}"
    return f"{kind}:{arg}"


def direction_file(spec: str | None) -> str | None:
    """The path a ``vector:PATH`` or ``sae:PATH:i`` direction spec reads, as written (before ``~`` is
    expanded); None for the kinds that read no file."""
    kind, _, arg = canonical_spec(spec).partition(":")
    return arg if kind == "vector" else arg.rpartition(":")[0] if kind == "sae" else None


def spec_params(spec: str | None) -> dict[str, Any]:
    """Store parameters of a direction spec: the canonical spec, plus the sha256 of the file a
    ``vector:`` / ``sae:`` spec reads (so an edited file is not served from the cache)."""
    canon = canonical_spec(spec)
    params: dict[str, Any] = {"direction": canon}
    path = Path(text).expanduser() if (text := direction_file(canon)) is not None else None
    if path is not None:
        path = path / "sae_weights.safetensors" if path.is_dir() else path
        if not path.is_file():
            raise SourceError(f"{path}: no such file for direction {canon!r}; give an existing .npy/.safetensors file")
        params["file_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return params


def resolve_directions(src: Source, ref: GluRef, layer: BilinearWeights, spec: str | None, *,
                       device: str | torch.device | None = None) -> DirectionSet:
    """Turn a direction spec (module docstring) into vectors in the layer's output space
    (``hosvd`` runs on ``device``, default CPU; the vectors are CPU float64 either way).

    Raises ConfigError for an unknown or malformed spec or a kind the model lacks (no class
    head, no unembedding), ShapeError (from ``as_directions``) for vectors of the wrong width.
    """
    spec = canonical_spec(spec)
    kind, _, arg = spec.partition(":")
    offsets = class_ids = sigma = None
    if kind == "class":
        head = tensor_or_none(src, "head.weight")
        if head is None:
            raise ConfigError(f"{src.label}: class directions need a class head (head.weight); use token:, resid:, "
                              "vector: or hosvd for this model")
        ids = list(range(head.shape[0])) if arg == "all" else _ints(arg, "class", head.shape[0])
        vectors = head[ids].numpy()
        bias = tensor_or_none(src, "head.bias")
        offsets = bias[ids].numpy() if bias is not None else np.zeros(len(ids))
        class_ids = np.array(ids)
        labels = tuple(f"class {i}" for i in ids)
        spec = "class:all" if arg == "all" else f"class:{','.join(map(str, ids))}"
    elif kind == "token":
        prefix = lm_prefix(ref) if ref.family != "lenslab" else ""
        unembed = tensor_or_none(src, "lm_head.weight", f"{prefix}embed_tokens.weight")
        if unembed is None:
            raise ConfigError(f"{src.label}: token directions need an unembedding (lm_head.weight or tied "
                              "embed_tokens.weight); use resid:, vector: or hosvd")
        if not arg:
            raise ConfigError("token: give one or more tokens, e.g. token:the,def or token:#17")
        ids, labels_l = [], []
        tok = None
        for piece in arg.split(","):
            if piece.startswith("#"):
                ids += _ints(piece[1:], "token id", unembed.shape[0])
                labels_l.append(f"token #{ids[-1]}")
                continue
            tok = tok or tokenizer(src)
            enc = tok.encode(piece, add_special_tokens=False).ids
            if len(enc) != 1:
                raise ConfigError(f"token {piece!r} encodes to {len(enc)} tokens {enc}; give a single token "
                                  "(mind the leading space) or its id as #id")
            ids.append(enc[0])
            labels_l.append(f"token {piece!r}")
        gamma = tensor_or_none(src, f"{prefix}norm.weight")
        vectors = (unembed[ids] * (gamma if gamma is not None else 1.0)).numpy()
        labels = tuple(labels_l)
        spec = f"token:{arg}"
    elif kind == "resid":
        ids = _ints(arg, "resid", layer.d_out)
        vectors = np.eye(layer.d_out)[ids]
        labels = tuple(f"resid[{i}]" for i in ids)
        spec = f"resid:{','.join(map(str, ids))}"
    elif kind == "vector":
        vectors = _read_vectors(Path(arg).expanduser())
        vectors = vectors[None] if vectors.ndim == 1 else vectors
        labels = tuple(f"vector[{i}]" for i in range(len(vectors)))
    elif kind == "sae":
        path_text, _, idx = arg.rpartition(":")
        path = Path(path_text).expanduser()
        path = path / "sae_weights.safetensors" if path.is_dir() else path
        if not path.is_file():
            raise SourceError(f"{path}: no SAE weights; give sae:DIR:i with DIR holding sae_weights.safetensors "
                              "(SAELens format)")
        from safetensors.numpy import load_file

        w_dec = load_file(str(path)).get("W_dec")
        if w_dec is None or w_dec.ndim != 2:
            raise ConfigError(f"{path}: no 2-D W_dec (d_sae, d_in) tensor; is this a SAELens-format SAE?")
        ids = _ints(idx, "sae feature", w_dec.shape[0])
        vectors = w_dec[ids].astype(np.float64)
        labels = tuple(f"sae feature {i}" for i in ids)
    elif kind == "hosvd":
        k = _ints(arg, "hosvd components", 1 << 30)[0]
        if k < 1:
            raise ConfigError(f"hosvd:{arg}: give at least 1 component")
        h = hosvd(layer, min(k, layer.d_out), device=device)
        vectors, sigma = np.array(h.directions), np.array(h.singular_values)
        labels = tuple(f"hosvd {i} (σ={s:.3g})" for i, s in enumerate(sigma))
        spec = f"hosvd:{k}"
    else:
        raise ConfigError(f"unknown direction kind {kind!r} in {spec!r}; use class:, token:, resid:, vector:, sae: "
                          "or hosvd")
    u = as_directions(vectors, layer.d_out, labels=labels, name=f"{src.label} {ref.module}")
    digest = hashlib.sha256(np.ascontiguousarray(u.numpy()).tobytes()).hexdigest()[:16]
    return DirectionSet(spec, kind, u.numpy(), tuple(labels), digest, offsets, class_ids, sigma)
