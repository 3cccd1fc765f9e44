"""The HF transformers baseline, run as a script by another Python (torch is never our dependency).

    HF_PYTHON jaxinfer/bench/hf_worker.py JOB.json   ->  results JSON on stdout

It imports only the standard library, torch and transformers. JOB.json:
    {"model": HF directory or .gguf file, "threads": int, "job": "throughput" | "latency", ...}
  throughput: "requests": [[prompt ids, max_tokens], ...], "batch_size": B
      Greedy `generate` over consecutive batches of B (left-padded), each generating exactly the
      longest max_tokens of its batch; only each request's own max_tokens count as output.
      -> {"duration_s", "input_tokens", "output_tokens", "num_requests"}
  latency: "ttft_prompts": {length: [[ids], ...]}, "decode_prompts": [[ids], ...], "decode_tokens": N,
           "batch_sizes": [1, 8]
      TTFT: median time of a 1-token generate per prompt length. Decode rate at batch b:
      b x (N - 1) tokens over the time a N-token generate takes beyond a 1-token one.
      -> {"ttft_s": {length: s}, "decode_tokens_per_s": {b: tokens/s}}
"""

import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


def load_model(path: str):
    model_path = Path(path)
    if model_path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name,
                                                     dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return model.eval()


def timed_generate(model, prompts: list[list[int]], new_tokens: int) -> float:
    """Seconds for one greedy generate of exactly `new_tokens` tokens for the left-padded batch."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return time.perf_counter() - start


def throughput(model, job: dict) -> dict:
    requests, batch = job["requests"], job["batch_size"]
    start = time.perf_counter()
    for first in range(0, len(requests), batch):
        group = requests[first:first + batch]
        timed_generate(model, [ids for ids, _ in group], max(tokens for _, tokens in group))
    return {"duration_s": time.perf_counter() - start, "num_requests": len(requests),
            "input_tokens": sum(len(ids) for ids, _ in requests),
            "output_tokens": sum(tokens for _, tokens in requests)}


def latency(model, job: dict) -> dict:
    ttft = {length: statistics.median(timed_generate(model, [ids], 1) for ids in prompts)
            for length, prompts in job["ttft_prompts"].items()}
    n = job["decode_tokens"]
    rates = {}
    for b in job["batch_sizes"]:
        prompts = job["decode_prompts"][:b]
        timed_generate(model, prompts, 2)  # warm-up for this batch shape
        rates[str(b)] = b * (n - 1) / (timed_generate(model, prompts, n) - timed_generate(model, prompts, 1))
    return {"ttft_s": ttft, "decode_tokens_per_s": rates}


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(job["threads"])
    model = load_model(job["model"])
    timed_generate(model, [[1, 2, 3]], 2)  # first-call overheads stay out of the figures
    result = {"throughput": throughput, "latency": latency}[job["job"]](model, job)
    result.update(torch=torch.__version__, threads=job["threads"])
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
