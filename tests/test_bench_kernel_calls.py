"""A node kernel's calls measured apart (bench/kernel_calls.py): both settings carry the five
calls of a relayed round trip and check what each returns, so a kernel that stops delivering
fails the benchmark instead of looking fast; nothing is left behind."""

from __future__ import annotations

import gc
import os

import pytest

from bench import kernel_calls
from dvk_cffi.emu.kernel import NodeKernel


def _fds() -> int:
    """Open descriptors of this process, after earlier tests' garbage has been freed."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def test_both_settings_run_the_five_calls_and_leave_no_socket():
    before = _fds()
    res = kernel_calls.run(200)
    assert res["rounds"] == 200
    assert res["logic_us"] > 0 and res["server_us"] > 0
    assert _fds() == before


@pytest.mark.parametrize("setting", [kernel_calls.logic, kernel_calls.server_path])
def test_a_put2lcl_that_delivers_nothing_fails_the_run(monkeypatch, setting):
    monkeypatch.setattr(NodeKernel, "put2lcl", lambda self, task, hdr, addr: 0)
    before = _fds()
    with pytest.raises(RuntimeError):
        setting(50)
    assert _fds() == before


def test_a_sender_that_takes_another_command_fails_the_run(monkeypatch):
    """The reply the sender proxy takes is checked field by field."""
    made = NodeKernel._rmtcmd

    def wrong_destination(self, desc, cmd, dcid, src, dst, dnode, rcode=0, length=0):
        return made(self, desc, cmd, dcid, src, dst + 1, dnode, rcode, length)

    monkeypatch.setattr(NodeKernel, "_rmtcmd", wrong_destination)
    with pytest.raises(RuntimeError, match="not the server's reply"):
        kernel_calls.logic(50)


def test_no_rounds_is_refused():
    with pytest.raises(ValueError):
        kernel_calls.run(0)
