"""Building the C++ CPU kernels (pallas_kernels/cpu_ffi.py): each kernel takes the first of its
instruction-set builds that the CPU runs, says clearly when none fits, and every build of every
kernel compiles, whichever one this machine runs (the kernels' own tests run that one)."""

from __future__ import annotations

import shutil
import subprocess

import jax
import pytest

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


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.parametrize("kernel, isa", [(kernel, isa) for kernel in KERNELS for isa in kernel.isas],
                         ids=lambda v: getattr(v, "source", None) and v.source.stem or "+".join(sorted(v.cpu_flags)))
def test_every_build_of_every_kernel_compiles(kernel, isa):
    result = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", *isa.compile_flags, "-I", jax.ffi.include_dir(),
                             str(kernel.source)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
