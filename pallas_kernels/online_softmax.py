"""One KV step of flash attention's online softmax, shared by the XLA path and the Pallas kernel.

State per query row (any leading batch axes `...`):
    running_max [..., rows] f32, denominator [..., rows] f32, accumulator [..., rows, d] f32.
`online_softmax_step` folds in logits [..., rows, cols] (scaled, capped) under a boolean mask of the
same shape; masked entries get probability 0 through `jnp.where`, so NaN or Inf behind the mask (from
unused pool blocks) never reaches the result. The values must be masked the same way by the caller:
`weighted_sum(probs, values)` multiplies them, and 0 * NaN is NaN.

The split form, for work lists whose items may belong to any state entry: `chunk_softmax` turns one
item's logits into a partial state of its own (same layout, leading axis = items), and
`merge_partials` folds a batch of them into the state rows `index` [items] names, repeats allowed.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# Finite, so that rows whose every logit is masked keep exp(0 - 0) = 1 scale factors rather than NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

SoftmaxState = tuple[jax.Array, jax.Array, jax.Array]


def cap_logits(logits: jax.Array, soft_cap: float | None) -> jax.Array:
    """Gemma-style soft cap: soft_cap * tanh(logits / soft_cap); identity when soft_cap is None."""
    if soft_cap is None:
        return logits
    return soft_cap * jnp.tanh(logits / soft_cap)


def initial_state(rows_shape: tuple[int, ...], value_dim: int) -> SoftmaxState:
    return (jnp.full(rows_shape, MASK_VALUE, jnp.float32), jnp.zeros(rows_shape, jnp.float32),
            jnp.zeros(rows_shape + (value_dim,), jnp.float32))


def online_softmax_step(state: SoftmaxState, logits: jax.Array, mask: jax.Array, values: jax.Array,
                        weighted_sum: Callable[[jax.Array, jax.Array], jax.Array]) -> SoftmaxState:
    running_max, denominator, accumulator = state
    new_max = jnp.maximum(running_max, jnp.max(jnp.where(mask, logits, MASK_VALUE), axis=-1))
    rescale = jnp.exp(running_max - new_max)
    probs = jnp.where(mask, jnp.exp(logits - new_max[..., None]), 0.0)
    return (new_max, denominator * rescale + jnp.sum(probs, axis=-1),
            accumulator * rescale[..., None] + weighted_sum(probs, values))


def chunk_softmax(logits: jax.Array, mask: jax.Array, values: jax.Array,
                  weighted_sum: Callable[[jax.Array, jax.Array], jax.Array]) -> SoftmaxState:
    """The softmax state of one chunk alone: `online_softmax_step` from the initial state."""
    return online_softmax_step(initial_state(logits.shape[:-1], values.shape[-1]), logits, mask, values,
                               weighted_sum)


def merge_partials(state: SoftmaxState, index: jax.Array, partials: SoftmaxState) -> SoftmaxState:
    """Fold partial states [items, ...] into state rows `index` [items]; items sharing a row all count."""
    running_max, denominator, accumulator = state
    part_max, part_denominator, part_accumulator = partials
    new_max = running_max.at[index].max(part_max)
    rescale = jnp.exp(running_max - new_max)
    part_rescale = jnp.exp(part_max - new_max[index])
    return (new_max, (denominator * rescale).at[index].add(part_denominator * part_rescale),
            (accumulator * rescale[..., None]).at[index].add(part_accumulator * part_rescale[..., None]))


def finish(state: SoftmaxState) -> jax.Array:
    """accumulator / denominator; rows that saw no unmasked position come out as zeros."""
    _, denominator, accumulator = state
    return accumulator / jnp.where(denominator > 0, denominator, 1.0)[..., None]
