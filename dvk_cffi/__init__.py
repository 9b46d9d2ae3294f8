"""The boundary between DVS programs and the DVK: one interface (`Dvk`), two backends.

`open_dvk("auto")` gives `KernelDvk` (ioctl on /dev/dvk) when the device exists, else `EmuDvk`,
a connection to the user-space node kernel that stands in for the module on machines without it.
`open_dvk("emu-ioctl")` gives `KernelDvk` driving an emulated node through `EmuDevice`, the
emulator's ioctl-level entry: the kernel backend's code path without the kernel module.
"""

from __future__ import annotations

import os

from . import consts, errors
from .api import Buffer, Dvk
from .errors import DvkError
from .info import DcInfo, DvsInfo, NodeInfo, ProcInfo, ProxiesInfo
from .wire import Header, Message

__all__ = ["Buffer", "DcInfo", "Dvk", "DvkError", "DvsInfo", "Header", "Message", "NodeInfo",
           "ProcInfo", "ProxiesInfo", "consts", "errors", "open_dvk"]

MODES = ("auto", "kernel", "emu", "emu-ioctl")


def open_dvk(mode: str = "auto", node: int | None = None, path: str | None = None,
             answer_limit: float | None = None) -> Dvk:
    """Open this node's DVK.  `mode` auto = the kernel when /dev/dvk exists, else the emulator;
    emu-ioctl = `KernelDvk` over the emulator's ioctl-level device; `node`/`path` choose the
    emulated node kernel (default: DVK_SOCKET, DVK_NODE, the only one); `answer_limit` is
    `Dvk.limit_answers` of the calling thread, from the first call on.
    """
    if mode not in MODES:
        raise ValueError(f"DVK mode must be one of {', '.join(MODES)}, not {mode!r}")
    if mode == "auto":
        mode = "kernel" if os.path.exists(consts.DVK_FILE_NAME) else "emu"
    if mode == "kernel":
        from .kernel import KernelDvk
        return KernelDvk()
    if mode == "emu-ioctl":
        from .emu.ioctl import EmuDevice
        from .kernel import KernelDvk
        return KernelDvk(device=EmuDevice(path=path, nodeid=node, answer_limit=answer_limit))
    from .emu.client import EmuDvk
    return EmuDvk(path=path, nodeid=node, answer_limit=answer_limit)
