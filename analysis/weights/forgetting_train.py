"""One arm x seed of the parameter-matched KappaTune experiment: the executor's task (no store I/O).

``run_arm(task)`` loads the model from its directory (each worker process loads its own copy),
makes the arm's parameters trainable (``prepare``), fine-tunes it and measures task gain and
forgetting against the "before" numbers the driver computed once:

- encoder (``task="classification"``, MiniLM): which package a docstring comes from, a linear
  head on the mean-pooled embedding (``analysis.weights.forgetting``'s task and data); gain =
  test accuracy; forgetting = mean 1 − cos of held-out stdlib embeddings before/after;
- causal LM (``task="lm"``, the bundled tiny Llama-shaped LM): next-token loss on one package's
  docstrings; gain = drop of the task's held-out loss (nats/token); forgetting = rise of the
  loss on held-out stdlib docstrings (nats/token = log of the perplexity ratio). Both held-out
  sets come from the LM's own validation split, so the LM never saw them.

LoRA arms wrap the model with ``peft.get_peft_model(model, LoraConfig(**plan.lora))`` and merge
the adapters back (``merge_and_unload``) before measuring. Every arm of a seed sees the same
batches (``numpy.random.default_rng(seed)``) and head / adapter initialisation (``torch.manual_seed(seed)``).
"""

from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from analysis.weights.forgetting_arms import ArmPlan
from analysis.weights.forgetting_metrics import batches

LM_TASK = "lm"
ENCODER_TASK = "classification"


@dataclass(frozen=True)
class ArmTask:
    """Everything a worker needs for one arm x seed (picklable)."""

    model_dir: str
    task: str  # ENCODER_TASK | LM_TASK
    config: dict[str, Any]  # KappaTuneConfig.resolved(task) as a dict
    plan: ArmPlan
    before: Any  # encoder: held-out embeddings (n, d); LM: {"task_nll": .., "general_nll": ..}


# -- data (cached per worker process) -------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def load_model(model_dir: str, task: str) -> tuple[nn.Module, Any]:
    """(model, tokenizer) on the CPU in eval mode; a fresh deep copy is trained per task."""
    if task == ENCODER_TASK:
        from analysis.models.encoder import load_encoder

        return load_encoder(model_dir)
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def lm_split(model_dir: str) -> tuple[list, list]:
    """(train, validation) DocTexts of the LM's own pre-training split (``lenslab_training.json``)."""
    import json

    from analysis.corpus import DEFAULT_PACKAGES, docstring_corpus, split

    info = json.loads((Path(model_dir) / "lenslab_training.json").read_text())["config"]
    items = docstring_corpus(tuple(info.get("packages") or DEFAULT_PACKAGES), per_package=info.get("per_package"),
                             seed=info.get("seed", 0))
    vf = info.get("val_fraction", 0.1)
    train, val = split(items, [1 - vf, vf], seed=info.get("seed", 0), by=lambda d: d.package)
    return train, val


@functools.lru_cache(maxsize=4)
def _data_cached(model_dir: str, task: str, key: str) -> dict[str, Any]:
    import json

    cfg = json.loads(key)
    model, tok = load_model(model_dir, task)
    if task == ENCODER_TASK:
        from analysis.models.encoder import tokenize
        from analysis.weights.forgetting import ForgettingConfig, build_task_data

        fields = ForgettingConfig.__dataclass_fields__
        data = build_task_data(ForgettingConfig(**{k: v for k, v in cfg.items() if k in fields and k in (
            "task_packages", "heldout_packages", "per_class", "test_fraction", "heldout_per_package", "data_seed")}))
        mt = cfg["max_tokens"]
        return {"train": tokenize(tok, [d.text for d in data.train], mt), "y_train": data.labels(data.train),
                "test": tokenize(tok, [d.text for d in data.test], mt), "y_test": data.labels(data.test),
                "heldout": tokenize(tok, [d.text for d in data.heldout], mt), "n_classes": len(data.classes),
                "pad_id": int(getattr(tok, "pad_token_id", 0) or 0),
                "sizes": {"n_train": len(data.train), "n_test": len(data.test), "n_heldout": len(data.heldout)}}
    train, val = lm_split(model_dir)
    pkg, general = cfg["lm_task_package"], set(cfg["heldout_packages"])

    def enc(texts: list[str]) -> list[list[int]]:
        return tok(texts, truncation=True, max_length=cfg["max_tokens"])["input_ids"]

    out = {"train": enc([d.text for d in train if d.package == pkg]),
           "test": enc([d.text for d in val if d.package == pkg]),
           "general": enc([d.text for d in val if d.package in general]),
           "pad_id": int(getattr(tok, "pad_token_id", 0) or 0)}
    out["sizes"] = {"n_train": len(out["train"]), "n_test": len(out["test"]), "n_general": len(out["general"])}
    return out


def task_data(model_dir: str, task: str, config: dict[str, Any]) -> dict[str, Any]:
    import json

    return _data_cached(model_dir, task, json.dumps(config, sort_keys=True))


