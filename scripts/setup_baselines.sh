#!/usr/bin/env bash
# Creates the baseline environment for `jaxinfer bench ... --baseline hf`: .venv-hf, a Python 3.11
# venv with CPU torch + transformers (+ gguf, so HF can load the default model's GGUF file).
# torch is never a dependency of jaxinfer itself; the bench commands run the baseline as a
# subprocess with `--hf-python .venv-hf/bin/python`.
#
# The pins and the stamp file are those of scripts/make_goldens.sh, so the two scripts share one venv.
# torch==2.13.0+cpu comes from the wheel in /opt/wheels on the project's machines; elsewhere export
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu (the +cpu pin refuses CUDA builds).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-hf
STAMP="$VENV/.installed"
REQUIREMENTS=(
  "torch==2.13.0+cpu"
  "transformers==5.23.0"
  "accelerate==1.15.0"
  "gguf==0.19.0"
  "safetensors==0.8.0"
  "tokenizers==0.23.3"
  "numpy==2.4.6"
  "jinja2==3.1.6"
)

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "${REQUIREMENTS[*]}" ]]; then
  echo "$VENV is up to date"
  exit 0
fi
PYTHON311=$(command -v python3.11) || { echo "error: python3.11 not found (torch's CPU wheel here is cp311)" >&2; exit 1; }
test -x "$VENV/bin/python" || "$PYTHON311" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "${REQUIREMENTS[@]}"
"$VENV/bin/python" -c 'import sys, torch; sys.exit(f"error: torch {torch.__version__} has CUDA" if torch.version.cuda else 0)'
echo "${REQUIREMENTS[*]}" > "$STAMP"
echo "baseline env ready: use --hf-python $VENV/bin/python"
