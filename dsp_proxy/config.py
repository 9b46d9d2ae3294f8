"""DSP configuration: the C config language, read as the C daemon reads it, checked, frozen.

The language is the one of the C `dsp_proxy` (Kees J. Bot's `configfile` reader): blocks
``lb NAME { ... };``, ``server NAME { ... };``, ``client NAME { ... };`` and
``service NAME { ... };`` holding ``keyword value;`` statements, ``#`` comments, quoted strings.
A file the C daemon starts on is accepted with the same meaning, and everything dubious in it
gets a ``file:line:column`` warning; where the C reading silently loses or changes a setting
(a forgotten ``;`` swallowing the next statement, a block overwriting another one, a number
``atoi()`` turns into another), the error says what the C daemon would have done.  Every issue
of a file is reported at once, so an operator fixes a file in one round; ``strict`` turns the
warnings into errors.  docs/config.md is the parameter reference and lists the differences.

Public API
----------
``load(path, dvs=None, local_node=None, strict=False) -> Config`` and ``parse_text(text, path,
dvs, local_node, strict) -> Config`` raise ``ConfigError`` (a list of ``Issue``) on any error,
and nothing else; warnings are returned in ``Config.warnings``.  ``Config.role(node)`` says what
a node's DSP runs.  ``format_summary(cfg, local_node=None)`` renders a one-screen overview.  No
message, summary or log line ever shows text of an ``ssh_pass`` statement.

How it works: one regular expression splits the text into located tokens with the C reader's
rules; a loop (no recursion, so any nesting depth is fine) groups them into blocks and
statements, keeping error markers (unclosed block, missing ``;``) instead of stopping; the
checker walks that tree, applies the C daemon's reading of each statement (first keyword of the
statement, value after it), converts values, applies the keyword tables and the global checks,
and collects every issue (at most 100 of each kind are kept).
"""

from __future__ import annotations

import bisect
import dataclasses
import difflib
import gc
import ipaddress
import logging
import re
import shlex
import socket
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from dvk_cffi import consts as C
from dvk_cffi.info import DvsInfo

from .misc import read_regular_file

log = logging.getLogger(__name__)

__all__ = [
    "BASE_PORT", "BIND_TYPES", "Config", "ConfigError", "Issue", "LbConfig", "NodeConfig", "Role",
    "ServiceConfig", "format_summary", "load", "parse_text",
]

BASE_PORT = 3000
"""Port base of the proxy scheme: node L listens for peer P on 3000+P, reaches P at P:3000+L."""

KINDS = ("lb", "server", "client", "service")
BIND_TYPES: Mapping[str, int | None] = types.MappingProxyType({
    "replica": C.REPLICA_BIND, "local": C.LCL_BIND, "backup": C.BKUP_BIND, "external": None,
})
"""`bind` values and the DVK bind type a started service uses (None: bound by hand)."""

ANY_DC = -1
MAX_NAME = C.MAXNODENAME - 1          # kernel node / proxy names are 16-byte C strings

# --------------------------------------------------------------------------------------------
# Issues and the error type
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Issue:
    """One problem found in a config file, located at `line`:`col` (1-based; 0 = whole file)."""

    path: str
    line: int
    col: int
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        path = _printable(self.path)
        where = f"{path}:{self.line}:{self.col}" if self.line else path
        return f"{where}: {self.severity}: {self.message}"


class ConfigError(Exception):
    """A config file has errors; `issues` lists all of them (warnings in `warnings`)."""

    def __init__(self, issues: Sequence[Issue], warnings: Sequence[Issue] = ()) -> None:
        self.issues: tuple[Issue, ...] = tuple(issues)
        self.warnings: tuple[Issue, ...] = tuple(warnings)
        super().__init__(self.issues, self.warnings)     # args re-create it (pickle)

    @property
    def errors(self) -> tuple[Issue, ...]:
        """Same as `issues` (the errors only)."""
        return self.issues

    def __str__(self) -> str:
        return "\n".join(str(i) for i in _sorted(self.issues + self.warnings))


def _sorted(issues: Iterable[Issue]) -> list[Issue]:
    return sorted(issues, key=lambda i: (i.line, i.col))


# --------------------------------------------------------------------------------------------
# The frozen result
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LbConfig:
    """The `lb` block: the virtual load-balancer node and the cluster-wide LB parameters."""

    name: str
    nodeid: int
    lowwater: int = 30
    highwater: int = 70
    period: int = 30
    hello_time: int = 30
    start: int = 60
    stop: int = 60
    min_servers: int = 1
    max_servers: int = 1
    cltname: str | None = None
    svrname: str | None = None
    vm_start: str | None = None
    vm_stop: str | None = None
    vm_status: str | None = None
    ssh_host: str | None = None
    ssh_user: str | None = None
    ssh_pass: str | None = field(default=None, repr=False)
    session_timeout: int = 300
    max_sessions: int = C.NR_PROCS - C.NR_SYS_PROCS
    fd_interval: int = 500
    fd_fall: int = 3
    fd_rise: int = 2
    lb_eps: tuple[int, int] | None = None
    line: int = field(default=0, compare=False)
    col: int = field(default=0, compare=False)

    @property
    def kernel_name(self) -> str:
        """The virtual node's kernel name (cut to 15 bytes, as in C)."""
        return _kernel_name(self.name)


@dataclass(frozen=True)
class NodeConfig:
    """A `server` or `client` block: a real node. `rport`/`sport` are None when not given."""

    name: str
    role: str                       # "server" | "client"
    nodeid: int
    rname: str                      # peer address (host name or IP); default: the block name
    rname_explicit: bool = False
    extra_addrs: tuple[str, ...] = ()   # more addresses the peer's connections may come from
    proto: str = "tcp"
    rport: int | None = None
    sport: int | None = None
    compress: bool = False
    batch: bool = False
    autobind: bool = False
    node_image: str | None = None
    line: int = field(default=0, compare=False)
    col: int = field(default=0, compare=False)

    @property
    def is_server(self) -> bool:
        return self.role == "server"

    @property
    def kernel_name(self) -> str:
        """The name the kernel gets (names longer than 15 bytes are cut, as in C)."""
        return _kernel_name(self.name)

    @property
    def is_client(self) -> bool:
        return self.role == "client"


@dataclass(frozen=True)
class ServiceConfig:
    """A `service` block: a balanced service clients address at (lb node, `ext_ep`)."""

    name: str
    ext_ep: int
    min_ep: int
    max_ep: int
    dcid: int = ANY_DC              # -1: the service exists in every DC
    bind: str = "external"
    prog: str | None = None
    line: int = field(default=0, compare=False)
    col: int = field(default=0, compare=False)

    @property
    def any_dc(self) -> bool:
        return self.dcid == ANY_DC

    @property
    def bind_type(self) -> int | None:
        """DVK bind type of a started service (None for `external`)."""
        return BIND_TYPES[self.bind]

    def in_dc(self, dcid: int) -> bool:
        return self.dcid in (ANY_DC, dcid)

    def contains(self, endpoint: int) -> bool:
        """True when `endpoint` is the service's ext_ep or inside min_ep..max_ep."""
        return endpoint == self.ext_ep or self.min_ep <= endpoint <= self.max_ep


@dataclass(frozen=True)
class Role:
    """What the DSP of one node runs with a config: the choice the C daemon makes there."""

    node: int
    kind: str                       # "server" | "client" | "no-block" | "lb-id"
    peers: tuple[int, ...]          # real nodes it runs a proxy pair for
    lb_node: int | None             # the LB node's id (None: no lb block)
    lb_pair: bool                   # whether it runs the LB node's pair (and balances)
    block: str | None = None        # its own block's name
    relay: str | None = None        # client of relayed mode: the LB host's name

    def describe(self) -> str:
        """One line for `--check` and the start-up log."""
        ids = ", ".join(str(p) for p in self.peers) or "none"
        lb = (f" and the LB node {self.lb_node}" if self.lb_pair
              else "" if self.lb_node is None else f", none for the LB node {self.lb_node}")
        pairs = f"proxy pairs for nodes {ids}{lb}"
        if self.kind == "lb-id":
            return (f"node {self.node} is the LB node's id: {pairs}, as the C daemon does there "
                    "(this node does not balance)")
        if self.kind == "no-block":
            return (f"node {self.node} has no block of its own: {pairs} (every configured node, "
                    "as the C daemon does)")
        via = f"; sessions relayed through {self.relay}" if self.relay else ""
        return f"node {self.node} is {self.kind} '{self.block}': {pairs}{via}"


