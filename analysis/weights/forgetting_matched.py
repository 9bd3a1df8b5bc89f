"""KappaTune, settled: the parameter-matched forgetting experiment on an encoder and a causal LM.

Question: at the *same number of trained parameters*, does fine-tuning the best-conditioned
tensors (KappaTune, lowest κ) forget less than its controls, at equal task gain?

- Models: an encoder (MiniLM: package-of-a-docstring classification; forgetting = held-out
  embedding drift) and a causal LM (the bundled tiny Llama-shaped LM: next-token loss on one
  package's docstrings; forgetting = rise of held-out stdlib loss, i.e. log perplexity ratio),
  the paper's measure (arXiv 2506.16289). What runs where: ``analysis.weights.forgetting_train``.
- Arms and budgets: ``analysis.weights.forgetting_arms`` (default ``12.5%params``: every
  selection and LoRA arm within ±5% of the same trained-parameter count).
- Runs: every arm x seed is an independent task for ``analysis.executor`` (local processes by
  default, Ray when asked); the driver computes the "before" numbers once and collects rows.
- Statistics (``analysis.weights.forgetting_stats``): mean, bootstrap 95% interval per arm;
  paired per-seed differences of lowest κ against each control.

Pure apart from reading the model directory: no store I/O (``pipeline.py`` stores the result).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from analysis.corpus import STDLIB_PACKAGES
from analysis.errors import ConfigError
from analysis.progress import Progress
from analysis.weights.forgetting_arms import ARMS, ArmPlan, plan_arm
from analysis.weights.forgetting_stats import paired_comparison, summarise_arms
from analysis.weights.forgetting_train import ENCODER_TASK, LM_TASK, ArmTask

CODE_VERSION = "kappatune-2"
ANALYSIS = "experiment.kappatune_matched"
TASKS = (ENCODER_TASK, LM_TASK)
DEFAULT_SOURCES = ("minilm", "bilinear-lm")
SUMMARY_METRICS = ("gain", "forgetting", "n_params", "accuracy", "drift", "spearman", "task_ppl", "general_ppl",
                   "seconds")
_DEFAULTS = {ENCODER_TASK: {"lr": 5e-5, "max_tokens": 32, "exclude": r"^(embeddings|pooler)\."},
             LM_TASK: {"lr": 1e-3, "max_tokens": 64, "exclude": None}}
_NOT_IN_KEY = ("executor", "workers", "ray_address")


@dataclass(frozen=True, kw_only=True)
class KappaTuneConfig:
    """Settings of one model's experiment; validated on construction (ConfigError). ``None`` fields
    take the model's default (``_DEFAULTS``: lr 5e-5 / 1e-3, max_tokens 32 / 64 for encoder / LM)."""

    budget: str = "12.5%params"  # "P%params": matched; "7" / "20%": tensor-count budget (unmatched)
    tol: float = 0.05  # matched arms lie within ±tol of the target parameter count
    seeds: int = 5
    steps: int = 100
    batch_size: int = 16
    lr: float | None = None
    lora_lr_scale: float = 1.0  # LoRA arms train at lr * this (default: the same lr, steps and batches as every arm)
    lora_r: int = 8  # LoRA rank under an unmatched budget
    head_lr: float = 1e-2  # encoder's classifier head
    max_tokens: int | None = None
    arms: tuple[str, ...] = ARMS
    include: str | None = None
    exclude: str | None = "default"  # "default": the model's (encoder: embeddings and pooler); None: nothing
    task_packages: tuple[str, ...] = ("numpy", "scipy", "pandas", "torch", "sklearn")  # encoder classes
    per_class: int = 200
    test_fraction: float = 0.25
    heldout_packages: tuple[str, ...] = STDLIB_PACKAGES  # forgetting is measured on these
    heldout_per_package: int = 32
    data_seed: int = 0
    lm_task_package: str = "sklearn"  # the LM's fine-tuning task
    autocast: bool = True  # bf16 autocast for the encoder's training (metrics fp32; the LM trains in fp32)
    executor: str = "local"  # not in the store key: where arms run
    workers: int | None = None
    ray_address: str | None = None

    def __post_init__(self) -> None:
        from analysis.weights.selection import Budget

        for name in ("seeds", "steps", "batch_size", "per_class", "heldout_per_package", "lora_r"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r} must be an integer >= 1")
        for name in ("lr", "head_lr", "lora_lr_scale"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"{name}={v!r} must be a finite number > 0, e.g. 1e-4")
        if not 0 <= self.tol < 1:
            raise ConfigError(f"tol={self.tol!r} must lie in [0, 1), e.g. 0.05 for ±5%")
        object.__setattr__(self, "arms", tuple(self.arms))
        object.__setattr__(self, "task_packages", tuple(self.task_packages))
        object.__setattr__(self, "heldout_packages", tuple(self.heldout_packages))
        bad = [a for a in self.arms if a not in ARMS]
        if bad or not self.arms or len(set(self.arms)) != len(self.arms):
            raise ConfigError(f"arms {list(self.arms)} must be distinct names from {', '.join(ARMS)}")
        if self.lm_task_package in self.heldout_packages:
            raise ConfigError(f"lm_task_package {self.lm_task_package!r} is also a held-out package; the held-out "
                              "text must come from packages the task never trains on")
        if overlap := sorted(set(self.task_packages) & set(self.heldout_packages)):
            raise ConfigError(f"packages {overlap} are both task and held-out packages")
        object.__setattr__(self, "budget", str(Budget.parse(self.budget)))
        from analysis.executor import ExecutorConfig

        ExecutorConfig(kind=self.executor, workers=self.workers, address=self.ray_address)  # validates

    @property
    def matched(self) -> bool:
        return self.budget.endswith("params")

    def store_params(self) -> dict[str, Any]:
        """The store key's params: every setting except where the arms run."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k not in _NOT_IN_KEY}

    def resolved(self, task: str) -> dict[str, Any]:
        """The settings with the model's defaults filled in (what the workers read)."""
        d = self.store_params()
        for k, v in _DEFAULTS[task].items():
            if d[k] is None or (k == "exclude" and d[k] == "default"):
                d[k] = v
        return d


