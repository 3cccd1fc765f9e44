"""Write the HF transformers oracle outputs that jaxinfer's model and tokenizer tests compare against.

jaxinfer never depends on torch, so this script runs once in its own environment (`.venv-hf`: Python 3.11,
torch CPU, transformers 5) and its outputs are committed; CI only reads them.

Regenerate (from the repository root; the default model's GGUF comes from `make setup`'s `.venv`):

    scripts/make_goldens.sh
    # or, with .venv-hf already built:
    .venv-hf/bin/python scripts/make_goldens.py --gguf PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf

Reruns on the same machine write byte-identical files (fixed seeds, one torch thread, fixed zip stamps).

What it writes (all float32 from torch on CPU, eager attention, `model.eval()`, `torch.no_grad()`):

tests/checkpoints/<name>/ for name in tiny-llama2, tiny-llama3, tiny-mistral, tiny-qwen2, tiny-smollm2:
    random-init HF checkpoints (config.json, float32 safetensors, generation_config.json, tokenizer.json,
    tokenizer_config.json with a ChatML chat_template). tiny-smollm2 is sharded in two files with
    model.safetensors.index.json. tiny-llama2 and tiny-llama3 keep the transformers-4 config form
    (top-level `rope_theta`, `rope_scaling`); the others the transformers-5 form (`rope_parameters`).

tests/goldens/<name>.npz, one per tiny checkpoint, for prompt i in 0, 1, 2 (lengths 1, 7, 19):
    prompt_{i}_ids                int32   [L]          random token ids
    prompt_{i}_logits             float32 [L, vocab]   logits of every prompt position (one forward)
    prompt_{i}_greedy_ids         int32   [32]         greedy continuation, EOS disabled (never stops early)
    prompt_{i}_greedy_step_logits float32 [32, vocab]  logits that picked each continuation token
                                                       (row 0 is the prompt's last position)
tests/goldens/<name>.json: versions, settings, each key's shape and dtype, and the smallest top-1/top-2
    logit gap over the greedy steps (how much numeric noise the greedy ids tolerate).

tests/goldens/smollm2_135m_instruct.npz, the default model loaded by transformers from the GGUF file, for
prompt i in 0 (English sentence, the shortest), 1 (code), 2 (chat template, generation prompt added):
    prompt_{i}_ids                   int32   [L]
    prompt_{i}_last_logits           float32 [vocab]       logits of the last prompt position
    prompt_{i}_greedy_ids            int32   [n <= 32]     greedy continuation, stopping at EOS (EOS kept)
    prompt_{i}_greedy_step_top_ids   int32   [n, 8]        the 8 best tokens at each greedy step, best first
    prompt_{i}_greedy_step_top_logits float32 [n, 8]       their logits
    prompt_0_logits                  float32 [L0, vocab]   logits of every position of the shortest prompt
tests/goldens/smollm2_135m_instruct.json: prompt texts, decoded continuations, whether each stopped at EOS.

tests/goldens/smollm2_tokenizer.json: the GGUF tokenizer as transformers reads it: ids of tricky strings
    with and without special tokens, decode round trips, a 3-turn chat rendered with and without the
    generation prompt (text and ids), BOS/EOS ids and the raw chat template.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MistralConfig, Qwen2Config

REPO_ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS_DIR = REPO_ROOT / "tests" / "checkpoints"
GOLDENS_DIR = REPO_ROOT / "tests" / "goldens"

TINY_VOCAB_SIZE = 512
TINY_PROMPT_LENGTHS = (1, 7, 19)
MAX_NEW_TOKENS = 32
TOP_K_RECORDED = 8
# transformers' default 0.02 leaves q.k scores near 0, so attention is almost uniform and a wrong RoPE or
# causal mask would barely move the logits; 0.1 gives scores of order 1.
TINY_INIT_STD = 0.1
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
BOS_TOKEN, EOS_TOKEN = "<|im_start|>", "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Written here so the tiny tokenizer is trained on the same bytes everywhere; it only needs enough
# distinct pairs to reach TINY_VOCAB_SIZE merges.
TOKENIZER_TRAINING_TEXT = """\
A small language model reads a prompt one token at a time and writes the next token it thinks is likely.
The kitchen clock said 7:45 when Maria opened the window; the garden smelled of rain, mint and tomatoes.
def add_numbers(first, second):
    \"\"\"Return the sum of two numbers.\"\"\"
    total = first + second
    return total

