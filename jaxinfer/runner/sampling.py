"""In-graph token sampling for the compiled model step, and the host-side builder of its inputs.

`sample(logits, metadata)` runs inside the jitted step (fixed shapes, no Python control flow on
array values). Shapes: S = sequence bucket (rows), V = vocabulary, L = history bucket (chosen by
the caller), E = suppressed-token bucket, N = min(MAX_LOGPROBS, V).

    logits   [S, V] float32    the model's raw next-token logits
    returns  SamplerOutput:
        token_ids     [S] int32       the sampled (or greedy) token of each row
        logprobs      [S] float32     log_softmax(raw logits)[token]: the *unmodified* model
                                      distribution, as vLLM reports by default
        top_ids       [S, N] int32    the N most likely tokens under the raw logits, best first
        top_logprobs  [S, N] float32  their log-probabilities
    The last three are computed only when some row's request asks for logprobs (zeros otherwise).

Per row, in this order: repetition penalty (on tokens of the prompt or the output: positive logits
divided by it, negative ones multiplied, as in HF/vLLM), frequency and presence penalties (output
tokens only), min_tokens suppression (listed token ids get -inf), temperature, top-k, top-p,
min-p, then one draw. Rows with temperature 0 are greedy: the first argmax of the penalized logits.

Filter semantics (ties at a threshold are all kept, like vLLM's top-k):
    top-k  keep tokens whose logit >= the k-th largest (top_k = -1 disables; any value < 1 does).
    top-p  over the tokens min-p and top-k kept, renormalized and sorted by probability, the nucleus is the
           shortest prefix whose probability sum reaches top_p; keep tokens >= its last one.
    min-p  keep tokens whose probability >= min_p * the largest probability; applied first, as
           vLLM v1 does, so top-p's nucleus is taken over the min-p survivors (min-p's ratios do
           not change under renormalization, so its place against top-k is immaterial).

Cost: the top-k/top-p thresholds come from `lax.top_k` of `max_candidates` values per row, which
is exact whenever the threshold lies strictly above the last candidate (no tie reaches past it).
Rows where it does not (k > max_candidates, or a flat distribution whose nucleus is longer) are
resolved exactly by a 32-step bisection over the float bit patterns of the full row, run only when
some row needs it. A full sort of [S, V] is avoided: on CPU it is 50-200x slower than `lax.top_k`.
The draw is an exact two-level inverse CDF (block of 256 tokens, then token within the block),
with two uniforms per row, so no [S, V] random numbers or cumulative sums are materialized; the
greedy argmax is two-level the same way. The filters and the draw run only when some row samples,
and the log-softmax and `lax.top_k` of the logprobs only when some row asks for them: on the 2-core
Zen 2 VM a greedy step without logprobs went from 7.8 to 1.5 ms at S = 32 (and from 0.36 to 0.20 at
S = 1), sampling at temperature 1 from 7.7 to 3.4 (benchmarks/bench_sampling.py), where a bfloat16
decode step at S = 32 takes 120-140 ms. The two-level argmax then took a greedy `sample` at S = 64
on the Xeon VM from about 3.7 to 0.8 ms, and with the changes to the draw and the filters noted
below, one at temperature 0.7 from about 8 to 4 (in-process A/B, 2026-12-05).

Randomness: each row's uniforms come from the threefry key
fold_in(fold_in(key(seed), child_index), output_position), so the same request and seed give the
same token at the same output position whatever the batch, the row, or the bucket; child i of an
n > 1 request is its own stream. Requests without a seed get one drawn by the engine at admission.

History (for penalties): prompt and output token ids padded to [S, L] with an out-of-range id (the
builder uses V); counts are built in-graph with a scatter-add that drops the pads, so no dense
[S, V] array crosses from host to device per step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.errors import EngineError, RequestError
from jaxinfer.sampling_params import MAX_LOGPROBS, SamplingParams

# Measured on 2 CPU cores at V = 49152, S = 32: lax.top_k of 128 candidates adds about half the
# cost of the rest of sampling (64 were only ~10% cheaper); it covers top-k up to 127 and the
# nuclei of peaked distributions.
DEFAULT_MAX_CANDIDATES = 128
DEFAULT_SUPPRESS_LEN = 8
_BLOCK = 256  # tokens per block of the two-level passes: the greedy argmax and the draw
_BISECTION_STEPS = 32  # bit patterns of float32 span 2**32 values


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingMetadata:
    """Per-row sampling inputs of one step (numpy from the builder, or device arrays).

    temperature           [S] float32   0 = greedy
    top_k                 [S] int32     -1 = disabled
    top_p                 [S] float32   1 = disabled
    min_p                 [S] float32   0 = disabled
    repetition_penalty    [S] float32   1 = disabled
    presence_penalty      [S] float32   0 = disabled
    frequency_penalty     [S] float32   0 = disabled
    seed                  [S, 2] uint32 the request seed as (high, low) 32-bit words
    child_index           [S] int32     which of the request's n samples this row is
    output_position       [S] int32     number of output tokens the row already has
    prompt_token_ids      [S, L] int32  prompt ids, padded with ids >= V (ignored)
    output_token_ids      [S, L] int32  output ids, padded with ids >= V
    suppressed_token_ids  [S, E] int32  ids banned this step (min_tokens), padded with ids >= V
    num_logprobs          [S] int32     top logprobs the row's request returns (0: only the sampled
                                        token's); -1 = no logprobs
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    min_p: jax.Array
    repetition_penalty: jax.Array
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    seed: jax.Array
    child_index: jax.Array
    output_position: jax.Array
    prompt_token_ids: jax.Array
    output_token_ids: jax.Array
    suppressed_token_ids: jax.Array
    num_logprobs: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerOutput:
    """What the compiled step returns per row; see the module docstring for shapes."""

    token_ids: jax.Array
    logprobs: jax.Array
    top_ids: jax.Array
    top_logprobs: jax.Array


