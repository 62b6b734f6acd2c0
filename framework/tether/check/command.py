"""``tether check`` as a command: run the checks, write the report, choose the exit status.

Exit status: 0 when nothing was found, 1 when something was, 2 when the check could not run
(a path that does not exist, a refused ``[tool.tether.check]`` or selector, an app that cannot
be imported or built). Findings go to standard output; problems running the check to standard
error.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from tether.check.config import CheckSettings, load_settings
from tether.check.rules import Finding, rule
from tether.check.source import check_paths
from tether.check.suppress import Suppressions, read_suppressions

__all__ = ["run_check"]


def _write_text(findings: Sequence[Finding], statistics: bool, out: TextIO) -> None:
    if statistics:
        counts = Counter(f.code for f in findings)
        for code, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
            out.write(f"{count:5d}  {code}  {rule(code).name}\n")
    else:
        for finding in findings:
            out.write(f"{finding}\n")
    if findings:
        out.write(f"Found {len(findings)} finding{'s' if len(findings) != 1 else ''}.\n")
    else:
        out.write("All checks passed.\n")


def _write_json(findings: Sequence[Finding], statistics: bool, out: TextIO) -> None:
    document: list[dict[str, object]]
    if statistics:
        counts = Counter(f.code for f in findings)
        document = [
            {"code": code, "name": rule(code).name, "count": count}
            for code, count in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        ]
    else:
        document = [f.to_json() for f in findings]
    out.write(json.dumps(document, indent=2) + "\n")


def _kept(findings: Sequence[Finding], settings: CheckSettings) -> list[Finding]:
    """The runtime findings the settings select: the codes checked (``select``, ``ignore``,
    and ``per-file-ignores`` for the file a finding is in) and not silenced by a suppression
    comment on its line, in a Python file."""
    comments: dict[str, Suppressions] = {}
    kept = []
    for finding in findings:
        path = Path(finding.path)
        if finding.code not in settings.codes_for(path):
            continue
        if path.suffix == ".py":
            if finding.path not in comments:
                try:
                    text = path.read_text(encoding="utf-8", errors="replace")
                except OSError:
                    text = ""
                comments[finding.path] = read_suppressions(text)
            if comments[finding.path].silences(finding.line, finding.code):
                continue
        kept.append(finding)
    return kept


def run_check(
    paths: Sequence[str],
    *,
    output_format: str = "text",
    select: Sequence[str] | None = None,
    ignore: Sequence[str] = (),
    statistics: bool = False,
    runtime: str | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Check ``paths`` statically (and the app ``runtime`` names), report, return the status.

    Args:
        paths: files and directories to check.
        output_format: ``text`` (``path:line:col: CODE message`` and a summary) or ``json``
            (an array of ``{code, message, path, line, column}``).
        select: codes or prefixes to check, replacing the configured selection.
        ignore: codes or prefixes taken out of the selection.
        statistics: count findings per rule instead of listing them.
        runtime: ``MODULE:ATTRIBUTE`` of an App to build and check too.
        out: where the report goes; standard output by default.
        err: where problems running the check go; standard error by default.

    Returns:
        0 (nothing found), 1 (findings) or 2 (the check could not run).

    Raises:
        ConfigError: ``[tool.tether.check]`` or a selector is refused (the CLI exits 2).
    """
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    try:
        findings = check_paths([Path(p) for p in paths], select=select, ignore=ignore)
    except FileNotFoundError as exc:
        missing = exc.filename if exc.filename is not None else exc.args[0]
        err.write(f"tether check: no such file or directory: {missing}\n")
        return 2
    if runtime is not None:
        from tether.check.runtime import check_app

        settings = load_settings(Path.cwd(), select=select, ignore=ignore)
        try:
            found = check_app(runtime, sources=[Path(p) for p in paths])
        except (ValueError, LookupError, TypeError, ImportError) as exc:
            err.write(f"tether check --runtime: {exc}\n")
            return 2
        except Exception:
            err.write(f"tether check --runtime: building {runtime} failed:\n")
            traceback.print_exc(file=err)
            return 2
        findings = sorted({*findings, *_kept(found, settings)})
    if output_format == "json":
        _write_json(findings, statistics, out)
    else:
        _write_text(findings, statistics, out)
    return 1 if findings else 0
