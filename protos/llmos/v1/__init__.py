"""Generated gRPC stubs for the llmos.v1 contracts (see protos/llmos/v1/*.proto).

Regenerate with `python scripts/gen_protos.py`; never edit the *_pb2 files by hand.
"""
