"""The HF transformers baseline, run as a script by another Python (torch is never our dependency).

    HF_PYTHON jaxinfer/bench/hf_worker.py JOB.json   ->  results JSON on stdout

The job and the timing are worker_protocol's; this file only loads the model (a HF directory or a
.gguf file, in the job's dtype: the engine's) and generates: greedy `generate` over a left-padded
batch, forced to exactly the requested number of new tokens. It imports only the standard library, torch,
transformers and worker_protocol.
"""

import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from worker_protocol import serve


class FirstTokenClock:
    """A `generate` streamer that notes when the first new tokens come out: generate hands it the
    prompt first, then each step's tokens."""

    def __init__(self):
        self.puts, self.first = 0, None

    def put(self, tokens) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


class HFBackend:
    def __init__(self, job: dict):
        torch.set_num_threads(job["threads"])
        path = Path(job["model"])
        dtype = getattr(torch, job["dtype"])
        if path.suffix == ".gguf":
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        self.model = model.eval()
        self.info = {"torch": torch.__version__, "dtype": job["dtype"]}

    def generate(self, prompts: list[list[int]], new_tokens: int) -> float:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        clock = FirstTokenClock()
        with torch.inference_mode():
            self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=clock)
        return clock.first


if __name__ == "__main__":
    serve(HFBackend)
