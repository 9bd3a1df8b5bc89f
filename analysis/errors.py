"""One hierarchy of typed errors. Every message names the value, the constraint and the fix."""

from __future__ import annotations


class LensLabError(Exception):
    """Base class of every error LensLab raises on purpose."""


class SourceError(LensLabError, ValueError):
    """A model source could not be resolved or read."""


class UnsafeCheckpointError(SourceError):
    """A checkpoint would need pickle (arbitrary code) to load and no trust flag was given."""


class CorruptCheckpointError(SourceError):
    """A checkpoint file is truncated or its header/offsets are inconsistent."""


class ShapeError(LensLabError, ValueError):
    """A tensor has a shape the analysis cannot take."""


class StoreError(LensLabError, OSError):
    """The results store cannot be opened, read or written."""


class CorruptEntryError(StoreError):
    """A stored blob no longer matches the checksum recorded when it was written."""


class ConfigError(LensLabError, ValueError):
    """A parameter (budget, format, ranker, ...) is out of range or unknown."""


class AmbiguousSourceError(SourceError):
    """A directory or set of files gives more than one answer to "which weights?" (two weights files
    a loader could pick, or one tensor defined in two files)."""


class AmbiguousKeyError(ConfigError):
    """Several stored results match a request that names none of them (e.g. two SAEs of one model
    at one layer); the message lists their keys and the option that picks one."""
