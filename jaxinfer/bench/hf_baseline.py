"""Running the HF transformers baseline (jaxinfer/bench/hf_worker.py) in its own Python.

`run_hf_job(hf_python, job)` writes the job as JSON, runs the worker under `hf_python` (a venv
with torch + transformers, see scripts/setup_baselines.sh) and returns its JSON result.
`checkpoint_source(model)` maps what our commands accept (None, a checkpoint, an engine
directory) to the file or directory HF loads: the same weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from jaxinfer.checkpoint.default_model import default_model_path
from jaxinfer.engine.create import ENGINE_MANIFEST, is_engine_dir
from jaxinfer.errors import EngineError

WORKER = Path(__file__).with_name("hf_worker.py")


def checkpoint_source(model: str | Path | None) -> str:
    if model is None:
        return str(default_model_path())
    if is_engine_dir(model):
        return json.loads((Path(model) / ENGINE_MANIFEST).read_text())["source"]
    return str(model)


def run_hf_job(hf_python: str | Path, job: dict) -> dict:
    if not Path(hf_python).is_file():
        raise EngineError(f"--hf-python {hf_python} does not exist; create the baseline env with "
                          "scripts/setup_baselines.sh (it makes .venv-hf)")
    job = {"threads": os.cpu_count() or 1, **job}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as job_file:
        json.dump(job, job_file)
        job_file.flush()
        print(f"running the HF transformers baseline ({job['job']}) with {hf_python}", file=sys.stderr)
        done = subprocess.run([str(hf_python), str(WORKER), job_file.name], capture_output=True, text=True)
    if done.returncode:
        raise EngineError(f"the HF baseline failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)
