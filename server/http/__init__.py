"""KServe v2 HTTP/REST (Triton's HTTP protocol), served on the same event loop as gRPC (docs/HTTP.md)."""
