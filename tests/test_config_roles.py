"""Liveness settings outside the lb block, extra peer addresses, and the role a node's DSP
gets from a config (also without a block of its own, or on the LB node's id)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from dsp_proxy.config import ConfigError, format_summary, parse_text

NODES = """\
server node1 { nodeid 1; };
server node2 { nodeid 2; };
client node3 { nodeid 3; };
"""


def parse(text: str, **kw):
    return parse_text(textwrap.dedent(text), "t.cfg", **kw)


def test_liveness_defaults():
    cfg = parse("lb node0 { nodeid 0; };\n" + NODES)
    assert (cfg.fd_interval, cfg.fd_fall, cfg.fd_rise) == (500, 3, 2)
    assert (cfg.lb.fd_interval, cfg.lb.fd_fall, cfg.lb.fd_rise) == (500, 3, 2)


def test_liveness_at_top_level():
    cfg = parse("lb node0 { nodeid 0; };\n" + NODES + "fd_interval 250;\nfd_fall 6;\n")
    assert (cfg.fd_interval, cfg.fd_fall, cfg.fd_rise) == (250, 6, 2)
    assert (cfg.lb.fd_interval, cfg.lb.fd_fall) == (250, 6)      # lb.* shows the effective value
    assert cfg.warnings == ()                   # after every block: a C daemon reads it all too


def test_liveness_without_lb_block():
    cfg = parse(NODES + "fd_rise 4;\n")
    assert cfg.lb is None and (cfg.fd_interval, cfg.fd_rise) == (500, 4)


def test_lb_block_wins_over_top_level():
    cfg = parse("fd_interval 250;\nfd_fall 5;\nlb node0 { nodeid 0; fd_interval 800; };\n"
                + NODES)
    assert (cfg.fd_interval, cfg.fd_fall) == (800, 5)
    msgs = [(w.line, w.col, w.message) for w in cfg.warnings]
    assert (1, 1) in [m[:2] for m in msgs]
    assert any(m[:2] == (1, 1) and "given both at the top level and in lb block 'node0' (line 3):"
               " the lb block's value is used" in m[2] for m in msgs)
    assert any(m[:2] == (2, 1) and "the C daemon stops reading the file" in m[2] for m in msgs)


def test_top_level_liveness_errors_are_located():
    with pytest.raises(ConfigError) as info:
        parse(NODES + "fd_interval 10;\nperiod 5;\n")
    got = [(e.line, e.col, e.message) for e in info.value.issues]
    assert got[0][:2] == (4, 13) and "'fd_interval' value 10 is out of range 50..60000" in got[0][2]
    assert got[1][:2] == (5, 1) and "expected a block" in got[1][2]
    cfg = parse(NODES + "fd_fall 4;\nfd_fall 7;\n")
    assert cfg.fd_fall == 7 and "set twice" in cfg.warnings[0].message


def test_addrs_extra_peer_addresses():
    cfg = parse("""\
        server node1 { nodeid 1; addrs "10.0.0.5 fe80::1 host-b.example"; };
        client node3 { nodeid 3; addrs 192.168.1.3 192.168.2.3; };
        client node4 { nodeid 4; };
        """)
    assert cfg.node(1).extra_addrs == ("10.0.0.5", "fe80::1", "host-b.example")
    assert cfg.node(3).extra_addrs == ("192.168.1.3", "192.168.2.3")
    assert cfg.node(4).extra_addrs == ()
    with pytest.raises(ConfigError) as info:
        parse('server node1 { nodeid 1; addrs "10.0.0.5 bad_host!"; };')
    (err,) = info.value.issues
    assert (err.line, err.col) == (1, 32) and "'bad_host!' is neither an IP address nor a host" \
        in err.message
    cfg = parse('lb node0 { nodeid 0; addrs 1.2.3.4; };\n' + NODES)
    assert "it belongs in server or client blocks" in cfg.warnings[0].message


@pytest.mark.parametrize("node,kind,peers,lb_pair,text", [
    (1, "server", (2, 3), True, "node 1 is server 'node1': proxy pairs for nodes 2, 3 and the LB "
                                "node 0"),
    (3, "client", (1, 2), True, "node 3 is client 'node3': proxy pairs for nodes 1, 2 and the LB "
                                "node 0"),
    (9, "no-block", (1, 2, 3), True, "node 9 has no block of its own: proxy pairs for nodes 1, "
                                     "2, 3 and the LB node 0 (every configured node, as the C "
                                     "daemon does)"),
    (0, "lb-id", (1, 2, 3), False, "node 0 is the LB node's id: proxy pairs for nodes 1, 2, 3, "
                                   "none for the LB node 0, as the C daemon does there (this "
                                   "node does not balance)"),
])
def test_roles(node, kind, peers, lb_pair, text):
    cfg = parse("lb node0 { nodeid 0; };\n" + NODES, local_node=node)
    role = cfg.role(node)
    assert (role.kind, role.peers, role.lb_node, role.lb_pair) == (kind, peers, 0, lb_pair)
    assert f"role: {text}" in format_summary(cfg, node).splitlines()


def test_relayed_client_role_names_the_lb_host():
    cfg = parse("lb node0 { nodeid 0; cltname node3; lb_eps 200 220; };\n" + NODES
                + "client node4 { nodeid 4; };\n")
    assert cfg.role(4).relay == "node3"
    assert cfg.role(4).describe().endswith("; sessions relayed through node3")
    assert cfg.role(3).relay is None


def test_check_prints_the_role(tmp_path):
    p = tmp_path / "c.cfg"
    p.write_text("lb node0 { nodeid 0; };\n" + NODES)
    res = subprocess.run([sys.executable, "-m", "dsp_proxy", "--check", str(p), "--node", "7"],
                         capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert b"role: node 7 has no block of its own: proxy pairs for nodes 1, 2, 3 and the LB " \
           b"node 0" in res.stdout
