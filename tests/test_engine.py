"""The engine against the reference generation path (the oracle), token for token in f32.

Workloads mix many concurrent requests, chunked prefill (a small token budget), prefix-cache hits
(shared prompt prefixes), preemption forced by a tiny KV pool, and n > 1; afterwards every KV block
must be back in the pool.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CHECKPOINTS_DIR
from jaxinfer.checkpoint import load_checkpoint
from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.create import engine_from_checkpoint
from jaxinfer.model.llama import compute_logits
from jaxinfer.model.panel_weight import has_panel_weights, uses_panel_weights
from jaxinfer.model.sharding import make_mesh, place_params
from jaxinfer.reference import ReferenceGenerator
from jaxinfer.runner.batch import build_step_inputs
from jaxinfer.runner.buckets import Bucket
from jaxinfer.runner.sampling import build_sampling_metadata, sample
from jaxinfer.runner.step import sample_rows
from jaxinfer.sampling_params import SamplingParams
from pallas_kernels import cpu_dense_dot, cpu_paged_attention

CHECKPOINT = CHECKPOINTS_DIR / "tiny-llama3"
MAX_LEN = 128


@pytest.fixture(scope="module")
def checkpoint():
    return load_checkpoint(CHECKPOINT)


@pytest.fixture(scope="module")
def reference(checkpoint):
    params, cfg = place_params(checkpoint.params, checkpoint.config, make_mesh(1), "float32")
    return ReferenceGenerator(params, cfg, max_len=MAX_LEN)


def make_engine(checkpoint, **overrides):
    settings = dict(dtype="float32", max_num_seqs=8, max_num_batched_tokens=32, max_model_len=MAX_LEN,
                    kv_memory="4MiB", min_token_bucket=16) | overrides
    return engine_from_checkpoint(checkpoint, EngineConfig.create(**settings), progress=False)


@pytest.fixture(scope="module")
def engine(checkpoint):
    return make_engine(checkpoint)


@pytest.fixture(scope="module")
def tiny_pool_engine(checkpoint):
    """13 blocks of 16 tokens (12 usable): 8 sequences of up to 80 tokens cannot all stay resident."""
    cfg = checkpoint.config
    bytes_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    return make_engine(checkpoint, kv_memory=str(13 * 16 * bytes_per_token))


def run_all(engine, requests):
    """requests: list of (request_id, prompt ids, SamplingParams); returns finished outputs by id."""
    for request_id, prompt, params in requests:
        engine.add_request(request_id, prompt_token_ids=prompt, params=params)
    finished = {}
    for _ in range(10_000):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    return finished


def assert_pool_whole(engine):
    metrics = engine.scheduler.block_manager.metrics()
    assert metrics.num_used_blocks == 0, metrics


def random_prompts(rng, count, vocab, shared_prefix=()):
    return [list(shared_prefix) + rng.integers(3, vocab, rng.integers(1, 40)).tolist() for _ in range(count)]


def expected_greedy(reference, prompt, max_tokens):
    return reference.generate([prompt], max_tokens)[0]


def test_concurrent_chunked_prefix_cached_greedy_matches_reference(checkpoint, reference, engine):
    rng = np.random.default_rng(0)
    vocab = checkpoint.config.vocab_size
    system_prompt = rng.integers(3, vocab, 37).tolist()  # two full blocks and a partial one shared
    prompts = random_prompts(rng, 6, vocab) + random_prompts(rng, 6, vocab, system_prompt)
    max_tokens = [int(rng.integers(1, 24)) for _ in prompts]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    finished = run_all(engine, [(f"r{i}", p, s) for i, (p, s) in enumerate(zip(prompts, params))])
    for i, (prompt, m) in enumerate(zip(prompts, max_tokens)):
        assert finished[f"r{i}"].outputs[0].token_ids == expected_greedy(reference, prompt, m), f"request r{i}"
        assert finished[f"r{i}"].outputs[0].finish_reason == "length"
    assert max(out.num_cached_tokens for out in finished.values()) >= 32  # the shared blocks were reused
    assert_pool_whole(engine)


def test_preemption_under_tiny_pool_still_matches_reference(checkpoint, reference, tiny_pool_engine):
    engine = tiny_pool_engine
    rng = np.random.default_rng(1)
    prompts = random_prompts(rng, 8, checkpoint.config.vocab_size)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    finished = run_all(engine, [(f"r{i}", p, params) for i, p in enumerate(prompts)])
    assert engine.scheduler.metrics().num_preemptions > 0
    for i, prompt in enumerate(prompts):
        assert finished[f"r{i}"].outputs[0].token_ids == expected_greedy(reference, prompt, 40)
    assert_pool_whole(engine)


def test_n_greater_than_one_greedy_samples_all_equal_reference(checkpoint, reference, engine):
    rng = np.random.default_rng(2)
    prompt = rng.integers(3, checkpoint.config.vocab_size, 21).tolist()
    finished = run_all(engine, [("fork", prompt, SamplingParams(n=3, temperature=0, max_tokens=20, ignore_eos=True))])
    expected = expected_greedy(reference, prompt, 20)
    assert [o.token_ids for o in finished["fork"].outputs] == [expected] * 3
    assert_pool_whole(engine)


def test_seeded_sampling_is_reproducible_whatever_the_batch(checkpoint, engine):
    rng = np.random.default_rng(3)
    vocab = checkpoint.config.vocab_size
    prompt = rng.integers(3, vocab, 17).tolist()
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=24, ignore_eos=True)
    alone = run_all(engine, [("alone", prompt, params)])["alone"].outputs[0].token_ids
    others = [(f"o{i}", p, SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True))
              for i, p in enumerate(random_prompts(rng, 5, vocab))]
    crowded = run_all(engine, others[:3] + [("crowded", prompt, params)] + others[3:])
    assert crowded["crowded"].outputs[0].token_ids == alone
    other_seed = run_all(engine, [("x", prompt, dataclasses.replace(params, seed=99))])
    assert other_seed["x"].outputs[0].token_ids != alone
    assert_pool_whole(engine)


def test_aborts_and_stops_return_every_block(checkpoint, tiny_pool_engine):
    engine = tiny_pool_engine
    rng = np.random.default_rng(4)
    vocab = checkpoint.config.vocab_size
    for i, prompt in enumerate(random_prompts(rng, 10, vocab)):
        engine.add_request(f"r{i}", prompt_token_ids=prompt,
                           params=SamplingParams(temperature=1.0, seed=i, max_tokens=int(rng.integers(1, 60)),
                                                 n=int(rng.integers(1, 3))))
    for step in range(400):
        if not engine.has_unfinished_requests():
            break
        engine.step()
        if step % 3 == 0:
            engine.abort(f"r{rng.integers(0, 10)}")
    assert not engine.has_unfinished_requests()
    assert_pool_whole(engine)


def test_stop_strings_on_detokenized_text(checkpoint, reference, engine):
    rng = np.random.default_rng(5)
    prompt = rng.integers(3, checkpoint.config.vocab_size, 9).tolist()
    expected = expected_greedy(reference, prompt, 30)
    tok = checkpoint.tokenizer
    full_text = tok.decode(expected)
    stop = full_text[len(full_text) // 2:len(full_text) // 2 + 3]
    out = run_all(engine, [("s", prompt, SamplingParams(temperature=0, max_tokens=30, stop=(stop,), ignore_eos=True))])
    completion = out["s"].outputs[0]
    assert completion.finish_reason == "stop"
    assert stop not in completion.text and full_text.startswith(completion.text)
    assert completion.text == full_text[:full_text.index(stop)]


def test_steps_at_the_midpoint_buckets_of_a_finer_ladder_match_reference(checkpoint, reference):
    """With two buckets per doubling, prompts of 17-24 and 33-48 tokens run at the 24- and 48-token
    buckets (not 32 and 64), and decodes of 3 sequences at 4: the tokens are the reference's."""
    engine = make_engine(checkpoint, buckets_per_doubling=2, max_num_batched_tokens=48, decode_steps=1)
    ran, execute = [], engine.runner.execute

    def recording_execute(out, seed_of):
        ran.append(engine.runner.bucket_of(out).name)
        return execute(out, seed_of)

    engine.runner.execute = recording_execute
    rng = np.random.default_rng(7)
    vocab = checkpoint.config.vocab_size
    for lengths in ((20,), (40,), (5, 6, 7)):
        prompts = [rng.integers(3, vocab, n).tolist() for n in lengths]
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        finished = run_all(engine, [(f"r{i}", p, params) for i, p in enumerate(prompts)])
        for i, prompt in enumerate(prompts):
            assert finished[f"r{i}"].outputs[0].token_ids == expected_greedy(reference, prompt, 6), (lengths, i)
    assert {"t24_s8", "t48_s8", "t1_s1", "t4_s4"} <= set(ran), ran
    assert_pool_whole(engine)


