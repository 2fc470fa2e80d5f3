"""Generated protobuf and gRPC code for cells (from cells.proto; do not edit).

After regenerating, change `import cells_pb2` in cells_pb2_grpc.py to
`from . import cells_pb2`."""
