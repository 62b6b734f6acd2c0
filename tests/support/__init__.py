"""Shared pieces of the framework's own tests (not part of tether.testing)."""
