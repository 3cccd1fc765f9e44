"""Where the data shipped with the code lies: configs/ (the YAML defaults and model shapes) and
data/corpus/ (text for calibration and perplexity). Both sit at the top of the source tree and
install as the data packages `jaxinfer.config_files` and `jaxinfer.corpus_files` (pyproject.toml),
so an editable install and a wheel find them the same way: through the import system."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def data_dir(package: str) -> Path:
    """The folder of a data package: "config_files" or "corpus_files"."""
    spec = importlib.util.find_spec(f"jaxinfer.{package}")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"jaxinfer.{package} is not installed with jaxinfer; reinstall it (`make setup`)")
    return Path(next(iter(spec.submodule_search_locations)))
