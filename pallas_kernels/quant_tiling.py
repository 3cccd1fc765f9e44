"""Shared plumbing of the quantized matmul kernels: implementation choice, tile sizes, the tiled call.

Every quantized matmul computes `out [M, N] = x [M, K] @ W [K, N]` where W is stored in some
compressed form. Its Pallas kernel runs on a 2-D grid of `(M / block_m, N / block_n)` output tiles
(Triton lowering style: each program owns one output tile and loops over K itself). Operands come
in two kinds:
    row operands     leading axis M (activations `[M, K]`, per-token scales `[M]`): program (i, j)
                     sees rows `i*block_m : (i+1)*block_m`, all of the other axes;
    column operands  trailing axis N (weights `[K', N]`, scales `[N]` or `[groups, N]`): program
                     (i, j) sees columns `j*block_n : (j+1)*block_n`, all of the other axes.
M need not be a multiple of block_m (M = 1 in decode): row operands are zero-padded to the next
multiple and the extra output rows dropped. N and K must be multiples of their tiles (true of
every Llama projection); `pallas_supports` says whether a shape fits.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

IMPLEMENTATIONS = ("pallas", "interpret", "xla", "reference")

# Triton's tl.dot needs every block dimension to be at least 16 and a power of two.
MIN_BLOCK = 16
MAX_BLOCK_M = 64
BLOCK_N_CHOICES = (128, 64, 32, 16)
BLOCK_K_CHOICES = (128, 64, 32, 16)


def resolve_implementation(implementation: str | None, *, tileable: bool = True) -> str:
    """The implementation to run: `None` means Pallas on GPU (for a `tileable` weight shape) and the
    measured-fastest XLA formulation otherwise.

    Interpret mode is only ever used when asked for: it is orders of magnitude slower than XLA.
    """
    if implementation is None:
        return "pallas" if tileable and jax.default_backend() == "gpu" else "xla"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown matmul implementation {implementation!r}; use one of {IMPLEMENTATIONS} or None")
    return implementation


def dispatch(
    implementation: str | None,
    *,
    tileable: bool,
    pallas: Callable[..., jax.Array],
    xla: Callable[..., jax.Array],
    reference: Callable[..., jax.Array],
) -> Callable[..., jax.Array]:
    """The function of a kernel module that `implementation` names (`pallas` takes `interpret=`).

    `tileable`: whether the Pallas kernel can tile this weight shape (see `pallas_supports`).
    """
    chosen = resolve_implementation(implementation, tileable=tileable)
    if chosen == "reference":
        return reference
    if chosen == "xla":
        return xla
    return functools.partial(pallas, interpret=chosen == "interpret")


def _largest_dividing_block(size: int, choices: Sequence[int]) -> int | None:
    return next((block for block in choices if size % block == 0), None)


def pallas_supports(k: int, n: int) -> bool:
    """Whether the Pallas kernels can tile a `[K, N]` weight (K: the depth of one K-loop step or more)."""
    return k % MIN_BLOCK == 0 and n % MIN_BLOCK == 0


def block_rows(m: int) -> int:
    """Row tile for M activation rows: the next power of two, between 16 and 64."""
    return min(MAX_BLOCK_M, max(MIN_BLOCK, pl.next_power_of_2(m)))


def block_cols(n: int) -> int:
    block = _largest_dividing_block(n, BLOCK_N_CHOICES)
    if block is None:
        raise ValueError(f"the Pallas quantized matmul needs the output size N to be a multiple of {MIN_BLOCK}, got {n}")
    return block


def block_depth(k: int) -> int:
    block = _largest_dividing_block(k, BLOCK_K_CHOICES)
    if block is None:
        raise ValueError(f"the Pallas quantized matmul needs the input size K to be a multiple of {MIN_BLOCK}, got {k}")
    return block


def pad_rows(x: jax.Array, multiple: int) -> jax.Array:
    """`x` with zero rows appended along axis 0 up to a multiple of `multiple`."""
    padding = -x.shape[0] % multiple
    if padding == 0:
        return x
    return jnp.pad(x, [(0, padding)] + [(0, 0)] * (x.ndim - 1))


def accumulate_over_k(num_steps: int, step: Callable[[int, jax.Array], jax.Array], init: jax.Array) -> jax.Array:
    """`init` updated by `step(k_index, acc)` for k_index in 0..num_steps-1 (the kernel's K loop)."""
    return lax.fori_loop(0, num_steps, step, init)


def _row_spec(operand: jax.Array, block_m: int) -> pl.BlockSpec:
    rest = operand.shape[1:]
    return pl.BlockSpec((block_m, *rest), lambda i, j: (i,) + (0,) * len(rest))


def _col_spec(operand: jax.Array, block_n: int) -> pl.BlockSpec:
    rest = operand.shape[:-1]
    return pl.BlockSpec((*rest, block_n), lambda i, j: (0,) * len(rest) + (j,))


def check_tileable_weight(w) -> None:
    """Raises a ValueError naming a weight the tiled kernels cannot read (one packed for the CPU kernel)."""
    if getattr(w, "ndim", None) != 2:  # any array type; a cpu_int8_dot.PackedInt8 has no ndim
        got = f"shape {w.shape}" if hasattr(w, "shape") else f"a {type(w).__name__}"
        raise ValueError(f"the Pallas kernels read a [K, N] weight array, got {got}: a weight packed for the "
                         "CPU kernel (`cpu_int8_dot.unpack` restores it) runs with implementation='xla'")


def tiled_matmul_call(
    kernel: Callable[..., None],
    row_operands: Sequence[jax.Array],
    col_operands: Sequence[jax.Array],
    *,
    out_dtype: jnp.dtype,
    interpret: bool,
) -> jax.Array:
    """Runs `kernel(*row_refs, *col_refs, out_ref)` over the output tiles; returns `[M, N]` of `out_dtype`.

    `row_operands[0]` is the `[M, K]` activation and `col_operands[0]` the `[K', N]` weight.
    """
    check_tileable_weight(col_operands[0])
    m = row_operands[0].shape[0]
    n = col_operands[0].shape[-1]
    block_m, block_n = block_rows(m), block_cols(n)
    padded_rows = [pad_rows(operand, block_m) for operand in row_operands]
    padded_m = padded_rows[0].shape[0]
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((padded_m, n), out_dtype),
        grid=(padded_m // block_m, n // block_n),
        in_specs=[_row_spec(a, block_m) for a in padded_rows] + [_col_spec(a, block_n) for a in col_operands],
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        interpret=interpret,
    )(*padded_rows, *col_operands)
    return out[:m]
