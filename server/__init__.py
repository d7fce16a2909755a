"""Nereid: a Triton-compatible (KServe v2 gRPC) model server."""

__version__ = "0.1.0"
