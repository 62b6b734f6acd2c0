"""``python -m orders``: serve until SIGTERM or SIGINT, then stop gracefully."""

from __future__ import annotations

import tether

from orders.service import create_app

if __name__ == "__main__":
    # A refused configuration exits 2 with field, value and rule, never a traceback.
    tether.App.main(create_app)