# -- arms ----------------------------------------------------------------------------------------
def prepare(model: nn.Module, plan: ArmPlan, task: str) -> nn.Module:
    """Set what trains for ``plan`` on ``model`` (modified in place); returns the module to train
    (the PEFT wrapper for a LoRA arm)."""
    from analysis.weights.export import freeze_to_selection

    for p in model.parameters():
        p.requires_grad_(plan.arm == "full")
    if plan.arm == "head_only" and task == LM_TASK:
        model.get_output_embeddings().weight.requires_grad_(True)
    elif plan.lora is not None:
        import peft

        torch.manual_seed(plan.seed)
        return peft.get_peft_model(model, peft.LoraConfig(**plan.lora))
    elif plan.params:
        freeze_to_selection(model, plan.params)
    return model


def lm_nll(model: nn.Module, ids: list[list[int]], pad_id: int, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy (nats/token) of ``model`` over the texts ``ids``, float32."""
    from analysis.models.encoder import collate

    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(ids), batch_size):
            x, mask = collate(ids[start:start + batch_size], pad_id)
            logits = model(input_ids=x, attention_mask=mask).logits[:, :-1].float()
            target, keep = x[:, 1:], mask[:, 1:].bool()
            ce = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             reduction="none").reshape(target.shape)
            total += float(ce[keep].sum())
            count += int(keep.sum())
    return total / max(count, 1)


def _train(body: nn.Module, task: str, plan: ArmPlan, cfg: dict[str, Any], data: dict[str, Any],
           d_model: int) -> tuple[nn.Linear | None, np.ndarray]:
    from analysis.models.encoder import collate, mean_pool

    torch.manual_seed(plan.seed)
    head = nn.Linear(d_model, data["n_classes"]) if task == ENCODER_TASK else None
    groups = [{"params": list(head.parameters()), "lr": cfg["head_lr"]}] if head is not None else []
    trainable = [p for p in body.parameters() if p.requires_grad]
    lr = cfg["lr"] * (cfg["lora_lr_scale"] if plan.lora is not None else 1.0)
    if trainable:
        groups.append({"params": trainable, "lr": lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    losses = np.empty(cfg["steps"])
    autocast = bool(cfg["autocast"]) and task == ENCODER_TASK
    for step, idx in enumerate(batches(len(data["train"]), cfg["batch_size"], cfg["steps"], plan.seed)):
        x, mask = collate([data["train"][i] for i in idx], data["pad_id"])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if task == ENCODER_TASK:
                with torch.set_grad_enabled(bool(trainable)):
                    hidden = body(input_ids=x, attention_mask=mask).last_hidden_state
                logits = head(mean_pool(hidden, mask))
                loss = nn.functional.cross_entropy(logits, torch.as_tensor(data["y_train"][idx]))
            else:
                labels = x.masked_fill(mask == 0, -100)
                loss = body(input_ids=x, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses[step] = float(loss.detach())
    return head, losses


def run_arm(task: ArmTask) -> dict[str, Any]:
    """Train and measure one arm x seed; one row of the experiment's runs table."""
    from analysis.weights.forgetting_metrics import accuracy, cosine_drift, similarity_spearman

    t0 = time.perf_counter()
    cfg, plan = task.config, task.plan
    base, _ = load_model(task.model_dir, task.task)
    data = task_data(task.model_dir, task.task, cfg)
    model = copy.deepcopy(base)
    model.eval()  # dropout off: only the trained tensors differ between arms
    body = prepare(model, plan, task.task)
    n_trainable = sum(p.numel() for p in body.parameters() if p.requires_grad)
    head, losses = _train(body, task.task, plan, cfg, data, int(model.config.hidden_size))
    if plan.lora is not None:
        model = body.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(False)
    row: dict[str, Any] = {"arm": plan.arm, "seed": plan.seed, "n_tensors": len(plan.params),
                           "n_params": int(plan.n_params), "n_trainable": int(n_trainable), "target": plan.target,
                           "matched": bool(plan.matched), "lora_r": int(plan.lora["r"]) if plan.lora else 0,
                           "train_loss": float(losses[-10:].mean())}
    if task.task == ENCODER_TASK:
        from analysis.models.encoder import sentence_embeddings

        after = sentence_embeddings(model, data["heldout"], pad_id=data["pad_id"])
        drift = cosine_drift(task.before, after)
        acc = accuracy(head, sentence_embeddings(model, data["test"], pad_id=data["pad_id"]), data["y_test"])
        row |= {"accuracy": acc, "drift": float(drift.mean()), "spearman": similarity_spearman(task.before, after),
                "gain": acc, "forgetting": float(drift.mean())}
    else:
        task_nll = lm_nll(model, data["test"], data["pad_id"])
        general_nll = lm_nll(model, data["general"], data["pad_id"])
        row |= {"task_ppl": math.exp(task_nll), "general_ppl": math.exp(general_nll),
                "gain": task.before["task_nll"] - task_nll, "forgetting": general_nll - task.before["general_nll"]}
    row |= {"seconds": time.perf_counter() - t0, "tensors": ",".join(plan.params) if plan.arm != "full" else "(all)"}
    return row
