"""`jaxinfer build` engine directories: round trip, no compilation after load, clear refusals."""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import types

import jax
import numpy as np
import pytest

from conftest import CHECKPOINTS_DIR
from jaxinfer.engine.artifact import BucketExecutables, load_engine
from jaxinfer.engine.build import build_engine
from jaxinfer.errors import EngineError
from jaxinfer.sampling_params import SamplingParams
from pallas_kernels import cpu_dense_dot, cpu_paged_attention

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    return build_engine(CHECKPOINTS_DIR / "tiny-smollm2", tmp_path_factory.mktemp("engines") / "tiny",
                        progress=False, dtype="float32", max_num_seqs=4, max_num_batched_tokens=32,
                        max_model_len=128, kv_memory="2MiB")


class CompileCounter:
    def __init__(self):
        self.count = 0

    def __call__(self, event, duration, **kwargs):
        if event == BACKEND_COMPILE_EVENT:
            self.count += 1


def generate(engine, prompts, params):
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt_token_ids=prompt, params=params[i])
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs
    return [finished[f"r{i}"] for i in range(len(prompts))]


def test_loaded_engine_runs_a_mixed_workload_without_compiling(engine_dir):
    # Its steps call the CPU decode-attention and float32 matmul kernels where this CPU runs them;
    # loading registers them first.
    kernels = json.loads((engine_dir / "manifest.json").read_text())["ffi_kernels"]
    assert kernels == sorted(kernel.TARGET for kernel in (cpu_dense_dot, cpu_paged_attention) if kernel.available())
    engine = load_engine(engine_dir, progress=False)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 512, rng.integers(1, 100)).tolist() for _ in range(9)]
    params = [SamplingParams(temperature=float(rng.choice([0.0, 0.8])), seed=i, n=int(rng.integers(1, 3)),
                             max_tokens=int(rng.integers(1, 28)), top_p=0.9, repetition_penalty=1.1,
                             logprobs=3) for i in range(len(prompts))]
    counter = CompileCounter()
    jax.monitoring.register_event_duration_secs_listener(counter)
    try:
        outputs = generate(engine, prompts, params)
    finally:
        jax.monitoring.unregister_event_duration_listener(counter)
    assert counter.count == 0
    assert all(len(o) == p.n for o, p in zip(outputs, params))
    assert engine.scheduler.block_manager.metrics().num_used_blocks == 0


def test_loaded_engine_matches_the_in_process_build(engine_dir):
    from jaxinfer.engine.create import create_engine

    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 512, 30).tolist() for _ in range(3)]
    params = [SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)] * 3
    fresh = create_engine(CHECKPOINTS_DIR / "tiny-smollm2", progress=False, dtype="float32", max_num_seqs=4,
                          max_num_batched_tokens=32, max_model_len=128, kv_memory="2MiB")
    expected = [o[0].token_ids for o in generate(fresh, prompts, params)]
    for background in (False, True):
        loaded = create_engine(engine_dir, progress=False, background=background)
        assert [o[0].token_ids for o in generate(loaded, prompts, params)] == expected
        loaded.runner.executables.wait()


def test_bucket_executables_load_an_asked_bucket_at_once_and_keep_a_failure():
    """Buckets load on a pool in order; asking for one still queued loads it in the asking thread
    (not behind the others), asking for one under way waits for it; a failed load raises at every
    ask, and `in` loads nothing."""
    started, release = [], threading.Event()

    def load(bucket):
        started.append((bucket, threading.get_ident()))
        if bucket == "broken":
            raise RuntimeError("cannot deserialize broken")
        if bucket != "last":
            release.wait(10)
        return f"executable {bucket}"

    buckets = [f"slow{i}" for i in range(os.cpu_count())] + ["queued", "broken", "last"]
    executables = BucketExecutables(load, buckets, background=True)
    assert "last" in executables and "other" not in executables and len(executables) == len(buckets)
    assert executables["last"] == "executable last"  # while every pool thread is busy
    assert ("last", threading.get_ident()) in started and not any(b == "queued" for b, _ in started)
    with pytest.raises(RuntimeError, match="cannot deserialize broken"):
        executables["broken"]
    with pytest.raises(RuntimeError, match="cannot deserialize broken"):
        executables["broken"]
    release.set()
    assert executables["slow0"] == "executable slow0"
    assert executables["queued"] == "executable queued"
    assert sorted(b for b, _ in started) == sorted(buckets)  # each loaded once
    with pytest.raises(RuntimeError, match="cannot deserialize broken"):
        executables.wait()


