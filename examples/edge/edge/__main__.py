"""``python -m edge``: serve HTTP on server.host:server.port until SIGTERM or Ctrl-C."""

from __future__ import annotations

import sys

import tether
import uvicorn

from edge.app import create_edge


def main() -> None:
    try:
        config = tether.load_config()
    except tether.ConfigError as exc:
        print(f"edge: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    tether.configure_logging(
        config.logging.level,
        config.log_format,
        static={
            "service": config.service.name,
            "instance_id": config.service.instance_id or "edge",
        },
    )
    app = create_edge(config)
    # uvicorn drains in-flight requests on SIGTERM (up to its graceful timeout) and then runs
    # the lifespan's shutdown: the orders channel closes and the last spans are exported.
    uvicorn.run(
        app,
        host=config.server.host,
        port=config.server.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(config.server.grace_seconds),
    )


if __name__ == "__main__":
    main()
