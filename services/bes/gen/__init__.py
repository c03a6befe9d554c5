"""Generated Build Event Service protobuf and gRPC modules (deploy/gen_bes_protos.py)."""
