"""Run tether's benchmarks and write BENCHMARKS.md: ``python -m benchmarks.run [--quick]``.

``make bench`` runs every benchmark in full (several minutes on a 2-core machine) and rewrites
BENCHMARKS.md; ``--quick`` runs a few iterations of each, only to check the harness works (CI
does), and writes to the ``--output`` given (nothing by default: quick figures mean nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
import time
from pathlib import Path

from benchmarks._common import Section, machine

#: In report order. Each module has ``async def measure(quick: bool) -> Section``.
BENCHMARKS = [
    "server_chain",
    "client_chain",
    "discovery",
    "breaker",
    "multicore",
    "scale",
    "check_speed",
]
ROOT = Path(__file__).resolve().parents[1]


def render(sections: list[Section], info: dict[str, str], quick: bool) -> str:
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (`python -m benchmarks.run`); every comparison was measured side",
        "by side in this one run. The machine is shared and noisy: read ratios, not absolutes.",
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in info.items()),
        "",
    ]
    if quick:
        lines += ["**Quick mode: these figures only show the harness works.**", ""]
    bars = [(s.title, bar) for s in sections for bar in s.bars]
    lines += ["## Bars", "", "| benchmark | bar | measured | met |", "|---|---|---|---|"]
    lines += [
        f"| {title} | {bar.text} | {bar.measured} | {'yes' if bar.met else '**no**'} |"
        for title, bar in bars
    ]
    if any(not bar.met for _, bar in bars):
        lines += [
            "",
            "Why a bar is not met, with the profiles behind it and what meeting it would take:",
            "[docs/performance.md](docs/performance.md).",
        ]
    for section in sections:
        lines += ["", f"## {section.title}", "", section.method, ""]
        lines.append("| " + " | ".join(section.header) + " |")
        lines.append("|" + "---|" * len(section.header))
        lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in section.rows]
        if section.notes:
            lines.append("")
            lines += [f"- {note}" for note in section.notes]
    return "\n".join(lines) + "\n"


async def main(names: list[str], quick: bool, output: Path | None) -> int:
    import tether

    # The benchmarks' own clients and servers log nothing below warnings, on stderr.
    tether.configure_logging("warning", "console", stream=sys.stderr)
    info = machine()
    sections: list[Section] = []
    failed = []
    for name in names:
        started = time.perf_counter()
        print(f"benchmark {name}{' (quick)' if quick else ''} ...", flush=True)
        try:
            module = importlib.import_module(f"benchmarks.{name}")
            section = await module.measure(quick)
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            print(f"  failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            failed.append(name)
            continue
        sections.append(section)
        for bar in section.bars:
            print(f"  {'met' if bar.met else 'NOT met'}: {bar.text} ({bar.measured})", flush=True)
        print(f"  done in {time.perf_counter() - started:.1f} s", flush=True)
    if output is not None:
        output.write_text(render(sections, info, quick))
        print(f"wrote {output}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run tether's benchmarks.")
    parser.add_argument("--quick", action="store_true", help="a few iterations: harness check")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these")
    parser.add_argument(
        "--output",
        type=Path,
        help="where to write the report (default: BENCHMARKS.md; nothing with --quick)",
    )
    args = parser.parse_args()
    output = args.output or (None if args.quick else ROOT / "BENCHMARKS.md")
    raise SystemExit(asyncio.run(main(args.only or BENCHMARKS, args.quick, output)))
