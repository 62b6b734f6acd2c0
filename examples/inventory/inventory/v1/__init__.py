"""Generated from proto/ by `make proto` (the *_pb2 modules are not committed)."""
