"""The compiled model step: one forward pass over a flat ragged batch, then sampling; in a decode
bucket, up to `decode_steps` such passes, each taking the tokens the last one sampled.

`model_step(params, kv_caches, inputs, sampling, cfg=, num_devices=, decode_steps=)` is a pure
function; the engine compiles it ahead of time once per shape bucket (T tokens, S rows) with the KV
caches donated, so the pool is updated in place. `num_devices` (the mesh's) picks the attention
implementation and whether float32 and bfloat16 weights take the CPU dense kernel
(`route_dense_weights`), which multiplies only the real tokens' rows (`query_start_loc[-1]` of them:
the bucket's padding costs no matmul work), as do the quantized CPU kernels (W8A8, W4A8). Shapes:

    inputs.tokens          [T] int32     new tokens of all scheduled sequences, end to end, padded
    inputs.positions       [T] int32     their positions in their sequences
    inputs.attention       AttentionMetadata (slot mapping, block tables [S, B_max], lengths)
    inputs.logits_indices  [S] int32     flat index of the token whose logits each sampled row uses
                                         (a request fanning out to n samples has n rows on one index)
    inputs.num_rows        [] int32      how many of them are real (the first ones); the head and
                                         sampling run at the bucket's smallest row count that holds
                                         them (`Bucket.sampled_row_ladder`), the other rows zero
    inputs.block_copies    [S, 2] int32  (src, dst) block copies for copy-on-write, done before
                                         attention; padding rows copy the null block onto itself
    inputs.num_steps       [] int32      model steps to run: 1, or in a decode bucket (T == S, every
                                         sequence one token) up to decode_steps
    sampling               SamplingMetadata with [S] rows (jaxinfer.runner.sampling)

Returns the SamplerOutput with a leading step axis (token ids [P, S], logprobs, top logprobs; P =
decode_steps in a decode bucket, else 1; steps past num_steps come back zero) and the updated caches.

Multi-step decode: step i > 0 feeds each row the token it sampled in step i - 1, at the next position
(its slot from the block table, which the scheduler allocated for all the steps ahead), and samples
at the next output position, appending the token to the penalty history. The tokens are those of
num_steps single steps, bit for bit: the draw's key depends on the output position, not the step.
The host's work between steps (scheduling, building inputs, the call, reading the outputs: about
1 ms on two CPU cores, most of a small model's step on a GPU) is paid once per call.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxinfer.cache.attention_metadata import AttentionMetadata
from jaxinfer.cache.kv_pool import write_kv
from jaxinfer.errors import EngineError
from jaxinfer.model.config import ModelConfig
from jaxinfer.model.layers import linear_in_weight_dtype
from jaxinfer.model.llama import LINEAR_WEIGHTS, compute_logits, forward, head_weight
from jaxinfer.model.panel_weight import PanelWeight
from jaxinfer.quant.weights import QuantizedWeight, W4A8Weight, W8A8Weight
from jaxinfer.runner.buckets import Bucket
from jaxinfer.runner.sampling import SamplerOutput, SamplingMetadata, sample
from pallas_kernels import cpu_dense_dot, cpu_int4_dot, cpu_int8_dot, cpu_row_passes
from pallas_kernels.ragged_paged_attention import ragged_paged_attention


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInputs:
    tokens: jax.Array
    positions: jax.Array
    attention: AttentionMetadata
    logits_indices: jax.Array
    num_rows: jax.Array
    block_copies: jax.Array
    num_steps: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KernelDenseWeight:
    """A float32 or bfloat16 `[in, out]` weight whose matmuls run in the CPU dense kernel for the row
    counts it serves (float32 up to cpu_dense_dot.MAX_FMA_ROWS rows, bfloat16 any with AMX or
    without AVX-512, a bfloat16 weight's AMX panels any); others stay XLA's dot. Either way x is
    taken in the weight's dtype and the product accumulates in float32, returned in x's dtype (as
    `linear` on the bare weight, and as the head's float32 logits). As an MLP's gate_up weight in
    bfloat16 on an AMX CPU it also takes the SwiGLU in the same kernel call (`fuses_swiglu`,
    `swiglu`), and as an output projection in bfloat16 the residual add and the next RMSNorm
    (`fuses_residual_norm`, `residual_norm`), and as the grouped qkv weight the split into heads and
    RoPE (`fuses_qkv_rope`, `qkv_rope`). With `live_rows` (the step's real tokens, a traced int32
    scalar) the kernel computes only the first live_rows rows and gives zeros for the bucket's
    padding rows after them. Made inside the traced step only, never stored."""
    w: jax.Array
    live_rows: jax.Array | None = None

    def matmul(self, x: jax.Array) -> jax.Array:
        rows = math.prod(x.shape[:-1])
        if not cpu_dense_dot.serves(rows, self.w):
            return linear_in_weight_dtype(x, self.w)
        x_rows = x.reshape(rows, -1).astype(self.w.dtype)
        return cpu_dense_dot.dense_dot(x_rows, self.w, self.live_rows).astype(x.dtype).reshape(*x.shape[:-1], -1)

    def fuses_swiglu(self, x: jax.Array) -> bool:
        """Whether `swiglu` takes x: bfloat16 activations where the kernel fuses the MLP's SwiGLU."""
        return x.dtype == self.w.dtype and cpu_dense_dot.serves_swiglu(math.prod(x.shape[:-1]), self.w)

    def swiglu(self, x: jax.Array) -> jax.Array:
        """silu(gate) * up of x times this gate_up weight, in x's dtype (`swiglu`)."""
        rows = math.prod(x.shape[:-1])
        return cpu_dense_dot.dense_swiglu(x.reshape(rows, -1), self.w, self.live_rows).reshape(*x.shape[:-1], -1)

    def fuses_residual_norm(self, x: jax.Array) -> bool:
        """Whether `residual_norm` takes x: bfloat16 activations at row counts the kernel serves."""
        return x.dtype == self.w.dtype and cpu_dense_dot.serves_add_norm(math.prod(x.shape[:-1]), self.w)

    def residual_norm(self, x: jax.Array, residual: jax.Array, norm_weight: jax.Array,
                      eps: float) -> tuple[jax.Array, jax.Array]:
        """residual + x times this weight, and its RMSNorm (`residual_rms_norm`), in one kernel call."""
        add_norm = functools.partial(cpu_dense_dot.dense_add_norm, w=self.w, live_rows=self.live_rows)
        return _residual_norm_by_rows(add_norm, x, residual, norm_weight, eps)

    def fuses_qkv_rope(self, x: jax.Array, head_dim: int) -> bool:
        """Whether `qkv_rope` takes x: bfloat16 activations at row counts the kernel serves."""
        return x.dtype == self.w.dtype and cpu_dense_dot.serves_qkv_rope(math.prod(x.shape[:-1]), self.w, head_dim)

    def qkv_rope(self, x: jax.Array, cos: jax.Array, sin: jax.Array, num_kv_heads: int,
                 q_per_kv: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q `[..., heads, hd]`, k and v `[..., kv_heads, hd]` of x times this grouped qkv weight, q and k
        rotated by cos and sin `[..., hd // 2]` (`apply_rope`), in one kernel call."""
        qkv_rope = functools.partial(cpu_dense_dot.dense_qkv_rope, w=self.w, live_rows=self.live_rows)
        return _qkv_rope_by_rows(qkv_rope, x, cos, sin, num_kv_heads, q_per_kv)


class FusedCalls(NamedTuple):
    """A quantized CPU kernel's fused calls on one weight (pallas_kernels.cpu_row_passes), its arrays
    and the step's live rows bound: add_norm(x, residual=, norm_weight=, eps=), qkv_rope(x, cos=, sin=,
    kv_heads=, q_per_kv=), swiglu(x)."""
    add_norm: Callable
    qkv_rope: Callable
    swiglu: Callable


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LiveRowsQuantizedWeight:
    """A quantized weight (jaxinfer.quant.weights) multiplied as the step's `live_rows` real tokens
    need: where its CPU kernel runs (W8A8 and W4A8 weights packed for it) the bucket's padding rows
    after them come back zero uncomputed. Where that kernel runs for float32 activations, the weight
    also takes the residual add and the next RMSNorm as an output projection (`fuses_residual_norm`,
    `residual_norm`), the split into heads and RoPE as the grouped qkv weight (`fuses_qkv_rope`,
    `qkv_rope`) and the SwiGLU as the MLP's gate_up weight (`fuses_swiglu`, `swiglu`) in the same
    kernel call, as KernelDenseWeight does. Made inside the traced step only, never stored."""
    w: QuantizedWeight
    live_rows: jax.Array

    def matmul(self, x: jax.Array) -> jax.Array:
        return self.w.matmul(x, live_rows=self.live_rows)

    def _fused_calls(self, x: jax.Array) -> FusedCalls | None:
        """The kernel's fused calls where it runs for x (packed W4A8 at any rows, packed int8 W8A8 at
        the rows its kernel serves; float32 activations, no input scale), else None."""
        w = self.w
        if w.input_scale is not None or x.dtype != jnp.float32:
            return None
        if isinstance(w, W4A8Weight) and cpu_int4_dot.is_packed(w.packed):
            arrays = dict(codes=w.packed, scale=w.scale, offset=w.offset)
            calls = (cpu_int4_dot.w4a8_add_norm, cpu_int4_dot.w4a8_qkv_rope, cpu_int4_dot.w4a8_swiglu)
        elif isinstance(w, W8A8Weight) and cpu_int8_dot.serves(math.prod(x.shape[:-1]), w.q):
            arrays = dict(w_packed=w.q, w_scale=w.scale)
            calls = (cpu_int8_dot.w8a8_add_norm, cpu_int8_dot.w8a8_qkv_rope, cpu_int8_dot.w8a8_swiglu)
        else:
            return None
        return FusedCalls(*(functools.partial(call, **arrays, live_rows=self.live_rows) for call in calls))

    def fuses_residual_norm(self, x: jax.Array) -> bool:
        return self._fused_calls(x) is not None and self.w.shape[1] % cpu_row_passes.LANE == 0

    def residual_norm(self, x: jax.Array, residual: jax.Array, norm_weight: jax.Array,
                      eps: float) -> tuple[jax.Array, jax.Array]:
        return _residual_norm_by_rows(self._fused_calls(x).add_norm, x, residual, norm_weight, eps)

    def fuses_qkv_rope(self, x: jax.Array, head_dim: int) -> bool:
        return self._fused_calls(x) is not None and (head_dim // 2) % cpu_row_passes.LANE == 0

    def qkv_rope(self, x: jax.Array, cos: jax.Array, sin: jax.Array, num_kv_heads: int,
                 q_per_kv: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        return _qkv_rope_by_rows(self._fused_calls(x).qkv_rope, x, cos, sin, num_kv_heads, q_per_kv)

    def fuses_swiglu(self, x: jax.Array) -> bool:
        return self._fused_calls(x) is not None and self.w.shape[1] % (2 * cpu_row_passes.LANE) == 0

    def swiglu(self, x: jax.Array) -> jax.Array:
        rows = math.prod(x.shape[:-1])
        return self._fused_calls(x).swiglu(x.reshape(rows, -1)).reshape(*x.shape[:-1], -1)


def _residual_norm_by_rows(add_norm, x: jax.Array, residual: jax.Array, norm_weight: jax.Array,
                           eps: float) -> tuple[jax.Array, jax.Array]:
    """`add_norm(x [M, K], residual=[M, N], norm_weight=, eps=)` (a kernel's fused residual add and
    RMSNorm) over x's leading dims flattened into rows."""
    rows = math.prod(x.shape[:-1])
    total, normed = add_norm(x.reshape(rows, -1), residual=residual.reshape(rows, -1), norm_weight=norm_weight,
                             eps=eps)
    return total.reshape(residual.shape), normed.reshape(residual.shape)


def _qkv_rope_by_rows(qkv_rope, x: jax.Array, cos: jax.Array, sin: jax.Array, num_kv_heads: int,
                      q_per_kv: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`qkv_rope(x [M, K], cos=, sin=, kv_heads=, q_per_kv=)` (a kernel's fused qkv split and RoPE)
    over x's leading dims flattened into rows -> q `[..., heads, hd]`, k and v `[..., kv_heads, hd]`."""
    lead, rows = x.shape[:-1], math.prod(x.shape[:-1])
    q, k, v = qkv_rope(x.reshape(rows, -1), cos=cos.reshape(rows, -1), sin=sin.reshape(rows, -1),
                       kv_heads=num_kv_heads, q_per_kv=q_per_kv)
    head_dim = 2 * cos.shape[-1]
    return (q.reshape(*lead, num_kv_heads * q_per_kv, head_dim), k.reshape(*lead, num_kv_heads, head_dim),
            v.reshape(*lead, num_kv_heads, head_dim))


def route_dense_weight(w, num_devices: int, live_rows: jax.Array | None = None):
    """`w` as a step with one device multiplies it (a custom call is not partitioned by GSPMD, so with
    more it stays as it is): wrapped as KernelDenseWeight (computing `live_rows` rows) where it is a
    float32 or bfloat16 weight the CPU kernel takes (a PanelWeight: its panels) and the kernel runs
    here; a quantized weight given `live_rows` as LiveRowsQuantizedWeight; as it is otherwise."""
    if num_devices != 1:
        return w
    if isinstance(w, QuantizedWeight):
        return w if live_rows is None else LiveRowsQuantizedWeight(w, live_rows)
    stored = w.panels if isinstance(w, PanelWeight) else w
    if cpu_dense_dot.available() and cpu_dense_dot.serves(1, stored):
        return KernelDenseWeight(stored, live_rows)
    return w


def route_dense_weights(params, num_devices: int, live_rows: jax.Array | None = None):
    """`params` with every layer matmul weight and the head routed by `route_dense_weight`, the layers'
    computing `live_rows` rows (the head multiplies the sampled rows, a branch per row count). A tied
    head becomes an `lm_head` wrapping the embedding table, which the token lookup keeps reading
    unwrapped."""
    if num_devices != 1:
        return params
    layers = [{name: route_dense_weight(w, num_devices, live_rows) if name in LINEAR_WEIGHTS else w
               for name, w in layer.items()}
              for layer in params["layers"]]
    return {**params, "layers": layers, "lm_head": route_dense_weight(head_weight(params), num_devices)}


def attention_implementation(num_devices: int) -> str | None:
    """The backend's attention (None) on one device; under GSPMD tensor parallelism the all-XLA path,
    since a custom call such as the CPU attention kernel is not partitioned (see `ragged_paged_attention`).
    The environment variable JAXINFER_ATTENTION (xla, pallas, cpu) overrides the one-device choice, for
    A/B measurements and as a way around a kernel that fails on some device; it is read when a step is
    traced, so a built engine keeps the attention it was built with."""
    if num_devices > 1:
        return "xla"
    chosen = os.environ.get("JAXINFER_ATTENTION") or None
    if chosen not in (None, "xla", "pallas", "cpu"):
        raise EngineError(f"JAXINFER_ATTENTION={chosen!r}: use xla, pallas (GPU) or cpu, or unset it")
    return chosen


def paged_attend(q, k, v, cache, *, metadata: AttentionMetadata, sm_scale: float, implementation: str | None):
    cache = write_kv(cache, k, v, metadata.slot_mapping)
    return ragged_paged_attention(q, cache, metadata, sm_scale=sm_scale, implementation=implementation), cache


def copy_blocks(caches, block_copies: jax.Array):
    """Copies whole blocks src -> dst in order, in every layer's pool. A loop of dynamic slices keeps
    the donated pool updated in place (a gather + scatter over the pool made XLA copy all of it
    every step). It runs over the real copies only, which come first: padding rows copy the null
    block onto itself, and looping over them cost ~0.5 ms per batch-1 step of a 30-layer model."""
    num_copies = jnp.sum(block_copies[:, 0] != block_copies[:, 1])

    def copy_one(i, pools):
        def copy(pool):
            block = jax.lax.dynamic_index_in_dim(pool, block_copies[i, 0], axis=0, keepdims=True)
            return jax.lax.dynamic_update_index_in_dim(pool, block, block_copies[i, 1], axis=0)
        return jax.tree.map(copy, pools)

    return jax.lax.fori_loop(0, num_copies, copy_one, caches)


def model_step(params, kv_caches, inputs: StepInputs, sampling: SamplingMetadata, *, cfg: ModelConfig,
               num_devices: int, decode_steps: int):
    # The real tokens come first and keep their count through a multi-step call's steps.
    params = route_dense_weights(params, num_devices, live_rows=inputs.attention.query_start_loc[-1])
    kv_caches = copy_blocks(kv_caches, inputs.block_copies)
    attend = functools.partial(paged_attend, sm_scale=cfg.head_dim ** -0.5,
                               implementation=attention_implementation(num_devices))

    def one_step(caches, step_inputs: StepInputs, step_sampling: SamplingMetadata):
        hidden, caches = forward(params, cfg, step_inputs.tokens, step_inputs.positions, caches,
                                 functools.partial(attend, metadata=step_inputs.attention))
        return sample_rows(params, hidden, step_inputs, step_sampling), caches

    first, kv_caches = one_step(kv_caches, inputs, sampling)
    num_steps = decode_steps if Bucket(inputs.tokens.shape[0], inputs.logits_indices.shape[0]).is_decode else 1
    if num_steps == 1:
        return jax.tree.map(lambda a: a[None], first), kv_caches
    outputs = jax.tree.map(lambda a: jnp.zeros((num_steps,) + a.shape, a.dtype).at[0].set(a), first)
    block_size = kv_caches[0].block_size

    def next_step(i, carry):
        outputs, caches, last_tokens = carry
        out, caches = one_step(caches, *decode_step_inputs(inputs, sampling, i, last_tokens, block_size))
        return jax.tree.map(lambda all_steps, a: all_steps.at[i].set(a), outputs, out), caches, out.token_ids

    outputs, kv_caches, _ = jax.lax.fori_loop(1, jnp.minimum(inputs.num_steps, num_steps), next_step,
                                              (outputs, kv_caches, first.token_ids))
    return outputs, kv_caches


def decode_step_inputs(inputs: StepInputs, sampling: SamplingMetadata, step: jax.Array, last_tokens: jax.Array,
                       block_size: int) -> tuple[StepInputs, SamplingMetadata]:
    """Step `step` of a decode bucket's call: row r's token is the one it sampled last, `step`
    positions after its token in `inputs`; padding rows (r >= num_rows) keep position 0, length 0
    and the null block's slot 0."""
    real = jnp.arange(inputs.tokens.shape[0]) < inputs.num_rows
    positions = jnp.where(real, inputs.positions + step, 0)
    meta = inputs.attention
    rows = jnp.arange(meta.block_tables.shape[0])
    slots = meta.block_tables[rows, positions // block_size] * block_size + positions % block_size
    attention = dataclasses.replace(meta, slot_mapping=jnp.where(real, slots, 0),
                                    seq_lens=jnp.where(real, meta.seq_lens + step, 0))
    step_inputs = dataclasses.replace(inputs, tokens=jnp.where(real, last_tokens, 0), positions=positions,
                                      attention=attention)
    # The history gets the token sampled last at its output position (pads past the end are dropped).
    history = sampling.output_token_ids.at[rows, sampling.output_position + step - 1].set(last_tokens, mode="drop")
    step_sampling = dataclasses.replace(sampling, output_position=sampling.output_position + step,
                                        output_token_ids=history)
    return step_inputs, step_sampling


def sample_rows(params, hidden: jax.Array, inputs: StepInputs, sampling: SamplingMetadata) -> SamplerOutput:
    """Logits and sampling of the first `inputs.num_rows` rows, in the branch of the smallest row
    count that holds them; rows past that count come back zero."""
    num_rows = inputs.logits_indices.shape[0]
    row_ladder = Bucket(inputs.tokens.shape[0], num_rows).sampled_row_ladder

    def branch(rows: int):
        def run():
            logits = compute_logits(params, hidden[inputs.logits_indices[:rows]])
            out = sample(logits, jax.tree.map(lambda a: a[:rows], sampling))
            return jax.tree.map(lambda a: jnp.pad(a, [(0, num_rows - rows)] + [(0, 0)] * (a.ndim - 1)), out)
        return run

    index = jnp.searchsorted(jnp.asarray(row_ladder, jnp.int32), inputs.num_rows)
    return jax.lax.switch(jnp.minimum(index, len(row_ladder) - 1), [branch(rows) for rows in row_ladder])
