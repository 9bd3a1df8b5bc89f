"""Save and load SAEs in SAELens 6.x's on-disk format (what ``SAE.save_model`` /
``SAE.load_from_disk`` read and write).

A directory with

- ``cfg.json``: ``d_in``, ``d_sae``, ``dtype``, ``device``, ``apply_b_dec_to_input`` (true),
  ``normalize_activations`` ("none"), ``reshape_activations`` ("hook_z"), ``architecture``
  ("standard" for ReLU, "topk" with ``k`` and ``rescale_acts_by_decoder_norm`` false; a TopK SAE
  SAELens saved with it true is folded to unit-norm decoder rows on load; "jumprelu" for jumprelu,
  and for batchtopk and matryoshka_batchtopk, which SAELens also saves as JumpReLU SAEs with their
  inference threshold; "gated") and
  ``metadata`` (``sae_lens_version``, ``hook_name``, ``model_name``, ...). ``hook_name`` is the hook
  of any SAE site (``sae.sites``: ``blocks.L.attn.hook_z``, ``blocks.L.hook_resid_pre`` /
  ``hook_resid_post``, ``blocks.L.hook_mlp_out``), which sets the config's site and layer; only
  hook_z files say ``reshape_activations`` "hook_z" (the others "none"). SAELens 6 keeps
  ``hook_name`` in ``metadata``; we also write top-level ``hook_name`` and ``hook_layer`` as
  pre-6 readers expect (SAELens 6 ignores unknown top-level keys). Our full ``SAEConfig``
  rides along as ``metadata.lenslab_config``.
- ``sae_weights.safetensors``: ``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_in], ``b_enc``
  [d_sae], ``b_dec`` [d_in] (float32 unless the cfg says otherwise); jumprelu files add
  ``threshold`` [d_sae]; gated files hold ``b_gate`` (our ``b_enc``), ``r_mag``, ``b_mag`` [d_sae]
  and no ``b_enc``. ``metadata.training_architecture`` and ``training_architecture_details``
  record the training settings as SAELens writes them (k, matryoshka_widths, l0_coefficient ...);
  a jumprelu file SAELens wrote for a batchtopk / matryoshka_batchtopk run loads as that
  architecture when they are complete.
- ``sparsity.safetensors`` (optional): ``sparsity`` [d_sae] = log10(feature density + 1e-10),
  as SAELens's trainer writes it.

Files are written to temp names and renamed into place (``os.replace``), weights first and
``cfg.json`` last, so an interrupted save never leaves a cfg pointing at missing weights.
A ReLU SAE's ``l1_coefficient`` is read from the file (``file_l1_coefficient``); when the
file records none, the config keeps the default 1.0 and ``saelens_l1_coefficient`` says None.
Loading validates the cfg keys and the safetensors header before reading any tensor:
malformed files raise ``CorruptCheckpointError`` (also an ``architecture`` that is not a string, a
``metadata`` that is not an object, a d_in / d_sae / k / n_heads / d_head / matryoshka width that
is not a whole number: ``file_int`` refuses True and 2.7 rather than reading 1 and 2); valid but
unsupported settings (another architecture, activation normalisation, a hook that is no SAE site)
raise ``ConfigError``.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch

from analysis.errors import ConfigError, CorruptCheckpointError, SourceError
from sae.config import SAEConfig
from sae.sites import DEFAULT_SITE, SITE_HOOKS, SITES, hook_for, parse_hook
from sae.model import SAE
from sae.transcoder import SAELENS_ARCHITECTURES

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
SAELENS_FORMAT_VERSION = "6.54.12"  # the SAELens release whose writer this mirrors
_ARCH_TO_SAELENS = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu",
                    "matryoshka_batchtopk": "jumprelu", "gated": "gated"}
_SAELENS_TO_ARCH = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}
_WEIGHT_SHAPES = {"W_enc": ("d_in", "d_sae"), "W_dec": ("d_sae", "d_in"), "b_enc": ("d_sae",), "b_dec": ("d_in",)}
_FILE_WEIGHTS = {  # SAELens file tensor name -> our SAE's, per SAELens architecture
    "standard": {n: n for n in _WEIGHT_SHAPES}, "topk": {n: n for n in _WEIGHT_SHAPES},
    "jumprelu": {**{n: n for n in _WEIGHT_SHAPES}, "threshold": "threshold"},
    "gated": {"W_enc": "W_enc", "W_dec": "W_dec", "b_gate": "b_enc", "b_dec": "b_dec", "r_mag": "r_mag",
              "b_mag": "b_mag"},
}
_SHAPES = {**_WEIGHT_SHAPES, "threshold": ("d_sae",), "b_gate": ("d_sae",), "r_mag": ("d_sae",), "b_mag": ("d_sae",)}
# training settings SAELens records in metadata.training_architecture_details, per our architecture
_DETAILS = {"relu": ("l1_coefficient",), "gated": ("l1_coefficient",), "topk": ("k",),
            "jumprelu": ("l0_coefficient", "l0_warmup_steps", "jumprelu_init_threshold", "jumprelu_bandwidth"),
            "batchtopk": ("k", "topk_threshold_lr"),
            "matryoshka_batchtopk": ("k", "topk_threshold_lr", "matryoshka_widths")}
_DETAIL_NAMES = {"l0_warmup_steps": "l0_warm_up_steps"}  # ours -> SAELens's where they differ


def saelens_cfg_dict(sae: SAE) -> dict[str, Any]:
    """The ``cfg.json`` dict SAELens 6.x would write for this SAE."""
    c = sae.cfg
    cfg: dict[str, Any] = {
        "d_in": c.d_in,
        "d_sae": c.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "hook_z" if c.site == "hook_z" else "none",
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": SAELENS_FORMAT_VERSION,
            "hook_name": c.hook_name,
            "model_name": c.source_label or None,
            "hook_head_index": None,
            "prepend_bos": True,
            "written_by": "lenslab",
            "n_heads": c.n_heads,
            "d_head": c.d_head,
            "source_fingerprint": c.source_fingerprint,
            "lenslab_config": c.to_dict(),
        },
        "architecture": _ARCH_TO_SAELENS[c.architecture],
        "hook_name": c.hook_name,
        "hook_layer": c.layer,
    }
    if c.architecture == "topk":
        cfg["k"] = c.k
        cfg["rescale_acts_by_decoder_norm"] = False
    details = {_DETAIL_NAMES.get(n, n): getattr(c, n) for n in _DETAILS[c.architecture]}
    if c.matryoshka_widths is not None:
        details["matryoshka_widths"] = list(c.matryoshka_widths)
    cfg["metadata"]["training_architecture"] = "standard" if c.architecture == "relu" else c.architecture
    cfg["metadata"]["training_architecture_details"] = details
    return cfg


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_saelens(sae: SAE, directory: str | os.PathLike, sparsity: torch.Tensor | None = None) -> Path:
    """Write ``sae`` (and optionally ``sparsity`` = log10 feature density [d_sae]) in SAELens
    format into ``directory`` (created). Returns the directory."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    names = _FILE_WEIGHTS[_ARCH_TO_SAELENS[sae.cfg.architecture]]
    weights = {f: getattr(sae, n).detach().to(torch.float32).contiguous().cpu() for f, n in names.items()}
    _atomic_write(d / WEIGHTS_FILENAME, lambda p: save_file(weights, str(p)))
    if sparsity is not None:
        sp = torch.as_tensor(sparsity).detach().to(torch.float32).reshape(-1).contiguous()
        if sp.numel() != sae.cfg.d_sae:
            raise ConfigError(f"sparsity has {sp.numel()} entries but the SAE has d_sae={sae.cfg.d_sae}; "
                              "pass log10 feature densities, one per latent")
        _atomic_write(d / SPARSITY_FILENAME, lambda p: save_file({"sparsity": sp}, str(p)))
    else:
        (d / SPARSITY_FILENAME).unlink(missing_ok=True)  # never leave a stale one beside new weights
    text = json.dumps(saelens_cfg_dict(sae), indent=2)
    _atomic_write(d / CFG_FILENAME, lambda p: p.write_text(text))
    return d


