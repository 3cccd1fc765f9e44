"""In-graph sampling (jaxinfer.runner.sampling) against a float64 numpy oracle of the same rules."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.errors import EngineError, RequestError
from jaxinfer.runner.sampling import (build_sampling_metadata, filtered_logits, penalized_logits,
                                      sample, sampling_probs)
from jaxinfer.sampling_params import MAX_LOGPROBS, SamplingParams

VOCAB = 300
HISTORY = 24
EOS = 7


def oracle_penalized(logits, params, prompt_ids, output_ids, banned_ids):
    """One row: HF/vLLM penalties in float64, then -inf on banned ids."""
    z = logits.astype(np.float64)
    counts = np.bincount(np.asarray(output_ids, np.int64), minlength=len(z))
    for token in set(prompt_ids) | set(output_ids):
        z[token] = z[token] / params.repetition_penalty if z[token] > 0 else z[token] * params.repetition_penalty
    z = z - params.frequency_penalty * counts - params.presence_penalty * (counts > 0)
    z[list(banned_ids)] = -np.inf
    return z


def oracle_probs(penalized, params):
    """One row: the final distribution by sorting, as the module docstring defines the filters."""
    if params.temperature == 0:
        return np.eye(len(penalized))[np.argmax(penalized)]
    scaled = penalized / params.temperature
    kept = np.ones(len(scaled), bool)
    if params.min_p > 0:  # first, as vLLM v1's min-p logits processor
        kept &= scaled - scaled.max() >= np.log(params.min_p)
    if params.top_k >= 1:
        kept &= scaled >= np.sort(scaled)[::-1][params.top_k - 1]
    if params.top_p < 1:
        values = np.sort(scaled[kept])[::-1]
        probs = np.exp(values - values[0]) / np.sum(np.exp(values - values[0]))
        nucleus_size = np.argmax(np.cumsum(probs) >= params.top_p) + 1 if probs.sum() >= params.top_p else len(values)
        kept &= scaled >= values[nucleus_size - 1]
    weights = np.where(kept, np.exp(scaled - scaled.max()), 0.0)
    return weights / weights.sum()


def banned_for(params, output_ids):
    if len(output_ids) >= params.min_tokens:
        return ()
    return tuple(params.stop_token_ids) + (() if params.ignore_eos else (EOS,))


def random_rows(rng, num_rows):
    """Random params (every feature, often several at once), prompts and outputs."""
    rows = []
    for _ in range(num_rows):
        params = SamplingParams(
            temperature=float(rng.choice([0.0, 0.5, 1.0, 1.7])),
            top_k=int(rng.choice([-1, 1, 5, 40, 200])),
            top_p=float(rng.choice([1.0, 0.3, 0.8, 0.95])),
            min_p=float(rng.choice([0.0, 0.02, 0.2])),
            repetition_penalty=float(rng.choice([1.0, 0.7, 1.3])),
            presence_penalty=float(rng.choice([0.0, -0.5, 0.8])),
            frequency_penalty=float(rng.choice([0.0, 0.3, -0.2])),
            min_tokens=int(rng.choice([0, 4])), max_tokens=32,
            stop_token_ids=tuple(int(t) for t in rng.integers(0, VOCAB, rng.integers(0, 3))))
        prompt = [int(t) for t in rng.integers(0, VOCAB, rng.integers(0, HISTORY))]
        output = [int(t) for t in rng.integers(0, VOCAB, rng.integers(0, HISTORY))]
        rows.append((params, prompt, output))
    return rows


def metadata_for(rows, seeds=None, children=None, num_seqs_bucket=None, vocab=VOCAB):
    return build_sampling_metadata(
        [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
        seeds if seeds is not None else [0] * len(rows),
        children if children is not None else [0] * len(rows),
        num_seqs_bucket=num_seqs_bucket or len(rows), vocab_size=vocab, history_len=HISTORY,
        eos_token_ids=(EOS,))


def random_logits(rng, num_rows, vocab=VOCAB):
    """Rows of varied sharpness, so nuclei range from one token to most of the vocabulary."""
    scales = rng.choice([0.3, 1.0, 3.0, 8.0], size=(num_rows, 1))
    return (rng.standard_normal((num_rows, vocab)) * scales).astype(np.float32)


jit_sample = jax.jit(sample, static_argnames="max_candidates")
jit_probs = jax.jit(sampling_probs, static_argnames="max_candidates")


@pytest.mark.parametrize("max_candidates", [16, 128, 512])
def test_final_probabilities_match_oracle(max_candidates):
    rng = np.random.default_rng(max_candidates)
    rows = random_rows(rng, 48)
    logits = random_logits(rng, len(rows))
    got = np.asarray(jit_probs(logits, metadata_for(rows), max_candidates=max_candidates))
    for r, (params, prompt, output) in enumerate(rows):
        want = oracle_probs(oracle_penalized(logits[r], params, prompt, output, banned_for(params, output)), params)
        np.testing.assert_array_equal(got[r] > 0, want > 0, err_msg=f"kept set of row {r}: {params}")
        np.testing.assert_allclose(got[r], want, rtol=2e-4, atol=1e-7, err_msg=f"row {r}: {params}")


def test_exact_beyond_candidates_and_with_ties():
    """Thresholds past the candidate list (bisection) and ties straddling its end stay exact."""
    rng = np.random.default_rng(1)
    # Logits on a coarse grid: many ties, some of them across the 16th candidate.
    logits = (np.round(rng.standard_normal((12, VOCAB)) * 4) / 2).astype(np.float32)
    rows = [(SamplingParams(temperature=1.0, top_k=k, top_p=p), [], [])
            for k in (-1, 3, 15, 16, 17, 100) for p in (1.0, 0.6)]
    got = np.asarray(jit_probs(logits, metadata_for(rows), max_candidates=16))
    kept_sizes = []
    for r, (params, _, _) in enumerate(rows):
        want = oracle_probs(logits[r].astype(np.float64), params)
        kept_sizes.append(int((want > 0).sum()))
        np.testing.assert_array_equal(got[r] > 0, want > 0, err_msg=f"kept set of row {r}: {params}")
        np.testing.assert_allclose(got[r], want, rtol=2e-4, atol=1e-7)
    assert min(kept_sizes) < 16 < max(kept_sizes)


def test_greedy_is_argmax_of_penalized_logits():
    rng = np.random.default_rng(2)
    rows = [(dataclasses.replace(params, temperature=0.0), prompt, output)
            for params, prompt, output in random_rows(rng, 16)]
    logits = random_logits(rng, len(rows))
    md = metadata_for(rows, seeds=list(rng.integers(0, 2**63, len(rows))))
    got = np.asarray(jit_sample(logits, md).token_ids)
    for r, (params, prompt, output) in enumerate(rows):
        assert got[r] == np.argmax(oracle_penalized(logits[r], params, prompt, output, banned_for(params, output)))
    plain = metadata_for([(SamplingParams(temperature=0.0), [], [])] * len(rows))
    np.testing.assert_array_equal(np.asarray(jit_sample(logits, plain).token_ids), np.argmax(logits, axis=1))


def test_greedy_takes_the_first_of_tied_maxima_in_any_block():
    """A vocabulary of two whole blocks of 256 tokens (the argmax's first level) and a partial third."""
    vocab = 700
    rng = np.random.default_rng(9)
    logits = rng.standard_normal((7, vocab)).astype(np.float32)
    for row, tied in enumerate([(3, 4), (250, 600), (255, 256), (699,), (513, 699), (0, 699)]):
        logits[row, list(tied)] = 10.0 + row
    logits[6] = -np.inf
    md = metadata_for([(SamplingParams(temperature=0.0), [], [])] * len(logits), vocab=vocab)
    got = np.asarray(jit_sample(logits, md).token_ids)
    np.testing.assert_array_equal(got, [3, 250, 255, 699, 513, 0, 0])
    np.testing.assert_array_equal(got, np.argmax(logits, axis=1))


def test_penalties_follow_hf_vllm_semantics():
    rng = np.random.default_rng(3)
    rows = random_rows(rng, 16)
    logits = random_logits(rng, len(rows))
    got = np.asarray(jax.jit(penalized_logits)(logits, metadata_for(rows)))
    for r, (params, prompt, output) in enumerate(rows):
        want = oracle_penalized(logits[r], params, prompt, output, banned_for(params, output))
        np.testing.assert_allclose(got[r], want, rtol=1e-6, atol=1e-6)
    # Each penalty alone in a batch (the penalty pass is skipped for batches without any).
    for alone in ({"repetition_penalty": 1.5}, {"presence_penalty": 0.5}, {"frequency_penalty": 0.5},
                  {"min_tokens": 2, "stop_token_ids": (3, 4)}):
        params = SamplingParams(**alone)
        got = np.asarray(jax.jit(penalized_logits)(logits[:1], metadata_for([(params, [3, 5], [3, 9])])))
        want = oracle_penalized(logits[0], params, [3, 5], [3, 9], banned_for(params, [3, 9]))
        np.testing.assert_allclose(got[0], want, rtol=1e-6, atol=1e-6, err_msg=str(alone))
    # Prompt-only tokens get the repetition penalty but neither presence nor frequency penalties.
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=1.0, frequency_penalty=0.5)
    row = np.array([[3.0, -3.0, 3.0, -3.0, 1.0]], np.float32)
    md = metadata_for([(params, [0, 1], [2, 3, 3])], vocab=5)
    want = [3.0 / 2, -3.0 * 2, 3.0 / 2 - 1.0 - 0.5, -3.0 * 2 - 1.0 - 1.0, 1.0]
    np.testing.assert_allclose(np.asarray(penalized_logits(jnp.asarray(row), md))[0], want, rtol=1e-6)


