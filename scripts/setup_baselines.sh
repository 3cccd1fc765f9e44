#!/usr/bin/env bash
# Creates the baseline environments for `jaxinfer bench ... --baseline hf|llamacpp`, each a Python
# 3.11 venv that the bench commands run as a subprocess (neither torch nor llama.cpp is ever a
# dependency of jaxinfer itself):
#
#   scripts/setup_baselines.sh [hf|llamacpp|all]     (default: hf, which make_goldens.sh relies on)
#
#   .venv-hf        CPU torch + transformers (+ gguf, so HF can load the default model's GGUF file);
#                   --hf-python .venv-hf/bin/python. Its pins and stamp are shared with
#                   scripts/make_goldens.sh, so the two scripts share one venv.
#                   torch==2.13.0+cpu comes from the wheel in /opt/wheels on the project's machines;
#                   elsewhere export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu (the
#                   +cpu pin refuses CUDA builds).
#   .venv-llamacpp  llama-cpp-python built from source for this host's CPU (10 CPU-minutes, 8-18
#                   minutes on the shared 2 cores; needs cmake and a C++ compiler);
#                   --llamacpp-python .venv-llamacpp/bin/python.
#
# Each venv has a stamp file holding its pins: an up-to-date venv is left alone (the stamp does not
# hold LLAMACPP_CMAKE_ARGS: delete .venv-llamacpp to rebuild with other ones).
set -euo pipefail
cd "$(dirname "$0")/.."

HF_REQUIREMENTS=(
  "torch==2.13.0+cpu"
  "transformers==5.23.0"
  "accelerate==1.15.0"
  "gguf==0.19.0"
  "safetensors==0.8.0"
  "tokenizers==0.23.3"
  "numpy==2.4.6"
  "jinja2==3.1.6"
)
LLAMACPP_REQUIREMENTS=(
  "llama-cpp-python==0.3.36"
)
# CPU only, tuned for this host's CPU (GGML_NATIVE): the venv is built on the machine it benchmarks,
# and llama.cpp at its best is the peer we compare against.
LLAMACPP_CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF"
# CPUs that report AMX: the project's Xeon VMs do, but ggml's AMX matmul dies there with SIGSEGV
# on the first prompt (the VM does not grant the tile state), so llama.cpp is built without it.
if grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
  NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  LLAMACPP_CMAKE_ARGS+=" -DCMAKE_C_FLAGS='$NO_AMX' -DCMAKE_CXX_FLAGS='$NO_AMX'"
fi

# make_venv VENV CHECK REQUIREMENT...: creates VENV with python3.11, installs the pinned
# requirements unless its stamp already lists them, runs the python snippet CHECK in it, stamps it.
make_venv() {
  local venv=$1 check=$2
  shift 2
  local stamp="$venv/.installed"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$*" ]]; then
    echo "$venv is up to date"
    return
  fi
  local python311
  python311=$(command -v python3.11) || { echo "error: python3.11 not found (torch's CPU wheel here is cp311; both baselines use it)" >&2; exit 1; }
  test -x "$venv/bin/python" || "$python311" -m venv "$venv"
  "$venv/bin/python" -m pip install -q "$@"
  "$venv/bin/python" -c "$check"
  echo "$*" > "$stamp"
  echo "baseline env ready: $venv/bin/python"
}

setup_hf() {
  make_venv .venv-hf \
    'import sys, torch; sys.exit(f"error: torch {torch.__version__} has CUDA" if torch.version.cuda else 0)' \
    "${HF_REQUIREMENTS[@]}"
}

setup_llamacpp() {
  command -v cmake >/dev/null || { echo "error: cmake not found (apt-get install cmake g++)" >&2; exit 1; }
  # No wheel cache: a cached build would ignore CMAKE_ARGS.
  CMAKE_ARGS="$LLAMACPP_CMAKE_ARGS" FORCE_CMAKE=1 PIP_NO_CACHE_DIR=1 make_venv .venv-llamacpp \
    'import llama_cpp; print("llama-cpp-python", llama_cpp.__version__, "ggml system info:", llama_cpp.llama_print_system_info().decode())' \
    "${LLAMACPP_REQUIREMENTS[@]}"
}

case "${1:-hf}" in
  hf) setup_hf ;;
  llamacpp) setup_llamacpp ;;
  all) setup_hf; setup_llamacpp ;;
  *) echo "usage: $0 [hf|llamacpp|all]" >&2; exit 2 ;;
esac
