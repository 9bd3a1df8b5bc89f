"""The SAE's text: the deterministic docstring corpus (``analysis.corpus.docstring_corpus``) cut
by package into a train part and a held-out eval part (``sae_corpus``)."""

from __future__ import annotations

from analysis.errors import ConfigError


def sae_corpus(split: str = "train", *, eval_fraction: float = 0.1, seed: int = 0,
               per_package: int | None = None) -> list:
    """Docstring texts for SAE work: ``split`` = "train", "eval" or "all".

    The corpus (``docstring_corpus(per_package=per_package, seed=seed)``) is cut per package
    with ``analysis.corpus.split(items, (1 - eval_fraction, eval_fraction), seed, by=package)``;
    train and eval are disjoint and deterministic.
    """
    from analysis.corpus import docstring_corpus
    from analysis.corpus import split as cut

    if split not in ("train", "eval", "all"):
        raise ConfigError(f"corpus split {split!r} is unknown; choose 'train', 'eval' or 'all'")
    if not (0 < eval_fraction < 1):
        raise ConfigError(f"eval_fraction={eval_fraction} must be in (0, 1); e.g. 0.1")
    docs = docstring_corpus(per_package=per_package, seed=seed)
    if split == "all":
        return docs
    train, held = cut(docs, (1 - eval_fraction, eval_fraction), seed, by=lambda d: d.package)
    return train if split == "train" else held
