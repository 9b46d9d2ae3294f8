"""The DVK info structs (`dvs_usr_t`, `dc_usr_t`, `node_usr_t`, `proxies_usr_t`, `proc_usr_t`)
as Python dataclasses, with their i386 kernel-size encodings.

Both backends return these: `KernelDvk` converts its native cffi structs, the emulator sends the
i386 bytes over its socket.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import ClassVar

from . import consts as C


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("latin-1")


def _cbytes(text: str | bytes, size: int) -> bytes:
    raw = text.encode("latin-1") if isinstance(text, str) else text
    return raw[:size - 1]


class _Packed:
    """Mixin: pack/unpack a dataclass with an i386 struct; `str` fields are C char arrays."""

    STRUCT: ClassVar[struct.Struct]

    def pack(self) -> bytes:
        """The struct's bytes.  Integers take their field's 32 bits as the kernel's C fields
        do: a counter past 2**32 (a busy endpoint's messages sent, a node's proxied
        commands) wraps instead of making the whole struct unreadable."""
        values = []
        for f, code in zip(dataclasses.fields(self), self._codes()):
            v = getattr(self, f.name)
            if code.endswith("s"):
                v = _cbytes(v, int(code[:-1]))
            elif code == "I":
                v %= 2**32
            elif code == "i":
                v = (v + 2**31) % 2**32 - 2**31
            values.append(v)
        return self.STRUCT.pack(*values)

    @classmethod
    def unpack(cls, data: bytes | memoryview):
        raw = cls.STRUCT.unpack_from(data, 0)
        return cls(*[_cstr(v) if isinstance(v, bytes) else v for v in raw])

    @classmethod
    def _codes(cls) -> list[str]:
        out, num = [], ""
        for ch in cls.STRUCT.format.lstrip("<"):
            if ch.isdigit():
                num += ch
                continue
            if ch == "s":
                out.append(num + "s")
            else:
                out.extend([ch] * int(num or 1))
            num = ""
        return out


@dataclasses.dataclass
class DvsInfo(_Packed):
    """`dvs_usr_t`: the node's DVS parameters."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<16s7iIiIi")
    d_name: str = C.DEFAULT_DVS["d_name"]
    d_nr_dcs: int = C.NR_DCS
    d_nr_nodes: int = C.NR_NODES
    d_nr_procs: int = C.NR_PROCS
    d_nr_tasks: int = C.NR_TASKS
    d_nr_sysprocs: int = C.NR_SYS_PROCS
    d_max_copybuf: int = C.MAXCOPYBUF
    d_max_copylen: int = C.MAXCOPYLEN
    d_dbglvl: int = 0
    d_version: int = 0
    d_flags: int = 0
    d_size_proc: int = 0


@dataclasses.dataclass
class DcInfo(_Packed):
    """`dc_usr_t` (kernel size: the CPU mask is 4 bytes)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<6iI3i16sI")
    dc_dcid: int = 0
    dc_flags: int = C.DC_FREE
    dc_nr_procs: int = C.DEFAULT_DC0["dc_nr_procs"]
    dc_nr_tasks: int = C.DEFAULT_DC0["dc_nr_tasks"]
    dc_nr_sysprocs: int = C.DEFAULT_DC0["dc_nr_sysprocs"]
    dc_nr_nodes: int = C.DEFAULT_DC0["dc_nr_nodes"]
    dc_nodes: int = 0
    dc_warn2proc: int = C.NONE
    dc_warnmsg: int = 0
    dc_pid: int = -1
    dc_name: str = "DC0"
    dc_cpumask: int = 0


@dataclasses.dataclass
class NodeInfo(_Packed):
    """`node_usr_t`."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<iIiI4i2I16s")
    n_nodeid: int = 0
    n_flags: int = 0
    n_proxies: int = C.NO_PROXIES
    n_dcs: int = 0
    n_stime_sec: int = 0
    n_stime_nsec: int = 0
    n_rtime_sec: int = 0
    n_rtime_nsec: int = 0
    n_pxsent: int = 0
    n_pxrcvd: int = 0
    n_name: str = "NONAME"


@dataclasses.dataclass
class ProxiesInfo(_Packed):
    """`proxies_usr_t` (kernel-internal; shown by /proc/dvs/proxies/info)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<2I2i16s")
    px_id: int = 0
    px_flags: int = C.PROXIES_FREE
    px_maxbytes: int = C.MAXCOPYBUF
    px_maxbcmds: int = 0
    px_name: str = "NONAME"


@dataclasses.dataclass
class ProcInfo(_Packed):
    """`proc_usr_t` (kernel size: the CPU mask is 4 bytes)."""

    STRUCT: ClassVar[struct.Struct] = struct.Struct("<3iI3iII5i4I16sI")
    p_nr: int = 0
    p_endpoint: int = 0
    p_dcid: int = 0
    p_rts_flags: int = C.SLOT_FREE
    p_lpid: int = -1
    p_vpid: int = -1
    p_nodeid: int = -1
    p_nodemap: int = 0
    p_misc_flags: int = 0
    p_getfrom: int = C.NONE
    p_sendto: int = C.NONE
    p_waitmigr: int = C.NONE
    p_waitunbind: int = C.NONE
    p_proxy: int = C.NONE
    p_lclsent: int = 0
    p_rmtsent: int = 0
    p_lclcopy: int = 0
    p_rmtcopy: int = 0
    p_name: str = "$noname"
    p_cpumask: int = 0


for _cls in (DvsInfo, DcInfo, NodeInfo, ProxiesInfo, ProcInfo):
    assert len(_cls._codes()) == len(dataclasses.fields(_cls)), _cls