def test_multi_step_decode_matches_single_steps(checkpoint, reference, engine):
    """The engine's decode calls of several model steps (engine.yaml's decode_steps) against an engine
    that runs one step a call, on a workload that ends sequences inside a call (stop tokens after
    min_tokens, stop strings, max_tokens) and samples with seeds, penalties, top-k/p and n = 2: the
    same tokens, finish reasons, text and logprobs, while most decode calls ran several steps."""
    assert engine.engine_cfg.decode_steps > 1
    single_step = make_engine(checkpoint, decode_steps=1)
    rng = np.random.default_rng(8)
    vocab = checkpoint.config.vocab_size
    prompts = random_prompts(rng, 9, vocab)
    greedy = [expected_greedy(reference, prompt, 30) for prompt in prompts[:3]]
    text = checkpoint.tokenizer.decode(greedy[2])
    seeded = dict(temperature=0.8, top_p=0.9, top_k=40, max_tokens=27)
    params = [
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=(greedy[0][6],), ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=(greedy[1][9],), min_tokens=5, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=30, stop=(text[len(text) // 2:len(text) // 2 + 3],), ignore_eos=True),
        SamplingParams(**seeded, seed=1, logprobs=3),
        SamplingParams(**seeded, seed=2, repetition_penalty=1.3, frequency_penalty=0.5, presence_penalty=0.3),
        SamplingParams(**seeded, seed=3, n=2),
        SamplingParams(temperature=1.0, seed=4, max_tokens=1),
        SamplingParams(temperature=0, max_tokens=60, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=5, max_tokens=19, logprobs=1),
    ]
    requests = [(f"r{i}", prompt, p) for i, (prompt, p) in enumerate(zip(prompts, params))]
    calls = []
    execute = engine.runner.execute
    engine.runner.execute = lambda out, seed_of: calls.append(out.num_steps) or execute(out, seed_of)
    try:
        got = run_all(engine, requests)
    finally:
        del engine.runner.execute
    want = run_all(single_step, requests)
    for request_id, expected in want.items():
        for out, ref in zip(got[request_id].outputs, expected.outputs, strict=True):
            assert (out.token_ids, out.finish_reason, out.text) == (ref.token_ids, ref.finish_reason, ref.text), request_id
            if ref.logprobs is not None:
                for step, ref_step in zip(out.logprobs, ref.logprobs, strict=True):
                    assert step.keys() == ref_step.keys()
                    np.testing.assert_allclose(list(step.values()), list(ref_step.values()), atol=1e-5)
    assert [want[r].outputs[0].finish_reason for r in ("r0", "r2")] == ["stop"] * 2
    assert len(want["r1"].outputs[0].token_ids) >= 5
    assert max(calls) == engine.engine_cfg.decode_steps and sum(calls) > 2 * len(calls), calls
    assert_pool_whole(engine)
    assert_pool_whole(single_step)


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_engine_matches_reference(tp):
    """tiny-smollm2 has 2 KV heads: tp=4 also exercises head padding."""
    checkpoint = load_checkpoint(CHECKPOINTS_DIR / "tiny-smollm2")
    params, cfg = place_params(checkpoint.params, checkpoint.config, make_mesh(1), "float32")
    reference = ReferenceGenerator(params, cfg, max_len=MAX_LEN)
    engine = make_engine(checkpoint, tp=tp, max_num_seqs=4, max_num_batched_tokens=16)
    rng = np.random.default_rng(6)
    prompts = random_prompts(rng, 5, cfg.vocab_size)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    finished = run_all(engine, [(f"r{i}", p, params) for i, p in enumerate(prompts)])
    for i, prompt in enumerate(prompts):
        assert finished[f"r{i}"].outputs[0].token_ids == expected_greedy(reference, prompt, 12)
    assert_pool_whole(engine)
    # GSPMD does not partition custom calls: sharded steps keep attention and matmuls in XLA operations.
    assert not any(kernel.TARGET in step.as_text() for step in engine.runner.executables.values()
                   for kernel in (cpu_dense_dot, cpu_paged_attention))


@pytest.mark.parametrize("name", ["tiny-llama3", "tiny-smollm2"])
def test_bfloat16_engine_tracks_the_bfloat16_reference(name):
    """A bfloat16 engine (on x86 with AMX, every matmul in the CPU dense kernel's AMX loop from the
    weights stored as its panels, a tied embedding table (tiny-smollm2) looked up through them; on
    AVX512-BF16 CPUs without AMX, its batch-2-8 decodes in the kernel's AVX512-BF16 loop) against
    XLA's bfloat16 reference on the same tokens. bfloat16 activations round differently when sums
    run in another order, so instead of equal greedy tokens: each generated token is the
    reference's argmax or within 0.05 nats of it, with the logprob the reference gives it (within
    0.02). Where the CPU multiplies prefill attention in bfloat16 (AMX-BF16, or AVX512-BF16 without
    AMX: tiny models' head_dim of 16 takes only the latter), it rounds the softmax weights to
    bfloat16 before P V, as FlashAttention does on GPUs: the logprobs then differ by up to 0.0125
    here (Zen 4 VM); elsewhere by 1e-6."""
    checkpoint = load_checkpoint(CHECKPOINTS_DIR / name)
    params, cfg = place_params(checkpoint.params, checkpoint.config, make_mesh(1), "bfloat16")
    reference = ReferenceGenerator(params, cfg, max_len=MAX_LEN)
    engine = make_engine(checkpoint, dtype="bfloat16")
    rng = np.random.default_rng(7)
    prompts = random_prompts(rng, 6, cfg.vocab_size)
    sampling = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=0)
    finished = run_all(engine, [(f"r{i}", p, sampling) for i, p in enumerate(prompts)])
    for i, prompt in enumerate(prompts):
        out = finished[f"r{i}"].outputs[0]
        logits = reference.prompt_logits([prompt + out.token_ids[:-1]])[0][len(prompt) - 1:]
        logprobs = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        chosen = logprobs[np.arange(len(out.token_ids)), out.token_ids]
        assert np.all(chosen >= logprobs.max(-1) - 0.05), (i, logprobs.max(-1) - chosen)
        engine_logprobs = np.array([step[token] for step, token in zip(out.logprobs, out.token_ids)])
        np.testing.assert_allclose(engine_logprobs, chosen, atol=0.02)
    assert_pool_whole(engine)
    steps = [step.as_text() for step in engine.runner.executables.values()]
    assert all(cpu_dense_dot.TARGET in hlo for hlo in steps) == cpu_dense_dot.available()
    assert has_panel_weights(engine.runner.params) == uses_panel_weights("bfloat16", None, 1)


def test_head_and_sampling_run_at_the_smallest_row_count_that_holds_the_rows(checkpoint):
    """A mixed bucket's step samples its real rows in the branch of the smallest row count holding
    them: the same tokens and logprobs as sampling every row, and zeros past that row count."""
    assert Bucket(64, 32).sampled_row_ladder == [1, 4, 16, 32] and Bucket(8, 8).sampled_row_ladder == [8]
    params, cfg = place_params(checkpoint.params, checkpoint.config, make_mesh(1), "float32")
    rng = np.random.default_rng(5)
    bucket = Bucket(24, 8)
    inputs, _ = build_step_inputs((), (), bucket, 16, 4)
    hidden = jnp.asarray(rng.standard_normal((bucket.num_tokens, cfg.hidden_size)), jnp.float32)
    indices = jnp.asarray(rng.permutation(bucket.num_tokens)[:bucket.num_seqs], jnp.int32)
    for num_rows in (1, 3, 4, 5, 8):
        rows = [SamplingParams(temperature=float(rng.choice([0.0, 0.8])), top_k=40, seed=i) for i in range(num_rows)]
        sampling = build_sampling_metadata(rows, [[1, 2]] * num_rows, [[]] * num_rows, list(range(num_rows)),
                                           [0] * num_rows, num_seqs_bucket=bucket.num_seqs,
                                           vocab_size=cfg.vocab_size, history_len=8)
        step = dataclasses.replace(inputs, logits_indices=indices, num_rows=np.int32(num_rows))
        got = jax.jit(sample_rows)(params, hidden, step, sampling)
        want = sample(compute_logits(params, hidden[indices]), sampling)
        branch = min(rows for rows in bucket.sampled_row_ladder if rows >= num_rows)
        for name in ("token_ids", "logprobs", "top_ids", "top_logprobs"):
            got_rows, want_rows = np.asarray(getattr(got, name)), np.asarray(getattr(want, name))
            np.testing.assert_allclose(got_rows[:branch], want_rows[:branch], rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(got_rows[branch:], 0)
