"""A wheel (a non-editable install) holds what jaxinfer reads at run time: every package of the tree,
the YAML defaults of configs/, the corpus of data/corpus/, the C++ kernels' sources and headers and
the protos."""

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import setuptools

REPO_ROOT = Path(__file__).resolve().parent.parent


def _setuptools_config() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_the_package_list_holds_every_package_of_the_tree():
    config = _setuptools_config()
    code_packages = setuptools.find_packages(str(REPO_ROOT), include=["jaxinfer*", "pallas_kernels*", "serving*"])
    data_packages = [name for name in config["packages"] if name.split(".")[1:2] in (["config_files"], ["corpus_files"])]
    assert data_packages, "the data packages are missing from pyproject.toml"
    assert sorted(config["packages"]) == sorted(code_packages + data_packages)


def test_an_installed_wheel_finds_its_configs_corpus_and_kernel_sources(tmp_path):
    # Built from a copy of the tree: an in-tree build would reuse what an earlier one left in build/.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    for folder in ("jaxinfer", "pallas_kernels", "serving", "configs", "data/corpus"):
        shutil.copytree(REPO_ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("jaxinfer-*.whl"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    # -S: no site initialisation, so the editable install's finder (a .pth file) does not shadow the
    # wheel; the dependencies come from this environment's site-packages after it.
    env = {**os.environ, "PYTHONPATH": f"{target}{os.pathsep}{sysconfig.get_paths()['purelib']}"}
    probe = """
import jaxinfer, pallas_kernels.cpu_dense_dot as dense, serving
from pathlib import Path
from jaxinfer.configs import CONFIG_DIR, load_config
from jaxinfer.eval.corpus import CALIBRATION, HELDOUT
from jaxinfer.engine.config import EngineConfig
print(Path(jaxinfer.__file__).parent)
print(CONFIG_DIR)
assert load_config("defaults")["dtype"] and load_config("sharding")["logical_axis_rules"]
assert EngineConfig.create().max_num_seqs > 0
assert CALIBRATION.stat().st_size > 0 and HELDOUT.stat().st_size > 0
assert (CONFIG_DIR / "models" / "llama3-8b" / "config.json").is_file()
source = Path(dense.__file__).with_suffix(".cc")
assert source.is_file() and (source.parent / "cpu_thread_pool.h").is_file()
assert (Path(serving.__file__).parent / "protos" / "jaxinfer.proto").is_file()
"""
    result = subprocess.run([sys.executable, "-S", "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    package_dir, config_dir = result.stdout.split()
    assert Path(package_dir) == target / "jaxinfer"
    assert Path(config_dir) == target / "jaxinfer" / "config_files"
