"""`jaxinfer client`: send one prompt to a running `jaxinfer serve` and stream the reply to stdout."""

from __future__ import annotations

import sys
from pathlib import Path

import grpc

from jaxinfer.commands.sampling_args import given_sampling_options
from jaxinfer.errors import RequestError
from serving.protos import jaxinfer_pb2 as pb
from serving.protos import jaxinfer_pb2_grpc


def _channel(args) -> grpc.Channel:
    if args.tls_ca is None:
        return grpc.insecure_channel(args.address)
    return grpc.secure_channel(args.address, grpc.ssl_channel_credentials(Path(args.tls_ca).read_bytes()))


def _request(args) -> pb.GenerateRequest:
    sampling = pb.SamplingParameters(**given_sampling_options(args))  # unset fields: the server's defaults
    if args.chat is not None:
        return pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=args.chat)]),
                                  sampling=sampling)
    return pb.GenerateRequest(text=args.prompt, sampling=sampling)


def main(args) -> int:
    metadata = []
    if args.auth_token_file:
        metadata.append(("authorization", f"Bearer {Path(args.auth_token_file).read_text().strip()}"))
    with _channel(args) as channel:
        stub = jaxinfer_pb2_grpc.JaxinferStub(channel)
        try:
            for response in stub.Generate(_request(args), metadata=metadata, timeout=args.timeout):
                for completion in response.outputs:
                    sys.stdout.write(completion.text)
                sys.stdout.flush()
                if response.finished:
                    usage = response.usage
                    print(f"\n[{pb.FinishReason.Name(response.outputs[0].finish_reason)}; prompt "
                          f"{usage.prompt_tokens}, completion {usage.completion_tokens}, cached "
                          f"{usage.cached_tokens} tokens]", file=sys.stderr)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                raise RequestError(f"{args.address} is unavailable ({err.details()}): start `jaxinfer serve` there "
                                   "and wait until it is ready, or fix --address") from None
            raise RequestError(f"the server answered {err.code().name}: {err.details()}") from None
    return 0
