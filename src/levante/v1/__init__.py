"""Generated gRPC code for protos/levante/v1/levante.proto (do not edit; run scripts/gen-protos)."""
