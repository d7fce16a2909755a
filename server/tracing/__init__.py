"""Request tracing: OpenTelemetry spans for the receive, queue, compute and send steps of sampled
inference requests (otel.py), configured with Triton's `--trace-config` and the TraceSetting RPC
(config.py)."""
