"""What an operator sees of a running server: structured logs and Prometheus metrics.

``logs`` formats log records (human-readable or JSON lines) and attaches the ids a
record concerns (execution, task, worker); ``metrics`` counts what the engine does and
serves it over HTTP. Neither imports grpc: the gRPC side (health, reflection, the RPC
interceptor) lives in ``levante.rpc``.
"""
