"""Which paths the dashboard may open when a user types one into it.

A source typed into a dashboard form is either a bundled name (``minilm``, always allowed) or a
path on the server's disk, which must resolve (symlinks and ``..`` followed) to somewhere
inside an allowed root:

- ``$LENSLAB_ALLOWED_ROOT``: one or more directories separated by ``os.pathsep`` (``:``), set by
  ``lenslab dashboard --allowed-root DIR`` (repeatable); it replaces the defaults;
- default: the directory the dashboard was started from, LensLab's models directory
  (``$LENSLAB_MODELS``, default ``~/.cache/lenslab/models``) and the Hugging Face cache
  (``$HF_HOME``, default ``~/.cache/huggingface``).

A refused path is never opened (not even to check that it exists), so an error message cannot
reveal anything about files outside the roots. The CLI and the Python API are not restricted:
they run with the user's own rights.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from analysis.errors import SourceError

ENV_VAR = "LENSLAB_ALLOWED_ROOT"


def allowed_roots() -> tuple[Path, ...]:
    """The allowed roots, resolved (see the module docstring)."""
    env = os.environ.get(ENV_VAR, "")
    if env.strip():
        roots = [Path(p).expanduser() for p in env.split(os.pathsep) if p.strip()]
    else:
        from analysis import tiny_models

        hf_home = os.environ.get("HF_HOME") or Path("~/.cache/huggingface").expanduser()
        roots = [Path.cwd(), tiny_models.models_dir(), Path(hf_home)]
    return tuple(dict.fromkeys(r.resolve() for r in roots))


def check_typed_path(spec: str, *, names: Iterable[str] = (), what: str = "model") -> str:
    """``spec`` unchanged when it is one of ``names`` (bundled names) or a path inside an allowed
    root; raises SourceError naming the roots and ``$LENSLAB_ALLOWED_ROOT`` otherwise."""
    if spec in set(names):
        return spec
    try:
        resolved = Path(spec).expanduser().resolve()
    except (OSError, ValueError, RuntimeError) as exc:  # NUL byte, unknown ~user, symlink loop
        raise SourceError(f"{spec[:200]!r} is not a usable path ({exc}); type a bundled {what} name or a path "
                          "inside the allowed roots") from exc
    roots = allowed_roots()
    if not any(resolved.is_relative_to(r) for r in roots):
        raise SourceError(f"{spec[:200]!r} is outside the directories this dashboard may read "
                          f"({', '.join(map(str, roots))}); move the {what} there, or restart the dashboard with "
                          f"--allowed-root DIR (or {ENV_VAR}=DIR)")
    return spec
