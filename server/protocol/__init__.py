"""The gRPC edge: the only package that imports grpc and the protobuf message classes."""