@dataclass(frozen=True)
class Config:
    """A validated DSP configuration (file order kept in `nodes` and `services`)."""

    path: str
    lb: LbConfig | None
    nodes: tuple[NodeConfig, ...]
    services: tuple[ServiceConfig, ...]
    warnings: tuple[Issue, ...] = ()
    local_node: int | None = None
    dvs: DvsInfo = field(default_factory=DvsInfo, repr=False, compare=False)
    fd_interval: int = 500          # effective liveness settings (lb block, else top level)
    fd_fall: int = 3
    fd_rise: int = 2
    _by_id: Mapping[int, NodeConfig] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_id = types.MappingProxyType({n.nodeid: n for n in self.nodes})
        object.__setattr__(self, "_by_id", by_id)

    # -- nodes --------------------------------------------------------------------------------
    @property
    def nodes_by_id(self) -> Mapping[int, NodeConfig]:
        """Real nodes (server and client blocks) by node id (read-only)."""
        return self._by_id

    def node(self, nodeid: int) -> NodeConfig:
        """The real node `nodeid`; KeyError when no server/client block has that id."""
        try:
            return self._by_id[nodeid]
        except KeyError:
            raise KeyError(f"node {nodeid} is not configured in {self.path}") from None

    def node_by_name(self, name: str) -> NodeConfig | None:
        return next((n for n in self.nodes if n.name == name), None)

    @property
    def servers(self) -> tuple[NodeConfig, ...]:
        return tuple(n for n in self.nodes if n.is_server)

    @property
    def clients(self) -> tuple[NodeConfig, ...]:
        return tuple(n for n in self.nodes if n.is_client)

    @property
    def lb_nodeid(self) -> int | None:
        return self.lb.nodeid if self.lb else None

    def role(self, local_id: int) -> Role:
        """The role node `local_id` gets (also a node without a block, or the LB node's id)."""
        lb = self.lb_nodeid
        peers = tuple(n.nodeid for n in self.nodes if n.nodeid != local_id)
        if lb is not None and local_id == lb:
            return Role(local_id, "lb-id", peers, lb, False)
        own = self._by_id.get(local_id)
        if own is None:
            return Role(local_id, "no-block", peers, lb, lb is not None)
        relay = None
        if own.is_client and self.lb is not None and self.lb.cltname:
            host = self.node_by_name(self.lb.cltname)
            relay = host.name if host is not None and host.nodeid != local_id else None
        return Role(local_id, own.role, peers, lb, lb is not None, own.name, relay)

    def peers(self, local_id: int) -> tuple[NodeConfig, ...]:
        """Every configured real node except `local_id` (the nodes that get a proxy pair)."""
        return tuple(n for n in self.nodes if n.nodeid != local_id)

    def rname(self, nodeid: int) -> str:
        """Address of node `nodeid`: its `rname`, else its block name."""
        return self.node(nodeid).rname

    # -- ports (docs/config.md, Ports) -------------------------------------------------------
    def rport(self, local_id: int, peer_id: int) -> int:
        """Port on which node `local_id` listens for `peer_id`: explicit rport, else 3000+peer."""
        node = self._by_id.get(peer_id)
        if node is not None and node.rport is not None:
            return node.rport
        return BASE_PORT + peer_id

    def sport(self, local_id: int, peer_id: int) -> int:
        """Port at which `local_id` connects to `peer_id`: explicit sport, else 3000+local."""
        node = self._by_id.get(peer_id)
        if node is not None and node.sport is not None:
            return node.sport
        return BASE_PORT + local_id

    # -- addresses ----------------------------------------------------------------------------
    def nodes_by_address(self, addresses: Iterable[str]) -> tuple[NodeConfig, ...]:
        """Nodes whose `rname` is (or resolves to) one of `addresses`.

        Host names are resolved with getaddrinfo here, not at parse time, so a name that does
        not resolve (yet) is simply no match."""
        wanted = {a for a in (_norm_ip(x) for x in addresses) if a is not None}
        return tuple(n for n in self.nodes if wanted & _resolve(n.rname))

    def local_node_by_address(self, addresses: Iterable[str]) -> NodeConfig | None:
        """The node whose `rname` matches a local address; None if none, ValueError if several."""
        found = self.nodes_by_address(addresses)
        if len(found) > 1:
            names = ", ".join(f"{n.name} ({n.nodeid})" for n in found)
            raise ValueError(f"several nodes of {self.path} match the local addresses: {names}")
        return found[0] if found else None

    # -- services -----------------------------------------------------------------------------
    def service(self, name: str) -> ServiceConfig:
        """Service by name (case-insensitive, as names are unique case-insensitively)."""
        for s in self.services:
            if s.name.lower() == name.lower():
                return s
        raise KeyError(f"no service {name!r} in {self.path}")

    def find_service(self, dcid: int, endpoint: int) -> ServiceConfig | None:
        """The service a client reaches at (`dcid`, `endpoint`) on the LB node, if any."""
        for s in self.services:
            if s.in_dc(dcid) and s.contains(endpoint):
                return s
        return None

    @property
    def service_dcids(self) -> tuple[int, ...]:
        """DCs named explicitly by services (services with dcid -1 add none)."""
        return tuple(sorted({s.dcid for s in self.services if not s.any_dc}))


def _norm_ip(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text.split("%", 1)[0]))
    except ValueError:
        return None


def _resolve(name: str) -> set[str]:
    ip = _norm_ip(name)
    if ip is not None:
        return {ip}
    try:
        infos = socket.getaddrinfo(name, None)
    except (OSError, UnicodeError):
        log.debug("rname %r does not resolve", name)
        return set()
    return {a for a in (_norm_ip(str(i[4][0])) for i in infos) if a is not None}


# --------------------------------------------------------------------------------------------
# Lexical level and structure (a hand-written reader; C reader rules)
# --------------------------------------------------------------------------------------------

# Word characters of the C reader: letters, digits, bytes >= 0x80 and ! # $ % & * + - . / : < =
# > ? [ \ ] ^ _ | ~.  A '#' right after white space (or at the start of the file) starts a
# comment; anywhere else it is a word character, as in the C reader.
_WORD_CHARS = r"A-Za-z0-9\u0080-\U0010ffff!#$%&*+\-./:<=>?\[\\\]^_|~"
_WORD_RE = rf"[{_WORD_CHARS}]+"
_STRING_RE = r'"(?:[^"\\\n]|\\[\s\S])*"|' + r"'(?:[^'\\\n]|\\[\s\S])*'"
_WS = " \t\r\n\f\v"
# White space and comments before each token are skipped by the same match.
_TOKEN_RE = re.compile(
    rf"(?:[{_WS}]|(?<=[{_WS}])#[^\n]*|^#[^\n]*)*(?:(?P<word>{_WORD_RE})"
    rf"|(?P<string>{_STRING_RE})|(?P<badstring>[\"'][^\n]*)|(?P<semi>;)|(?P<lbrace>\{{)"
    rf"|(?P<rbrace>\}})|(?P<badchar>[^{_WORD_CHARS}{_WS}\"';{{}}]+)|$)")
_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "e": "\x1b", "f": "\f", "n": "\n", "r": "\r",
                   "s": " ", "t": "\t", "v": "\v"}
_ATOMS = frozenset({"word", "string", "badstring", "badchar"})
_ESCAPE_RE = re.compile(r"\\(?:([0-7]{1,3})|x([0-9A-Fa-f]{1,2})|(x)|[^\S]\s*|([\s\S])|$)")


class _Tok(NamedTuple):
    kind: str          # word string badstring badchar lbrace rbrace semi | markers: end nosemi
    text: str          # source text                                       unclosed
    loc: int
    value: str = ""
    error: str | None = None


class _Sub(NamedTuple):
    """A `{ ... }` sub-list inside a statement (legal for the C reader, never a value here)."""

    lbrace: _Tok
    toks: tuple[_Tok, ...]        # every token inside, nested braces included
    closed: bool


class _Stmt(NamedTuple):
    toks: tuple[Any, ...]         # _Tok atoms and _Sub
    end: _Tok


class _Junk(NamedTuple):                      # top-level tokens that do not form a block
    toks: tuple[_Tok, ...]
    end: _Tok


class _Block(NamedTuple):
    head: tuple[_Tok, ...]
    lbrace: _Tok
    body: tuple[Any, ...]         # _Stmt | _Tok(semi) | _Tok(lbrace: stray)
    close: tuple[_Tok, ...]       # (rbrace, semi) | (rbrace, nosemi) | (unclosed,)
    trail: tuple[_Tok, ...] = ()  # words after the '}' before ';' (ignored, as in C)


def _unescape(body: str) -> tuple[str, str | None]:
    """Process the C reader's escapes; returns (text, error message or None)."""
    if "\\" not in body:
        return body, None
    bad: list[bool] = []

    def one(m: re.Match[str]) -> str:
        octal, hexa, badx, other = m.groups()
        if octal:
            return chr(int(octal, 8))
        if hexa:
            return chr(int(hexa, 16))
        if badx:
            bad.append(True)
            return ""
        if other is not None:
            return _SIMPLE_ESCAPES.get(other, other)
        return "\\" if m.group() == "\\" else ""         # a final '\' / a continuation

    text = _ESCAPE_RE.sub(one, body)
    return text, ("bad escape '\\x': expected one or two hexadecimal digits" if bad else None)


def _tokenize(text: str) -> tuple[list[_Tok], list[_Tok]]:
    """Split `text` into located tokens (white space and comments dropped).

    Also returns the tokens that need a closer look (bad characters, strings, words with
    characters that are not printable): the rest pass the lexical checks as they are."""
    toks: list[_Tok] = []
    odd: list[_Tok] = []
    add = toks.append
    new = tuple.__new__
    for m in _TOKEN_RE.finditer(text):
        kind = m.lastgroup
        if kind is None:
            continue
        s = m.group(kind)
        loc = m.start(kind)
        if kind == "word":
            tok = new(_Tok, (kind, s, loc, s, None))
            if not s.isprintable():
                odd.append(tok)
        elif kind == "string":
            value, err = _unescape(s[1:-1])
            tok = _Tok("string", s, loc, value, err)
            odd.append(tok)
        elif kind == "badstring":
            value, _ = _unescape(s[1:])
            tok = _Tok("badstring", s, loc, value.rstrip(),
                       "string not closed before the end of line")
            odd.append(tok)
        else:
            tok = new(_Tok, (kind, s, loc, s, None))
            if kind == "badchar":
                odd.append(tok)
        add(tok)
    return toks, odd


def _marker(kind: str, loc: int) -> _Tok:
    return _Tok(kind, "", loc)


def _block_start(toks: Sequence[_Tok], j: int) -> bool:
    """Lookahead: does `KIND NAME {` start at toks[j]? (recovers from a missing '}')."""
    return (j + 2 < len(toks) and toks[j].kind == "word" and toks[j].text in KINDS
            and toks[j + 1].kind in ("word", "string") and toks[j + 2].kind == "lbrace")


def _sub(toks: Sequence[_Tok], j: int) -> tuple[_Sub, int]:
    """Read the balanced sub-list opening at toks[j] (iteratively: nesting depth is unbounded)."""
    depth, k, n = 0, j, len(toks)
    while k < n:
        kind = toks[k].kind
        if kind == "lbrace":
            depth += 1
        elif kind == "rbrace":
            depth -= 1
            if depth == 0:
                return _Sub(toks[j], tuple(toks[j + 1:k]), True), k + 1
        k += 1
    return _Sub(toks[j], tuple(toks[j + 1:]), False), n


