"""Generated modules of tether's own protos (``protos/tether/v1``); regenerate, never edit."""
