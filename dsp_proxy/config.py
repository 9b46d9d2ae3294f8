"""DSP configuration: the C config language, parsed with pyparsing, checked, frozen.

The language is the one of the C `dsp_proxy` (Kees J. Bot's `configfile` reader, see
`dsp_behaviour.md` §1): blocks ``lb NAME { ... };``, ``server NAME { ... };``,
``client NAME { ... };`` and ``service NAME { ... };`` holding ``keyword value;`` statements,
``#`` comments, quoted strings.  The C reader was silently wrong in many ways (a forgotten ``;``
dropped settings, duplicate node ids overwrote each other, unknown keywords were warnings); this
module is strict instead (ARCHITECTURE D15) and reports *every* error of a file at once, each
with ``file:line:column``, so an operator fixes a file in one round.

Public API
----------
``load(path, dvs=None, local_node=None) -> Config`` and ``parse_text(text, path, dvs,
local_node) -> Config`` raise ``ConfigError`` (a list of ``Issue``) on any error; warnings are
returned in ``Config.warnings``.  ``format_summary(cfg, local_node=None)`` renders a one-screen
overview (never showing ``ssh_pass``).  ``docs/config.md`` is the parameter reference.

How it works: a pyparsing grammar turns the text into blocks of statements made of located
tokens.  The grammar is deliberately tolerant (stray characters, unterminated strings, a missing
``;`` after ``}``, an unclosed block are parsed into error markers instead of stopping), because
pyparsing would otherwise stop at the first problem; the checker then walks the tree, converts
values, applies the keyword tables and the global checks, and collects every issue.
"""

from __future__ import annotations

import bisect
import difflib
import ipaddress
import logging
import re
import socket
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyparsing as pp

from dvk_cffi import consts as C
from dvk_cffi.info import DvsInfo

log = logging.getLogger(__name__)

__all__ = [
    "BASE_PORT", "BIND_TYPES", "Config", "ConfigError", "Issue", "LbConfig", "NodeConfig",
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
        where = f"{self.path}:{self.line}:{self.col}" if self.line else self.path
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


@dataclass(frozen=True)
class NodeConfig:
    """A `server` or `client` block: a real node. `rport`/`sport` are None when not given."""

    name: str
    role: str                       # "server" | "client"
    nodeid: int
    rname: str                      # peer address (host name or IP); default: the block name
    rname_explicit: bool = False
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
class Config:
    """A validated DSP configuration (file order kept in `nodes` and `services`)."""

    path: str
    lb: LbConfig | None
    nodes: tuple[NodeConfig, ...]
    services: tuple[ServiceConfig, ...]
    warnings: tuple[Issue, ...] = ()
    local_node: int | None = None
    dvs: DvsInfo = field(default_factory=DvsInfo, repr=False, compare=False)
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

    def peers(self, local_id: int) -> tuple[NodeConfig, ...]:
        """Every configured real node except `local_id` (the nodes that get a proxy pair)."""
        return tuple(n for n in self.nodes if n.nodeid != local_id)

    def rname(self, nodeid: int) -> str:
        """Address of node `nodeid`: its `rname`, else its block name."""
        return self.node(nodeid).rname

    # -- ports (ARCHITECTURE §7, D9) ----------------------------------------------------------
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
# Lexical level and grammar (pyparsing)
# --------------------------------------------------------------------------------------------

# Word characters of the C reader: letters, digits, bytes >= 0x80 and ! # $ % & * + - . / : < =
# > ? [ \ ] ^ _ | ~ -- but a '#' that starts a token starts a comment.
_WORD_CHARS = r"A-Za-z0-9\u0080-\U0010ffff!#$%&*+\-./:<=>?\[\\\]^_|~"
_WORD_RE = rf"[{_WORD_CHARS.replace('#', '')}][{_WORD_CHARS}]*"
_STRING_RE = r'"(?:[^"\\\n]|\\[\s\S])*"|' + r"'(?:[^'\\\n]|\\[\s\S])*'"
_KIND_RE = rf"(?:lb|server|client|service)(?![{_WORD_CHARS}])"
_WS = " \t\r\n\f\v"
_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "e": "\x1b", "f": "\f", "n": "\n", "r": "\r",
                   "s": " ", "t": "\t", "v": "\v"}


