"""Test-session setup: 8 forced CPU devices (for tensor-parallel tests) and shared fixtures."""

import os

# Must precede the first jax import: lets tests build meshes of up to 8 CPU devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

TESTS_DIR = Path(__file__).parent
CHECKPOINTS_DIR = TESTS_DIR / "checkpoints"
GOLDENS_DIR = TESTS_DIR / "goldens"


@pytest.fixture(scope="session")
def default_checkpoint():
    from jaxinfer.checkpoint import load_checkpoint

    return load_checkpoint()


@pytest.fixture
def rng(request):
    """A generator seeded by the test's name: fresh random inputs per test, the same on every run."""
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))
