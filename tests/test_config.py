"""Tests of dsp_proxy.config: the project's examples, the C reference files, and broken configs
whose every error must name its file, line and column (docs/config.md)."""

from __future__ import annotations

import dataclasses
import pickle
import textwrap
from pathlib import Path

import pytest

from dsp_proxy import config as cfgmod
from dsp_proxy.config import ConfigError, Issue, format_summary, load, parse_text
from dvk_cffi.info import DvsInfo

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


DATA = REPO / "tests" / "data"          # configs in the shapes of the C daemon's own files


def parse(text: str, **kw) -> cfgmod.Config:
    return parse_text(textwrap.dedent(text), "t.cfg", **kw)


def errors_of(text: str, **kw) -> list[Issue]:
    with pytest.raises(ConfigError) as info:
        parse(text, **kw)
    return list(info.value.issues)


# --------------------------------------------------------------------------------------------
# The project's examples
# --------------------------------------------------------------------------------------------


def test_example_node1_values():
    cfg = load(EXAMPLES / "dsp_node1.cfg", local_node=1)
    lb = cfg.lb
    assert (lb.name, lb.nodeid, lb.lowwater, lb.highwater) == ("node0", 0, 30, 70)
    assert (lb.period, lb.hello_time, lb.start, lb.stop) == (30, 30, 60, 60)
    assert (lb.min_servers, lb.max_servers) == (1, 2)
    assert (lb.cltname, lb.svrname) == ("node0", "node0")
    assert (lb.session_timeout, lb.max_sessions) == (300, 157)
    assert (lb.fd_interval, lb.fd_fall, lb.fd_rise, lb.lb_eps) == (500, 3, 2, (200, 220))
    assert (lb.ssh_host, lb.ssh_user, lb.ssh_pass) == ("192.168.0.196", "Admin", "change-me")
    assert (lb.vm_start, lb.vm_stop, lb.vm_status) == ("start_vm.bat", "stop_vm.bat",
                                                       "list_vm.bat")
    assert [n.nodeid for n in cfg.servers] == [1, 2]
    assert [n.name for n in cfg.clients] == ["node11", "node12", "node13"]
    n1 = cfg.node(1)
    assert n1.node_image == "E:\\NODE1\\node1.vmx"          # unescaped: E:\NODE1\node1.vmx
    assert cfg.node(2).node_image == r"E:\NODE2\node2.vmx"
    assert (n1.role, n1.rname, n1.rname_explicit, n1.proto) == ("server", "192.168.0.101",
                                                                True, "tcp")
    assert (n1.compress, n1.batch, n1.autobind) == (False, False, False)
    assert cfg.node(12).rport == 3012 and cfg.node(12).sport == 3001
    assert [p.nodeid for p in cfg.peers(1)] == [2, 11, 12, 13]
    assert cfg.rport(1, 13) == 3013 and cfg.sport(1, 13) == 3001
    lat, ftp = cfg.services
    assert (lat.name, lat.dcid, lat.ext_ep, lat.min_ep, lat.max_ep) == ("latency", 0, 10, 10, 19)
    assert (lat.bind, lat.prog) == ("replica", "/usr/src/dvs/dvs-apps/dvs_lb/run_latency.sh")
    assert lat.bind_type == 4
    assert (ftp.name, ftp.bind, ftp.prog, ftp.min_ep, ftp.max_ep) == ("m3ftp", "external", None,
                                                                      20, 29)
    # the only warning: endpoint 29 is not a system endpoint
    assert [w.line for w in cfg.warnings] == [123]
    assert "29..29 are not system endpoints" in cfg.warnings[0].message
    assert cfg.find_service(0, 15) is lat and cfg.find_service(1, 15) is None
    assert cfg.service("M3FTP") is ftp and cfg.service_dcids == (0,)


def test_example_node2_values_and_port_scheme():
    cfg = load(EXAMPLES / "dsp_node2.cfg", local_node=2)
    assert [w.message for w in cfg.warnings if "port scheme" in w.message] == []
    assert {n.sport for n in cfg.peers(2)} == {3002}
    assert cfg.rport(2, 1) == 3001 and cfg.sport(2, 1) == 3002
    # the same file read as if node 1 ran it: each explicit sport breaks the scheme
    other = load(EXAMPLES / "dsp_node2.cfg", local_node=1)
    msgs = [w.message for w in other.warnings if "port scheme" in w.message]
    assert len(msgs) == 4 and all("expects 3001" in m for m in msgs)


def test_example_cluster_defaults():
    cfg = load(EXAMPLES / "cluster.cfg")
    assert cfg.lb.nodeid == 0 and cfg.lb.svrname == "node0" and cfg.lb.cltname == "node0"
    assert cfg.lb.vm_start is None and cfg.lb.ssh_host is None and cfg.lb.ssh_pass is None
    assert cfg.lb.max_servers == 2 and cfg.lb.min_servers == 1 and cfg.lb.lb_eps is None
    assert [(n.nodeid, n.role, n.rname) for n in cfg.nodes] == [
        (1, "server", "127.0.10.1"), (2, "server", "127.0.10.2"),
        (3, "client", "127.0.10.3"), (4, "client", "127.0.10.4")]
    assert all(n.rport is None and n.sport is None for n in cfg.nodes)
    # default ports: L listens for P on 3000+P, reaches P at P:3000+L
    assert cfg.rport(3, 1) == 3001 and cfg.sport(3, 1) == 3003
    assert cfg.rport(1, 4) == 3004 and cfg.sport(1, 4) == 3001
    assert cfg.rport(3, 0) == 3000 and cfg.sport(3, 0) == 3003        # the LB node
    assert [(s.name, s.dcid, s.ext_ep, s.min_ep, s.max_ep, s.bind) for s in cfg.services] == [
        ("latency", 0, 10, 10, 19, "external"), ("m3ftp", 0, 20, 20, 28, "external")]
    assert cfg.local_node_by_address(["10.0.0.1", "127.0.10.3"]).name == "node3"
    assert cfg.local_node_by_address(["127.0.0.1"]) is None
    with pytest.raises(ValueError):
        cfg.local_node_by_address(["127.0.10.1", "127.0.10.2"])
    assert cfg.rname(2) == "127.0.10.2"
    with pytest.raises(KeyError):
        cfg.node(0)
    for local in (1, 2, 3, 4):
        assert not [w for w in load(EXAMPLES / "cluster.cfg", local_node=local).warnings
                    if "port" in w.message]


