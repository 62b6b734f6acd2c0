"""``tether check``: the governance contract, checked in the source and in the built App.

Static rules read each module's syntax tree (stdlib ``ast``, nothing imported or run) and
report what breaks the contract: raw gRPC channels and servers, work sent to threads without
the call's context, lines logged without it, whole requests in log lines, blocking calls in
``async def``, HTTP clients that drop the trace, handlers that hide failures. The runtime check
builds the App and compares it with its protos and configuration. Every code, its reason and
its fix: ``docs/check.md``.

Modules: :mod:`~tether.check.rules` (the table of codes), :mod:`~tether.check.facts` and
:mod:`~tether.check.static` (the rules), :mod:`~tether.check.suppress` (``# tether: ignore``),
:mod:`~tether.check.config` (``[tool.tether.check]`` and file selection),
:mod:`~tether.check.source` (checking files), :mod:`~tether.check.runtime` (``--runtime``),
:mod:`~tether.check.command` (the command's report and exit status).
"""

from __future__ import annotations

from tether.check.command import run_check
from tether.check.rules import RULES, Finding, Rule
from tether.check.source import check_paths, check_source

__all__ = ["RULES", "Finding", "Rule", "check_paths", "check_source", "run_check"]
