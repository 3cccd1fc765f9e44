"""Building and registering the C++ CPU kernels that XLA calls through its FFI.

    cpu_flags() -> frozenset[str]   the CPU flags the kernels build and route for (JAXINFER_CPU_ISA below)
    Isa(compile_flags, cpu_flags)   one instruction-set build of a kernel: the compiler flags and
                                    the CPU feature flags its code needs
    CpuKernel(name, targets, source, isas)
        .available() -> bool      whether it runs here: the CPU backend, an x86-64 CPU with the
                                  flags of one of `isas` (the first such is built: list the widest
                                  first), a C++ compiler that built it; builds and registers it on
                                  first use, warns and says False when the build fails
        .ensure_registered()      registers it or raises an EngineError that says why it cannot run
    KERNELS                       FFI target name -> CpuKernel, for engine manifests (`ffi_kernels`)
    live_row_operand(rows, live_rows) -> [] int32   the matmul kernels' `live` operand: compute the
                                  first live_rows of `rows` activation rows (all when None) and give
                                  zeros after them, so an engine step's bucket padding costs nothing
                                  (cpu_row_count.h)

A source with several Isas picks its code path with the compiler's macros (`__AVX512F__`, ...),
so one file holds, say, an AVX-512 loop and its AVX2 twin. Each kernel's source is compiled once
per machine with the system C++ compiler into the user's cache (`$XDG_CACHE_HOME/jaxinfer`, else
`~/.cache/jaxinfer`), named by a hash of the source, the headers beside it, the flags and the jax
FFI header, and registered with XLA under its target names by the first `available()` of each
process. Executables that call a kernel need it registered before they load:
`jaxinfer.engine.artifact` registers the kernels an engine's manifest lists. Nothing is downloaded.

JAXINFER_CPU_ISA=avx2 makes the kernels act as if the CPU had neither AVX-512 nor AMX: each builds
its AVX2 code and the Python routing (row limits, which loop serves a step) follows it, so a machine
with AVX-512 tests and measures the builds that AVX2-only CPUs run (tests/test_cpu_ffi.py). Set
it before jaxinfer is imported, and build an engine under it too: its routing is fixed when its
buckets compile. XLA's own code still uses the whole CPU, and engine manifests record
the host's flags (`host_cpu_flags`), so an engine built under it runs where it was built.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxinfer.errors import EngineError

KERNELS: dict[str, "CpuKernel"] = {}
# Caps the kernels at their AVX2 builds (module docstring).
ISA_VARIABLE = "JAXINFER_CPU_ISA"


def host_cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where it cannot be read)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_flags() -> frozenset[str]:
    """The flags the kernels build and route for: the host's, less AVX-512 and AMX under
    JAXINFER_CPU_ISA=avx2 (module docstring)."""
    isa = os.environ.get(ISA_VARIABLE, "")
    if isa not in ("", "avx2"):
        raise EngineError(f"{ISA_VARIABLE}={isa!r}: set it to avx2 (the kernels' AVX2 builds) or unset it")
    flags = host_cpu_flags()
    return frozenset(flag for flag in flags if not flag.startswith(("avx512", "amx"))) if isa else flags


def live_row_operand(rows: int, live_rows: jax.Array | None) -> jax.Array:
    """The `live` operand of the matmul kernels (module docstring)."""
    return jnp.asarray(rows if live_rows is None else live_rows, jnp.int32)


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxinfer"


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


@dataclasses.dataclass(frozen=True)
class Isa:
    """One instruction-set build of a kernel (module docstring)."""
    compile_flags: tuple[str, ...]
    cpu_flags: frozenset[str]


# The build every x86-64 CPU of the last decade takes (Haswell, Zen 1 and later).
AVX2 = Isa(("-mavx2", "-mfma", "-mf16c"), frozenset({"avx2", "fma", "f16c"}))
# AVX2 with 16-lane registers (Skylake-SP, Zen 4 and later), for kernels whose loops are wider there.
AVX512 = Isa(AVX2.compile_flags + ("-mavx512f",), AVX2.cpu_flags | {"avx512f"})


class CpuKernel:
    """One C++ source file exporting an FFI handler named after each of its `targets` (module docstring)."""

    def __init__(self, name: str, targets: tuple[str, ...], source: Path, isas: tuple[Isa, ...]):
        self.name, self.targets, self.source, self.isas = name, targets, source, isas
        self._available: bool | None = None
        self._registered = False  # XLA refuses a second registration of a target from another library
        KERNELS.update(dict.fromkeys(targets, self))

    @property
    def cpu_flags(self) -> frozenset[str]:
        """The CPU flags of the least demanding build: what a CPU needs to run the kernel at all."""
        return self.isas[-1].cpu_flags

    def isa(self) -> Isa | None:
        """The first build this CPU runs, or None."""
        flags = cpu_flags()
        return next((isa for isa in self.isas if isa.cpu_flags <= flags), None)

    def _compile_flags(self) -> tuple[str, ...]:
        return ("-O3", "-std=c++17", "-shared", "-fPIC", *self.isa().compile_flags)

    def _library_path(self, compiler: str) -> Path:
        include = Path(jax.ffi.include_dir())
        digest = hashlib.sha256()
        digest.update(self.source.read_bytes())
        for header in sorted(self.source.parent.glob("*.h")):  # what the sources include from beside them
            digest.update(header.read_bytes())
        digest.update(" ".join((compiler, *self._compile_flags())).encode())
        digest.update((include / "xla" / "ffi" / "api" / "c_api.h").read_bytes())
        return _cache_dir() / f"{self.source.stem}-{digest.hexdigest()[:16]}.so"

    def _build(self, compiler: str, library: Path) -> None:
        """Compiles into `library` (atomically: concurrent builders each write their own temp file)."""
        try:
            library.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=library.parent, suffix=".so", delete=False) as tmp:
                tmp_path = Path(tmp.name)
        except OSError as error:
            raise EngineError(f"cannot write the {self.name} to {library.parent} ({error}); "
                              "point XDG_CACHE_HOME at a writable directory") from error
        try:
            subprocess.run([compiler, *self._compile_flags(), "-I", jax.ffi.include_dir(), str(self.source),
                            "-o", str(tmp_path)], check=True, capture_output=True, text=True)
            os.replace(tmp_path, library)
        except subprocess.CalledProcessError as error:
            raise EngineError(
                f"building the {self.name} failed ({compiler}):\n{compiler_errors(error.stderr)}") from error
        finally:
            tmp_path.unlink(missing_ok=True)

    def _register(self) -> None:
        compiler = _compiler()
        library = self._library_path(compiler)
        if not library.exists():
            self._build(compiler, library)
        if self._registered:
            return
        handlers = ctypes.cdll.LoadLibrary(str(library))
        for target in self.targets:
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handlers, target)), platform="cpu")
        self._registered = True

    def available(self) -> bool:
        """Whether the kernel runs here. The first call on a machine builds it (a few seconds) and
        every process registers it once; a failed build warns and says False (callers fall back to XLA)."""
        if self._available is None:
            self._available = self._probe()
        return self._available

    def _probe(self) -> bool:
        if not (jax.default_backend() == "cpu" and platform.machine() in ("x86_64", "AMD64")
                and self.isa() is not None and _compiler() is not None):
            return False
        try:
            self._register()
        except EngineError as error:
            warnings.warn(f"{error}\nXLA's own operations run in its place", stacklevel=3)
            return False
        return True

    def forget(self) -> None:
        """Drops the cached `available()` answer, so the next call probes again (tests)."""
        self._available = None

    def ensure_registered(self) -> None:
        """Registers the kernel (building it if need be) or says why this machine cannot run it."""
        if not self.available():
            flags = " or ".join(str(sorted(isa.cpu_flags)) for isa in self.isas)
            raise EngineError(f"the {self.name} cannot run on this machine: it needs the CPU backend, an x86-64 "
                              f"CPU with {flags} and a C++ compiler (g++) that builds it. An engine built to call "
                              "it must be rebuilt here with `jaxinfer build`")


def compiler_errors(stderr: str, limit: int = 2000) -> str:
    """Up to `limit` characters of a failed compile's output from its first error line on, else its
    tail: jax's FFI headers warn at length, and the errors came after them out of sight."""
    first = stderr.find(" error: ")
    if first < 0:
        return stderr[-limit:]
    start = stderr.rfind("\n", 0, first) + 1
    return stderr[start:start + limit]


def ensure_registered(targets) -> None:
    """Registers every kernel named in `targets` (an engine manifest's `ffi_kernels`)."""
    for target in targets:
        if target not in KERNELS:
            raise EngineError(f"the engine calls an unknown CPU kernel {target!r}; rebuild it with `jaxinfer build`")
        KERNELS[target].ensure_registered()


def called_by(hlo_text: str) -> set[str]:
    """The registered kernels' targets that a compiled program's HLO text calls."""
    return {target for target in KERNELS if target in hlo_text}
