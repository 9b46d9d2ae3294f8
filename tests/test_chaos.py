"""A short chaos run (the full one is `make chaos`): four clients loop through the LB while a
server's DSP is killed and frozen, its node kernel and its program are killed, its whole node is
frozen and the LB host's DSP restarts; every fault is healed before the next one.  No request
may be lost or misrouted, no client may wait longer than the failure detection bound, and new
sessions must all succeed while one healthy server remains and after healing."""

from __future__ import annotations

from cluster_helpers import cluster_from
from fuzz.chaos import CONFIG, DETECTION_BOUND, Chaos

#: `make chaos` holds clients to the detection bound itself; a shared CI machine gets 1.5 s more.
WAIT_SLACK = 1.5


def test_short_chaos_run(tmp_path):
    with cluster_from(CONFIG, tmp_path) as cl:
        chaos = Chaos(cl, tmp_path, hold_stop=5.0, hold_kill=2.0, sessions=5)
        try:
            chaos.run()
        finally:
            chaos.close()
        table = "\n".join(chaos.table())
        print(table)
        assert sum(r.requests for r in chaos.results) > 100, table
        failures = chaos.failures(DETECTION_BOUND + WAIT_SLACK)
        assert not failures, table + "\n" + "\n".join(failures)
