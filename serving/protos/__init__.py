"""Generated protobuf/gRPC stubs (see serving/generate_stubs.py); do not edit by hand."""
