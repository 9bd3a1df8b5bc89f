#!/usr/bin/env bash
# Build the SAELens peer environment for `python -m benchmarks.sae` and the SAELens format tests.
#
#   bash benchmarks/saelens_env.sh            # creates /work/main/.venv-saelens (idempotent)
#
# sae-lens 6.x pins TransformerLens 3.x and transformers 4.x, so it lives in its own venv
# (`.venv-saelens/`, gitignored), never in the project's `.venv`. torch is installed first and
# stays pinned on every pip command line so pip never resolves another torch.
# Override the location with SAELENS_VENV=/path and the version with SAELENS_VERSION=6.x.y.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${SAELENS_VENV:-$PWD/.venv-saelens}"
SAELENS_VERSION="${SAELENS_VERSION:-6.54.12}"
TORCH="torch==2.13.0"
STAMP="$VENV/.installed-sae-lens-$SAELENS_VERSION"

if [[ -f "$STAMP" ]] && "$VENV/bin/python" -c "import sae_lens" 2>/dev/null; then
    echo "saelens_env: $VENV already has sae-lens $SAELENS_VERSION"
    exit 0
fi

[[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "$TORCH"
"$VENV/bin/pip" install -q "$TORCH" "sae-lens==$SAELENS_VERSION"
# wandb is imported by sae_lens but the peer runs with logging off; keep it from phoning home.
"$VENV/bin/python" - <<'EOF'
import os
os.environ.setdefault("WANDB_MODE", "disabled")
import sae_lens, torch, transformer_lens
print(f"saelens_env: sae_lens {sae_lens.__version__}, torch {torch.__version__}, "
      f"transformer_lens {getattr(transformer_lens, '__version__', '?')}")
assert torch.__version__.startswith("2.13.0"), torch.__version__
EOF
touch "$STAMP"