for index in range(10):
    print(index * 3.14159, "squared is", index ** 2)
Questions and answers: What is the capital of France? Paris. How many legs does a spider have? Eight.
The train left the station at 12:30 and arrived 45 minutes later, carrying 1,024 passengers north.
Cafe, naive, resume: accents are bytes too. Numbers like 2024, 100000 and 0.5 appear in every text.
<html><body><p>Hello, world!</p></body></html>  {"key": [1, 2, 3], "other": null}
She sells sea shells by the sea shore; the shells she sells are surely sea shells.
It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of foolishness.
"""


@dataclass(frozen=True)
class TinySpec:
    """One tiny checkpoint: its transformers config, on-disk config form and sharding."""

    name: str
    config: transformers.PretrainedConfig
    seed: int
    legacy_rope_config: bool
    shard_count: int = 1
    expected_bias_count: int = 0


def tiny_specs() -> list[TinySpec]:
    """The five tiny architectures the JAX model must reproduce."""
    shared = dict(
        vocab_size=TINY_VOCAB_SIZE,
        max_position_embeddings=128,
        initializer_range=TINY_INIT_STD,
        bos_token_id=1,
        eos_token_id=2,
    )
    return [
        TinySpec(
            "tiny-llama2",
            LlamaConfig(
                **shared, hidden_size=64, head_dim=16, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, intermediate_size=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            ),
            seed=1, legacy_rope_config=True,
        ),
        TinySpec(
            "tiny-llama3",
            # original_max_position_embeddings 64 puts the wavelength bands at 16 and 64 positions, so with
            # head_dim 16 one frequency stays, one is interpolated and six are divided by the factor.
            LlamaConfig(
                **{**shared, "max_position_embeddings": 256}, hidden_size=64, head_dim=16, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, intermediate_size=160, rms_norm_eps=1e-5,
                tie_word_embeddings=False,
                rope_parameters={
                    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                },
            ),
            seed=2, legacy_rope_config=True,
        ),
        TinySpec(
            "tiny-mistral",
            # One KV head for four query heads: the widest GQA group among the tiny checkpoints.
            MistralConfig(
                **shared, hidden_size=64, head_dim=16, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=1, intermediate_size=172, rms_norm_eps=1e-5, tie_word_embeddings=False,
                sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            ),
            seed=3, legacy_rope_config=False,
        ),
        TinySpec(
            "tiny-qwen2",
            Qwen2Config(
                **shared, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=172, rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
            ),
            seed=4, legacy_rope_config=False, expected_bias_count=2 * 3,
        ),
        TinySpec(
            "tiny-smollm2",
            LlamaConfig(
                **shared, hidden_size=96, head_dim=16, num_hidden_layers=2, num_attention_heads=6,
                num_key_value_heads=2, intermediate_size=160, rms_norm_eps=1e-5, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
            ),
            seed=5, legacy_rope_config=False, shard_count=2,
        ),
    ]


def train_tiny_tokenizer() -> tokenizers.Tokenizer:
    """A byte-level BPE with exactly TINY_VOCAB_SIZE ids; ids 0-2 are the special tokens, as in SmolLM2."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([TOKENIZER_TRAINING_TEXT], trainer=trainer)
    if tokenizer.get_vocab_size() != TINY_VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer has {tokenizer.get_vocab_size()} ids, wanted {TINY_VOCAB_SIZE}")
    return tokenizer


def save_tiny_tokenizer(tokenizer: tokenizers.Tokenizer, checkpoint_dir: Path) -> None:
    """tokenizer.json plus a hub-style tokenizer_config.json that carries the chat template inline."""
    tokenizer.save(str(checkpoint_dir / "tokenizer.json"))
    # transformers 5's save_pretrained moves the template to chat_template.jinja and names its own
    # backend class; hub checkpoints (and our loader) expect both inline in tokenizer_config.json.
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "model_max_length": 128,
        "chat_template": CHATML_TEMPLATE,
    }
    write_json(checkpoint_dir / "tokenizer_config.json", tokenizer_config)


def randomize_norms_and_biases(model: torch.nn.Module, seed: int) -> int:
    """Random init leaves RMSNorm weights at 1 and biases at 0, which would hide a loader that drops them.

    Returns the number of bias tensors randomized.
    """
    generator = torch.Generator().manual_seed(seed)
    bias_count = 0
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(0.5 + torch.rand(parameter.shape, generator=generator))
            elif name.endswith(".bias"):
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
                bias_count += 1
    return bias_count