def test_examples_are_frozen():
    cfg = load(EXAMPLES / "cluster.cfg")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lb.nodeid = 5
    with pytest.raises(TypeError):
        cfg.nodes_by_id[7] = cfg.nodes[0]


# --------------------------------------------------------------------------------------------
# The C reference files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,local,sport", [("c_node1.cfg", 1, 3001),
                                               ("c_node2.cfg", 2, 3002)])
def test_c_shaped_node_files_pass(name, local, sport):
    cfg = load(DATA / name, local_node=local)
    assert len(cfg.servers) == 2 and len(cfg.clients) == 3 and len(cfg.services) == 2
    assert cfg.lb.ssh_pass == "tatooine" and cfg.lb.max_servers == 2
    assert (cfg.lb.lowwater, cfg.lb.highwater, cfg.lb.period, cfg.lb.hello_time) == (25, 75, 20,
                                                                                      20)
    assert cfg.node(1).node_image == r"D:\VMS\alpha1.vmx"
    assert {n.sport for n in cfg.peers(local)} == {sport}
    echo, files = cfg.services
    assert (echo.prog, echo.bind, files.bind, files.max_ep) == (
        "/opt/dvs/bin/start_echo.sh", "replica", "external", 29)
    texts = [(w.line, w.message) for w in cfg.warnings]
    assert [t for _, t in texts if "obsolete" in t] == ["'cltdev' is obsolete and ignored",
                                                        "'svrdev' is obsolete and ignored"]
    assert any("cltname 'front0' names no node of this file" in t for _, t in texts)
    assert any(line == 106 and "29..29 are not system endpoints" in t for line, t in texts)
    assert not any("port scheme" in t for _, t in texts) and len(texts) == 4
    with pytest.raises(ConfigError):
        load(DATA / name, local_node=local, strict=True)


def test_c_shaped_balancer_file_passes():
    cfg = load(DATA / "c_lb_dvs.cfg")
    assert [n.nodeid for n in cfg.nodes] == [1, 2, 11, 12, 13]
    assert cfg.node(2).node_image == r"D:\VMS\Ubuntu 22.04.vmx"
    assert all(n.rport is None and n.sport is None and not n.batch for n in cfg.nodes)
    assert cfg.services[0].prog == "/opt/dvs/bin/start_echo.sh"


def test_c_shaped_seed_sample_duplicate_ids():
    path = DATA / "c_seed.cfg"
    with pytest.raises(ConfigError) as info:
        load(path)
    errs = info.value.issues
    assert [(e.line, e.col) for e in errs] == [(43, 11), (80, 11)]
    assert "duplicate node id 1" in errs[0].message and "line 31" in errs[0].message
    assert "'alpha1'" in errs[0].message and "'alpha2'" in errs[0].message
    assert "duplicate node id 12" in errs[1].message and "line 69" in errs[1].message
    assert "'gamma12'" in errs[1].message and "'gamma13'" in errs[1].message
    assert "the C daemon would let this block silently overwrite 'gamma12'" in errs[1].message
    assert f"{path}:43:11: error: duplicate node id 1" in str(info.value)
    assert [w.line for w in info.value.warnings if "proxyid" in w.message] == [31, 43]
    copy = pickle.loads(pickle.dumps(info.value))
    assert copy.issues == info.value.issues and str(copy) == str(info.value)


# --------------------------------------------------------------------------------------------
# Broken configs: (id, text, expected message part, line, column)
# --------------------------------------------------------------------------------------------

# lines 1-2 of the service cases (indented like the case texts, which are dedented)
LB_SRV = "        lb node0 { nodeid 0; };\n        server node1 { nodeid 1; };\n"

