"""Perplexity and KL evaluation: checked against numpy log-softmax of the contiguous reference's
logits, and end to end through the `eval perplexity` parser."""

import argparse
import json

import numpy as np
import pytest

from conftest import CHECKPOINTS_DIR
from jaxinfer.checkpoint import load_checkpoint
from jaxinfer.commands.eval import add_eval_parsers
from jaxinfer.eval.corpus import HELDOUT, corpus_windows
from jaxinfer.eval.perplexity import evaluate
from jaxinfer.model.sharding import make_mesh, place_params
from jaxinfer.quant.apply import quantize_params
from jaxinfer.reference import ReferenceGenerator

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


def test_eval_perplexity_command_writes_json(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_eval_parsers(parser.add_subparsers())
    output = tmp_path / "ppl.json"
    args = parser.parse_args(["eval", "perplexity", str(CHECKPOINT), "--quant", "int8", "--windows", "2",
                              "--window-len", "16", "--output", str(output)])
    module_name, function_name = args.run.split(":")
    getattr(__import__(module_name, fromlist=[function_name]), function_name)(args)
    report = json.loads(output.read_text())
    assert report["quant"] == "int8" and report["predictions"] == 2 * 15
    assert report["mean_kl"] > 0 and report["perplexity"] > 1
    assert "perplexity" in capsys.readouterr().out