def rewrite_config_in_legacy_rope_form(checkpoint_dir: Path) -> None:
    """Turn `rope_parameters` into transformers-4's top-level `rope_theta` + `rope_scaling`."""
    config_path = checkpoint_dir / "config.json"
    config = json.loads(config_path.read_text())
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = None if rope["rope_type"] == "default" else rope
    write_json(config_path, config)


def unique_parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters as stored once each (tied embeddings count once)."""
    return sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())


def write_tiny_checkpoint(spec: TinySpec, tokenizer: tokenizers.Tokenizer) -> Path:
    """Random-init the model, save it and its tokenizer, reload it from disk and check nothing changed."""
    checkpoint_dir = CHECKPOINTS_DIR / spec.name
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    for stale in checkpoint_dir.glob("*.safetensors*"):
        stale.unlink()
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(spec.config, dtype=torch.float32).eval()
    bias_count = randomize_norms_and_biases(model, spec.seed)
    if bias_count != spec.expected_bias_count:
        raise RuntimeError(f"{spec.name}: {bias_count} bias tensors, expected {spec.expected_bias_count}")
    # Sharding splits between tensors, so a limit a bit over half the bytes gives exactly two files.
    shard_limit = unique_parameter_bytes(model) * 6 // 10 if spec.shard_count > 1 else "50GB"
    model.save_pretrained(checkpoint_dir, safe_serialization=True, max_shard_size=shard_limit)
    shard_count = len(list(checkpoint_dir.glob("*.safetensors")))
    if shard_count != spec.shard_count:
        raise RuntimeError(f"{spec.name}: {shard_count} safetensors files, expected {spec.shard_count}")
    if spec.legacy_rope_config:
        rewrite_config_in_legacy_rope_form(checkpoint_dir)
    save_tiny_tokenizer(tokenizer, checkpoint_dir)
    check_reload_matches(checkpoint_dir, model)
    return checkpoint_dir


def check_reload_matches(checkpoint_dir: Path, saved_model: torch.nn.Module) -> None:
    """The checkpoint on disk must give transformers the same RoPE settings and weights as the saved model."""
    reloaded_config = AutoConfig.from_pretrained(checkpoint_dir)
    if reloaded_config.rope_parameters != saved_model.config.rope_parameters:
        raise RuntimeError(
            f"{checkpoint_dir.name}: config.json reloads with rope {reloaded_config.rope_parameters}, "
            f"saved with {saved_model.config.rope_parameters}"
        )
    reloaded = load_tiny_model(checkpoint_dir)
    saved_state = saved_model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        if not torch.equal(tensor, saved_state[name]):
            raise RuntimeError(f"{checkpoint_dir.name}: {name} differs after reload")
    template = AutoTokenizer.from_pretrained(checkpoint_dir).chat_template
    if template != CHATML_TEMPLATE:
        raise RuntimeError(f"{checkpoint_dir.name}: tokenizer reloads with chat template {template!r}")


def load_tiny_model(checkpoint_dir: Path) -> torch.nn.Module:
    """The checkpoint as transformers loads it, in float32 with eager attention."""
    return AutoModelForCausalLM.from_pretrained(
        checkpoint_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def count_llama3_scaled_frequencies(model: torch.nn.Module) -> tuple[int, int]:
    """(unchanged, changed) RoPE frequencies against unscaled RoPE, to prove the scaling is exercised."""
    rope = model.config.rope_parameters
    head_dim = model.config.head_dim
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
    unscaled = 1.0 / (rope["rope_theta"] ** exponents)
    scaled = model.model.rotary_emb.inv_freq
    unchanged = int(torch.isclose(scaled, unscaled, rtol=1e-6, atol=0.0).sum())
    return unchanged, scaled.numel() - unchanged


def greedy_continuation(
    model: torch.nn.Module, prompt_ids: np.ndarray, eos_token_id: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """HF greedy decoding of up to MAX_NEW_TOKENS after `prompt_ids` [L] int.

    Returns (new ids [n] int32, raw logits of each step [n, vocab] float32). `eos_token_id=None` lets
    generation run past EOS (it must be a keyword: a GenerationConfig's None would be filled in from the
    model's generation_config).
    """
    output = model.generate(
        torch.from_numpy(prompt_ids.astype(np.int64))[None],
        do_sample=False,
        max_new_tokens=MAX_NEW_TOKENS,
        eos_token_id=eos_token_id,
        pad_token_id=model.config.eos_token_id,
        output_logits=True,
        return_dict_in_generate=True,
    )
    new_ids = output.sequences[0, prompt_ids.size :].numpy().astype(np.int32)
    step_logits = torch.stack(output.logits, dim=1)[0].numpy().astype(np.float32)
    if not np.array_equal(step_logits.argmax(axis=-1), new_ids):
        raise RuntimeError("generate() did not pick the argmax of its own logits: something is not greedy")
    return new_ids, step_logits


def prompt_logits(model: torch.nn.Module, prompt_ids: np.ndarray) -> np.ndarray:
    """Logits [L, vocab] float32 of one forward over `prompt_ids` [L]."""
    return model(torch.from_numpy(prompt_ids.astype(np.int64))[None]).logits[0].numpy().astype(np.float32)


def top2_margins(step_logits: np.ndarray) -> np.ndarray:
    """Gap between the best and second-best logit of each row of [n, vocab]."""
    best_two = np.sort(step_logits, axis=-1)[:, -2:]
    return best_two[:, 1] - best_two[:, 0]


def check_first_step_matches_prefill(all_logits: np.ndarray, step_logits: np.ndarray, where: str) -> None:
    """generate()'s first step and a plain forward compute the same last-position logits."""
    # generate() projects only the last row to logits, so float32 sums are grouped differently: about
    # 3e-5 apart on the default model's logits of magnitude 20.
    if not np.allclose(step_logits[0], all_logits[-1], rtol=1e-5, atol=1e-4):
        raise RuntimeError(f"{where}: generate's first step disagrees with the prompt forward")


def tiny_goldens(spec: TinySpec, checkpoint_dir: Path) -> dict:
    """Run the reloaded tiny checkpoint on random prompts; writes its npz, returns its header."""
    model = load_tiny_model(checkpoint_dir)
    rng = np.random.default_rng(1000 + spec.seed)
    arrays: dict[str, np.ndarray] = {}
    margins = []
    for index, length in enumerate(TINY_PROMPT_LENGTHS):
        prompt_ids = rng.integers(0, TINY_VOCAB_SIZE, size=length).astype(np.int32)
        all_logits = prompt_logits(model, prompt_ids)
        new_ids, step_logits = greedy_continuation(model, prompt_ids, eos_token_id=None)
        if new_ids.size != MAX_NEW_TOKENS:
            raise RuntimeError(f"{spec.name}: greedy stopped after {new_ids.size} tokens with EOS disabled")
        check_first_step_matches_prefill(all_logits, step_logits, f"{spec.name} prompt {index}")
        arrays[f"prompt_{index}_ids"] = prompt_ids
        arrays[f"prompt_{index}_logits"] = all_logits
        arrays[f"prompt_{index}_greedy_ids"] = new_ids
        arrays[f"prompt_{index}_greedy_step_logits"] = step_logits
        margins.append(top2_margins(step_logits).min())
    save_npz_reproducibly(GOLDENS_DIR / f"{spec.name}.npz", arrays)
    header = {
        "checkpoint": str(checkpoint_dir.relative_to(REPO_ROOT)),
        "architecture": model.config.architectures[0],
        "config_rope_form": "legacy rope_theta/rope_scaling" if spec.legacy_rope_config else "rope_parameters",
        "rope_parameters": model.config.rope_parameters,
        "eos_disabled": True,
        "min_greedy_top2_margin": float(min(margins)),
        **run_settings(),
        "keys": describe_arrays(arrays),
    }
    if model.config.rope_parameters["rope_type"] == "llama3":
        unchanged, changed = count_llama3_scaled_frequencies(model)
        if unchanged == 0 or changed == 0:
            raise RuntimeError(f"{spec.name}: llama3 scaling changes {changed} of {changed + unchanged} frequencies")
        header["llama3_frequencies_unchanged_changed"] = [unchanged, changed]
    return header


def default_model_prompts(tokenizer) -> list[tuple[str, str]]:
    """(kind, text) of the three default-model prompts; the English sentence is the shortest."""
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    return [
        ("english", "Once upon a time, there was a little"),
        ("code", "def fibonacci(n):\n    if n < 2:\n        return n\n    return"),
        ("chat", chat),
    ]


def default_model_goldens(gguf_path: Path, tokenizer) -> dict:
    """Run SmolLM2-135M-Instruct as transformers dequantizes it from GGUF; writes its npz, returns its header."""
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    arrays: dict[str, np.ndarray] = {}
    prompt_records = []
    for index, (kind, text) in enumerate(default_model_prompts(tokenizer)):
        prompt_ids = np.asarray(tokenizer.encode(text, add_special_tokens=False), dtype=np.int32)
        all_logits = prompt_logits(model, prompt_ids)
        new_ids, step_logits = greedy_continuation(model, prompt_ids, eos_token_id=model.config.eos_token_id)
        check_first_step_matches_prefill(all_logits, step_logits, f"default model prompt {index}")
        top_ids = np.argsort(-step_logits, axis=-1, kind="stable")[:, :TOP_K_RECORDED].astype(np.int32)
        arrays[f"prompt_{index}_ids"] = prompt_ids
        arrays[f"prompt_{index}_last_logits"] = all_logits[-1]
        arrays[f"prompt_{index}_greedy_ids"] = new_ids
        arrays[f"prompt_{index}_greedy_step_top_ids"] = top_ids
        arrays[f"prompt_{index}_greedy_step_top_logits"] = np.take_along_axis(step_logits, top_ids, axis=-1)
        if index == 0:
            arrays["prompt_0_logits"] = all_logits
        prompt_records.append({
            "kind": kind,
            "text": text,
            "length": int(prompt_ids.size),
            "new_tokens": int(new_ids.size),
            "stopped_at_eos": bool(new_ids[-1] == model.config.eos_token_id),
            "continuation_text": tokenizer.decode(new_ids, skip_special_tokens=True),
            "min_greedy_top2_margin": float(top2_margins(step_logits).min()),
        })
    lengths = [record["length"] for record in prompt_records]
    if lengths.index(min(lengths)) != 0:
        raise RuntimeError(f"prompt 0 must be the shortest so that its full logits are the small ones: {lengths}")
    save_npz_reproducibly(GOLDENS_DIR / "smollm2_135m_instruct.npz", arrays)
    with gguf_path.open("rb") as gguf_stream:
        gguf_sha256 = hashlib.file_digest(gguf_stream, "sha256").hexdigest()
    header = {
        "gguf_file": gguf_path.name,
        "gguf_sha256": gguf_sha256,
        "loaded_config": {
            key: getattr(model.config, key)
            for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                        "head_dim", "intermediate_size", "vocab_size", "rms_norm_eps", "rope_parameters",
                        "tie_word_embeddings", "bos_token_id", "eos_token_id")
        },
        "eos_disabled": False,
        "prompts": prompt_records,
        **run_settings(),
        "keys": describe_arrays(arrays),
    }
    return header


