"""The context-manager shape shared by the test kit's servers: start on enter, close on exit."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Managed:
    """Base of things with ``start()`` and an idempotent ``close()``.

    ``with thing:`` starts it, and closes it even when ``start()`` fails half-way (a cluster
    with some members up, a proxy with its thread running).
    """

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
