"""Quantized engines (`quant=` / `jaxinfer build --quant`): the oracle is the plain model run on
the dequantized weights; built directories restore the quantized pytrees; shardings follow the
layer's logical axes; AWQ lowers the calibration output error of round-to-nearest."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import CHECKPOINTS_DIR
from jaxinfer.checkpoint import load_checkpoint
from jaxinfer.configs import load_config
from jaxinfer.engine.artifact import load_engine, read_manifest
from jaxinfer.engine.build import build_engine
from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.create import engine_from_checkpoint
from jaxinfer.errors import EngineError
from jaxinfer.eval.corpus import CALIBRATION, corpus_windows
from jaxinfer.model.llama import LINEAR_WEIGHTS
from jaxinfer.model.sharding import make_mesh, param_shardings
from jaxinfer.quant import W4A8Weight
from jaxinfer.quant.apply import HEAD_MODES, fold_input_scales, is_quantized, quantize_params
from jaxinfer.quant.calibration import ActivationStats, capture_activations
from jaxinfer.quant.quantize import quantize_weight
from jaxinfer.quant.scaling import awq_search, smoothquant_scale
from jaxinfer.reference import ReferenceGenerator
from jaxinfer.sampling_params import SamplingParams
from pallas_kernels import cpu_int4_dot, cpu_int8_dot

CHECKPOINT = CHECKPOINTS_DIR / "tiny-llama3"
# K/V stored exactly (float32, where quantized engines default to bfloat16): these tests check the
# weights' quantization against references that keep K/V in float32.
SETTINGS = dict(dtype="float32", kv_dtype="float32", max_num_seqs=4, max_num_batched_tokens=16, max_model_len=128,
                kv_memory="2MiB")
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def checkpoint():
    return load_checkpoint(CHECKPOINT)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(7)
    return [rng.integers(3, 500, 9).tolist() for _ in range(3)]


def dequantized(params):
    return jax.tree.map(lambda w: w.dequantize() if is_quantized(w) else w, params, is_leaf=is_quantized)


def engine_greedy(engine, prompts):
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt_token_ids=prompt, params=params)
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
    return [finished[f"r{i}"] for i in range(len(prompts))]


def assert_greedy_agrees_until_a_near_tie(engine_tokens, reference, prompts, tie_margin: float):
    """Each engine sequence equals the reference's greedy one, except that from a token where the
    reference's two best logits lie within `tie_margin` (0: no exception) the two may part."""
    for prompt, got, want in zip(prompts, engine_tokens, reference.generate(prompts, NEW_TOKENS), strict=True):
        assert len(got) == len(want)
        for i, (got_token, want_token) in enumerate(zip(got, want)):
            if got_token != want_token:
                second, best = np.sort(reference.prompt_logits([prompt + want[:i]])[0, -1])[-2:]
                assert best - second < tie_margin, (f"token {i}: engine {got_token}, reference {want_token}, whose "
                                                    f"two best logits are {best - second:.3f} apart")
                break


# The CPU kernels are not exact dequantize-then-f32 dots: int8 splits the activations into two int8
# levels (about 14 bits); int4 over more than a few rows dots in bfloat16 (8 bits of mantissa), so
# its greedy tokens are checked against the contiguous reference on the same quantized weights
# (a near-tie flipped after 10 tokens against the dequantized oracle). w4a8 rounds the activations to
# int8 per group of 32 (on this random model the logits move by up to 0.18 of 3.4; w8a8's per-token
# int8 moves them by 0.10), and its engine runs the CPU kernel where it can: its integer products are
# exact, but an activation a float rounding apart in the engine's attention (the C++ kernel sums in
# another order than the reference) can round to the next int8 level, so a near-tie may flip (the
# 12th token of a prompt did, at a margin of 0.014 of 2.25).
@pytest.mark.parametrize("mode, logits_atol, greedy_oracle, tie_margin", [("int8", 2e-3, "dequantized", 0.0),
                                                                          ("int4-awq", 6e-2, "quantized", 0.0),
                                                                          ("w4a8", 0.25, "quantized", 0.05)])
def test_quantized_engine_matches_the_model_on_dequantized_weights(checkpoint, prompts, mode, logits_atol,
                                                                    greedy_oracle, tie_margin):
    engine = engine_from_checkpoint(checkpoint, EngineConfig.create(quant=mode, **SETTINGS), progress=False)
    params, cfg = engine.runner.params, engine.model_cfg
    assert all(is_quantized(layer[name]) for layer in params["layers"]
               for name in ("w_qkv", "wo", "w_gate_up", "w_down"))
    # The 8-bit integer modes quantize the head too (weight-only int8); the lookup table stays float.
    assert not is_quantized(params["embed"])
    assert is_quantized(params["lm_head"]) == (mode in HEAD_MODES)
    oracle = ReferenceGenerator(dequantized(params), cfg, max_len=64)
    quantized = ReferenceGenerator(params, cfg, max_len=64)
    np.testing.assert_allclose(quantized.prompt_logits(prompts), oracle.prompt_logits(prompts), atol=logits_atol)
    greedy = {"dequantized": oracle, "quantized": quantized}[greedy_oracle]
    assert_greedy_agrees_until_a_near_tie(engine_greedy(engine, prompts), greedy, prompts, tie_margin)