TRICKY_STRINGS = (
    "",
    " ",
    "Hello, world!",
    "hello world",
    "   leading spaces",
    "trailing spaces   ",
    "tabs\tbetween\twords",
    "\tleading tab",
    "line one\nline two\n\nline four\n",
    "\n\n\n",
    "  \t \n   \r\n mixed whitespace",
    "12345",
    "3.14159",
    "1,000,000 on 2024-11-23 at 09:15",
    "café naïve résumé",
    "e\u0301 and e\u0300 built from combining marks",
    "Ünïcödé ÅÄÖ straße",
    "日本語のテキスト",
    "中文分词测试",
    "한국어 문장",
    "Привет, мир",
    "مرحبا بالعالم",
    "emoji 😀 👍🏽 family 👨\u200d👩\u200d👧",
    "MiXeD CaSe WoRdS and ALLCAPS",
    "don't won't I'm we'll they've",
    "def area(radius):\n    return 3.14159 * radius ** 2\n",
    "class Box:\n\tdef __init__(self):\n\t\tself.items = []\n",
    "https://example.com/path?q=1&r=two#frag",
    "<|im_start|>user\nhi<|im_end|>",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
)
CHAT_CONVERSATION = (
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name a prime number."},
    {"role": "assistant", "content": "Seven."},
    {"role": "user", "content": "And one bigger than 100?"},
)