def test_min_tokens_suppresses_eos_and_stop_ids_until_reached():
    rng = np.random.default_rng(4)
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(11, 12))
    logits = random_logits(rng, 4)
    logits[:, [EOS, 11, 12]] = logits.max() + np.array([3.0, 2.0, 1.0], np.float32)
    rows = [(params, [1], [5] * produced) for produced in (0, 2, 3)]
    rows.append((dataclasses.replace(params, ignore_eos=True), [1], [5]))
    got = np.asarray(jit_sample(logits, metadata_for(rows)).token_ids)
    assert got[0] not in (EOS, 11, 12) and got[1] not in (EOS, 11, 12)
    assert got[2] == EOS
    assert got[3] == EOS  # ignore_eos: eos is no stop token, so min_tokens leaves it alone


def test_logprobs_are_raw_log_softmax_for_the_rows_that_ask():
    rng = np.random.default_rng(5)
    asked = [None, 0, 5, None, MAX_LOGPROBS, 1, None, 3]
    rows = [(dataclasses.replace(params, logprobs=n), prompt, output)
            for (params, prompt, output), n in zip(random_rows(rng, 8), asked)]
    logits = random_logits(rng, len(rows))
    out = jit_sample(logits, metadata_for(rows, seeds=list(range(8))))
    log_softmax = logits - np.log(np.sum(np.exp(logits.astype(np.float64)), axis=1, keepdims=True))
    tokens = np.asarray(out.token_ids)
    ask = np.array([n is not None for n in asked])
    np.testing.assert_allclose(np.asarray(out.logprobs)[ask], log_softmax[np.arange(8), tokens][ask],
                               rtol=1e-5, atol=1e-5)
    order = np.argsort(-logits, axis=1, kind="stable")[:, :MAX_LOGPROBS]
    np.testing.assert_array_equal(np.asarray(out.top_ids)[ask], order[ask])
    np.testing.assert_allclose(np.asarray(out.top_logprobs)[ask], np.take_along_axis(log_softmax, order, 1)[ask],
                               rtol=1e-5, atol=1e-5)
    # Without a row that asks, the log-softmax and top-k are skipped; the tokens stay the same.
    plain = [(dataclasses.replace(params, logprobs=None), prompt, output) for params, prompt, output in rows]
    skipped = jit_sample(logits, metadata_for(plain, seeds=list(range(8))))
    np.testing.assert_array_equal(np.asarray(skipped.token_ids), tokens)
    assert not np.any(np.asarray(skipped.top_logprobs)) and not np.any(np.asarray(skipped.logprobs))
    # A row that asks for the sampled token's logprob alone (logprobs=0) still gets it.
    only_chosen = [(dataclasses.replace(params, logprobs=0 if r == 1 else None), prompt, output)
                   for r, (params, prompt, output) in enumerate(rows)]
    out = jit_sample(logits, metadata_for(only_chosen, seeds=list(range(8))))
    np.testing.assert_allclose(float(out.logprobs[1]), log_softmax[1, tokens[1]], rtol=1e-5, atol=1e-5)


