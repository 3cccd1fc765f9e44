"""`jaxinfer client`: send one prompt to a running `jaxinfer serve` and stream the reply to stdout."""

from __future__ import annotations

import sys

import grpc

from jaxinfer.commands.sampling_args import given_sampling_options
from jaxinfer.sampling_params import SamplingParams
from serving.client_connection import ServerConnection
from serving.protos import jaxinfer_pb2 as pb
from serving.protos import jaxinfer_pb2_grpc


def _request(args) -> pb.GenerateRequest:
    options = given_sampling_options(args)
    SamplingParams(**options)  # refuses a bad value by name here, before the wire's integer types would
    sampling = pb.SamplingParameters(**options)  # unset fields: the server's defaults
    if args.chat is not None:
        return pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=args.chat)]),
                                  sampling=sampling)
    return pb.GenerateRequest(text=args.prompt, sampling=sampling)


def main(args) -> int:
    connection = ServerConnection(args.address, args.tls_ca, args.auth_token_file)
    with connection.channel() as channel:
        stub = jaxinfer_pb2_grpc.JaxinferStub(channel)
        try:
            for response in stub.Generate(_request(args), metadata=connection.metadata(), timeout=args.timeout):
                for completion in response.outputs:
                    sys.stdout.write(completion.text)
                sys.stdout.flush()
                if response.finished:
                    usage = response.usage
                    print(f"\n[{pb.FinishReason.Name(response.outputs[0].finish_reason)}; prompt "
                          f"{usage.prompt_tokens}, completion {usage.completion_tokens}, cached "
                          f"{usage.cached_tokens} tokens]", file=sys.stderr)
        except grpc.RpcError as err:
            raise connection.call_error(err, "Generate") from None
    return 0
