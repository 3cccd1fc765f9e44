"""`jaxinfer bench compare`'s rounds and summaries, on fake measurements: which engine goes first
in each round, the prompts (seeds) both engines share in a round, and the medians, advantage and
rounds won recomputed from the recorded values."""

import random

import numpy as np
import pytest

from jaxinfer.bench.compare import Figure, comparison_lines, round_order, run_rounds, summarize


def test_rounds_alternate_the_first_engine_and_give_both_the_same_prompts():
    rng = random.Random(5)
    calls = []

    def measure(side, figure, seed):
        value = rng.uniform(0.5, 2.0)
        calls.append((side, figure, seed, value))
        return value

    figures = [Figure("ttft", 64), Figure("decode", 1), Figure("decode", 8)]
    rounds = 5
    values = run_rounds(measure, figures, rounds, seed=3)
    assert len(calls) == 2 * len(figures) * rounds
    per_round = [calls[i:i + 2 * len(figures)] for i in range(0, len(calls), 2 * len(figures))]
    seeds = set()
    for index, round_calls in enumerate(per_round):
        for first, second in zip(round_calls[::2], round_calls[1::2]):
            assert (first[0], second[0]) == round_order(index) == (("a", "b") if index % 2 == 0 else ("b", "a"))
            assert first[1] == second[1] and first[2] == second[2]  # one figure, the same prompts
            seeds.add((first[1], first[2]))
    assert len(seeds) == len(figures) * rounds  # other prompts in every round
    for figure in figures:  # each engine's values in the order measured
        assert values[figure] == tuple([v for side_, f, _, v in calls if side_ == side and f == figure]
                                       for side in "ab")
        assert len(values[figure][0]) == rounds


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_summary_holds_the_medians_the_advantage_of_b_and_its_rounds_won(higher_is_better):
    rng = np.random.default_rng(9)
    a = list(rng.uniform(1, 2, 7))
    b = list(rng.uniform(1, 2, 7))
    s = summarize(a, b, higher_is_better)
    assert (s["a_median"], s["b_median"]) == (sorted(a)[3], sorted(b)[3])
    expected = sorted(b)[3] / sorted(a)[3]
    assert s["b_advantage"] == pytest.approx(expected if higher_is_better else 1 / expected)
    won = [(y > x) == higher_is_better for x, y in zip(a, b)]
    assert s["b_better_rounds"] == sum(won)
    line = comparison_lines({"decode tok/s @B=1": s}, 7)[1]
    assert f"{s['b_advantage']:.2f}x" in line and f"{sum(won)} of 7 rounds" in line


def test_figures_name_their_measure():
    assert (Figure("ttft", 128).name, Figure("ttft", 128).higher_is_better) == ("TTFT@128 s", False)
    assert (Figure("decode", 8).name, Figure("decode", 8).higher_is_better) == ("decode tok/s @B=8", True)
