"""Tasks: the Linux threads that talk to the node kernel, their exit, and sleeping/waking.

A call that must block is a generator: it yields the monotonic time until which it may sleep
(None: no limit) and is resumed when it was woken, when that time has come, or with
`GeneratorExit` when its task exited.  The server parks it meanwhile and serves the others;
`runnable` collects the tasks that a call woke so that the server resumes their calls.
"""

from __future__ import annotations

import logging
import time

from .. import consts as C
from .. import errors as E
from .memory import AddressSpace
from .model import (
    Desc,
    Parked,
    Task,
    TaskGone,
    thread_alive,
)

log = logging.getLogger("dvk.emu")


class Tasks:
    """Mixin of `NodeKernel`; the kernel state lives on the kernel object (see kernel.py)."""

    def attach(self, pid: int, tid: int, comm: str) -> Task:
        """A thread opened a connection: find or create its task.  `comm` is what the client
        says its program is called; it is kept as Linux keeps a thread's name (15 bytes), not
        at whatever length a request frame allows."""
        comm = comm[:C.MAXPROCNAME - 1]
        task = self.tasks.get(tid)
        if task is None or task.dead or task.pid != pid:
            task = self._new_task(tid, pid, comm)
        task.comm = comm or task.comm
        task.attached = True
        return task

    def _new_task(self, tid: int, pid: int, comm: str = "") -> Task:
        space = self.spaces.get(pid)
        if space is None:
            space = self.spaces[pid] = AddressSpace(pid)
        task = Task(tid=tid, pid=pid, comm=comm, space=space)
        self.tasks[tid] = task
        return task

    def _lookup_task(self, pid: int) -> Task | None:
        """The task of a Linux TID/PID, also one that has not talked to the kernel yet."""
        task = self.tasks.get(pid)
        if task is not None and not task.dead:
            return task
        try:
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
            tgid = int(status["Tgid"].strip())
            comm = status["Name"].strip()
        except (OSError, KeyError, ValueError):
            return None
        return self._new_task(pid, tgid, comm)

    def detach(self, task: Task) -> None:
        """The task's connection closed: the thread exited (the kernel's exit hook)."""
        task.attached = False
        self._task_exit(task)

    def reap(self) -> None:
        """Exit the tasks that were bound without a connection and whose thread is gone."""
        for task in list(self.tasks.values()):
            if not task.attached and not task.dead and not thread_alive(task.tid):
                self._task_exit(task)

    def _task_exit(self, task: Task) -> None:
        if task.dead:
            return
        task.dead = True
        log.debug("task %d (pid %d %s) exits", task.tid, task.pid, task.comm)
        if task.desc is not None:
            desc = task.desc
            self._do_unbind(self.dcs[desc.dcid], desc)
        if task.proxy is not None:
            self._proxy_exit(task.proxy)
        self.runnable.add(task)
        if self.tasks.get(task.tid) is task:  # not a newer task of that TID
            del self.tasks[task.tid]
        if not any(t.pid == task.pid for t in self.tasks.values()):
            space = self.spaces.pop(task.pid, None)
            if space is not None:
                space.close()

    def add_arena(self, task: Task, fd: int, size: int) -> int:
        try:
            return task.space.add(fd, size)
        except MemoryError:
            raise E.DvkError.for_code(E.EDVSNOMEM) from None
        except (OSError, ValueError):
            raise E.DvkError.for_code(E.EDVSBADF) from None

    def _sleep(self, task: Task, tout: int,
               timeout_rc: int = E.EDVSTIMEDOUT) -> Parked:
        """Block the caller until woken or `tout` ms passed (-1 = forever): the wake code, or
        `timeout_rc`.  A `tout` of 0 never blocks."""
        task.woken = False
        deadline = None if tout < 0 else time.monotonic() + tout / 1000.0
        while not task.woken:
            if task.dead:
                raise TaskGone()
            if deadline is not None and time.monotonic() >= deadline:
                return timeout_rc
            yield deadline
        return task.wake_rc

    def _wake(self, desc: Desc, rc: int) -> None:
        task = desc.task
        if task is None:
            return
        task.wake_rc = rc
        task.woken = True
        self.runnable.add(task)