BROKEN = [
    ("missing-semicolon-between-statements", """\
        lb node0 {
          nodeid 0;
          ssh_host h;
          ssh_pass x
          vm_start "y";
        };
        server node1 { nodeid 1; };
        """, "expected ';' after the value of 'ssh_pass'", 5, 3),
    ("missing-semicolon-value-shown", """\
        server node1 {
          nodeid 1
          rport 3001;
        };
        """, "expected ';' after 'nodeid 1', found 'rport'", 3, 3),
    ("missing-semicolon-after-brace", """\
        lb node0 {
          nodeid 0;
        }
        server node1 { nodeid 1; };
        """, "expected ';' after the '}' of lb block 'node0', found 'server'", 4, 1),
    ("keyword-without-value", """\
        server node1 {
          nodeid;
        };
        """, "'nodeid' needs a value", 2, 3),
    ("keyword-without-value-then-keyword", """\
        lb node0 {
          nodeid 0;
          ssh_pass
          ssh_host h;
        };
        server node1 { nodeid 1; };
        """, "'ssh_pass' needs a value", 3, 3),
    ("lb-eps-one-value", """\
        lb node0 {
          nodeid 0;
          lb_eps 40;
        };
        server node1 { nodeid 1; };
        """, "'lb_eps' needs two values: MIN MAX", 3, 3),
    ("hex-int", """\
        server node1 {
          nodeid 0x1;
        };
        """, "'nodeid' expects a decimal integer, found '0x1' (only decimal", 2, 10),
    ("int-word", """\
        lb node0 {
          nodeid 0;
          period abc;
        };
        server node1 { nodeid 1; };
        """, "'period' expects a decimal integer, found 'abc'", 3, 10),
    ("nodeid-out-of-range", """\
        server node1 {
          nodeid 32;
        };
        """, "'nodeid' value 32 is out of range 0..31", 2, 10),
    ("port-out-of-range", """\
        server node1 {
          nodeid 1;
          sport 2999;
        };
        """, "'sport' value 2999 is out of range 3000..3031", 3, 9),
    ("lowwater-out-of-range", """\
        lb node0 {
          nodeid 0;
          lowwater 101;
        };
        server node1 { nodeid 1; };
        """, "'lowwater' value 101 is out of range 0..100", 3, 12),
    ("period-zero", """\
        lb node0 {
          nodeid 0;
          period 0;
        };
        server node1 { nodeid 1; };
        """, "'period' value 0 is out of range 1..3600", 3, 10),
    ("min-servers-zero", """\
        lb node0 {
          nodeid 0;
          min_servers 0;
        };
        server node1 { nodeid 1; };
        """, "'min_servers' value 0 is out of range 1..32", 3, 15),
    ("dcid-out-of-range", LB_SRV + """\
        service a {
          dcid 32;
          ext_ep 10;
        };
        """, "'dcid' value 32 is out of range 0..31", 4, 8),
    ("endpoint-out-of-range", LB_SRV + """\
        service a {
          ext_ep 221;
        };
        """, "'ext_ep' value 221 is out of range 0..220", 4, 10),
    ("lowwater-gt-highwater", """\
        lb node0 {
          nodeid 0;
          lowwater 80;
          highwater 50;
        };
        server node1 { nodeid 1; };
        """, "lowwater 80 is greater than highwater 50", 4, 13),
    ("min-gt-max-servers", """\
        lb node0 {
          nodeid 0;
          min_servers 2;
          max_servers 1;
        };
        server node1 { nodeid 1; };
        server node2 { nodeid 2; };
        """, "min_servers 2 is greater than max_servers 1", 3, 15),
    ("max-servers-gt-servers", """\
        lb node0 {
          nodeid 0;
          max_servers 3;
        };
        server node1 { nodeid 1; };
        server node2 { nodeid 2; };
        """, "max_servers 3 exceeds the number of server blocks (2)", 3, 15),
    ("duplicate-id-server-server", """\
        server node1 {
          nodeid 1;
        };
        server node2 {
          nodeid 1;
        };
        """, "duplicate node id 1: server block 'node2' reuses the id given to server block "
             "'node1' at line 2", 5, 10),
    ("duplicate-id-client-client-proxyid", """\
        client node3 { nodeid 3; };
        client node4 { proxyid 3; };
        """, "duplicate node id 3: client block 'node4' reuses the id given to client block "
             "'node3' at line 1", 2, 24),
    ("duplicate-id-lb-server", """\
        lb node0 {
          nodeid 1;
        };
        server node1 {
          nodeid 1;
        };
        """, "duplicate node id 1: server block 'node1' reuses the id given to lb block "
             "'node0' at line 2", 5, 10),
    ("duplicate-service-name", LB_SRV + """\
        service latency { ext_ep 10; };
        service Latency { ext_ep 11; };
        """, "duplicate service name 'Latency': service 'latency' is at line 3", 4, 9),
    ("duplicate-ext-ep", LB_SRV + """\
        service a { dcid 0; ext_ep 10; };
        service b { dcid 0; ext_ep 10; };
        """, "duplicate ext_ep 10 in DC 0: service 'a' (line 3)", 4, 28),
    ("duplicate-ext-ep-any-dc", LB_SRV + """\
        service a { dcid 0; ext_ep 10; };
        service b { ext_ep 10; };
        """, "duplicate ext_ep 10 in DC 0", 4, 20),
    ("overlapping-ranges", LB_SRV + """\
        service a {
          dcid 0; ext_ep 10; min_ep 10; max_ep 19;
        };
        service b {
          dcid 0;
          ext_ep 15;
          min_ep 15;
          max_ep 25;
        };
        """, "endpoints 15..25 of service 'b' overlap 10..19 of service 'a' (line 3)", 9, 10),
    ("min-ep-without-max-ep", LB_SRV + """\
        service a {
          ext_ep 10;
          min_ep 10;
        };
        """, "'min_ep' needs 'max_ep' too", 5, 3),
    ("missing-ext-ep", LB_SRV + """\
        service a {
          dcid 0;
        };
        """, "service block 'a' has no ext_ep", 3, 1),
    ("missing-lb-nodeid", """\
        lb node0 {
          period 30;
        };
        server node1 { nodeid 1; };
        """, "lb block 'node0' has no nodeid", 1, 1),
    ("missing-server-nodeid", """\
        server node1 {
          rport 3001;
        };
        """, "server block 'node1' has no nodeid", 1, 1),
    ("bad-bind", LB_SRV + """\
        service a { ext_ep 10; bind Replica; prog "/x.sh"; };
        """, "'bind' expects replica, local, backup or external, found 'Replica'", 3, 29),
    ("unquoted-prog", LB_SRV + """\
        service a {
          ext_ep 10;
          bind replica;
          prog /usr/bin/run.sh;
        };
        """, "'prog' expects a quoted string, found '/usr/bin/run.sh'", 6, 8),
    ("unterminated-string", """\
        lb node0 {
          nodeid 0;
          vm_start "start_vm.bat;
          vm_stop "stop_vm.bat";
        };
        server node1 { nodeid 1; };
        """, "string not closed before the end of line", 3, 12),
    ("bad-hex-escape", """\
        server node1 {
          nodeid 1;
          rname "a\\xZZ";
        };
        """, "bad escape '\\x'", 3, 9),
    ("bad-character", """\
        server node1 {
          nodeid 1,
        };
        """, "unexpected character ','", 2, 11),
    ("eof-inside-block", """\
        lb node0 { nodeid 0; };
        server node1 {
          nodeid 1;
        """, "expected '}' to close server block 'node1' (opened at line 2), found end of file",
     4, 1),
    ("unclosed-block-before-next", """\
        server node1 {
          nodeid 1;
        server node2 {
          nodeid 2;
        };
        """, "expected '}' to close server block 'node1' (opened at line 1), found 'server'",
     3, 1),
    ("unmatched-close-brace", """\
        server node1 { nodeid 1; };
        };
        """, "unmatched '}'", 2, 1),
    ("brace-without-kind", """\
        server node1 { nodeid 1; };
        { nodeid 2; };
        """, "'{' without a block kind", 2, 1),
    ("unknown-block-kind", """\
        proxy node1 {
          proxyid 1;
        };
        """, "unknown block kind 'proxy': expected 'lb', 'server', 'client' or 'service'", 1, 1),
    ("block-without-brace", """\
        server node1;
        """, "expected '{' after 'server node1', found ';'", 1, 13),
    ("block-without-name", """\
        server {
          nodeid 1;
        };
        """, "expected a name after 'server'", 1, 8),
    ("two-peers-one-rport", """\
        server node1 { nodeid 1; rport 3001; };
        server node2 { nodeid 2; rport 3001; };
        """, "inconsistent ports: server block 'node2' listens on rport 3001, already the rport "
             "of server block 'node1' (line 1)", 2, 32),
    ("explicit-rport-on-default-of-other", """\
        server node1 {
          nodeid 1;
          rport 3005;
        };
        client node5 {
          nodeid 5;
        };
        """, "inconsistent ports: server block 'node1' listens on rport 3005", 3, 9),
    ("vm-start-missing", """\
        lb node0 {
          nodeid 0;
          vm_stop "stop.sh";
        };
        server node1 {
          nodeid 1;
          node_image "n1.img";
        };
        """, "lb block 'node0' must set vm_start, vm_status: server block 'node1' (line 5) has "
             "a node_image", 1, 1),
    ("node-image-without-lb", """\
        server node1 {
          nodeid 1;
          node_image "n1.img";
        };
        """, "has node_image but there is no lb block", 3, 3),
    ("hello-time-gt-period", """\
        lb node0 {
          nodeid 0;
          period 10;
          hello_time 20;
        };
        server node1 { nodeid 1; };
        """, "hello_time 20 is greater than period 10", 4, 14),
    ("lb-eps-out-of-range", """\
        lb node0 {
          nodeid 0;
          lb_eps 10 40;
        };
        server node1 { nodeid 1; };
        """, "'lb_eps' value 10 is out of range 29..220", 3, 10),
    ("lb-eps-reversed", """\
        lb node0 {
          nodeid 0;
          lb_eps 100 50;
        };
        server node1 { nodeid 1; };
        """, "'lb_eps' MAX 50 is smaller than MIN 100", 3, 14),
    ("services-without-lb", """\
        server node1 { nodeid 1; };
        service a { ext_ep 10; };
        """, "service 'a' needs an lb block", 2, 1),
    ("lb-without-server", """\
        lb node0 { nodeid 0; };
        client node3 { nodeid 3; };
        """, "lb block 'node0' needs at least one server block", 1, 1),
    ("two-lb-blocks", """\
        lb node0 { nodeid 0; };
        lb node9 { nodeid 9; };
        server node1 { nodeid 1; };
        """, "only one lb block is allowed: lb block 'node0' is at line 1", 2, 1),
]


