"""An A/B of two engines in one process, in alternating rounds (`jaxinfer bench compare A B`).

On a shared machine a benchmark's absolute figures move by tens of percent from one minute to the
next, so two engines measured one after the other differ by the machine's phase as much as by the
engines. Here both engines are loaded in one process and measured in rounds: each round takes every
figure once from each engine, on the same prompts, A first in even rounds and B first in odd ones,
so that a drift of the machine falls on both alike. Each figure is reported as its median over the
rounds per engine, B's advantage (the ratio of the medians, > 1: B is better) and the rounds in
which B was better.

    Figure(kind, size)                   one figure: "ttft" (seconds, at a prompt length) or
                                         "decode" (tokens/s, at a batch size)
    run_rounds(measure, figures, rounds, seed) -> {figure: ([A's values], [B's values])}, one per
                                         round, from measure(side, figure, seed) with side "a" or
                                         "b"; both sides of a round get the same seed
    summarize(a, b, higher_is_better) -> the values, medians, B's advantage and better rounds
    comparison_lines(summaries, rounds) -> the printed table
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Figure:
    kind: str  # "ttft" or "decode"
    size: int  # prompt tokens (ttft) or sequences (decode)

    @property
    def name(self) -> str:
        return f"TTFT@{self.size} s" if self.kind == "ttft" else f"decode tok/s @B={self.size}"

    @property
    def higher_is_better(self) -> bool:
        return self.kind == "decode"


def round_order(round_index: int) -> tuple[str, str]:
    """Which engine a round measures first: A in even rounds, B in odd ones."""
    return ("a", "b") if round_index % 2 == 0 else ("b", "a")


def run_rounds(measure: Callable[[str, Figure, int], float], figures: list[Figure], rounds: int,
               seed: int) -> dict[Figure, tuple[list[float], list[float]]]:
    values = {figure: ([], []) for figure in figures}
    for index in range(rounds):
        for figure in figures:
            # The same prompts for both engines in a round, other prompts in the next.
            round_seed = seed + 1000 * index + figure.size
            for side in round_order(index):
                values[figure][side == "b"].append(measure(side, figure, round_seed))
    return values


def summarize(a: list[float], b: list[float], higher_is_better: bool) -> dict:
    a_median, b_median = float(np.median(a)), float(np.median(b))
    return {"a": a, "b": b, "a_median": a_median, "b_median": b_median,
            "b_advantage": b_median / a_median if higher_is_better else a_median / b_median,
            "b_better_rounds": sum((y > x) if higher_is_better else (y < x) for x, y in zip(a, b))}


def comparison_lines(summaries: dict[str, dict], rounds: int) -> list[str]:
    lines = [f"{'':<20}{'A median':>12}{'B median':>12}{'B advantage':>14}{'B better in':>20}"]
    for name, s in summaries.items():
        precision = 4 if name.startswith("TTFT") else 1
        lines.append(f"{name:<20}{s['a_median']:>12.{precision}f}{s['b_median']:>12.{precision}f}"
                     f"{s['b_advantage']:>13.2f}x{s['b_better_rounds']:>11} of {rounds} rounds")
    lines.append("(B advantage: the ratio of the medians, > 1 means B is better; TTFT in seconds)")
    return lines
