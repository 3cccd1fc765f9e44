"""The roofline calculator against counts re-derived from the model's own parameter shapes."""

import dataclasses
import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxinfer.bench import device_probe, roofline
from jaxinfer.bench.latency import kv_bytes_per_position, streamed_weight_bytes
from jaxinfer.cache.kv_pool import init_layer_cache
from jaxinfer.cli import _parser
from jaxinfer.commands.roofline import _model_and_dtypes, format_report
from jaxinfer.configs import default_dtype, default_kv_dtype
from jaxinfer.engine.config import KV_DTYPES
from jaxinfer.errors import RequestError
from jaxinfer.model.config import ModelConfig
from jaxinfer.model.llama import param_shapes
from jaxinfer.quant.apply import QUANT_MODES, quantize_params
from pallas_kernels import cpu_dense_dot

def random_config(rng: np.random.Generator, tie: bool) -> ModelConfig:
    kv_heads = int(rng.integers(1, 4))
    return ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=int(rng.integers(100, 1000)),
        hidden_size=int(rng.integers(16, 128)), intermediate_size=int(rng.integers(16, 256)),
        num_layers=int(rng.integers(1, 6)), num_heads=kv_heads * int(rng.integers(1, 4)),
        num_kv_heads=kv_heads, head_dim=int(rng.integers(4, 32)), rms_norm_eps=1e-5,
        rope_theta=1e4, max_position_embeddings=512, tie_word_embeddings=tie)


def all_shapes(cfg: ModelConfig) -> list[tuple[int, ...]]:
    shapes = param_shapes(cfg)
    return [s for k, s in shapes.items() if k != "layers"] + [s for layer in shapes["layers"] for s in layer.values()]


def matmul_flops_per_token_oracle(cfg: ModelConfig) -> int:
    """2 x in x out for every 2-D layer weight a token's hidden state is multiplied by."""
    return sum(2 * math.prod(s) for layer in param_shapes(cfg)["layers"] for s in layer.values() if len(s) == 2)


def logits_flops_oracle(cfg: ModelConfig) -> int:
    shapes = param_shapes(cfg)
    return 2 * math.prod(shapes.get("lm_head", shapes["embed"]))


def attention_flops_oracle(cfg: ModelConfig, query_positions: range) -> int:
    """Explicit loop: each query at position p scores and mixes p + 1 keys, in every head and layer."""
    total = 0
    for p in query_positions:
        for _ in range(cfg.num_layers * cfg.num_heads):
            total += 2 * cfg.head_dim * (p + 1) * 2
    return total


@pytest.mark.parametrize("tie", [True, False])
def test_counts_match_parameter_shapes(tie):
    rng = np.random.default_rng(7 + tie)
    for _ in range(5):
        cfg = random_config(rng, tie)
        assert roofline.weight_bytes(cfg, 2) == 2 * sum(math.prod(s) for s in all_shapes(cfg))
        context = int(rng.integers(1, 300))
        assert roofline.decode_flops_per_token(cfg, context) == (
            matmul_flops_per_token_oracle(cfg) + logits_flops_oracle(cfg)
            + attention_flops_oracle(cfg, range(context - 1, context)))
        prompt = int(rng.integers(1, 64))
        assert roofline.prefill_flops(cfg, prompt) == (
            prompt * matmul_flops_per_token_oracle(cfg) + logits_flops_oracle(cfg)
            + attention_flops_oracle(cfg, range(prompt)))