@pytest.mark.parametrize("text,message,line,col", [c[1:] for c in BROKEN],
                         ids=[c[0] for c in BROKEN])
def test_broken_config(text, message, line, col):
    errs = errors_of(text)
    shown = "\n".join(str(e) for e in errs)
    assert len(errs) == 1, f"expected exactly one error, got:\n{shown}"
    err = errs[0]
    assert message in err.message, shown
    assert (err.line, err.col) == (line, col), shown
    assert str(err).startswith(f"t.cfg:{line}:{col}: error: ")


def test_broken_table_is_large_enough():
    assert len(BROKEN) >= 30
    assert len({c[0] for c in BROKEN}) == len(BROKEN)


# --------------------------------------------------------------------------------------------
# Constructs the C daemon accepts: (id, text, severity, message part, line, col, check)
# A "warning" is accepted with the C meaning (`check` asserts it) and is an error with strict=True;
# an "error" is where the C reading would silently lose or change a setting: it says what C does.
# --------------------------------------------------------------------------------------------

SRV = "        server node1 { nodeid 1; };\n"

COMPAT = [
    ("unknown-keyword", """\
        lb node0 {
          nodeid 0;
          lowater 30;
        };
        """ + SRV, "warning", "unknown keyword 'lowater' in lb block 'node0' (did you mean "
     "'lowwater'?)", 3, 3, lambda c: c.lb.lowwater == 30),
    ("unknown-keyword-then-keyword", """\
        server node1 { bogus nodeid 1; };
        """, "warning", "ignored up to 'nodeid', which is read", 1, 16,
     lambda c: c.node(1).name == "node1"),
    ("keyword-of-other-block", """\
        server node1 { nodeid 1; };
        client node3 {
          nodeid 3;
          node_image "x.vmx";
        };
        """, "warning", "unknown keyword 'node_image' in client block 'node3' (it belongs in "
     "server", 4, 3, lambda c: c.node(3).node_image is None),
    ("double-slash-text", """\
        server node1 {
          nodeid 1; // the node id
          batch YES;
        };
        """, "warning", "'//' does not start a comment (use '#')", 2, 13,
     lambda c: c.node(1).batch is True),
    ("hash-glued-to-semicolon", """\
        server node1 {
          nodeid 1;#note
          batch YES;
        };
        """, "warning", "'#note' is not a comment", 2, 12, lambda c: c.node(1).batch),
    ("yes-no-prefix", """\
        server node1 {
          nodeid 1;
          batch Yesterday;
          compress nope;
        };
        """, "warning", "'batch' expects YES or NO, found 'Yesterday': read as YES", 3, 9,
     lambda c: (c.node(1).batch, c.node(1).compress) == (True, False)),
    ("number-with-suffix", """\
        lb node0 {
          nodeid 0;
          period 30s;
        };
        """ + SRV, "warning", "'period' expects a decimal integer, found '30s': read as 30",
     3, 10, lambda c: c.lb.period == 30),
    ("port-with-suffix", """\
        server node1 {
          nodeid 1;
          rport 3001abc;
        };
        """, "warning", "'rport' expects a decimal integer, found '3001abc': read as 3001", 3, 9,
     lambda c: c.node(1).rport == 3001),
    ("hex-number", """\
        server node1 {
          nodeid 0x1;
        };
        """, "error", "found '0x1' (only decimal numbers are accepted; the C daemon would read "
     "it as 0)", 2, 10, None),
    ("fraction", """\
        lb node0 {
          nodeid 0;
          period 1.5;
        };
        """ + SRV, "error", "the C daemon would read it as 1: write a whole number", 3, 10, None),
    ("word-as-number", """\
        server node1 {
          nodeid one;
        };
        """, "error", "'nodeid' expects a decimal integer, found 'one' (the C daemon would "
     "read it as 0)", 2, 10, None),
    ("unknown-proto", """\
        server node1 {
          nodeid 1;
          proto sctp;
        };
        """, "warning", "'proto' expects tcp, found 'sctp': ignored, tcp is used", 3, 9,
     lambda c: c.node(1).proto == "tcp"),
    ("proto-prefix", """\
        server node1 {
          nodeid 1;
          proto TCP/IP;
        };
        """, "warning", "proto 'TCP/IP' is read as tcp", 3, 9,
     lambda c: c.node(1).proto == "tcp"),
    ("bind-without-prog", """\
        lb node0 { nodeid 0; };
        server node1 { nodeid 1; };
        service a {
          ext_ep 10;
          bind replica;
        };
        """, "warning", "bind replica needs a 'prog' to start the service: without one the "
     "service is external", 5, 8, lambda c: c.services[0].bind == "external"),
    ("overlapping-ranges", """\
        lb node0 { nodeid 0; };
        server node1 { nodeid 1; };
        service a { dcid 0; ext_ep 10; min_ep 10; max_ep 19; };
        service b { dcid 0; ext_ep 25; min_ep 15; max_ep 25; };
        """, "warning", "endpoints 15..25 of service 'b' overlap 10..19 of service 'a' (line 3) "
     "in DC 0: an endpoint in both belongs to 'a'", 4, 39,
     lambda c: c.find_service(0, 16).name == "a" and c.find_service(0, 25).name == "b"),
    ("ext-ep-outside-range", """\
        lb node0 { nodeid 0; };
        server node1 { nodeid 1; };
        service a { ext_ep 5; min_ep 10; max_ep 19; };
        """, "warning", "ext_ep 5 is outside min_ep..max_ep 10..19", 3, 20,
     lambda c: c.find_service(0, 5).name == "a" and c.find_service(0, 12).name == "a"),
    ("min-ep-gt-max-ep", """\
        lb node0 { nodeid 0; };
        server node1 { nodeid 1; };
        service a { ext_ep 10; min_ep 19; max_ep 10; };
        """, "warning", "min_ep 19 is greater than max_ep 10: the range is empty", 3, 31,
     lambda c: (c.services[0].min_ep, c.services[0].max_ep) == (10, 10)),
    ("endpoint-outside-c-bitmap", """\
        lb node0 { nodeid 0; };
        server node1 { nodeid 1; };
        service a { ext_ep 5; min_ep 5; max_ep 6; };
        """, None, "", 0, 0, lambda c: c.services[0].max_ep == 6),
    ("duplicate-block-name", """\
        server node1 { nodeid 1; };
        client node1 { nodeid 3; };
        """, "warning", "duplicate node name 'node1': already used by server block at line 1 "
     "(both blocks are kept", 2, 8, lambda c: [n.nodeid for n in c.nodes] == [1, 3]),
    ("last-brace-without-semicolon", """\
        server node1 { nodeid 1; }
        """, "warning", "expected ';' after the '}' of server block 'node1', found end of file "
     "(accepted", 2, 1, lambda c: c.node(1).name == "node1"),
    ("brace-without-semicolon-before-block", """\
        server node1 { nodeid 1; }
        server node2 { nodeid 2; };
        """, "error", "expected ';' after the '}' of server block 'node1', found 'server' (the "
     "C daemon would take the block that follows as part of this statement and ignore it)",
     2, 1, None),
    ("text-after-brace", """\
        server node1 { nodeid 1; } trailing words;
        """, "warning", "text after the '}' of server block 'node1' is ignored", 1, 28,
     lambda c: c.node(1).nodeid == 1),
    ("long-name", """\
        server averyveryverylongname { nodeid 1; };
        """, "warning", "node name 'averyveryverylongname' is too long: at most 15 characters "
     "(the kernel's names are 16 bytes); the kernel gets 'averyveryverylo'", 1, 8,
     lambda c: (c.node(1).name, c.node(1).kernel_name) == ("averyveryverylongname",
                                                            "averyveryverylo")),
    ("long-names-that-clash", """\
        server averyveryverylongname1 { nodeid 1; };
        server averyveryverylongname2 { nodeid 2; };
        """, "error", "are the same in their first 15 bytes: the kernel (and the C daemon) would "
     "see two nodes named 'averyveryverylo'", 2, 8, None),
    ("proxyid-after-nodeid", """\
        server node1 {
          nodeid 1;
          proxyid 2;
        };
        """, "warning", "'proxyid' is ignored: 'nodeid' is given at line 2", 3, 3,
     lambda c: c.node(1).nodeid == 1),
    ("nodeid-not-first", """\
        server node1 {
          batch YES;
          nodeid 1;
        };
        """, "warning", "'nodeid' should be the first keyword of server block 'node1': the C "
     "daemon stops reading the file at 'batch'", 2, 3, lambda c: c.node(1).batch),
    ("keyword-twice", """\
        server node1 {
          nodeid 1;
          batch YES;
          batch NO;
        };
        """, "warning", "'batch' is set twice in server block 'node1': first at line 3; the later "
     "value is used", 4, 3, lambda c: c.node(1).batch is False),
    ("nodeid-twice", """\
        server node1 {
          nodeid 1;
          nodeid 2;
        };
        """, "error", "'nodeid' is set twice in server block 'node1': first at line 2 (the C "
     "daemon stops reading the file here)", 3, 3, None),
    ("missing-semicolon-swallows-statement", """\
        server node1 {
          nodeid 1
          rport 3001;
        };
        """, "error", "expected ';' after 'nodeid 1', found 'rport' (the C daemon reads one "
     "keyword per statement and would ignore 'rport')", 3, 3, None),
    ("extra-words-after-number", """\
        server node1 {
          nodeid 1 extra;
        };
        """, "warning", "expected ';' after 'nodeid 1', found 'extra': the rest of the statement "
     "is ignored", 2, 12, lambda c: c.node(1).nodeid == 1),
    ("unquoted-text-with-space", """\
        lb node0 {
          nodeid 0;
          vm_start start.sh -v;
        };
        """ + SRV, "error", "the C daemon would take only 'start.sh' as the value", 3, 21, None),
    ("duplicate-node-id-overwrites", """\
        client node3 { nodeid 3; };
        client node4 { nodeid 3; };
        """, "error", "duplicate node id 3: client block 'node4' reuses the id given to client "
     "block 'node3' at line 1 (the C daemon would let this block silently overwrite 'node3')",
     2, 23, None),
    ("sub-list-statement", """\
        server node1 {
          nodeid 1;
          options { fast; };
        };
        """, "warning", "unknown keyword 'options' in server block 'node1'", 3, 3,
     lambda c: c.node(1).nodeid == 1),
    ("sub-list-as-value", """\
        server node1 {
          nodeid { 1 };
        };
        """, "error", "'nodeid' expects a value, found '{' (the C daemon stops reading", 2, 3,
     None),
    ("empty-string-value", """\
        lb node0 {
          nodeid 0;
          vm_start "";
        };
        """ + SRV, "warning", "'vm_start' must not be empty: treated as not set", 3, 12,
     lambda c: c.lb.vm_start is None),
    ("string-block-kind-and-name", """\
        "server" "node1" { nodeid "1"; };
        """, None, "", 0, 0, lambda c: c.node(1).name == "node1"),
    ("cltname-names-no-node", """\
        lb node0 { nodeid 0; cltname client0; };
        server node1 { nodeid 1; };
        client client1 { nodeid 11; };
        """, "warning", "cltname 'client0' names no node of this file (did you mean 'client1'?)",
     1, 30, lambda c: c.lb.cltname == "client0"),
    ("include", """\
        include other.cfg;
        server node1 { nodeid 1; };
        """, "error", "'include' is not supported: copy the blocks of that file here", 1, 1,
     None),
    ("liveness-at-top-level-first", """\
        fd_interval 200;
        server node1 { nodeid 1; };
        """, "warning", "'fd_interval' outside a block: the C daemon stops reading the file at "
     "a statement outside a block", 1, 1, lambda c: c.fd_interval == 200),
]


