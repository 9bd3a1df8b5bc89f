"""The work behind "sae-probe" (``sae.eval_pipeline`` registers it): offline labelled texts, their
hook_z and SAE latents pooled per text, and the probes of ``sae.probing``.

Tasks (``PROBE_TASKS``), all built from what is installed, nothing downloaded:

- "package": docstrings of ``analysis.corpus.docstring_corpus`` labelled by package; ``per_class``
  per package drawn with ``default_rng(seed)`` (packages with fewer keep all of theirs);
- "code": source code vs prose. Code = every public function of ``CODE_MODULES`` (pure-Python
  standard-library modules) printed back by ``ast.unparse`` with its docstring removed (so no
  prose hides in it), cut to 400 characters; prose = docstrings of the corpus. ``per_class`` each.

Per text: hook_z of the SAE's layer on its first ``max_tokens`` tokens (``sae.harvest.harvest``),
the mean over its tokens of the raw activations and of the SAE's latents ``encode(x)``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from analysis.errors import ConfigError
from analysis.run import RunContext, Subject
from analysis.store import Result

PROBE_TASKS = ("package", "code")
CODE_MODULES = ("textwrap", "difflib", "fractions", "statistics", "heapq", "bisect", "shlex", "string",
                "calendar", "json.encoder", "json.decoder", "argparse", "configparser", "csv", "glob", "fnmatch")
MAX_TOKENS = 64


def code_snippets(max_chars: int = 400) -> list[str]:
    """Public functions and methods of ``CODE_MODULES`` without their docstrings, in walk order."""
    out = []
    for name in CODE_MODULES:
        try:
            tree = ast.parse(inspect.getsource(importlib.import_module(name)))
        except (OSError, TypeError, ImportError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                body = node.body
                if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None),
                                                                         ast.Constant) and isinstance(
                        body[0].value.value, str):
                    body = body[1:]
                if not body:
                    continue
                node.body = body
                out.append(ast.unparse(node)[:max_chars])
    return out


def task_texts(task: str, per_class: int, seed: int) -> tuple[list[str], list[str]]:
    """(texts, labels) of ``task`` (module docstring)."""
    from analysis.corpus import docstring_corpus

    rng = np.random.default_rng(seed)
    docs = docstring_corpus()
    if task == "package":
        texts, labels = [], []
        for pkg in sorted({d.package for d in docs}):
            mine = [d.text for d in docs if d.package == pkg]
            for i in sorted(rng.choice(len(mine), min(per_class, len(mine)), replace=False)):
                texts.append(mine[i])
                labels.append(pkg)
        return texts, labels
    code = code_snippets()
    prose = [d.text for d in docs]
    n = min(per_class, len(code), len(prose))
    pick_c = sorted(rng.choice(len(code), n, replace=False))
    pick_p = sorted(rng.choice(len(prose), n, replace=False))
    return [code[i] for i in pick_c] + [prose[i] for i in pick_p], ["code"] * n + ["prose"] * n


@dataclass(frozen=True, eq=False, kw_only=True)
class ProbeJob:
    """A probing run of a stored SAE (``trained``: ``sae.results.TrainedSAE``)."""

    trained: Any
    task: str
    ks: tuple[int, ...]
    per_class: int
    seed: int
    source: Any = None

    @staticmethod
    def params(sae_key: str, task: str, ks: Sequence[int], per_class: int, seed: int) -> dict:
        return {"sae": sae_key, "task": task, "ks": [int(k) for k in ks], "per_class": int(per_class),
                "seed": int(seed), "max_tokens": MAX_TOKENS}

    @classmethod
    def checked(cls, *, trained: Any, task: str, ks: Sequence[int], per_class: int, seed: int,
                source: Any = None) -> ProbeJob:
        if task not in PROBE_TASKS:
            raise ConfigError(f"probe task {task!r} is unknown; choose one of {', '.join(PROBE_TASKS)}")
        ks = tuple(ks)
        d_sae = trained.sae.cfg.d_sae if trained is not None else None
        if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 or (d_sae and k > d_sae)
                         for k in ks):
            raise ConfigError(f"ks={list(ks)}: each k must be an integer in 1..d_sae; e.g. ks=(1, 2, 5)")
        if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 4:
            raise ConfigError(f"per_class={per_class!r} must be an integer >= 4 (texts per class); e.g. 60")
        return cls(trained=trained, task=task, ks=ks, per_class=per_class, seed=int(seed), source=source)

    def store_params(self) -> dict:
        return self.params(self.trained.key, self.task, self.ks, self.per_class, self.seed)


def pooled(acts: np.ndarray, doc_ids: np.ndarray, n_docs: int) -> np.ndarray:
    """[n_docs, width] mean over each document's rows of ``acts`` [tokens, width]."""
    out = np.zeros((n_docs, acts.shape[1]))
    np.add.at(out, doc_ids, acts)
    counts = np.bincount(doc_ids, minlength=n_docs)
    return out / np.maximum(counts, 1)[:, None]


def compute_probe(subject: Subject, job: ProbeJob, ctx: RunContext) -> Result:
    """Harvest, pool, probe (module docstring)."""
    import torch

    from sae import harvest as hv
    from sae import probing, requests
    from sae.model import sae_on

    trained, cfg = job.trained, job.trained.sae.cfg
    ctx.tick(0, 3, f"building the {job.task!r} texts")
    texts, labels = task_texts(job.task, job.per_class, job.seed)
    src = requests.reopen(trained.key, cfg, trained.meta, job.source)
    with ctx.lock:
        bridge = requests.booted(src, ctx)
        ctx.tick(1, 3, f"{cfg.site} of {len(texts)} texts")
        cache = hv.harvest(src, cfg.layer, texts, max_tokens=MAX_TOKENS, bridge=bridge, progress=ctx.sub("harvest"),
                           site=cfg.site)
    x = np.array(cache.acts, dtype=np.float32)  # a writable copy of the memory map
    sae = sae_on(trained.sae, ctx.device)
    with torch.no_grad():
        z = np.concatenate([sae.encode(torch.from_numpy(x[s:s + 4096]).to(ctx.device)).cpu().numpy()
                            for s in range(0, len(x), 4096)])
    doc_ids = np.asarray(cache.doc_ids, dtype=np.int64)
    keep = np.unique(doc_ids)  # texts that tokenised to nothing have no rows
    raw, lat = pooled(x, doc_ids, len(texts))[keep], pooled(z, doc_ids, len(texts))[keep]
    ctx.tick(2, 3, "fitting probes")
    table = probing.sparse_probes(lat, raw, [labels[i] for i in keep], job.ks, seed=job.seed)
    summ = probing.summary(table)
    ctx.tick(3, 3, "done")
    return Result(table.assign(latents=[",".join(map(str, v)) for v in table["latents"]]), {},
                  {"sae_key": trained.key, "task": job.task, "n_texts": int(len(keep)),
                   "classes": sorted(set(labels)), "summary": dict(zip(summ["probe"], summ["mean_accuracy"]))})


@dataclass(frozen=True, eq=False)
class ProbeResult:
    """A stored probing run: ``table`` (one row per class and probe), ``summary`` (probe -> mean accuracy)."""

    table: pd.DataFrame
    meta: dict

    @property
    def summary(self) -> dict:
        return dict(self.meta.get("summary", {}))


def probe_from_result(result: Result) -> ProbeResult:
    return ProbeResult(result.table, dict(result.meta))
