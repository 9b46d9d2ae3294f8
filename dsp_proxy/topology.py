"""Which links a node has (docs/design.md, "Sessions" and "Addresses and ports").

Every node links to every other real node of the config, except in relayed mode: when the lb
block's `cltname` names a node H of the config (the LB host), every `client` node other than H
reaches the LB node only through H.  Its pair for the LB node is its one link, to H: it
connects to H at 3000 + its own id and H connects back to it at 3000 + the LB node id.  The
other nodes do not link to relayed clients at all; servers see their sessions as coming from
H, with the client endpoints translated into the lb block's `lb_eps` range.
"""

from __future__ import annotations

from .config import BASE_PORT, Config
from .link import PeerSpec


def relay_host(cfg: Config) -> int | None:
    """The LB host of relayed mode: the node the lb block's `cltname` names, if any."""
    if cfg.lb is None or not cfg.lb.cltname:
        return None
    node = cfg.node_by_name(cfg.lb.cltname)
    return node.nodeid if node is not None else None


def is_relayed_client(cfg: Config, nodeid: int) -> bool:
    host = relay_host(cfg)
    node = cfg.nodes_by_id.get(nodeid)
    return host is not None and nodeid != host and node is not None and node.role == "client"


def peer_specs(cfg: Config, local: int) -> list[PeerSpec]:
    """The links of node `local`, one PeerSpec each (the LB node's id for a relayed client's
    link to the LB host)."""
    lb = cfg.lb.nodeid if cfg.lb is not None else -1
    host = relay_host(cfg)
    if is_relayed_client(cfg, local):
        h = cfg.node(host)
        return [PeerSpec(nodeid=lb, name=cfg.lb.name, host=h.rname,
                         sport=cfg.sport(local, host), rport=cfg.rport(local, lb),
                         batch=h.batch, compress=h.compress, autobind=True)]
    specs = []
    for node in cfg.peers(local):
        if node.nodeid == lb:
            continue
        relayed_peer = is_relayed_client(cfg, node.nodeid)
        if relayed_peer and local != host:
            continue
        sport = BASE_PORT + lb if relayed_peer else cfg.sport(local, node.nodeid)
        specs.append(PeerSpec(nodeid=node.nodeid, name=node.name, host=node.rname,
                              sport=sport, rport=cfg.rport(local, node.nodeid),
                              batch=node.batch, compress=node.compress,
                              autobind=node.autobind))
    return specs