@pytest.mark.parametrize("text,severity,message,line,col,check", [c[1:] for c in COMPAT],
                         ids=[c[0] for c in COMPAT])
def test_c_compatible_constructs(text, severity, message, line, col, check):
    if severity == "error":
        errs = errors_of(text)
        shown = "\n".join(str(e) for e in errs)
        assert len(errs) == 1, shown
        assert message in errs[0].message and (errs[0].line, errs[0].col) == (line, col), shown
        return
    cfg = parse(text)
    shown = "\n".join(str(w) for w in cfg.warnings)
    assert check(cfg), shown
    if severity is None:
        assert not cfg.warnings, shown
        return
    hits = [w for w in cfg.warnings if message in w.message]
    assert [(w.line, w.col) for w in hits] == [(line, col)], shown
    with pytest.raises(ConfigError) as info:                 # --check --strict
        parse(text, strict=True)
    strict = [e for e in info.value.issues if message in e.message]
    assert [(e.line, e.col, e.severity) for e in strict] == [(line, col, "error")]


def test_compat_table_covers_the_c_constructs():
    ids = {c[0] for c in COMPAT}
    assert len(ids) == len(COMPAT) >= 30
    for needed in ("unknown-keyword", "double-slash-text", "yes-no-prefix", "number-with-suffix",
                   "unknown-proto", "bind-without-prog", "overlapping-ranges",
                   "ext-ep-outside-range", "duplicate-block-name",
                   "last-brace-without-semicolon", "long-name", "proxyid-after-nodeid",
                   "missing-semicolon-swallows-statement", "duplicate-node-id-overwrites"):
        assert needed in ids


