"""Address selection (dsp_proxy.addresses): listen and leave as C does unless `rname` asks
otherwise, and accept a peer from every address it may use.  The name service is replaced by an
/etc/hosts-style table, never the machine's own."""

from __future__ import annotations

import socket

import pytest

from dsp_proxy.addresses import listen_address, peer_addresses, resolve_all, source_address
from dsp_proxy.config import NodeConfig

#: What a Debian /etc/hosts gives: the machine's own name on 127.0.1.1.
HOSTS = {
    "debhost": ["127.0.1.1"],
    "node1": ["192.0.2.11"],
    "multi": ["192.0.2.21", "198.51.100.21", "192.0.2.21"],
    "eth1-of-multi": ["203.0.113.21"],
}
#: The addresses this (imaginary) machine owns: loopback and its one interface.
MINE = {"127.0.1.1", "127.0.0.1", "192.0.2.11"}


def resolver(host: str) -> list[str]:
    if host in HOSTS:
        return HOSTS[host]
    try:
        socket.inet_aton(host)
    except OSError:
        raise socket.gaierror(socket.EAI_NONAME, f"{host}: unknown host") from None
    return [host]


def is_local(addr: str) -> bool:
    return addr in MINE


def node(name: str, rname: str | None = None, **kw) -> NodeConfig:
    return NodeConfig(name=name, role="server", nodeid=kw.pop("nodeid", 1),
                      rname=rname or name, rname_explicit=rname is not None, **kw)


class Extra(NodeConfig):
    """A node block with extra addresses (the `addrs` keyword)."""

    extra_addrs: tuple[str, ...] = ()


def with_extra(n: NodeConfig, *extra: str):
    obj = Extra(**{f: getattr(n, f) for f in n.__dataclass_fields__})
    object.__setattr__(obj, "extra_addrs", extra)
    return obj


@pytest.mark.parametrize(("func", "want"), [(listen_address, ""), (source_address, None)])
def test_no_explicit_rname_means_all_interfaces_even_on_a_debian_host(func, want):
    me = node("debhost")              # resolves to 127.0.1.1, which is local
    assert func(me, resolver=resolver, is_local=is_local) == want


def test_explicit_rname_that_is_local_is_bound():
    me = node("n1", rname="debhost")
    assert listen_address(me, resolver=resolver, is_local=is_local) == "127.0.1.1"
    assert source_address(me, resolver=resolver, is_local=is_local) == "127.0.1.1"
    me = node("n1", rname="192.0.2.11")
    assert listen_address(me, resolver=resolver, is_local=is_local) == "192.0.2.11"


def test_explicit_rname_of_another_machine_or_unresolvable_falls_back_to_all(caplog):
    for rname in ("multi", "no-such-host"):
        me = node("n1", rname=rname)
        assert listen_address(me, resolver=resolver, is_local=is_local) == ""
        assert source_address(me, resolver=resolver, is_local=is_local) is None
    assert "no-such-host" in caplog.text and "not an address of this machine" in caplog.text


def test_no_local_block_means_all_interfaces():
    assert listen_address(None, resolver=resolver, is_local=is_local) == ""
    assert source_address(None, resolver=resolver, is_local=is_local) is None


def test_peer_addresses_are_every_a_record():
    assert peer_addresses(node("multi"), resolver) == {"192.0.2.21", "198.51.100.21"}
    assert peer_addresses(node("debhost"), resolver) == {"127.0.1.1"}
    assert peer_addresses(node("n7", rname="10.1.2.3"), resolver) == {"10.1.2.3"}


def test_multi_homed_peer_with_extra_addresses():
    peer = with_extra(node("multi"), "eth1-of-multi", "10.9.9.9")
    assert peer_addresses(peer, resolver) == {"192.0.2.21", "198.51.100.21", "203.0.113.21",
                                              "10.9.9.9"}


def test_unresolvable_names_add_nothing(caplog):
    assert peer_addresses(node("ghost"), resolver) == frozenset()
    peer = with_extra(node("ghost"), "10.0.0.5", "also-unknown")
    assert peer_addresses(peer, resolver) == {"10.0.0.5"}
    assert "ghost" in caplog.text and "also-unknown" in caplog.text


def test_real_resolver_on_literals_and_localhost():
    assert resolve_all("127.0.0.7") == ["127.0.0.7"]
    assert "127.0.0.1" in resolve_all("localhost")
    with pytest.raises(OSError):
        resolve_all("no-such-host.invalid")
