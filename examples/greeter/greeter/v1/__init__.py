"""Generated from ``proto/greeter/v1/greeter.proto`` by ``tether proto`` (the modules are
gitignored); see the example's README."""