def tokenizer_goldens(tokenizer, gguf_path: Path) -> dict:
    """The GGUF tokenizer's behaviour on TRICKY_STRINGS and CHAT_CONVERSATION, as a json-ready dict."""
    encodings = []
    for text in TRICKY_STRINGS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        decoded = tokenizer.decode(ids)
        encodings.append({
            "text": text,
            "ids": ids,
            "ids_with_special_tokens": tokenizer.encode(text, add_special_tokens=True),
            "decoded": decoded,
            "decoded_skip_special_tokens": tokenizer.decode(ids, skip_special_tokens=True),
            "round_trip_exact": decoded == text,
        })
    chat = {"messages": list(CHAT_CONVERSATION)}
    for add_generation_prompt in (False, True):
        text = tokenizer.apply_chat_template(
            list(CHAT_CONVERSATION), tokenize=False, add_generation_prompt=add_generation_prompt
        )
        ids = tokenizer.apply_chat_template(
            list(CHAT_CONVERSATION), tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
        )["input_ids"]
        if ids != tokenizer.encode(text, add_special_tokens=False):
            raise RuntimeError("chat template ids differ from encoding its rendered text")
        chat["with_generation_prompt" if add_generation_prompt else "without_generation_prompt"] = {
            "text": text, "ids": ids,
        }
    return {
        "gguf_file": gguf_path.name,
        "encode_call": "tokenizer.encode(text, add_special_tokens=False|True); decode(ids)",
        "bos_token": tokenizer.bos_token,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token": tokenizer.eos_token,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "vocab_size": len(tokenizer),
        "chat_template": tokenizer.chat_template,
        "encodings": encodings,
        "chat": chat,
        **run_settings(),
    }


