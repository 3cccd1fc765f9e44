#!/usr/bin/env bash
# The GPU checks and benchmarks of issue 7 in one run, for a machine with one NVIDIA GPU and jax[cuda]:
#   1. the Pallas kernels compiled for the GPU against their references (the kernel tests, which run
#      interpret mode on CPU and the compiled kernels on a GPU),
#   2. bench latency and bench throughput on random weights of the default model's shape and of
#      Llama-3-8B's (configs/models/; speed depends on the shape alone),
#   3. where a batch-1 decode step's time goes on the device (benchmarks/profile_step.py), and the
#      host's work per decode step at batches up to 256 on the default model's shape
#      (benchmarks/bench_host_step.py).
# Each step has its own time limit and log, so one failure does not hide the others.
#
#   scripts/gpu_benchmarks.sh [RESULTS_DIR] [STEPS]     (default: results/gpu, all steps)
# STEPS is a comma-separated subset of:
#   kernels,attention,latency,latency8b,throughput8b,throughput,serve8b,profile,profile8b,host
set -u
out=${1:-results/gpu}
steps=${2:-kernels,attention,latency,latency8b,throughput8b,throughput,serve8b,profile,profile8b,host}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
jaxinfer=("$py" -m jaxinfer.cli)
smollm2=random:configs/models/smollm2-135m
llama8b=random:configs/models/llama3-8b

step() {  # step NAME SECONDS COMMAND...: runs COMMAND if NAME is among STEPS, logs to $out/NAME[-ATTENTION].log
    local name=$1 seconds=$2
    shift 2
    case ",$steps," in *",$name,"*) ;; *) return 0 ;; esac
    local start=$SECONDS log="$out/$name${JAXINFER_ATTENTION:+-$JAXINFER_ATTENTION}.log"
    timeout "$seconds" "$@" >"$log" 2>&1
    local rc=$?
    echo "== $name${JAXINFER_ATTENTION:+ (attention: $JAXINFER_ATTENTION)}: exit $rc in $((SECONDS - start)) s (limit $seconds s)"
    grep -v -e "compiling buckets" -e "Warning" "$log" | tail -n 14
    return $rc
}

model_step() {  # step; if it failed (not by its time limit), once more with the XLA attention path
    step "$@"
    local rc=$?
    if [ $rc -ne 0 ] && [ $rc -ne 124 ]; then JAXINFER_ATTENTION=xla step "$@"; fi
}

nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader
"$py" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"

# With pytest-xdist the tests share the GPU among workers: no preallocation of 75% of its memory
# per process.
workers=()
"$py" -c "import xdist" 2>/dev/null && workers=(-n 12)
step kernels 150 env XLA_PYTHON_CLIENT_PREALLOCATE=false "$py" -m pytest -q "${workers[@]}" -p no:cacheprovider \
    tests/test_ragged_paged_attention.py tests/test_quant_kernels.py
step attention 90 "$py" benchmarks/bench_paged_attention.py --batches 1,32,256 --contexts 512,4096 \
    --prefill-lens 512,4096 --kv-dtype bfloat16 --rounds 30
model_step latency 120 "${jaxinfer[@]}" bench latency "$smollm2" --prompt-lens 128,512 --batch-sizes 1,8,32 \
    --decode-tokens 64 --kv-memory 8GiB --output "$out/latency_smollm2.json"
model_step latency8b 180 "${jaxinfer[@]}" bench latency "$llama8b" --prompt-lens 128,1024 --batch-sizes 1,8,64 \
    --decode-tokens 64 --max-num-batched-tokens 1024 --kv-memory 8GiB --output "$out/latency_llama3_8b.json"
model_step throughput8b 240 "${jaxinfer[@]}" bench throughput "$llama8b" --num-requests 1024 --input-len 128 \
    --output-len 128 --max-num-seqs 256 --max-num-batched-tokens 4096 --kv-memory 16GiB --baseline static \
    --output "$out/throughput_llama3_8b_128.json"
model_step throughput 150 "${jaxinfer[@]}" bench throughput "$smollm2" --max-num-seqs 256 --max-num-batched-tokens 4096 \
    --kv-memory 16GiB --baseline static --output "$out/throughput_smollm2.json"
model_step serve8b 200 "${jaxinfer[@]}" bench serve "$llama8b" --request-rate 4,16,64 --num-requests 96 \
    --input-len 64:256 --output-len 32:128 --max-num-seqs 256 --max-num-batched-tokens 2048 \
    --kv-memory 16GiB --baseline static --output "$out/serve_llama3_8b.json"
# The traces stay on the machine (large); the logs hold the per-kernel summary.
model_step profile 120 "$py" benchmarks/profile_step.py "$smollm2" --batch 1 --steps 30 --kv-memory 1GiB \
    --trace-dir /tmp/jaxinfer-trace
model_step profile8b 180 "$py" benchmarks/profile_step.py "$llama8b" --batch 1 --steps 30 --kv-memory 4GiB \
    --trace-dir /tmp/jaxinfer-trace8b
model_step host 150 "$py" benchmarks/bench_host_step.py --config configs/models/smollm2-135m --batch-sizes 1,32,256 \
    --steps 30 --kv-memory 8GiB --top 20
