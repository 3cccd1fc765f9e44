"""Engine directories that must be refused or kept: a directory that is not an engine, a manifest
that is malformed or built for another CPU, and the build's weight packing recorded for the load."""

import contextlib
import io
import json
import shutil

import pytest

from conftest import CHECKPOINTS_DIR
from jaxinfer.engine.artifact import environment, load_engine, read_manifest
from jaxinfer.engine.build import build_engine
from jaxinfer.engine.config import EngineConfig
from jaxinfer.engine.create import is_engine_dir
from jaxinfer.errors import EngineError
from jaxinfer.quant.apply import uses_cpu_kernel
from jaxinfer.sampling_params import SamplingParams
from pallas_kernels import cpu_int8_dot

# The fewest buckets: one token bucket and one sequence bucket.
SMALL = dict(progress=False, max_num_seqs=1, max_num_batched_tokens=16, min_token_bucket=16, decode_steps=1,
             kv_memory="1MiB")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny engine asked for a max_model_len longer than the model's 256 positions, and what its
    build printed."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        path = build_engine(CHECKPOINTS_DIR / "tiny-llama3", tmp_path_factory.mktemp("engines") / "tiny",
                            dtype="float32", max_model_len=1024, **SMALL)
    return path, stderr.getvalue()


def edited_copy(engine, tmp_path, edit):
    """A copy of `engine` whose manifest is `edit(copy's directory, manifest)`."""
    copy = tmp_path / "copy"
    shutil.copytree(engine, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps(edit(copy, manifest)))
    return copy


def test_build_keeps_a_directory_whose_manifest_json_is_not_an_engines(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "manifest.json").write_text('{"name": "app", "start_url": "/"}')
    (site / "index.html").write_text("<html></html>")
    assert not is_engine_dir(site)
    with pytest.raises(EngineError, match=f"{site} exists and is not an engine directory"):
        build_engine(CHECKPOINTS_DIR / "tiny-llama3", site, **SMALL)
    assert sorted(p.name for p in site.iterdir()) == ["index.html", "manifest.json"]


def test_a_user_set_max_model_len_is_lowered_aloud_and_kv_memory_checked_at_once(built):
    path, stderr = built
    assert "max_model_len 1024 lowered to 256, the model's max_position_embeddings" in stderr
    assert read_manifest(path)["engine_config"]["max_model_len"] == 256
    with pytest.raises(EngineError, match="kv_memory='1GiBB' is neither a size"):
        EngineConfig.create(kv_memory="1GiBB")


def test_cpu_engine_records_the_cpu_instruction_set_and_refuses_a_cpu_without_it(built, tmp_path):
    env = read_manifest(built[0])["environment"]
    if env["backend"] != "cpu" or not environment()["cpu_flags"]:
        pytest.skip("no CPU flags to read here")
    assert "avx2" in env["cpu_flags"] and "hypervisor" not in env["cpu_flags"]
    more = {**env, "cpu_flags": env["cpu_flags"] + ["zz_isa1", "zz_isa2"]}
    other = edited_copy(built[0], tmp_path, lambda d, m: {**m, "environment": more})
    with pytest.raises(EngineError, match="built for a CPU with zz_isa1, zz_isa2; this one lacks them: rebuild"):
        read_manifest(other)


def drop_bucket_file(directory, manifest):
    name = next(iter(manifest["files"].keys() - {"weights.safetensors", "tokenizer.json", "tokenizer_meta.json"}))
    (directory / name).unlink()
    del manifest["files"][name]
    return manifest


MALFORMED = {
    "no environment": lambda d, m: {key: value for key, value in m.items() if key != "environment"},
    "extra model_config key": lambda d, m: {**m, "model_config": {**m["model_config"], "sliding_window": 4096}},
    "a JSON list": lambda d, m: [m],
    "panel_weights not a boolean": lambda d, m: {**m, "panel_weights": "yes"},
    "no cpu_kernel_weights": lambda d, m: {key: value for key, value in m.items() if key != "cpu_kernel_weights"},
    "bucket file unlisted": drop_bucket_file,
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_manifest_is_refused_clearly_and_the_default_engine_rebuilt(built, tmp_path, monkeypatch, case):
    from jaxinfer.engine import build

    broken = edited_copy(built[0], tmp_path, MALFORMED[case])
    with pytest.raises(EngineError, match="is not a valid engine manifest: .*; rebuild it with `jaxinfer build`"):
        load_engine(broken, progress=False)
    builds = []
    monkeypatch.setattr(build, "build_engine", lambda model, output: builds.append(output))
    monkeypatch.setattr(build, "turn_off_persistent_cache", lambda: None)  # a process-wide jax setting
    build.ensure_default_engine(broken)
    assert builds == [broken] and not broken.exists()


def test_w4a8_engine_whose_head_the_int8_kernel_cannot_take_loads(tmp_path):
    """A vocab that is not a multiple of 4 leaves the head unpacked, so the executables call the
    int4 kernel only: the load must still restore the layers packed as the build packed them."""
    if not uses_cpu_kernel("w4a8", 1):
        pytest.skip("the CPU int4/int8 kernels do not run here")
    from safetensors.numpy import load_file, save_file

    checkpoint = tmp_path / "vocab510"
    shutil.copytree(CHECKPOINTS_DIR / "tiny-llama3", checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "vocab_size": 510}))
    tensors = load_file(checkpoint / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = tensors[name][:510].copy()
    save_file(tensors, checkpoint / "model.safetensors")
    path = build_engine(checkpoint, tmp_path / "engine", quant="w4a8", max_model_len=64, **SMALL)
    manifest = read_manifest(path)
    assert manifest["cpu_kernel_weights"] and cpu_int8_dot.TARGET not in manifest["ffi_kernels"]
    engine = load_engine(path, progress=False)
    engine.add_request("r", prompt_token_ids=[1, 5, 7], params=SamplingParams(temperature=0, max_tokens=2,
                                                                              ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
