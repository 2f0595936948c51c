"""The supervisor's decisions, without forking: plan, backoff, scaling, reload, reaping."""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from ratebox import child as role_child
from ratebox import config, supervisor, topology
from ratebox.errors import EXIT_BOOT_FAILURE
from ratebox.supervisor import Supervisor
from ratebox.topology import Action, Child, desired_children, plan


def settings(**sections: Any) -> config.Settings:
    data: dict[str, Any] = {"monitor": {"enabled": False}, "workers": {"count": 3}}
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    return config.from_mapping(data, {})


def running(
    specs: dict[str, topology.Spec], *, state: str = "running", pid: int = 100
) -> dict[str, Child]:
    """A children table where every spec runs, each with its own pid."""
    return {
        name: Child(name, spec.role, spec.settings, state=state, pid=pid + i)
        for i, (name, spec) in enumerate(specs.items())
    }


def verbs(actions: list[Action]) -> list[tuple[str, str]]:
    return [(a.verb, a.name) for a in actions]


class TestDesiredChildren:
    def test_workers_are_named_from_001_then_the_sweeper_follows(self) -> None:
        assert list(desired_children(settings(), 3)) == [
            "worker_001",
            "worker_002",
            "worker_003",
            "sweeper",
        ]

    def test_the_monitor_runs_only_when_enabled(self) -> None:
        on = settings(monitor={"enabled": True})
        assert "monitor" in desired_children(on, 1)
        assert "monitor" not in desired_children(settings(), 1)

    def test_the_name_prefix_is_used(self) -> None:
        assert "val_001" in desired_children(settings(workers={"name_prefix": "val"}), 1)


class TestSpawning:
    def test_every_missing_name_is_spawned(self) -> None:
        desired = desired_children(settings(), 2)
        assert verbs(plan(desired, {}, now=0.0)) == [
            ("spawn", "worker_001"),
            ("spawn", "worker_002"),
            ("spawn", "sweeper"),
        ]

    def test_running_children_are_left_alone(self) -> None:
        desired = desired_children(settings(), 2)
        assert plan(desired, running(desired), now=0.0) == []

    def test_a_dead_child_is_not_respawned_before_its_backoff_ends(self) -> None:
        desired = desired_children(settings(), 2)
        children = running(desired)
        children["worker_002"].pid, children["worker_002"].state = None, "waiting"
        children["worker_002"].not_before = 10.0
        assert plan(desired, children, now=9.9) == []
        assert verbs(plan(desired, children, now=10.0)) == [("spawn", "worker_002")]

    def test_a_child_that_cannot_boot_waits_like_any_other(self) -> None:
        desired = desired_children(settings(), 1)
        children = running(desired)
        children["sweeper"].pid, children["sweeper"].state = None, "failed"
        children["sweeper"].not_before = 30.0
        assert plan(desired, children, now=29.0) == []


class TestScaling:
    def test_scaling_down_stops_the_highest_numbers_first(self) -> None:
        children = running(desired_children(settings(), 4))
        desired = desired_children(settings(), 2)
        assert verbs(plan(desired, children, now=0.0)) == [
            ("stop", "worker_004"),
            ("stop", "worker_003"),
        ]

    def test_a_child_already_stopping_is_not_stopped_twice(self) -> None:
        children = running(desired_children(settings(), 3))
        children["worker_003"].state = "stopping"
        assert plan(desired_children(settings(), 2), children, now=0.0) == []

    def test_a_surplus_name_whose_process_is_gone_is_forgotten(self) -> None:
        children = running(desired_children(settings(), 3))
        children["worker_003"].pid, children["worker_003"].state = None, "gone"
        assert verbs(plan(desired_children(settings(), 2), children, now=0.0)) == [
            ("forget", "worker_003")
        ]

    def test_scaling_up_spawns_the_next_numbers(self) -> None:
        children = running(desired_children(settings(), 2))
        assert verbs(plan(desired_children(settings(), 4), children, now=0.0)) == [
            ("spawn", "worker_003"),
            ("spawn", "worker_004"),
        ]

    def test_disabling_the_monitor_stops_it(self) -> None:
        children = running(desired_children(settings(monitor={"enabled": True}), 1))
        assert verbs(plan(desired_children(settings(), 1), children, now=0.0)) == [
            ("stop", "monitor")
        ]


