"""Which paths the dashboard may open when a user types one into it.

A source typed into a dashboard form is either a bundled name (``minilm``, always allowed) or a
path on the server's disk, which must resolve (symlinks and ``..`` followed) to somewhere
inside an allowed root:

- ``$LENSLAB_ALLOWED_ROOT``: one or more directories separated by ``os.pathsep`` (``:``), set by
  ``lenslab dashboard --allowed-root DIR`` (repeatable); it replaces the defaults;
- default: the directory the dashboard was started from, LensLab's models directory
  (``$LENSLAB_MODELS``, default ``~/.cache/lenslab/models``) and the Hugging Face cache, found as
  huggingface_hub finds it (``hf_home``): ``$HF_HOME``, else ``$XDG_CACHE_HOME/huggingface``, else
  ``~/.cache/huggingface``; plus ``$HF_HUB_CACHE`` when it points elsewhere.

A refused path is never opened (not even to check that it exists), so an error message cannot
reveal anything about files outside the roots. A typed directory inside the roots must not hold
links out of them either (a symlinked ``model.safetensors`` or shard): it is refused, naming the
link but not its target. The CLI and the Python API are not restricted:
they run with the user's own rights.

Every value the dashboard hands to an ``app.api`` function as a file goes through ``check_typed_path``,
by way of one helper per kind of value: ``check_source`` (a model typed into a form),
``check_stored_source`` (the model a stored result came from, reopened to measure, evaluate or
generate), ``check_contrasts`` (a contrast set, typed or stored) and ``check_direction`` (the file of a
``vector:PATH`` / ``sae:PATH:i`` direction spec). ``tests/app/test_dashboard_paths.py`` scans the pages
for API calls whose file arguments do not come straight from one of them.
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
        from analysis.models import tiny_lm as tiny_models

        roots = [Path.cwd(), tiny_models.models_dir(), *hf_roots()]
    return tuple(dict.fromkeys(r.resolve() for r in roots))


def hf_home() -> Path:
    """The Hugging Face home as huggingface_hub resolves it: ``$HF_HOME``, else ``$XDG_CACHE_HOME/huggingface``,
    else ``~/.cache/huggingface`` (``~`` expanded in each)."""
    if home := os.environ.get("HF_HOME", "").strip():
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip() or "~/.cache"
    return Path(xdg).expanduser() / "huggingface"


def hf_roots() -> list[Path]:
    """The Hugging Face directories a typed model may lie in: ``hf_home()`` and ``$HF_HUB_CACHE`` (or its old
    name ``$HUGGINGFACE_HUB_CACHE``) when set outside it."""
    hub = os.environ.get("HF_HUB_CACHE", "").strip() or os.environ.get("HUGGINGFACE_HUB_CACHE", "").strip()
    return [hf_home(), *([Path(hub).expanduser()] if hub else [])]


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
    if not _inside(resolved, roots):
        raise SourceError(f"{spec[:200]!r} is outside the directories this dashboard may read "
                          f"({', '.join(map(str, roots))}); move the {what} there, or restart the dashboard with "
                          f"--allowed-root DIR (or {ENV_VAR}=DIR)")
    _check_directory_links(spec, resolved, roots, what)
    return spec


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path.is_relative_to(r) for r in roots)


def _check_directory_links(spec: str, resolved: Path, roots: tuple[Path, ...], what: str) -> None:
    """A directory inside the roots may still hold links out of them (a symlinked
    ``model.safetensors``, shard, index or config): every entry, links followed, must resolve
    inside the roots too. Shard names in an index are held to the checkpoint's own directory by
    the loader (``analysis.sources``), so one level is enough."""
    try:
        if not resolved.is_dir():
            return
        entries = [(e.name, Path(e.path).resolve()) for e in os.scandir(resolved)]
    except (OSError, RuntimeError) as exc:  # unreadable directory, symlink loop
        raise SourceError(f"{spec[:200]!r}: cannot list the directory ({exc}); check its permissions") from exc
    outside = sorted(name for name, target in entries if not _inside(target, roots))
    if outside:
        raise SourceError(f"{spec[:200]!r}: {', '.join(outside[:5])} links to a file outside the directories this "
                          f"dashboard may read; copy the {what}'s files into {spec[:200]!r} instead of linking "
                          f"them, or restart the dashboard with --allowed-root DIR (or {ENV_VAR}=DIR)")


def check_source(spec: str, *, what: str = "model") -> str:
    """A model source typed into a page: a bundled name (``minilm``, ``bilinear-lm``, ...) or a path inside
    the allowed roots; returned unchanged, SourceError otherwise."""
    from analysis.sources import BUNDLED

    return check_typed_path(spec, names=BUNDLED, what=what)


def check_stored_source(spec: str | None) -> str | None:
    """The source a stored result records (its bundled name or path), checked like a typed one before it is
    reopened; None or "" (a result computed from an in-memory model) is returned as None, so the API
    says what to pass instead."""
    return check_source(spec) if spec else None


def check_contrasts(spec: str) -> str:
    """A contrast set: a bundled name (also as ``bundled:NAME``, a stored set's origin) or a path to a
    ``.jsonl`` file inside the allowed roots; returned unchanged, SourceError otherwise."""
    from analysis.steering.contrasts import bundled_contrasts

    names = bundled_contrasts()
    return check_typed_path(spec, names=[*names, *(f"bundled:{n}" for n in names)], what="contrast set")


def check_direction(spec: str | None) -> str | None:
    """A bilinear direction spec, returned unchanged: the file of ``vector:PATH`` or ``sae:PATH:i`` must lie
    inside the allowed roots (SourceError naming PATH otherwise); the other kinds read no file."""
    from analysis.bilinear.loader import direction_file

    if (path := direction_file(spec)) is not None:
        check_typed_path(path, what="direction file")
    return spec