def test_default_model_kv_bytes_and_batch1_roofline():
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5,
                      rope_theta=1e5, max_position_embeddings=8192, tie_word_embeddings=True)
    # SmolLM2-135M: 2 (K, V) x 30 layers x 3 kv heads x 64 dims x 4 bytes.
    assert roofline.kv_bytes_per_token(cfg, 4) == 2 * 30 * 3 * 64 * 4
    device = roofline.Device(bandwidth_bytes_per_s=30e9, flops_per_s=100e9)
    report = roofline.roofline_report(cfg, device, batch=1, context_len=128, dtype="float32", kv_dtype="float32")
    # 134.5M f32 parameters streamed at 30 GB/s: about 56 tokens/s at batch 1 (the guide's figure).
    assert report["batch1_decode_bandwidth_bound_tokens_per_s"] == pytest.approx(30e9 / (4 * cfg.num_params))
    assert 55 < report["batch1_decode_bandwidth_bound_tokens_per_s"] < 57
    assert report["decode_step"]["bound"] == "bandwidth"
    # A decode step whose reads fit in the CPU's last-level cache is said to, since it can then beat the bound.
    note = "last-level cache, which can serve them faster"
    report["device"]["matmul_dtype"] = "given"
    step_bytes = report["decode_step"]["bytes"]
    for cache, noted in ((None, False), (step_bytes - 1, False), (step_bytes, True)):
        report["device"]["last_level_cache_bytes"] = cache
        assert (note in format_report(report)) == noted, cache


def test_step_estimates_take_the_slower_bound():
    cfg = random_config(np.random.default_rng(3), tie=False)
    device = roofline.Device(bandwidth_bytes_per_s=20e9, flops_per_s=50e9)
    for batch in (1, 4, 256):
        step = roofline.decode_step(cfg, device, batch, 100, 4, 2)
        kv_bytes = batch * 101 * roofline.kv_bytes_per_token(cfg, 2)
        assert step.bytes == roofline.weight_bytes(cfg, 4) + kv_bytes
        assert step.flops == batch * roofline.decode_flops_per_token(cfg, 101)
        assert step.time_s == max(step.flops / 50e9, step.bytes / 20e9)
        assert step.intensity == step.flops / step.bytes


@pytest.mark.skipif(not cpu_dense_dot.available(), reason="the CPU dense kernel does not run here")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("rows", [4, 32])
def test_matmul_probe_times_the_matmul_an_engine_step_runs(monkeypatch, dtype, rows):
    # The CPU kernel where a step would call it (a bfloat16 engine's prefill on AMX tiles, several
    # times faster than XLA's float32 dot that the probe once timed whatever the engine's dtype),
    # XLA's dot where the kernel does not take the rows.
    operands = []
    original = cpu_dense_dot.dense_dot

    def recording(x, w, live_rows=None):
        operands.append((x.shape, x.dtype, w.shape, w.dtype))
        return original(x, w, live_rows)

    monkeypatch.setattr(cpu_dense_dot, "dense_dot", recording)
    assert device_probe.matmul_rate(dtype, rows=rows, k=64, n=96, repeats=1) > 0
    served = cpu_dense_dot.serves(rows, jax.numpy.zeros((64, 96), dtype))
    assert operands == ([((rows, 64), np.dtype(dtype), (64, 96), np.dtype(dtype))] if served else [])


@pytest.mark.parametrize("tie", [True, False])
def test_streamed_weight_bytes_count_stored_formats_and_skip_a_lookup_table_that_is_not_the_head(tie):
    rng = np.random.default_rng(11 + tie)
    cfg = dataclasses.replace(random_config(rng, tie), hidden_size=64, intermediate_size=128)
    params = jax.tree.map(lambda shape: rng.standard_normal(shape).astype(np.float32), param_shapes(cfg),
                          is_leaf=lambda x: isinstance(x, tuple))
    table = math.prod(param_shapes(cfg)["embed"])
    assert streamed_weight_bytes(params) == 4 * (sum(math.prod(s) for s in all_shapes(cfg)) - (0 if tie else table))
    quantized = quantize_params(params, cfg, "int8")
    layer_weights = sum(math.prod(s) for layer in param_shapes(cfg)["layers"] for s in layer.values() if len(s) == 2)
    scales = sum(s[1] for layer in param_shapes(cfg)["layers"] for s in layer.values() if len(s) == 2)
    # int8 quantizes the head (for a tied model an int8 copy of the table): the float table is then
    # only looked up, whether tied or not, and the head streams one byte per weight plus its scales.
    floats = sum(math.prod(s) for s in all_shapes(cfg)) - layer_weights - table * (1 if tie else 2)
    head = table + 4 * cfg.vocab_size
    assert streamed_weight_bytes(quantized) == layer_weights + 4 * scales + head + 4 * floats


