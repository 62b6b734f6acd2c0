"""The HTTP edge of the shop example: JSON over HTTP in, governed gRPC calls out."""
