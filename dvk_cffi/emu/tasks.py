"""Tasks: the Linux threads that talk to the node kernel, their exit, and sleeping/waking."""

from __future__ import annotations

import logging
import threading
import time

from .. import errors as E
from .memory import AddressSpace
from .model import (
    LIVENESS_SLICE,
    Desc,
    Task,
    TaskGone,
    thread_alive,
)

log = logging.getLogger("dvk.emu")


class Tasks:
    """Mixin of `NodeKernel`; the kernel state lives on the kernel object (see kernel.py)."""

    def attach(self, pid: int, tid: int, comm: str, probe=None) -> Task:
        """A thread opened a connection: find or create its task."""
        with self.lock:
            task = self.tasks.get(tid)
            if task is None or task.dead or task.pid != pid:
                task = self._new_task(tid, pid, comm)
            task.comm = comm or task.comm
            task.attached = True
            task.probe = probe
            return task

    def _new_task(self, tid: int, pid: int, comm: str = "") -> Task:
        space = self.spaces.get(pid)
        if space is None:
            space = self.spaces[pid] = AddressSpace(pid)
        task = Task(tid=tid, pid=pid, comm=comm, space=space,
                    cond=threading.Condition(self.lock))
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
        with self.lock:
            task.attached = False
            self._task_exit(task)

    def reap(self) -> None:
        """Exit the tasks that were bound without a connection and whose thread is gone."""
        with self.lock:
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
        task.cond.notify_all()
        self.tasks.pop(task.tid, None)
        if not any(t.pid == task.pid for t in self.tasks.values()):
            space = self.spaces.pop(task.pid, None)
            if space is not None:
                space.close()

    def add_arena(self, task: Task, fd: int, size: int) -> int:
        with self.lock:
            try:
                return task.space.add(fd, size)
            except MemoryError:
                raise E.DvkError.for_code(E.EDVSNOMEM) from None
            except (OSError, ValueError):
                raise E.DvkError.for_code(E.EDVSBADF) from None

    def _sleep(self, task: Task, tout: int, timeout_rc: int = E.EDVSTIMEDOUT) -> int:
        """Block the caller until woken or `tout` ms passed (-1 = forever).  Lock held."""
        task.woken = False
        deadline = None if tout < 0 else time.monotonic() + tout / 1000.0
        while not task.woken:
            if task.dead:
                raise TaskGone()
            if deadline is None:
                slice_ = LIVENESS_SLICE
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return timeout_rc
                slice_ = min(remaining, LIVENESS_SLICE)
            task.cond.wait(slice_)
            if not task.woken and task.probe is not None and not task.probe():
                self._task_exit(task)
        return task.wake_rc

    @staticmethod
    def _wake(desc: Desc, rc: int) -> None:
        task = desc.task
        if task is None:
            return
        task.wake_rc = rc
        task.woken = True
        task.cond.notify_all()
