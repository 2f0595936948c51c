"""sd_notify over a real unix datagram socket, as systemd listens for it."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ratebox import config, systemd
from ratebox.supervisor import Supervisor
from ratebox.topology import Child


class Listener:
    """What systemd would see: a bound SOCK_DGRAM socket and the NOTIFY_SOCKET naming it."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address

    def received(self) -> list[str]:
        messages = []
        while True:
            try:
                messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return messages


@pytest.fixture
def listener(monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    # A short directory: sun_path is limited to 107 bytes, pytest's tmp_path can be longer.
    directory = tempfile.mkdtemp(prefix="rb-sd-")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield Listener(sock, path)
    sock.close()
    os.unlink(path)
    os.rmdir(directory)


class TestNotify:
    def test_without_notify_socket_nothing_is_sent(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
        assert systemd.notify("READY=1") is False

    def test_ready_reaches_the_socket(self, listener: Listener) -> None:
        assert systemd.notify("READY=1") is True
        assert listener.received() == ["READY=1"]

    def test_several_assignments_travel_in_one_datagram(self, listener: Listener) -> None:
        systemd.notify("READY=1\nSTATUS=2/2 workers running")
        systemd.notify("WATCHDOG=1")
        assert listener.received() == ["READY=1\nSTATUS=2/2 workers running", "WATCHDOG=1"]

    def test_an_abstract_socket_is_named_with_an_at_sign(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        name = f"ratebox-test-{uuid.uuid4().hex}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind("\0" + name)
            monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
            assert systemd.notify("STOPPING=1") is True
            assert sock.recv(4096) == b"STOPPING=1"

    def test_a_socket_nobody_listens_on_is_not_an_error(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/ratebox/notify")
        assert systemd.notify("READY=1") is False


class TestWatchdogInterval:
    def test_it_is_half_of_watchdog_usec(self) -> None:
        assert systemd.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0

    def test_it_applies_when_watchdog_pid_is_ours(self) -> None:
        env = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}
        assert systemd.watchdog_interval(env) == 1.0

    def test_it_is_none_when_meant_for_another_process(self) -> None:
        env = {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}
        assert systemd.watchdog_interval(env) is None

    @pytest.mark.parametrize("env", [{}, {"WATCHDOG_USEC": "0"}, {"WATCHDOG_USEC": "soon"}])
    def test_it_is_none_without_a_usable_watchdog_usec(self, env: dict[str, str]) -> None:
        assert systemd.watchdog_interval(env) is None


class TestSupervisorNotifications:
    def test_ready_status_and_watchdog_are_sent_once_every_child_is_up(
        self, listener: Listener, tmp_path: Path
    ) -> None:
        settings = config.from_mapping({"workers": {"count": 1}, "monitor": {"enabled": False}}, {})
        sup = Supervisor(settings, "ratebox.yaml", clock=lambda: 100.0)
        sup.watchdog_s = 15.0
        sup.children = {
            name: Child(name, spec.role, settings, state="starting", pid=1)
            for name, spec in sup.desired.items()
        }
        sup.report(100.0)
        assert listener.received() == ["STATUS=0/1 workers running, sweeper starting", "WATCHDOG=1"]
        for child in sup.children.values():
            child.state = "running"
        sup.report(101.0)
        assert listener.received() == [
            "STATUS=1/1 workers running, sweeper running",
            "READY=1\nSTATUS=1/1 workers running, sweeper running",
        ]
        sup.report(115.0)
        assert listener.received() == ["WATCHDOG=1"]
