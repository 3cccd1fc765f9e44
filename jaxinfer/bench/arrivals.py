"""Request arrival schedules for load generation: Poisson, or gamma with a burstiness factor.

Inter-arrival gaps are gamma-distributed with shape `burstiness` and mean 1 / `rate`
(burstiness 1 is a Poisson process; below 1 burstier, above 1 more regular), as in vLLM's
`bench serve`. An infinite rate sends everything at time 0. Returns offsets in seconds from the
start of the run, float64 array of shape [num_requests], non-decreasing.
"""

from __future__ import annotations

import math

import numpy as np

from jaxinfer.errors import RequestError


def arrival_offsets(num_requests: int, rate: float, burstiness: float, seed: int) -> np.ndarray:
    if rate <= 0 or burstiness <= 0:
        raise RequestError(f"request rate ({rate}) and burstiness ({burstiness}) must be > 0")
    if math.isinf(rate):
        return np.zeros(num_requests)
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num_requests)
    # The first request goes at time 0; the schedule is the running sum of the gaps after it.
    return np.concatenate([[0.0], np.cumsum(gaps[1:])])