@dataclass(frozen=True)
class _Tok:
    kind: str          # word string badstring badchar lbrace rbrace semi | markers: end nosemi
    text: str          # source text                                       unclosed
    loc: int
    value: str = ""
    error: str | None = None


@dataclass(frozen=True)
class _Stmt:
    toks: tuple[_Tok, ...]
    end: _Tok


@dataclass(frozen=True)
class _Junk:                      # top-level tokens that do not form a block
    toks: tuple[_Tok, ...]
    end: _Tok


@dataclass(frozen=True)
class _Body:
    items: tuple[Any, ...]        # _Stmt | _Tok(semi) | _Tok(lbrace: stray)


@dataclass(frozen=True)
class _Block:
    head: tuple[_Tok, ...]
    lbrace: _Tok
    body: tuple[Any, ...]
    close: tuple[_Tok, ...]       # (rbrace, semi) | (rbrace, nosemi) | (unclosed,)


def _unescape(body: str) -> tuple[str, str | None]:
    """Process the C reader's escapes; returns (text, error message or None)."""
    out: list[str] = []
    err = None
    i, n = 0, len(body)
    while i < n:
        c = body[i]
        i += 1
        if c != "\\":
            out.append(c)
            continue
        if i >= n:
            out.append("\\")
            break
        c = body[i]
        i += 1
        if c.isspace():                         # line continuation: skip the white space
            while i < n and body[i].isspace():
                i += 1
        elif c in "01234567":
            j = i
            while j < n and j < i + 2 and body[j] in "01234567":
                j += 1
            out.append(chr(int(body[i - 1:j], 8)))
            i = j
        elif c == "x":
            m = re.match(r"[0-9A-Fa-f]{1,2}", body[i:])
            if not m:
                err = err or "bad escape '\\x': expected one or two hexadecimal digits"
                continue
            out.append(chr(int(m.group(), 16)))
            i += m.end()
        else:
            out.append(_SIMPLE_ESCAPES.get(c, c))
    return "".join(out), err


def _act_string(s: str, loc: int, t: pp.ParseResults) -> _Tok:
    value, err = _unescape(t[0][1:-1])
    return _Tok("string", t[0], loc, value, err)


def _act_badstring(s: str, loc: int, t: pp.ParseResults) -> _Tok:
    value, _ = _unescape(t[0][1:])
    return _Tok("badstring", t[0], loc, value.rstrip(), "string not closed before the end of line")


def _act_block(t: pp.ParseResults) -> _Block:
    items = list(t)
    i = next(k for k, x in enumerate(items) if isinstance(x, _Tok) and x.kind == "lbrace")
    return _Block(tuple(items[:i]), items[i], items[i + 1].items, tuple(items[i + 2:]))


