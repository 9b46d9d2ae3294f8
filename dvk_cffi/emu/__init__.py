"""The user-space DVK: an emulated node kernel process and the client backend `EmuDvk`."""

from .client import DvkUnavailable, EmuDvk, resolve_socket
from .server import default_rundir, run_node, socket_path

__all__ = ["DvkUnavailable", "EmuDvk", "default_rundir", "resolve_socket", "run_node",
           "socket_path"]
