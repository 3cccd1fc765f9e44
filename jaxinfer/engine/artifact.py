"""Engine directories: everything a ready engine needs, written by `jaxinfer build`, loaded with
no compilation.

Layout:
    manifest.json        format version, jax/jaxlib versions, backend and device kind (on CPU,
                         the instruction-set flags of the build host's CPU), mesh,
                         model config, engine (build) config, buckets, KV plan, the project's own
                         FFI kernels the executables call, whether the weights are packed for
                         the CPU kernels (`cpu_kernel_weights`), sha256 of every file
    weights.safetensors  the params in their serving layout and dtype (heads already padded for
                         the mesh, quantized weights already quantized, bfloat16 matmul weights as
                         the CPU kernel's AMX panels where the manifest says `panel_weights`),
                         memory-mapped at load: jaxinfer.engine.weights_file
    tokenizer.json       the tokenizer; tokenizer_meta.json: eos/bos ids and the chat template
    executables/<bucket>.bin   the serialized compiled step of each bucket

Loading checks the manifest before touching anything else: a malformed one, or another jax
version, backend, device kind or device count, or (CPU) a CPU that lacks instruction-set
extensions of the build host's, is refused with a message that says to rebuild; a missing or
corrupted file (sha256 mismatch) is named. The FFI kernels the executables call (`ffi_kernels`, `pallas_kernels.cpu_ffi`:
the CPU decode-attention kernel, and the CPU int8 kernel, whose engines store their int8 weights
packed for it) are built if need be and registered before they load.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import os
import pickle
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import jaxlib
import tokenizers
from jax.experimental import serialize_executable
from jax.sharding import Mesh

from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.create import ENGINE_MANIFEST, is_engine_dir
from jaxinfer.engine.llm_engine import LLMEngine
from jaxinfer.engine.weights_file import load_params, save_params
from jaxinfer.errors import EngineError
from jaxinfer.model.config import ModelConfig, RopeScaling
from jaxinfer.model.panel_weight import has_panel_weights, pack_panel_weights
from jaxinfer.model.sharding import make_mesh, param_shardings
from jaxinfer.quant.apply import abstract_quantized_params, pack_for_cpu_kernel, uses_cpu_kernel
from jaxinfer.runner.buckets import Bucket
from jaxinfer.runner.model_runner import ModelRunner, allocate_kv_caches
from jaxinfer.tokenizer import Tokenizer
from pallas_kernels import cpu_ffi

# 6: the step takes StepInputs.num_steps and returns its outputs with a leading step axis
# (multi-step decode). 7: the sampling metadata carries num_logprobs (logprobs computed only when
# some row asks). 8: the CPU dense kernels take the step's count of real tokens (an operand more).
# 9: so do the W8A8 and W4A8 CPU kernels. 10: the weights are one safetensors file, not an orbax
# checkpoint. 11: the engine config records buckets_per_doubling (the ladders' midpoints). 12: w8a8
# and int4-awq weights have their input scales folded into the norms and up columns before them.
# 13: and wo's into the V columns of w_qkv (no weight keeps an input scale). 14: int8 weights packed
# for the CPU kernel carry their per-output sums (cpu_int8_dot.PackedInt8).
FORMAT_VERSION = 14
WEIGHTS_FILE = "weights.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_meta.json")
# The /proc/cpuinfo flags that name instruction-set extensions, which XLA:CPU compiles for when the
# build host has them (an executable that uses AVX-512 dies of SIGILL on an AVX2-only CPU); the
# others (hypervisor, constant_tsc, ...) say nothing about what code runs.
_ISA_FLAG = re.compile(r"sse\w*|ssse3|pni|avx\w*|fma\w*|f16c|bmi\d|amx\w*|popcnt|abm|lzcnt|movbe|aes|vaes|"
                       r"pclmulqdq|vpclmulqdq|gfni|sha_ni|adx|cx16|xop|tbm|movdiri|movdir64b|serialize")


def environment() -> dict:
    """What a compiled executable is tied to; on the CPU backend, the CPU's instruction-set flags too."""
    device = jax.devices()[0]
    env = {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "backend": jax.default_backend(),
           "device_kind": device.device_kind, "num_devices": jax.device_count()}
    if env["backend"] == "cpu":
        env["cpu_flags"] = sorted(flag for flag in cpu_ffi.host_cpu_flags() if _ISA_FLAG.fullmatch(flag))
    return env


