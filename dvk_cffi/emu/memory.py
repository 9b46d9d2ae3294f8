"""Shared-memory arenas: the process memory that the emulated DVK copies between.

A client process creates an arena with `memfd_create`, maps it, and passes the descriptor to its
node kernel over the Unix socket (SCM_RIGHTS).  The kernel maps the same memory and assigns the
arena a 32-bit base address in that process's address space, so `vcopy` addresses, message
pointer fields (`m1_p1`, ...) and proxy payload buffers are plain 32-bit values as on an i386
DVK node, and bulk data never travels over the socket.

An arena must be sealed against shrinking (`F_SEAL_SHRINK`): the process keeps its descriptor,
and a read of the kernel's mapping past the end of a file shrunk meanwhile would be a SIGBUS,
the death of the node kernel; so the kernel maps only memory that cannot shrink.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import threading

#: Where the first arena of every process starts; addresses are below 4 GiB.
ARENA_BASE = 0x10000000
ARENA_ALIGN = 1 << 20
ADDRESS_LIMIT = 1 << 32


class AddressSpace:
    """The arenas of one process as the node kernel sees them: base address -> mapping."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.arenas: list[tuple[int, int, mmap.mmap]] = []
        self.next_base = ARENA_BASE

    def add(self, fd: int, size: int) -> int:
        """Map the arena behind `fd` (the kernel's own copy) and return its base address.
        OSError when `fd` is not a memfd sealed against shrinking, ValueError when it is
        smaller than `size` or `size` is 0 (to mmap, all of the file: an arena that would
        take no address space, and so no bound on how many a process registers)."""
        if size <= 0:
            raise ValueError(f"arena of {size} bytes")
        if not fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK:
            raise OSError(f"arena of process {self.pid} is not sealed against shrinking")
        base = self.next_base
        if base + size > ADDRESS_LIMIT:
            raise MemoryError("32-bit address space of the process is exhausted")
        mem = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.arenas.append((base, size, mem))
        self.next_base = base + (size + ARENA_ALIGN - 1) // ARENA_ALIGN * ARENA_ALIGN
        return base

    def _find(self, addr: int, size: int) -> tuple[mmap.mmap, int]:
        if size < 0:
            raise ValueError(f"negative size {size}")
        for base, length, mem in self.arenas:
            if base <= addr and addr + size <= base + length:
                return mem, addr - base
        raise ValueError(f"address {addr:#x}+{size} is not mapped in process {self.pid}")

    def read(self, addr: int, size: int) -> bytes:
        mem, off = self._find(addr, size)
        return mem[off:off + size]

    def write(self, addr: int, data: bytes | memoryview) -> None:
        mem, off = self._find(addr, len(data))
        mem[off:off + len(data)] = data

    def close(self) -> None:
        for _base, _size, mem in self.arenas:
            try:
                mem.close()
            except BufferError:  # a view is still exported; the GC releases it later
                pass
        self.arenas.clear()


class ArenaAllocator:
    """Client side: hands out `Buffer`-sized pieces of arenas registered with the node kernel.

    Small requests share 4 MiB arenas (bump allocation); large ones get an arena of their
    own.  A piece given back (`free`, when its Buffer is gone) goes to a free list of its size
    that the next request of that size takes: a daemon that starts threads for ever (each
    with its payload buffers) reuses their memory instead of growing until the kernel's
    address space is used up.  `register(fd, size)` is the callback that passes the arena
    to the kernel and returns its base address.
    """

    CHUNK = 4 << 20

    def __init__(self, register) -> None:
        self._register = register
        self._lock = threading.Lock()
        self._current: tuple[int, mmap.mmap, int, int] | None = None  # base, mem, used, size
        self._maps: list[mmap.mmap] = []
        self._pieces: dict[int, memoryview] = {}               # addr -> the whole piece
        self._free: dict[int, list[int]] = {}                  # rounded size -> addrs

    def _new_arena(self, size: int) -> tuple[int, mmap.mmap]:
        fd = os.memfd_create("dvk-arena", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
            mem = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            base = self._register(fd, size)
        finally:
            os.close(fd)
        self._maps.append(mem)
        return base, mem

    def alloc(self, size: int) -> tuple[memoryview, int]:
        """A zeroed piece of shared memory of `size` bytes and its DVK address."""
        size = max(1, size)
        rounded = (size + 63) & ~63
        with self._lock:
            spare = self._free.get(rounded)
            if spare:
                addr = spare.pop()
                piece = self._pieces[addr]
                piece[:] = bytes(rounded)
                return piece[:size], addr
            if rounded > self.CHUNK // 4:
                addr, mem = self._new_arena(rounded)
                piece = memoryview(mem)[:rounded]
            else:
                if self._current is None or self._current[2] + rounded > self._current[3]:
                    base, mem = self._new_arena(self.CHUNK)
                    self._current = (base, mem, 0, self.CHUNK)
                base, mem, used, total = self._current
                self._current = (base, mem, used + rounded, total)
                addr, piece = base + used, memoryview(mem)[used:used + rounded]
            self._pieces[addr] = piece
            return piece[:size], addr

    def free(self, addr: int) -> None:
        """The piece at `addr` is no longer used (its whole piece knows its rounded size)."""
        with self._lock:
            piece = self._pieces.get(addr)
            if piece is not None:
                self._free.setdefault(len(piece), []).append(addr)
