"""The daemon's CPU wake-up latency request (`dsp_proxy --cpu-latency USEC`).

Every DVS message crosses a chain of processes that sleep until the previous one wakes them
(docs/performance.md).  When a CPU has nothing to run, Linux puts it in an idle state, and
leaving a deep one (a VM's halt: an exit to the hypervisor) can cost more than the work the
woken process does.  Linux's PM QoS interface lets a process ask that no CPU enter an idle state
whose exit takes longer than a bound, for as long as it keeps `/dev/cpu_dma_latency` open with
the bound written into it (the same request `tuned`'s latency profiles make).  An idle CPU then
polls instead of halting: wake-ups get cheaper, and idle CPUs draw more power.  So it is the
operator's choice, off unless asked for; the request ends with the daemon (the kernel drops it
when the descriptor closes, also when the process is killed).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import struct

log = logging.getLogger("dsp")

DEVICE = "/dev/cpu_dma_latency"
#: The device's unit is a signed 32-bit count of microseconds, written and read as raw bytes.
_VALUE = struct.Struct("=i")
MAX_USEC = 2_000_000_000


def usec_option(text: str) -> int:
    """argparse type of `--cpu-latency`: microseconds, 0 (no idle state that takes any time to
    leave) to MAX_USEC."""
    usec = int(text) if re.fullmatch(r"[0-9]{1,10}", text) else -1
    if not 0 <= usec <= MAX_USEC:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of microseconds "
                                         f"(0 to {MAX_USEC})")
    return usec


class CpuLatencyRequest:
    """A PM QoS CPU latency request, held until `close` (or the end of a `with` block)."""

    def __init__(self, usec: int, device: str = DEVICE) -> None:
        """Make the request; OSError when the device is missing or not writable (it is root's,
        mode 0600)."""
        self._fd: int | None = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(self._fd, _VALUE.pack(usec))
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        """End the request (closing the descriptor is what ends it)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> CpuLatencyRequest:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def current_limit(device: str = DEVICE) -> int:
    """The bound in force now: the lowest of all the processes' requests (the device reads back
    as one 32-bit value); OSError when it cannot be read."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        raw = os.read(fd, _VALUE.size)
    finally:
        os.close(fd)
    if len(raw) != _VALUE.size:
        raise OSError(f"{device}: read {len(raw)} bytes, not {_VALUE.size}")
    return _VALUE.unpack(raw)[0]


def hold(usec: int | None, device: str = DEVICE) -> CpuLatencyRequest | None:
    """The daemon's request, if it was asked for: logged either way, and a failure (no device,
    not root) is a warning, not a reason to stop the proxy."""
    if usec is None:
        return None
    try:
        req = CpuLatencyRequest(usec, device)
    except OSError as exc:
        log.warning("--cpu-latency %d: cannot hold a CPU latency request: %s%s", usec,
                    device, f": {exc.strerror}" if exc.strerror else f" ({exc})")
        return None
    log.info("holding a CPU latency request of %d us (%s) while running", usec, device)
    return req