def _block(toks: Sequence[_Tok], head: Sequence[_Tok], j: int, end: int) -> tuple[_Block, int]:
    lbrace = toks[j]
    j += 1
    n = len(toks)
    body: list[Any] = []
    stmt: list[Any] = []

    def flush(end_tok: _Tok) -> None:
        if stmt:
            body.append(_Stmt(tuple(stmt), end_tok))
            stmt.clear()

    while True:
        if j >= n:
            flush(_marker("end", end))
            return _Block(tuple(head), lbrace, tuple(body), (_marker("unclosed", end),)), j
        t = toks[j]
        kind = t.kind
        if kind == "semi":
            if stmt:
                flush(t)
            else:
                body.append(t)
            j += 1
        elif kind == "rbrace":
            flush(_marker("end", t.loc))
            j += 1
            if j < n and toks[j].kind == "semi":
                return _Block(tuple(head), lbrace, tuple(body), (t, toks[j])), j + 1
            # C glues what follows onto this statement: plain words up to ';' are ignored
            k = j
            while k < n and toks[k].kind in _ATOMS and not _block_start(toks, k):
                k += 1
            if k > j and (k >= n or toks[k].kind in ("semi", "rbrace")):
                trail = tuple(toks[j:k])
                if k < n and toks[k].kind == "semi":
                    return _Block(tuple(head), lbrace, tuple(body), (t, toks[k]), trail), k + 1
                return _Block(tuple(head), lbrace, tuple(body),
                              (t, _marker("nosemi", toks[k].loc if k < n else end)), trail), k
            nxt = toks[j].loc if j < n else end
            return _Block(tuple(head), lbrace, tuple(body), (t, _marker("nosemi", nxt))), j
        elif kind == "lbrace":
            if stmt:
                sub, j = _sub(toks, j)
                stmt.append(sub)
                if not sub.closed:
                    flush(_marker("end", end))
                    return _Block(tuple(head), lbrace, tuple(body),
                                  (_marker("unclosed", end),)), j
            else:
                body.append(t)
                j += 1
        elif kind == "word" and t.text in KINDS and _block_start(toks, j):
            flush(_marker("end", t.loc))
            return _Block(tuple(head), lbrace, tuple(body), (_marker("unclosed", t.loc),)), j
        else:
            stmt.append(t)
            j += 1


def _structure(toks: Sequence[_Tok], end: int) -> list[Any]:
    """Group tokens into top-level blocks, junk statements, stray ';' and '}' (no recursion)."""
    items: list[Any] = []
    i, n = 0, len(toks)
    while i < n:
        t = toks[i]
        if t.kind == "semi":
            i += 1
            continue
        if t.kind == "rbrace":
            items.append(t)
            i += 1
            continue
        j = i
        while j < n and toks[j].kind in _ATOMS:
            j += 1
        if j < n and toks[j].kind == "lbrace":
            blk, i = _block(toks, toks[i:j], j, end)
            items.append(blk)
        elif j < n and toks[j].kind == "semi":
            items.append(_Junk(tuple(toks[i:j]), toks[j]))
            i = j + 1
        else:
            items.append(_Junk(tuple(toks[i:j]), _marker("end", toks[j].loc if j < n else end)))
            i = j
    return items


# --------------------------------------------------------------------------------------------
# Keyword tables
# --------------------------------------------------------------------------------------------

_INT, _BOOL, _TEXT, _STRING, _PROTO, _BIND, _PAIR, _OBSOLETE, _ADDRS = (
    "int", "yes/no", "text", "string", "proto", "bind", "pair", "obsolete", "addresses")
_Range = Callable[[DvsInfo], tuple[int, int]]


@dataclass(frozen=True)
class _Kw:
    type: str
    rng: _Range | None = None
    why: str = ""                 # how the range is derived, for messages


def _fixed(lo: int, hi: int) -> _Range:
    return lambda d: (lo, hi)


_NODEID = _Kw(_INT, lambda d: (0, d.d_nr_nodes - 1), " (d_nr_nodes - 1)")
_PORT = _Kw(_INT, lambda d: (BASE_PORT, BASE_PORT + d.d_nr_nodes - 1), " (3000 + d_nr_nodes - 1)")
_EP = _Kw(_INT, lambda d: (0, d.d_nr_procs - 1), " (d_nr_procs - 1)")
_SECS = _Kw(_INT, _fixed(1, 3600))
_COUNT = _Kw(_INT, _fixed(1, 100))

_TOP_KW: dict[str, _Kw] = {
    "fd_interval": _Kw(_INT, _fixed(50, 60000)), "fd_fall": _COUNT, "fd_rise": _COUNT,
}
LIVENESS_DEFAULTS: Mapping[str, int] = types.MappingProxyType(
    {"fd_interval": 500, "fd_fall": 3, "fd_rise": 2})
"""Liveness keywords (lb block or top level) and their defaults."""

_LB_KW: dict[str, _Kw] = {
    "nodeid": _NODEID, "proxyid": _NODEID,
    "lowwater": _Kw(_INT, _fixed(0, 100)), "highwater": _Kw(_INT, _fixed(0, 100)),
    "period": _SECS, "hello_time": _SECS, "start": _SECS, "stop": _SECS,
    "min_servers": _Kw(_INT, lambda d: (1, d.d_nr_nodes), " (d_nr_nodes)"),
    "max_servers": _Kw(_INT, lambda d: (1, d.d_nr_nodes), " (d_nr_nodes)"),
    "cltname": _Kw(_TEXT), "svrname": _Kw(_TEXT),
    "vm_start": _Kw(_TEXT), "vm_stop": _Kw(_TEXT), "vm_status": _Kw(_TEXT),
    "ssh_host": _Kw(_TEXT), "ssh_user": _Kw(_TEXT), "ssh_pass": _Kw(_TEXT),
    "session_timeout": _Kw(_INT, _fixed(1, 86400)),
    "max_sessions": _Kw(_INT, lambda d: (1, d.d_nr_procs - d.d_nr_sysprocs),
                        " (d_nr_procs - d_nr_sysprocs)"),
    **_TOP_KW,
    "lb_eps": _Kw(_PAIR, lambda d: (d.d_nr_sysprocs - d.d_nr_tasks, d.d_nr_procs - 1),
                  " (d_nr_sysprocs - d_nr_tasks .. d_nr_procs - 1: user endpoints)"),
    "cltdev": _Kw(_OBSOLETE), "svrdev": _Kw(_OBSOLETE),
}
_CLIENT_KW: dict[str, _Kw] = {
    "nodeid": _NODEID, "proxyid": _NODEID, "rname": _Kw(_TEXT), "addrs": _Kw(_ADDRS),
    "proto": _Kw(_PROTO), "rport": _PORT, "sport": _PORT,
    "compress": _Kw(_BOOL), "batch": _Kw(_BOOL), "autobind": _Kw(_BOOL),
}
_SERVER_KW: dict[str, _Kw] = {**_CLIENT_KW, "node_image": _Kw(_TEXT)}
_SERVICE_KW: dict[str, _Kw] = {
    "dcid": _Kw(_INT, lambda d: (0, d.d_nr_dcs - 1), " (d_nr_dcs - 1)"),
    "ext_ep": _EP, "min_ep": _EP, "max_ep": _EP,
    "bind": _Kw(_BIND), "prog": _Kw(_STRING),
}
_KEYWORDS = {"lb": _LB_KW, "server": _SERVER_KW, "client": _CLIENT_KW, "service": _SERVICE_KW,
             "top": _TOP_KW}
# The keywords the C daemon knows (it requires `nodeid` before any other of them).
_C_KEYWORDS = {
    "lb": frozenset({"nodeid", "lowwater", "highwater", "period", "start", "stop", "vm_start",
                     "vm_stop", "vm_status", "cltname", "svrname", "cltdev", "svrdev",
                     "ssh_host", "ssh_user", "ssh_pass", "min_servers", "max_servers",
                     "hello_time"}),
    "server": frozenset({"nodeid", "proto", "rport", "sport", "compress", "batch", "autobind",
                         "node_image"}),
    "client": frozenset({"nodeid", "proto", "rport", "sport", "compress", "batch", "autobind"}),
}
_SECRET = frozenset({"ssh_pass"})      # never echoed in messages
_ATOI_RE = re.compile(r"[+-]?[0-9]+")
_MAX_DIGITS = 9                        # longer numbers are out of every range: never converted
_MAX_ISSUES = 100                      # issues kept per kind; the rest are counted
_SHOWN = 40                            # characters of a token echoed in a message
_HOST_RE = re.compile(r"(?=.{1,253}\.?$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                      r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")
_CWORD = "the C daemon"


