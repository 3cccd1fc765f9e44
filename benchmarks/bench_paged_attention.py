"""Paged attention on this backend: the paged paths against a contiguous-cache dense reference.

For each case it times one attention call, in interleaved rounds so that load from other processes
hits all of them alike. Decode cases (--batches x --contexts): one query token per sequence, every
sequence at the full context. Prefill cases (--prefill-lens): one sequence's first chunk of that many
tokens, causal. The paths:
    contiguous  dense attention over a contiguous cache [B, context, kv_heads, head_dim], the formula of
                jaxinfer.reference (einsum, causal mask, softmax): what attention costs without paging.
    xla         ragged_paged_attention(implementation="xla") over a pool whose blocks are shuffled.
    kernel      the engine's choice on one device: on a GPU the Pallas kernel, on a CPU the C++ kernel
                (pallas_kernels/cpu_paged_attention) where the CPU runs it, else the XLA path.
    in-order    the engine's choice again, each sequence's blocks adjacent in the pool (locality only).
With --layers N a round calls each path once for each of N layers' caches (distinct random K/V), so
that at N = 30 (a SmolLM2 step) the K/V rows come from memory as in a decode step, not from cache.
It prints medians, paged / contiguous for the engine's choice (the cost of paging; the target is
< 1.2), xla / kernel, and the engine's choice's rate: K/V bytes read per second for decodes, the
attention's flops (4 x heads x head_dim per visible query-key pair) per second for prefills.

    .venv/bin/python benchmarks/bench_paged_attention.py [--batches 1,8,32] [--contexts 128,512,2048]
        [--prefill-lens 128,512,2048] [--kv-dtype float32] [--block-size 16] [--rounds 20] [--layers 1]
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.bench.latency import kv_bytes_per_position
from jaxinfer.cache.attention_metadata import AttentionMetadata
from jaxinfer.cache.kv_pool import LayerKVCache, dequantize_kv, init_layer_cache, storage_dtype, write_kv
from pallas_kernels import cpu_paged_attention
from pallas_kernels.ragged_paged_attention import default_implementation, ragged_paged_attention

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 9, 3, 64  # SmolLM2-135M
SM_SCALE = HEAD_DIM ** -0.5
HIGHEST = jax.lax.Precision.HIGHEST  # float32 math on a GPU too, whose default is TF32


def contiguous_attention(q: jax.Array, cache: LayerKVCache, lengths: jax.Array) -> jax.Array:
    """q [B * new, heads, hd] (each sequence's `new` last positions), a contiguous cache (k/v [B, context,
    kv_heads, hd], scales [B, context, kv_heads] when quantized), lengths [B] -> [B * new, heads, hd],
    float32 math."""
    batch, context = cache.k.shape[:2]
    new = q.shape[0] // batch
    k, v = dequantize_kv(cache.k, cache.k_scale), dequantize_kv(cache.v, cache.v_scale)
    grouped = q.astype(jnp.float32).reshape(batch, new, NUM_KV_HEADS, NUM_Q_HEADS // NUM_KV_HEADS, HEAD_DIM)
    scores = jnp.einsum("btkgd,blkd->btkgl", grouped, k, precision=HIGHEST) * SM_SCALE
    query_pos = lengths[:, None] - new + jnp.arange(new)
    visible = jnp.arange(context)[None, None, :] <= query_pos[:, :, None]
    probs = jax.nn.softmax(jnp.where(visible[:, :, None, None, :], scores, -jnp.inf), axis=-1)
    return jnp.einsum("btkgl,blkd->btkgd", probs, v, precision=HIGHEST).reshape(q.shape).astype(q.dtype)


def attention_case(batch: int, context: int, new: int, block_size: int, kv_dtype: str, shuffled: bool,
                   seed: int = 0):
    """(q, paged cache, metadata, contiguous cache) holding the same random K/V, each sequence's last
    `new` positions as its query chunk; the contiguous cache is a LayerKVCache with one block of
    `context` tokens per sequence."""
    rng = np.random.default_rng(seed)
    blocks_per_seq = -(-context // block_size)
    physical = np.arange(1, batch * blocks_per_seq + 1)
    if shuffled:
        physical = rng.permutation(physical)
    tables = physical.reshape(batch, blocks_per_seq).astype(np.int32)
    positions = np.arange(context)
    slots = (tables[:, positions // block_size] * block_size + positions % block_size).reshape(-1)
    shape = (batch * context, NUM_KV_HEADS, HEAD_DIM)
    k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))
    cache = write_kv(init_layer_cache(batch * blocks_per_seq + 1, block_size, NUM_KV_HEADS, HEAD_DIM, kv_dtype),
                     k, v, jnp.asarray(slots, jnp.int32))
    metadata = AttentionMetadata(
        slot_mapping=jnp.asarray(slots.reshape(batch, context)[:, context - new:].reshape(-1)),
        block_tables=jnp.asarray(tables), seq_lens=jnp.full((batch,), context, jnp.int32),
        query_start_loc=jnp.arange(batch + 1, dtype=jnp.int32) * new)
    q = jnp.asarray(rng.standard_normal((batch * new, NUM_Q_HEADS, HEAD_DIM)), jnp.float32)

    def contiguous(pool: jax.Array | None) -> jax.Array | None:
        if pool is None:
            return None
        rows = pool.reshape((-1,) + pool.shape[2:])[slots]
        return jax.device_put(rows.reshape((batch, context) + pool.shape[2:]))

    return q, cache, metadata, LayerKVCache(**{name: contiguous(pool) for name, pool in vars(cache).items()})


def interleaved_medians(calls: dict, rounds: int) -> dict[str, float]:
    """Median seconds per call, timing every call once per round."""
    for call in calls.values():
        jax.block_until_ready(call())
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(values)) for name, values in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--contexts", default="128,512,2048")
    parser.add_argument("--prefill-lens", default="128,512,2048")
    parser.add_argument("--kv-dtype", default="float32", choices=["float32", "bfloat16", "int8", "fp8"])
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--layers", type=int, default=1,
                        help="times per round one call each to this many layers' caches (30: a SmolLM2 step's K/V, "
                             "which come from memory rather than cache)")
    args = parser.parse_args()
    storage_dtype(args.kv_dtype)

    def paged(implementation: str):
        return jax.jit(functools.partial(ragged_paged_attention, sm_scale=SM_SCALE, implementation=implementation))

    xla_attention = paged("xla")
    choice = default_implementation(init_layer_cache(2, args.block_size, NUM_KV_HEADS, HEAD_DIM, args.kv_dtype))
    engine_attention = paged(choice)
    contiguous_jit = jax.jit(contiguous_attention)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}; heads {NUM_Q_HEADS}/{NUM_KV_HEADS}/{HEAD_DIM}, block {args.block_size}, "
          f"kv {args.kv_dtype}, median of {args.rounds} interleaved rounds; kernel = {choice!r}")
    print(f"{'batch':>5} {'context':>7} {'new':>5} {'contiguous ms':>13} {'xla ms':>7} {'kernel ms':>9} "
          f"{'in-order ms':>11} {'kernel/contig':>13} {'xla/kernel':>10} {'kernel rate':>16}")
    cases = [(batch, context, 1) for batch in map(int, args.batches.split(","))
             for context in map(int, args.contexts.split(","))]
    cases += [(1, length, length) for length in map(int, args.prefill_lens.split(",")) if length > 1]
    for batch, context, new in cases:
        # One case per layer, each with its own random K/V: a round calls every path once per layer.
        layers = [attention_case(batch, context, new, args.block_size, args.kv_dtype, shuffled=True, seed=layer)
                  for layer in range(args.layers)]
        ordered = [attention_case(batch, context, new, args.block_size, args.kv_dtype, shuffled=False, seed=layer)[:3]
                   for layer in range(args.layers)]

        def per_layer(path, cases):
            return lambda: [path(*case) for case in cases][-1]

        outputs = {"contiguous": per_layer(contiguous_jit, [(c[0], c[3], c[2].seq_lens) for c in layers]),
                   "xla": per_layer(xla_attention, [c[:3] for c in layers]),
                   "kernel": per_layer(engine_attention, [c[:3] for c in layers]),
                   "in-order": per_layer(engine_attention, ordered)}
        # The CPU kernel's bfloat16 prefill paths round q and the softmax weights to bfloat16.
        tolerance = cpu_paged_attention.bf16_prefill_tolerance(layers[0][1]) or 1e-5
        for name in ("xla", "kernel"):
            expected = outputs["contiguous"]()
            np.testing.assert_allclose(outputs[name](), expected, rtol=1e-4, atol=tolerance * np.max(np.abs(expected)))
        seconds = interleaved_medians(outputs, args.rounds)
        if new == 1:
            kv_bytes = kv_bytes_per_position([case[1] for case in layers]) * batch * context
            rate = f"{kv_bytes / seconds['kernel'] / 1e9:.1f} KV GB/s"
        else:
            visible_pairs = batch * (new * (context - new) + new * (new + 1) // 2)
            rate = f"{4 * NUM_Q_HEADS * HEAD_DIM * visible_pairs * args.layers / seconds['kernel'] / 1e9:.1f} GFLOP/s"
        print(f"{batch:>5} {context:>7} {new:>5} {seconds['contiguous'] * 1e3:>13.3f} {seconds['xla'] * 1e3:>7.3f} "
              f"{seconds['kernel'] * 1e3:>9.3f} {seconds['in-order'] * 1e3:>11.3f} "
              f"{seconds['kernel'] / seconds['contiguous']:>13.2f} {seconds['xla'] / seconds['kernel']:>10.2f} "
              f"{rate:>16}")


if __name__ == "__main__":
    main()
