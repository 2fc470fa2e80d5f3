"""Generated protobuf and gRPC code for the relay (from relay.proto; do not edit).

After regenerating, change `import relay_pb2` in relay_pb2_grpc.py to
`from . import relay_pb2`."""
