"""A deterministic, offline text corpus: docstrings of installed packages.

Used wherever LensLab needs real text without downloading any (fine-tuning / forgetting
experiments, SAE activations, steering prompts). Every item is labelled with the package
its docstring comes from, so the corpus doubles as a small classification task.

How the corpus is built (``docstring_corpus``), exactly:

1. For each package in the order given, import the modules listed in ``PACKAGE_MODULES``
   (the package itself when it is not listed). Nothing else is imported on purpose.
2. In each module, walk ``vars(module)`` in sorted name order (``vars`` and not ``dir`` +
   ``getattr``, so lazy module ``__getattr__`` hooks never fire). Keep public names (no
   leading ``_``) of functions, builtins, classes and other callables (e.g. numpy ufuncs)
   whose ``__module__`` belongs to the package (first dotted component equal to the
   package's root module name), so re-exports of other libraries are not mislabelled.
   Submodules and plain data attributes are skipped.
3. For every kept class, also walk its own ``vars(cls)`` (not inherited members) in sorted
   order and keep public functions, class/static methods and properties, except those whose
   own ``__module__`` names another package (methods other libraries patch in at import).
4. Text = ``inspect.getdoc(obj)`` (cleaned; falls back to an inherited docstring as
   ``getdoc`` does), every whitespace run collapsed to one space, stripped, then cut to
   at most ``max_chars`` characters at the last space before the limit (a single longer
   word is cut hard). Texts shorter than ``min_chars`` after this are dropped.
   ``qualname`` = ``module.name`` or ``module.Class.member`` (where it was found).
5. Duplicates: a text found under two or more packages is dropped everywhere (its label
   would be ambiguous); within one package only its first occurrence (walk order) is kept.
6. ``per_package``: keep at most that many items per package, a uniform random subset drawn
   with ``numpy.random.default_rng(seed)`` and returned in walk order.

Any exception raised while reading an attribute or its docstring skips that member;
warnings are silenced during the walk. The result depends only on the installed versions
of the packages (not on what the process imported before): ``tests`` check that two
processes build the same list.
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from analysis.errors import ConfigError

T = TypeVar("T")

# Package label -> modules walked. Only project dependencies and the standard library.
PACKAGE_MODULES: dict[str, tuple[str, ...]] = {
    "numpy": ("numpy", "numpy.linalg", "numpy.fft", "numpy.random"),
    "scipy": ("scipy.linalg", "scipy.stats", "scipy.optimize", "scipy.signal", "scipy.sparse",
              "scipy.special", "scipy.integrate", "scipy.interpolate"),
    "pandas": ("pandas",),
    "torch": ("torch", "torch.nn", "torch.nn.functional", "torch.optim", "torch.linalg", "torch.distributions"),
    "sklearn": ("sklearn.linear_model", "sklearn.ensemble", "sklearn.cluster", "sklearn.decomposition",
                "sklearn.metrics", "sklearn.preprocessing", "sklearn.model_selection", "sklearn.svm",
                "sklearn.tree", "sklearn.neighbors"),
    "json": ("json",),
    "collections": ("collections",),
    "os": ("os", "os.path"),
    "pathlib": ("pathlib",),
    "typing": ("typing",),
    "logging": ("logging",),
    "asyncio": ("asyncio",),
    "http": ("http.client", "http.server", "http.cookiejar"),
}
# Five scientific libraries with distinct vocabularies, then standard-library modules.
DEFAULT_PACKAGES: tuple[str, ...] = tuple(PACKAGE_MODULES)
STDLIB_PACKAGES: tuple[str, ...] = ("json", "collections", "os", "pathlib", "typing", "logging", "asyncio", "http")

MIN_CHARS = 40
MAX_CHARS = 512
_WS = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class DocText:
    """One docstring: its text, the package label and where it was found."""

    text: str  # whitespace-normalised, 1..max_chars characters
    package: str  # label from PACKAGE_MODULES (e.g. "numpy")
    qualname: str  # "module.name" or "module.Class.member"


def normalise(doc: str, max_chars: int) -> str:
    """Collapse whitespace and cut to ``max_chars`` at the last space before the limit."""
    text = _WS.sub(" ", doc).strip()
    if len(text) <= max_chars:
        return text
    cut = text.rfind(" ", 0, max_chars + 1)
    return text[:cut] if cut > 0 else text[:max_chars]


def _root(modname: str) -> str:
    return modname.split(".", 1)[0]


def _owned(obj: Any, root: str) -> bool:
    mod = getattr(obj, "__module__", None)
    return isinstance(mod, str) and _root(mod) == root


def _foreign(obj: Any, root: str) -> bool:
    mod = getattr(obj, "__module__", None)
    return isinstance(mod, str) and _root(mod) != root


def _is_member(obj: Any) -> bool:
    return (inspect.isclass(obj) or inspect.isroutine(obj) or callable(obj)) and not inspect.ismodule(obj)


def _getdoc(obj: Any) -> str | None:
    try:
        doc = inspect.getdoc(obj)
    except Exception:  # a member's __doc__ machinery may raise anything
        return None
    return doc if isinstance(doc, str) else None


def _walk_module(modname: str, root: str) -> list[tuple[str, str]]:
    """(qualname, raw docstring) of the public members of one module, in walk order."""
    out: list[tuple[str, str]] = []
    try:
        mod = importlib.import_module(modname)
        names = sorted(vars(mod).items(), key=lambda kv: kv[0])
    except Exception as exc:
        raise ConfigError(f"corpus module {modname!r} cannot be imported ({exc}); install the package "
                          "or drop it from the packages argument") from exc
    for name, obj in names:
        if name.startswith("_") or not _is_member(obj) or not _owned(obj, root):
            continue
        if (doc := _getdoc(obj)) is not None:
            out.append((f"{modname}.{name}", doc))
        if inspect.isclass(obj):
            try:
                members = sorted(vars(obj).items(), key=lambda kv: kv[0])
            except Exception:
                continue
            for mname, raw in members:
                if mname.startswith("_"):
                    continue
                if not (inspect.isroutine(raw) or isinstance(raw, (classmethod, staticmethod, property))):
                    continue
                member = raw.__func__ if isinstance(raw, (classmethod, staticmethod)) else raw
                if _foreign(member.fget if isinstance(member, property) else member, root):
                    continue  # patched in by another library (e.g. transformers on logging.Logger)
                if (mdoc := _getdoc(member)) is not None:
                    out.append((f"{modname}.{name}.{mname}", mdoc))
    return out


def docstring_corpus(packages: Sequence[str] = DEFAULT_PACKAGES, *, min_chars: int = MIN_CHARS,
                     max_chars: int = MAX_CHARS, per_package: int | None = None, seed: int = 0) -> list[DocText]:
    """Docstrings of ``packages`` as labelled texts, built as the module docstring describes.

    Deterministic for a given environment. Raises ConfigError for an unknown package, bad
    lengths or a non-positive ``per_package``.
    """
    packages = tuple(packages)
    unknown = [p for p in packages if p not in PACKAGE_MODULES]
    if unknown:
        raise ConfigError(f"unknown corpus package {unknown[0]!r}; choose from {', '.join(PACKAGE_MODULES)}")
    if len(set(packages)) != len(packages):
        raise ConfigError(f"corpus packages {packages} repeat a name; list each package once")
    if not (1 <= min_chars <= max_chars):
        raise ConfigError(f"need 1 <= min_chars <= max_chars, got min_chars={min_chars}, max_chars={max_chars}")
    if per_package is not None and per_package < 1:
        raise ConfigError(f"per_package={per_package} must be >= 1 (or None for everything)")

    found: list[DocText] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for pkg in packages:
            root = _root(PACKAGE_MODULES[pkg][0])
            for modname in PACKAGE_MODULES[pkg]:
                for qualname, doc in _walk_module(modname, root):
                    text = normalise(doc, max_chars)
                    if len(text) >= min_chars:
                        found.append(DocText(text, pkg, qualname))

    owners: dict[str, set[str]] = {}
    for d in found:
        owners.setdefault(d.text, set()).add(d.package)
    seen: set[str] = set()
    items: list[DocText] = []
    for d in found:
        if len(owners[d.text]) == 1 and d.text not in seen:
            seen.add(d.text)
            items.append(d)

    if per_package is not None:
        rng = np.random.default_rng(seed)
        keep: set[int] = set()
        for pkg in packages:
            idx = [i for i, d in enumerate(items) if d.package == pkg]
            if len(idx) > per_package:
                idx = sorted(rng.choice(idx, size=per_package, replace=False).tolist())
            keep.update(idx)
        items = [d for i, d in enumerate(items) if i in keep]
    return items


def split(items: Sequence[T], fractions: Sequence[float], seed: int = 0, *,
          by: Callable[[T], Hashable] | None = None) -> tuple[list[T], ...]:
    """Shuffle ``items`` with ``default_rng(seed)`` and cut them into ``len(fractions)`` parts.

    Part k gets ``floor(n · cumsum(fractions)[k]) − floor(n · cumsum(fractions)[k−1])`` items,
    so the parts are disjoint and, when the fractions sum to 1, cover every item. With
    ``by`` the cut is made within each group (e.g. ``by=lambda d: d.package``: stratified)
    and the parts are concatenated in first-appearance order of the groups. Items keep
    their shuffled order inside a part.
    """
    fr = [float(f) for f in fractions]
    if not fr or any(not (f > 0) for f in fr) or sum(fr) > 1 + 1e-9:
        raise ConfigError(f"split fractions {list(fractions)} must be positive and sum to at most 1")
    rng = np.random.default_rng(seed)
    groups: dict[Hashable, list[T]] = {}
    for it in items:
        groups.setdefault(by(it) if by is not None else None, []).append(it)
    parts: list[list[T]] = [[] for _ in fr]
    bounds = np.cumsum([0.0, *fr])
    for members in groups.values():
        order = rng.permutation(len(members))
        cuts = np.floor(bounds * len(members) + 1e-9).astype(int)
        for k in range(len(fr)):
            parts[k].extend(members[i] for i in order[cuts[k]:cuts[k + 1]])
    return tuple(parts)