class TestRestartsForNewSettings:
    def test_a_worker_whose_batch_size_changed_is_restarted(self) -> None:
        children = running(desired_children(settings(), 1))
        desired = desired_children(settings(workers={"batch_size": 10}), 1)
        assert ("restart", "worker_001") in verbs(plan(desired, children, now=0.0))

    def test_only_one_child_is_restarted_per_plan(self) -> None:
        children = running(desired_children(settings(), 3))
        desired = desired_children(settings(rules=[]), 3)  # same rules: nothing to do
        assert plan(desired, children, now=0.0) == []
        changed = desired_children(settings(limits={"max_message_bytes": 1000}), 3)
        assert verbs(plan(changed, children, now=0.0)) == [("restart", "worker_001")]

    def test_no_restart_begins_while_another_is_in_flight(self) -> None:
        children = running(desired_children(settings(), 3))
        children["worker_001"].restarting = True
        desired = desired_children(settings(limits={"max_message_bytes": 1000}), 3)
        assert plan(desired, children, now=0.0) == []

    def test_the_next_restart_follows_once_the_last_one_is_up(self) -> None:
        old = running(desired_children(settings(), 2))
        desired = desired_children(settings(limits={"max_message_bytes": 1000}), 2)
        old["worker_001"].settings = desired["worker_001"].settings  # restarted and up
        assert verbs(plan(desired, old, now=0.0)) == [("restart", "worker_002")]

    def test_a_change_only_the_supervisor_reads_restarts_nobody(self) -> None:
        children = running(desired_children(settings(), 2))
        desired = desired_children(settings(workers={"timeout_s": 120, "shutdown_timeout_s": 5}), 2)
        assert plan(desired, children, now=0.0) == []

    def test_a_sweeper_setting_restarts_the_sweeper_but_not_the_workers(self) -> None:
        children = running(desired_children(settings(), 2))
        desired = desired_children(settings(sweeper={"interval_s": 1}), 2)
        assert verbs(plan(desired, children, now=0.0)) == [("restart", "sweeper")]

    @pytest.mark.parametrize(
        ("role", "changed", "expected"),
        [
            ("worker", {"rules"}, True),
            ("worker", {"monitor.refresh_s"}, False),
            ("worker", {"workers.count"}, False),
            ("sweeper", {"workers.max_retries"}, True),
            ("monitor", {"rules"}, False),
            ("monitor", {"workers.batch_size"}, False),
            ("monitor", {"monitor.refresh_s"}, True),
        ],
    )
    def test_a_role_restarts_only_for_keys_it_reads(
        self, role: str, changed: set[str], expected: bool
    ) -> None:
        assert topology.needs_restart(role, changed) is expected


class TestBackoff:
    def test_a_child_dying_soon_after_start_waits_half_a_second_then_doubling(self) -> None:
        failures, delays = 0, []
        for _ in range(4):
            failures, delay = topology.respawn_delay(failures, uptime=1.0, boot_failure=False)
            delays.append(delay)
        assert delays == [0.5, 1.0, 2.0, 4.0]

    def test_the_delay_never_exceeds_thirty_seconds(self) -> None:
        assert topology.respawn_delay(50, uptime=1.0, boot_failure=False)[1] == 30.0

    def test_a_minute_of_health_starts_the_backoff_from_scratch(self) -> None:
        assert topology.respawn_delay(6, uptime=61.0, boot_failure=False) == (1, 0.5)

    def test_a_child_that_cannot_boot_is_retried_on_the_slow_path(self) -> None:
        assert topology.respawn_delay(0, uptime=0.1, boot_failure=True)[1] == topology.BOOT_RETRY_S