def chi_square_p_value(counts, probs):
    expected = probs * counts.sum()
    statistic = float(np.sum((counts - expected) ** 2 / expected))
    return float(jax.scipy.stats.chi2.sf(statistic, len(probs) - 1))


@pytest.mark.parametrize("params,spread", [
    (SamplingParams(temperature=0.8, top_p=0.9, min_p=0.01), False),
    (SamplingParams(temperature=1.3, top_k=6, presence_penalty=0.5), False),
    (SamplingParams(temperature=1.0), True),
])
def test_draws_follow_the_probabilities(params, spread):
    """Frequencies over 4000 seeds fit the probabilities (chi-square, fixed seeds: deterministic)."""
    rng = np.random.default_rng(6)
    vocab = 700
    if spread:  # a dozen live tokens around the 256-token draw blocks' edges
        logits = np.full((1, vocab), -30.0, np.float32)
        live = [0, 3, 100, 255, 256, 300, 511, 512, 513, 650, 698, 699]
        logits[0, live] = rng.standard_normal(len(live))
    else:
        logits = (rng.standard_normal((1, vocab)) * 2).astype(np.float32)
    draws = 4000
    rows = [(params, [], [1, 2])] * draws
    md = metadata_for(rows, seeds=list(range(draws)), vocab=vocab)
    tokens = np.asarray(jit_sample(np.repeat(logits, draws, axis=0), md).token_ids)
    probs = np.asarray(jit_probs(logits, metadata_for(rows[:1], vocab=vocab)))[0].astype(np.float64)
    counts = np.bincount(tokens, minlength=vocab)
    assert counts[probs == 0].sum() == 0
    live_tokens = probs > 0
    assert live_tokens.sum() > 3
    assert chi_square_p_value(counts[live_tokens], probs[live_tokens] / probs[live_tokens].sum()) > 1e-3


