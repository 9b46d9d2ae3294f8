"""The autoscaler's rules on a stand-in DSP (the cluster tests show the same with real nodes)."""

from __future__ import annotations

import time
from types import SimpleNamespace

from dsp_proxy.config import parse_text
from dsp_proxy.elastic import Autoscaler, CommandResult
from dvk_cffi import consts as C

CFG = """
lb lb0 {{ nodeid 0; start 1; stop 1; min_servers {min}; max_servers {max};
         vm_start "vmstart"; vm_stop "vmstop"; vm_status "vmstatus"; }};
server a {{ nodeid 1; }};
server b {{ nodeid 2; node_image "img-b"; }};
server c {{ nodeid 3; node_image "img-c"; }};
client d {{ nodeid 4; }};
"""


class Runner:
    """Records commands instead of running them; vm_status answers `status_rc`."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list]] = []
        self.status_rc = 1

    def run(self, command, args):
        self.calls.append((command, [str(a) for a in args]))
        return CommandResult(self.status_rc if command == "vmstatus" else 0, "")


class Group:
    def __init__(self, levels, quiet=True):
        self._levels, self._quiet = levels, quiet
        self.servers = {}
        self.meter = SimpleNamespace(level=C.LVL_IDLE)

    def levels(self):
        return dict(self._levels)

    def quiet(self, nodeid):
        return self._quiet


def scaler(levels, min_servers=1, max_servers=3, local=1):
    cfg = parse_text(CFG.format(min=min_servers, max=max_servers))
    dsp = SimpleNamespace(cfg=cfg, local=local, group=Group(levels))
    runner = Runner()
    a = Autoscaler(dsp, runner)
    a.running = lambda: set(levels) | {local}
    return a, runner, dsp


def wait_idle(a):
    """The VM command a tick started (on a thread of its own) has finished: only then do the
    recorded calls say what the tick did, also when they say it did nothing."""
    deadline = time.monotonic() + 5
    while a.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not a.busy, "a VM command still running after 5 s"


def test_starts_when_every_running_server_is_saturated_one_at_a_time():
    a, runner, dsp = scaler({1: C.LVL_SATURATED})
    dsp.group.meter.level = C.LVL_SATURATED
    a.tick()
    wait_idle(a)
    assert runner.calls == [("vmstart", ["img-b", "b", "2"])]
    a.tick()  # a start is pending: no second one
    wait_idle(a)
    assert len(runner.calls) == 1


def test_no_start_while_one_server_has_room_and_never_beyond_max():
    a, runner, dsp = scaler({1: C.LVL_SATURATED, 2: C.LVL_BUSY})
    a.tick()
    wait_idle(a)
    assert runner.calls == []
    a, runner, dsp = scaler({1: C.LVL_SATURATED, 2: C.LVL_SATURATED}, max_servers=2)
    dsp.group.meter.level = C.LVL_SATURATED
    a.tick()
    wait_idle(a)
    assert runner.calls == []


def test_start_below_min_servers_and_status_after_a_failed_start():
    a, runner, dsp = scaler({}, min_servers=2)
    a.tick()
    wait_idle(a)
    assert runner.calls == [("vmstart", ["img-b", "b", "2"])]
    a.vms[2].starting_since = time.monotonic() - 5  # `start` (1 s) passed, node 2 never came
    a.tick()
    deadline = time.monotonic() + 5
    while not any(c == "vmstatus" for c, _ in runner.calls) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ("vmstatus", ["img-b", "b", "2"]) in runner.calls


def test_idle_server_stopped_after_stop_seconds_but_not_below_min():
    a, runner, dsp = scaler({1: C.LVL_IDLE, 2: C.LVL_IDLE})
    a.tick()
    wait_idle(a)
    assert runner.calls == []  # idle, but not yet for `stop` seconds
    a.vms[2].idle_since = time.monotonic() - 2
    a.tick()
    wait_idle(a)
    assert runner.calls == [("vmstop", ["img-b", "b", "2"])]
    a, runner, dsp = scaler({1: C.LVL_IDLE, 2: C.LVL_IDLE}, min_servers=2)
    a.vms[2].idle_since = time.monotonic() - 2
    a.tick()
    wait_idle(a)
    assert runner.calls == []


def test_only_the_deciding_node_acts():
    a, runner, dsp = scaler({1: C.LVL_SATURATED, 2: C.LVL_SATURATED}, local=2)
    a.running = lambda: {1, 2}
    a.tick()  # node 1, the lowest-id live server, decides
    wait_idle(a)
    assert a.decider() == 1 and runner.calls == []


def test_failed_vm_commands_and_starts_show_in_the_figures():
    """A vm_start that failed, or a start whose node never came up, was only a log line: the
    status said `starting: false` as after a success, and `dsp_proxy stats` showed nothing.
    Each counts as a failure with its reason, in the status and the text figures."""
    from dsp_proxy.stats import format_text
    a, runner, dsp = scaler({}, min_servers=2)
    runner.run = lambda command, args: CommandResult(3, "", "domain 'b' not found")
    a.tick()
    wait_idle(a)
    snap = a.snapshot()
    assert snap[2]["failures"] == 1, snap[2]
    assert snap[2]["last_error"] == "vm_start failed (status 3): domain 'b' not found", snap[2]
    runner.run = lambda command, args: CommandResult(0, "")
    a.vms[2].failed_at = 0.0                         # retry now, not after RETRY_AFTER
    a.tick()
    wait_idle(a)
    a.vms[2].starting_since = time.monotonic() - 5   # `start` (1 s) passed, it never came
    a.tick()
    wait_idle(a)
    snap = a.snapshot()
    assert snap[2]["failures"] == 2 and "come up" in snap[2]["last_error"], snap[2]
    text = format_text({"autoscaler": snap})
    assert "VM of server node 2 (b): 2 starts, 0 stops, 2 failed" in text, text


def test_no_thread_for_a_vm_command_is_a_failed_command_tried_again(monkeypatch):
    """Out of threads (RLIMIT_NPROC, memory), the VM command's thread cannot start: that is
    logged and counted as a failed command, retried after RETRY_AFTER; the autoscaler must not
    stay 'busy' with a command that never ran (it then never started a server again)."""
    import threading

    from dsp_proxy import elastic

    a, runner, dsp = scaler({1: C.LVL_SATURATED})
    dsp.group.meter.level = C.LVL_SATURATED
    real_start = threading.Thread.start

    def no_thread(self):
        if self.name.startswith("vm-"):
            raise RuntimeError("can't start new thread")
        return real_start(self)

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    a.tick()
    assert not a.busy
    vm = a.vms[2]
    assert vm.failures == 1 and "can't start new thread" in vm.last_error
    assert not vm.starting_since
    monkeypatch.setattr(threading.Thread, "start", real_start)
    monkeypatch.setattr(elastic, "RETRY_AFTER", 0.0)
    a.tick()
    wait_idle(a)
    assert ("vmstart", ["img-b", "b", "2"]) in runner.calls