def test_auto_kv_dtype_is_the_backends_quantized_kv_dtype_for_quantized_weights():
    expected = load_config("defaults")["quantized_kv_dtype"][jax.default_backend()]
    assert EngineConfig.create(quant="w4a8", dtype="float32", kv_dtype="auto").kv_dtype == expected
    assert EngineConfig.create(quant="int8", kv_dtype="auto").kv_dtype == expected
    assert EngineConfig.create(dtype="float32", kv_dtype="auto").kv_dtype == "float32"
    assert EngineConfig.create(dtype="bfloat16", kv_dtype="auto").kv_dtype == "bfloat16"
    assert EngineConfig.create(quant="w4a8", kv_dtype="int8").kv_dtype == "int8"


@pytest.mark.parametrize("quant", ["int3", "INT8", "awq", ""])
def test_engine_config_refuses_unknown_quant_modes_listing_the_valid_ones(quant):
    with pytest.raises(EngineError, match="int8, int4, int4-awq, w8a8, fp8, w4a8"):
        EngineConfig.create(quant=quant, **SETTINGS)
    assert EngineConfig.create(quant="int4-awq", **SETTINGS).quant == "int4-awq"


def test_built_int8_engine_restores_quantized_weights_and_generates(checkpoint, prompts, tmp_path):
    path = build_engine(CHECKPOINT, tmp_path / "int8", progress=False, quant="int8", **SETTINGS)
    # Its few-row steps call the CPU int8 kernel where this CPU has one; loading registers it first.
    assert (cpu_int8_dot.TARGET in read_manifest(path)["ffi_kernels"]) == cpu_int8_dot.available()
    engine = load_engine(path, progress=False)
    restored = engine.runner.params["layers"][1]["w_gate_up"]
    expected = quantize_params(checkpoint.params, checkpoint.config, "int8")["layers"][1]["w_gate_up"]
    assert restored.q.dtype == np.int8
    # Stored packed for the CPU kernel, with its output sums, where this CPU runs it; in the [in, out]
    # layout elsewhere.
    assert cpu_int8_dot.is_packed(restored.q) == cpu_int8_dot.available()
    np.testing.assert_array_equal(np.asarray(cpu_int8_dot.standard_layout(restored.q)), np.asarray(expected.q))
    if cpu_int8_dot.is_packed(restored.q):
        np.testing.assert_array_equal(np.asarray(restored.q.sums), np.asarray(expected.q, np.int64).sum(axis=0))
    np.testing.assert_array_equal(np.asarray(restored.scale), np.asarray(expected.scale))
    oracle = ReferenceGenerator(dequantized(engine.runner.params), engine.model_cfg, max_len=64)
    assert engine_greedy(engine, prompts) == oracle.generate(prompts, NEW_TOKENS)


def test_built_w4a8_engine_restores_packed_int4_weights_and_generates(checkpoint, prompts, tmp_path):
    path = build_engine(CHECKPOINT, tmp_path / "w4a8", progress=False, quant="w4a8", **SETTINGS)
    assert (cpu_int4_dot.TARGET in read_manifest(path)["ffi_kernels"]) == cpu_int4_dot.available()
    engine = load_engine(path, progress=False)
    restored = engine.runner.params["layers"][1]["w_down"]
    expected = quantize_params(checkpoint.params, checkpoint.config, "w4a8")["layers"][1]["w_down"]
    assert isinstance(restored, W4A8Weight) and restored.group_size == 32
    assert cpu_int4_dot.is_packed(restored.packed) == cpu_int4_dot.available()
    np.testing.assert_array_equal(np.asarray(restored.dequantize()), np.asarray(expected.dequantize()))
    oracle = ReferenceGenerator(engine.runner.params, engine.model_cfg, max_len=64)
    assert_greedy_agrees_until_a_near_tie(engine_greedy(engine, prompts), oracle, prompts, tie_margin=0.05)


@pytest.mark.parametrize("name, weight_mode, options", [("tiny-llama3", "w8a8", {}),
                                                       ("tiny-llama3", "int4", {"group_size": 32}),
                                                       ("tiny-qwen2", "w8a8", {})])  # with q/k/v biases
