"""Perplexity and KL evaluation: checked against numpy log-softmax of the contiguous reference's
logits, and end to end through the `eval perplexity` parser."""

import argparse
import functools
import json

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CHECKPOINTS_DIR
from jaxinfer.checkpoint import load_checkpoint
from jaxinfer.commands.eval import add_eval_parsers
from jaxinfer.errors import RequestError
from jaxinfer.eval.corpus import HELDOUT, corpus_windows
from jaxinfer.eval.perplexity import evaluate
from jaxinfer.model.llama import compute_logits, forward
from jaxinfer.model.sharding import make_mesh, place_params
from jaxinfer.quant.apply import quantize_params
from jaxinfer.reference import ContiguousKV, ReferenceGenerator, contiguous_attend

CHECKPOINT = CHECKPOINTS_DIR / "tiny-llama3"


@pytest.fixture(scope="module")
def checkpoint():
    return load_checkpoint(CHECKPOINT)


@pytest.fixture(scope="module")
def windows(checkpoint):
    return corpus_windows(checkpoint.tokenizer, HELDOUT, 24, 3)


def numpy_log_probs(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def test_perplexity_is_exp_mean_nll_of_the_reference_logits(checkpoint, windows):
    params, cfg = place_params(checkpoint.params, checkpoint.config, make_mesh(1), "float32")
    log_probs = numpy_log_probs(ReferenceGenerator(params, cfg, max_len=windows.shape[1]).prompt_logits(windows))
    nll = -np.take_along_axis(log_probs[:, :-1], windows[:, 1:, None], axis=-1)
    result = evaluate(params, cfg, windows, batch_size=2)
    assert result.num_predictions == nll.size
    np.testing.assert_allclose(result.perplexity, np.exp(nll.mean()), rtol=1e-5)
    assert result.mean_kl is None


def test_kl_against_the_unquantized_model(checkpoint, windows):
    cfg = checkpoint.config
    params, _ = place_params(checkpoint.params, cfg, make_mesh(1), "float32")
    # int4: far enough from the float model that KL's direction shows (int8's KL is symmetric to
    # well within the tolerance).
    quantized, _ = place_params(quantize_params(checkpoint.params, cfg, "int4"), cfg, make_mesh(1), "float32")
    reference = numpy_log_probs(ReferenceGenerator(params, cfg, max_len=windows.shape[1]).prompt_logits(windows))
    model = numpy_log_probs(ReferenceGenerator(quantized, cfg, max_len=windows.shape[1]).prompt_logits(windows))
    expected = (np.exp(reference) * (reference - model))[:, :-1].sum(axis=-1).mean()
    reverse = (np.exp(model) * (model - reference))[:, :-1].sum(axis=-1).mean()
    assert not np.isclose(reverse, expected, rtol=1e-3, atol=1e-7)
    result = evaluate(quantized, cfg, windows, reference_params=params)
    assert result.mean_kl > 0
    np.testing.assert_allclose(result.mean_kl, expected, rtol=1e-3, atol=1e-7)
    assert evaluate(params, cfg, windows, reference_params=params).mean_kl == pytest.approx(0.0, abs=1e-7)


def test_kv_dtype_rounds_the_models_keys_and_values_as_its_pool_stores_them(checkpoint, windows):
    """bfloat16 K/V under a float32 model: the same perplexity as the forward over contiguous caches
    held in bfloat16 (which round each row as it is written), not the float32 one; float32 K/V
    change nothing."""
    params, cfg = place_params(checkpoint.params, checkpoint.config, make_mesh(1), "float32")
    tokens = jnp.asarray(windows, jnp.int32)
    cache_shape = (*tokens.shape, cfg.num_kv_heads, cfg.head_dim)
    caches = [ContiguousKV(jnp.zeros(cache_shape, jnp.bfloat16), jnp.zeros(cache_shape, jnp.bfloat16))
              for _ in range(cfg.num_layers)]
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    attend = functools.partial(contiguous_attend, start=jnp.int32(0), sm_scale=cfg.head_dim ** -0.5)
    hidden, _ = forward(params, cfg, tokens, positions, caches, attend)
    log_probs = numpy_log_probs(np.asarray(compute_logits(params, hidden)))
    nll = -np.take_along_axis(log_probs[:, :-1], windows[:, 1:, None], axis=-1)
    plain = evaluate(params, cfg, windows)
    rounded = evaluate(params, cfg, windows, reference_params=params, kv_dtype="bfloat16")
    np.testing.assert_allclose(rounded.perplexity, np.exp(nll.mean()), rtol=1e-5)
    assert rounded.perplexity != plain.perplexity and rounded.mean_kl > 0
    assert evaluate(params, cfg, windows, kv_dtype="float32").perplexity == plain.perplexity


def test_eval_perplexity_command_writes_json(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_eval_parsers(parser.add_subparsers())
    output = tmp_path / "ppl.json"
    args = parser.parse_args(["eval", "perplexity", str(CHECKPOINT), "--quant", "int8", "--windows", "2",
                              "--window-len", "16", "--kv-dtype", "bfloat16", "--output", str(output)])
    module_name, function_name = args.run.split(":")
    getattr(__import__(module_name, fromlist=[function_name]), function_name)(args)
    report = json.loads(output.read_text())
    assert report["quant"] == "int8" and report["kv_dtype"] == "bfloat16" and report["predictions"] == 2 * 15
    assert report["mean_kl"] > 0 and report["perplexity"] > 1
    assert "perplexity" in capsys.readouterr().out


@pytest.mark.parametrize("window_len, num_windows, message", [
    (1, 3, "ask for at least one window of at least 2 tokens"),
    (256, 10**6, "ask for fewer or shorter windows"),
])
def test_corpus_windows_refuse_what_cannot_be_scored(checkpoint, window_len, num_windows, message):
    with pytest.raises(RequestError, match=message):
        corpus_windows(checkpoint.tokenizer, HELDOUT, window_len, num_windows)
