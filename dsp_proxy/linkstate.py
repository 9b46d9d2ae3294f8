"""The state machine of a link's two TCP directions, as a table (docs/design.md, "Links").

A link to a peer carries traffic only when both directions are connected: the outgoing one
(our SPROXY connected to the peer) and the incoming one (the peer's SPROXY connected to our
RPROXY).  The machine below is pure: `transition(state, event)` returns the next state and the
effects to carry out, and `Link` (link.py) carries them out under its Condition.  No state waits
for ever: a half-open link (one direction only) older than `HALF_OPEN_LIMIT` gets the TIMEOUT
event from the supervisor and is torn down, so both sides start again; except with a peer that
may be a C DSP, which never starts again (`C_PEER_TABLE`).
"""

from __future__ import annotations

import enum

#: Seconds a link may stay half-open (one direction only) before it is torn down.  Longer than
#: the sender's reconnect backoff cap (2 s) plus a connect timeout, so a peer that is merely
#: slow to connect back is not torn down.
HALF_OPEN_LIMIT = 5.0


class State(enum.Enum):
    DOWN = "down"
    OUT_ONLY = "out-only"     # our sender is connected, the peer's has not connected to us
    IN_ONLY = "in-only"       # the peer's sender is connected to us, ours is not connected
    UP = "up"                 # both directions: the kernel is told CONNECT_*


class Event(enum.Enum):
    OUT_CONNECTED = "out-connected"   # SPROXY connected (carries the new socket)
    IN_ACCEPTED = "in-accepted"       # the acceptor handed over the peer's connection
    OUT_LOST = "out-lost"             # the outgoing connection failed or closed
    IN_LOST = "in-lost"               # the incoming connection failed, closed or sent garbage
    TIMEOUT = "timeout"               # half-open for longer than HALF_OPEN_LIMIT
    KERNEL_REFUSED = "kernel-refused"  # proxy_conn(CONNECT_*) failed
    STOP = "stop"                     # the daemon stops or the peer left the config


class Effect(enum.Enum):
    KEEP_OUT = "keep-out"             # the event's socket becomes the outgoing connection
    KEEP_IN = "keep-in"               # the event's socket becomes the incoming connection
    CLOSE_OUT = "close-out"           # close the current outgoing connection
    CLOSE_IN = "close-in"             # close the current incoming connection
    CONNECT = "connect"               # proxy_conn CONNECT_RPROXY and CONNECT_SPROXY
    DISCONNECT = "disconnect"         # proxy_conn DISCONNECT_SPROXY and DISCONNECT_RPROXY
    REPORT_DOWN = "report-down"       # tell the supervisor the link went down
    HOLD_IN = "hold-in"               # keep the event's socket aside until the current one goes


S, Ev, F = State, Event, Effect
_TEAR_DOWN_UP = (F.DISCONNECT, F.CLOSE_OUT, F.CLOSE_IN, F.REPORT_DOWN)
_CLOSE_BOTH = (F.CLOSE_OUT, F.CLOSE_IN)

#: (state, event) -> (next state, effects in order).  Pairs not listed change nothing.
TABLE: dict[tuple[State, Event], tuple[State, tuple[Effect, ...]]] = {
    (S.DOWN, Ev.OUT_CONNECTED): (S.OUT_ONLY, (F.KEEP_OUT,)),
    (S.DOWN, Ev.IN_ACCEPTED): (S.IN_ONLY, (F.KEEP_IN,)),
    (S.OUT_ONLY, Ev.IN_ACCEPTED): (S.UP, (F.KEEP_IN, F.CONNECT)),
    (S.OUT_ONLY, Ev.OUT_CONNECTED): (S.OUT_ONLY, (F.CLOSE_OUT, F.KEEP_OUT)),
    (S.OUT_ONLY, Ev.OUT_LOST): (S.DOWN, _CLOSE_BOTH),
    (S.OUT_ONLY, Ev.TIMEOUT): (S.DOWN, _CLOSE_BOTH),
    (S.OUT_ONLY, Ev.STOP): (S.DOWN, _CLOSE_BOTH),
    (S.IN_ONLY, Ev.OUT_CONNECTED): (S.UP, (F.KEEP_OUT, F.CONNECT)),
    # the peer connected again: its previous connection is dead, the newest one counts
    (S.IN_ONLY, Ev.IN_ACCEPTED): (S.IN_ONLY, (F.CLOSE_IN, F.KEEP_IN)),
    (S.IN_ONLY, Ev.IN_LOST): (S.DOWN, _CLOSE_BOTH),
    (S.IN_ONLY, Ev.TIMEOUT): (S.DOWN, _CLOSE_BOTH),
    (S.IN_ONLY, Ev.STOP): (S.DOWN, _CLOSE_BOTH),
    (S.UP, Ev.OUT_LOST): (S.DOWN, _TEAR_DOWN_UP),
    (S.UP, Ev.IN_LOST): (S.DOWN, _TEAR_DOWN_UP),
    (S.UP, Ev.KERNEL_REFUSED): (S.DOWN, _TEAR_DOWN_UP),
    (S.UP, Ev.STOP): (S.DOWN, _TEAR_DOWN_UP),
    # a new connection from the peer's address while up is held aside: it takes over once the
    # current one is lost, or announces itself where the current one never did
    # (`Link.check_candidate`); a connection from that address alone ends no working link
    (S.UP, Ev.IN_ACCEPTED): (S.UP, (F.HOLD_IN,)),
    (S.UP, Ev.OUT_CONNECTED): (S.OUT_ONLY, (F.DISCONNECT, F.CLOSE_OUT, F.CLOSE_IN, F.KEEP_OUT,
                                            F.REPORT_DOWN)),
}

#: Where a peer that never announced itself as a DSP of this project differs: it may be a C
#: DSP, whose sender connects once and never again (it goes on with its closed socket), so the
#: incoming connection it made is never closed while it works.  The outgoing direction's loss
#: keeps it (our sender connects again), a half-open link waits for our sender instead of
#: timing out, and a new connection from the peer's address while the link is IN_ONLY is held
#: aside as while it is UP, so a stray connection cannot replace the C sender's.  A host that
#: crashed or rebooted never closes its old connection: TCP keep-alive ends it (docs/design.md,
#: "Liveness"), and the held one, its new DSP's, takes over.
C_PEER_TABLE: dict[tuple[State, Event], tuple[State, tuple[Effect, ...]]] = {
    (S.UP, Ev.OUT_LOST): (S.IN_ONLY, (F.DISCONNECT, F.CLOSE_OUT, F.REPORT_DOWN)),
    (S.IN_ONLY, Ev.TIMEOUT): (S.IN_ONLY, ()),
    (S.IN_ONLY, Ev.IN_ACCEPTED): (S.IN_ONLY, (F.HOLD_IN,)),
    (S.UP, Ev.OUT_CONNECTED): (S.UP, (F.DISCONNECT, F.CLOSE_OUT, F.KEEP_OUT, F.REPORT_DOWN,
                                      F.CONNECT)),
}

HALF_OPEN = frozenset({S.OUT_ONLY, S.IN_ONLY})


def transition(state: State, event: Event, c_peer: bool = False
               ) -> tuple[State, tuple[Effect, ...]]:
    """The next state and the effects of `event` in `state` (unlisted pairs: no change), for
    a peer that may be a C DSP (`C_PEER_TABLE`) or one of this project's."""
    if c_peer and (state, event) in C_PEER_TABLE:
        return C_PEER_TABLE[(state, event)]
    return TABLE.get((state, event), (state, ()))