def test_folded_input_scales_give_the_logits_of_dividing_the_activations(prompts, name, weight_mode, options):
    """Quantized with fresh random input scales (wo's shared by the query heads of each kv head, as
    every scale of wo is under MHA), then folded: the same codes, no weight divides its input any more,
    and the model's logits are those of dividing every weight's input by its scale."""
    checkpoint = load_checkpoint(CHECKPOINTS_DIR / name)
    cfg = checkpoint.config
    rng = np.random.default_rng(11)

    def random_scale(weight_name, in_features):
        if weight_name == "wo":
            per_kv_head = rng.uniform(0.25, 4.0, (cfg.num_kv_heads, 1, cfg.head_dim))
            return np.broadcast_to(per_kv_head, (cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim)).reshape(-1)
        return rng.uniform(0.25, 4.0, in_features)

    def quantize(weight_name, w):
        w = np.asarray(w, np.float32)
        scale = random_scale(weight_name, w.shape[0]).astype(np.float32)
        return quantize_weight(w, weight_mode, input_scale=scale, **options)

    unfolded = {**checkpoint.params, "layers": [
        {name: quantize(name, w) if name in LINEAR_WEIGHTS else w for name, w in layer.items()}
        for layer in checkpoint.params["layers"]]}
    folded = fold_input_scales(unfolded, cfg)
    codes = "q" if weight_mode == "w8a8" else "packed"
    for before, after in zip(unfolded["layers"], folded["layers"]):
        assert all(after[name].input_scale is None for name in LINEAR_WEIGHTS)
        for name in LINEAR_WEIGHTS:
            np.testing.assert_array_equal(np.asarray(getattr(after[name], codes)),
                                          np.asarray(getattr(before[name], codes)))
        assert not np.allclose(np.asarray(after["mlp_norm"]), np.asarray(before["mlp_norm"]))
    expected = ReferenceGenerator(unfolded, cfg, max_len=64).prompt_logits(prompts)
    actual = ReferenceGenerator(folded, cfg, max_len=64).prompt_logits(prompts)
    # float16 group steps (int4) round once more when rescaled, 2^-11 relative per step: the logits
    # moved by up to 0.021 of 3.4 here (0.008 before V's columns were rescaled too; w8a8: 1e-6).
    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 if weight_mode == "w8a8" else 3e-2)


# Mean |logit difference| from the float model here: w8a8 0.021 / 0.020, int4-awq 0.20 / 0.18 (4-bit
# weights of a random model) for tiny-llama3 / tiny-llama2, about as when wo divided its input at run
# time by a scale of its own (0.021 / 0.020, 0.18 / 0.18).
@pytest.mark.parametrize("name, mode, mean_error", [("tiny-llama3", "w8a8", 0.03), ("tiny-llama3", "int4-awq", 0.25),
                                                    ("tiny-llama2", "w8a8", 0.03), ("tiny-llama2", "int4-awq", 0.25)])
def test_calibrated_quantization_keeps_the_models_logits(prompts, name, mode, mean_error):
    """quantize_params in the calibrated modes, every input scale folded: wo's into V under MHA
    (tiny-llama2), none for wo under GQA (tiny-llama3). The logits stay near the float model's."""
    checkpoint = load_checkpoint(CHECKPOINTS_DIR / name)
    cfg = checkpoint.config
    calibration = capture_activations(checkpoint.params, cfg, corpus_windows(checkpoint.tokenizer, CALIBRATION, 32, 2))
    params = quantize_params(checkpoint.params, cfg, mode, calibration)
    expected = ReferenceGenerator(checkpoint.params, cfg, max_len=64).prompt_logits(prompts)
    actual = ReferenceGenerator(params, cfg, max_len=64).prompt_logits(prompts)
    assert float(np.mean(np.abs(actual - expected))) < mean_error


def test_built_w8a8_engine_restores_its_folded_weights_and_generates(checkpoint, prompts, tmp_path):
    path = build_engine(CHECKPOINT, tmp_path / "w8a8", progress=False, quant="w8a8", **SETTINGS)
    engine = load_engine(path, progress=False)
    layer = engine.runner.params["layers"][1]
    assert all(layer[name].input_scale is None for name in LINEAR_WEIGHTS)
    oracle = ReferenceGenerator(engine.runner.params, engine.model_cfg, max_len=64)
    assert_greedy_agrees_until_a_near_tie(engine_greedy(engine, prompts), oracle, prompts, tie_margin=0.05)