def _printable(text: str) -> str:
    """`text` with every non-printable character escaped (never a raw control character)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace")
                   .decode("ascii") for c in text)


def _clip(text: str) -> str:
    text = _printable(text)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def _kernel_name(name: str) -> str:
    """The name the kernel stores: at most MAX_NAME bytes (the C daemon truncates likewise)."""
    raw = name.encode("utf-8", "surrogateescape")
    return raw[:MAX_NAME].decode("utf-8", "ignore") if len(raw) > MAX_NAME else name


def _flat(items: Iterable[Any]) -> Iterable[_Tok]:
    for it in items:
        if isinstance(it, _Sub):
            yield it.lbrace
            yield from it.toks
        else:
            yield it


# --------------------------------------------------------------------------------------------
# The checker
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Val:
    value: Any
    kw: _Tok
    toks: tuple[_Tok, ...]


@dataclass
class _Rec:
    """A block while it is being checked."""

    kind: str
    name: str
    kind_tok: _Tok
    name_tok: _Tok | None
    desc: str = ""
    values: dict[str, _Val] = field(default_factory=dict)
    seen: dict[str, _Tok] = field(default_factory=dict)
    first_c_kw: _Tok | None = None

    def get(self, kw: str, default: Any = None) -> Any:
        v = self.values.get(kw)
        return default if v is None else v.value

    def vtok(self, kw: str) -> _Tok | None:
        v = self.values.get(kw)
        return v.toks[0] if v else None


_BAD = object()


class _Checker:
    def __init__(self, text: str, path: str, dvs: DvsInfo, local_node: int | None) -> None:
        self.text = text
        self.path = path
        self.dvs = dvs
        self.local = local_node
        self.errors: list[Issue] = []
        self.warnings: list[Issue] = []
        self.more_errors = 0
        self.more_warnings = 0
        self.truncated = False              # checks skipped once the file is refused anyway
        self.recs: list[_Rec] = []
        self.top = _Rec("top", "", _marker("top", 0), None, "the top level (outside blocks)")
        self._starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self._hidden_locs: set[int] = set()     # tokens of ssh_pass statements
        self._span_starts: list[int] = []       # rest-of-line spans after a malformed ssh_pass
        self._span_ends: list[int] = []
        self._stray_reported: set[int] = set()

    # -- issues -------------------------------------------------------------------------------
    def pos(self, where: _Tok | int | None) -> tuple[int, int]:
        if where is None:
            return 0, 0
        loc = where.loc if isinstance(where, _Tok) else where
        line = bisect.bisect_right(self._starts, loc)
        return line, loc - self._starts[line - 1] + 1

    def error(self, where: _Tok | int | None, msg: str) -> None:
        if len(self.errors) >= _MAX_ISSUES:
            self.more_errors += 1
            return
        self.errors.append(Issue(self.path, *self.pos(where), _printable(msg)))

    def warn(self, where: _Tok | int | None, msg: str) -> None:
        if len(self.warnings) >= _MAX_ISSUES:
            self.more_warnings += 1
            return
        self.warnings.append(Issue(self.path, *self.pos(where), _printable(msg), "warning"))

    def line(self, tok: _Tok | None) -> int:
        return self.pos(tok)[0]

    # -- secrets ------------------------------------------------------------------------------
    def hidden(self, tok: _Tok) -> bool:
        """True for text of an ssh_pass statement, or after a malformed one on its line."""
        if not self._hidden_locs:
            return False
        if tok.loc in self._hidden_locs:
            return True
        i = bisect.bisect_right(self._span_starts, tok.loc) - 1
        return i >= 0 and tok.loc < self._span_ends[i]

    def _eol(self, loc: int) -> int:
        end = self.text.find("\n", loc)
        return len(self.text) if end < 0 else end

    def _find_secrets(self, items: Sequence[Any], toks: Sequence[_Tok]) -> None:
        """Mark the tokens no message may show: an ssh_pass statement's, and when it is not a
        clean `ssh_pass VALUE;` (a value with ';', '{', '}' or spaces) the rest of its line;
        also any string with 'ssh_pass' inside (e.g. an unclosed quote before the keyword)."""
        self._hidden_locs.update(t.loc for t in toks
                                 if t.kind in ("string", "badstring") and "ssh_pass" in t.text)
        spans: list[tuple[int, int]] = []
        for stmt in self._all_statements(items):
            toks = stmt.toks if not any(isinstance(t, _Sub) for t in stmt.toks) else tuple(
                _flat(stmt.toks))
            k = next((i for i, t in enumerate(toks) if isinstance(t, _Tok)
                      and t.kind in ("word", "string") and t.value in _SECRET), None)
            if k is None:
                continue
            own = list(_flat(toks[k:]))
            self._hidden_locs.update(t.loc for t in own)
            end = stmt.end
            clean = (len(toks) == k + 2 and isinstance(toks[k + 1], _Tok)
                     and toks[k + 1].kind in ("word", "string")
                     and (end.kind == "semi" and self._spaced_after(end.loc)
                          or end.kind == "end" and self._spaced_before(end.loc)))
            if not clean:
                last = max(own[-1].loc, end.loc)
                spans.append((toks[k].loc, self._eol(last)))
        spans.sort()
        for start, stop in spans:
            if self._span_ends and start <= self._span_ends[-1]:
                self._span_ends[-1] = max(stop, self._span_ends[-1])
            else:
                self._span_starts.append(start)
                self._span_ends.append(stop)

    def _spaced_after(self, loc: int) -> bool:
        nxt = self.text[loc + 1:loc + 2]
        return nxt == "" or nxt in _WS

    def _spaced_before(self, loc: int) -> bool:
        nxt = self.text[loc + 1:loc + 2]           # '}' then ';' (a block's end) is clean too
        return loc == 0 or self.text[loc - 1] in _WS or nxt in ("", ";") or nxt in _WS

    def _stray_secret(self, toks: Iterable[Any]) -> bool:
        """Report (once per line) tokens after a malformed ssh_pass; True if there were any."""
        if not self._span_starts:
            return False
        for t in _flat(toks):
            if t.kind in _ATOMS and t.loc not in self._hidden_locs and self.hidden(t):
                i = bisect.bisect_right(self._span_starts, t.loc) - 1
                if i not in self._stray_reported:
                    self._stray_reported.add(i)
                    self.error(t, "the rest of the line after 'ssh_pass' is taken as part of "
                                  "its value and not shown: quote a password that contains "
                                  "';', '{', '}', '#' or white space")
                return True
        return False

    def show(self, tok: _Tok) -> str:
        """How to name what was found at `tok` in an 'expected X, found Y' message."""
        if tok.kind in _ATOMS and self.hidden(tok):
            return "a value that is not shown"
        if tok.kind in ("word", "badchar", "semi", "lbrace", "rbrace"):
            return f"'{_clip(tok.text)}'"
        if tok.kind in ("string", "badstring"):
            return f"string {_clip(tok.text)}"
        if tok.loc >= len(self.text):
            return "end of file"
        m = re.compile(rf"{_WORD_RE}|{_STRING_RE}|\S").match(self.text, tok.loc)
        if m is None:
            return "end of file"
        return self.show(_Tok("word", m.group(), tok.loc, m.group()))

    def name(self, tok: _Tok) -> str:
        """A token's text for a message (quoted by the caller)."""
        return "(not shown)" if self.hidden(tok) else _clip(tok.value or tok.text)

    # -- parse tree walk ----------------------------------------------------------------------
    def run(self, items: Sequence[Any], toks: Sequence[_Tok], odd: Sequence[_Tok]) -> None:
        if "ssh_pass" in self.text:
            self._find_secrets(items, toks)
        for tok in odd:
            self._lexical(tok)
        blocks_after = [False] * (len(items) + 1)
        for i in range(len(items) - 1, -1, -1):
            blocks_after[i] = blocks_after[i + 1] or isinstance(items[i], _Block)
        for i, item in enumerate(items):
            if isinstance(item, _Block):
                nxt = items[i + 1] if i + 1 < len(items) else None
                self._block(item, nxt)
            elif isinstance(item, _Junk):
                if len(self.errors) >= _MAX_ISSUES and item.toks[0].value not in _TOP_KW:
                    self.more_errors += 1       # refused anyway: no need to look closer
                    continue
                self._junk(item, blocks_after[i + 1])
            elif item.kind == "rbrace":
                self.error(item, "unmatched '}' (the C daemon stops with a parse error)")
        self._global_checks()

    def _lexical(self, tok: _Tok) -> None:
        hidden = tok.kind in _ATOMS and self.hidden(tok)
        if tok.kind == "badchar":
            if hidden:
                self.error(tok, "unexpected character (not shown: it follows 'ssh_pass')")
            elif not tok.text[0].isprintable():
                self.error(tok, f"unexpected control character {_printable(tok.text[0])} (the "
                                "C daemon stops with a parse error)")
            else:
                self.error(tok, f"unexpected character '{tok.text[0]}' (not part of a word; "
                                "quote values that contain it)")
            return
        if tok.error:
            self.error(tok, tok.error)
        value = tok.value if tok.kind in ("string", "badstring") else tok.text
        if tok.kind in ("word", "string", "badstring") and not value.isprintable():
            bad = next(c for c in value if not c.isprintable())
            what = "a value that is not shown" if hidden else f"'{_clip(value)}'"
            if "\udc80" <= bad <= "\udcff":
                self.error(tok, f"{what} is not valid UTF-8 (byte 0x{ord(bad) - 0xdc00:02X}): "
                                "names and values must be UTF-8 text")
            else:
                code = "" if hidden else f" U+{ord(bad):04X}"
                self.error(tok, f"control character{code} in {what}: control characters are "
                                "not allowed in names and values")

    def _all_statements(self, items: Sequence[Any]) -> Iterable[_Stmt | _Junk]:
        for item in items:
            if isinstance(item, _Junk):
                yield item
            elif isinstance(item, _Block):
                for b in item.body:
                    if isinstance(b, _Stmt):
                        yield b

    def _junk(self, junk: _Junk, blocks_after: bool) -> None:
        toks = [t for t in junk.toks if t.kind != "badchar"]
        if not toks or self._stray_secret(toks):
            return
        first = toks[0]
        if first.kind in ("word", "string") and first.value in _TOP_KW:
            self._statement(self.top, toks)
            if blocks_after:
                self.warn(first, f"'{first.value}' outside a block: {_CWORD} stops reading the "
                                 "file at a statement outside a block and would miss the blocks "
                                 "after it (put it at the end of the file)")
            return
        if first.kind == "word" and first.text == "include":
            self.error(first, "'include' is not supported: copy the blocks of that file here "
                              f"({_CWORD}'s reader would splice it in)")
            return
        if first.kind == "word" and first.text in KINDS:
            where = toks[2] if len(toks) > 2 else junk.end
            what = " ".join(self.name(t) for t in toks[:2])
            self.error(where, f"expected '{{' after '{what}', found {self.show(where)}")
        else:
            self.error(first, "expected a block ('lb', 'server', 'client' or 'service' NAME "
                              f"{{ ... }};), found {self.show(first)} ({_CWORD} stops reading "
                              "the file here)")

    def _block(self, blk: _Block, nxt: Any) -> None:
        head = [t for t in blk.head if t.kind != "badchar"]
        if self._stray_secret(head):
            return
        rec = None
        if not head:
            self.error(blk.lbrace, "'{' without a block kind: expected 'lb', 'server', "
                                   "'client' or 'service' and a NAME before it")
            what = "block"
        elif head[0].kind not in ("word", "string") or head[0].value not in KINDS:
            hint = (" (the multi_proxy 'proxy' block is not part of the DSP language; use "
                    "'server' or 'client')" if head[0].text == "proxy" else "")
            self.error(head[0], f"unknown block kind {self.show(head[0])}: expected 'lb', "
                                f"'server', 'client' or 'service'{hint}")
            what = f"block '{self.name(head[0])}'"
        else:
            kind = head[0].value
            if len(head) < 2:
                self.error(blk.lbrace, f"expected a name after '{kind}', found '{{'")
                rec = _Rec(kind, "?", head[0], None, f"{kind} block '?'")
            else:
                rec = _Rec(kind, head[1].value, head[0], head[1],
                           f"{kind} block '{self.name(head[1])}'")
                if len(head) > 2:
                    self.error(head[2], f"expected '{{' after '{kind} {self.name(head[1])}', "
                                        f"found {self.show(head[2])}")
                self._check_name(rec)
            what = rec.desc
        self._close(blk, what, nxt)
        if rec is None:
            return
        self.recs.append(rec)
        for item in blk.body:
            if isinstance(item, _Stmt):
                self._statements(rec, item.toks)
            elif item.kind == "lbrace":
                self.error(item, f"unexpected '{{' inside {rec.desc} (blocks do not nest; is "
                                 "a '}' missing?)")
        self._finish(rec)

    def _close(self, blk: _Block, what: str, nxt: Any) -> None:
        close = blk.close
        if close[0].kind == "unclosed":
            self.error(close[0], f"expected '}}' to close {what} (opened at line "
                                 f"{self.line(blk.lbrace)}), found {self.show(close[0])}")
            return
        if blk.trail and not self._stray_secret(blk.trail):
            self.warn(blk.trail[0], f"text after the '}}' of {what} is ignored, as by {_CWORD} "
                                    f"(found {self.show(blk.trail[0])}; is a ';' missing?)")
        if close[1].kind != "nosemi":
            return
        if isinstance(nxt, _Block):
            self.error(close[1], f"expected ';' after the '}}' of {what}, found "
                                 f"{self.show(close[1])} ({_CWORD} would take the block that "
                                 "follows as part of this statement and ignore it)")
        elif close[1].loc >= len(self.text):
            self.warn(close[1], f"expected ';' after the '}}' of {what}, found end of file "
                                f"(accepted, as by {_CWORD})")

    def _check_name(self, rec: _Rec) -> None:
        tok = rec.name_tok
        if rec.kind == "service":
            if not rec.name:
                self.error(tok, "empty service name")
            return
        if not rec.name or any(c.isspace() for c in rec.name):
            self.error(tok, f"bad node name {self.show(tok)}: it must be a non-empty word")
        elif len(rec.name.encode("utf-8", "surrogateescape")) > MAX_NAME and rec.name.isprintable():
            self.warn(tok, f"node name '{self.name(tok)}' is too long: at most {MAX_NAME} "
                           f"characters (the kernel's names are {C.MAXNODENAME} bytes); the "
                           f"kernel gets '{_kernel_name(rec.name)}', as with {_CWORD}")

    def _finish(self, rec: _Rec) -> None:
        """After a block: `proxyid` (the old spelling) and the C daemon's keyword order."""
        if "proxyid" in rec.seen:
            ptok = rec.seen.pop("proxyid")
            pval = rec.values.pop("proxyid", None)
            if "nodeid" in rec.seen:
                self.warn(ptok, f"'proxyid' is ignored: 'nodeid' is given at line "
                                f"{self.line(rec.seen['nodeid'])} ({_CWORD} does not know "
                                "proxyid)")
            else:
                rec.seen["nodeid"] = ptok
                if pval is not None:
                    rec.values["nodeid"] = pval
                self.warn(ptok, "'proxyid' is the old multi_proxy spelling of 'nodeid': read "
                                f"as nodeid here, but {_CWORD} does not know it")
        first = rec.first_c_kw
        if first is not None and first.value != "nodeid" and "nodeid" in rec.seen \
                and rec.seen["nodeid"].value == "nodeid":
            self.warn(first, f"'nodeid' should be the first keyword of {rec.desc}: {_CWORD} "
                             f"stops reading the file at '{first.value}'")

    # -- statements ---------------------------------------------------------------------------
    def _statements(self, rec: _Rec, toks: Sequence[Any]) -> None:
        if len(toks) == 1:
            t = toks[0]
            if (len(self.warnings) >= _MAX_ISSUES and t.kind == "word"
                    and t.value not in _KEYWORDS[rec.kind]):
                self.more_warnings += 1     # a lone unknown word: counted only
            else:
                self._statement(rec, toks)
            return
        # An unterminated string runs to the end of its line: what follows is a new statement.
        start = 0
        for i, t in enumerate(toks):
            if isinstance(t, _Tok) and t.kind == "badstring":
                self._statement(rec, toks[start:i + 1])
                start = i + 1
        if start < len(toks):
            self._statement(rec, toks[start:])

    @staticmethod
    def _is_kw(item: Any, table: Mapping[str, _Kw]) -> bool:
        return isinstance(item, _Tok) and item.kind in ("word", "string") and item.value in table

    def _statement(self, rec: _Rec, items: Sequence[Any]) -> None:
        """One `;`-statement, read as the C daemon reads it; after a missing `;` the keywords
        that follow are read too (a loop: a statement may hold any number of them)."""
        items = [t for t in items if not (isinstance(t, _Tok) and t.kind == "badchar")]
        if not items or self._stray_secret(items):
            return
        table = _KEYWORDS[rec.kind]
        start: int | None = 0
        while start is not None:
            start = self._keyword(rec, table, items, start)

    def _next_kw(self, table: Mapping[str, _Kw], items: Sequence[Any], i: int) -> int | None:
        return next((j for j in range(i, len(items)) if self._is_kw(items[j], table)), None)

    def _keyword(self, rec: _Rec, table: Mapping[str, _Kw], items: Sequence[Any],
                 start: int) -> int | None:
        """Read the keyword at or after items[start]; the index to go on from, or None."""
        k = self._next_kw(table, items, start)
        if k != start:
            self._ignored(rec, items[start:k] if k is not None else items[start:],
                          items[k] if k is not None else None)
            if k is None:
                return None
        head = items[k]
        kw = head.value
        spec = table[kw]
        n = len(items)
        if spec.type == _ADDRS:
            e = k + 1
            while e < n and not isinstance(items[e], _Sub) and not self._is_kw(items[e], table):
                e += 1
            nvals = e - k - 1
        else:
            nvals = 2 if spec.type == _PAIR else 1
        vals = items[k + 1:k + 1 + nvals]
        secret = kw in _SECRET
        if rec.kind in _C_KEYWORDS and kw in _C_KEYWORDS[rec.kind] and rec.first_c_kw is None:
            rec.first_c_kw = head
        if any(isinstance(v, _Sub) for v in vals):
            self.error(head, f"'{kw}' expects a value, found '{{' ({_CWORD} stops reading the "
                             "file here)")
            rec.seen.setdefault(kw, head)
            return None
        if vals and self._is_kw(vals[0], table) and n > k + 2:
            # "ssh_pass" alone on its line, then "vm_start x;": the value and ';' are missing
            took = "it" if secret else f"'{vals[0].value}'"
            self.error(head, f"'{kw}' needs a value ({_CWORD} would take {took} as the value "
                             "and ignore the rest of the statement; is a ';' missing?)")
            rec.seen.setdefault(kw, head)
            return k + 1
        if len(vals) < max(nvals, 1):
            self.error(head, f"'{kw}' needs two values: MIN MAX" if nvals == 2 else
                             f"'{kw}' needs a value")
            rec.seen.setdefault(kw, head)
            return None
        e = k + 1 + len(vals)
        nxt = self._next_kw(table, items, e) if e < n else None
        if e < n:
            self._extra(rec, kw, spec, vals, items, e, nxt)
        value = self._convert(rec, kw, spec, vals)
        self._store(rec, kw, head, value, vals)
        if spec.type == _OBSOLETE:
            self.warn(head, f"'{kw}' is obsolete and ignored")
        return nxt

    def _extra(self, rec: _Rec, kw: str, spec: _Kw, vals: Sequence[_Tok],
               items: Sequence[Any], e: int, nxt: int | None) -> None:
        """Words from items[e] on, after a value: C ignores them (a keyword among them, also in
        a sub-list, is a lost setting)."""
        table = _KEYWORDS[rec.kind]
        first = items[e]
        if nxt is not None:
            lost: _Tok | None = items[nxt]
        else:
            lost = next((t for t in _flat(items[e:]) if self._is_kw(t, table)), None)
        where = first.lbrace if isinstance(first, _Sub) else first
        if kw in _SECRET:
            self.error(where, f"expected ';' after the value of '{kw}' (values not shown; "
                              f"{_CWORD} would take only the first word as the password)")
            return
        shown = " ".join(_clip(v.text) for v in vals)
        msg = f"expected ';' after '{kw} {shown}', found {self.show(where)}"
        if lost is not None:
            self.error(where, f"{msg} ({_CWORD} reads one keyword per statement and would "
                              f"ignore '{self.name(lost)}')")
        elif spec.type in (_TEXT, _STRING):
            self.error(where, f"{msg} ({_CWORD} would take only '{shown}' as the value; quote "
                              "a value with spaces)")
        else:
            self.warn(where, f"{msg}: the rest of the statement is ignored, as by {_CWORD}")

    def _store(self, rec: _Rec, kw: str, head: _Tok, value: Any, vals: Sequence[_Tok]) -> None:
        if kw in rec.seen:
            first = rec.seen[kw]
            msg = f"'{kw}' is set twice in {rec.desc}: first at line {self.line(first)}"
            if kw in ("nodeid", "proxyid"):
                self.error(head, f"{msg} ({_CWORD} stops reading the file here)")
                return
            self.warn(head, f"{msg}; the later value is used, as by {_CWORD}")
        rec.seen[kw] = head
        if value is _BAD or value is None:
            rec.values.pop(kw, None)
        else:
            rec.values[kw] = _Val(value, head, tuple(vals))

    def _ignored(self, rec: _Rec, lead: Sequence[Any], kwtok: _Tok | None) -> None:
        """Words before a statement's keyword (or a statement without one): C warns, ignores."""
        if len(self.warnings) >= _MAX_ISSUES:
            self.more_warnings += 1
            return
        head = lead[0]
        after = (f"; ignored up to '{kwtok.value}', which is read" if kwtok is not None
                 else "; the statement is ignored")
        after += f" (as by {_CWORD})"
        if isinstance(head, _Sub):
            self.warn(head.lbrace, f"a '{{ ... }}' sub-list without a keyword in {rec.desc}"
                                   f"{after}")
            return
        if self.hidden(head):
            self.warn(head, f"unknown keyword (not shown) in {rec.desc}{after}")
            return
        if head.kind == "word" and head.text.startswith("#"):
            self.warn(head, f"'{_clip(head.text)}' is not a comment: '#' starts one only after "
                            f"white space{after}")
            return
        if head.kind == "word" and head.text.startswith("//"):
            self.warn(head, f"'//' does not start a comment (use '#'): the words up to "
                            f"{'the keyword' if kwtok else 'the next'} "
                            f"'{kwtok.value if kwtok else ';'}' are ignored, as by {_CWORD}")
            return
        if head.kind != "word":
            self.warn(head, f"expected a keyword of the {rec.kind} block, found "
                            f"{self.show(head)}{after}")
            return
        table = _KEYWORDS[rec.kind]
        names = [k for k, s in table.items() if k != "proxyid" and s.type != _OBSOLETE]
        other = [k for k, t in _KEYWORDS.items()
                 if head.text in t and k not in (rec.kind, "top")]
        if head.text in _TOP_KW and rec.kind != "top":
            other.append("top level")
        if other:
            hint = f" (it belongs in {' or '.join(other)} blocks)"
        elif self.more_warnings:
            hint = ""
        else:
            close = difflib.get_close_matches(head.text, list(table), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
        where = "at the top level" if rec.kind == "top" else f"in {rec.desc}"
        self.warn(head, f"unknown keyword '{_clip(head.text)}' {where}{hint}; expected one "
                        f"of: {', '.join(names)}{after}")

    def _convert(self, rec: _Rec, kw: str, spec: _Kw, vals: Sequence[_Tok]) -> Any:
        v = vals[0]
        if spec.type in (_INT, _PAIR):
            nums = [self._int(kw, spec, t) for t in vals]
            if any(n is _BAD for n in nums):
                return _BAD
            if spec.type == _INT:
                return nums[0]
            if nums[0] > nums[1]:
                self.error(vals[1], f"'{kw}' MAX {nums[1]} is smaller than MIN {nums[0]}")
                return _BAD
            return nums[0], nums[1]
        if spec.type == _ADDRS:
            return self._addrs(kw, vals)
        text = v.value
        low = text.lower()
        if spec.type == _BOOL:
            if low in ("yes", "no"):
                return low == "yes"
            if low.startswith(("yes", "no")):
                flag = low.startswith("yes")
                self.warn(v, f"'{kw}' expects YES or NO, found {self.show(v)}: read as "
                             f"{_yn(flag)}, as {_CWORD} does (it compares only the first "
                             "letters)")
                return flag
            self.error(v, f"'{kw}' expects YES or NO, found {self.show(v)}")
            return _BAD
        if spec.type == _PROTO:
            if low == "tcp":
                return "tcp"
            for p in ("tcp", "udp", "tipc"):
                if low.startswith(p):
                    note = "" if p == "tcp" else ": treated as tcp"
                    if low == p:
                        self.warn(v, f"proto {text} is not supported{note}")
                    else:
                        self.warn(v, f"proto {self.show(v)} is read as {p}, as by {_CWORD}"
                                     f"{' (not supported' + note + ')' if note else ''}")
                    return "tcp"
            self.warn(v, f"'proto' expects tcp, found {self.show(v)}: ignored, tcp is used (as "
                         f"by {_CWORD})")
            return "tcp"
        if spec.type == _BIND:
            if text in BIND_TYPES:
                return text
            self.error(v, f"'bind' expects replica, local, backup or external, found "
                          f"{self.show(v)} ({_CWORD} exits with 'Configuration Error')")
            return _BAD
        if spec.type == _STRING and v.kind not in ("string", "badstring"):
            self.error(v, f"'{kw}' expects a quoted string, found {self.show(v)}")
            return _BAD
        if not text:
            self.warn(v, f"'{kw}' must not be empty: treated as not set")
            return None
        return text

    def _addrs(self, kw: str, vals: Sequence[_Tok]) -> Any:
        out: list[str] = []
        for v in vals:
            for a in v.value.split():
                if _norm_ip(a) is None and not _HOST_RE.fullmatch(a):
                    self.error(v, f"'{kw}': '{_clip(a)}' is neither an IP address nor a host "
                                  "name")
                    return _BAD
                out.append(a)
        if not out:
            self.error(vals[0], f"'{kw}' needs at least one address")
            return _BAD
        return tuple(out)

    def _int(self, kw: str, spec: _Kw, tok: _Tok) -> Any:
        text = tok.value.lstrip(_WS)
        m = _ATOI_RE.match(text)
        if m is None:
            self.error(tok, f"'{kw}' expects a decimal integer, found {self.show(tok)} "
                            f"({_CWORD} would read it as 0)")
            return _BAD
        digits = m.group()
        rest = text[m.end():]
        lo, hi = spec.rng(self.dvs) if spec.rng is not None else (None, None)
        if len(digits.lstrip("+-").lstrip("0")) > _MAX_DIGITS:
            self.error(tok, f"'{kw}' value {self.show(tok)} is out of range {lo}..{hi}"
                            f"{spec.why}")
            return _BAD
        n = int(digits)
        if rest:
            if digits.lstrip("+-") == "0" and rest[0] in "xX":
                self.error(tok, f"'{kw}' expects a decimal integer, found {self.show(tok)} "
                                f"(only decimal numbers are accepted; {_CWORD} would read it "
                                "as 0)")
                return _BAD
            if re.match(r"[.,eE][0-9]", rest):
                self.error(tok, f"'{kw}' expects a decimal integer, found {self.show(tok)} "
                                f"({_CWORD} would read it as {n}: write a whole number)")
                return _BAD
            self.warn(tok, f"'{kw}' expects a decimal integer, found {self.show(tok)}: read as "
                           f"{n}, as {_CWORD}'s atoi() does")
        if lo is not None and not lo <= n <= hi:
            self.error(tok, f"'{kw}' value {n} is out of range {lo}..{hi}{spec.why}")
            return _BAD
        return n

    # -- global checks ------------------------------------------------------------------------
    def _global_checks(self) -> None:
        lbs = [r for r in self.recs if r.kind == "lb"]
        nodes = [r for r in self.recs if r.kind in ("server", "client")]
        services = [r for r in self.recs if r.kind == "service"]
        servers = [r for r in nodes if r.kind == "server"]
        for extra in lbs[1:]:
            self.error(extra.kind_tok, f"only one lb block is allowed: lb block "
                                       f"'{lbs[0].name}' is at line {self.line(lbs[0].kind_tok)}")
        lb = lbs[0] if lbs else None
        for rec in lbs[:1] + nodes:
            if "nodeid" not in rec.seen:
                self.error(rec.kind_tok, f"{rec.desc} has no nodeid (required)")
        self._names(lbs[:1] + nodes)
        self._node_ids(lbs[:1] + nodes)
        self._services(services)
        if services and lb is None:
            self.error(services[0].kind_tok, f"service '{services[0].name}' needs an lb block "
                                             "(services are reached through the lb node)")
        if lb is not None:
            self._lb(lb, servers)
            self._relay(lb, nodes)
            self._lb_names(lb, nodes)
        elif servers:
            for s in servers:
                if "node_image" in s.values:
                    self.error(s.values["node_image"].kw, f"{s.desc} has node_image but there "
                               "is no lb block with vm_start/vm_stop/vm_status to start it")
        self._liveness(lb)
        self._ports(nodes)
        self._local(lb, nodes)
        self._addresses(nodes)
        if not nodes and not self.errors:
            self.error(None, "no server or client block: the file defines no node to connect")

    def _liveness(self, lb: _Rec | None) -> None:
        """Liveness keywords may be given outside the blocks too; the lb block's win."""
        if lb is None:
            return
        for kw in _TOP_KW:
            if kw in self.top.seen and kw in lb.seen:
                self.warn(self.top.seen[kw], f"'{kw}' is given both at the top level and in "
                          f"{lb.desc} (line {self.line(lb.seen[kw])}): the lb block's value "
                          "is used")

    def _relay(self, lb: _Rec, nodes: Sequence[_Rec]) -> None:
        """Relayed mode: `cltname` naming a node of the config makes it the LB host of the
        client nodes, which then need the `lb_eps` range for their translated endpoints."""
        host = next((n for n in nodes if n.name == lb.get("cltname")), None)
        if host is None or "cltname" not in lb.values:
            return
        relayed = [n for n in nodes if n.kind == "client" and n is not host]
        if relayed and "lb_eps" not in lb.values:
            self.error(lb.vtok("cltname"), f"cltname '{host.name}' names a node: the client "
                       f"nodes reach the lb through it (relayed mode), which needs lb_eps "
                       f"MIN MAX for their translated endpoints")

    def _lb_names(self, lb: _Rec, nodes: Sequence[_Rec]) -> None:
        """`cltname`/`svrname` that name no node of the file: a warning with a suggestion."""
        if len(self.errors) >= _MAX_ISSUES:
            return                      # refused anyway; spare the name comparisons
        known = [lb.name] + [n.name for n in nodes]
        for kw in ("cltname", "svrname"):
            value = lb.get(kw)
            if value is None or value in known:
                continue
            close = difflib.get_close_matches(value, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            self.warn(lb.vtok(kw), f"{kw} '{_clip(value)}' names no node of this file{hint}: "
                      + ("client nodes balance their own sessions (no relayed mode)"
                         if kw == "cltname" else
                         "the lowest-id live server makes the autoscaling decisions"))

    def _names(self, recs: Sequence[_Rec]) -> None:
        first: dict[str, _Rec] = {}
        kernel: dict[str, _Rec] = {}
        for rec in recs:
            if rec.name_tok is None:
                continue
            if rec.name in first:
                prev = first[rec.name]
                self.warn(rec.name_tok, f"duplicate node name '{self.name(rec.name_tok)}': "
                          f"already used by {prev.kind} block at line "
                          f"{self.line(prev.kind_tok)} (both blocks are kept, as by {_CWORD}; "
                          "they reach the same host)")
                continue
            first[rec.name] = rec
            kname = _kernel_name(rec.name)
            if kname in kernel and kernel[kname].name != rec.name:
                prev = kernel[kname]
                self.error(rec.name_tok, f"node names '{self.name(rec.name_tok)}' and "
                           f"'{self.name(prev.name_tok)}' (line {self.line(prev.kind_tok)}) "
                           f"are the same in their first {MAX_NAME} bytes: the kernel (and "
                           f"{_CWORD}) would see two nodes named '{kname}'")
            kernel.setdefault(kname, rec)

    def _node_ids(self, recs: Sequence[_Rec]) -> None:
        first: dict[int, _Rec] = {}
        for rec in recs:
            nid = rec.get("nodeid")
            if nid is None:
                continue
            if nid in first:
                prev = first[nid]
                msg = (f"duplicate node id {nid}: {rec.desc} reuses the id given to "
                       f"{prev.desc} at line {self.line(prev.vtok('nodeid'))}")
                both = all(r.values["nodeid"].kw.value == "nodeid" for r in (rec, prev))
                if both and "lb" not in (rec.kind, prev.kind):
                    msg += (f" ({_CWORD} would let this block silently overwrite "
                            f"'{self.name(prev.name_tok)}')") if prev.name_tok else ""
                self.error(rec.vtok("nodeid"), msg)
            else:
                first[nid] = rec

    def _services(self, services: Sequence[_Rec]) -> None:
        lo_user = self.dvs.d_nr_sysprocs - self.dvs.d_nr_tasks
        done: list[tuple[_Rec, int, int, int, int]] = []
        by_dc: dict[int, list[tuple[_Rec, int, int, int, int]]] = {}
        names: dict[str, _Rec] = {}
        for rec in services:
            key = rec.name.lower()
            if rec.name_tok is not None and key in names:
                prev = names[key]
                self.error(rec.name_tok, f"duplicate service name '{self.name(rec.name_tok)}': "
                           f"service '{prev.name}' is at line {self.line(prev.kind_tok)} (names "
                           "are case-insensitive)")
            names.setdefault(key, rec)
            bind, prog = rec.get("bind"), rec.get("prog")
            if bind not in (None, "external") and "prog" not in rec.seen:
                self.warn(rec.vtok("bind"), f"bind {bind} needs a 'prog' to start the service: "
                          f"without one the service is external (started by hand), as with "
                          f"{_CWORD}")
                rec.values["bind"] = _Val("external", rec.values["bind"].kw,
                                          rec.values["bind"].toks)
            elif prog is not None and bind in (None, "external") and (
                    "bind" not in rec.seen or bind is not None):
                self.warn(rec.vtok("prog"), f"service '{rec.name}': prog is never run because "
                          "bind is external (give bind replica, local or backup)")
            if prog is not None:
                self._command(rec, "prog")
            ext = rec.get("ext_ep")
            if "ext_ep" not in rec.seen:
                self.error(rec.kind_tok, f"{rec.desc} has no ext_ep (required: the endpoint "
                                         "clients address)")
            has_min, has_max = "min_ep" in rec.seen, "max_ep" in rec.seen
            if has_min != has_max:
                given, missing = ("min_ep", "max_ep") if has_min else ("max_ep", "min_ep")
                self.error(rec.seen[given], f"'{given}' needs '{missing}' too (give both or "
                                            "neither)")
                continue
            lo, hi = rec.get("min_ep"), rec.get("max_ep")
            if ext is None or (has_min and (lo is None or hi is None)):
                continue
            if not has_min:
                lo = hi = ext
            if lo > hi:
                self.warn(rec.vtok("min_ep"), f"min_ep {lo} is greater than max_ep {hi}: the "
                          f"range is empty, only ext_ep {ext} is served ({_CWORD} does not "
                          "check it)")
                lo = hi = ext
            elif not lo <= ext <= hi:
                self.warn(rec.vtok("ext_ep"), f"ext_ep {ext} is outside min_ep..max_ep "
                          f"{lo}..{hi} ({_CWORD} does not check it; both are served)")
            if hi >= lo_user:
                first_user = max(lo, lo_user)
                self.warn(rec.vtok("max_ep") or rec.vtok("ext_ep"),
                          f"service '{rec.name}': endpoints {first_user}..{hi} are not system "
                          f"endpoints (>= d_nr_sysprocs - d_nr_tasks = {lo_user}); servers "
                          "bound there could not receive client requests")
            dcid = rec.get("dcid", ANY_DC)
            if len(self.errors) >= _MAX_ISSUES:
                cands: Sequence[tuple[_Rec, int, int, int, int]] = ()  # refused anyway
                self.truncated = True
            elif dcid == ANY_DC:
                cands = done
            else:                   # the same DC and the any-DC services, in file order
                cands = sorted(by_dc.get(dcid, []) + by_dc.get(ANY_DC, []),
                               key=lambda c: c[0].kind_tok.loc)
            for prev, pdc, plo, phi, pext in cands:
                if ext == pext:
                    self.error(rec.vtok("ext_ep"), f"duplicate ext_ep {ext} in DC "
                               f"{_dc(dcid, pdc)}: service '{prev.name}' (line "
                               f"{self.line(prev.kind_tok)}) uses it")
                    break
                if lo <= phi and plo <= hi:
                    msg = (f"endpoints {lo}..{hi} of service '{rec.name}' overlap "
                           f"{plo}..{phi} of service '{prev.name}' (line "
                           f"{self.line(prev.kind_tok)}) in DC {_dc(dcid, pdc)}")
                    where = rec.vtok("min_ep") or rec.vtok("ext_ep")
                    if plo <= ext <= phi or lo <= pext <= hi:
                        self.error(where, f"{msg}: one's ext_ep lies in the other's range, so "
                                          "requests to it could reach the wrong service")
                    else:
                        self.warn(where, f"{msg}: an endpoint in both belongs to "
                                         f"'{prev.name}', the first ({_CWORD} does not check "
                                         "it)")
                    break
            done.append((rec, dcid, lo, hi, ext))
            by_dc.setdefault(dcid, []).append(done[-1])

    def _command(self, rec: _Rec, kw: str) -> None:
        """A command the DSP runs (a service's prog, a VM command) is split into words as a
        shell would: say so now when that fails, not only when the command is needed (each
        run of it then fails, logged)."""
        try:
            words = shlex.split(rec.get(kw))
        except ValueError as exc:
            self.warn(rec.vtok(kw), f"{kw} cannot be split into words ({exc}: unbalanced "
                                    "quotes or a trailing backslash); running it will fail")
            return
        if not words:
            self.warn(rec.vtok(kw), f"{kw} names no program; running it will fail")

    def _lb(self, lb: _Rec, servers: Sequence[_Rec]) -> None:
        for kw in ("vm_start", "vm_stop", "vm_status"):
            if lb.get(kw) is not None:
                self._command(lb, kw)

        def later(*kws: str) -> _Tok:
            toks = [lb.vtok(k) for k in kws if lb.vtok(k) is not None]
            return max(toks, key=lambda t: t.loc) if toks else lb.kind_tok

        low, high = lb.get("lowwater", 30), lb.get("highwater", 70)
        if low > high:
            self.error(later("lowwater", "highwater"),
                       f"lowwater {low} is greater than highwater {high}")
        period = lb.get("period", 30)
        hello = lb.get("hello_time")
        if hello is not None and hello > period:
            self.error(lb.vtok("hello_time"), f"hello_time {hello} is greater than period "
                                              f"{period}")
        if not servers:
            self.error(lb.kind_tok, f"{lb.desc} needs at least one server block")
        else:
            nsrv = len(servers)
            mn, mx = lb.get("min_servers", 1), lb.get("max_servers", nsrv)
            if mx > nsrv:
                self.error(lb.vtok("max_servers"), f"max_servers {mx} exceeds the number of "
                                                   f"server blocks ({nsrv})")
            elif mn > mx:
                what = "max_servers" if "max_servers" in lb.values else (
                    "max_servers (the number of server blocks)")
                self.error(lb.vtok("min_servers"), f"min_servers {mn} is greater than "
                                                   f"{what} {mx}")
        imaged = [s for s in servers if "node_image" in s.values]
        missing = [k for k in ("vm_start", "vm_stop", "vm_status") if k not in lb.values]
        if imaged and missing:
            s = imaged[0]
            self.error(lb.kind_tok, f"{lb.desc} must set {', '.join(missing)}: {s.desc} (line "
                                    f"{self.line(s.kind_tok)}) has a node_image to start")
        if "ssh_host" not in lb.seen:
            for k in ("ssh_user", "ssh_pass"):
                if k in lb.seen:
                    self.warn(lb.seen[k], f"'{k}' is ignored without ssh_host (VM commands run "
                                          "locally)")

    def _ports(self, nodes: Sequence[_Rec]) -> None:
        users: dict[int, _Rec] = {}
        for rec in sorted(nodes, key=lambda r: "rport" not in r.values):  # explicit first
            nid = rec.get("nodeid")
            if nid is None or nid == self.local:
                continue
            port = rec.get("rport", BASE_PORT + nid)
            if port in users:
                prev = users[port]
                if "rport" not in rec.values and "rport" not in prev.values:
                    continue                    # equal default ports: a duplicate id, reported
                later, earlier = (rec, prev) if "rport" in rec.values else (prev, rec)
                self.error(later.vtok("rport"), f"inconsistent ports: {later.desc} listens on "
                           f"rport {port}, already the rport of {earlier.desc} (line "
                           f"{self.line(earlier.kind_tok)})")
            else:
                users[port] = rec

    def _local(self, lb: _Rec | None, nodes: Sequence[_Rec]) -> None:
        local = self.local
        if local is None:
            return
        if not 0 <= local < self.dvs.d_nr_nodes:
            self.error(None, f"local node id {local} is out of range 0..{self.dvs.d_nr_nodes - 1}")
            return
        if lb is not None and lb.get("nodeid") == local:
            self.warn(lb.vtok("nodeid"), f"the local node {local} is the lb's virtual node id: "
                      "it runs proxies for every configured node and no LB pair, as "
                      f"{_CWORD} does there (it does not balance)")
        elif not any(r.get("nodeid") == local for r in nodes):
            self.warn(None, f"local node {local} has no server or client block in this file: "
                      f"it runs proxies for every configured node, as {_CWORD} does")
        for rec in nodes:
            peer = rec.get("nodeid")
            if peer is None or peer == local:
                continue
            sport, rport = rec.get("sport"), rec.get("rport")
            if sport is not None and sport != BASE_PORT + local:
                self.warn(rec.vtok("sport"), f"sport {sport} of {rec.desc}: the port scheme "
                          f"expects {BASE_PORT + local} (node L reaches peer P at P:3000+L and P "
                          f"listens for L there; local node L = {local})")
            if rport is not None and rport != BASE_PORT + peer:
                self.warn(rec.vtok("rport"), f"rport {rport} of {rec.desc}: the port scheme "
                          f"expects {BASE_PORT + peer} (node L listens for peer P on 3000+P, "
                          "where P's sender connects)")

    def _addresses(self, nodes: Sequence[_Rec]) -> None:
        seen: dict[str, _Rec] = {}
        for rec in nodes:
            if "rname" not in rec.values:
                continue
            addr = rec.get("rname")
            if addr in seen:
                self.warn(rec.vtok("rname"), f"{rec.desc} has the same rname '{addr}' as "
                          f"{seen[addr].desc} (their listeners would clash on one host)")
            else:
                seen[addr] = rec

    # -- result -------------------------------------------------------------------------------
    def build(self) -> Config:
        lb = None
        nodes: list[NodeConfig] = []
        services: list[ServiceConfig] = []
        nsrv = sum(1 for r in self.recs if r.kind == "server")
        lbrec = next((r for r in self.recs if r.kind == "lb"), None)
        live = {k: (lbrec.get(k) if lbrec is not None and k in lbrec.values
                    else self.top.get(k, d)) for k, d in LIVENESS_DEFAULTS.items()}
        for rec in self.recs:
            line, col = self.pos(rec.kind_tok)
            g = rec.get
            if rec is lbrec:
                period = g("period", 30)
                lb = LbConfig(
                    name=rec.name, nodeid=g("nodeid"), lowwater=g("lowwater", 30),
                    highwater=g("highwater", 70), period=period,
                    hello_time=g("hello_time", min(30, period)), start=g("start", 60),
                    stop=g("stop", 60), min_servers=g("min_servers", 1),
                    max_servers=g("max_servers", nsrv), cltname=g("cltname"),
                    svrname=g("svrname"), vm_start=g("vm_start"), vm_stop=g("vm_stop"),
                    vm_status=g("vm_status"), ssh_host=g("ssh_host"), ssh_user=g("ssh_user"),
                    ssh_pass=g("ssh_pass"), session_timeout=g("session_timeout", 300),
                    max_sessions=g("max_sessions",
                                   self.dvs.d_nr_procs - self.dvs.d_nr_sysprocs),
                    fd_interval=live["fd_interval"], fd_fall=live["fd_fall"],
                    fd_rise=live["fd_rise"], lb_eps=g("lb_eps"), line=line, col=col)
            elif rec.kind in ("server", "client"):
                nodes.append(NodeConfig(
                    name=rec.name, role=rec.kind, nodeid=g("nodeid"),
                    rname=g("rname", rec.name), rname_explicit="rname" in rec.values,
                    extra_addrs=g("addrs", ()),
                    proto=g("proto", "tcp"), rport=g("rport"), sport=g("sport"),
                    compress=g("compress", False), batch=g("batch", False),
                    autobind=g("autobind", False), node_image=g("node_image"),
                    line=line, col=col))
            elif rec.kind == "service":
                ext = g("ext_ep")
                lo, hi = g("min_ep", ext), g("max_ep", ext)
                if lo > hi:
                    lo = hi = ext
                services.append(ServiceConfig(
                    name=rec.name, ext_ep=ext, min_ep=lo, max_ep=hi,
                    dcid=g("dcid", ANY_DC), bind=g("bind", "external"), prog=g("prog"),
                    line=line, col=col))
        return Config(path=self.path, lb=lb, nodes=tuple(nodes), services=tuple(services),
                      warnings=tuple(_sorted(self.warnings)), local_node=self.local,
                      dvs=self.dvs, fd_interval=live["fd_interval"], fd_fall=live["fd_fall"],
                      fd_rise=live["fd_rise"])


def _dc(a: int, b: int) -> str:
    dc = max(a, b)
    return "any" if dc == ANY_DC else str(dc)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


MAX_FILE_SIZE = 16 * 1024 * 1024
"""Larger config files are refused unread (a real one is a few KB)."""


def _parse(text: str, path: str, dvs: DvsInfo | None, local_node: int | None,
           strict: bool) -> Config:
    """The reader and checker proper: ConfigError for every problem in `text`."""
    checker = _Checker(text, path, dvs or DvsInfo(), local_node)
    # A large file makes a million small tuples, none of them cyclic: without the cyclic
    # collector running over and over meanwhile, reading is several times faster.
    collecting = gc.isenabled()
    gc.disable()
    try:
        toks, odd = _tokenize(text)
        checker.run(_structure(toks, len(text)), toks, odd)
    finally:
        if collecting:
            gc.enable()
    errors, warnings = checker.errors, checker.warnings
    if checker.more_errors or checker.truncated:
        more = f"{checker.more_errors} more errors not shown" if checker.more_errors else ""
        skipped = "some checks were skipped after 100 errors" if checker.truncated else ""
        errors.append(Issue(path, 0, 0, "; ".join(x for x in (more, skipped) if x)))
    if checker.more_warnings:
        warnings.append(Issue(path, 0, 0, f"{checker.more_warnings} more warnings not shown",
                              "warning"))
    if strict and warnings:
        errors = errors + [dataclasses.replace(w, severity="error") for w in warnings]
        warnings = []
    if errors:
        raise ConfigError(_sorted(errors), _sorted(warnings))
    cfg = checker.build()
    log.debug("config %s: lb=%s, %d nodes, %d services, %d warnings", path,
              cfg.lb_nodeid, len(cfg.nodes), len(cfg.services), len(cfg.warnings))
    return cfg


def parse_text(text: str, path: str = "<string>", dvs: DvsInfo | None = None,
               local_node: int | None = None, strict: bool = False) -> Config:
    """Parse and check config `text`; raise ConfigError listing every error found.

    `dvs` supplies the kernel limits (DVK defaults when None); `local_node`, when known, enables
    the port-scheme warnings and the local-node checks; `strict` makes every warning an error.
    Nothing but ConfigError leaves this function: a checker bug is logged with its traceback
    and reported as a config error, so a reload keeps the running configuration."""
    try:
        return _parse(text, path, dvs, local_node, strict)
    except ConfigError:
        raise
    except Exception as exc:            # a bug of this module must not end the daemon
        log.exception("internal error while checking %s", path)
        raise ConfigError([Issue(path, 0, 0, "internal error of the config checker "
                                             f"({type(exc).__name__}); see the log")]) from None


def load(path: str | Path, dvs: DvsInfo | None = None, local_node: int | None = None,
         strict: bool = False) -> Config:
    """Read and check the config file `path` (see parse_text); unreadable file -> ConfigError."""
    p = str(path)
    try:
        raw = read_regular_file(p, MAX_FILE_SIZE + 1)
    except OSError as exc:
        raise ConfigError([Issue(p, 0, 0, f"cannot read the config file: "
                                          f"{exc.strerror or exc}")]) from None
    except ValueError as exc:           # e.g. a NUL in the path
        raise ConfigError([Issue(p, 0, 0, f"cannot read the config file: {exc}")]) from None
    if len(raw) > MAX_FILE_SIZE:
        raise ConfigError([Issue(p, 0, 0, f"the config file is larger than {MAX_FILE_SIZE} "
                                          "bytes")])
    # Undecodable bytes survive as surrogate escapes, which the checker reports.
    return parse_text(raw.decode("utf-8", errors="surrogateescape"), p, dvs, local_node, strict)


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def _yn(flag: bool) -> str:
    return "YES" if flag else "NO"


def _table(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths))).rstrip() for r in rows]