class TestExitStatus:
    def test_an_exit_code_is_decoded(self) -> None:
        assert topology.describe_exit(1 << 8) == (1, None, "exited with status 1")

    def test_a_boot_failure_says_so(self) -> None:
        code, _, text = topology.describe_exit(EXIT_BOOT_FAILURE << 8)
        assert code == EXIT_BOOT_FAILURE and "cannot boot" in text

    def test_a_signal_is_named(self) -> None:
        assert topology.describe_exit(signal.SIGKILL) == (
            None,
            signal.SIGKILL,
            "was killed by SIGKILL",
        )


# -- the Supervisor object, with fork and waitpid patched -------------------------------------


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "ratebox.yaml"
    write_config(path, count=2)
    return path


def write_config(path: Path, count: int, **extra: str) -> None:
    lines = [
        "redis: {url: 'redis://127.0.0.1:1/0'}",
        "postgres: {dsn: 'postgresql://nobody@127.0.0.1:1/x'}",
        f"workers: {{count: {count}, timeout_s: 10, block_ms: 100}}",
        "monitor: {enabled: false}",
        f"embedded: {{dir: '{path.parent}'}}",
        *extra.values(),
    ]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def sup(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> Supervisor:
    """A supervisor that was never initialized: fork hands out fake pids, kill records."""
    s = Supervisor(config.load(str(config_file), {}), str(config_file), clock=lambda: 0.0)
    s.status_path = str(config_file.parent / "status.json")
    pids = iter(range(5000, 6000))
    monkeypatch.setattr(os, "fork", lambda: next(pids))
    sent: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append((pid, sig)))
    s.sent = sent  # type: ignore[attr-defined]
    monkeypatch.setenv("RATEBOX_UNUSED", "1")
    for name in ("REDIS_URL", "POSTGRES_DSN", "REDIS_STREAM", "CONSUMER_GROUP", "NOTIFY_SOCKET"):
        monkeypatch.delenv(name, raising=False)
    return s


def fake_waitpid(monkeypatch: pytest.MonkeyPatch, *exits: tuple[int, int]) -> None:
    queue = list(exits)

    def waitpid(pid: int, options: int) -> tuple[int, int]:
        if not queue:
            raise ChildProcessError
        return queue.pop(0)

    monkeypatch.setattr(os, "waitpid", waitpid)