def _read_cfg(d: Path) -> dict[str, Any]:
    path = d / CFG_FILENAME
    if not d.is_dir():
        raise SourceError(f"{d}: not a directory; give the SAE directory holding {CFG_FILENAME} and {WEIGHTS_FILENAME}")
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CorruptCheckpointError(f"{d}: no {CFG_FILENAME}; an SAELens SAE directory holds {CFG_FILENAME} "
                                     f"and {WEIGHTS_FILENAME}: re-save it with save_saelens") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"{path}: not valid JSON ({exc}); the file is corrupt: re-save the SAE") from exc
    if not isinstance(cfg, dict):
        raise CorruptCheckpointError(f"{path}: expected a JSON object, got {type(cfg).__name__}; re-save the SAE")
    missing = [key for key in ("d_in", "d_sae") if key not in cfg]
    if missing:
        raise CorruptCheckpointError(f"{path}: missing keys {missing}; SAELens cfg.json files carry d_in, d_sae, "
                                     "architecture and metadata.hook_name: re-save the SAE")
    meta = cfg.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        raise CorruptCheckpointError(f"{path}: metadata is {type(meta).__name__} {meta!r:.60}, not a JSON object; "
                                     "SAELens writes metadata as an object holding hook_name, model_name ...: re-save "
                                     "the SAE")
    return cfg


