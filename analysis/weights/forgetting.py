"""KappaTune forgetting experiment on a sentence encoder (MiniLM); pure torch, no store I/O.

Question: fine-tuning only the best-conditioned tensors (KappaTune, lowest κ) — does the
encoder forget less of what it knew than fine-tuning other tensors at the same budget?

Setup (every choice is a ``ForgettingConfig`` field):

- Encoder: a Hugging Face BERT-style encoder (the bundled all-MiniLM-L6-v2 ``BertModel``,
  loaded without its pooler; ``analysis.models.encoder``). Sentence embedding = mean of the
  last hidden states over the tokens the attention mask keeps, then L2-normalised (what
  sentence-transformers does for this model). The checkpoint has no masked-LM head, so forgetting is measured on these
  embeddings, not on a masked-token loss.
- Task: which package a docstring comes from (``analysis.corpus``; default numpy, scipy,
  pandas, torch, sklearn: five classes), a linear head on the pooled embedding, cross-entropy. The task corpus
  (``per_class`` docstrings per package) is split per package into train / test
  (``test_fraction``) with ``data_seed``; the same split serves every arm and seed.
- Held-out text for forgetting: docstrings of *other* packages (default eight
  standard-library modules, at most ``heldout_per_package`` each), never trained on.
- Arms, all with the same optimizer (AdamW, no weight decay), lr, steps, batch size and
  batches for a given seed; the head (lr ``head_lr``) always trains:
  ``lowest_kappa`` (KappaTune), ``highest_kappa``, ``random`` (re-drawn per seed) select
  ``budget`` (default 20% of the candidate tensors) with ``analysis.weights.selection.select_tensors``
  from the model's spectra table and train *only those weight matrices*: biases, LayerNorms
  and everything else stay frozen (``analysis.weights.export.freeze_to_selection``). Candidates
  exclude ``exclude`` (default: embeddings, which are lookup tables rather than linear maps,
  and the pooler, which mean pooling never uses); ``include`` narrows them further (e.g.
  ``"attention"``: only same-shape attention matrices, so every arm trains as many
  parameters). ``full`` trains every encoder parameter
  (embeddings, biases and LayerNorms included). ``head_only`` trains no encoder parameter:
  the reference for accuracy at zero drift.
- Training: dropout off (``model.eval()``) so the only difference between arms is which
  tensors move; batches drawn by ``numpy.random.default_rng(seed)`` (one permutation per
  epoch); head initialised after ``torch.manual_seed(seed)``. Optional bf16 autocast for the
  training forward/backward (``autocast``); metrics are always computed in float32.
- Device: everything runs on the device of the model passed in (the pipeline moves it to the
  run's device); embeddings and metrics come back as CPU numpy, so a CPU run is unchanged.
- Metrics per arm x seed: ``accuracy`` on the test split; on the held-out set, ``drift`` =
  mean over texts of 1 − cos(e_before, e_after) and ``spearman`` = Spearman correlation of the
  upper triangles (i < j) of the pairwise cosine-similarity matrices before and after.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from analysis.corpus import STDLIB_PACKAGES, DocText, docstring_corpus, split
from analysis.errors import ConfigError
from analysis.models.encoder import collate, mean_pool, model_device, sentence_embeddings, tokenize
from analysis.progress import Progress
from analysis.weights.forgetting_metrics import (METRICS, SUMMARY_COLUMNS, accuracy,  # noqa: F401 (re-exported)
                                                 batches, changed_tensors, cosine_drift, similarity_spearman,
                                                 summarise)

CODE_VERSION = "forgetting-1"
ANALYSIS = "experiment.kappatune_forgetting"
ARMS = ("lowest_kappa", "highest_kappa", "random", "full", "head_only")
SELECTION_ARMS = ("lowest_kappa", "highest_kappa", "random")
DEFAULT_EXCLUDE = r"^(embeddings|pooler)\."
TASK_PACKAGES = ("numpy", "scipy", "pandas", "torch", "sklearn")
HELDOUT_PACKAGES = STDLIB_PACKAGES


@dataclass(frozen=True, slots=True, kw_only=True)
class ForgettingConfig:
    """Settings of one experiment; validated on construction (ConfigError)."""

    budget: str = "20%"  # analysis.weights.selection budget: "20%" of tensors, "7", "10%params"
    seeds: int = 3  # seeds 0..seeds-1
    steps: int = 100  # optimizer steps per arm and seed
    batch_size: int = 16
    lr: float = 5e-5  # encoder parameters
    head_lr: float = 1e-2  # linear head
    max_tokens: int = 32  # truncation length (task and held-out texts)
    arms: tuple[str, ...] = ARMS
    exclude: str = DEFAULT_EXCLUDE  # regex (re.search) on tensor names: never selection candidates
    include: str | None = None  # regex (re.search): when set, only matching tensors are candidates
    task_packages: tuple[str, ...] = TASK_PACKAGES
    heldout_packages: tuple[str, ...] = HELDOUT_PACKAGES
    per_class: int = 200  # docstrings per task package (train + test)
    test_fraction: float = 0.25
    heldout_per_package: int = 32
    data_seed: int = 0  # corpus subsample and train/test split
    autocast: bool = False  # bf16 autocast for training (metrics stay float32)
    threads: int = 0  # torch intra-op threads during the run (0: leave torch's setting); set 1 on a busy machine

    def __post_init__(self) -> None:
        for name in ("seeds", "steps", "batch_size", "max_tokens", "per_class", "heldout_per_package"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r} must be an integer >= 1")
        if self.max_tokens < 8:
            raise ConfigError(f"max_tokens={self.max_tokens} leaves no room for text between [CLS] and [SEP]; use >= 8")
        for name in ("lr", "head_lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(f"{name}={v!r} must be a finite number > 0, e.g. 1e-4")
        if not 0 < self.test_fraction < 1:
            raise ConfigError(f"test_fraction={self.test_fraction!r} must lie in (0, 1), e.g. 0.25")
        object.__setattr__(self, "arms", tuple(self.arms))
        object.__setattr__(self, "task_packages", tuple(self.task_packages))
        object.__setattr__(self, "heldout_packages", tuple(self.heldout_packages))
        bad = [a for a in self.arms if a not in ARMS]
        if bad or not self.arms or len(set(self.arms)) != len(self.arms):
            raise ConfigError(f"arms {list(self.arms)} must be distinct names from {', '.join(ARMS)}")
        if len(self.task_packages) < 2:
            raise ConfigError(f"task_packages {list(self.task_packages)} must name >= 2 packages (the classes)")
        if not self.heldout_packages:
            raise ConfigError("heldout_packages is empty; name at least one package to measure forgetting on")
        if overlap := sorted(set(self.task_packages) & set(self.heldout_packages)):
            raise ConfigError(f"packages {overlap} are both task and held-out packages; the held-out text must "
                              "come from packages the task never trains on")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0:
            raise ConfigError(f"threads={self.threads!r} must be an integer >= 0 (0: torch's default)")
        if isinstance(self.data_seed, bool) or not isinstance(self.data_seed, int) or self.data_seed < 0:
            raise ConfigError(f"data_seed={self.data_seed!r} must be a non-negative integer")
        from analysis.weights.selection import Budget

        object.__setattr__(self, "budget", str(Budget.parse(self.budget)))

    def params(self) -> dict[str, Any]:
        """All settings as JSON-serialisable values (the store key's params)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def store_params(self) -> dict[str, Any]:
        """The store key's params (``params()``), as ``analysis.run`` reads them."""
        return self.params()


@dataclass(frozen=True, eq=False)
class TaskData:
    """Texts of the experiment: labelled train/test docstrings and the held-out set."""

    classes: tuple[str, ...]  # label i = classes[i]
    train: list[DocText]
    test: list[DocText]
    heldout: list[DocText]

    def labels(self, items: Sequence[DocText]) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[d.package] for d in items], dtype=np.int64)