def test_same_seed_and_position_give_same_token_in_any_batch():
    """Alone in its bucket, among greedy rows (the only row that draws), or among random rows."""
    rng = np.random.default_rng(7)
    request = (SamplingParams(temperature=1.0, top_p=0.9), [4, 5], [6])
    request_logits = rng.standard_normal((1, VOCAB)).astype(np.float32)  # flat: the draw is rarely the argmax
    tokens = []
    for num_rows, row, padding, greedy_others in ((1, 0, 0, False), (4, 2, 0, True), (4, 0, 2, False),
                                                  (4, 3, 2, False), (16, 9, 2, False)):
        others = random_rows(rng, num_rows)
        if greedy_others:
            others = [(dataclasses.replace(params, temperature=0.0), prompt, output) for params, prompt, output in others]
        rows = others[:row] + [request] + others[row + 1:]
        seeds = list(rng.integers(0, 2**63, num_rows))
        seeds[row] = 1234567890123
        logits = random_logits(rng, num_rows + padding)  # padding rows of the bucket are greedy
        logits[row] = request_logits[0]
        out = jit_sample(logits, metadata_for(rows, seeds=seeds, num_seqs_bucket=num_rows + padding))
        tokens.append(int(np.asarray(out.token_ids)[row]))
    assert len(set(tokens)) == 1 and tokens[0] != int(np.argmax(request_logits)), tokens


def test_seed_children_and_positions_are_separate_streams():
    logits = np.random.default_rng(8).standard_normal((1, VOCAB)).astype(np.float32)
    params = SamplingParams(temperature=1.0)
    num = 64

    def draws(seeds, children, output_lengths):
        rows = [(params, [], [0] * n) for n in output_lengths]
        md = metadata_for(rows, seeds=seeds, children=children)
        return np.asarray(jit_sample(np.repeat(logits, num, axis=0), md).token_ids)

    base = draws([42] * num, [0] * num, range(num))
    np.testing.assert_array_equal(base, draws([42] * num, [0] * num, range(num)))
    assert (base != draws([42] * num, [1] * num, range(num))).mean() > 0.5
    assert (base != draws([43] * num, [0] * num, range(num))).mean() > 0.5
    assert len(set(base.tolist())) > num // 4  # positions advance the stream


