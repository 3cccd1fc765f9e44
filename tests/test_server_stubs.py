"""The committed gRPC stubs in serving/protos/ are what the .proto files there generate."""

import pytest

from serving import generate_stubs


def test_committed_stubs_are_current():
    pytest.importorskip("grpc_tools")
    assert generate_stubs.stale_stubs() == []