@dataclass(frozen=True, eq=False)
class ForgettingResult:
    """Outcome of ``kappatune_forgetting``.

    ``runs``: one row per arm x seed: arm, seed, n_tensors (encoder tensors trained),
    n_params (encoder parameters trained), n_changed (encoder tensors that differ after
    training, counted by comparing the weights), accuracy (test split, in [0, 1]), drift
    (mean 1 − cos on the held-out set, in [0, 2]), drift_max, spearman (in [−1, 1]),
    train_loss (mean of the last 10 steps, nats), seconds, tensors (trained names, comma-joined).
    ``summary``: one row per arm: mean and sample std (ddof=1, NaN for one seed) over seeds.
    """

    runs: pd.DataFrame
    summary: pd.DataFrame
    config: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)


# -- data -------------------------------------------------------------------------------------
def build_task_data(config: ForgettingConfig) -> TaskData:
    """The task's train/test split and the held-out texts, from ``analysis.corpus``."""
    task = docstring_corpus(config.task_packages, per_package=config.per_class, seed=config.data_seed)
    counts = {p: sum(d.package == p for d in task) for p in config.task_packages}
    if short := [p for p, n in counts.items() if n < 4]:
        raise ConfigError(f"task packages {short} have fewer than 4 docstrings ({counts}); choose other packages")
    train, test = split(task, (1 - config.test_fraction, config.test_fraction), config.data_seed,
                        by=lambda d: d.package)
    heldout = docstring_corpus(config.heldout_packages, per_package=config.heldout_per_package,
                               seed=config.data_seed)
    if len(heldout) < 3:
        raise ConfigError(f"only {len(heldout)} held-out docstrings; add heldout_packages or raise heldout_per_package")
    return TaskData(tuple(config.task_packages), train, test, heldout)


