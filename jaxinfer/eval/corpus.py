"""Token windows from the shipped text corpus (data/corpus/): the input of perplexity evaluation
and of quantization calibration.

    corpus_windows(tokenizer, path, window_len, num_windows) -> [num_windows, window_len] int32

The text is tokenized once as a whole and cut into consecutive, non-overlapping windows from its
start, so the same arguments always give the same windows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxinfer.errors import RequestError
from jaxinfer.package_data import data_dir

CORPUS_DIR = data_dir("corpus_files")
HELDOUT = CORPUS_DIR / "heldout.txt"
CALIBRATION = CORPUS_DIR / "calibration.txt"
# Perplexity windows: 16 x 256 tokens score the default model in under a minute on a 2-core CPU.
DEFAULT_WINDOWS = 16
DEFAULT_WINDOW_LEN = 256


def corpus_windows(tokenizer, path: str | Path, window_len: int, num_windows: int) -> np.ndarray:
    """The first `num_windows` consecutive windows of `window_len` tokens of the text at `path`."""
    if window_len < 2 or num_windows < 1:
        raise RequestError(f"{num_windows} windows of {window_len} tokens: a window predicts each of its tokens "
                           "after the first, so ask for at least one window of at least 2 tokens")
    path = Path(path)
    if not path.is_file():
        raise RequestError(f"corpus file {path} does not exist; pass a plain-text file (data/corpus/ ships two)")
    ids = np.asarray(tokenizer.encode(path.read_text(encoding="utf-8"), add_special_tokens=False), dtype=np.int32)
    available = len(ids) // window_len
    if available < num_windows:
        raise RequestError(f"{path} has {len(ids)} tokens: {available} windows of {window_len}, but {num_windows} "
                           "were asked for; ask for fewer or shorter windows")
    return ids[: num_windows * window_len].reshape(num_windows, window_len)