def test_corrupted_or_missing_file_is_named(engine_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(engine_dir, broken)
    executable = next((broken / "executables").iterdir())
    executable.write_bytes(executable.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(EngineError, match=f"{executable.name} is corrupted"):
        load_engine(broken, progress=False)
    executable.unlink()
    with pytest.raises(EngineError, match=f"{executable.name} is missing"):
        load_engine(broken, progress=False)


def test_engine_from_another_jax_version_is_refused(engine_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(engine_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["environment"]["jax"] = "0.0.1"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EngineError, match="rebuild"):
        load_engine(other, progress=False)


def test_commands_refuse_build_options_for_a_built_engine(engine_dir, capsys):
    """A built engine's dtype, mesh, quantization, buckets and KV pool are fixed: the commands that
    take a model name the options they cannot apply instead of ignoring them."""
    from jaxinfer.cli import main

    engine = str(engine_dir)
    assert main(["generate", "--model", engine, "--quant", "w4a8", "--prompt", "hi"]) == 2
    assert f"{engine} is a built engine, whose --quant was fixed at build: drop it" in capsys.readouterr().err
    assert main(["generate", "--model", engine, "--dtype", "float32", "--tp", "2", "--prompt", "hi"]) == 2
    assert "whose --dtype, --tp were fixed at build: drop them" in capsys.readouterr().err
    assert main(["bench", "latency", engine, "--max-num-seqs", "4"]) == 2
    assert "whose --max-num-seqs was fixed at build" in capsys.readouterr().err
    assert main(["bench", "throughput", engine, "--kv-memory", "1GiB", "--decode-steps", "1"]) == 2
    assert "whose --kv-memory, --decode-steps were fixed at build" in capsys.readouterr().err
    assert main(["eval", "perplexity", engine, "--dtype", "bfloat16"]) == 2
    assert "whose --dtype was fixed at build" in capsys.readouterr().err


def test_build_refuses_an_engine_as_model_and_an_output_that_is_not_an_engine(engine_dir, tmp_path):
    source = json.loads((engine_dir / "manifest.json").read_text())["source"]
    with pytest.raises(EngineError, match=f"is a built engine already; build from .*--model {re.escape(source)}"):
        build_engine(engine_dir, tmp_path / "new", progress=False)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    for output in (precious, precious / "notes.txt"):
        with pytest.raises(EngineError, match="exists and is not an engine directory"):
            build_engine(None, output, progress=False)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_a_failed_save_leaves_the_engine_that_was_there(engine_dir, tmp_path, monkeypatch):
    from jaxinfer.engine import artifact

    target = tmp_path / "engine"
    shutil.copytree(engine_dir, target)
    before = sorted(p.name for p in target.rglob("*"))

    def broken_save(path, params):
        (path.parent / "executables" / "half.bin").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(artifact, "save_params", broken_save)
    runner = types.SimpleNamespace(params=None)
    with pytest.raises(OSError, match="disk full"):
        artifact.save_engine(target, types.SimpleNamespace(runner=runner), "source")
    assert sorted(p.name for p in target.rglob("*")) == before and artifact.read_manifest(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]  # nothing half-written beside it

    def write_new(directory, engine, source):
        directory.mkdir()
        (directory / "new.txt").write_text(source)

    monkeypatch.setattr(artifact, "_write_engine", write_new)
    assert artifact.save_engine(target, None, "rebuilt") == target.resolve()
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]


def test_serve_rebuilds_its_default_engine_only_when_it_cannot_load_it(engine_dir, tmp_path, monkeypatch):
    from jaxinfer.engine import build  # `jaxinfer serve` keeps its default engine with these

    builds = []
    monkeypatch.setattr(build, "build_engine", lambda model, output: builds.append((model, output)))
    monkeypatch.setattr(build, "turn_off_persistent_cache", lambda: None)  # a process-wide jax setting
    cached = tmp_path / "default"
    build.ensure_default_engine(cached)  # missing
    assert builds == [(None, cached)]
    shutil.copytree(engine_dir, cached)
    build.ensure_default_engine(cached)  # current
    assert len(builds) == 1 and (cached / "manifest.json").is_file()
    manifest = json.loads((cached / "manifest.json").read_text())
    (cached / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    build.ensure_default_engine(cached)  # another jaxinfer's
    assert len(builds) == 2 and not cached.exists()
    cached.mkdir()
    (cached / "weights.safetensors").write_bytes(b"unfinished")
    build.ensure_default_engine(cached)  # a build that did not finish
    assert len(builds) == 3 and not cached.exists()


def test_generate_refuses_a_request_it_cannot_run_before_loading(engine_dir, capsys):
    from jaxinfer.cli import main

    assert main(["generate", "--model", str(engine_dir), "--prompt", "hi", "--max-tokens", "0"]) == 2
    err = capsys.readouterr().err
    assert "max_tokens=0: must be in [1, 2**31)" in err and "loaded engine" not in err


def test_bfloat16_engine_round_trips_its_panel_weights(tmp_path):
    """A bfloat16 build stores its matmul weights as AMX panels where the kernel runs them (the
    manifest says so) and loads them back into the same structure: the same tokens as in-process."""
    from jaxinfer.engine.create import create_engine
    from jaxinfer.model.panel_weight import has_panel_weights, uses_panel_weights

    settings = dict(progress=False, dtype="bfloat16", max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128,
                    kv_memory="2MiB")
    directory = build_engine(CHECKPOINTS_DIR / "tiny-smollm2", tmp_path / "bf16", **settings)
    panels = uses_panel_weights("bfloat16", None, 1)
    assert json.loads((directory / "manifest.json").read_text())["panel_weights"] == panels
    loaded = load_engine(directory, progress=False)
    fresh = create_engine(CHECKPOINTS_DIR / "tiny-smollm2", **settings)
    assert has_panel_weights(loaded.runner.params) == panels
    assert jax.tree.structure(loaded.runner.params) == jax.tree.structure(fresh.runner.params)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 512, 20).tolist() for _ in range(3)]
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)] * 3
    assert [o[0].token_ids for o in generate(loaded, prompts, params)] == \
           [o[0].token_ids for o in generate(fresh, prompts, params)]


