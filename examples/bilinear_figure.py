"""Make ``examples/figures/bilinear_digits.png``: the digits model's top eigenvectors and its truncation curve.

    .venv/bin/python examples/bilinear_figure.py [--out examples/figures/bilinear_digits.png]

Uses the bundled ``bilinear-digits`` model (trained on first use, ~10 s) and the store, like the
API and the dashboard (matplotlib, a project dependency, draws the static PNG).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from app import api

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).with_name("figures") / "bilinear_digits.png"))
    args = ap.parse_args()
    trained = api.bilinear_train("digits")
    rep = api.bilinear_decompose(trained.path, direction="class:all")
    dec = rep.decomposition

    fig = plt.figure(figsize=(12, 2.9), dpi=100)
    grid = fig.add_gridspec(2, 13, width_ratios=[1] * 10 + [0.25, 2.6, 0.1], wspace=0.08, hspace=0.3)
    for c in range(10):
        pos, neg = api.bilinear_top(rep, c, 1)
        for row, idx in enumerate((pos, neg)):
            ax = fig.add_subplot(grid[row, c])
            ax.set_xticks([])
            ax.set_yticks([])
            if len(idx):
                img = rep.images[c, idx[0]]
                ax.imshow(img / np.abs(img).max(), cmap="RdBu_r", vmin=-1, vmax=1)
                ax.set_title(f"{c}: λ={dec.eigenvalues[c, idx[0]]:+.2f}", fontsize=7, pad=2)
            if c == 0:
                ax.set_ylabel("top +λ" if row == 0 else "top −λ", fontsize=8)
    ax = fig.add_subplot(grid[:, 11])
    tr = rep.truncation
    ks = np.asarray(tr.ks)
    ax.plot(ks, tr.accuracy, marker="o", ms=2.5, label="test accuracy")
    ax.plot(ks, tr.agreement, ls=":", label="agreement with full")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(0, ks[-1])
    ticks = [k for k in (0, 1, 2, 4, 8, 16, 32, 64, 128) if k <= ks[-1]]
    ax.set_xticks(ticks, [str(k) for k in ticks])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("eigenvectors kept per class (top |λ|)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"truncation (full: {tr.accuracy[-1]:.1%})", fontsize=9)
    fig.suptitle("Bilinear digits model: top eigenvector of each class readout, through the embedding (red +, "
                 "blue −)", fontsize=9, y=1.05)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    main()