@pytest.mark.parametrize("kv_dtype,element_bytes,scale_bytes", [("bfloat16", 2, 0), ("float32", 4, 0), ("int8", 1, 4)])
def test_kv_bytes_per_position_counts_every_layer_and_the_scales(kv_dtype, element_bytes, scale_bytes):
    """A position of context holds K and V rows of every kv head in every layer, plus one float32
    scale per row when the pool is quantized."""
    cfg = random_config(np.random.default_rng(4), tie=True)
    caches = [init_layer_cache(7, 4, cfg.num_kv_heads, cfg.head_dim, kv_dtype) for _ in range(cfg.num_layers)]
    expected = roofline.kv_bytes_per_token(cfg, element_bytes) + 2 * cfg.num_layers * cfg.num_kv_heads * scale_bytes
    assert kv_bytes_per_position(caches) == expected


def test_last_level_cache_is_the_highest_level_sysfs_lists(tmp_path):
    for index, (level, size) in enumerate([("1", "48K"), ("1", "32K"), ("2", "2048K"), ("3", "300M\n"), ("x", "9G")]):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "level").write_text(level)
        (tmp_path / f"index{index}" / "size").write_text(size)
    assert device_probe.last_level_cache_bytes(tmp_path) == 300 * 2**20
    assert device_probe.last_level_cache_bytes(tmp_path / "missing") is None


def test_every_weight_format_an_engine_builds_has_a_width():
    assert set(QUANT_MODES) | set(KV_DTYPES) | {default_dtype()} <= set(roofline.BYTES_PER_ELEMENT)


@pytest.mark.parametrize("argv, want", [
    ([], (default_dtype(), default_dtype())),
    (["--dtype", "w4a8"], ("w4a8", default_kv_dtype("float32", quantized=True))),
    (["--dtype", "float32", "--kv-dtype", "int8"], ("float32", "int8"))])
def test_roofline_dtypes_default_to_what_a_build_makes(argv, want):
    assert _model_and_dtypes(_parser().parse_args(["roofline", *argv]))[1:] == want


def test_roofline_refuses_model_options_beside_an_engine():
    with pytest.raises(RequestError, match="--model and --kv-dtype come from the engine's manifest"):
        _model_and_dtypes(_parser().parse_args(["roofline", "--engine", "e", "--model", "m", "--kv-dtype", "int8"]))



def test_decode_sweep_predicts_each_batch_as_its_own_decode_step():
    cfg = random_config(np.random.default_rng(5), tie=True)
    device = roofline.Device(bandwidth_bytes_per_s=25e9, flops_per_s=300e9)
    report = roofline.roofline_report(cfg, device, batch=3, context_len=200, dtype="bfloat16", kv_dtype="int8")
    sweep = report["decode_sweep"]
    assert [entry["batch"] for entry in sweep] == list(roofline.SWEEP_BATCHES)
    for entry in sweep:
        step = roofline.decode_step(cfg, device, entry["batch"], 200, 2, 1)
        assert {key: entry[key] for key in step.as_dict()} == step.as_dict()
        assert entry["tokens_per_s"] == entry["batch"] / step.time_s
    rates = [entry["tokens_per_s"] for entry in sweep]
    assert rates == sorted(rates) and sweep[0]["bound"] == "bandwidth"


def test_roofline_plot_writes_the_chart_beside_the_json(tmp_path):
    from jaxinfer.commands import roofline as command

    output = tmp_path / "roofline.json"
    command.main(_parser().parse_args(["roofline", "--model", str(Path(__file__).parent / "checkpoints/tiny-llama3"),
                                       "--bandwidth", "20", "--flops", "100", "--output", str(output), "--plot"]))
    assert len(json.loads(output.read_text())["decode_sweep"]) == len(roofline.SWEEP_BATCHES)
    assert output.with_suffix(".png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
