"""The llama.cpp baseline (llama-cpp-python), run as a script by another Python (never our dependency).

    LLAMACPP_PYTHON jaxinfer/bench/llamacpp_worker.py JOB.json   ->  results JSON on stdout

The job and the timing are worker_protocol's; this file only loads the .gguf file as llama.cpp
stores it (its own quantized kernels, f16 KV cache) and generates. llama-cpp-python's `Llama`
holds one sequence, so it generates one request at a time (batch 1): each generation starts from
an empty KV cache (no prefix reuse from the previous request), prefills the prompt in chunks of
n_batch tokens and decodes greedily (temp 0) for exactly the requested number of tokens, EOS
ignored. It imports only the standard library, llama_cpp and worker_protocol.
"""

import itertools
import time

import llama_cpp

from worker_protocol import max_sequence_len, serve


class LlamaCppBackend:
    def __init__(self, job: dict):
        self.llm = llama_cpp.Llama(model_path=job["model"], n_ctx=max_sequence_len(job),
                                   n_threads=job["threads"], n_threads_batch=job["threads"], verbose=False)
        self.info = {"llama_cpp_python": llama_cpp.__version__}

    def generate(self, prompts: list[list[int]], new_tokens: int) -> float:
        if len(prompts) != 1:
            raise ValueError(f"llama-cpp-python generates one sequence at a time, not {len(prompts)}")
        # n_tokens = 0 makes generate() clear the KV cache instead of reusing the previous prompt's prefix.
        self.llm.reset()
        tokens = self.llm.generate(prompts[0], temp=0.0, reset=True)
        next(tokens)
        first = time.perf_counter()
        for _ in itertools.islice(tokens, new_tokens - 1):
            pass
        return first


if __name__ == "__main__":
    serve(LlamaCppBackend)
