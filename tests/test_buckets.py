"""The bucket ladders: every step the scheduler may form has a compiled shape, the smallest that holds
it, and a finer ladder bounds the padding rows a step computes."""

import numpy as np
import pytest

from jaxinfer.engine.config import EngineConfig
from jaxinfer.errors import EngineError
from jaxinfer.runner.buckets import Bucket, BucketLadder, ladder


def test_ladders_double_or_cut_each_doubling_into_whole_multiples_of_8():
    assert ladder(1, 64) == [1, 2, 4, 8, 16, 32, 64]
    assert ladder(1, 64, splits=2) == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert ladder(16, 256, splits=4) == [16, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256]
    assert ladder(1, 60, splits=2) == [1, 2, 4, 8, 16, 24, 32, 48, 60]
    assert ladder(1, 64, factor=4) == [1, 4, 16, 64]


@pytest.mark.parametrize("splits", [1, 2, 4])
@pytest.mark.parametrize("largest", [1, 7, 64, 200, 256])
def test_a_ladder_rises_to_its_largest_size(splits, largest):
    sizes = ladder(1, largest, splits=splits)
    assert sizes[-1] == largest and all(a < b for a, b in zip(sizes, sizes[1:]))
    assert all(size % 8 == 0 for size in sizes[:-1] if size >= 8)


@pytest.mark.parametrize("splits", [1, 2])
def test_every_schedulable_step_runs_at_the_smallest_bucket_that_holds_it(splits):
    buckets = BucketLadder(max_num_seqs=64, max_num_batched_tokens=256, min_token_bucket=16,
                           buckets_per_doubling=splits)
    rng = np.random.default_rng(splits)
    for _ in range(500):
        num_seqs = int(rng.integers(1, 65))
        num_tokens = num_seqs if rng.random() < 0.5 else int(rng.integers(num_seqs, 257))
        num_samples = int(rng.integers(num_seqs, 65))  # n > 1 fans out, up to max_num_seqs rows
        chosen = buckets.select(num_tokens, num_seqs, num_samples)
        holding = [b for b in buckets.all_buckets if b.num_tokens >= num_tokens and b.num_seqs >= num_samples]
        assert chosen in holding and chosen.num_tokens == min(b.num_tokens for b in holding)


def test_two_buckets_per_doubling_pad_a_step_by_at_most_half_its_tokens_where_powers_of_two_double_it():
    coarse, fine = (BucketLadder(64, 256, 16, splits) for splits in (1, 2))
    worst = {name: max(buckets.select(tokens, 1, 1).num_tokens / tokens for tokens in range(17, 257))
             for name, buckets in (("coarse", coarse), ("fine", fine))}
    assert worst["fine"] <= 1.5 < worst["coarse"]
    assert Bucket(24, 24) in fine.decode_buckets and Bucket(192, 64) in fine.mixed_buckets
    assert len(fine.all_buckets) == len(coarse.all_buckets) + 4


def test_engine_config_refuses_a_ladder_whose_steps_would_not_divide_a_doubling():
    with pytest.raises(EngineError, match="buckets_per_doubling must be >= 1"):
        EngineConfig.create(buckets_per_doubling=0)
    with pytest.raises(EngineError, match="buckets_per_doubling 3 must be a power of two"):
        EngineConfig.create(buckets_per_doubling=3)
    assert EngineConfig.create(buckets_per_doubling=4).ladder.decode_buckets[-3:] == [Bucket(s, s) for s in (48, 56, 64)]