def _build_grammar() -> pp.ParserElement:
    def ws(e: pp.ParserElement) -> pp.ParserElement:
        return e.set_whitespace_chars(_WS, copy_defaults=False)

    def tok(kind: str) -> Callable[[str, int, pp.ParseResults], _Tok]:
        return lambda s, loc, t: _Tok(kind, t[0], loc, t[0])

    def marker(kind: str) -> pp.ParserElement:
        return ws(pp.Empty()).set_parse_action(lambda s, loc, t: _Tok(kind, "", loc))

    word = ws(pp.Regex(_WORD_RE)).set_parse_action(tok("word")).set_name("word")
    qstring = ws(pp.Regex(_STRING_RE)).set_parse_action(_act_string).set_name("string")
    badstring = ws(pp.Regex(r"[\"'][^\n]*")).set_parse_action(_act_badstring)
    badchar = ws(pp.Regex(r"[^\s{};]")).set_parse_action(tok("badchar"))
    lbrace = ws(pp.Literal("{")).set_parse_action(tok("lbrace"))
    rbrace = ws(pp.Literal("}")).set_parse_action(tok("rbrace"))
    semi = ws(pp.Literal(";")).set_parse_action(tok("semi"))
    # lookahead only: "KIND NAME {" starts a new block (used to recover from a missing '}')
    block_start = (ws(pp.Regex(_KIND_RE)) + (ws(pp.Regex(_WORD_RE)) | ws(pp.Regex(_STRING_RE)))
                   + ws(pp.Literal("{")))

    atom = word | qstring | badstring | badchar
    inner_atom = ~block_start + atom
    stmt = (pp.OneOrMore(inner_atom) + (semi | marker("end"))).set_parse_action(
        lambda t: _Stmt(tuple(t)[:-1], t[-1]))
    body = pp.ZeroOrMore(semi | stmt | lbrace).set_parse_action(lambda t: _Body(tuple(t)))
    close = (rbrace + (semi | marker("nosemi"))) | marker("unclosed")
    block = (pp.ZeroOrMore(atom) + lbrace + body + close).set_parse_action(_act_block)
    junk = (pp.OneOrMore(atom) + (semi | marker("end"))).set_parse_action(
        lambda t: _Junk(tuple(t)[:-1], t[-1]))
    grammar = pp.ZeroOrMore(semi | block | junk | rbrace) + ws(pp.StringEnd())
    grammar.ignore(pp.Suppress(ws(pp.Regex(r"#[^\n]*"))))
    grammar.parse_with_tabs()
    return grammar


_GRAMMAR: pp.ParserElement | None = None


def _grammar() -> pp.ParserElement:
    global _GRAMMAR
    if _GRAMMAR is None:
        _GRAMMAR = _build_grammar()
    return _GRAMMAR


# --------------------------------------------------------------------------------------------
# Keyword tables
# --------------------------------------------------------------------------------------------