def run_settings() -> dict:
    """Library versions and numeric settings every golden header records."""
    return {
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "tokenizers_version": tokenizers.__version__,
        "dtype": "float32",
        "device": "cpu",
        "attn_implementation": "eager",
        "max_new_tokens": MAX_NEW_TOKENS,
    }


def describe_arrays(arrays: dict[str, np.ndarray]) -> dict:
    """{key: "dtype [shape]"} for a golden header, e.g. {"prompt_0_ids": "int32 [7]"}."""
    return {key: f"{array.dtype} {list(array.shape)}" for key, array in arrays.items()}


def save_npz_reproducibly(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez_compressed, but with a fixed timestamp on each entry so reruns are byte-identical."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key, array in arrays.items():
            entry = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            entry.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(entry, "w", force_zip64=True) as stream:
                np.lib.format.write_array(stream, np.ascontiguousarray(array), allow_pickle=False)


def write_json(path: Path, payload: dict) -> None:
    """Indented UTF-8 json with a trailing newline (readable diffs when goldens change)."""
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def directory_kib(path: Path) -> float:
    """Total size of the files under `path` in KiB."""
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file()) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, required=True, help="path to SmolLM2-135M-Instruct.Q4_1.gguf")
    arguments = parser.parse_args()
    if not arguments.gguf.is_file():
        raise SystemExit(f"no GGUF file at {arguments.gguf}: run `make setup` or pass --gguf PATH")
    # One thread: torch's CPU reductions then group the same way on every rerun, whatever the core count.
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    transformers.utils.logging.disable_progress_bar()
    GOLDENS_DIR.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tiny_tokenizer()
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    for spec in tiny_specs():
        checkpoint_dir = write_tiny_checkpoint(spec, tokenizer)
        header = tiny_goldens(spec, checkpoint_dir)
        write_json(GOLDENS_DIR / f"{spec.name}.json", header)
        print(
            f"{spec.name:14s} {header['architecture']:18s} {header['config_rope_form']:31s} "
            f"{directory_kib(checkpoint_dir):6.0f} KiB  min greedy margin {header['min_greedy_top2_margin']:.4f}"
        )
    default_tokenizer = AutoTokenizer.from_pretrained(arguments.gguf.parent, gguf_file=arguments.gguf.name)
    write_json(GOLDENS_DIR / "smollm2_tokenizer.json", tokenizer_goldens(default_tokenizer, arguments.gguf))
    header = default_model_goldens(arguments.gguf, default_tokenizer)
    write_json(GOLDENS_DIR / "smollm2_135m_instruct.json", header)
    for record in header["prompts"]:
        print(
            f"default {record['kind']:8s} prompt {record['length']:3d} tokens -> {record['new_tokens']:2d} new "
            f"(stopped at EOS: {record['stopped_at_eos']}, min margin {record['min_greedy_top2_margin']:.3f}): "
            f"{record['continuation_text']!r}"
        )
    print(
        f"checkpoints {directory_kib(CHECKPOINTS_DIR):.0f} KiB in {CHECKPOINTS_DIR.relative_to(REPO_ROOT)}, "
        f"goldens {directory_kib(GOLDENS_DIR):.0f} KiB in {GOLDENS_DIR.relative_to(REPO_ROOT)}"
    )


if __name__ == "__main__":
    main()
