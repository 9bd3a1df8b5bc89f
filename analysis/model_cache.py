"""The one cache of booted models (TransformerBridges) per process, and the lock they are used under.

Booting a bridge takes seconds and hundreds of MiB, so a process keeps the last ``MAX_MODELS``
it booted, keyed by (fingerprint, variant, device, dtype). ``variant`` names a model built on
top of the checkpoint (e.g. ``"mlm-head"``: the encoder with a trained masked-LM head); the
``boot`` callable builds it on a miss. Every analysis that runs a booted model holds ``LOCK``
while hooks are attached: the dashboard's sessions share the models, and a hook attached by
one session must never run in another's forward pass. The lock is re-entrant, so a pipeline
may hold it around a whole run while helpers it calls take it again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from analysis.sources import Source

MAX_MODELS = 3
LOCK = threading.RLock()
_MODELS: OrderedDict[tuple[str, str, str, str], Any] = OrderedDict()


def _default_boot(src: Source, device: torch.device, dtype: torch.dtype) -> Any:
    return src.boot_bridge(dtype=dtype)


def bridge(src: Source, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
           variant: str = "", boot: Callable[[Source, torch.device, torch.dtype], Any] | None = None) -> Any:
    """The booted model of ``src`` (a TransformerBridge unless ``boot`` builds something else) on
    ``device``, booted once per process; least recently used models beyond ``MAX_MODELS`` are dropped."""
    device = torch.device(device)
    key = (src.fingerprint, variant, str(device), str(dtype))
    with LOCK:
        if key in _MODELS:
            _MODELS.move_to_end(key)
            return _MODELS[key]
        model = (boot or _default_boot)(src, device, dtype)
        if isinstance(model, torch.nn.Module) and device.type != "cpu":
            model = model.to(device)
        _MODELS[key] = model
        while len(_MODELS) > MAX_MODELS:
            _MODELS.popitem(last=False)
        return model


def cached_keys() -> list[tuple[str, str, str, str]]:
    """Keys of the models held now, least recently used first (for tests and diagnostics)."""
    with LOCK:
        return list(_MODELS)


def clear() -> None:
    """Drop every cached model (tests; freeing memory in a long notebook session)."""
    with LOCK:
        _MODELS.clear()
