"""TLS, the bearer token and SIGTERM drain, against a real server in a child process. The TLS
certificate is made here with openssl (no committed private key)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from serving.child_server import ChildServer
from serving.protos import jaxinfer_pb2 as pb
from serving.protos import jaxinfer_pb2_grpc

TINY = "tests/checkpoints/tiny-llama3"
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def secure_server(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    tmp = tmp_path_factory.mktemp("tls")
    cert, key, token_file = tmp / "cert.pem", tmp / "key.pem", tmp / "token"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    token_file.write_text(TOKEN + "\n")
    child = ChildServer({"model": TINY, "max_num_seqs": 2, "max_num_batched_tokens": 16, "max_model_len": 256,
                         "kv_memory": "8MiB"},
                        {"tls_cert": str(cert), "tls_key": str(key), "auth_token_file": str(token_file),
                         "drain_timeout_s": 60},
                        channel_credentials=grpc.ssl_channel_credentials(cert.read_bytes()))
    with child:
        yield child


def generate(server, metadata=(), max_tokens: int = 3) -> list[pb.GenerateResponse]:
    with server.channel() as channel:
        request = pb.GenerateRequest(text="hi", sampling=pb.SamplingParameters(max_tokens=max_tokens, ignore_eos=True))
        return list(jaxinfer_pb2_grpc.JaxinferStub(channel).Generate(request, metadata=metadata))


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)])
def test_missing_or_wrong_token_is_unauthenticated(secure_server, metadata):
    with pytest.raises(grpc.RpcError) as err:
        generate(secure_server, metadata)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in err.value.details()


def test_token_over_tls_is_served_and_health_needs_no_token(secure_server):
    responses = generate(secure_server, (("authorization", f"Bearer {TOKEN}"),))
    assert responses[-1].finished and responses[-1].usage.completion_tokens == 3
    assert secure_server.health() == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_client_is_refused(secure_server):
    with grpc.insecure_channel(secure_server.address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            jaxinfer_pb2_grpc.JaxinferStub(channel).ModelInfo(pb.ModelInfoRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_bench_serve_reaches_the_server_over_tls_with_its_token(secure_server, tmp_path):
    from jaxinfer.bench.runs import serve_main
    from jaxinfer.cli import _parser
    from jaxinfer.errors import RequestError

    tls = ["--tls-ca", secure_server.config["tls_cert"]]
    bench = ["bench", "serve", "--target", secure_server.address, "--num-requests", "3", "--input-len", "4:9",
             "--output-len", "5", "--output", str(tmp_path / "serve.json")]
    with pytest.raises(RequestError, match="UNAUTHENTICATED.*pass the server's bearer token with --auth-token-file"):
        serve_main(_parser().parse_args(bench + tls))
    serve_main(_parser().parse_args(bench + tls + ["--auth-token-file", secure_server.config["auth_token_file"]]))
    point = json.loads((tmp_path / "serve.json").read_text())["curves"]["jaxinfer serve"][0]
    assert (point["num_requests"], point["failed_requests"], point["output_tokens"]) == (3, 0, 15)


def test_client_command_streams_over_tls_with_its_token(secure_server, capsys):
    from jaxinfer.cli import main

    client = ["client", "--address", secure_server.address, "--prompt", "hi", "--max-tokens", "3",
              "--tls-ca", secure_server.config["tls_cert"]]
    assert main(client) == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert main(client + ["--auth-token-file", secure_server.config["auth_token_file"]]) == 0
    assert "completion 3" in capsys.readouterr().err


def test_sigterm_drains_in_flight_requests_then_exits_0(secure_server):
    auth = (("authorization", f"Bearer {TOKEN}"),)
    channel = secure_server.channel()
    request = pb.GenerateRequest(text="drain me", sampling=pb.SamplingParameters(max_tokens=120, ignore_eos=True))
    in_flight = jaxinfer_pb2_grpc.JaxinferStub(channel).Generate(request, metadata=auth)
    first = next(in_flight)
    secure_server.terminate()
    deadline = time.monotonic() + 10
    while secure_server.health() != health_pb2.HealthCheckResponse.NOT_SERVING and time.monotonic() < deadline:
        time.sleep(0.02)
    assert secure_server.health() == health_pb2.HealthCheckResponse.NOT_SERVING, secure_server.log
    with pytest.raises(grpc.RpcError) as err:
        generate(secure_server, auth)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in err.value.details()
    rest = list(in_flight)
    assert rest[-1].outputs[0].finish_reason == pb.FINISH_REASON_LENGTH
    assert sum(len(c.token_ids) for r in [first, *rest] for c in r.outputs) == 120
    assert secure_server.process.wait(60) == 0
    channel.close()
