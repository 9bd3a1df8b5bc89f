"""Where torch computations run: ``auto | cpu | cuda | mps`` and the float dtype.

``auto`` picks CUDA when available, then MPS, else CPU (CPU on a machine without a GPU). A
device that was asked for but is missing is a ``ConfigError`` naming the fix, never a silent
fall-back: results computed elsewhere than requested would be stored under the same key.
The device is not part of a store key: every analysis computes its stored numbers in a fixed
dtype (float64 where the analysis says so), so they agree across devices to rounding.
"""

from __future__ import annotations

import torch

from analysis.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """A concrete ``torch.device`` for ``auto|cpu|cuda|mps`` (or ``cuda:N``, or a torch.device)."""
    if isinstance(device, torch.device):
        name = device.type
    else:
        name = "auto" if device is None else str(device).strip().lower()
    kind = name.split(":", 1)[0]
    if kind not in DEVICES:
        raise ConfigError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)} (or cuda:N)")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was requested but this torch has no usable CUDA device "
                          f"(torch {torch.__version__}); pass --device cpu (or auto)")
    if kind == "mps" and not _mps_available():
        raise ConfigError("device 'mps' was requested but the MPS backend is not available here; "
                          "pass --device cpu (or auto)")
    return torch.device(device) if isinstance(device, torch.device) else torch.device(name)


def resolve_dtype(dtype: str | torch.dtype | None, default: torch.dtype = torch.float32) -> torch.dtype:
    """A floating torch dtype from its name (``float32``, ``bfloat16``, ...), a dtype, or None (default)."""
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ConfigError(f"dtype {dtype} is not a floating-point type; use one of {', '.join(DTYPES)}")
        return dtype
    name = str(dtype).strip().lower().removeprefix("torch.")
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def float64_home(device: torch.device) -> torch.device:
    """Where float64 work on tensors from ``device`` is done: that device, or the CPU for MPS (no float64)."""
    return torch.device("cpu") if device.type == "mps" else device


def resolve_float64_device(device: str | torch.device | None, what: str) -> torch.device:
    """The device for a computation that must run in float64 (``what`` names it in the error):
    ``auto`` passes over MPS (no float64 there) to the CPU; an explicit ``mps`` is a ConfigError."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return float64_home(resolve_device("auto"))
    dev = resolve_device(device)
    if dev.type == "mps":
        raise ConfigError(f"device 'mps' cannot compute {what}: it runs in float64, which the MPS backend does "
                          "not support; pass --device cpu (or auto)")
    return dev
