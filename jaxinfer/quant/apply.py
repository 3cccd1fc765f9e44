"""Quantizing a model's params: which weights, in which mode, with which input scales, and the
layout (logical axes, restore structure) that the quantized pytrees get. Every such decision of
the engine lives here.

    quantize_params(params, cfg, mode, calibration=None) -> params      (numpy/jax float in, on host)
    fold_input_scales(params, cfg) -> params with input scales folded into the ops before their weights
    abstract_quantized_params(structs, cfg, mode) -> ShapeDtypeStruct pytree of the same structure
    pack_for_cpu_kernel(params) -> params with int8 weights in the CPU kernel's layout (1 device)
    quantized_logical_axes(params, axes) -> logical axes with quantized weights expanded per field
    calibrate(params, cfg, tokenizer, mode) -> Calibration | None        (only the modes that need it)

Quantized: the four linear weights of every layer (w_qkv, wo, w_gate_up, w_down), which hold
nearly all of the bytes. q/k/v share one input scale (and gate/up another) because they share one
fused weight, as in AutoAWQ and SmoothQuant, which scale the inputs a norm feeds. In the 8-bit
integer modes (HEAD_MODES) the LM head too, as weight-only int8 with one scale per vocabulary
entry (an `Int8Weight` under "lm_head"; for tied embeddings an int8 copy of the table): kept in
float32 it was half of the bytes an int8 SmolLM2 decode step streamed (113 of 220 MB), and
llama.cpp's GGUF files store it in 8 bits too. Kept in the engine dtype: the embedding table the
lookup reads (a column per token), norms and biases, which are small and precision-sensitive.

| mode       | weight (jaxinfer.quant)  | from calibration activations                        |
| ---------- | ------------------------ | --------------------------------------------------- |
| "int8"     | Int8Weight (W8A16)       | nothing                                             |
| "int4"     | Int4Weight (W4A16, RTN)  | nothing                                             |
| "int4-awq" | Int4Weight (W4A16)       | AWQ input_scale and per-group clip search           |
| "w8a8"     | W8A8Weight int8          | SmoothQuant input_scale (alpha 0.5)                 |
| "fp8"      | W8A8Weight float8_e4m3fn | per-channel weight scales weighted by mean x^2      |
| "w4a8"     | W4A8Weight (G = 32)      | nothing                                             |

w4a8 takes groups of 32, the block of llama.cpp's Q4_0/Q4_1/Q8_0 formats: a checkpoint loaded from
a Q4_1 GGUF file (the default model) lies on such a grid, so its int4 codes, scales and offsets
come back exactly (up to float16 rounding of scales GGUF stores as float16 too), and the mode
loses only the activations' per-group int8 rounding, the arithmetic llama.cpp runs the file with.

The input scales of AWQ and SmoothQuant are folded into the ops before their weights, as both
papers deploy them, so that the model is the same up to float rounding and no matmul divides its
input: w_qkv's into attn_norm's weight, w_gate_up's into mlp_norm's, w_down's into the up columns
of w_gate_up (SwiGLU is linear in up), and wo's into the V columns of w_qkv (attention is linear in
V). That last fold needs one scale per kv head's feature, which holds where each kv head serves one
query head (MHA). Under GQA wo takes no input scale, as AWQ's reference code skips it there too:
on SmolLM2 (3 query heads per kv head) w8a8 without one measured as with wo dividing its input at
run time by a scale of its own (KL from the float model 0.0170 against 0.0173, 16 x 256 windows;
0.0124 both at 4 x 1024; int4-awq 0.158 both), where that division cost 6.6-11.1 ms of a w8a8
256-token prefill step of 140-180 ms on the Zen 4 VM; a scale shared by each group's query heads
(the group's largest statistics) measured worse (0.0184). Dividing the activations at every matmul
cost a w8a8 engine 13% of such a step on a 2-core CPU (XLA:CPU materialized each [tokens, in]
broadcast of the scale).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.errors import EngineError
from jaxinfer.eval.corpus import CALIBRATION, corpus_windows
from jaxinfer.model.config import ModelConfig
from jaxinfer.model.llama import LINEAR_WEIGHTS, group_qkv, head_weight, interleave_gate_up
from jaxinfer.quant.calibration import Calibration, capture_activations
from jaxinfer.quant.quantize import W4A8_GROUP_SIZE, quantize_weight
from jaxinfer.quant.scaling import ALPHA_GRID, awq_search, smoothquant_scale
from jaxinfer.quant.weights import Int4Weight, Int8Weight, W4A8Weight, W8A8Weight
from pallas_kernels import cpu_int4_dot, cpu_int8_dot

# mode -> (quantize_weight mode, calibrated method or None)
QUANT_MODES = {"int8": ("int8", None), "int4": ("int4", None), "int4-awq": ("int4", "awq"),
               "w8a8": ("w8a8", "smoothquant"), "fp8": ("fp8", "weighted-scale"), "w4a8": ("w4a8", None)}
# The modes whose LM head is quantized, weight-only int8 (module docstring).
HEAD_MODES = ("int8", "w8a8", "w4a8")
# The methods that fold an input_scale into the weight (a field of the quantized pytree).
INPUT_SCALE_METHODS = ("awq", "smoothquant")
CALIBRATION_WINDOWS = 8
CALIBRATION_WINDOW_LEN = 256
# int4 groups: the largest of these that divides the input size (SmolLM2: 64 for 576, 128 for 1536).
INT4_GROUP_SIZES = (128, 64, 32)


def is_quantized(leaf) -> bool:
    return isinstance(leaf, (Int8Weight, Int4Weight, W8A8Weight, W4A8Weight))


def _weight_options(weight_mode: str, in_features: int) -> dict:
    if weight_mode == "w4a8":
        if in_features % W4A8_GROUP_SIZE:
            raise EngineError(f"w4a8 needs an input size divisible by its group size {W4A8_GROUP_SIZE}; a weight "
                              f"has {in_features} inputs: use int4 or int8 for this model")
        return {"group_size": W4A8_GROUP_SIZE}
    if weight_mode != "int4":
        return {}
    fitting = [size for size in INT4_GROUP_SIZES if in_features % size == 0]
    if not fitting:
        raise EngineError(f"int4 needs an input size divisible by one of the group sizes {INT4_GROUP_SIZES}; "
                          f"a weight has {in_features} inputs: use int8 for this model")
    return {"group_size": fitting[0]}


def _check_mode(mode: str) -> tuple[str, str | None]:
    if mode not in QUANT_MODES:
        raise EngineError(f"unknown quantization mode {mode!r}; choose one of {tuple(QUANT_MODES)}")
    return QUANT_MODES[mode]


def needs_calibration(mode: str) -> bool:
    return _check_mode(mode)[1] is not None


def calibrate(params, cfg: ModelConfig, tokenizer, mode: str) -> Calibration | None:
    """Activation statistics from data/corpus/calibration.txt when `mode` calibrates."""
    if not needs_calibration(mode):
        return None
    windows = corpus_windows(tokenizer, CALIBRATION, CALIBRATION_WINDOW_LEN, CALIBRATION_WINDOWS)
    return capture_activations(params, cfg, windows)


def _scales_input(name: str, cfg: ModelConfig) -> bool:
    """Whether linear weight `name` takes AWQ's or SmoothQuant's input scale: all but wo under GQA
    (module docstring)."""
    return name != "wo" or cfg.q_per_kv == 1


def _calibrated_options(method: str | None, w: np.ndarray, stats, options: dict, scales_input: bool) -> dict:
    if method is None:
        return {}
    if method == "awq":
        # Without an input scale AWQ still clips (its search at alpha 0 alone), as AutoAWQ clips o_proj.
        choice = awq_search(w, stats, options["group_size"], alphas=ALPHA_GRID if scales_input else (0.0,))
        return {"input_scale": choice.input_scale if scales_input else None, "clip": choice.clip}
    if method == "smoothquant":
        return {"input_scale": smoothquant_scale(w, stats)} if scales_input else {}
    return {"importance": stats.mean_square}


def _map_linears(params, transform):
    layers = [{name: transform((i, name), w) if name in LINEAR_WEIGHTS else w for name, w in layer.items()}
              for i, layer in enumerate(params["layers"])]
    return {**params, "layers": layers}


def _with_int8_head(params, mode: str, quantize_head):
    """`params` with "lm_head" = quantize_head(float head) in the HEAD_MODES, else unchanged."""
    return {**params, "lm_head": quantize_head(head_weight(params))} if mode in HEAD_MODES else params


def quantize_params(params, cfg: ModelConfig, mode: str, calibration: Calibration | None = None):
    """`params` with every linear weight quantized in `mode`, and their input scales folded where
    the calibrated modes make them (`fold_input_scales`: the norms before them change too); the rest
    untouched. The calibrated modes need `calibration` (from `calibrate` or `capture_activations`)."""
    weight_mode, method = _check_mode(mode)
    if method is not None and calibration is None:
        raise EngineError(f"quantization mode {mode!r} computes {method} scales from calibration activations: "
                          "pass calibration=calibrate(params, cfg, tokenizer, mode)")

    def quantize(key, w):
        w = np.asarray(w, np.float32)
        options = _weight_options(weight_mode, w.shape[0])
        stats = None if calibration is None else calibration[key]
        calibrated = _calibrated_options(method, w, stats, options, _scales_input(key[1], cfg))
        return quantize_weight(w, weight_mode, **calibrated, **options)

    return _with_int8_head(fold_input_scales(_map_linears(params, quantize), cfg), mode,
                           lambda head: quantize_weight(np.asarray(head, np.float32), "int8"))


def fold_input_scales(params, cfg: ModelConfig):
    """`params` with every linear weight's input scale folded into the ops before it (module
    docstring); the same model up to float rounding, given a wo scale that the query heads of each kv
    head share (the first head's stands for its group; under MHA each group is one head). Traceable
    (`jax.eval_shape` gives the structure of a restore target)."""
    def fold(layer):
        layer = dict(layer)
        for norm, name in (("attn_norm", "w_qkv"), ("mlp_norm", "w_gate_up")):
            scale = layer[name].input_scale
            if scale is not None:
                layer[norm] = (layer[norm] / scale).astype(layer[norm].dtype)
                layer[name] = dataclasses.replace(layer[name], input_scale=None)
        scale = layer["w_down"].input_scale
        if scale is not None:
            factor = interleave_gate_up(jnp.ones_like(scale), 1 / scale)  # only up's columns are divided
            layer["w_gate_up"] = layer["w_gate_up"].scale_outputs(factor)
            layer["w_down"] = dataclasses.replace(layer["w_down"], input_scale=None)
        scale = layer["wo"].input_scale
        if scale is not None:
            v_scale = scale.reshape(cfg.num_kv_heads, cfg.q_per_kv, cfg.head_dim)[:, 0].reshape(-1)
            q_ones, kv_ones = jnp.ones(cfg.num_heads * cfg.head_dim), jnp.ones(cfg.num_kv_heads * cfg.head_dim)
            factor = group_qkv(q_ones, kv_ones, 1 / v_scale, cfg)  # only V's columns are divided
            layer["w_qkv"] = layer["w_qkv"].scale_outputs(factor)
            if "b_qkv" in layer:
                layer["b_qkv"] = (layer["b_qkv"] * factor).astype(layer["b_qkv"].dtype)
            layer["wo"] = dataclasses.replace(layer["wo"], input_scale=None)
        return layer

    return {**params, "layers": [fold(layer) for layer in params["layers"]]}


def abstract_quantized_params(structs, cfg: ModelConfig, mode: str):
    """The structure, shapes and dtypes `quantize_params` gives for float params shaped like
    `structs` (a ShapeDtypeStruct pytree), found by tracing the same quantizers: the restore target
    of a quantized engine's weights."""
    weight_mode, method = _check_mode(mode)

    # Traced once per weight shape, not per layer: tracing the 120 layer weights of the default
    # model took 0.36 s of a 4 s engine load.
    @functools.cache
    def quantize_shape(shape: tuple, dtype, scaled: bool):
        # Unit scales stand for calibrated ones (same shape); evaluated eagerly because the
        # quantizers check input_scale values.
        scale = np.ones(shape[0], np.float32) if scaled else None

        def quantize(w):
            with jax.ensure_compile_time_eval():
                return quantize_weight(w, weight_mode, input_scale=scale, **_weight_options(weight_mode, shape[0]))
        return jax.eval_shape(quantize, jax.ShapeDtypeStruct(shape, dtype))

    def quantize_abstract(key, w):
        return quantize_shape(w.shape, w.dtype, method in INPUT_SCALE_METHODS and _scales_input(key[1], cfg))

    def quantize_head(head):
        with jax.ensure_compile_time_eval():
            return jax.eval_shape(lambda w: quantize_weight(w, "int8"), head)

    return _with_int8_head(jax.eval_shape(lambda params: fold_input_scales(params, cfg),
                                          _map_linears(structs, quantize_abstract)), mode,
                           quantize_head)


def uses_cpu_kernel(mode: str | None, tp: int) -> bool:
    """Whether an engine in this quantization mode stores its weights packed for the CPU kernels
    (int8 for int8/w8a8 and every int8 head, int4 for w4a8): on a CPU that runs them, with one
    device (the packed blocks are not split across a mesh)."""
    if mode is None or tp != 1 or _check_mode(mode)[0] not in ("int8", "w8a8", "w4a8"):
        return False
    return cpu_int8_dot.available() and (mode != "w4a8" or cpu_int4_dot.available())


def pack_for_cpu_kernel(params):
    """`params` with every quantized layer weight (and int8 head) whose shape allows it in its CPU
    kernel's layout: int8 `q` as `cpu_int8_dot.pack`, W4A8 as `cpu_int4_dot.pack`; traceable, so
    `jax.eval_shape` gives the packed structure of a restore target."""
    def pack(_, w):
        if isinstance(w, W4A8Weight):
            if not cpu_int4_dot.packable(*w.shape, w.group_size):
                return w
            packed, scale, offset = cpu_int4_dot.pack(w.packed, w.scale, w.offset)
            return dataclasses.replace(w, packed=packed, scale=scale, offset=offset)
        q = getattr(w, "q", None)  # Int8Weight and W8A8Weight have one; W4A16 int4 stays as it is
        if (q is None or cpu_int8_dot.is_packed(q) or q.dtype != jnp.int8
                or not cpu_int8_dot.packable(*q.shape)):
            return w
        return dataclasses.replace(w, q=cpu_int8_dot.pack(q))

    packed = _map_linears(params, pack)
    return {**packed, "lm_head": pack(None, packed["lm_head"])} if "lm_head" in packed else packed


def quantized_logical_axes(params, axes):
    """`axes` (from `param_logical_axes`) with each quantized weight of `params` replaced by the
    same weight class holding one logical-axes tuple per field: 2-D fields keep the weight's
    (in, out) axes, `input_scale [in]` takes the in axis, other 1-D scales the out axis, a
    per-tensor scale none (see jaxinfer.quant.weights)."""
    def expand(param, param_axes):
        if not is_quantized(param):
            return param_axes
        in_axis, out_axis = param_axes

        def field_axes(name: str, array):
            if array is None:
                return None
            if cpu_int8_dot.is_packed(array):  # int8 codes [out/4, 4, in] and their sums [out] (one device only)
                return cpu_int8_dot.PackedInt8(codes=(out_axis, None, in_axis), sums=(out_axis,))
            if array.ndim == 2:
                return param_axes
            if array.ndim == 4:  # W4A8 codes packed for the CPU kernel: [out/16, in/8, 16, 4]
                return (out_axis, in_axis, None, None)
            if array.ndim == 3:  # W4A8 scale, offset packed for the CPU kernel: [out/16, in/G, 16]
                return (out_axis, in_axis, None)
            if array.ndim == 0:
                return ()
            return (in_axis,) if name == "input_scale" else (out_axis,)
        return dataclasses.replace(param, **{f.name: field_axes(f.name, getattr(param, f.name))
                                             for f in dataclasses.fields(param)})

    if "lm_head" in params and "lm_head" not in axes:  # a tied table's quantized copy
        axes = {**axes, "lm_head": axes["embed"]}
    # Every weight is a leaf here (quantized weights are pytrees of their own, as is a PanelWeight).
    return jax.tree.map(expand, params, axes, is_leaf=lambda x: not isinstance(x, (dict, list)))


def weight_bytes(params) -> int:
    return sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(params))


def describe(params, mode: str, dtype: str) -> str:
    """The build-time line that says what was quantized and what was kept in the engine dtype."""
    kept = sorted(name for name, w in params.items() if name != "layers" and not is_quantized(w))
    count = sum(is_quantized(w) for layer in params["layers"] for w in layer.values())
    head = "; lm_head quantized to int8" if is_quantized(params.get("lm_head")) else ""
    return (f"quantization {mode}: {count} linear weights ({', '.join(LINEAR_WEIGHTS)}) quantized{head}; "
            f"{', '.join(kept)}, norms and biases kept in {dtype}; weights {weight_bytes(params) / 2**20:.1f} MiB")
