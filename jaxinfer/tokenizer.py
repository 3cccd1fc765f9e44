"""Tokenizer: text <-> token ids and chat templates, from an HF checkpoint or from GGUF metadata.

Wraps a HF `tokenizers.Tokenizer` (Rust, fast). Chat templates are the checkpoint's own Jinja
templates, rendered like HF's `apply_chat_template` (trim_blocks, lstrip_blocks, a sandbox).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import jinja2
import jinja2.sandbox
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from jaxinfer.errors import CheckpointError, RequestError

# GGUF `tokenizer.ggml.pre` names -> the pre-tokenizer split regex (before byte-level mapping).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_GGUF_PRE_TOKENIZERS = {
    "default": (_GPT2_SPLIT, False), "gpt2": (_GPT2_SPLIT, False),
    "smollm": (_GPT2_SPLIT, True),  # SmolLM splits every digit into its own token
    "llama-bpe": (_LLAMA3_SPLIT, False), "llama3": (_LLAMA3_SPLIT, False),
    "qwen2": (_QWEN2_SPLIT, False),
}
_GGUF_SPECIAL_TOKEN_TYPES = (3, 4)  # CONTROL, USER_DEFINED


@dataclasses.dataclass
class Tokenizer:
    backend: tokenizers.Tokenizer
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None = None
    add_bos_token: bool = False
    chat_template: str | None = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch gives the same ids and lets other threads run more while it works (the server
        # tokenizes off its event loop; a 3.7 MB prompt held a thread ticking every 1 ms 0.47 s at
        # most with encode, 0.30 with encode_batch).
        ids = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if add_special_tokens and self.add_bos_token and self.bos_token_id is not None and (
                not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Renders chat messages ([{"role": ..., "content": ...}]) with the checkpoint's template."""
        if not self.chat_template:
            raise RequestError("this model has no chat template; send a plain prompt instead of chat messages")
        for message in messages:
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise RequestError(f"a chat message needs 'role' and 'content'; got {message!r}")
        return _compile_template(self.chat_template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=self._token(self.bos_token_id), eos_token=self._token(self.eos_token_ids[0])
            if self.eos_token_ids else "")

    def _token(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.backend.id_to_token(token_id) or "")

    @classmethod
    def from_hf_dir(cls, directory: Path, eos_token_ids: Sequence[int]) -> Tokenizer:
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise CheckpointError(f"{directory} has no tokenizer.json; copy it from the model's HF repository")
        # Imported here: jaxinfer.checkpoint imports this module.
        from jaxinfer.checkpoint.hf_loader import read_json

        backend = tokenizers.Tokenizer.from_file(str(path))
        config_path = directory / "tokenizer_config.json"
        config: dict[str, Any] = read_json(config_path) if config_path.is_file() else {}
        template = config.get("chat_template")
        template_file = directory / "chat_template.jinja"
        if template is None and template_file.is_file():
            template = template_file.read_text()
        if isinstance(template, list):  # named templates: use the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        bos = _token_id(backend, config.get("bos_token"))
        eos = list(eos_token_ids)
        config_eos = _token_id(backend, config.get("eos_token"))
        if config_eos is not None and config_eos not in eos:
            eos.append(config_eos)
        return cls(backend, tuple(eos), bos, bool(config.get("add_bos_token", False)), template)

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> Tokenizer:
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise CheckpointError(
                f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2'); "
                "use the model's HF checkpoint directory instead")
        missing = [key for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges") if key not in meta]
        if missing:
            raise CheckpointError(f"GGUF metadata lacks {missing}, which a 'gpt2' (byte-level BPE) tokenizer needs; "
                                  "the file is incomplete: use the model's HF checkpoint directory instead")
        tokens = meta["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
        backend = tokenizers.Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                                  fuse_unk=False))
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre not in _GGUF_PRE_TOKENIZERS:
            raise CheckpointError(f"GGUF pre-tokenizer {pre!r} is not supported; known: {sorted(_GGUF_PRE_TOKENIZERS)}")
        split, split_digits = _GGUF_PRE_TOKENIZERS[pre]
        steps = [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
        steps += [pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        backend.pre_tokenizer = pre_tokenizers.Sequence(steps)
        backend.decoder = decoders.ByteLevel()
        types = meta.get("tokenizer.ggml.token_type") or []
        backend.add_special_tokens([tokenizers.AddedToken(tokens[i], special=True, normalized=False)
                                    for i, t in enumerate(types) if t in _GGUF_SPECIAL_TOKEN_TYPES])
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return cls(backend, () if eos is None else (int(eos),), meta.get("tokenizer.ggml.bos_token_id"),
                   bool(meta.get("tokenizer.ggml.add_bos_token", False)), meta.get("tokenizer.chat_template"))


def _token_id(backend: tokenizers.Tokenizer, token: Any) -> int | None:
    if isinstance(token, dict):  # AddedToken serialized as a dict
        token = token.get("content")
    return backend.token_to_id(token) if isinstance(token, str) else None


def _compile_template(source: str) -> jinja2.Template:
    def raise_exception(message):
        raise RequestError(f"chat template rejected the messages: {message}")

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    return env.from_string(source)
