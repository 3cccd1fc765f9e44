"""The KServe v2 / Triton `inference.GRPCInferenceService` over an EngineLoop, with the text
tensors of TensorRT-LLM's Triton models, so that tritonclient[grpc] works unmodified.

Inputs (batch size 1; scalars may have any shape of one element, e.g. [1, 1]; an integer or
floating-point input may come in another width of its kind, e.g. INT64 for INT32, never as another kind):
    text_input BYTES (required), max_tokens INT32 (required), and optionally temperature,
    top_k (0 = disabled, TensorRT-LLM's convention), top_p, repetition_penalty,
    presence_penalty, frequency_penalty, min_length, random_seed, end_id (an extra stop
    token), pad_id (unused), stop_words BYTES, bad_words BYTES (must be empty), beam_width
    (must be 1), stream BOOL, exclude_input_in_output BOOL (default true: only generated text).
Output: text_output BYTES [1, 1], the generated text (streamed: the new text of each step).
ModelStreamInfer is decoupled: every response carries the parameter triton_final_response, true
on the last one of its request (an empty extra response when the client asked for
triton_enable_empty_final_response).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import numpy as np

from jaxinfer.errors import RequestError
from serving import jaxinfer_codec as codec
from serving.engine_loop import EngineLoop
from serving.errors import MalformedRequestError, NotReadyError, UnknownModelError, grpc_status
from serving.kserve_tensors import check_datatype, decode_inputs, encode_bytes
from serving.protos import kserve_v2_pb2 as pb

log = logging.getLogger(__name__)

SERVER_NAME = "jaxinfer"
PLATFORM = "jaxinfer"
MODEL_VERSION = "1"

# input name -> (declared datatype, SamplingParams field, conversion of the element)
_SAMPLING_INPUTS = {
    "max_tokens": ("INT32", "max_tokens", int),
    "temperature": ("FP32", "temperature", float),
    "top_k": ("INT32", "top_k", lambda v: -1 if int(v) == 0 else int(v)),
    "top_p": ("FP32", "top_p", float),
    "repetition_penalty": ("FP32", "repetition_penalty", float),
    "presence_penalty": ("FP32", "presence_penalty", float),
    "frequency_penalty": ("FP32", "frequency_penalty", float),
    "min_length": ("INT32", "min_tokens", int),
    "random_seed": ("UINT64", "seed", int),
}
_OTHER_INPUTS = {"text_input": "BYTES", "end_id": "INT32", "pad_id": "INT32", "stop_words": "BYTES",
                 "bad_words": "BYTES", "beam_width": "INT32", "stream": "BOOL", "exclude_input_in_output": "BOOL"}
INPUT_DATATYPES = {**{name: spec[0] for name, spec in _SAMPLING_INPUTS.items()}, **_OTHER_INPUTS}
OUTPUT_NAME = "text_output"


def _scalar(inputs: dict[str, np.ndarray], name: str):
    value = inputs[name]
    if value.size != 1:
        raise MalformedRequestError(f"input {name!r} must hold one value (batch size 1), got shape {list(value.shape)}")
    return value.reshape(-1)[0]


def _text(value: bytes, name: str) -> str:
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as err:
        raise RequestError(f"input {name!r} is not valid UTF-8 ({err}); send UTF-8 encoded text") from None


def _bool_parameter(request, name: str) -> bool:
    return name in request.parameters and request.parameters[name].bool_param


class KServeServicer:
    def __init__(self, engine_loop: EngineLoop, model_name: str, server_version: str):
        self.engine_loop = engine_loop
        self.model_name = model_name
        self.server_version = server_version

    def _check_model(self, name: str, version: str = "") -> None:
        # The model's name may be unknown until the engine is loaded.
        if self.engine_loop.engine is None:
            raise NotReadyError("the engine is still loading; retry when ServerReady is true")
        if name != self.model_name or version not in ("", MODEL_VERSION):
            raise UnknownModelError(f"unknown model {name!r} version {version!r}; this server serves "
                                    f"{self.model_name!r} version {MODEL_VERSION!r}")

    @property
    def _ready(self) -> bool:
        return self.engine_loop.engine is not None and self.engine_loop.failure is None

    async def ServerLive(self, request, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._ready and self.engine_loop.admitting)

    async def ModelReady(self, request, context) -> pb.ModelReadyResponse:
        if self.engine_loop.engine is None:
            return pb.ModelReadyResponse(ready=False)
        self._check_model(request.name, request.version)
        return pb.ModelReadyResponse(ready=self._ready)

    async def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self.server_version)

    async def ModelMetadata(self, request, context) -> pb.ModelMetadataResponse:
        self._check_model(request.name, request.version)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=self.model_name, versions=[MODEL_VERSION], platform=PLATFORM,
            inputs=[tensor(name=name, datatype=datatype, shape=[-1, -1 if datatype == "BYTES" else 1])
                    for name, datatype in INPUT_DATATYPES.items()],
            outputs=[tensor(name=OUTPUT_NAME, datatype="BYTES", shape=[-1, -1])])

    def _parse(self, request):
        """(prompt token ids, SamplingParams, stream, include prompt in output) of a request.
        Tokenizes: run it in a worker thread, not on the event loop."""
        self._check_model(request.model_name, request.model_version)
        engine = self.engine_loop.engine
        for output in request.outputs:
            if output.name != OUTPUT_NAME:
                raise MalformedRequestError(f"unknown output {output.name!r}; this model returns {OUTPUT_NAME!r}")
        for tensor in request.inputs:
            if tensor.name not in INPUT_DATATYPES:
                raise MalformedRequestError(f"unknown input {tensor.name!r}; this model takes {sorted(INPUT_DATATYPES)}")
            check_datatype(tensor, INPUT_DATATYPES[tensor.name])
        inputs = decode_inputs(request)
        for name in ("text_input", "max_tokens"):
            if name not in inputs:
                raise MalformedRequestError(f"the required input {name!r} is missing")
        fields = {field: convert(_scalar(inputs, name)) for name, (_, field, convert) in _SAMPLING_INPUTS.items()
                  if name in inputs}
        fields["stop"] = tuple(_text(w, "stop_words") for w in inputs.get("stop_words", np.empty(0)).reshape(-1) if w)
        if "end_id" in inputs:
            fields["stop_token_ids"] = (int(_scalar(inputs, "end_id")),)
        if any(w for w in inputs.get("bad_words", np.empty(0)).reshape(-1)):
            raise RequestError("bad_words is not supported; send it empty or leave it out")
        if "beam_width" in inputs and int(_scalar(inputs, "beam_width")) != 1:
            raise RequestError("beam search is not supported; beam_width must be 1")
        params = codec.make_sampling_params(fields, engine.engine_cfg.max_num_seqs, engine.model_cfg.vocab_size)
        text = _text(_scalar(inputs, "text_input"), "text_input")
        ids = codec.check_prompt(engine.tokenizer.encode(text) if text else [])
        stream = "stream" in inputs and bool(_scalar(inputs, "stream"))
        include_prompt = "exclude_input_in_output" in inputs and not bool(_scalar(inputs, "exclude_input_in_output"))
        return ids, params, stream, text if include_prompt else ""

    def _response(self, request, text: str | None, final: bool | None) -> pb.ModelInferResponse:
        response = pb.ModelInferResponse(model_name=self.model_name, model_version=MODEL_VERSION, id=request.id)
        if text is not None:
            response.outputs.append(pb.ModelInferResponse.InferOutputTensor(name=OUTPUT_NAME, datatype="BYTES",
                                                                             shape=[1, 1]))
            response.raw_output_contents.append(encode_bytes([text.encode("utf-8")]))
        if final is not None:
            response.parameters["triton_final_response"].bool_param = final
        return response

    async def _generate(self, request, decoupled: bool) -> AsyncIterator[pb.ModelInferResponse]:
        """The responses to one request: one, or (decoupled and streaming) one per engine output."""
        ids, params, stream, prefix = await asyncio.to_thread(self._parse, request)
        streaming = decoupled and stream
        empty_final = decoupled and _bool_parameter(request, "triton_enable_empty_final_response")
        async with await self.engine_loop.submit(uuid.uuid4().hex, ids, params) as outputs:
            async for output in outputs:
                if streaming:
                    text, prefix = prefix + output.outputs[0].delta_text, ""
                    yield self._response(request, text, output.finished and not empty_final)
        if not streaming:
            yield self._response(request, prefix + output.outputs[0].text, (not empty_final) if decoupled else None)
        if empty_final:
            yield self._response(request, None, True)

    async def ModelInfer(self, request, context) -> pb.ModelInferResponse:
        (response,) = [r async for r in self._generate(request, decoupled=False)]
        return response

    async def ModelStreamInfer(self, request_iterator, context):
        """Requests are served concurrently as they arrive; a failed request answers an
        in-stream error_message and the stream goes on (Triton's behaviour)."""
        responses: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task] = set()

        async def serve_one(request) -> None:
            try:
                async for response in self._generate(request, decoupled=True):
                    responses.put_nowait(pb.ModelStreamInferResponse(infer_response=response))
            except Exception as exc:
                status = grpc_status(exc)
                if status is None:
                    log.exception("ModelStreamInfer request failed")
                message = f"{status[0].name}: {status[1]}" if status else f"internal error: {exc}"
                responses.put_nowait(pb.ModelStreamInferResponse(error_message=message))

        async def read_requests() -> None:
            try:
                async for request in request_iterator:
                    tasks.add(asyncio.create_task(serve_one(request)))
                await asyncio.gather(*tasks)
            finally:
                responses.put_nowait(None)

        reader = asyncio.create_task(read_requests())
        try:
            while (response := await responses.get()) is not None:
                yield response
            await reader
        finally:
            for task in (reader, *tasks):
                task.cancel()
