"""The Greeter example service; the generated ``greeter.v1`` modules live beneath it."""
