"""Test-session setup: 8 forced CPU devices (for tensor-parallel tests), the Pallas mode and float32
dot bound of the backend the tests run on, and shared fixtures."""

import os

# Must precede the first jax import. 8 CPU devices let tests build meshes of up to 8 devices.
# XLA:CPU's backend optimization level 0 (LLVM code generation of its own fusions; our FFI kernels
# are prebuilt C++) compiles the suite's hundreds of small engine steps faster (the suite took 768 s
# instead of 1058 s on the Zen 3 VM, 2026-12-06) and leaves what the tests check alone, since speed
# is measured by the benchmarks. The gRPC tests' child server runs without these flags, so its
# greedy tokens, compiled as in production, are checked against an engine compiled here.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")

import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

TESTS_DIR = Path(__file__).parent
CHECKPOINTS_DIR = TESTS_DIR / "checkpoints"
GOLDENS_DIR = TESTS_DIR / "goldens"
ON_GPU = jax.default_backend() == "gpu"
# The Pallas kernels compile on a GPU; elsewhere their tests run them in interpret mode.
PALLAS_MODE = "pallas" if ON_GPU else "interpret"
# Bound on a float32 dot's error relative to |x| @ |w|: on a GPU, XLA and Triton multiply float32 on
# the tensor cores in TF32 (10 mantissa bits: x and w each rounded by up to 2^-11).
F32_DOT_ERROR = 2.0**-10 if ON_GPU else 1e-5


@pytest.fixture(scope="session")
def default_checkpoint():
    from jaxinfer.checkpoint import load_checkpoint

    return load_checkpoint()


@pytest.fixture
def rng(request):
    """A generator seeded by the test's name: fresh random inputs per test, the same on every run."""
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))