def test_tied_model_gets_an_int8_copy_of_its_table_as_head(prompts, tmp_path):
    """tiny-smollm2 ties its embeddings: a w8a8 engine keeps the float table for the lookup and adds
    an int8 head quantized from it, which a built engine restores (packed where the CPU kernel runs)."""
    tied = load_checkpoint(CHECKPOINTS_DIR / "tiny-smollm2")
    assert "lm_head" not in tied.params
    path = build_engine(CHECKPOINTS_DIR / "tiny-smollm2", tmp_path / "w8a8", progress=False, quant="w8a8", **SETTINGS)
    engine = load_engine(path, progress=False)
    params = engine.runner.params
    head = params["lm_head"]
    assert cpu_int8_dot.is_packed(head.q) == cpu_int8_dot.available()
    table = np.asarray(tied.params["embed"], np.float32)
    np.testing.assert_array_equal(np.asarray(params["embed"]), table)
    # Per vocabulary entry: each column's largest weight maps to 127, and the head dequantizes to the table.
    np.testing.assert_allclose(np.asarray(head.scale), np.abs(table).max(axis=0) / 127, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(head.dequantize()), table, atol=float(np.max(head.scale)) / 2 + 1e-7)
    # The reference on the same quantized params rounds the activations to int8 as the engine does (on
    # dequantized weights a first token 0.010 from a tie flipped).
    oracle = ReferenceGenerator(params, engine.model_cfg, max_len=64)
    assert engine_greedy(engine, prompts) == oracle.generate(prompts, NEW_TOKENS)


@pytest.mark.parametrize("mode", ["int4-awq", "w8a8"])
def test_quantized_shardings_follow_column_and_row_parallel_axes(checkpoint, mode):
    cfg = checkpoint.config
    windows = corpus_windows(checkpoint.tokenizer, CALIBRATION, 32, 2)
    params = quantize_params(checkpoint.params, cfg, mode, capture_activations(checkpoint.params, cfg, windows))
    shardings = param_shardings(cfg, make_mesh(2), params)["layers"][0]
    column, row = shardings["w_gate_up"], shardings["w_down"]
    weight_field = "packed" if mode == "int4-awq" else "q"
    assert getattr(column, weight_field).spec == P(None, "model")
    assert getattr(row, weight_field).spec == P("model", None)
    # Every input scale is folded into the ops before its weight (into mlp_norm, up's and V's columns).
    assert all(shardings[name].input_scale is None for name in LINEAR_WEIGHTS)
    if mode != "int4-awq":
        assert column.scale.spec == P("model") and row.scale.spec == P(None)
    head = param_shardings(cfg, make_mesh(2), params).get("lm_head")
    if mode in HEAD_MODES:  # split by vocabulary, like the float head
        assert head.q.spec == P(None, "model") and head.scale.spec == P("model")
    else:
        assert head.spec == P(None, "model")


def test_awq_lowers_the_calibration_output_error_of_rtn(checkpoint):
    cfg = checkpoint.config
    windows = corpus_windows(checkpoint.tokenizer, CALIBRATION, 64, 4)
    stats = capture_activations(checkpoint.params, cfg, windows)[(1, "w_gate_up")]
    choice = awq_search(checkpoint.params["layers"][1]["w_gate_up"], stats, group_size=32)
    assert choice.alpha > 0
    assert choice.error < choice.rtn_error
    # AWQ's clipping lowers the error of the scaled weight further, with some groups clipped.
    unclipped = awq_search(checkpoint.params["layers"][1]["w_gate_up"], stats, group_size=32, clips=(1.0,))
    assert np.all(unclipped.clip == 1.0) and np.any(choice.clip < 1.0)
    assert choice.error < unclipped.error and choice.alpha == unclipped.alpha


def test_smoothquant_balances_activation_and_weight_ranges():
    # alpha 0.5: after migration each input channel's activation maximum equals its weight maximum.
    rng = np.random.default_rng(11)
    w = rng.standard_normal((96, 40)).astype(np.float32) * rng.uniform(0.01, 1, (96, 1)).astype(np.float32)
    max_abs = rng.uniform(0.1, 50, 96).astype(np.float32)
    stats = ActivationStats(max_abs / 4, max_abs, max_abs ** 2 / 8, rng.standard_normal((4, 96)).astype(np.float32))
    scale = smoothquant_scale(w, stats)
    np.testing.assert_allclose(max_abs / scale, np.abs(w).max(axis=1) * scale, rtol=1e-5)


def test_calibration_mean_square_is_over_every_row(checkpoint):
    cfg = checkpoint.config
    windows = corpus_windows(checkpoint.tokenizer, CALIBRATION, 16, 2)
    # One sampled row per window plus the full statistics: the mean square is over all 32 rows.
    stats = capture_activations(checkpoint.params, cfg, windows, sample_rows=2)[(0, "w_down")]
    full = capture_activations(checkpoint.params, cfg, windows, sample_rows=32)[(0, "w_down")]
    np.testing.assert_allclose(stats.mean_square, np.mean(full.sample.astype(np.float64) ** 2, axis=0), rtol=1e-5)
    assert np.all(stats.mean_square >= stats.mean_abs ** 2 * (1 - 1e-5))
