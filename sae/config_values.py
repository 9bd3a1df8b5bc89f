"""Raw values of a training request (``sae.config.TrainSettings``) checked before they are converted.

``TrainSettings.sae_fields`` records ``int(n_tokens)``, ``float(lr)`` ...: without this check a
bool would train as 1 (``layer=True``), a fractional count as its integer part (``n_tokens=2.5``)
and a string would escape as a bare ``ValueError``. Each refusal is a ``ConfigError`` naming the
value, the constraint and the fix, raised on construction (before any model boots).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from analysis.errors import ConfigError

_COUNTS = {"layer": 0, "n_tokens": 2_000_000, "batch_size": 4096, "seed": 0}  # name -> an example value
_REALS = {"l1_coefficient": 1.0, "lr": 1.2e-3}


def check_request_values(settings: Any) -> None:
    """ConfigError unless ``settings``' layer, n_tokens, batch_size and seed are integers (not bools;
    layer >= 0) and its l1_coefficient (None allowed) and lr are finite real numbers."""
    for name, example in _COUNTS.items():
        v = getattr(settings, name)
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or (name == "layer" and v < 0):
            what = "a block index >= 0" if name == "layer" else "an integer"
            raise ConfigError(f"SAE config {name}={v!r}: must be {what}; pass e.g. {name}={example}")
    for name, example in _REALS.items():
        v = getattr(settings, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)):
            raise ConfigError(f"SAE config {name}={v!r}: must be a finite number (NaN and inf are not "
                              f"settings); pass e.g. {name}={example}")


__all__ = ["check_request_values"]