def test_build_refuses_the_persistent_compilation_cache(tmp_path):
    """Executables from jax's persistent cache serialize without some functions (XLA:CPU): an engine
    built from them fails when it runs, so the Python API refuses to build with the cache on..."""
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "cache"))
    try:
        with pytest.raises(EngineError, match="persistent compilation cache is on"):
            build_engine(CHECKPOINTS_DIR / "tiny-llama3", tmp_path / "engine", progress=False)
    finally:
        jax.config.update("jax_compilation_cache_dir", None)


def test_build_command_compiles_without_the_persistent_cache(tmp_path):
    """...and `jaxinfer build` turns the cache off before anything compiles: nothing goes through it
    (with it, a second build's cache hits made an engine that failed at its first step), and the
    engine it writes generates."""
    cache = tmp_path / "cache"
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    subprocess.run([sys.executable, "-m", "jaxinfer.cli", "build", "--model", str(CHECKPOINTS_DIR / "tiny-llama3"),
                    "--output", str(tmp_path / "engine"), "--dtype", "float32", "--max-num-seqs", "2",
                    "--max-num-batched-tokens", "16", "--max-model-len", "64", "--kv-memory", "1MiB",
                    "--decode-steps", "1"], env=env, check=True, capture_output=True)
    assert not cache.exists() or not any(cache.iterdir())
    engine = load_engine(tmp_path / "engine", progress=False)
    [output] = generate(engine, [[5, 6, 7]], [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)])
    assert len(output[0].token_ids) == 4