def file_int(value: Any, name: str, path: Path) -> int:
    """``value`` (a cfg.json entry) as an int: integers and integral floats (16.0); CorruptCheckpointError
    for anything else (True, 2.7, "16", null), which int() would turn into another number or a bare error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise CorruptCheckpointError(f"{path}: {name}={value!r} is not an integer; SAELens writes {name} as a whole "
                                     "number: fix cfg.json or re-save the SAE")
    return int(value)


def _hook_name(cfg: dict[str, Any], path: Path) -> tuple[str, int]:
    """(site, layer) of the hook the SAE reads: any SAE site of ``sae.sites`` (hook_z, resid_pre,
    resid_post, mlp_out)."""
    meta = cfg.get("metadata") or {}
    name = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    hooks = ", ".join(SITE_HOOKS[s].format(layer="L") for s in SITES)
    if not isinstance(name, str):
        raise CorruptCheckpointError(f"{path}: no hook_name (neither metadata.hook_name nor hook_name); an SAE "
                                     f"reads one of {hooks}: add it to cfg.json")
    parsed = parse_hook(name)
    if parsed is None or parsed[0] not in SITES:
        raise ConfigError(f"{path}: hook_name {name!r} is not a hook LensLab SAEs read ({hooks}: sae.sites); load "
                          "SAEs trained on one of those (an MLP input is a transcoder's: sae.saelens_transcoder)")
    return parsed


def file_l1_coefficient(cfg: dict[str, Any]) -> Any:
    """The L1 coefficient a ``cfg.json`` dict records, or None: ``metadata.lenslab_config`` (ours),
    top-level ``l1_coefficient`` (SAELens training checkpoints and pre-6 saves), or
    ``metadata.training_architecture_details`` (SAELens 6 saves of a trained SAE)."""
    meta = cfg.get("metadata") or {}
    ours = meta.get("lenslab_config")
    details = meta.get("training_architecture_details")
    for where in (ours, cfg, details):
        if isinstance(where, dict) and where.get("l1_coefficient") is not None:
            return where["l1_coefficient"]
    return None


def saelens_l1_coefficient(directory: str | os.PathLike) -> float | None:
    """The L1 coefficient recorded in the ``cfg.json`` of an SAE directory (see
    ``file_l1_coefficient``); None when the file does not record one (a TopK SAE, or a ReLU SAE
    saved without its training settings)."""
    value = file_l1_coefficient(_read_cfg(Path(directory)))
    return None if value is None else float(value)


def load_saelens(directory: str | os.PathLike) -> SAE:
    """Read an SAE in SAELens format (ours or one SAELens wrote). Weights become float32.

    Raises CorruptCheckpointError (missing/malformed cfg.json, truncated or inconsistent
    safetensors, wrong tensor shapes, non-integral sizes) or ConfigError (an unsupported
    architecture, activation normalisation, a hook that is no SAE site of ``sae.sites``)."""

    d = Path(directory)
    cfg = _read_cfg(d)
    path = d / CFG_FILENAME
    arch_name = cfg.get("architecture", "standard")
    if not isinstance(arch_name, str):
        raise CorruptCheckpointError(f"{path}: architecture is {type(arch_name).__name__} {arch_name!r:.60}, not a "
                                     f"string; SAELens writes one name ({', '.join(_SAELENS_TO_ARCH)}, ...): fix "
                                     "cfg.json or re-save the SAE")
    if arch_name in SAELENS_ARCHITECTURES.values():
        raise ConfigError(f"{path}: SAELens architecture {arch_name!r} is a transcoder, not an SAE; read it with "
                          "sae.saelens_transcoder.load_transcoder_saelens or `lenslab sae import DIR SOURCE`")
    if arch_name not in _SAELENS_TO_ARCH:
        raise ConfigError(f"{path}: SAELens architecture {arch_name!r} is not supported; LensLab loads "
                          f"{', '.join(_SAELENS_TO_ARCH)} SAEs (batchtopk and matryoshka_batchtopk as SAELens saves "
                          "them, as jumprelu); load it in SAELens, or retrain it here with lenslab sae train "
                          "--architecture one of relu, topk, jumprelu, batchtopk, matryoshka_batchtopk, gated")
    norm = cfg.get("normalize_activations", "none")
    if norm not in (None, "none", False):
        raise ConfigError(f"{path}: normalize_activations={norm!r} is not supported; fold the scaling into the "
                          "weights (SAELens: fold_activation_norm_scaling_factor) and save with 'none'")
    site, layer = _hook_name(cfg, path)
    meta = cfg.get("metadata") or {}
    ours = meta.get("lenslab_config")
    d_in, d_sae = file_int(cfg["d_in"], "d_in", path), file_int(cfg["d_sae"], "d_sae", path)
    try:
        if isinstance(ours, dict):
            sae_cfg = SAEConfig.from_dict(ours)
            if (sae_cfg.d_in, sae_cfg.d_sae, sae_cfg.site, sae_cfg.layer) != (d_in, d_sae, site, layer):
                raise ConfigError(f"metadata.lenslab_config says d_in={sae_cfg.d_in}, d_sae={sae_cfg.d_sae}, "
                                  f"{sae_cfg.hook_name} but cfg.json says {d_in}, {d_sae}, {hook_for(site, layer)}")
        else:
            arch, fields = _file_architecture(cfg, arch_name, d_sae, path)
            heads = site == DEFAULT_SITE and meta.get("n_heads") is not None and meta.get("d_head") is not None
            l1 = file_l1_coefficient(cfg) if arch in ("relu", "gated") else None
            sae_cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch,
                                k=file_int(cfg["k"], "k", path) if arch == "topk" else fields.pop("k", None),
                                **fields, **({} if l1 is None else {"l1_coefficient": float(l1)}),
                                site=site, hook_name=hook_for(site, layer), layer=layer,
                                n_heads=file_int(meta["n_heads"], "metadata.n_heads", path) if heads else None,
                                d_head=file_int(meta["d_head"], "metadata.d_head", path) if heads else None,
                                source_label=str(meta.get("model_name") or ""),
                                source_fingerprint=str(meta.get("source_fingerprint") or ""))
    except CorruptCheckpointError:
        raise
    except KeyError as exc:
        raise CorruptCheckpointError(f"{path}: missing key {exc}; a topk SAE's cfg.json needs k: re-save the SAE") from exc
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise CorruptCheckpointError(f"{path}: inconsistent config ({exc}); re-save the SAE") from exc
        raise CorruptCheckpointError(f"{path}: malformed config value ({exc}); re-save the SAE") from exc

    wpath, tensors = read_checked_weights(d, _FILE_WEIGHTS[arch_name], _SHAPES, {"d_in": d_in, "d_sae": d_sae},
                                          arch_name, "SAE")
    if not cfg.get("apply_b_dec_to_input", True):
        # f = act(x W_enc + b_enc) == act((x - b_dec) W_enc + b_enc + b_dec W_enc): fold into b_enc
        # (gated: b_gate likewise, b_mag with the magnitude encoder W_enc * exp(r_mag)).
        shift = tensors["b_dec"] @ tensors["W_enc"]
        tensors["b_enc"] = tensors["b_enc"] + shift
        if "b_mag" in tensors:
            tensors["b_mag"] = tensors["b_mag"] + shift * tensors["r_mag"].exp()
    if arch_name == "topk" and cfg.get("rescale_acts_by_decoder_norm", False):
        # SAELens ranks pre-activations scaled by n_i = ||W_dec[i]|| and divides the decoder by n_i:
        # the same SAE with unit-norm decoder rows has W_enc[:, i] * n_i, b_enc[i] * n_i, W_dec[i] / n_i
        # (what SAELens's fold_W_dec_norm does), which is what LensLab's TopK encode computes.
        n = tensors["W_dec"].norm(dim=-1)
        if not bool((n > 0).all()):
            raise CorruptCheckpointError(f"{wpath}: a decoder row has zero norm, so rescale_acts_by_decoder_norm "
                                         "cannot be folded; re-save the SAE")
        tensors["W_enc"] = tensors["W_enc"] * n
        tensors["b_enc"] = tensors["b_enc"] * n
        tensors["W_dec"] = tensors["W_dec"] / n[:, None]
    if "threshold" in tensors and bool((tensors["threshold"] < 0).any()):
        raise ConfigError(f"{wpath}: a jumprelu threshold is negative ({float(tensors['threshold'].min()):g}); "
                          "SAELens keeps thresholds >= 0: clamp them to 0 in SAELens and re-save")
    bad = [n for n, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise CorruptCheckpointError(f"{wpath}: tensors {bad} hold NaN or inf; the SAE diverged or the file is "
                                     "corrupt: retrain or re-save it")
    sae = SAE(sae_cfg)
    with torch.no_grad():
        for n, t in tensors.items():
            getattr(sae, n).copy_(t)
    return sae


def _file_architecture(cfg: dict[str, Any], arch_name: str, d_sae: int, path: Path) -> tuple[str, dict[str, Any]]:
    """(our architecture, its SAEConfig fields) for a file without ``lenslab_config``: a "jumprelu"
    file SAELens wrote for a batchtopk / matryoshka_batchtopk run is that architecture when its
    ``training_architecture_details`` hold k (and the widths); settings it records are kept."""
    arch = _SAELENS_TO_ARCH[arch_name]
    meta = cfg.get("metadata") or {}
    trained = meta.get("training_architecture")
    details = meta.get("training_architecture_details")
    details = details if isinstance(details, dict) else {}
    if arch == "jumprelu" and trained in ("batchtopk", "matryoshka_batchtopk") and details.get("k") is not None \
            and (trained == "batchtopk" or details.get("matryoshka_widths")):
        arch = trained
    fields: dict[str, Any] = {}
    for name in _DETAILS[arch]:
        value = details.get(_DETAIL_NAMES.get(name, name))
        if value is not None and name != "l1_coefficient":  # l1 comes from file_l1_coefficient
            fields[name] = (tuple(file_int(w, name, path) for w in value) if name == "matryoshka_widths"
                            else value)
    if "matryoshka_widths" in fields and fields["matryoshka_widths"][-1] != d_sae:
        fields["matryoshka_widths"] = fields["matryoshka_widths"] + (d_sae,)  # SAELens appends d_sae too
    if arch == "topk":
        fields.pop("k", None)
    return arch, fields


def load_saelens_sparsity(directory: str | os.PathLike) -> torch.Tensor | None:
    """The ``sparsity`` tensor (log10 feature density, [d_sae]) or None when the file is absent."""
    from analysis.sources import read_safetensors_header
    from safetensors import SafetensorError, safe_open

    path = Path(directory) / SPARSITY_FILENAME
    if not path.is_file():
        return None
    header = read_safetensors_header(path)
    if "sparsity" not in header:
        raise CorruptCheckpointError(f"{path}: no tensor 'sparsity'; delete the file or re-save the SAE")
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor("sparsity").to(torch.float32)
    except SafetensorError as exc:
        raise CorruptCheckpointError(f"{path}: safetensors refused the file ({exc}); re-save the SAE") from exc


def read_checked_weights(d: Path, names: dict[str, str], shapes: dict[str, tuple[str, ...]], dims: dict[str, int],
                         arch: str, what: str) -> tuple[Path, dict[str, torch.Tensor]]:
    """(path, float32 tensors) of ``d/sae_weights.safetensors``: each file tensor of ``names`` (file name ->
    our name) checked against the shape ``shapes[name]`` spells in ``dims`` from the header alone, before
    any tensor is read. CorruptCheckpointError, naming the file and the fix (re-save the ``what``), for a
    missing file, a truncated header, a missing tensor or a shape cfg.json does not imply."""
    from safetensors import SafetensorError, safe_open

    from analysis.sources import read_safetensors_header

    wpath = d / WEIGHTS_FILENAME
    if not wpath.is_file():
        raise CorruptCheckpointError(f"{d}: no {WEIGHTS_FILENAME}; the {what} directory is incomplete: re-save it")
    header = read_safetensors_header(wpath)  # CorruptCheckpointError when truncated
    for name in names:
        want = [dims[n] for n in shapes[name]]
        got = header.get(name, {}).get("shape") if isinstance(header.get(name), dict) else None
        if got is None:
            raise CorruptCheckpointError(f"{wpath}: no tensor {name!r}; SAELens {arch} weights hold "
                                         f"{', '.join(names)}: re-save the {what}")
        if list(got) != want:
            raise CorruptCheckpointError(f"{wpath}: {name} has shape {tuple(got)} but cfg.json implies {tuple(want)}; "
                                         f"the weights and cfg.json do not belong together: re-save the {what}")
    try:
        with safe_open(str(wpath), framework="pt") as f:
            return wpath, {ours: f.get_tensor(name).to(torch.float32) for name, ours in names.items()}
    except SafetensorError as exc:
        raise CorruptCheckpointError(f"{wpath}: safetensors refused the file ({exc}); re-save the {what}") from exc
