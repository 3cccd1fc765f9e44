"""`LLM`: the Python API for experiments, over one engine.

    llm = LLM()                                   # default model, compiled in-process
    llm = LLM("engines/smollm2")                  # a built engine directory: loads, no compilation
    llm = LLM("engines/smollm2", background=True) # returns while its buckets finish loading
    outs = llm.generate(["Hello", "Paris is"], SamplingParams(max_tokens=32, temperature=0))
    for delta in llm.stream("Once upon a time", SamplingParams(max_tokens=64)): print(delta, end="")

`generate` submits every prompt at once and steps the engine until all finish (continuous
batching); each RequestOutput carries texts, token ids, finish reasons, logprobs and timings
(`metrics.ttft`, `tpot`).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterator, Sequence

from jaxinfer.engine.create import create_engine
from jaxinfer.engine.outputs import RequestOutput
from jaxinfer.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str | Path | None = None, progress: bool = True, **engine_overrides):
        self.engine = create_engine(model, progress=progress, **engine_overrides)
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Sequence[str | list[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Runs every prompt (text or token ids) to completion; results in prompt order."""
        params_list = list(params) if isinstance(params, (list, tuple)) else [params or SamplingParams()] * len(prompts)
        order = []
        for prompt, p in zip(prompts, params_list, strict=True):
            request_id = f"llm-{next(self._ids)}"
            self._add(request_id, prompt, p)
            order.append(request_id)
        finished: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                if output.finished:
                    finished[output.request_id] = output
        return [finished[request_id] for request_id in order]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Yields text deltas of one request (sample 0) as they are generated."""
        request_id = f"llm-{next(self._ids)}"
        self._add(request_id, prompt, params or SamplingParams())
        done = False
        while not done:
            for output in self.engine.step():
                if output.request_id == request_id:
                    if output.outputs[0].delta_text:
                        yield output.outputs[0].delta_text
                    done = output.finished

    def chat_prompt(self, user_message: str) -> str:
        return self.tokenizer.apply_chat_template([{"role": "user", "content": user_message}])

    def _add(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        if isinstance(prompt, str):
            self.engine.add_request(request_id, prompt=prompt, params=params)
        else:
            self.engine.add_request(request_id, prompt_token_ids=prompt, params=params)
