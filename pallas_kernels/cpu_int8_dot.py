"""An exact int8 x int8 -> int32 matmul for few rows on x86 CPUs: a C++ kernel called through XLA FFI.

    int8_dot(x_q [M, K] int8, w_q [K, N] int8) -> [M, N] int32      x_q @ w_q, exactly
    available() -> bool     whether this machine can build and run it (x86-64 with AVX-512 VNNI and
                            VL, a C++ compiler, the CPU backend)
    serves(rows) -> bool    whether `fastest_int8_dot` runs the kernel for this many rows
    fastest_int8_dot(x_q, w_q) -> [M, N] int32    the kernel for up to MAX_ROWS rows where it is
                            available, else XLA's int8 dot: what the quantized matmuls' "xla"
                            implementations call

Why: XLA:CPU's int8 dot streams a weight at a fraction of memory speed for one to a few rows,
and XLA has no fused dequantize-and-dot, so int8 decode steps ran no faster than float32 ones. The
kernel (`cpu_int8_dot.cc`, which explains its loop) streams an int8 weight in the project's
`[K, N]` layout at about memory speed on both cores, so the quantized modes whose matmul is an
int8 x int8 dot (W8A8, and W8A16 through the two-level activation split) run faster than float32.
Measured on the project's 2-core CPU (30 layers of SmolLM2's four weight shapes, int8, ad hoc
interleaved timing, two runs): 9.3-10.0 ms against XLA's 20.5-26.2 ms at 1 row, 9.6-10.6 against
18.3-20.4 at 4, 12.8-13.8 against 18.1-23.8 at 8, 19.0-21.4 against 23.0-28.1 at 16, even at 32
and slower beyond, hence MAX_ROWS. About 11 GB/s: under half the copy bandwidth, because the
loop is bound by its byte shuffles, not yet by memory.

Build: the source is compiled once per machine with the system C++ compiler into the user's cache
(`$XDG_CACHE_HOME/jaxinfer`, else `~/.cache/jaxinfer`), named by a hash of the source, the flags and
the jax headers, and registered with XLA as the FFI target `jaxinfer_int8_dot`. Executables that
call it (engines built with int8 weights on such a CPU) need it registered before they load:
`ensure_registered()` does that, and `jaxinfer.engine.artifact` calls it. Nothing is downloaded.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxinfer.errors import EngineError
from pallas_kernels.xla_cpu import min_rows_dot

TARGET = "jaxinfer_int8_dot"
SOURCE = Path(__file__).with_suffix(".cc")
COMPILE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-mavx2", "-mavx512f", "-mavx512vl", "-mavx512vnni")
# The CPU features the kernel's instructions need (Linux /proc/cpuinfo names).
REQUIRED_CPU_FLAGS = frozenset({"avx2", "avx512f", "avx512vl", "avx512_vnni"})
# Up to this many rows the kernel beats XLA's int8 dot (module docstring).
MAX_ROWS = 16


def _cpu_flags() -> frozenset[str]:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxinfer"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _library_path(compiler: str) -> Path:
    include = Path(jax.ffi.include_dir())
    digest = hashlib.sha256()
    digest.update(SOURCE.read_bytes())
    digest.update(" ".join((compiler, *COMPILE_FLAGS)).encode())
    digest.update((include / "xla" / "ffi" / "api" / "c_api.h").read_bytes())
    return _cache_dir() / f"cpu_int8_dot-{digest.hexdigest()[:16]}.so"


def _build(compiler: str, library: Path) -> None:
    """Compiles the kernel into `library` (atomically: concurrent builders each write their own temp file)."""
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=library.parent, suffix=".so", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        subprocess.run([compiler, *COMPILE_FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", str(tmp_path)],
                       check=True, capture_output=True, text=True)
        os.replace(tmp_path, library)
    except subprocess.CalledProcessError as error:
        raise EngineError(f"building the CPU int8 kernel failed ({compiler}):\n{error.stderr[-2000:]}") from error
    finally:
        tmp_path.unlink(missing_ok=True)


@functools.cache
def available() -> bool:
    """Whether the kernel can run here: the CPU backend, an x86-64 CPU with the needed features and
    a C++ compiler. Cached; does not build anything."""
    return (jax.default_backend() == "cpu" and platform.machine() in ("x86_64", "AMD64")
            and REQUIRED_CPU_FLAGS <= _cpu_flags() and _compiler() is not None)


@functools.cache
def ensure_registered() -> None:
    """Builds the kernel if this machine has no cached build yet, and registers it with XLA (once)."""
    if not available():
        raise EngineError("the CPU int8 kernel needs the CPU backend, an x86-64 CPU with AVX-512 VNNI and VL, "
                          f"and a C++ compiler (g++); this machine lacks one of them (needs {sorted(REQUIRED_CPU_FLAGS)})")
    compiler = _compiler()
    library = _library_path(compiler)
    if not library.exists():
        _build(compiler, library)
    handler = ctypes.cdll.LoadLibrary(str(library)).jaxinfer_int8_dot
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler), platform="cpu")


def int8_dot(x_q: jax.Array, w_q: jax.Array) -> jax.Array:
    """`x_q [M, K] int8 @ w_q [K, N] int8` -> `[M, N] int32`, exactly (see the module docstring)."""
    if x_q.dtype != jnp.int8 or w_q.dtype != jnp.int8 or x_q.ndim != 2 or w_q.ndim != 2 or x_q.shape[1] != w_q.shape[0]:
        raise ValueError(f"int8_dot takes x [M, K] and w [K, N] int8, got {x_q.shape} {x_q.dtype} "
                         f"and {w_q.shape} {w_q.dtype}")
    ensure_registered()
    out = jax.ShapeDtypeStruct((x_q.shape[0], w_q.shape[1]), jnp.int32)
    return jax.ffi.ffi_call(TARGET, out)(x_q, w_q)


def serves(rows: int) -> bool:
    """Whether `fastest_int8_dot` runs the kernel (rather than XLA's dot) for `rows` activation rows."""
    return rows <= MAX_ROWS and available()


def fastest_int8_dot(x_q: jax.Array, w_q: jax.Array) -> jax.Array:
    """`x_q [M, K] int8 @ w_q [K, N] int8` -> `[M, N] int32` exactly, by the faster path on this CPU."""
    if serves(x_q.shape[0]):
        return int8_dot(x_q, w_q)
    return min_rows_dot(x_q, w_q, jnp.int32)
