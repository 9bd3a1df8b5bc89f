"""Export a tensor ``Selection`` to the formats fine-tuning tools read.

- ``params``: the selected parameter names, one per line (for ``p.requires_grad_(name in selected)``);
- ``peft``: JSON for ``peft.LoraConfig(**json.loads(text))``. ``target_modules`` lists full
  module paths (names without ``.weight``); PEFT matches a list entry against module names
  equal to it or ending in ``"." + entry``, so the safetensors paths also match a model
  wrapped with a prefix. ``as_regex=True`` gives one regex instead, which PEFT tests with
  ``re.fullmatch`` (prefix-tolerant in the same way). Selected parameters that are not a
  module's ``.weight`` (fused expert stacks such as ``…experts.gate_up_proj``) go to
  ``target_parameters``;
  Parameters on the model's root module (names without a dot) are refused: PEFT cannot
  target them (``get_peft_model`` raises "Targeting an nn.Parameter on the top-level module
  is not supported");
- ``axolotl``: a YAML fragment ``unfrozen_parameters:`` with one regex per parameter, under a
  comment header that says which model, ranker and budget produced it. Axolotl
  (``utils/freeze.py``, ``LayerNamePattern``) rewrites every ``.`` not followed by ``+`` into
  ``\.`` and then tests the pattern with ``re.match``, so ``\.`` would turn into "a backslash,
  then any character" and match nothing. The patterns therefore write a literal dot as
  ``[.]`` (the same under axolotl's rewrite and under plain ``re``) and accept any module
  prefix, like the PEFT list: ``^(?:.+[.])?encoder[.]layer[.]0[.]output[.]dense[.]weight$``
  matches that parameter of the bare model and of a model holding it under ``bert.``.

``freeze_to_selection`` applies a selection to a live ``nn.Module``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable

import torch
import yaml

from analysis.errors import ConfigError
from analysis.weights.matrices import module_path
from analysis.weights.selection import Selection

FORMATS = ("params", "peft", "axolotl")
_LORA_BASE_KEYS = ("r", "lora_alpha", "lora_dropout", "bias", "target_modules", "target_parameters")


def _lora_config_keys() -> set[str] | None:
    """Field names ``peft.LoraConfig`` accepts, or None when peft is not installed."""
    try:
        from peft import LoraConfig
    except ImportError:
        return None
    return {f.name for f in dataclasses.fields(LoraConfig) if f.init}


def module_regex(modules: Iterable[str]) -> str:
    """One regex that ``re.fullmatch``-es exactly the module names PEFT's list matching
    would: each path itself, or any name ending in ``"." + path``."""
    alts = "|".join(re.escape(m) for m in modules)
    return rf"(?:.*\.)?(?:{alts})"


def axolotl_regex(name: str) -> str:
    """The ``unfrozen_parameters`` regex of parameter ``name``: matches (with ``re.match``, before
    or after axolotl's dot rewrite) ``name`` itself or any name ending in ``"." + name``."""
    return "^(?:.+[.])?" + "[.]".join(re.escape(part) for part in name.split(".")) + "$"


def _check_not_root(selection: Selection) -> None:
    """Refuse parameters that sit on the root module: PEFT cannot wrap them (see module docstring)."""
    root = [p for p in selection.params if "." not in p]
    if root:
        drop = "|".join(re.escape(p) for p in root)
        raise ConfigError(f"selected parameter(s) {root[:3]} sit on the model's root module, which PEFT cannot "
                          "target (get_peft_model: 'Targeting an nn.Parameter on the top-level module is not "
                          f"supported'); leave them out with --exclude '^({drop})$' (API: exclude=...), or export "
                          "format params or axolotl, which train them fully")


def _peft(selection: Selection, r: int, alpha: float, dropout: float, as_regex: bool) -> str:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ConfigError(f"lora_r {r!r} must be an integer >= 1, e.g. 8")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ConfigError(f"lora_alpha {alpha!r} must be a number > 0, e.g. 16")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ConfigError(f"lora_dropout {dropout!r} must lie in [0, 1), e.g. 0.05")
    _check_not_root(selection)
    modules = [module_path(p) for p in selection.params if p.endswith(".weight")]
    fused = [p for p in selection.params if not p.endswith(".weight")]
    cfg: dict = {"r": r, "lora_alpha": alpha, "lora_dropout": float(dropout), "bias": "none",
                 "target_modules": (module_regex(modules) if as_regex and modules else modules)}
    if fused:
        cfg["target_parameters"] = fused
    accepted = _lora_config_keys()
    if accepted is not None:
        if fused and "target_parameters" not in accepted:
            raise ConfigError(f"the selection has fused parameters {fused[:3]} that need LoraConfig.target_parameters, "
                              "which this peft lacks; upgrade peft (>= 0.17) or --exclude them")
        cfg = {k: v for k, v in cfg.items() if k in accepted}
    return json.dumps(cfg, indent=2) + "\n"


def _axolotl(selection: Selection) -> str:
    header = [
        "# LensLab tensor selection for axolotl: one regex per parameter, matched with re.match against parameter",
        "# names (a literal dot is written [.]; any module prefix such as bert. is accepted)",
        f"# model fingerprint: {selection.fingerprint or 'unknown'}",
        f"# ranker: {selection.ranker}" + (f" (seed {selection.seed})" if selection.seed is not None else ""),
        f"# budget: {selection.budget}: {len(selection.params)} of {len(selection.candidates)} tensors, "
        f"{selection.n_params_selected:,} of {selection.n_params_total:,} parameters",
    ]
    body = yaml.safe_dump({"unfrozen_parameters": [axolotl_regex(p) for p in selection.params]},
                          sort_keys=False, default_flow_style=False, width=10_000)
    return "\n".join(header) + "\n" + body


def export_selection(selection: Selection, fmt: str, *, lora_r: int = 8, lora_alpha: int = 16,
                     lora_dropout: float = 0.0, as_regex: bool = False) -> str:
    """Text of ``selection`` in format ``fmt`` (one of ``FORMATS``; see the module docstring).

    ``lora_*`` and ``as_regex`` only affect ``peft``. Raises ConfigError for an unknown
    format or out-of-range LoRA settings.
    """
    if not isinstance(selection, Selection):
        raise ConfigError(f"expected a Selection (from select_tensors or app.api.select), got "
                          f"{type(selection).__name__}")
    if fmt == "params":
        return "".join(p + "\n" for p in selection.params)
    if fmt == "peft":
        return _peft(selection, lora_r, lora_alpha, lora_dropout, as_regex)
    if fmt == "axolotl":
        return _axolotl(selection)
    raise ConfigError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _suffixes(name: str) -> Iterable[str]:
    """``a.b.c`` -> ``a.b.c``, ``b.c``, ``c``."""
    parts = name.split(".")
    return (".".join(parts[i:]) for i in range(len(parts)))


def freeze_to_selection(model: torch.nn.Module, selection: Selection | Iterable[str]) -> list[str]:
    """Make only the selected parameters of ``model`` trainable; return their names in ``model``.

    A parameter is selected when its name equals a selected name or ends with ``"." + name``
    (so a model wrapped under a prefix still matches names from its checkpoint). Every
    parameter gets ``requires_grad_(selected)``. Raises ConfigError, before changing anything,
    when a selected name matches no parameter.
    """
    if isinstance(selection, Selection):
        names = list(selection.params)
    elif isinstance(selection, str):
        raise ConfigError(f"selection {selection[:60]!r} is one string; pass a Selection or a list of parameter names")
    else:
        names = list(selection)
    wanted = set(names)
    named = list(model.named_parameters())
    hits: dict[str, bool] = {}
    matched: set[str] = set()
    for pname, _ in named:
        found = [s for s in _suffixes(pname) if s in wanted]
        hits[pname] = bool(found)
        matched.update(found)
    missing = [n for n in names if n not in matched]
    if missing:
        fp = getattr(selection, "fingerprint", None)
        raise ConfigError(f"{len(missing)} selected name(s) match no parameter of the model, e.g. {missing[:3]}; "
                          "select from this model's own checkpoint"
                          + (f" (the selection came from model {fp})" if fp else "")
                          + ", or drop those names")
    trainable = []
    for pname, p in named:
        p.requires_grad_(hits[pname])
        if hits[pname]:
            trainable.append(pname)
    return trainable
