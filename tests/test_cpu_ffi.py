"""Building the C++ CPU kernels (pallas_kernels/cpu_ffi.py): each kernel takes the first of its
instruction-set builds that the CPU runs, says clearly when none fits, and every build of every
kernel compiles, whichever one this machine runs (the kernels' own tests run that one). On a CPU
with AVX-512 the kernels' tests run a second time, in a child pytest, on their AVX2 builds
(JAXINFER_CPU_ISA=avx2), which the CPUs without AVX-512 take."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import jax
import pytest

from conftest import TESTS_DIR
from jaxinfer.engine.artifact import environment
from jaxinfer.errors import EngineError
from pallas_kernels import cpu_dense_dot, cpu_ffi, cpu_int4_dot, cpu_int8_dot, cpu_paged_attention

KERNELS = (cpu_dense_dot.KERNEL, cpu_int4_dot.KERNEL, cpu_int8_dot.KERNEL, cpu_paged_attention.KERNEL)


def test_a_kernel_takes_the_first_build_the_cpu_runs(monkeypatch):
    kernel = cpu_int4_dot.KERNEL
    wide, narrow = kernel.isas
    monkeypatch.setattr(cpu_ffi, "cpu_flags", lambda: wide.cpu_flags | {"sse2"})
    assert kernel.isa() == wide
    monkeypatch.setattr(cpu_ffi, "cpu_flags", lambda: narrow.cpu_flags | {"avx512f"})  # no VNNI
    assert kernel.isa() == narrow
    assert kernel.cpu_flags == narrow.cpu_flags


def test_a_cpu_without_any_build_is_refused_with_the_flags_it_lacks(monkeypatch):
    kernel = cpu_int4_dot.KERNEL
    monkeypatch.setattr(cpu_ffi, "cpu_flags", lambda: frozenset({"sse2", "avx"}))
    monkeypatch.setattr(cpu_ffi.platform, "machine", lambda: "x86_64")
    kernel.forget()
    try:
        assert kernel.isa() is None and not kernel.available()
        with pytest.raises(EngineError, match=r"'avx2'.*or.*'avx2'.*rebuilt here") as refusal:
            kernel.ensure_registered()
        assert "avx512_vnni" in str(refusal.value)
    finally:
        kernel.forget()


def test_a_failed_build_shows_its_errors_before_the_headers_warnings():
    """g++ printed a kernel's error first and then jax's FFI headers' warnings, more than the message
    kept (2026-12-08): the message showed only warnings."""
    warnings = "".join(f"ffi.h:812:68: warning: 'always_inline' function might not be inlinable {i}\n"
                       for i in range(100))
    error = "cpu_int8_dot.cc:365:91: error: missing terminating ' character\n  365 |   : expected x\n"
    shown = cpu_ffi.compiler_errors("In file included from ffi.h:48:\n" + error + warnings)
    assert shown.startswith(error) and len(shown) == 2000
    assert cpu_ffi.compiler_errors(warnings) == warnings[-2000:]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.parametrize("kernel, isa", [(kernel, isa) for kernel in KERNELS for isa in kernel.isas],
                         ids=lambda v: getattr(v, "source", None) and v.source.stem or "+".join(sorted(v.cpu_flags)))
def test_every_build_of_every_kernel_compiles(kernel, isa):
    result = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", *isa.compile_flags, "-I", jax.ffi.include_dir(),
                             str(kernel.source)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_isa_variable_hides_avx512_and_amx_from_the_kernels_alone(monkeypatch):
    host = frozenset({"avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile"})
    monkeypatch.setattr(cpu_ffi, "host_cpu_flags", lambda: host)
    monkeypatch.setenv(cpu_ffi.ISA_VARIABLE, "avx2")
    assert cpu_ffi.cpu_flags() == {"avx2", "fma", "f16c"}
    assert all(kernel.isa() is cpu_ffi.AVX2 for kernel in KERNELS)
    if jax.default_backend() == "cpu":  # engine manifests still record what XLA's own code may use
        assert "avx512f" in environment()["cpu_flags"]
    monkeypatch.setenv(cpu_ffi.ISA_VARIABLE, "avx512")
    with pytest.raises(EngineError, match="JAXINFER_CPU_ISA='avx512': set it to avx2"):
        cpu_ffi.cpu_flags()
    monkeypatch.delenv(cpu_ffi.ISA_VARIABLE)
    assert cpu_ffi.cpu_flags() == host


# The kernels' tests, and the attention and quantized-matmul tests that run them (their names say cpu).
KERNEL_TESTS = ("test_cpu_dense_dot.py", "test_cpu_int4_dot.py", "test_cpu_int8_dot.py", "test_cpu_row_passes.py",
                "test_ragged_paged_attention.py", "test_quant_kernels.py")


@pytest.mark.skipif(not cpu_ffi.AVX512.cpu_flags <= cpu_ffi.host_cpu_flags() or shutil.which("g++") is None,
                    reason="without AVX-512 the kernels' own tests already run their AVX2 builds")
def test_the_kernels_tests_pass_on_their_avx2_builds():
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "-k", "cpu",
         *(str(TESTS_DIR / name) for name in KERNEL_TESTS)],
        env={**os.environ, cpu_ffi.ISA_VARIABLE: "avx2"}, cwd=TESTS_DIR.parent, capture_output=True, text=True)
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-3000:]
    assert " passed" in child.stdout.splitlines()[-1]
    # The AVX2 build's own loop ran: its tests skip on every other build.
    assert "the GEMM loop is the AVX2 build's" not in child.stdout
