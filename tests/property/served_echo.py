"""A tether server kept running across hypothesis examples, and everything it wrote."""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

if TYPE_CHECKING:
    from support.echo_service import EchoServicer


class Records(logging.Handler):
    """Keeps every standard-library log record (grpc's, OpenTelemetry's), rendered in full."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))  # with the traceback, when there is one


@dataclass
class ServedEcho:
    """The Echo service behind tether's default server chain, run on a thread of its own.

    Everything it writes is kept: tether's structured log lines (debug level, access log on,
    every call a slow-call warning), standard-library records at any level, and its spans.
    """

    target: str
    servicer: EchoServicer
    exporter: InMemorySpanExporter
    stream: io.StringIO
    records: Records
    _mark: tuple[int, int] = field(default=(0, 0))

    def mark(self) -> None:
        """Start a new stretch of output (what :meth:`written` returns)."""
        self._mark = (len(self.stream.getvalue()), len(self.records.lines))
        self.exporter.clear()

    def written(self) -> str:
        """Log lines, records and spans written since :meth:`mark`, as one text to search."""
        logs, records = self._mark
        spans = [
            json.dumps(
                {
                    "name": span.name,
                    "attributes": dict(span.attributes or {}),
                    "events": [(e.name, dict(e.attributes or {})) for e in span.events],
                    "status": span.status.description,
                },
                default=str,
            )
            for span in self.exporter.get_finished_spans()
        ]
        return "\n".join([self.stream.getvalue()[logs:], *self.records.lines[records:], *spans])
