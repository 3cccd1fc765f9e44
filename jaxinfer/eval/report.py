"""Perplexity of a model as served (an engine directory, or a checkpoint quantized on the fly)
and its KL divergence from the unquantized model: the work behind `jaxinfer eval perplexity`.

    perplexity_report(model, quant=None, reference=None, ...) -> dict (JSON-ready)

The unquantized reference defaults to the engine's source checkpoint (engine directory) or to the
same checkpoint (with --quant). Both run on one device in the same dtype, through the pure
forward of jaxinfer.eval.perplexity, over the first `num_windows` windows of the held-out text; the
model's K/V are rounded as its KV pool stores them (the reference's are not).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from jaxinfer.checkpoint import load_checkpoint
from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.create import is_engine_dir, refuse_build_options, serving_params
from jaxinfer.eval.corpus import DEFAULT_WINDOW_LEN, DEFAULT_WINDOWS, HELDOUT, corpus_windows
from jaxinfer.errors import EngineError
from jaxinfer.eval.perplexity import evaluate
from jaxinfer.model.sharding import make_mesh
from jaxinfer.quant.apply import weight_bytes

def _checkpoint_params(checkpoint, engine_cfg: EngineConfig, progress: bool):
    return serving_params(checkpoint, dataclasses.replace(engine_cfg, tp=1), make_mesh(1), progress)


def perplexity_report(model: str | Path | None, quant: str | None = None, reference: str | Path | None = None,
                      num_windows: int = DEFAULT_WINDOWS, window_len: int = DEFAULT_WINDOW_LEN,
                      dtype: str | None = None, text: str | Path = HELDOUT, progress: bool = True,
                      kv_dtype: str | None = None) -> dict:
    """dtype: the params' dtype for a checkpoint (float32 when None); an engine has its own.
    kv_dtype: how the K/V of the model under evaluation are stored (an engine's own; for a
    checkpoint, engine.yaml's default when None, resolved as `jaxinfer build` resolves it)."""
    if is_engine_dir(model):
        refuse_build_options(model, quant=quant, dtype=dtype)
        from jaxinfer.engine.artifact import load_engine_weights

        manifest, cfg, engine_cfg, _, params = load_engine_weights(Path(model))
        if kv_dtype not in (None, engine_cfg.kv_dtype):
            raise EngineError(f"{model} stores its K/V as {engine_cfg.kv_dtype}, fixed when it was built; drop "
                              "--kv-dtype, or evaluate the checkpoint with --quant and --kv-dtype")
        quant, dtype = engine_cfg.quant, engine_cfg.dtype
        reference_checkpoint = load_checkpoint(reference or manifest["source"])
    else:
        checkpoint = load_checkpoint(model)
        dtype = dtype or "float32"
        engine_cfg = EngineConfig.create(dtype=dtype, quant=quant, kv_dtype=kv_dtype)
        params, cfg = _checkpoint_params(checkpoint, engine_cfg, progress)
        reference_checkpoint = load_checkpoint(reference) if reference else checkpoint
    windows = corpus_windows(reference_checkpoint.tokenizer, text, window_len, num_windows)
    reference_params = None
    if quant or reference:
        reference_params, reference_cfg = _checkpoint_params(reference_checkpoint, EngineConfig.create(dtype=dtype),
                                                             progress)
        if reference_cfg != cfg:
            raise EngineError(f"the reference model {reference_checkpoint.source} has another configuration than "
                              f"{model} (or padded heads from a tensor-parallel build); pass --reference the "
                              "checkpoint the engine was built from, or evaluate a tp=1 engine")
    start = time.perf_counter()
    result = evaluate(params, cfg, windows, reference_params, kv_dtype=engine_cfg.kv_dtype)
    return {"model": str(model), "quant": quant, "dtype": dtype, "kv_dtype": engine_cfg.kv_dtype,
            "text": str(text), "windows": num_windows,
            "window_len": window_len, "predictions": result.num_predictions, "perplexity": result.perplexity,
            "mean_nll": result.mean_nll, "mean_kl": result.mean_kl, "weight_bytes": weight_bytes(params),
            "seconds": time.perf_counter() - start}
