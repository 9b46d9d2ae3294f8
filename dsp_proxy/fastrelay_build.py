"""Builds `dsp_proxy._fastrelay`, the compiled relay of dsp_proxy/fastrelay.c, with cffi.

`python -m dsp_proxy.fastrelay_build` (the Makefile's `venv` target runs it) compiles the
module next to this file.  Without it the DSP runs the pure-Python path, which is complete on
its own (docs/design.md, "The compiled relay").

`--sanitize` compiles the same source with AddressSanitizer and UndefinedBehaviorSanitizer as
a second module, `dsp_proxy._fastrelay_san`, which the DSP loads only when
DSP_FASTRELAY_SANITIZED is "1" (`fastpath.SANITIZED`; the ASan runtime must be preloaded:
`make fuzz-relay-asan`); the normal module stays as it is.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import cffi

HERE = Path(__file__).resolve().parent
#: The module the sanitizer build produces (dsp_proxy/fastpath.py imports it by this name).
SANITIZED_MODULE = "_fastrelay_san"
_SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]

CDEF = """
typedef struct { int32_t node, off, len, nframes; } relay_seg;
typedef struct {
    int64_t frames, bytes;
    uint64_t cmd_mask, dc_mask;
    int64_t by_cmd[64];
    int64_t dc_cmds[32], dc_msgs[32], dc_data[32];
} relay_tally;
typedef struct relay_table relay_table;

relay_table *rt_new(int local, int lb_id, int nr_nodes, int nr_dcs, int nr_tasks, int gen_size,
                    int ack_bit, int maxcopybuf, int flag_batch, int flag_lz4, int flag_check,
                    int cmd_send, int cmd_sndrec, int cmd_reply);
void rt_free(relay_table *t);
int rt_set_cmd(relay_table *t, int cmd, int cls);
int rt_set_code(relay_table *t, int code);
void rt_set_dc(relay_table *t, int dcid, int known, int lo, int hi);
void rt_set_raw_ok(relay_table *t, int node, int ok);
void rt_set_reverse(relay_table *t, int node, int on);
int rt_lb_backlog(relay_table *t, int delta);
int rt_give(relay_table *t, int clt_node, int svr_node, int dcid, int clt_ep, int lbsvr_ep,
            int clt_pid, int svr_pid, int pending);
int rt_map(relay_table *t, int sid, int client_side, int server_side);
int rt_take(relay_table *t, int sid, int drop, int64_t *out);
int rt_fold(relay_table *t, int node, int dir, relay_tally *out);
void rt_untally(relay_table *t, int node, const unsigned char *buf, int len);
int rt_relay(relay_table *t, int peer, unsigned char *buf, int start, int end, relay_seg *segs,
             int maxsegs, int *nsegs, int *python);
int rt_pump(relay_table *t, int peer, int fd, unsigned char *buf, int cap, int *start, int *end,
            relay_seg *segs, int maxsegs, int *nsegs, int *python, int *held, int *held_fd,
            int *sent, int *flush, double *last_rx, double budget);
void rt_wire_lock(relay_table *t, int node);
int rt_wire_trylock(relay_table *t, int node);
void rt_wire_unlock(relay_table *t, int node);
void rt_wire_fd(relay_table *t, int node, int fd);
void rt_wire_enqueued(relay_table *t, int node);
uint64_t rt_wire_seq(relay_table *t, int node);
void rt_wire_settled(relay_table *t, int node, uint64_t seq, int empty);
double rt_wire_last_tx(relay_table *t, int node);
uint32_t rt_wire_pubs(relay_table *t, int node);
typedef struct {
    int32_t kfd, answer_ms;
    unsigned char *req;
    int32_t req_len;
    unsigned char *reply;
    int32_t reply_cap, reply_len;
    int32_t ok_len;
    int32_t nfixed;
    int32_t fixed_off[24];
    uint8_t fixed_val[24];
} rt_channel;
typedef struct {
    rt_channel ch;
    int32_t node;
    const unsigned char *payload;
    int32_t payload_cap;
    int32_t hdr_off;
    uint32_t pubs;
    int32_t held_fd, sent;
} rt_sender;
int rt_send_pump(relay_table *t, rt_sender *s, double until);
int rt_lb_send_pump(relay_table *t, rt_sender *s, double until);
typedef struct {
    rt_channel ch;
    int32_t peer;
    int32_t req_hdr_off;
    unsigned char *payload;
    int32_t payload_cap;
    int32_t value_off;
    int32_t python_flags;
    int32_t deliver;
    int32_t lb;
    int32_t done_off;
    int32_t done_lb;
    int32_t kerr;
} rt_receiver;
int rt_deliver(relay_table *t, rt_receiver *r, unsigned char *buf, int *start, int end);
int rt_deliver_pump(relay_table *t, rt_receiver *r, int fd, unsigned char *buf, int cap,
                    int *start, int *end, double *last_rx, double budget, int *got);