def build_sampling_metadata(
    params_list: Sequence[SamplingParams],
    prompt_ids_list: Sequence[Sequence[int]],
    output_ids_list: Sequence[Sequence[int]],
    seeds: Sequence[int],
    child_indices: Sequence[int],
    *,
    num_seqs_bucket: int,
    vocab_size: int,
    history_len: int,
    eos_token_ids: Sequence[int] = (),
    suppress_len: int = DEFAULT_SUPPRESS_LEN,
) -> SamplingMetadata:
    """Packs one step's rows into numpy arrays of the bucket's shapes.

    Row r samples the next token of a sequence with `params_list[r]`, whose prompt and output so
    far are `prompt_ids_list[r]` and `output_ids_list[r]` (its output position is the length of
    the latter), with the request's resolved seed `seeds[r]` and sample index `child_indices[r]`.
    Histories are only filled for rows with penalties, which must fit in `history_len`; the token
    ids of other rows are never read (any sequence of the output's length will do). Until a
    row has `min_tokens` outputs, its stop token ids and (unless `ignore_eos`) `eos_token_ids`
    are suppressed; they must fit in `suppress_len`. Rows past the given ones are greedy padding.
    """
    num_rows = len(params_list)
    columns = (prompt_ids_list, output_ids_list, seeds, child_indices)
    if any(len(column) != num_rows for column in columns):
        raise EngineError("build_sampling_metadata: params, prompts, outputs, seeds and child indices "
                          "must have one entry per row")
    if num_rows > num_seqs_bucket:
        raise EngineError(f"{num_rows} sampled rows do not fit the sequence bucket of {num_seqs_bucket}; "
                          "select a bucket with at least as many rows")
    pad_id = vocab_size
    rows = num_seqs_bucket
    temperature = np.zeros(rows, np.float32)
    top_k = np.full(rows, -1, np.int32)
    top_p = np.ones(rows, np.float32)
    min_p = np.zeros(rows, np.float32)
    repetition_penalty = np.ones(rows, np.float32)
    presence_penalty = np.zeros(rows, np.float32)
    frequency_penalty = np.zeros(rows, np.float32)
    seed_words = np.zeros((rows, 2), np.uint32)
    child_index = np.zeros(rows, np.int32)
    output_position = np.zeros(rows, np.int32)
    prompt_history = np.full((rows, history_len), pad_id, np.int32)
    output_history = np.full((rows, history_len), pad_id, np.int32)
    suppressed = np.full((rows, suppress_len), pad_id, np.int32)
    num_logprobs = np.full(rows, -1, np.int32)
    for r, (params, prompt_ids, output_ids, seed, child) in enumerate(zip(params_list, *columns)):
        temperature[r] = params.temperature
        if params.temperature > 0:  # a greedy row's filters would change nothing, but cost the batch's draw
            top_k[r] = params.top_k
            top_p[r] = params.top_p
            min_p[r] = params.min_p
        repetition_penalty[r] = params.repetition_penalty
        presence_penalty[r] = params.presence_penalty
        frequency_penalty[r] = params.frequency_penalty
        seed_words[r] = (seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF
        child_index[r] = child
        output_position[r] = len(output_ids)
        num_logprobs[r] = -1 if params.logprobs is None else params.logprobs
        if params.uses_penalties:
            _fill_history(prompt_history[r], prompt_ids, "prompt", vocab_size)
            _fill_history(output_history[r], output_ids, "output", vocab_size)
        if len(output_ids) < params.min_tokens:
            banned = tuple(params.stop_token_ids) + (() if params.ignore_eos else tuple(eos_token_ids))
            _fill_history(suppressed[r], sorted(set(banned)), "stop/eos", vocab_size)
    return SamplingMetadata(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty, seed=seed_words, child_index=child_index,
        output_position=output_position, prompt_token_ids=prompt_history,
        output_token_ids=output_history, suppressed_token_ids=suppressed, num_logprobs=num_logprobs)


def _fill_history(row: np.ndarray, token_ids: Sequence[int], what: str, vocab_size: int) -> None:
    ids = np.asarray(token_ids, np.int64)
    if len(ids) > len(row):
        raise RequestError(f"{len(ids)} {what} token ids do not fit the sampling history bucket of "
                           f"{len(row)}; build the sampling metadata with a larger bucket "
                           "(history_len >= max_model_len, suppress_len >= the stop ids allowed)")
    if len(ids) and (ids.min() < 0 or ids.max() >= vocab_size):
        raise RequestError(f"{what} token ids must lie in [0, {vocab_size}); got {ids.min()}..{ids.max()}")
    row[:len(ids)] = ids


def penalized_logits(logits: jax.Array, md: SamplingMetadata) -> jax.Array:
    """[S, V] float32 logits after repetition/frequency/presence penalties and min_tokens bans."""
    return jax.lax.cond(_penalties_active(md, logits.shape[1]), _apply_penalties, lambda values, _: values,
                        logits, md)


def _penalties_active(md: SamplingMetadata, vocab: int) -> jax.Array:
    """Whether some row has penalties or bans. Skipping them is exact: neutral penalties and no
    bans leave every value unchanged bit for bit."""
    return (jnp.any(md.repetition_penalty != 1) | jnp.any(md.presence_penalty != 0)
            | jnp.any(md.frequency_penalty != 0) | jnp.any(md.suppressed_token_ids < vocab))


def _apply_penalties(logits: jax.Array, md: SamplingMetadata) -> jax.Array:
    num_rows, vocab = logits.shape
    rows = jnp.arange(num_rows)[:, None]

    def counts(token_ids):
        return jnp.zeros((num_rows, vocab), jnp.int32).at[rows, token_ids].add(1, mode="drop")

    output_counts = counts(md.output_token_ids)
    seen = (counts(md.prompt_token_ids) + output_counts) > 0
    repetition = md.repetition_penalty[:, None]
    penalized = jnp.where(seen, jnp.where(logits > 0, logits / repetition, logits * repetition), logits)
    penalized = (penalized - md.frequency_penalty[:, None] * output_counts
                 - md.presence_penalty[:, None] * (output_counts > 0))
    return penalized.at[rows, md.suppressed_token_ids].set(-jnp.inf, mode="drop")


@dataclasses.dataclass(frozen=True)
class _Filtered:
    """Each row's distribution before the draw: softmax(scaled) over scaled >= threshold."""

    scaled: jax.Array      # [S, V] penalized logits / temperature (greedy rows: / 1)
    threshold: jax.Array   # [S] smallest kept scaled logit
    row_max: jax.Array     # [S] max of scaled (always kept)


def _filter(penalized: jax.Array, penalized_max: jax.Array, md: SamplingMetadata,
            max_candidates: int) -> _Filtered:
    """The filters' result from the penalized logits [S, V] and their row maxima [S]."""
    temperature = jnp.where(md.temperature == 0, 1.0, md.temperature)
    # One [S, V] array for the top-k/top-p cond and the draw: recomputed at each use (a fusion's
    # input), sampling at S = 64 took 1.1-1.4x as long on the Zen 3 VM, though on the Xeon VM it
    # had saved 2.7 ms by not writing the array out where the cond skipped it.
    scaled = penalized / temperature[:, None]
    # Division by a positive number is monotone in floating point too: the max maps to the max.
    row_max = penalized_max / temperature
    threshold = _filter_threshold(scaled, row_max, md, max_candidates)
    return _Filtered(scaled=scaled, threshold=threshold, row_max=row_max)


def filtered_logits(logits: jax.Array, md: SamplingMetadata,
                    max_candidates: int = DEFAULT_MAX_CANDIDATES) -> tuple[jax.Array, jax.Array]:
    """The distribution each row draws from, as logits, and the greedy tokens.

    Returns ([S, V] float32 temperature-scaled logits with -inf outside the kept tokens; greedy
    rows keep only their argmax, at 0) and ([S] int32 first argmax of the penalized logits).
    """
    penalized = penalized_logits(logits, md)
    greedy_ids, penalized_max = _first_argmax(penalized)
    filtered = _filter(penalized, penalized_max, md, max_candidates)
    kept = jnp.where(filtered.scaled >= filtered.threshold[:, None], filtered.scaled, -jnp.inf)
    vocab_ids = jnp.arange(logits.shape[1])
    greedy_only = jnp.where(vocab_ids[None, :] == greedy_ids[:, None], 0.0, -jnp.inf)
    return jnp.where((md.temperature == 0)[:, None], greedy_only, kept), greedy_ids


def sampling_probs(logits: jax.Array, md: SamplingMetadata,
                   max_candidates: int = DEFAULT_MAX_CANDIDATES) -> jax.Array:
    """[S, V] float32: the final probabilities `sample` draws each row's token from."""
    return jax.nn.softmax(filtered_logits(logits, md, max_candidates)[0], axis=-1)


def sample(logits: jax.Array, md: SamplingMetadata,
           max_candidates: int = DEFAULT_MAX_CANDIDATES) -> SamplerOutput:
    """Draws one token per row; see the module docstring. `max_candidates` is static."""
    if logits.shape[0] != md.temperature.shape[0]:
        raise EngineError(f"sample: logits have {logits.shape[0]} rows but the sampling metadata "
                          f"{md.temperature.shape[0]}; build both for the same sequence bucket")
    logits = logits.astype(jnp.float32)
    # Each branch pair below gives every row that reads its result the same value whichever
    # branch runs, so a row's token and logprobs never depend on the other rows of the batch.
    # The greedy tokens come out of their cond as [S] arrays: a cond that returned the penalized
    # [S, V] logits would copy them whenever it skipped the penalties (1 ms at S = 64). A batch
    # with penalties that also samples then takes them twice, here and in the draw (about even
    # with before at S = 64, top-p with penalties).
    penalties = _penalties_active(md, logits.shape[1])
    greedy_ids, penalized_max = jax.lax.cond(
        penalties, lambda: _first_argmax(_apply_penalties(logits, md)), lambda: _first_argmax(logits))

    def draw(penalized: jax.Array) -> jax.Array:
        filtered = _filter(penalized, penalized_max, md, max_candidates)
        return _draw(filtered.scaled, filtered.threshold, filtered.row_max, _row_uniforms(md))

    # The draw is traced with and without the penalties, so that the cond between them returns
    # [S] tokens: one choosing between the penalized and the plain [S, V] logits copied them.
    # With the single `scaled` above, sampling at S = 64 took 0.71x as long at temperature 0.7,
    # 0.8-0.9x with top-p or penalties (interleaved in-process runs, Zen 3 VM, 2026-12-07).
    drawn = jax.lax.cond(
        jnp.any(md.temperature != 0),
        lambda: jax.lax.cond(penalties, lambda: draw(_apply_penalties(logits, md)), lambda: draw(logits)),
        lambda: greedy_ids)
    token_ids = jnp.where(md.temperature == 0, greedy_ids, drawn).astype(jnp.int32)
    logprobs, top_ids, top_logprobs = jax.lax.cond(
        jnp.any(md.num_logprobs >= 0), _logprobs, _no_logprobs, logits, token_ids)
    return SamplerOutput(token_ids=token_ids, logprobs=logprobs, top_ids=top_ids, top_logprobs=top_logprobs)


def _logprobs(logits: jax.Array, token_ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The sampled tokens' log-softmax [S], and the N most likely tokens [S, N] with theirs."""
    log_norm = jax.nn.logsumexp(logits, axis=-1)
    top_values, top_ids = jax.lax.top_k(logits, min(MAX_LOGPROBS, logits.shape[1]))
    chosen = jnp.take_along_axis(logits, token_ids[:, None], axis=1)[:, 0]
    return chosen - log_norm, top_ids.astype(jnp.int32), top_values - log_norm[:, None]


def _no_logprobs(logits: jax.Array, token_ids: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Zeros of `_logprobs`' shapes and dtypes (taken from it, so the branches cannot disagree)."""
    return jax.tree.map(lambda shape: jnp.zeros(shape.shape, shape.dtype), jax.eval_shape(_logprobs, logits, token_ids))


def _first_argmax(values: jax.Array) -> tuple[jax.Array, jax.Array]:
    """([S] int32 first index of each row's max, [S] the max)."""
    # In two levels, the maxima of blocks of _BLOCK tokens, then the first block that holds the
    # row's max and the first such token in it: one pass over [S, V] and two small ones. The
    # one-level form (a [S, V] select of indices where values equal the max, then their min)
    # writes and reads an int32 [S, V] and took 3.7 ms of a greedy `sample` at S = 64 on the Xeon
    # VM against 0.7 here; XLA:CPU's variadic argmax reduce is slower still on [S, V].
    blocks = _blocks(values, -jnp.inf)
    # The barrier keeps XLA from turning the max of the block maxima into a second pass over [S, V].
    block_max = jax.lax.optimization_barrier(jnp.max(blocks, axis=2))
    row_max = jnp.max(block_max, axis=1)
    first_block = jnp.argmax(block_max == row_max[:, None], axis=1)
    block = jnp.take_along_axis(blocks, first_block[:, None, None], axis=1)[:, 0]
    within = jnp.argmax(block == row_max[:, None], axis=1)
    return (first_block * _BLOCK + within).astype(jnp.int32), row_max


def _blocks(values: jax.Array, fill: float) -> jax.Array:
    """[S, V] -> [S, ceil(V / _BLOCK), _BLOCK], the last block padded with `fill`."""
    num_rows, vocab = values.shape
    num_blocks = -(-vocab // _BLOCK)
    return jnp.pad(values, ((0, 0), (0, num_blocks * _BLOCK - vocab)), constant_values=fill).reshape(
        num_rows, num_blocks, _BLOCK)


def _filter_threshold(scaled: jax.Array, row_max: jax.Array, md: SamplingMetadata, max_candidates: int) -> jax.Array:
    """[S] float32: the smallest kept scaled logit (`scaled` [S, V]) allowed by top-k, top-p and min-p."""
    min_p_threshold = row_max + jnp.log(md.min_p)
    needs_candidates = jnp.any((md.top_k >= 1) | (md.top_p < 1))
    no_threshold = jnp.full_like(row_max, -jnp.inf)
    top_k_p_threshold = jax.lax.cond(
        needs_candidates,
        lambda: _top_k_top_p_threshold(scaled, row_max, md.top_k, md.top_p, min_p_threshold, max_candidates),
        lambda: no_threshold)
    return jnp.maximum(top_k_p_threshold, min_p_threshold)


def _top_k_top_p_threshold(scaled, row_max, top_k, top_p, min_p_threshold, max_candidates):
    """[S]: max of the top-k and top-p thresholds, from candidates where exact, else bisection;
    top-p's nucleus is taken over the tokens min-p and top-k keep (above `min_p_threshold` [S])."""
    num_rows, vocab = scaled.shape
    width = min(max_candidates, vocab)
    candidates = jax.lax.top_k(scaled, width)[0]
    k_active = top_k >= 1
    p_active = top_p < 1
    last = candidates[:, -1]
    complete = width == vocab

    kth = jnp.take_along_axis(candidates, jnp.clip(top_k - 1, 0, width - 1)[:, None], axis=1)[:, 0]
    top_k_threshold = jnp.where(k_active, kth, -jnp.inf)
    k_resolved = complete | ~k_active | (top_k_threshold > last)
    # Rows resolved by the candidates keep their value whichever branch runs, so a row's result
    # never depends on the other rows of the batch.
    top_k_threshold = jax.lax.cond(
        jnp.all(k_resolved),
        lambda: top_k_threshold,
        lambda: jnp.where(k_resolved, top_k_threshold,
                          _bisect_threshold(scaled, jnp.ones_like(scaled), top_k.astype(jnp.float32))))

    # The tokens top-p renormalizes over: those min-p and top-k keep. Where all of them are
    # candidates their mass comes from the candidates, else from the whole row.
    floor = jnp.maximum(top_k_threshold, min_p_threshold)
    kept = candidates >= floor[:, None]
    row_log_norm = row_max + jnp.log(jnp.sum(jnp.where(scaled >= floor[:, None], jnp.exp(scaled - row_max[:, None]),
                                                       0.0), axis=1))
    kept_log_norm = jnp.where(complete | (floor > last),
                              jax.nn.logsumexp(jnp.where(kept, candidates, -jnp.inf), axis=1), row_log_norm)
    probs = jnp.where(kept, jnp.exp(candidates - kept_log_norm[:, None]), 0.0)
    mass_before = jnp.concatenate([jnp.zeros((num_rows, 1), probs.dtype), jnp.cumsum(probs, axis=1)[:, :-1]], 1)
    nucleus_size = jnp.sum(kept & (mass_before < top_p[:, None]), axis=1)
    nucleus_last = jnp.take_along_axis(candidates, jnp.maximum(nucleus_size - 1, 0)[:, None], axis=1)[:, 0]
    top_p_threshold = jnp.where(p_active, nucleus_last, -jnp.inf)
    p_resolved = ~p_active | (k_resolved & (complete | (top_p_threshold > last)))

    def bisect_top_p():
        weights = jnp.where(scaled >= floor[:, None], jnp.exp(scaled - row_max[:, None]), 0.0)
        target = top_p * jnp.sum(weights, axis=1)
        return jnp.where(p_resolved, top_p_threshold, _bisect_threshold(scaled, weights, target))

    top_p_threshold = jax.lax.cond(jnp.all(p_resolved), lambda: top_p_threshold, bisect_top_p)
    return jnp.maximum(top_k_threshold, top_p_threshold)


def _bisect_threshold(scaled: jax.Array, weights: jax.Array, target: jax.Array) -> jax.Array:
    """[S]: the largest t with sum(weights[scaled >= t]) >= target, a value of the row itself.

    Bisection over float32 bit patterns mapped to order-preserving int32 keys: 32 steps pin an
    exact element, where a float bisection would only approach it.
    """
    def passes(key):
        threshold = _key_to_float(key)
        return jnp.sum(jnp.where(scaled >= threshold[:, None], weights, 0.0), axis=1) >= target

    def step(_, bounds):
        low, high = bounds
        middle = (low >> 1) + (high >> 1) + (low & high & 1)  # floor((low + high) / 2) without overflow
        ok = passes(middle)
        return jnp.where(ok, middle, low), jnp.where(ok, high, middle)

    low = _float_to_key(jnp.min(scaled, axis=1))
    high = _float_to_key(jnp.max(scaled, axis=1)) + 1
    low, _ = jax.lax.fori_loop(0, _BISECTION_STEPS, step, (low, high))
    return _key_to_float(low)


def _float_to_key(values: jax.Array) -> jax.Array:
    bits = jax.lax.bitcast_convert_type(values, jnp.int32)
    return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _key_to_float(keys: jax.Array) -> jax.Array:
    bits = jnp.where(keys < 0, keys ^ 0x7FFFFFFF, keys)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _row_uniforms(md: SamplingMetadata) -> jax.Array:
    """[S, 2] float32 in (0, 1], a function of (seed, child_index, output_position) only."""
    def row(seed_words, child, position):
        key = jax.random.wrap_key_data(seed_words, impl="threefry2x32")
        key = jax.random.fold_in(jax.random.fold_in(key, child), position)
        return 1.0 - jax.random.uniform(key, (2,), jnp.float32)

    return jax.vmap(row)(md.seed.astype(jnp.uint32), md.child_index, md.output_position)


def _draw(scaled: jax.Array, threshold: jax.Array, row_max: jax.Array, uniforms: jax.Array) -> jax.Array:
    """[S] int32: one token per row from softmax(scaled) over scaled >= threshold, by a block of
    tokens, then a token within it; `row_max` [S] is the largest kept value of each row."""
    def weights(values):  # scaled values [S, ...] -> their unnormalized probabilities
        shape = (-1,) + (1,) * (values.ndim - 1)
        return jnp.where(values >= threshold.reshape(shape), jnp.exp(values - row_max.reshape(shape)), 0.0)

    # The chosen block's weights are taken again from its scaled values, so that the [S, V] weights
    # have one use, the block sums: with two, XLA:CPU wrote out the exponentials and then the
    # weights as two arrays (sampling at S = 64 took 0.82-0.88x as long with one, Xeon VM).
    blocks = _blocks(scaled, -jnp.inf)
    block = _inverse_cdf(jnp.sum(weights(blocks), axis=2), uniforms[:, 0])
    chosen = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]
    return block * _BLOCK + _inverse_cdf(weights(chosen), uniforms[:, 1])


def _inverse_cdf(weights: jax.Array, uniform: jax.Array) -> jax.Array:
    """[S] int32: the first index whose cumulative weight reaches uniform * total (uniform in (0, 1]).

    With uniform > 0 the index found always has a positive weight, and with the total taken as the
    last cumulative sum itself it never runs past the end.
    """
    cumulative = jnp.cumsum(weights, axis=1)
    target = uniform * cumulative[:, -1]
    return jnp.sum(cumulative < target[:, None], axis=1).astype(jnp.int32)
