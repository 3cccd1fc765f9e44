"""The jaxinfer.v1.Jaxinfer servicer: Generate (stream and unary), Tokenize, Detokenize,
ModelInfo, Abort, over an EngineLoop. Methods raise ServingError/RequestError; serving/handlers.py
turns those into gRPC statuses. Tokenizing, detokenizing and chat templates run in worker threads:
on the event loop, a prompt of megabytes would hold up every stream and health check for seconds."""

from __future__ import annotations

import asyncio
import uuid

from jaxinfer.errors import RequestError
from jaxinfer.sampling_params import MAX_LOGPROBS
from jaxinfer.tokenizer import Tokenizer
from serving import jaxinfer_codec as codec
from serving.engine_loop import EngineLoop
from serving.errors import NotReadyError
from serving.protos import jaxinfer_pb2 as pb


class JaxinferServicer:
    def __init__(self, engine_loop: EngineLoop, model_name: str):
        self.engine_loop = engine_loop
        self.model_name = model_name

    def _loaded_engine(self):
        engine = self.engine_loop.engine
        if engine is None:
            raise NotReadyError("the engine is still loading; retry when the health check reports SERVING")
        return engine

    async def _start(self, request: pb.GenerateRequest):
        engine = self._loaded_engine()
        ids = await asyncio.to_thread(codec.prompt_token_ids, request, engine.tokenizer)
        params = codec.sampling_params(request.sampling, engine.engine_cfg.max_num_seqs,
                                       engine.model_cfg.vocab_size)
        return await self.engine_loop.submit(request.request_id or uuid.uuid4().hex, ids, params,
                                             request.priority)

    async def Generate(self, request: pb.GenerateRequest, context):
        async with await self._start(request) as stream:
            async for output in stream:
                yield codec.generate_response(output, cumulative=False)

    async def GenerateUnary(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        async with await self._start(request) as stream:
            async for output in stream:
                last = output
        return codec.generate_response(last, cumulative=True)

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        tokenizer = self._loaded_engine().tokenizer
        return pb.TokenizeResponse(token_ids=await asyncio.to_thread(_tokenize, request, tokenizer))

    async def Detokenize(self, request: pb.DetokenizeRequest, context) -> pb.DetokenizeResponse:
        engine = self._loaded_engine()
        vocab = engine.model_cfg.vocab_size
        bad = [t for t in request.token_ids if t >= vocab]
        if bad:
            raise RequestError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        text = await asyncio.to_thread(engine.tokenizer.decode, request.token_ids, skip_special_tokens=skip)
        return pb.DetokenizeResponse(text=text)

    async def ModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.ModelInfoResponse:
        engine = self._loaded_engine()
        model, build = engine.model_cfg, engine.engine_cfg
        return pb.ModelInfoResponse(
            model_name=self.model_name, architecture=model.architecture, vocab_size=model.vocab_size,
            num_layers=model.num_layers, hidden_size=model.hidden_size, num_heads=model.num_heads,
            num_kv_heads=model.num_kv_heads, head_dim=model.head_dim,
            engine=pb.EngineBuildConfig(
                dtype=build.dtype, kv_dtype=build.kv_dtype, tp=build.tp, block_size=build.block_size,
                max_num_seqs=build.max_num_seqs, max_num_batched_tokens=build.max_num_batched_tokens,
                max_model_len=build.max_model_len, kv_memory=build.kv_memory, quant=build.quant or ""),
            max_model_len=build.max_model_len, max_n=build.max_num_seqs, max_logprobs=MAX_LOGPROBS,
            max_queued_requests=self.engine_loop.max_queued_requests,
            num_kv_blocks=engine.runner.num_blocks, has_chat_template=bool(engine.tokenizer.chat_template))

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        self._loaded_engine()
        return pb.AbortResponse(found=await self.engine_loop.abort(request.request_id))


def _tokenize(request: pb.TokenizeRequest, tokenizer: Tokenizer) -> list[int]:
    kind = request.WhichOneof("input")
    if kind is None:
        raise RequestError("nothing to tokenize; set text or chat")
    text = request.text if kind == "text" else codec.chat_text(request.chat, tokenizer)
    add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
    return tokenizer.encode(text, add_special_tokens=add_special)