def test_all_errors_reported_at_once():
    text = """\
        lb node0 {
          nodeid 0;
          lowwater 130;
          bogus 1;
        }
        server node1 {
          nodeid 1;
          batch maybe;
        };
        server node2 {
          nodeid 1;
        };
        service a { ext_ep 10; bind local; };
        """
    with pytest.raises(ConfigError) as info:
        parse(text)
    errs = info.value.issues
    got = [(e.line, e.col) for e in errs]
    assert got == [(3, 12), (6, 1), (8, 9), (11, 10)]
    assert "out of range 0..100" in errs[0].message
    assert "expected ';' after the '}'" in errs[1].message
    assert "expects YES or NO" in errs[2].message
    assert "duplicate node id 1" in errs[3].message
    warns = info.value.warnings                       # C-compatible: reported, not fatal
    assert [(w.line, w.col) for w in warns] == [(4, 3), (13, 29)]
    assert "unknown keyword 'bogus'" in warns[0].message
    assert "bind local needs a 'prog'" in warns[1].message
    lines = str(info.value).splitlines()
    assert len(lines) == 6 and lines[0].startswith("t.cfg:3:12: error: ")


# --------------------------------------------------------------------------------------------
# Language details
# --------------------------------------------------------------------------------------------


def test_lexical_rules():
    cfg = parse("""\
        # comment in column 1
            # indented comment
        lb node0{nodeid 0; # a comment needs white space before '#'
          cltname a#b;          # '#' inside a word is part of it
          vm_start 'it\\'s "quoted"';
          vm_stop "\\x41\\101\\s\\\\z";
          vm_status C:\\vm\\n1.vmx;  # words keep backslashes as they are
        };
        server node1 { nodeid "1"; batch yes; compress No; autobind YES; proto TCP };
        """)
    assert cfg.lb.cltname == "a#b"
    assert cfg.lb.vm_start == "it's \"quoted\""
    assert cfg.lb.vm_stop == "AA \\z"
    assert cfg.lb.vm_status == "C:\\vm\\n1.vmx"
    n = cfg.node(1)
    assert (n.nodeid, n.batch, n.compress, n.autobind, n.proto) == (1, True, False, True, "tcp")
    # as in the C reader, '#' glued to a token is a word: the words up to the keyword are ignored
    cfg = parse("server node1 {nodeid 1;#glued note\n batch YES;};\n")
    assert cfg.node(1).batch and "'#glued' is not a comment" in cfg.warnings[0].message


