"""Helpers for the dashboard refusal tests (a typed path outside the allowed root): a model
outside the root, a spy on every ``open_source`` call, and the checks each page must pass."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

REFUSAL = "outside the directories this dashboard may read"


def write_model(directory: Path) -> Path:
    """A small Hugging Face-style directory (config.json + model.safetensors)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    rng = np.random.default_rng(5)
    save_file({"layers.0.mlp.up.weight": torch.from_numpy(rng.standard_normal((12, 8)).astype(np.float32))},
              str(directory / "model.safetensors"))
    return directory


def restrict_to_allowed(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """(allowed root, a valid model directory outside it); the dashboard may read only the first."""
    from app.allowed_paths import ENV_VAR

    allowed = tmp_path / "allowed"
    allowed.mkdir()
    monkeypatch.setenv(ENV_VAR, str(allowed))
    return allowed, write_model(tmp_path / "outside" / "model")


def spy_open_source(monkeypatch) -> list[str]:
    """Every spec passed to ``analysis.sources.open_source`` from now on, by any LensLab module."""
    from analysis import sources

    original = sources.open_source
    opened: list[str] = []

    def spy(spec, *args, **kwargs):
        opened.append(str(spec))
        return original(spec, *args, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.split(".")[0] in ("analysis", "app", "sae", "probes") and \
                getattr(module, "open_source", None) is original:
            monkeypatch.setattr(module, "open_source", spy)
    return opened


def assert_refused(at, store, opened: list[str], outside: Path) -> None:
    """One typed refusal naming the fix, nothing stored, and nothing under ``outside`` opened."""
    assert not at.exception, [e.value for e in at.exception]
    errors = [e.value for e in at.error]
    assert len(errors) == 1 and REFUSAL in errors[0] and "--allowed-root" in errors[0], errors
    assert "neither a bundled" not in errors[0]  # refused before the path was looked at
    assert not store.list() and not store.models()
    assert not [s for s in opened if str(outside.parent) in s], opened


def check_form_refuses(open_page, *, field: str, button: str, store, tmp_path: Path, monkeypatch, target: str,
                       inputs: dict[str, str] | None = None) -> None:
    """Type a path outside the allowed root into ``field`` of the page ``open_page()`` opens (a valid
    model when ``target`` is "model", else a missing path), fill ``inputs``, press ``button``, and
    check the refusal (``assert_refused``)."""
    _, outside = restrict_to_allowed(tmp_path, monkeypatch)
    opened = spy_open_source(monkeypatch)
    at = open_page()
    at.text_input(key=field).input(str(outside if target == "model" else outside.parent / "missing"))
    for key, value in (inputs or {}).items():
        at.text_input(key=key).input(value)
    next(b for b in at.button if b.label == button).click().run()
    assert_refused(at, store, opened, outside)