_INT, _BOOL, _TEXT, _STRING, _PROTO, _BIND, _PAIR, _OBSOLETE = (
    "int", "yes/no", "text", "string", "proto", "bind", "pair", "obsolete")
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
    "fd_interval": _Kw(_INT, _fixed(50, 60000)), "fd_fall": _COUNT, "fd_rise": _COUNT,
    "lb_eps": _Kw(_PAIR, lambda d: (d.d_nr_sysprocs - d.d_nr_tasks, d.d_nr_procs - 1),
                  " (d_nr_sysprocs - d_nr_tasks .. d_nr_procs - 1: user endpoints)"),
    "cltdev": _Kw(_OBSOLETE), "svrdev": _Kw(_OBSOLETE),
}
_CLIENT_KW: dict[str, _Kw] = {
    "nodeid": _NODEID, "proxyid": _NODEID, "rname": _Kw(_TEXT), "proto": _Kw(_PROTO),
    "rport": _PORT, "sport": _PORT,
    "compress": _Kw(_BOOL), "batch": _Kw(_BOOL), "autobind": _Kw(_BOOL),
}
_SERVER_KW: dict[str, _Kw] = {**_CLIENT_KW, "node_image": _Kw(_TEXT)}
_SERVICE_KW: dict[str, _Kw] = {
    "dcid": _Kw(_INT, lambda d: (0, d.d_nr_dcs - 1), " (d_nr_dcs - 1)"),
    "ext_ep": _EP, "min_ep": _EP, "max_ep": _EP,
    "bind": _Kw(_BIND), "prog": _Kw(_STRING),
}
_KEYWORDS = {"lb": _LB_KW, "server": _SERVER_KW, "client": _CLIENT_KW, "service": _SERVICE_KW}
_ALIASES = {"proxyid": "nodeid"}
_SECRET = frozenset({"ssh_pass"})      # never echoed in messages
_INT_RE = re.compile(r"[+-]?[0-9]+")


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
    values: dict[str, _Val] = field(default_factory=dict)
    seen: dict[str, _Tok] = field(default_factory=dict)

    @property
    def desc(self) -> str:
        return f"{self.kind} block '{self.name}'"

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
        self.recs: list[_Rec] = []
        self._starts = [0] + [m.end() for m in re.finditer("\n", text)]

    # -- issues -------------------------------------------------------------------------------
    def pos(self, where: _Tok | int | None) -> tuple[int, int]:
        if where is None:
            return 0, 0
        loc = where.loc if isinstance(where, _Tok) else where
        line = bisect.bisect_right(self._starts, loc)
        return line, loc - self._starts[line - 1] + 1

    def error(self, where: _Tok | int | None, msg: str) -> None:
        self.errors.append(Issue(self.path, *self.pos(where), msg))

    def warn(self, where: _Tok | int | None, msg: str) -> None:
        self.warnings.append(Issue(self.path, *self.pos(where), msg, "warning"))

    def line(self, tok: _Tok | None) -> int:
        return self.pos(tok)[0]

    def found(self, tok: _Tok) -> str:
        """How to name what was found at `tok` in an 'expected X, found Y' message."""
        if tok.kind in ("word", "badchar"):
            return f"'{tok.text}'"
        if tok.kind in ("string", "badstring"):
            return f"string {tok.text}"
        if tok.kind in ("semi", "lbrace", "rbrace"):
            return f"'{tok.text}'"
        if tok.loc >= len(self.text):
            return "end of file"
        m = re.compile(rf"{_WORD_RE}|{_STRING_RE}|\S").match(self.text, tok.loc)
        return f"'{m.group()}'" if m else "end of file"

    # -- parse tree walk ----------------------------------------------------------------------
    def run(self, items: Sequence[Any]) -> None:
        for tok in self._all_tokens(items):
            if tok.kind == "badchar":
                self.error(tok, f"unexpected character '{tok.text}' (not part of a word; "
                                "quote values that contain it)")
            elif tok.error:
                self.error(tok, tok.error)
        for item in items:
            if isinstance(item, _Block):
                self._block(item)
            elif isinstance(item, _Junk):
                self._junk(item)
            elif item.kind == "rbrace":
                self.error(item, "unmatched '}'")
        self._global_checks()

    def _all_tokens(self, items: Sequence[Any]) -> Iterable[_Tok]:
        for item in items:
            if isinstance(item, _Tok):
                yield item
            elif isinstance(item, (_Stmt, _Junk)):
                yield from item.toks
            elif isinstance(item, _Block):
                yield from item.head
                yield from self._all_tokens(item.body)

    def _junk(self, junk: _Junk) -> None:
        toks = [t for t in junk.toks if t.kind != "badchar"]
        if not toks:
            return
        first = toks[0]
        if first.kind == "word" and first.text in KINDS:
            where = toks[2] if len(toks) > 2 else junk.end
            what = " ".join(t.text for t in toks[:2])
            self.error(where, f"expected '{{' after '{what}', found {self.found(where)}")
        else:
            self.error(first, "expected a block ('lb', 'server', 'client' or 'service' NAME "
                              f"{{ ... }};), found {self.found(first)}")

    def _block(self, blk: _Block) -> None:
        head = [t for t in blk.head if t.kind != "badchar"]
        rec = None
        if not head:
            self.error(blk.lbrace, "'{' without a block kind: expected 'lb', 'server', "
                                   "'client' or 'service' and a NAME before it")
            what = "block"
        elif head[0].kind != "word" or head[0].text not in KINDS:
            hint = (" (the multi_proxy 'proxy' block is not part of the DSP language; use "
                    "'server' or 'client')" if head[0].text == "proxy" else "")
            self.error(head[0], f"unknown block kind {self.found(head[0])}: expected 'lb', "
                                f"'server', 'client' or 'service'{hint}")
            what = f"block '{head[0].text}'"
        else:
            kind = head[0].text
            if len(head) < 2:
                self.error(blk.lbrace, f"expected a name after '{kind}', found '{{'")
                rec = _Rec(kind, "?", head[0], None)
            else:
                rec = _Rec(kind, head[1].value, head[0], head[1])
                if len(head) > 2:
                    self.error(head[2], f"expected '{{' after '{kind} {head[1].text}', found "
                                        f"{self.found(head[2])}")
                self._check_name(rec)
            what = rec.desc
        if blk.close[0].kind == "unclosed":
            self.error(blk.close[0], f"expected '}}' to close {what} (opened at line "
                                     f"{self.line(blk.lbrace)}), found {self.found(blk.close[0])}")
        elif blk.close[1].kind == "nosemi":
            self.error(blk.close[1], f"expected ';' after the '}}' of {what}, found "
                                     f"{self.found(blk.close[1])}")
        if rec is None:
            return
        self.recs.append(rec)
        for item in blk.body:
            if isinstance(item, _Stmt):
                self._statements(rec, item.toks)
            elif item.kind == "lbrace":
                self.error(item, f"unexpected '{{' inside {rec.desc} (blocks do not nest; is "
                                 "a '}' missing?)")

    def _check_name(self, rec: _Rec) -> None:
        if rec.kind == "service":
            if not rec.name:
                self.error(rec.name_tok, "empty service name")
            return
        if not rec.name or any(c.isspace() for c in rec.name):
            self.error(rec.name_tok, f"bad node name {rec.name_tok.text}: it must be a "
                                     "non-empty word")
        elif len(rec.name) > MAX_NAME:
            self.error(rec.name_tok, f"node name '{rec.name}' is too long: at most {MAX_NAME} "
                                     f"characters (the kernel's names are {C.MAXNODENAME} bytes)")

    # -- statements ---------------------------------------------------------------------------
    def _statements(self, rec: _Rec, toks: Sequence[_Tok]) -> None:
        # An unterminated string runs to the end of its line: what follows is a new statement.
        start = 0
        for i, t in enumerate(toks):
            if t.kind == "badstring":
                self._statement(rec, toks[start:i + 1])
                start = i + 1
        if start < len(toks):
            self._statement(rec, toks[start:])

    def _statement(self, rec: _Rec, toks: Sequence[_Tok]) -> None:
        toks = [t for t in toks if t.kind != "badchar"]
        if not toks:
            return
        table = _KEYWORDS[rec.kind]
        head = toks[0]
        if head.kind != "word" or head.text not in table:
            self._unknown_keyword(rec, head)
            return
        kw = head.text
        spec = table[kw]
        nvals = 2 if spec.type == _PAIR else 1
        vals = toks[1:1 + nvals]
        canon = _ALIASES.get(kw, kw)
        if vals and vals[0].kind == "word" and vals[0].text in table and len(toks) > 2:
            # "ssh_pass" alone on its line, then "vm_start x;": the value and ';' are missing
            self.error(head, f"'{kw}' needs a value")
            rec.seen.setdefault(canon, head)
            self._statement(rec, toks[1:])
            return
        if len(vals) < nvals:
            self.error(head, f"'{kw}' needs a value" if nvals == 1 else
                             f"'{kw}' needs two values: MIN MAX")
            rec.seen.setdefault(canon, head)
            return
        extra = toks[1 + nvals:]
        if extra and canon in _SECRET:
            self.error(extra[0], f"expected ';' after the value of '{kw}' (values not shown)")
        elif extra:
            shown = " ".join(v.text for v in vals)
            self.error(extra[0], f"expected ';' after '{kw} {shown}', found "
                                 f"{self.found(extra[0])}")
        value = self._convert(rec, kw, spec, vals)
        if canon in rec.seen:
            first = rec.seen[canon]
            also = f" (as '{first.text}')" if first.text != kw else ""
            self.error(head, f"'{kw}' is set twice in {rec.desc}: first at line "
                             f"{self.line(first)}{also}")
        else:
            rec.seen[canon] = head
            if value is not _BAD:
                rec.values[canon] = _Val(value, head, tuple(vals))
        if spec.type == _OBSOLETE:
            self.warn(head, f"'{kw}' is obsolete and ignored")
        if extra and extra[0].kind == "word" and extra[0].text in table:
            self._statement(rec, extra)

    def _unknown_keyword(self, rec: _Rec, head: _Tok) -> None:
        table = _KEYWORDS[rec.kind]
        names = [k for k, s in table.items() if k not in _ALIASES and s.type != _OBSOLETE]
        if head.kind != "word":
            self.error(head, f"expected a keyword of the {rec.kind} block, found "
                             f"{self.found(head)}")
            return
        close = difflib.get_close_matches(head.text, list(table), n=1)
        other = [k for k, t in _KEYWORDS.items() if head.text in t and k != rec.kind]
        if other:
            hint = f" (it belongs in {' or '.join(other)} blocks)"
        else:
            hint = f" (did you mean '{close[0]}'?)" if close else ""
        self.error(head, f"unknown keyword '{head.text}' in {rec.desc}{hint}; expected one of: "
                         + ", ".join(names))

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
        text = v.value
        if spec.type == _BOOL:
            if text.lower() in ("yes", "no"):
                return text.lower() == "yes"
            self.error(v, f"'{kw}' expects YES or NO, found {self.found(v)}")
            return _BAD
        if spec.type == _PROTO:
            if text.lower() == "tcp":
                return "tcp"
            if text.lower() in ("udp", "tipc"):
                self.warn(v, f"proto {text} is not supported: treated as tcp")
                return "tcp"
            self.error(v, f"'proto' expects tcp, found {self.found(v)}")
            return _BAD
        if spec.type == _BIND:
            if text in BIND_TYPES:
                return text
            self.error(v, f"'bind' expects replica, local, backup or external, found "
                          f"{self.found(v)}")
            return _BAD
        if spec.type == _STRING and v.kind not in ("string", "badstring"):
            self.error(v, f"'{kw}' expects a quoted string, found {self.found(v)}")
            return _BAD
        if not text:
            self.error(v, f"'{kw}' must not be empty")
            return _BAD
        return text

    def _int(self, kw: str, spec: _Kw, tok: _Tok) -> Any:
        text = tok.value.strip()
        if not _INT_RE.fullmatch(text):
            why = (" (only decimal numbers are accepted)"
                   if re.fullmatch(r"[+-]?0[xX][0-9A-Fa-f]+", text) else "")
            self.error(tok, f"'{kw}' expects a decimal integer, found {self.found(tok)}{why}")
            return _BAD
        n = int(text)
        if spec.rng is not None:
            lo, hi = spec.rng(self.dvs)
            if not lo <= n <= hi:
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
        elif servers:
            for s in servers:
                if "node_image" in s.values:
                    self.error(s.values["node_image"].kw, f"{s.desc} has node_image but there "
                               "is no lb block with vm_start/vm_stop/vm_status to start it")
        self._ports(nodes)
        self._local(lb, nodes)
        self._addresses(nodes)
        if not nodes and not self.errors:
            self.error(None, "no server or client block: the file defines no node to connect")

    def _relay(self, lb: _Rec, nodes: Sequence[_Rec]) -> None:
        """D13 relayed mode: `cltname` naming a node of the config makes it the LB host of the
        client nodes, which then need the `lb_eps` range for their translated endpoints."""
        host = next((n for n in nodes if n.name == lb.get("cltname")), None)
        if host is None or "cltname" not in lb.values:
            return
        relayed = [n for n in nodes if n.kind == "client" and n is not host]
        if relayed and "lb_eps" not in lb.values:
            self.error(lb.vtok("cltname"), f"cltname '{host.name}' names a node: the client "
                       f"nodes reach the lb through it (relayed mode), which needs lb_eps "
                       f"MIN MAX for their translated endpoints")

    def _names(self, recs: Sequence[_Rec]) -> None:
        first: dict[str, _Rec] = {}
        for rec in recs:
            if rec.name_tok is None:
                continue
            if rec.name in first:
                prev = first[rec.name]
                self.error(rec.name_tok, f"duplicate node name '{rec.name}': already used by "
                                         f"{prev.kind} block at line {self.line(prev.kind_tok)}")
            else:
                first[rec.name] = rec

    def _node_ids(self, recs: Sequence[_Rec]) -> None:
        first: dict[int, _Rec] = {}
        for rec in recs:
            nid = rec.get("nodeid")
            if nid is None:
                continue
            if nid in first:
                prev = first[nid]
                self.error(rec.vtok("nodeid"), f"duplicate node id {nid}: {rec.desc} reuses "
                           f"the id given to {prev.desc} at line {self.line(prev.vtok('nodeid'))}")
            else:
                first[nid] = rec

    def _services(self, services: Sequence[_Rec]) -> None:
        lo_user = self.dvs.d_nr_sysprocs - self.dvs.d_nr_tasks
        done: list[tuple[_Rec, int, int, int]] = []
        names: dict[str, _Rec] = {}
        for rec in services:
            key = rec.name.lower()
            if rec.name_tok is not None and key in names:
                prev = names[key]
                self.error(rec.name_tok, f"duplicate service name '{rec.name}': service "
                           f"'{prev.name}' is at line {self.line(prev.kind_tok)} (names are "
                           "case-insensitive)")
            names.setdefault(key, rec)
            bind, prog = rec.get("bind"), rec.get("prog")
            if bind not in (None, "external") and "prog" not in rec.seen:
                self.error(rec.vtok("bind"), f"bind {bind} needs a 'prog' to start the service "
                                             "(or use bind external)")
            elif prog is not None and bind in (None, "external"):
                self.warn(rec.vtok("prog"), f"service '{rec.name}': prog is never run because "
                          "bind is external (give bind replica, local or backup)")
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
                self.error(rec.vtok("min_ep"), f"min_ep {lo} is greater than max_ep {hi}")
                continue
            if not lo <= ext <= hi:
                self.error(rec.vtok("ext_ep"), f"ext_ep {ext} is outside min_ep..max_ep "
                                               f"{lo}..{hi}")
                continue
            if hi >= lo_user:
                first_user = max(lo, lo_user)
                self.warn(rec.vtok("max_ep") or rec.vtok("ext_ep"),
                          f"service '{rec.name}': endpoints {first_user}..{hi} are not system "
                          f"endpoints (>= d_nr_sysprocs - d_nr_tasks = {lo_user}); servers "
                          "bound there could not receive client requests")
            dcid = rec.get("dcid", ANY_DC)
            for prev, pdc, plo, phi in done:
                if ANY_DC not in (dcid, pdc) and dcid != pdc:
                    continue
                pext = prev.get("ext_ep")
                if ext == pext:
                    self.error(rec.vtok("ext_ep"), f"duplicate ext_ep {ext} in DC "
                               f"{_dc(dcid, pdc)}: service '{prev.name}' (line "
                               f"{self.line(prev.kind_tok)}) uses it")
                    break
                if lo <= phi and plo <= hi:
                    self.error(rec.vtok("min_ep") or rec.vtok("ext_ep"),
                               f"endpoints {lo}..{hi} of service '{rec.name}' overlap "
                               f"{plo}..{phi} of service '{prev.name}' (line "
                               f"{self.line(prev.kind_tok)}) in DC {_dc(dcid, pdc)}")
                    break
            done.append((rec, dcid, lo, hi))

    def _lb(self, lb: _Rec, servers: Sequence[_Rec]) -> None:
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
        missing = [k for k in ("vm_start", "vm_stop", "vm_status") if k not in lb.seen]
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
            self.error(lb.vtok("nodeid"), f"the local node {local} cannot be the lb's virtual "
                                          "node id")
        if not any(r.get("nodeid") == local for r in nodes):
            self.warn(None, f"local node {local} has no server or client block in this file")
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
        for rec in self.recs:
            line, col = self.pos(rec.kind_tok)
            g = rec.get
            if rec.kind == "lb" and lb is None:
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
                    fd_interval=g("fd_interval", 500), fd_fall=g("fd_fall", 3),
                    fd_rise=g("fd_rise", 2), lb_eps=g("lb_eps"), line=line, col=col)
            elif rec.kind in ("server", "client"):
                nodes.append(NodeConfig(
                    name=rec.name, role=rec.kind, nodeid=g("nodeid"),
                    rname=g("rname", rec.name), rname_explicit="rname" in rec.values,
                    proto=g("proto", "tcp"), rport=g("rport"), sport=g("sport"),
                    compress=g("compress", False), batch=g("batch", False),
                    autobind=g("autobind", False), node_image=g("node_image"),
                    line=line, col=col))
            elif rec.kind == "service":
                ext = g("ext_ep")
                services.append(ServiceConfig(
                    name=rec.name, ext_ep=ext, min_ep=g("min_ep", ext), max_ep=g("max_ep", ext),
                    dcid=g("dcid", ANY_DC), bind=g("bind", "external"), prog=g("prog"),
                    line=line, col=col))
        return Config(path=self.path, lb=lb, nodes=tuple(nodes), services=tuple(services),
                      warnings=tuple(_sorted(self.warnings)), local_node=self.local,
                      dvs=self.dvs)


