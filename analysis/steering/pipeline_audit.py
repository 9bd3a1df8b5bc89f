"""Audit of weight edits that remove a steering direction, on the runner; and their exports (edited
checkpoint, PEFT LoRA adapter). Re-exported by ``app.api``.

    >>> audit = api.steer_audit("bilinear-lm", "chosen.safetensors", "numpy-torch")
    >>> audit.summary        # per edit: concept effect, share retained, KL and Δnll on neutral text
    >>> audit.tensors        # per edit and tensor: κ, stable rank, α before/after, ‖ΔW‖/‖W‖
    >>> api.steer_edit("bilinear-lm", "chosen.safetensors", "lm-np", edit="norm_preserving")
    >>> api.steer_lora("bilinear-lm", "chosen.safetensors", "lm-orth-lora")   # PEFT adapter, rank k

``steering.audit`` (code version ``steering-audit-1``) is keyed by the directions' bytes, the
contrast set and the neutral texts. Both edits (``analysis.steering.audit``) are written to a
temporary checkpoint, booted, and measured against the original model on

- ``effect``: the concept gap on the held-out pairs: mean over real positions of
  log Σ_{C⁺} p − log Σ_{C⁻} p on the positive texts minus the same on the negative texts (nats);
  ``effect_retained`` = effect / the original's effect;
- ``kl`` / ``nll_delta``: per-token KL(p_original ‖ p_edited) and the change of next-token
  cross-entropy on neutral text (corpus docstrings, as the search uses);
- ``max_residual``: the largest |R̂ w| left in any residual writer (0 up to rounding).

Pre-norm models only (``orthogonalize.SUPPORTED``), as for ``steer orthogonalize``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from analysis.errors import ConfigError
from analysis.progress import Progress
from analysis.run import Analysis, RunContext, StoreLike, Subject, load, register, run, stored
from analysis.sources import Source, open_source
from analysis.steering import audit as au
from analysis.steering import search_measure as sm
from analysis.steering.contrasts import load_contrasts
from analysis.steering.effect import concept_ids
from analysis.steering.hooks import orthonormal_basis
from analysis.steering.orthogonalize import SUPPORTED, _config, _write, writer_axis
from analysis.steering.pipeline_search import NEUTRAL, neutral_texts
from analysis.steering.pipeline_vectors import ContrastLike, SourceLike, VectorLike, as_vector
from analysis.steering.vectors import check_compatible
from analysis.store import EntryInfo, Result

CODE_VERSION = "steering-audit-1"
SUMMARY_COLUMNS = ("edit", "effect", "effect_retained", "kl", "nll_delta", "max_residual")


@dataclass(frozen=True, eq=False)
class AuditResult:
    summary: pd.DataFrame  # one row per edit (original first)
    tensors: pd.DataFrame  # one row per edit × residual-writer tensor
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True, eq=False)
class AuditParams:
    basis: np.ndarray  # (k, d_model) float64 orthonormal
    contrasts: Any
    neutral: tuple[str, ...]
    n_neutral: int
    max_tokens: int

    def store_params(self) -> dict[str, Any]:
        digest = hashlib.blake2b(np.ascontiguousarray(self.basis).tobytes(), digest_size=16).hexdigest()
        return {"vector": digest, "contrast_fingerprint": self.contrasts.fingerprint,
                "neutral": [list(self.neutral), self.n_neutral], "max_tokens": self.max_tokens}


def _checked(source: SourceLike, vector: VectorLike, allow_foreign: bool) -> tuple[Source, dict, torch.Tensor]:
    src = open_source(source)
    config = _config(src)
    if config.get("model_type") not in SUPPORTED:
        raise ConfigError(f"{src.label}: model_type {config.get('model_type')!r} is not pre-norm; weight edits that "
                          f"remove a direction are exact only for {', '.join(SUPPORTED)}")
    vec = as_vector(vector)
    width = int(config.get("hidden_size", 0))
    check_compatible(vec, d_model=width, fingerprint=src.fingerprint, allow_foreign=allow_foreign)
    return src, config, orthonormal_basis(vec.vectors, width)


def _edited(src: Source, config: dict, basis: torch.Tensor, edit: str) -> tuple[dict, dict, list[dict]]:
    """(tensors, config, per-tensor rows) of ``edit`` applied to every residual writer."""
    names = {i.name for i in src.weight_infos()}
    tied = bool(config.get("tie_word_embeddings", False)) or "lm_head.weight" not in names
    tensors, rows = {}, []
    for name, t in src.iter_tensors():
        axis = writer_axis(name)
        if axis is not None and t.is_floating_point():
            if tied and name.endswith("embed_tokens.weight"):
                tensors["lm_head.weight"] = t.clone()
            new = au.edit_tensor(t, basis, axis, edit)
            rows.append(au.tensor_audit(name, t, new, edit, k=int(basis.shape[0])))
            t = new
        tensors[name] = t.contiguous()
    return tensors, ({**config, "tie_word_embeddings": False} if tied else config), rows


def steer_edit(source: SourceLike, vector: VectorLike, out_dir: str | os.PathLike, *, edit: str = "norm_preserving",
               overwrite: bool = False, allow_foreign: bool = False) -> Path:
    """Write ``source`` with the vector's direction(s) removed from every residual writer by ``edit``
    (``orthogonalized`` | ``norm_preserving``) as a new checkpoint directory."""
    if edit not in au.EDITS:
        raise ConfigError(f"edit={edit!r} must be one of {', '.join(au.EDITS)}")
    src, config, basis = _checked(source, vector, allow_foreign)
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"{out} already exists and is not empty; choose a new directory or pass overwrite=True")
    tensors, cfg, _ = _edited(src, config, basis, edit)
    digest = hashlib.blake2b(basis.numpy().tobytes(), digest_size=8).hexdigest()
    _write(src, out, tensors, cfg, {"source": src.label, "source_fingerprint": src.fingerprint, "edit": edit,
                                    "directions_digest": digest, "directions": basis.numpy().tolist()}, overwrite)
    return out


# -- measuring ----------------------------------------------------------------------------------------
def _gap(bridge: Any, cs: Any, max_tokens: int) -> float:
    pos_ids, neg_ids = concept_ids(bridge, cs.concept_positive), concept_ids(bridge, cs.concept_negative)
    out = []
    for texts in cs.texts("test"):
        total = n = 0.0
        for ids, mask in sm.text_batches(bridge, texts, max_tokens):
            m = sm.concept_margin(sm.log_probs(bridge, ids, mask, []), pos_ids, neg_ids)
            real = mask.to(m.device).bool()
            total, n = total + float(m[real].sum()), n + int(real.sum())
        out.append(total / n)
    return out[0] - out[1]


def _neutral(bridge: Any, texts: tuple[str, ...], max_tokens: int) -> list[tuple]:
    """(log-probabilities, ids, mask) per batch of neutral texts."""
    return [(sm.log_probs(bridge, ids, mask, []), ids, mask)
            for ids, mask in sm.text_batches(bridge, list(texts), max_tokens)]


def _kl_nll(ref: list, got: list) -> tuple[float, float]:
    kl = dn = n = n_next = 0.0
    for (p0, ids, mask), (p1, _, _) in zip(ref, got):
        real = mask.to(p0.device).bool()
        kl += float((p0.exp() * (p0 - p1)).sum(-1)[real].sum())
        nxt = real[:, :-1] & real[:, 1:]
        tgt = ids.to(p0.device)[:, 1:, None]
        dn += float((p0[:, :-1].gather(-1, tgt) - p1[:, :-1].gather(-1, tgt)).squeeze(-1)[nxt].sum())
        n, n_next = n + int(real.sum()), n_next + int(nxt.sum())
    return kl / n, dn / n_next


def _audit_compute(subject: Subject, p: AuditParams, ctx: RunContext) -> Result:
    src = subject.source
    config = _config(src)
    basis = torch.from_numpy(p.basis)
    neutral = neutral_texts(p.neutral, p.n_neutral)
    with ctx.lock:
        bridge = ctx.bridge(src)
        gap0 = _gap(bridge, p.contrasts, p.max_tokens)
        ref = _neutral(bridge, neutral, p.max_tokens)
    summary = [{"edit": "original", "effect": gap0, "effect_retained": 1.0, "kl": 0.0, "nll_delta": 0.0,
                "max_residual": float("nan")}]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lenslab-audit-") as tmp:
        for i, edit in enumerate(au.EDITS):
            ctx.tick(i, len(au.EDITS), edit)
            tensors, cfg, tensor_rows = _edited(src, config, basis, edit)
            rows += tensor_rows
            residual = max(float((t.to(torch.float64).movedim(ax, -1) @ basis.T).abs().max())
                           for name, t in tensors.items() if (ax := writer_axis(name)) is not None)
            out = Path(tmp) / edit
            _write(src, out, tensors, cfg, {"edit": edit, "directions_digest": edit}, False)
            edited = open_source(out).boot_bridge()
            if ctx.device.type != "cpu":  # moving prints a line on stdout, which would break --json
                edited = edited.to(ctx.device)
            gap = _gap(edited, p.contrasts, p.max_tokens)
            kl, dn = _kl_nll(ref, _neutral(edited, neutral, p.max_tokens))
            summary.append({"edit": edit, "effect": gap, "effect_retained": gap / gap0 if gap0 else float("nan"),
                            "kl": kl, "nll_delta": dn, "max_residual": residual})
            del edited
    ctx.tick(len(au.EDITS), len(au.EDITS), "done")
    meta = {"summary": au.as_numpy_rows(summary), "source": src.label, "fingerprint": src.fingerprint,
            "contrast": p.contrasts.name, "k": int(basis.shape[0])}
    return Result(table=pd.DataFrame(rows), meta=meta)


def _from_result(result: Result) -> AuditResult:
    meta = dict(result.meta)
    summary = pd.DataFrame(meta["summary"])[list(SUMMARY_COLUMNS)]
    return AuditResult(summary, result.table, meta)


AUDIT = register(Analysis(name="steering.audit", code_version=CODE_VERSION, compute=_audit_compute,
                          from_result=_from_result, doc="orthogonalised and norm-preserving weight edits, audited"))


def steer_audit(source: SourceLike, vector: VectorLike, contrasts: ContrastLike = "numpy-torch", *,
                n_neutral: int = 32, max_tokens: int = 64, allow_foreign: bool = False, store: StoreLike = None,
                refresh: bool = False, progress: Progress | None = None, device: str = "auto") -> AuditResult:
    """Audit the orthogonalised and the norm-preserving removal of the vector's direction(s) from
    ``source`` (module docstring), stored."""
    src, _, basis = _checked(source, vector, allow_foreign)
    params = AuditParams(basis=basis.numpy(), contrasts=load_contrasts(contrasts), neutral=NEUTRAL,
                         n_neutral=int(n_neutral), max_tokens=int(max_tokens))
    return run(AUDIT, src, params, store=store, refresh=refresh, progress=progress, device=device)


def stored_audits(fingerprint: str | None = None, store: StoreLike = None) -> list[EntryInfo]:
    """Index rows of stored weight-edit audits, newest first (never computes)."""
    return stored(AUDIT, fingerprint, store=store)


def load_audit(key: str, store: StoreLike = None) -> AuditResult:
    """The stored audit with entry ``key`` (or a unique prefix); ``NotStoredError`` if absent."""
    return load(key, store=store, analysis=AUDIT)


# -- LoRA ----------------------------------------------------------------------------------------------
def steer_lora(source: SourceLike, vector: VectorLike, out_dir: str | os.PathLike, *, overwrite: bool = False,
               allow_foreign: bool = False) -> Path:
    """Write the orthogonalised edit as a PEFT LoRA adapter of rank k (the vector's directions): exact,
    ``PeftModel.from_pretrained(base, out_dir)`` computes what ``steer_edit(..., edit="orthogonalized")``
    writes, to float32 rounding. The norm-preserving delta is full rank: no adapter for it."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise ConfigError("the LoRA export needs peft: pip install 'lenslab[peft]'") from exc
    from transformers import AutoModelForCausalLM

    src, config, basis = _checked(source, vector, allow_foreign)
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"{out} already exists and is not empty; choose a new directory or pass overwrite=True")
    writers = {name: writer_axis(name) for name in (i.name for i in src.weight_infos())
               if writer_axis(name) is not None and name.endswith(".weight")}
    if any(".experts." in n or n.endswith("experts.down_proj") for n in writers):
        raise ConfigError(f"{src.label}: expert weights are not LoRA modules; write the edit with steer_edit")
    k = int(basis.shape[0])
    model = AutoModelForCausalLM.from_pretrained(src.hf_dir, torch_dtype=torch.float32, use_safetensors=True)
    modules = sorted({n.rsplit(".", 2)[-2] for n in writers})
    peft_model = get_peft_model(model, LoraConfig(r=k, lora_alpha=k, target_modules=modules, lora_dropout=0.0,
                                                  init_lora_weights=False))
    lookup = dict(peft_model.named_modules())
    with torch.no_grad():
        for name, axis in writers.items():
            a, b = au.lora_factors(src.tensor(name), basis, axis)
            mod = lookup["base_model.model." + name[:-len(".weight")]]
            if axis == 0:
                mod.lora_A["default"].weight.copy_(a.to(torch.float32))
                mod.lora_B["default"].weight.copy_(b.to(torch.float32))
            else:
                mod.lora_embedding_A["default"].copy_(a.to(torch.float32))
                mod.lora_embedding_B["default"].copy_(b.to(torch.float32))
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        peft_model.save_pretrained(tmp, save_embedding_layers=False)  # the base embedding is unchanged
        (Path(tmp) / "lenslab_lora.json").write_text(json.dumps({"source": src.label, "edit": "orthogonalized",
                                                                 "source_fingerprint": src.fingerprint, "rank": k}))
        if out.exists():
            import shutil

            shutil.rmtree(out)
        os.replace(tmp, out)
        Path(tmp).mkdir()  # TemporaryDirectory removes it on exit
    return out
