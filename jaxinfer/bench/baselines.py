"""The external baselines (HF transformers, llama.cpp), each run as a worker script in its own Python.

`BASELINES` describes each one: its worker (jaxinfer/bench/<name>_worker.py, speaking
worker_protocol's job format), the module its venv must hold, its default venv (made by
scripts/setup_baselines.sh NAME), whether it batches requests and whether it needs a .gguf file.
`run_job(baseline, python, job)` writes the job as JSON, runs the worker under `python` and
returns its JSON result. `checkpoint_source(model, baseline)` maps what our commands accept
(None, a checkpoint, an engine directory) to the file or directory the baseline loads: the same
weights. This module imports nothing heavy: the CLI parser reads BASELINES.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from jaxinfer.errors import EngineError

# The environment check run in the baseline's Python exits with this code when its module is missing.
MISSING_MODULE_EXIT = 3


@dataclasses.dataclass(frozen=True)
class Baseline:
    name: str         # --baseline NAME, --NAME-python, scripts/setup_baselines.sh NAME, .venv-NAME
    label: str        # its row in the tables
    module: str       # what its Python must import
    batched: bool     # generates several requests at once (else one at a time)
    needs_gguf: bool  # loads only .gguf files

    @property
    def worker(self) -> Path:
        return Path(__file__).with_name(f"{self.name}_worker.py")

    @property
    def default_python(self) -> str:
        return f".venv-{self.name}/bin/python"

    @property
    def setup_hint(self) -> str:
        return f"run scripts/setup_baselines.sh {self.name}, which makes .venv-{self.name}"


BASELINES = {b.name: b for b in [
    Baseline("hf", "hf transformers", "transformers", batched=True, needs_gguf=False),
    Baseline("llamacpp", "llama.cpp", "llama_cpp", batched=False, needs_gguf=True),
]}


def checkpoint_source(model: str | Path | None, baseline: Baseline) -> str:
    # Imported here: the engine modules import jax, and the CLI parser imports this module.
    from jaxinfer.checkpoint import random_weights
    from jaxinfer.checkpoint.default_model import default_model_path
    from jaxinfer.engine.create import ENGINE_MANIFEST, is_engine_dir

    if model is None:
        source = str(default_model_path())
    elif is_engine_dir(model):
        source = json.loads((Path(model) / ENGINE_MANIFEST).read_text())["source"]
    else:
        source = str(model)
    if random_weights.is_random_spec(source):
        raise EngineError(f"the {baseline.label} baseline needs real weights, and {source} has none (random weights "
                          f"for a shape): drop --baseline {baseline.name} or pass a checkpoint")
    if baseline.needs_gguf and not source.endswith(".gguf"):
        raise EngineError(f"the {baseline.label} baseline loads .gguf files only, and the model is {source}")
    return source


def _check_environment(baseline: Baseline, python: str | Path) -> None:
    if not Path(python).is_file():
        raise EngineError(f"--{baseline.name}-python {python} does not exist; {baseline.setup_hint}")
    # find_spec, not import: torch takes seconds to import, and the worker imports it anyway.
    check = (f"import importlib.util, sys; "
             f"sys.exit({MISSING_MODULE_EXIT} if importlib.util.find_spec({baseline.module!r}) is None else 0)")
    done = subprocess.run([str(python), "-c", check], capture_output=True, text=True)
    if done.returncode == MISSING_MODULE_EXIT:
        raise EngineError(f"--{baseline.name}-python {python} has no {baseline.module}; {baseline.setup_hint}")
    if done.returncode:
        raise EngineError(f"--{baseline.name}-python {python} does not run (exit {done.returncode}):\n"
                          f"{done.stderr[-2000:]}")


def run_job(baseline: Baseline, python: str | Path, job: dict) -> dict:
    _check_environment(baseline, python)
    job = {"threads": os.cpu_count() or 1, **job}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as job_file:
        json.dump(job, job_file)
        job_file.flush()
        print(f"running the {baseline.label} baseline ({job['job']}) with {python}", file=sys.stderr)
        done = subprocess.run([str(python), str(baseline.worker), job_file.name], capture_output=True, text=True)
    if done.returncode:
        raise EngineError(f"the {baseline.label} baseline failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)