@dataclass(frozen=True, eq=False)
class KappaTuneResult:
    """``runs``: one row per arm x seed (arm, seed, n_tensors, n_params, target, matched, lora_r, gain,
    forgetting, the task's own metrics, seconds, tensors). ``summary``: per arm, mean / std /
    bootstrap 95% interval (``<m>_lo``, ``<m>_hi``) of gain, forgetting and the rest. ``paired``:
    lowest κ minus each control, per-seed differences with intervals (``forgetting_stats``).
    ``config``: the store-key settings; ``meta``: model, task, units, data sizes."""

    runs: pd.DataFrame
    summary: pd.DataFrame
    paired: pd.DataFrame
    config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)


def model_task(model_dir: str) -> str:
    """``"lm"`` for a causal LM directory (architectures ending in ForCausalLM), else ``"classification"``."""
    import json
    from pathlib import Path

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return LM_TASK if any(a.endswith("ForCausalLM") for a in cfg.get("architectures") or []) else ENCODER_TASK


def plans(table: pd.DataFrame, config: KappaTuneConfig, task: str, *, n_params_full: int,
          n_params_head: int) -> list[ArmPlan]:
    """Every arm x seed plan, seed-major (seed 0's arms first)."""
    r = config.resolved(task)
    return [plan_arm(arm, seed, table, budget=config.budget, include=r["include"], exclude=r["exclude"],
                     tol=config.tol, lora_r=config.lora_r, n_params_full=n_params_full, n_params_head=n_params_head)
            for seed in range(config.seeds) for arm in config.arms]


