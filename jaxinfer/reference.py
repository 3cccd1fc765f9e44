"""Reference generation with a contiguous KV cache: the oracle the paged, batched engine must match.

Deliberately simple: a batch of same-length prompts `[B, S]`, a cache `[B, max_len, kv_heads,
head_dim]` per layer, dense causal attention over it, one prefill call and then one decode call per
token. Greedy, or seeded temperature sampling. It shares the model (jaxinfer.model.llama) with the
engine and nothing else: no paging, no scheduling, no bucketing.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.model.config import ModelConfig
from jaxinfer.model.llama import compute_logits, forward


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ContiguousKV:
    k: jax.Array  # [B, max_len, kv_heads, head_dim]
    v: jax.Array


def contiguous_attend(q, k, v, cache: ContiguousKV, *, start: jax.Array, sm_scale: float):
    """Writes k/v `[B, S, kv_heads, hd]` at positions `start..start+S` and attends causally.
    q `[B, S, heads, hd]` -> `[B, S, heads, hd]`."""
    cache = ContiguousKV(jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, start, 0, 0)),
                         jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, start, 0, 0)))
    batch, seq, heads, head_dim = q.shape
    kv_heads = cache.k.shape[2]
    grouped = q.reshape(batch, seq, kv_heads, heads // kv_heads, head_dim)
    scores = jnp.einsum("bskgd,blkd->bkgsl", grouped, cache.k, preferred_element_type=jnp.float32) * sm_scale
    query_pos = start + jnp.arange(seq)
    key_pos = jnp.arange(cache.k.shape[1])
    scores = jnp.where(key_pos[None, :] <= query_pos[:, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgsl,blkd->bskgd", probs, cache.v.astype(jnp.float32))
    return out.reshape(q.shape).astype(q.dtype), cache


def _step(params, cfg: ModelConfig, tokens, start, caches):
    positions = jnp.broadcast_to(start + jnp.arange(tokens.shape[1]), tokens.shape)
    attend = functools.partial(contiguous_attend, start=start, sm_scale=cfg.head_dim ** -0.5)
    hidden, caches = forward(params, cfg, tokens, positions, caches, attend)
    return compute_logits(params, hidden[:, -1]), caches


class ReferenceGenerator:
    """Generates from same-length prompts with a contiguous cache of `max_len` tokens."""

    def __init__(self, params, cfg: ModelConfig, max_len: int):
        self.params, self.cfg, self.max_len = params, cfg, max_len
        self._step = jax.jit(functools.partial(_step, cfg=cfg), donate_argnames="caches")

    def empty_caches(self, batch: int) -> list[ContiguousKV]:
        dtype = self.params["final_norm"].dtype
        shape = (batch, self.max_len, self.cfg.num_kv_heads, self.cfg.head_dim)
        return [ContiguousKV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(self.cfg.num_layers)]

    def prompt_logits(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """float32 logits `[B, S, vocab]` at every prompt position (one forward pass, no cache reuse)."""
        tokens = jnp.asarray(prompts, dtype=jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        attend = functools.partial(contiguous_attend, start=jnp.int32(0), sm_scale=self.cfg.head_dim ** -0.5)
        hidden, _ = jax.jit(forward, static_argnums=(1, 5))(
            self.params, self.cfg, tokens, positions, self.empty_caches(tokens.shape[0]), attend)
        return np.asarray(compute_logits(self.params, hidden))

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
                 seed: int = 0, stop_token_ids: Sequence[int] = ()) -> list[list[int]]:
        """New tokens per prompt. A row stops at a stop token (kept in its output) or after
        `max_new_tokens`; sampling (temperature > 0) draws from a key folded with the step index."""
        tokens = np.asarray(prompts, dtype=np.int32)
        batch, prompt_len = tokens.shape
        if prompt_len + max_new_tokens > self.max_len:
            raise ValueError(f"prompt {prompt_len} + {max_new_tokens} new tokens exceed max_len {self.max_len}")
        caches = self.empty_caches(batch)
        logits, caches = self._step(self.params, tokens=jnp.asarray(tokens), start=jnp.int32(0), caches=caches)
        outputs: list[list[int]] = [[] for _ in range(batch)]
        done = np.zeros(batch, dtype=bool)
        key = jax.random.key(seed)
        for step in range(max_new_tokens):
            if temperature > 0:
                next_tokens = jax.random.categorical(jax.random.fold_in(key, step), logits / temperature)
            else:
                next_tokens = jnp.argmax(logits, axis=-1)
            next_tokens = np.asarray(next_tokens, dtype=np.int32)
            for row in np.flatnonzero(~done):
                outputs[row].append(int(next_tokens[row]))
                done[row] = next_tokens[row] in stop_token_ids
            if done.all() or step == max_new_tokens - 1:
                break
            logits, caches = self._step(self.params, tokens=jnp.asarray(next_tokens[:, None]),
                                        start=jnp.int32(prompt_len + step), caches=caches)
        return outputs