def refuse_to_replace(output: Path) -> None:
    """Raises an EngineError unless `output` may be replaced by an engine: it is missing, an empty
    directory or an engine directory."""
    if output.exists() and not is_engine_dir(output) and (not output.is_dir() or any(output.iterdir())):
        raise EngineError(f"{output} exists and is not an engine directory; `jaxinfer build` replaces only engine "
                          "directories: pass a new or empty --output directory")


def save_engine(output: Path, engine: LLMEngine, source: str) -> Path:
    """Writes the engine directory for a ready in-process engine (its executables compiled).

    The directory is written beside `output` and renamed into place when whole: a build that fails
    or is killed leaves the engine that was there as it was."""
    output = output.resolve()
    refuse_to_replace(output)
    staging = output.with_name(f".{output.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _write_engine(staging, engine, source)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if output.exists():
        shutil.rmtree(output)
    staging.rename(output)
    return output


def _write_engine(directory: Path, engine: LLMEngine, source: str) -> None:
    (directory / "executables").mkdir(parents=True)
    runner = engine.runner
    save_params(directory / WEIGHTS_FILE, runner.params)
    engine.tokenizer.backend.save(str(directory / "tokenizer.json"))
    tok = engine.tokenizer
    (directory / "tokenizer_meta.json").write_text(json.dumps({
        "eos_token_ids": list(tok.eos_token_ids), "bos_token_id": tok.bos_token_id,
        "add_bos_token": tok.add_bos_token, "chat_template": tok.chat_template}))
    ffi_kernels = set()
    for bucket, compiled in runner.executables.items():
        payload = serialize_executable.serialize(compiled)
        (directory / "executables" / f"{bucket.name}.bin").write_bytes(pickle.dumps(payload))
        ffi_kernels |= cpu_ffi.called_by(compiled.as_text())
    manifest = {
        "format_version": FORMAT_VERSION,
        "environment": environment(),
        "source": source,
        "model_config": dataclasses.asdict(engine.model_cfg),
        "engine_config": dataclasses.asdict(engine.engine_cfg),
        "mesh": dict(runner.mesh.shape),
        "num_kv_blocks": runner.num_blocks,
        "buckets": [dataclasses.asdict(b) for b in runner.executables],
        "ffi_kernels": sorted(ffi_kernels),
        "panel_weights": has_panel_weights(runner.params),
        "cpu_kernel_weights": uses_cpu_kernel(engine.engine_cfg.quant, engine.engine_cfg.tp),
        "files": {str(p.relative_to(directory)): _sha256(p) for p in sorted(directory.rglob("*")) if p.is_file()},
    }
    (directory / ENGINE_MANIFEST).write_text(json.dumps(manifest, indent=2))


def read_manifest(directory: Path) -> dict:
    """The manifest of the engine in `directory`, checked: well formed, of this format, and built for
    a machine like this one; an EngineError that says to rebuild otherwise."""
    path = directory / ENGINE_MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8
        raise EngineError(f"{path} is missing or unreadable ({err}); rebuild the engine with `jaxinfer build`") from None
    if not isinstance(manifest, dict):
        raise EngineError(f"{path} is not a valid engine manifest: a JSON {type(manifest).__name__}, not an object; "
                          "rebuild it with `jaxinfer build`")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise EngineError(f"{directory} has engine format {manifest.get('format_version')}, this jaxinfer reads "
                          f"format {FORMAT_VERSION}; rebuild the engine with `jaxinfer build`")
    try:
        _parse(manifest)
    except (KeyError, TypeError, ValueError, AttributeError, EngineError) as err:
        problem = f"it has no {err} entry" if isinstance(err, KeyError) else str(err)
        raise EngineError(f"{path} is not a valid engine manifest: {problem}; rebuild it with "
                          "`jaxinfer build`") from None
    built, here = manifest["environment"], environment()
    for key in ("jax", "jaxlib", "backend", "device_kind", "num_devices"):
        if built.get(key) != here[key]:
            raise EngineError(f"{directory} was built for {key}={built.get(key)!r} but this machine has "
                              f"{key}={here[key]!r}; compiled engines are tied to them: rebuild it here with "
                              "`jaxinfer build`")
    # Only the CPU backend records flags; engines for the others have none to check.
    missing = sorted(set(built.get("cpu_flags", ())) - set(here.get("cpu_flags", ())))
    if missing:
        raise EngineError(f"{directory} was built for a CPU with {', '.join(missing)}; this one lacks them: rebuild "
                          "the engine here with `jaxinfer build`")
    return manifest


def verify_files(directory: Path, manifest: dict) -> None:
    # hashlib releases the GIL: the weights and executables hash on every core.
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        digests = dict(zip(manifest["files"], pool.map(lambda name: _sha256(directory / name), manifest["files"])))
    for name, digest in manifest["files"].items():
        if digests[name] is None:
            raise EngineError(f"engine file {directory / name} is missing; rebuild the engine with `jaxinfer build`")
        if digests[name] != digest:
            raise EngineError(f"engine file {directory / name} is corrupted (sha256 mismatch); rebuild the engine "
                              "with `jaxinfer build`")


def load_engine(directory: Path, progress: bool = True, background: bool = False,
                enable_prefix_caching: bool = True) -> LLMEngine:
    """The engine in `directory`, ready to step. With `background`, it returns once the weights,
    KV pool and tokenizer are ready and the buckets' executables are still deserializing
    (`BucketExecutables`): a fresh process answers its first request 1-2 s sooner."""
    start = time.perf_counter()
    manifest = read_manifest(directory)
    cfg, engine_cfg, buckets = _parse(manifest)
    mesh = make_mesh(manifest["mesh"]["model"])
    with concurrent.futures.ThreadPoolExecutor(1) as side:
        # XLA zeroes the KV pool in the thread that asks, 0.6-0.8 s for 1 GiB (first-touch page
        # faults, mostly): a thread of its own does it while the files hash and the weights map.
        allocating = side.submit(allocate_kv_caches, cfg, engine_cfg, mesh, manifest["num_kv_blocks"])
        _check_files(directory, manifest)
        executables = BucketExecutables(functools.partial(_load_executable, directory, mesh),
                                        buckets, background)
        params = _restore_weights(directory / WEIGHTS_FILE, cfg, mesh, engine_cfg, manifest)
        meta = json.loads((directory / "tokenizer_meta.json").read_text())
        tokenizer = Tokenizer(tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json")),
                              tuple(meta["eos_token_ids"]), meta["bos_token_id"], meta["add_bos_token"],
                              meta["chat_template"])
        kv_caches = allocating.result()
    if not background:
        executables.wait()
    runner = ModelRunner(cfg, engine_cfg, mesh, params, kv_caches, executables, tokenizer.eos_token_ids)
    if progress:
        print(f"loaded engine {directory} ({len(executables)} buckets{', loading in the background' * background}, "
              f"{manifest['num_kv_blocks']} KV blocks) in {time.perf_counter() - start:.2f} s", file=sys.stderr)
    return LLMEngine(runner, tokenizer, cfg, engine_cfg, enable_prefix_caching)


class BucketExecutables(Mapping):
    """An engine's executables by bucket, deserialized on a thread per core from construction on.

    XLA deserializes an executable (0.3 s each here) without the GIL: 9 buckets of the default
    engine took 1.8-2.0 s on two cores against 2.9-3.1 one after another. A step that asks for a
    bucket whose turn has not come loads it at once in its own thread rather than wait behind the
    others; one under way is waited for. A failed load raises where that bucket is asked for.

    `background` (Linux): the loading threads run at a lower priority (nice 10), so that the
    engine's own work, its first steps above all, takes the cores first: at normal priority the
    loaders slowed a cold process's first step from 0.06 s to 0.6-1.2 s. From launch to the first
    token (benchmarks/bench_cold_start.py's child, four alternating pairs, Zen 3 VM): bf16 2.9-4.0 s
    against 4.4-5.1 loading every bucket first, w4a8 3.8-4.4 against 5.1-7.0.
    """

    def __init__(self, load: Callable[[Bucket], Callable], buckets: list[Bucket], background: bool = False):
        self._load = load
        self._lock = threading.Lock()
        lower = background and sys.platform == "linux"
        pool = concurrent.futures.ThreadPoolExecutor(os.cpu_count(), thread_name_prefix="jaxinfer-load",
                                                     initializer=_lower_thread_priority if lower else None)
        self._futures = {bucket: pool.submit(load, bucket) for bucket in buckets}
        pool.shutdown(wait=False)

    def __getitem__(self, bucket: Bucket) -> Callable:
        future = self._futures[bucket]
        with self._lock:
            if future.cancel():  # still queued
                future = self._futures[bucket] = concurrent.futures.Future()
                try:
                    future.set_result(self._load(bucket))
                except Exception as err:  # kept for every later ask, as a background load's would be
                    future.set_exception(err)
        return future.result()

    def __contains__(self, bucket) -> bool:
        return bucket in self._futures

    def __iter__(self):
        return iter(self._futures)

    def __len__(self) -> int:
        return len(self._futures)

    def wait(self) -> None:
        """Returns once every bucket is loaded; raises the first failed load's error."""
        for bucket in self._futures:
            self[bucket]


def _lower_thread_priority() -> None:
    # On Linux a thread's nice value is its own: PRIO_PROCESS with the thread's id sets it.
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def _load_executable(directory: Path, mesh: Mesh, bucket: Bucket):
    payload = pickle.loads((directory / "executables" / f"{bucket.name}.bin").read_bytes())
    return serialize_executable.deserialize_and_load(*payload, execution_devices=list(mesh.devices.flat))


def load_engine_weights(directory: Path):
    """An engine directory's checked manifest, model and engine configs, mesh and restored params
    (no KV pool, no executables): what evaluating its weights needs."""
    manifest = read_manifest(directory)
    _check_files(directory, manifest)
    cfg, engine_cfg, _ = _parse(manifest)
    mesh = make_mesh(manifest["mesh"]["model"])
    return manifest, cfg, engine_cfg, mesh, _restore_weights(directory / WEIGHTS_FILE, cfg, mesh, engine_cfg, manifest)


def _check_files(directory: Path, manifest: dict) -> None:
    """Every file's digest checked, and the FFI kernels the executables call registered."""
    verify_files(directory, manifest)
    cpu_ffi.ensure_registered(manifest["ffi_kernels"])


def _parse(manifest: dict) -> tuple[ModelConfig, EngineConfig, list[Bucket]]:
    """The manifest's model config, engine config and buckets; raises KeyError, TypeError or
    ValueError (read_manifest words them) where it does not hold a whole engine."""
    for key, kind, name in (("environment", dict, "object"), ("model_config", dict, "object"),
                            ("engine_config", dict, "object"), ("mesh", dict, "object"), ("num_kv_blocks", int, "integer"),
                            ("buckets", list, "array"), ("files", dict, "object"), ("ffi_kernels", list, "array"),
                            ("panel_weights", bool, "boolean"), ("cpu_kernel_weights", bool, "boolean")):
        if not isinstance(manifest[key], kind):
            raise TypeError(f"its {key} is not a JSON {name}")
    if not isinstance(manifest["mesh"]["model"], int):
        raise TypeError("its mesh's model axis is not an integer")
    model = dict(manifest["model_config"])
    if model["rope_scaling"]:
        model["rope_scaling"] = RopeScaling(**model["rope_scaling"])
    model["eos_token_ids"] = tuple(model["eos_token_ids"])
    buckets = [Bucket(**entry) for entry in manifest["buckets"]]
    # verify_files checks the files listed: one missing from the list would fail only when it is opened.
    unlisted = sorted({WEIGHTS_FILE, *TOKENIZER_FILES, *(f"executables/{b.name}.bin" for b in buckets)}
                      - manifest["files"].keys())
    if unlisted:
        raise ValueError(f"its files do not list {', '.join(unlisted)}")
    return ModelConfig(**model), EngineConfig(**manifest["engine_config"]), buckets


def _restore_weights(path: Path, cfg: ModelConfig, mesh: Mesh, engine_cfg: EngineConfig, manifest: dict):
    from jaxinfer.model.llama import param_shapes

    structs = jax.tree.map(lambda shape: jax.ShapeDtypeStruct(shape, engine_cfg.dtype), param_shapes(cfg),
                           is_leaf=lambda x: isinstance(x, tuple))
    if engine_cfg.quant:
        structs = abstract_quantized_params(structs, cfg, engine_cfg.quant)
    if manifest["cpu_kernel_weights"]:
        structs = jax.eval_shape(pack_for_cpu_kernel, structs)
    if manifest["panel_weights"]:
        structs = jax.eval_shape(pack_panel_weights, structs)
    target = jax.tree.map(lambda struct, sharding: jax.ShapeDtypeStruct(struct.shape, struct.dtype, sharding=sharding),
                          structs, param_shardings(cfg, mesh, structs))
    return load_params(path, target)


def _sha256(path: Path) -> str | None:
    """The file's sha256, None if there is no such file."""
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