def test_last_statement_may_omit_semicolon():
    cfg = parse("""\
        lb node0 { nodeid 0 };
        server node1 {
          nodeid 1;
          rname 127.0.0.5
        };
        service s { ext_ep 5; bind replica; prog "/bin/x" };
        """)
    assert cfg.node(1).rname == "127.0.0.5" and cfg.services[0].prog == "/bin/x"
    assert cfg.services[0].bind_type == 4 and cfg.services[0].dcid == -1


def test_defaults():
    cfg = parse("""\
        lb node0 { nodeid 0; period 10; };
        server node1 { nodeid 1; };
        server node2 { nodeid 2; };
        client node3 { nodeid 3; };
        service s { ext_ep 5; };
        """)
    lb = cfg.lb
    assert (lb.lowwater, lb.highwater, lb.start, lb.stop) == (30, 70, 60, 60)
    assert lb.hello_time == 10                          # default 30, but never above period
    assert (lb.min_servers, lb.max_servers) == (1, 2)
    assert (lb.session_timeout, lb.max_sessions) == (300, 157)
    assert (lb.fd_interval, lb.fd_fall, lb.fd_rise, lb.lb_eps) == (500, 3, 2, None)
    n = cfg.node(3)
    assert (n.rname, n.rname_explicit, n.rport, n.sport, n.proto) == ("node3", False, None,
                                                                      None, "tcp")
    s = cfg.services[0]
    assert (s.dcid, s.min_ep, s.max_ep, s.bind, s.prog, s.any_dc) == (-1, 5, 5, "external",
                                                                       None, True)
    assert s.bind_type is None and s.in_dc(7)


def test_no_lb_is_a_plain_proxy_config():
    cfg = parse("server node1 { nodeid 1; };\nclient node2 { nodeid 2; };\n")
    assert cfg.lb is None and cfg.lb_nodeid is None and cfg.services == ()
    assert "no lb block" in format_summary(cfg)


def test_warnings():
    cfg = parse("""\
        lb node0 {
          nodeid 0;
          cltdev eth1;
          ssh_user admin;
        };
        server node1 { nodeid 1; proto udp; };
        client node2 { nodeid 2; rname 10.0.0.1; };
        client node3 { nodeid 3; rname 10.0.0.1; };
        service s { ext_ep 30; prog "/x"; };
        """)
    got = [(w.line, w.col, w.severity) for w in cfg.warnings]
    assert got == [(3, 3, "warning"), (4, 3, "warning"), (6, 32, "warning"),
                   (8, 32, "warning"), (9, 20, "warning"), (9, 29, "warning")]
    msgs = [w.message for w in cfg.warnings]
    assert "'cltdev' is obsolete and ignored" in msgs[0]
    assert "'ssh_user' is ignored without ssh_host" in msgs[1]
    assert "proto udp is not supported: treated as tcp" in msgs[2]
    assert "same rname '10.0.0.1'" in msgs[3]
    assert "endpoints 30..30 are not system endpoints" in msgs[4]
    assert "prog is never run because bind is external" in msgs[5]
    assert str(cfg.warnings[0]) == "t.cfg:3:3: warning: 'cltdev' is obsolete and ignored"