"""


#: The module's answer to "which source were you built from" (see `source_id`).
ID_CDEF = "const char *rt_source_id(void);\n"


def source_id(text: str | None = None) -> str:
    """A digest of the declarations and fastrelay.c (`text`, else as it is on disk).  Built
    into the module, it lets the DSP refuse a module compiled from another source (an update
    whose `make venv` did not run yet) instead of calling functions it lacks or that changed.
    Raises OSError when fastrelay.c cannot be read, ValueError when it is not UTF-8."""
    if text is None:
        text = (HERE / "fastrelay.c").read_text(encoding="utf-8")
    return hashlib.sha256((CDEF + "\0" + text).encode()).hexdigest()[:16]


#: The module of the race tests' build (`builder(test_hooks=True)`), never the DSP's.
HOOKED_MODULE = "_fastrelay_hooked"


def builder(sanitize: bool = False, test_hooks: bool = False) -> cffi.FFI:
    """The cffi builder of the module (source: fastrelay.c, and the function that names it);
    `sanitize`: the ASan/UBSan module, for the fuzzer and the tests (docs/reliability.md);
    `test_hooks`: a module of its own, `_fastrelay_hooked`, that calls `lib.rt_test_hook` (a
    function pointer the test sets) at the moments fastrelay.c names, for the tests that
    take another thread's step at such a moment."""
    if sanitize and test_hooks:
        raise ValueError("the hooked module is built without the sanitizers")
    ffi = cffi.FFI()
    ffi.cdef(CDEF + ID_CDEF
             + ("extern void (*rt_test_hook)(int at, int node);\n" if test_hooks else ""))
    text = (HERE / "fastrelay.c").read_text(encoding="utf-8")
    source = text + f'\nconst char *rt_source_id(void) {{ return "{source_id(text)}"; }}\n'
    warn = ["-Wall", "-Wextra", "-Wno-unused-parameter"]
    if sanitize:
        name, flags = f"dsp_proxy.{SANITIZED_MODULE}", \
            ["-O1", "-g", "-fno-omit-frame-pointer", *_SANITIZE]
    elif test_hooks:
        name, flags = HOOKED_MODULE, ["-O2"]
    else:
        name, flags = "dsp_proxy._fastrelay", ["-O2"]
    ffi.set_source(name, source, extra_compile_args=[*flags, *warn],
                   extra_link_args=_SANITIZE if sanitize else [], libraries=["pthread"],
                   define_macros=[("RT_TEST_HOOKS", "1")] if test_hooks else [])
    return ffi


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(prog="python -m dsp_proxy.fastrelay_build",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--sanitize", action="store_true",
                   help=f"build dsp_proxy.{SANITIZED_MODULE} with ASan and UBSan instead")
    sanitize = p.parse_args(argv).sanitize
    with tempfile.TemporaryDirectory() as tmp:
        try:
            built = Path(builder(sanitize).compile(tmpdir=tmp, verbose=False))
        except Exception as exc:   # no compiler: the pure-Python path runs
            if sanitize:           # asked for explicitly: say so in the exit status
                logging.error("the sanitizer build failed: %s", exc)
                return 1
            logging.warning("the compiled relay was not built (%s); the DSP uses the Python "
                            "path", exc)
            return 0
        target = HERE / built.name
        staged = HERE / (built.name + ".new")
        shutil.copyfile(built, staged)
        os.replace(staged, target)    # processes that loaded the old one keep their copy
    logging.info("built %s", target.relative_to(HERE.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
