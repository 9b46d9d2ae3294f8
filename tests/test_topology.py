"""Which links a node gets from a config, also a node the config has no block for."""

from __future__ import annotations

from dsp_proxy import config as cfgmod
from dsp_proxy import topology

CFG = """
lb node0 { nodeid 0; };
server node1 { nodeid 1; rname 127.0.0.1; };
client node3 { nodeid 3; rname 127.0.0.3; };
client host { nodeid 5; rname 127.0.0.5; };
service latency { ext_ep 10; min_ep 10; max_ep 19; bind external; };
"""


def test_a_node_without_a_block_links_to_every_configured_node():
    cfg = cfgmod.parse_text(CFG)
    specs = topology.peer_specs(cfg, 7)
    assert [(s.nodeid, s.sport, s.rport) for s in specs] == \
        [(1, 3007, 3001), (3, 3007, 3003), (5, 3007, 3005)]
    assert topology.peer_specs(cfg, 0)[0].sport == 3000   # on the LB node's id


def test_relayed_clients_link_only_to_the_lb_host():
    cfg = cfgmod.parse_text(CFG.replace("nodeid 0;", "nodeid 0; cltname host; lb_eps 100 110;"))
    assert topology.is_relayed_client(cfg, 3) and not topology.is_relayed_client(cfg, 5)
    (spec,) = topology.peer_specs(cfg, 3)
    assert (spec.nodeid, spec.host, spec.sport) == (0, "127.0.0.5", 3003)