def test_greedy_rows_leave_the_filters_off_so_the_batch_skips_them(rng):
    # A greedy row's top-k/top-p/min-p change nothing it draws; left on, they would make the whole
    # batch run the filters' top_k and bisection.
    greedy = SamplingParams(temperature=0.0, top_k=int(rng.integers(1, 500)), top_p=0.5, min_p=0.2)
    sampled = SamplingParams(temperature=0.8, top_k=int(rng.integers(1, 500)), top_p=0.9, min_p=0.1)
    md = build_sampling_metadata([greedy, sampled], [[1], [2]], [[], []], [0, 1], [0, 0], num_seqs_bucket=2,
                                 vocab_size=VOCAB, history_len=4)
    assert md.top_k.tolist() == [-1, sampled.top_k] and md.top_p.tolist() == pytest.approx([1.0, 0.9])
    assert md.min_p.tolist() == pytest.approx([0.0, 0.1])


@pytest.mark.parametrize("given, temperature", [(1e-6, 0.0), (1e-40, 0.0), (3e-3, 1e-2), (0.5, 0.5)])
def test_tiny_temperatures_are_greedy_or_raised_as_in_vllm(given, temperature):
    assert SamplingParams(temperature=given).temperature == pytest.approx(temperature)
    assert SamplingParams(top_k=0).top_k == -1


def test_builder_pads_with_greedy_rows_and_rejects_bad_input():
    params = SamplingParams(temperature=0.7, top_k=5, repetition_penalty=1.2, seed=3)
    md = build_sampling_metadata([params], [[1, 2]], [[3]], [2**40 + 5], [2], num_seqs_bucket=4,
                                 vocab_size=VOCAB, history_len=4)
    assert md.temperature.tolist() == pytest.approx([0.7, 0, 0, 0])
    assert md.top_k.tolist() == [5, -1, -1, -1]
    assert md.seed[0].tolist() == [2**8, 5] and md.child_index[0] == 2 and md.output_position[0] == 1
    assert md.prompt_token_ids[0].tolist() == [1, 2, VOCAB, VOCAB]
    assert (md.output_token_ids[1:] == VOCAB).all()
    build = functools.partial(build_sampling_metadata, num_seqs_bucket=1, vocab_size=VOCAB, history_len=4)
    with pytest.raises(RequestError, match="history bucket"):
        build([params], [[1] * 5], [[]], [0], [0])
    with pytest.raises(RequestError, match="token ids must lie"):
        build([params], [[VOCAB]], [[]], [0], [0])
    with pytest.raises(EngineError, match="sequence bucket"):
        build([params] * 2, [[1]] * 2, [[]] * 2, [0] * 2, [0] * 2)


def test_filtered_logits_of_greedy_rows_keep_only_the_argmax():
    rng = np.random.default_rng(9)
    logits = random_logits(rng, 3)
    md = metadata_for([(SamplingParams(temperature=0.0), [], [])] * 3)
    filtered, greedy_ids = filtered_logits(jnp.asarray(logits), md)
    np.testing.assert_array_equal(np.asarray(greedy_ids), np.argmax(logits, axis=1))
    assert (np.isfinite(np.asarray(filtered)).sum(axis=1) == 1).all()


def test_draw_never_picks_a_zero_weight_token_at_extreme_uniforms():
    """u = 1 and the smallest u land on live tokens even with dead tokens around every block edge."""
    from jaxinfer.runner.sampling import _draw

    rng = np.random.default_rng(10)
    vocab = 600
    filtered = np.full((6, vocab), -np.inf, np.float32)
    live = [(1, 254), (256, 257), (300, 510), (513,), (0,), (599,)]
    for row, tokens in enumerate(live):
        filtered[row, list(tokens)] = rng.standard_normal(len(tokens))
    for uniforms in ([1.0, 1.0], [2.0**-23, 2.0**-23], [1.0, 2.0**-23], [2.0**-23, 1.0]):
        drawn = np.asarray(_draw(jnp.asarray(filtered), jnp.full(6, -jnp.inf), jnp.max(filtered, axis=1),
                                 jnp.tile(jnp.asarray(uniforms, jnp.float32), (6, 1))))
        for row, tokens in enumerate(live):
            assert drawn[row] in tokens, (uniforms, row, drawn[row])