def format_summary(cfg: Config, local_node: int | None = None) -> str:
    """A one-screen overview of the cluster for `--check` and logs; never shows `ssh_pass`."""
    local = cfg.local_node if local_node is None else local_node
    out = [f"DSP configuration {_printable(cfg.path)}"
           + (f" (local node {local})" if local is not None else "")]
    if local is not None:
        out.append(f"role: {cfg.role(local).describe()}")
    lb = cfg.lb
    if lb is None:
        out.append("no lb block: plain proxy between the configured nodes")
    else:
        extra = "".join(f"  {k} {getattr(lb, k)}" for k in ("cltname", "svrname")
                        if getattr(lb, k))
        eps = f"{lb.lb_eps[0]}..{lb.lb_eps[1]}" if lb.lb_eps else "none"
        host = cfg.node_by_name(lb.cltname) if lb.cltname else None
        mode = (f"relayed: client nodes reach the lb through {host.name} (node {host.nodeid})"
                if host is not None else "local clients: each client node's DSP balances")
        out += [
            f"lb {lb.name}: virtual node {lb.nodeid}{extra}",
            f"  sessions:  {mode}",
            f"  load:      lowwater {lb.lowwater}%  highwater {lb.highwater}%  "
            f"servers {lb.min_servers}..{lb.max_servers}",
            f"  timers:    period {lb.period}s  hello_time {lb.hello_time}s  start {lb.start}s  "
            f"stop {lb.stop}s",
            f"  table:     timeout {lb.session_timeout}s  max {lb.max_sessions}/DC  "
            f"lb_eps {eps}",
            f"  liveness:  fd_interval {lb.fd_interval}ms  fd_fall {lb.fd_fall}  "
            f"fd_rise {lb.fd_rise}",
        ]
        if lb.vm_start or lb.vm_stop or lb.vm_status:
            out.append(f"  vm:        vm_start {lb.vm_start}  vm_stop {lb.vm_stop}  "
                       f"vm_status {lb.vm_status}")
            if lb.ssh_host:
                user = f"{lb.ssh_user}@" if lb.ssh_user else ""
                out.append(f"  ssh:       {user}{lb.ssh_host}"
                           + ("  ssh_pass: set" if lb.ssh_pass else ""))
            else:
                out.append("  ssh:       none (VM commands run locally)")
    rows = [["ID", "NAME", "ROLE", "ADDRESS", "RPORT", "SPORT", "BATCH", "COMPRESS", "AUTOBIND",
             "IMAGE"]]
    for n in sorted(cfg.nodes, key=lambda n: n.nodeid):
        if local is not None and n.nodeid == local:
            rport = sport = "-"
        else:
            rport = (str(n.rport) if n.rport is not None
                     else f"{cfg.rport(local if local is not None else 0, n.nodeid)}*")
            if n.sport is not None:
                sport = str(n.sport)
            else:
                sport = f"{cfg.sport(local, n.nodeid)}*" if local is not None else "3000+L*"
        rows.append([str(n.nodeid), n.name + (" (local)" if n.nodeid == local else ""),
                     n.role, n.rname, rport, sport, _yn(n.batch), _yn(n.compress),
                     _yn(n.autobind), "yes" if n.node_image else "no"])
    out.append(f"nodes ({len(cfg.servers)} servers, {len(cfg.clients)} clients; * = default "
               "port, L = local node):")
    out += _table(rows)
    if cfg.services:
        rows = [["SERVICE", "DC", "EXT_EP", "RANGE", "BIND", "PROG"]]
        for s in cfg.services:
            rows.append([s.name, "any" if s.any_dc else str(s.dcid), str(s.ext_ep),
                         f"{s.min_ep}..{s.max_ep}", s.bind, s.prog or "-"])
        out.append("services:")
        out += _table(rows)
    if cfg.warnings:
        out.append(f"{len(cfg.warnings)} warning(s):")
        out += [f"  {w}" for w in cfg.warnings]
    return "\n".join(out)