def _before(model_dir: str, task: str, cfg: dict[str, Any]) -> tuple[Any, dict[str, Any], int, int]:
    """(before numbers, data sizes, parameters of the whole model, of its head)."""
    from analysis.weights.forgetting_train import lm_nll, load_model, task_data

    model, _ = load_model(model_dir, task)
    data = task_data(model_dir, task, cfg)
    n_full = sum(p.numel() for p in model.parameters())
    if task == ENCODER_TASK:
        from analysis.models.encoder import sentence_embeddings

        return (sentence_embeddings(model, data["heldout"], pad_id=data["pad_id"]), data["sizes"], n_full,
                0)
    before = {"task_nll": lm_nll(model, data["test"], data["pad_id"]),
              "general_nll": lm_nll(model, data["general"], data["pad_id"])}
    return before, data["sizes"] | before, n_full, model.get_output_embeddings().weight.numel()


def kappatune_matched(model_dir: str, table: pd.DataFrame, config: KappaTuneConfig = KappaTuneConfig(), *,
                      label: str = "", progress: Progress | None = None) -> KappaTuneResult:
    """Run every arm x seed of ``config`` on the model in ``model_dir`` through the executor."""
    from analysis.executor import ExecutorConfig, make_executor
    from analysis.weights.forgetting_train import run_arm

    task = model_task(model_dir)
    cfg = config.resolved(task)
    before, sizes, n_full, n_head = _before(model_dir, task, cfg)
    todo = plans(table, config, task, n_params_full=n_full, n_params_head=n_head)
    tasks = [ArmTask(str(model_dir), task, cfg, p, before) for p in todo]
    rows: list[dict[str, Any]] = [None] * len(tasks)  # type: ignore[list-item]
    if progress is not None:
        progress(0, len(tasks), f"{label or task}: {len(tasks)} arm x seed runs")
    ex_cfg = ExecutorConfig(kind=config.executor, workers=config.workers, address=config.ray_address)
    with make_executor(ex_cfg) as ex:
        done = 0
        for i, row, error in ex.imap_unordered(run_arm, tasks):
            if error is not None:
                raise error
            rows[i] = row
            done += 1
            if progress is not None:
                progress(done, len(tasks), f"{label or task}: {row['arm']} seed {row['seed']}")
    order = {a: k for k, a in enumerate(config.arms)}
    runs = pd.DataFrame(rows).sort_values(["arm", "seed"], key=lambda c: c.map(order) if c.name == "arm" else c,
                                          kind="stable").reset_index(drop=True)
    units = ({"gain": "test accuracy", "forgetting": "held-out embedding drift, mean 1 − cos"} if task == ENCODER_TASK
             else {"gain": "drop of the task's held-out loss, nats/token",
                   "forgetting": "rise of the held-out stdlib loss, nats/token (log perplexity ratio)"})
    import torch

    meta = {"task": task, "label": label, "units": units, "data": sizes, "target": int(todo[0].target) if todo else 0,
            "torch": torch.__version__}
    return KappaTuneResult(runs=runs, summary=summarise(runs), paired=paired_comparison(runs),
                           config=config.store_params(), meta=meta)


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """``forgetting_stats.summarise_arms`` over the metrics the runs have."""
    return summarise_arms(runs, [m for m in SUMMARY_METRICS if m in runs.columns])


def to_result(res: KappaTuneResult):
    """The store's ``Result``: table = runs; meta = config, summary, paired, meta."""
    from analysis.store import Result

    return Result(table=res.runs, meta={"config": res.config, "meta": res.meta,
                                        "summary": res.summary.to_dict(orient="records"),
                                        "paired": res.paired.to_dict(orient="records")})


def from_result(result) -> KappaTuneResult:
    """Inverse of ``to_result`` (column order of the summary rebuilt from the runs)."""
    meta = dict(result.meta)
    runs = result.table
    summary = summarise(runs)
    paired = pd.DataFrame(meta.get("paired") or [])
    return KappaTuneResult(runs=runs, summary=summary, paired=paired, config=dict(meta.get("config", {})),
                           meta=dict(meta.get("meta", {})))
