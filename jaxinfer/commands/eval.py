"""`jaxinfer eval perplexity ENGINE_OR_MODEL [--quant MODE] [--reference MODEL]`: perplexity over
the held-out corpus windows and mean KL divergence from the unquantized model.

`add_eval_parsers(subparsers)` registers `eval` on the CLI; the work runs in jaxinfer.eval.report.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jaxinfer.commands.arg_types import existing_file, positive
from jaxinfer.engine.config import DTYPES, KV_DTYPES
from jaxinfer.eval.corpus import DEFAULT_WINDOW_LEN, DEFAULT_WINDOWS, HELDOUT
from jaxinfer.quant.apply import QUANT_MODES


def add_eval_parsers(subparsers) -> None:
    evaluation = subparsers.add_parser("eval", help="model quality: perplexity and KL vs the unquantized model")
    kinds = evaluation.add_subparsers(dest="eval_command", required=True)
    perplexity = kinds.add_parser("perplexity", help="perplexity over data/corpus/heldout.txt windows, mean KL")
    perplexity.add_argument("model", nargs="?", help="engine directory, HF directory or .gguf (default: SmolLM2)")
    perplexity.add_argument("--quant", choices=list(QUANT_MODES), help="quantize a checkpoint on the fly")
    perplexity.add_argument("--reference", help="unquantized model for KL (default: the engine's source / the model)")
    perplexity.add_argument("--windows", type=positive(int), default=DEFAULT_WINDOWS, help="number of windows")
    perplexity.add_argument("--window-len", type=positive(int), default=DEFAULT_WINDOW_LEN, help="tokens per window")
    perplexity.add_argument("--dtype", choices=list(DTYPES), help="a checkpoint's dtype (default float32)")
    perplexity.add_argument("--kv-dtype", choices=["auto", *KV_DTYPES],
                            help="K/V storage of the model, as `jaxinfer build --kv-dtype` (default: engine.yaml's)")
    perplexity.add_argument("--text", type=existing_file,
                            help="plain-text file to evaluate on (default: data/corpus/heldout.txt)")
    perplexity.add_argument("--output", type=Path, help="write the figures as JSON")
    perplexity.set_defaults(run="jaxinfer.commands.eval:perplexity_main")


def perplexity_main(args) -> None:
    from jaxinfer.eval.report import perplexity_report

    report = perplexity_report(args.model, args.quant, args.reference, args.windows, args.window_len, args.dtype,
                               args.text or HELDOUT, kv_dtype=args.kv_dtype)
    kl = "n/a" if report["mean_kl"] is None else f"{report['mean_kl']:.5f}"
    print(f"perplexity {report['perplexity']:.4f} (mean NLL {report['mean_nll']:.4f} over {report['predictions']} "
          f"predictions), mean KL vs unquantized {kl}, weights {report['weight_bytes'] / 2**20:.1f} MiB, "
          f"K/V stored as {report['kv_dtype']}")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.output}", file=sys.stderr)
