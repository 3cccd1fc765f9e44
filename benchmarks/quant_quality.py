"""Quality and speed of every quantization mode on the default model (or --model), one command:

    .venv/bin/python benchmarks/quant_quality.py [--windows 16] [--decode-tokens 32]

Per mode (unquantized first, the baseline of the same run): linear+embedding weight bytes,
perplexity over the held-out windows, its change vs unquantized, mean KL(unquantized || mode),
and decode tokens/s through the engine (`LLM.generate`, greedy, ignore_eos) at batch 1 and 16:
the batch divided by the median time per output token after the first (TPOT), after a warm-up
generate. Writes benchmarks/results/quant_quality.{md,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

from jaxinfer.checkpoint import load_checkpoint
from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.create import serving_params
from jaxinfer.eval.corpus import DEFAULT_WINDOW_LEN, DEFAULT_WINDOWS, HELDOUT, corpus_windows
from jaxinfer.eval.perplexity import evaluate
from jaxinfer.llm import LLM
from jaxinfer.model.sharding import make_mesh
from jaxinfer.quant.apply import QUANT_MODES, weight_bytes
from jaxinfer.sampling_params import SamplingParams

RESULTS = Path(__file__).parent / "results"
BATCHES = (1, 16)
ENGINE = dict(dtype="float32", max_num_seqs=16, max_num_batched_tokens=64, max_model_len=256, kv_memory="64MiB")


def decode_tokens_per_second(llm: LLM, batch: int, tokens: int) -> float:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    prompts = [f"Story {i}: once upon a time" for i in range(batch)]
    llm.generate(prompts, params)
    outputs = llm.generate(prompts, params)
    tpots = [(o.metrics.last_token_time - o.metrics.first_token_time) / (tokens - 1) for o in outputs]
    return batch / statistics.median(tpots)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF directory or .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--windows", type=int, default=DEFAULT_WINDOWS)
    parser.add_argument("--window-len", type=int, default=DEFAULT_WINDOW_LEN)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--modes", default=",".join(["none", *QUANT_MODES]))
    args = parser.parse_args()
    checkpoint = load_checkpoint(args.model)
    windows = corpus_windows(checkpoint.tokenizer, HELDOUT, args.window_len, args.windows)
    rows, reference = [], None
    for mode in args.modes.split(","):
        quant = None if mode == "none" else mode
        engine_cfg = dataclasses.replace(EngineConfig.create(quant=quant, **ENGINE), tp=1)
        params, cfg = serving_params(checkpoint, engine_cfg, make_mesh(1))
        result = evaluate(params, cfg, windows, reference, kv_dtype=engine_cfg.kv_dtype)
        if reference is None:
            reference, baseline = params, result.perplexity
        llm = LLM(args.model, progress=False, quant=quant, **ENGINE)
        row = {"mode": mode, "weight_bytes": weight_bytes(params), "perplexity": result.perplexity,
               "delta_pct": 100 * (result.perplexity / baseline - 1), "mean_kl": result.mean_kl or 0.0,
               **{f"decode_tps_batch{b}": decode_tokens_per_second(llm, b, args.decode_tokens) for b in BATCHES}}
        print(row, flush=True)
        rows.append(row)
        del llm
    RESULTS.mkdir(exist_ok=True)
    meta = {"model": checkpoint.source, "windows": args.windows, "window_len": args.window_len,
            "predictions": result.num_predictions, "engine": ENGINE, "decode_tokens": args.decode_tokens}
    (RESULTS / "quant_quality.json").write_text(json.dumps({"settings": meta, "rows": rows}, indent=2))
    lines = [f"# Quantization quality and speed ({checkpoint.source})", "",
             f"{args.windows} x {args.window_len}-token held-out windows; decode through the engine, f32 "
             "activations, greedy; 2-core shared CPU.", "",
             "| mode | weight MiB | perplexity | delta vs unquantized | mean KL | decode tok/s b=1 | decode tok/s b=16 |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['mode']} | {r['weight_bytes'] / 2**20:.1f} | {r['perplexity']:.3f} | {r['delta_pct']:+.2f}% | "
              f"{r['mean_kl']:.4f} | {r['decode_tps_batch1']:.1f} | {r['decode_tps_batch16']:.1f} |" for r in rows]
    (RESULTS / "quant_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
