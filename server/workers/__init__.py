"""`nereid serve --workers N`: N frontend processes on one port in front of one model owner.

Measured on this project (docs/ARCHITECTURE.md, "Scaling across cores"): grpcio's per-call
work is what bounds one Python process, not the model path. So the frontends do only that
part: each is a grpc.aio server bound to the same address with SO_REUSEPORT, taking every
RPC as raw bytes and forwarding it over a private socket pair (`link.py`) to the process
that started them. That process (the owner) runs the one servicer, the one repository
manager and every model instance exactly as the single-process server does, so the server
behaves as one: statistics, metrics, readiness, load/unload, polling, rollouts and
instance_group counts are those of the whole server whichever frontend a client reached,
and model memory is not multiplied by N.

Modules: `link.py` the frame format and the buffered stream both ends share;
`context.py` the owner's stand-in for a grpc.aio servicer context; `owner.py` runs
forwarded calls against the owner's method handlers; `pool.py` starts, watches, restarts
and stops the frontend processes; `frontend.py` is the frontend process itself.
"""
