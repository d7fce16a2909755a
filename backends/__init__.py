"""Model execution backends: whole numpy tensors in, whole numpy tensors out.

Nothing here imports `server` or knows about gRPC, asyncio or request ids.
"""
