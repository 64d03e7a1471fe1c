"""Generated gRPC stubs for the veilface API (see scripts/gen_proto.py)."""