def test_local_node_checks():
    text = """\
        lb node0 { nodeid 0; };
        server node1 { nodeid 1; rport 3007; sport 3001; };
        client node2 { nodeid 2; sport 3003; };
        """
    assert parse(text).warnings == ()
    cfg = parse(text, local_node=2)
    msgs = [(w.line, w.col, w.message) for w in cfg.warnings]
    assert msgs[0][:2] == (2, 32) and "rport 3007 of server block 'node1'" in msgs[0][2]
    assert "expects 3001" in msgs[0][2]
    assert msgs[1][:2] == (2, 44) and "sport 3001" in msgs[1][2] and "expects 3002" in msgs[1][2]
    assert len(msgs) == 2                       # node2's own sport is not used on node 2
    cfg = parse(text, local_node=0)               # the LB node's id: runs as the C daemon does
    (w,) = [w for w in cfg.warnings if "virtual node id" in w.message]
    assert (w.line, w.col) == (1, 19) and "no LB pair" in w.message
    role = cfg.role(0)
    assert (role.kind, role.peers, role.lb_pair) == ("lb-id", (1, 2), False)
    assert "node 0 is the LB node's id: proxy pairs for nodes 1, 2, none for the LB node 0" in \
        format_summary(cfg, 0)
    cfg = parse(text, local_node=9)
    role = cfg.role(9)
    assert (role.kind, role.peers, role.lb_node, role.lb_pair) == ("no-block", (1, 2), 0, True)
    assert "node 9 has no block of its own: proxy pairs for nodes 1, 2 and the LB node 0" in \
        format_summary(cfg, 9)
    assert cfg.role(2).describe() == ("node 2 is client 'node2': proxy pairs for nodes 1 and the "
                                      "LB node 0")
    assert any(w.line == 0 and "local node 9 has no server or client block" in w.message
               for w in cfg.warnings)
    assert str(cfg.warnings[0]).startswith("t.cfg: warning: local node 9")


def test_dvs_limits_come_from_dvsinfo():
    small = DvsInfo(d_nr_nodes=8, d_nr_dcs=4, d_nr_procs=100, d_nr_tasks=11, d_nr_sysprocs=40)
    text = """\
        lb node0 { nodeid 0; lb_eps 29 99; };
        server node1 { nodeid 1; rport 3007; };
        service s { dcid 3; ext_ep 28; };
        """
    cfg = parse(text, dvs=small)
    assert cfg.lb.max_sessions == 60 and cfg.lb.lb_eps == (29, 99)
    assert cfg.dvs is small
    errs = errors_of(text.replace("rport 3007", "rport 3008").replace("dcid 3", "dcid 4"),
                     dvs=small)
    assert ["'rport' value 3008 is out of range 3000..3007" in e.message for e in errs] == [
        True, False]
    assert "'dcid' value 4 is out of range 0..3" in errs[1].message
    errs = errors_of("server n { nodeid 8; };", dvs=small)
    assert "out of range 0..7" in errs[0].message


def test_empty_file_is_an_error():
    (err,) = errors_of("# nothing but a comment\n")
    assert (err.line, err.col) == (0, 0) and "no server or client block" in err.message


def test_error_str_lists_errors_and_warnings_in_order():
    with pytest.raises(ConfigError) as info:
        parse("server node1 { nodeid 1; proto udp; batch x; };\n")
    assert info.value.errors == info.value.issues and len(info.value.warnings) == 1
    assert str(info.value).splitlines() == [
        "t.cfg:1:32: warning: proto udp is not supported: treated as tcp",
        "t.cfg:1:43: error: 'batch' expects YES or NO, found 'x'"]


def test_load_missing_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "nope.cfg")
    (err,) = info.value.issues
    assert err.line == 0 and "cannot read the config file" in err.message
    assert str(err).startswith(f"{tmp_path / 'nope.cfg'}: error: ")


def test_load_non_utf8_bytes(tmp_path):
    p = tmp_path / "latin1.cfg"
    p.write_bytes(b"# caf\xe9 in a comment is fine\nserver node1 { nodeid 1; rname h\xe9te; };\n")
    with pytest.raises(ConfigError) as info:
        load(p)
    (err,) = info.value.issues
    assert (err.line, err.col) == (2, 32) and "not valid UTF-8 (byte 0xE9)" in err.message
    p.write_bytes("server n\u0153ud { nodeid 1; };\n".encode())       # UTF-8 names are fine
    assert load(p).node(1).name == "n\u0153ud"


# --------------------------------------------------------------------------------------------
# Secrets and the summary
# --------------------------------------------------------------------------------------------


def test_secrets_never_shown():
    cfg = load(EXAMPLES / "dsp_node1.cfg", local_node=1)
    assert cfg.lb.ssh_pass == "change-me"
    summary = format_summary(cfg)
    assert "change-me" not in summary and "ssh_pass: set" in summary
    assert "change-me" not in repr(cfg) and "change-me" not in repr(cfg.lb)
    assert "change-me" not in str(cfg)
    # an error about the ssh_pass statement does not echo the password either
    bad = """\
        lb node0 {
          nodeid 0;
          ssh_pass s3cret more;
        };
        server node1 { nodeid 1; };
        """
    with pytest.raises(ConfigError) as info:
        parse(bad)
    assert "s3cret" not in str(info.value) and "more" not in str(info.value)


def test_summary_contents():
    cfg = load(EXAMPLES / "dsp_node1.cfg")
    text = format_summary(cfg, local_node=1)
    assert "(local node 1)" in text
    for part in ("lb node0: virtual node 0", "lowwater 30%", "highwater 70%", "period 30s",
                 "fd_interval 500ms", "lb_eps 200..220", "Admin@192.168.0.196",
                 "run_latency.sh", "m3ftp", "10..19", "replica", "external"):
        assert part in text, part
    rows = {line.split()[0]: line.split() for line in text.splitlines()
            if line.startswith("  ") and line.split()[0].isdigit() and len(line.split()) > 8}
    assert rows["2"][1:8] == ["node2", "server", "192.168.0.102", "3002", "3001", "NO", "NO"]
    assert rows["1"][1:3] == ["node1", "(local)"]
    assert rows["1"][-1] == "yes" and rows["12"][-1] == "no"
    assert len(text.splitlines()) < 40
    cluster = format_summary(load(EXAMPLES / "cluster.cfg"))
    assert "3001*" in cluster and "3000+L*" in cluster and "ssh" not in cluster