class TestSupervisorWithoutFork:
    def test_converging_spawns_every_child_with_its_stable_name(self, sup: Supervisor) -> None:
        sup.converge(0.0)
        assert {n: c.pid for n, c in sup.children.items()} == {
            "worker_001": 5000,
            "worker_002": 5001,
            "sweeper": 5002,
        }

    def test_ttin_adds_a_worker_and_ttou_removes_one_but_never_the_last(
        self, sup: Supervisor
    ) -> None:
        sup.signals.extend([signal.SIGTTIN, signal.SIGTTIN])
        sup.handle_signals()
        assert sup.worker_count == 4 and "worker_004" in sup.desired
        sup.signals.extend([signal.SIGTTOU] * 10)
        sup.handle_signals()
        assert sup.worker_count == 1 and "worker_002" not in sup.desired

    def test_a_crashed_worker_is_respawned_under_the_same_name_after_its_backoff(
        self, sup: Supervisor, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        sup.converge(0.0)
        fake_waitpid(monkeypatch, (5000, signal.SIGKILL))
        sup.reap(5.0)
        child = sup.children["worker_001"]
        assert (child.pid, child.state, child.not_before) == (None, "waiting", 5.5)
        assert child.last_exit == "was killed by SIGKILL"
        sup.converge(5.5)
        assert (child.pid, child.restarts) == (5003, 1)

    def test_a_pid_we_did_not_fork_is_ignored(
        self, sup: Supervisor, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        sup.converge(0.0)
        fake_waitpid(monkeypatch, (4242, 0))
        sup.reap(1.0)
        assert all(c.alive for c in sup.children.values())

    def test_a_worker_stopped_by_scaling_down_is_forgotten(
        self, sup: Supervisor, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        sup.converge(0.0)
        sup.scale(1)
        sup.converge(1.0)
        assert (5001, signal.SIGTERM) in sup.sent  # type: ignore[attr-defined]
        deleted: list[str] = []
        monkeypatch.setattr(sup, "redis", object())
        monkeypatch.setattr(
            supervisor.stream_lease,
            "delete_consumer_if_idle",
            lambda client, stream, group, name: deleted.append(name) or (True, 0),
        )
        fake_waitpid(monkeypatch, (5001, 0))
        sup.reap(2.0)
        sup.converge(2.0)
        assert list(sup.children) == ["worker_001", "sweeper"]
        assert deleted == ["worker_002"]

    def test_a_silent_child_gets_sigabrt_then_sigkill(
        self, sup: Supervisor, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        sup.converge(0.0)
        hb = sup.children["worker_002"].heartbeat
        assert hb is not None
        monkeypatch.setattr(hb, "age", lambda: 11.0)
        sup.kill_silent(1.0)
        sup.kill_silent(2.0)
        assert sup.sent == [(5001, signal.SIGABRT)]  # type: ignore[attr-defined]
        sup.kill_silent(1.0 + supervisor.KILL_AFTER_ABORT_S)
        assert sup.sent[-1] == (5001, signal.SIGKILL)  # type: ignore[attr-defined]

    def test_a_reload_with_an_invalid_file_is_refused_and_the_topology_stays(
        self, sup: Supervisor, config_file: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        write_config(config_file, count="four")  # type: ignore[arg-type]
        with caplog.at_level(logging.ERROR):
            sup.reload()
        assert list(sup.desired) == ["worker_001", "worker_002", "sweeper"]
        assert "reload refused: workers.count" in caplog.text

    def test_a_reload_cannot_move_the_workers_to_another_stream(
        self, sup: Supervisor, config_file: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        write_config(config_file, count=2, stream="stream: {name: elsewhere}")
        with caplog.at_level(logging.ERROR):
            sup.reload()
        assert sup.settings.stream.name == "raw_items"
        assert "reload refused: stream.name" in caplog.text

    def test_a_reload_rescales_to_the_files_count(self, sup: Supervisor, config_file: Path) -> None:
        sup.scale(5)
        write_config(config_file, count=3)
        sup.reload()
        assert sup.worker_count == 3 and "worker_003" in sup.desired

    def test_new_rules_restart_the_workers_one_at_a_time(
        self, sup: Supervisor, config_file: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        sup.converge(0.0)
        write_config(config_file, count=2, rules="rules: [{code: 100, enabled: false}]")
        sup.reload()
        sup.converge(1.0)
        sup.converge(1.5)
        assert [n for n, c in sup.children.items() if c.state == "stopping"] == ["worker_001"]
        fake_waitpid(monkeypatch, (5000, 0))
        sup.reap(2.0)
        sup.converge(2.0)  # respawned at once, with the new rules
        assert sup.children["worker_001"].pid == 5003
        sup.converge(2.5)
        assert sup.children["worker_002"].state == "starting"  # waits for worker_001 to be up
        time.sleep(0.02)  # the first beat must land on a later clock tick than the file's birth
        hb = sup.children["worker_001"].heartbeat
        assert hb is not None
        hb.beat()
        sup.notice_up()
        sup.converge(3.0)
        assert sup.children["worker_002"].state == "stopping"

    def test_the_status_file_lists_every_child(self, sup: Supervisor) -> None:
        sup.converge(0.0)
        sup.report(0.0)
        document = json.loads(Path(sup.status_path).read_text())
        assert document["supervisor_pid"] == os.getpid()
        assert [(c["name"], c["role"], c["state"]) for c in document["children"]] == [
            ("worker_001", "worker", "starting"),
            ("worker_002", "worker", "starting"),
            ("sweeper", "sweeper", "starting"),
        ]
        assert set(document["children"][0]) == {
            "name",
            "role",
            "pid",
            "state",
            "restarts",
            "started_at",
            "last_exit",
        }


class TestStopSignals:
    def test_term_asks_for_a_graceful_stop(self, sup: Supervisor) -> None:
        sup.signals.append(signal.SIGTERM)
        sup.handle_signals()
        assert sup.stop_mode == "graceful"

    def test_a_second_int_makes_it_immediate(self, sup: Supervisor) -> None:
        sup.signals.extend([signal.SIGINT, signal.SIGINT])
        sup.handle_signals()
        assert sup.stop_mode == "immediate"

    def test_quit_is_immediate(self, sup: Supervisor) -> None:
        sup.signals.append(signal.SIGQUIT)
        sup.handle_signals()
        assert sup.stop_mode == "immediate"

    def test_no_rescale_once_stopping(self, sup: Supervisor) -> None:
        sup.signals.extend([signal.SIGTERM, signal.SIGTTIN])
        sup.handle_signals()
        assert sup.worker_count == 2


class _Exited(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


class TestChildBoot:
    """The child's side of fork, run in this process with os._exit turned into an exception."""

    @pytest.fixture
    def child(self, sup: Supervisor, monkeypatch: pytest.MonkeyPatch) -> Child:
        def exit_(status: int) -> None:
            raise _Exited(status)

        monkeypatch.setattr(os, "_exit", exit_)
        monkeypatch.setattr(logging, "shutdown", lambda: None)
        monkeypatch.setattr(role_child, "_setup", lambda *args: None)
        sup.converge(0.0)
        return sup.children["sweeper"]

    def exit_status(self, sup: Supervisor, child: Child) -> int:
        assert child.heartbeat is not None
        with pytest.raises(_Exited) as exited:
            role_child.become(
                child, child.heartbeat, sup.pid, (), [], "INFO", lambda p: sup._run_role(child, p)
            )
        return exited.value.status

    def test_a_role_module_that_does_not_exist_is_a_boot_failure(
        self,
        sup: Supervisor,
        child: Child,
        monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture,
    ) -> None:
        def missing(child: Child, pulse: Any) -> int:
            raise ModuleNotFoundError("No module named 'ratebox.sweeper'")

        monkeypatch.setattr(sup, "_run_role", missing)
        assert self.exit_status(sup, child) == EXIT_BOOT_FAILURE
        assert "sweeper cannot boot" in caplog.text

    def test_a_crash_after_the_first_heartbeat_is_an_ordinary_failure(
        self, sup: Supervisor, child: Child, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        def crash(child: Child, pulse: Any) -> int:
            pulse()
            raise RuntimeError("boom")

        monkeypatch.setattr(sup, "_run_role", crash)
        assert self.exit_status(sup, child) == 1

    def test_the_roles_exit_status_is_the_processs(
        self, sup: Supervisor, child: Child, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(sup, "_run_role", lambda child, pulse: 0)
        assert self.exit_status(sup, child) == 0


class TestGracefulStop:
    def test_every_child_gets_one_term_and_one_already_stopping_gets_none(
        self, sup: Supervisor, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        sup.converge(0.0)
        sup.scale(1)
        sup.converge(1.0)  # worker_002 got its TERM for the scale-down
        sup.stop_mode = "graceful"
        fake_waitpid(monkeypatch, (5000, 0), (5001, 0), (5002, 0))
        assert sup.stop_children() == 0
        terms = [pid for pid, sig in sup.sent if sig == signal.SIGTERM]  # type: ignore[attr-defined]
        assert sorted(terms) == [5000, 5001, 5002]
        assert not sup.pids