def _dc(a: int, b: int) -> str:
    dc = max(a, b)
    return "any" if dc == ANY_DC else str(dc)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def parse_text(text: str, path: str = "<string>", dvs: DvsInfo | None = None,
               local_node: int | None = None) -> Config:
    """Parse and check config `text`; raise ConfigError listing every error found.

    `dvs` supplies the kernel limits (DVK defaults when None); `local_node`, when known, enables
    the port-scheme warnings and the local-node checks."""
    checker = _Checker(text, path, dvs or DvsInfo(), local_node)
    try:
        items = list(_grammar().parse_string(text, parse_all=True))
    except pp.ParseBaseException as exc:   # the grammar accepts any input; this is a safeguard
        line, col = checker.pos(exc.loc)
        raise ConfigError([Issue(path, line, col, f"syntax error: {exc.msg}")]) from None
    checker.run(items)
    if checker.errors:
        raise ConfigError(_sorted(checker.errors), _sorted(checker.warnings))
    cfg = checker.build()
    log.debug("config %s: lb=%s, %d nodes, %d services, %d warnings", path,
              cfg.lb_nodeid, len(cfg.nodes), len(cfg.services), len(cfg.warnings))
    return cfg


def load(path: str | Path, dvs: DvsInfo | None = None,
         local_node: int | None = None) -> Config:
    """Read and check the config file `path` (see parse_text); unreadable file -> ConfigError."""
    p = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([Issue(p, 0, 0, f"cannot read the config file: {exc.strerror}")]) \
            from None
    # Bytes >= 0x80 are word characters; undecodable ones survive as surrogate escapes.
    return parse_text(raw.decode("utf-8", errors="surrogateescape"), p, dvs, local_node)


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
    out = [f"DSP configuration {cfg.path}"
           + (f" (local node {local})" if local is not None else "")]
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


def liveness(cfg: Config) -> tuple[int, int, int]:
    """The failure-detection settings in force: (fd_interval ms, fd_fall, fd_rise)."""
    lb = cfg.lb
    if lb is not None:
        return lb.fd_interval, lb.fd_fall, lb.fd_rise
    return LbConfig.fd_interval, LbConfig.fd_fall, LbConfig.fd_rise
