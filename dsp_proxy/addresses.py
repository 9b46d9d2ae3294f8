"""Which addresses the DSP listens on, leaves from, and accepts a peer from.

The C daemon listens on all interfaces, connects without choosing a source address, and takes
whoever connects to a peer's port for that peer.  The DSP does the same unless the operator
asks otherwise:

- without an explicit `rname` in the local node's block, the listener is on all interfaces
  and outgoing connections leave from the address the routing table picks.  A host name that
  resolves to a loopback alias (Debian's `/etc/hosts` maps it to 127.0.1.1) must not pin the
  listener where no other machine can reach it;
- with an explicit `rname` that resolves to an address of this machine, both are bound to it
  (the cluster-on-one-machine set-up, one loopback address per node);
- a peer may connect from any address its name resolves to (every A record) and from the
  extra addresses its block lists (`addrs`), so a multi-homed peer that leaves from another
  interface is accepted.

Every function takes the resolver (and the local-address test) as arguments so the rules can
be tested without touching the real name service.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable

from .misc import is_local_address

log = logging.getLogger("dsp.addresses")

#: A resolver: every IPv4 address a host name (or an IP literal) stands for.
Resolver = Callable[[str], Iterable[str]]


def resolve_all(host: str) -> list[str]:
    """Every IPv4 address of `host` (all A records, in the resolver's order, no duplicates);
    an IP literal gives itself.  Raises OSError when the name does not resolve."""
    seen: dict[str, None] = {}
    for info in socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM):
        seen[info[4][0]] = None
    return list(seen)


def _own_address(node, resolver: Resolver, is_local: Callable[[str], bool]) -> str | None:
    """The local node's explicit rname as an address of this machine (None otherwise)."""
    if node is None or not getattr(node, "rname_explicit", False):
        return None
    try:
        addrs = list(resolver(node.rname))
    except OSError as exc:
        log.warning("rname %s of node %s does not resolve (%s): using all interfaces",
                    node.rname, node.name, exc)
        return None
    for addr in addrs:
        if is_local(addr):
            return addr
    log.warning("rname %s of node %s (%s) is not an address of this machine: using all "
                "interfaces", node.rname, node.name, ", ".join(addrs) or "no address")
    return None


def listen_address(local_node, resolver: Resolver = resolve_all,
                   is_local: Callable[[str], bool] = is_local_address) -> str:
    """The address the RPROXY listeners bind: "" (all interfaces) unless the local node's block
    gives an explicit `rname` that resolves to an address of this machine."""
    return _own_address(local_node, resolver, is_local) or ""


def source_address(local_node, resolver: Resolver = resolve_all,
                   is_local: Callable[[str], bool] = is_local_address) -> str | None:
    """The address outgoing connections bind before connecting: None (the routing table
    chooses) unless the local node's block gives an explicit, local `rname`."""
    return _own_address(local_node, resolver, is_local)


def peer_addresses(node, resolver: Resolver = resolve_all) -> frozenset[str]:
    """Every address node `node` may connect from: all addresses of its `rname` plus every
    address of each entry of its extra addresses (names or literals).  A name that does not
    resolve adds nothing (logged); the result may be empty."""
    out: set[str] = set()
    for host in (node.rname, *getattr(node, "extra_addrs", ())):
        try:
            out.update(resolver(host))
        except OSError as exc:
            log.warning("address %s of node %s does not resolve: %s", host, node.name, exc)
    return frozenset(out)
