"""Make ``examples/figures/steering_dose_response.png``: measured dose-response of two steering vectors.

    .venv/bin/python examples/steering_figure.py [--out examples/figures/steering_dose_response.png]

Left: ``bilinear-lm`` (trained on first use, ~2 min), the numpy→torch vector (mean difference,
resid_post of layer 0, last token) added as α·‖h‖·v̂: log-probability of torch / numpy concept
tokens and KL to the unsteered model on the 12 held-out pairs. Right: MiniLM, the
negative→positive vector (layer 3, mean over tokens) added as α·v: cosine shift of held-out
negative sentences toward the positive class and the masked-token loss (MiniLM's MLM head is
trained once on first use). Uses the store like the API; matplotlib draws the static PNG.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from app import api

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).with_name("figures") / "steering_dose_response.png"))
    args = ap.parse_args()

    lm_ext = api.steer_extract("bilinear-lm", "numpy-torch", position="last")
    lm = api.steer_dose("bilinear-lm", api.steer_vector(lm_ext, 0), "numpy-torch", scale="norm",
                        alphas=(-0.6, -0.4, -0.2, -0.1, 0.0, 0.1, 0.2, 0.4, 0.6)).table
    enc_ext = api.steer_extract("minilm", "positive-negative", position="mean")
    enc = api.steer_dose("minilm", api.steer_vector(enc_ext, 3), "positive-negative",
                         alphas=(-4, -2, -1, 0, 1, 2, 4), capability=True).table

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6), dpi=100)
    a.plot(lm["alpha"], lm["logp_pos"], "o-", color="#d6604d", label="log p(torch tokens)")
    a.plot(lm["alpha"], lm["logp_neg"], "s-", color="#4393c3", label="log p(numpy tokens)")
    a.set_xlabel("α (fraction of each token's norm)")
    a.set_ylabel("nats, mean over held-out positions")
    a.set_title("bilinear-lm · numpy→torch · layer 0", fontsize=10)
    a2 = a.twinx()
    a2.plot(lm["alpha"], lm["kl"], ":", color="#636363", label="KL to unsteered")
    a2.set_ylabel("KL (nats)", color="#636363")
    lines = a.get_legend_handles_labels()[0] + a2.get_legend_handles_labels()[0]
    a.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="upper left")
    b.plot(enc["alpha"], enc["shift"], "o-", color="#d6604d", label="Δ cos to positive class")
    b.plot(enc["alpha"], enc["margin"], "s-", color="#4393c3", label="cos(pos) − cos(neg)")
    b.set_xlabel("α (units of the mean class difference)")
    b.set_title("MiniLM · negative→positive · layer 3", fontsize=10)
    b2 = b.twinx()
    b2.plot(enc["alpha"], enc["masked_loss"], ":", color="#636363", label="masked-token loss")
    b2.set_ylabel("masked-token loss (nats)", color="#636363")
    lines = b.get_legend_handles_labels()[0] + b2.get_legend_handles_labels()[0]
    b.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="upper left")
    for ax in (a, b):
        ax.axvline(0, color="#999", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")
    print(lm.round(3).to_string(index=False))
    print(enc.round(4).to_string(index=False))


if __name__ == "__main__":
    main()
