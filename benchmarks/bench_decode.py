"""Decode micro-benchmark: tokens/s at batch 1 and 8 for the default model through the engine,
and the ratio to this machine's memory-bandwidth roofline (weight bytes per token over the copy
bandwidth measured in the same run with a large numpy/jax copy).

    .venv/bin/python benchmarks/bench_decode.py [--model PATH] [--dtype float32] [--decode-tokens 64]

Each rate is the median of --repeats runs of `batch / mean TPOT` over greedy requests with
16-token prompts.
"""

from __future__ import annotations

import argparse

from jaxinfer.bench import latency
from jaxinfer.bench.device_probe import copy_bandwidth
from jaxinfer.engine.create import create_engine

BATCH_SIZES = (1, 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint or engine directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"])
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    engine = create_engine(args.model, dtype=args.dtype, max_num_seqs=max(BATCH_SIZES), max_num_batched_tokens=128,
                           max_model_len=512, kv_memory="256MiB")
    latency.decode_rate(engine, 1, 16, 8, repeats=1, seed=999)  # warm-up
    bandwidth = copy_bandwidth()
    stream_rate = latency.bandwidth_roofline(engine, bandwidth)
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s -> batch-1 roofline {stream_rate:.1f} tokens/s "
          f"({engine.engine_cfg.dtype} weights)")
    for batch in BATCH_SIZES:
        rate = latency.decode_rate(engine, batch, 16, args.decode_tokens, args.repeats, seed=batch * 100)
        print(f"batch {batch}: {rate:7.1f} tokens/s  ({rate / stream_rate:.2f} of the batch-1 bandwidth roofline)")


if __name__ == "__main__":
    main()