# -- one arm --------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class TrainedArm:
    """A fine-tuned copy of the encoder, its head and what was trained."""

    model: nn.Module
    head: nn.Linear
    trained: tuple[str, ...]  # encoder parameter names that required grad
    losses: np.ndarray  # (steps,) training loss per step, nats


def trainable_names(model: nn.Module, arm: str, spectra_table: pd.DataFrame | None, config: ForgettingConfig,
                    seed: int) -> list[str]:
    """Set ``requires_grad`` on ``model`` for ``arm`` and return the trainable parameter names."""
    if arm == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return [n for n, _ in model.named_parameters()]
    if arm == "head_only":
        for p in model.parameters():
            p.requires_grad_(False)
        return []
    if spectra_table is None:
        raise ConfigError(f"arm {arm!r} needs the model's spectra table (app.api.analyze(source).table)")
    from analysis.weights.export import freeze_to_selection
    from analysis.weights.selection import select_tensors

    sel = select_tensors(spectra_table, config.budget, ranker=arm, include=config.include or None,
                         exclude=config.exclude or None, seed=seed)
    return freeze_to_selection(model, sel)


def train_arm(base: nn.Module, arm: str, seed: int, train_ids: Sequence[Sequence[int]], train_labels: np.ndarray,
              n_classes: int, config: ForgettingConfig, *, spectra_table: pd.DataFrame | None = None,
              pad_id: int = 0, on_step: Callable[[int], None] | None = None) -> TrainedArm:
    """Fine-tune a deep copy of ``base`` (left untouched) for ``arm`` with ``seed``, on ``base``'s device.

    The head is initialised on the CPU after ``torch.manual_seed(seed)`` and then moved, so its
    initial weights do not depend on the device."""
    if arm not in ARMS:
        raise ConfigError(f"unknown arm {arm!r}; choose one of {', '.join(ARMS)}")
    device = model_device(base)
    model = copy.deepcopy(base)
    model.eval()  # dropout off
    trained = trainable_names(model, arm, spectra_table, config, seed)
    torch.manual_seed(seed)
    d_model = int(model.config.hidden_size)
    head = nn.Linear(d_model, n_classes).to(device)
    groups = [{"params": list(head.parameters()), "lr": config.head_lr}]
    body = [p for p in model.parameters() if p.requires_grad]
    if body:
        groups.append({"params": body, "lr": config.lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    labels = torch.as_tensor(train_labels, dtype=torch.long)
    losses = np.empty(config.steps)
    for step, idx in enumerate(batches(len(train_ids), config.batch_size, config.steps, seed)):
        x, mask = collate([train_ids[i] for i in idx], pad_id)
        x, mask = x.to(device), mask.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.autocast):
            if body:
                hidden = model(input_ids=x, attention_mask=mask).last_hidden_state
            else:
                with torch.no_grad():
                    hidden = model(input_ids=x, attention_mask=mask).last_hidden_state
        logits = head(mean_pool(hidden, mask))
        loss = nn.functional.cross_entropy(logits, labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses[step] = float(loss.detach())
        if on_step is not None:
            on_step(step + 1)
    for p in model.parameters():
        p.requires_grad_(False)
    return TrainedArm(model, head, tuple(trained), losses)


# -- the experiment -------------------------------------------------------------------------
def kappatune_forgetting(model: nn.Module, tokenizer: Any, spectra_table: pd.DataFrame | None,
                         config: ForgettingConfig = ForgettingConfig(), *, data: TaskData | None = None,
                         progress: Progress | None = None) -> ForgettingResult:
    """Run every arm x seed of ``config`` on ``model`` (not modified) and measure forgetting.

    Training and embeddings run on ``model``'s device (move it there first); metrics come back
    as CPU numpy. ``spectra_table``: the model's spectra (``analysis.weights.spectra.weight_spectra(...).table``),
    needed by the selection arms. ``data``: defaults to ``build_task_data(config)``.
    ``progress(done, total, label)`` is called after every step. Ctrl-C propagates.
    Deterministic for a given machine and thread count (``config.threads``).
    """
    previous_threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _run(model, tokenizer, spectra_table, config, data, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _run(model: nn.Module, tokenizer: Any, spectra_table: pd.DataFrame | None, config: ForgettingConfig,
         data: TaskData | None, progress: Progress | None) -> ForgettingResult:
    data = data if data is not None else build_task_data(config)
    pad_id = int(getattr(tokenizer, "pad_token_id", 0) or 0)
    train_ids = tokenize(tokenizer, [d.text for d in data.train], config.max_tokens)
    test_ids = tokenize(tokenizer, [d.text for d in data.test], config.max_tokens)
    held_ids = tokenize(tokenizer, [d.text for d in data.heldout], config.max_tokens)
    y_train, y_test = data.labels(data.train), data.labels(data.test)

    runs_total = len(config.arms) * config.seeds
    total = runs_total * (config.steps + 1) + 1
    done = 0

    def tick(label: str, n: int = 1) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total, label)

    before = sentence_embeddings(model, held_ids, pad_id=pad_id)
    tick("held-out embeddings before fine-tuning")
    rows = []
    for seed in range(config.seeds):
        for arm in config.arms:
            label = f"{arm} seed {seed}"
            t0 = time.perf_counter()
            arm_done = 0

            def on_step(k: int, label: str = label) -> None:
                nonlocal arm_done
                tick(f"{label} step {k}/{config.steps}", k - arm_done)
                arm_done = k

            out = train_arm(model, arm, seed, train_ids, y_train, len(data.classes), config,
                            spectra_table=spectra_table, pad_id=pad_id, on_step=on_step)
            after = sentence_embeddings(out.model, held_ids, pad_id=pad_id)
            acc = accuracy(out.head, sentence_embeddings(out.model, test_ids, pad_id=pad_id), y_test)
            drift = cosine_drift(before, after)
            trained = set(out.trained)
            n_params = sum(p.numel() for n, p in out.model.named_parameters() if n in trained)
            rows.append({
                "arm": arm, "seed": seed, "n_tensors": len(out.trained), "n_params": int(n_params),
                "n_changed": len(changed_tensors(model, out.model)), "accuracy": acc,
                "drift": float(drift.mean()), "drift_max": float(drift.max()),
                "spearman": similarity_spearman(before, after),
                "train_loss": float(out.losses[-10:].mean()), "seconds": time.perf_counter() - t0,
                "tensors": ",".join(out.trained) if arm != "full" else "(all)",
            })
            tick(f"{label} evaluated")
    runs = pd.DataFrame(rows)
    meta = {"classes": list(data.classes), "n_train": len(data.train), "n_test": len(data.test),
            "n_heldout": len(data.heldout), "heldout_packages": sorted({d.package for d in data.heldout}),
            "torch": torch.__version__, "threads": torch.get_num_threads()}
    return ForgettingResult(runs=runs, summary=summarise(runs), config=config.params(), meta=meta)


def to_result(res: ForgettingResult):
    """The store's ``Result``: table = runs; meta = config, data sizes, summary records."""
    from analysis.store import Result

    return Result(table=res.runs, meta={"config": res.config, "data": res.meta,
                                        "summary": res.summary.to_dict(orient="records")})


def from_result(result) -> ForgettingResult:
    """Inverse of ``to_result``."""
    meta = dict(result.meta)
    summary = pd.DataFrame(meta.get("summary") or [])
    if summary.empty and result.table is not None:
        summary = summarise(result.table)
    summary = summary[[c for c in SUMMARY_COLUMNS if c in summary.columns]]  # JSON sorted the keys
    return ForgettingResult(runs=result.table, summary=summary, config=dict(meta.get("config", {})),
                            meta=dict(meta.get("data", {})))
