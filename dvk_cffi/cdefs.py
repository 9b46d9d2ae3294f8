"""cffi declarations (ABI mode, no compiler) of every struct that crosses the DVK boundary.

Two FFI objects are built from one template of the C declarations (the module's headers; field order
and names as in the C headers `ipc.h`, `cmd.h`, `proxy_usr.h`, `*_usr.h`, `dvk_ioparm.h`):

* `ffi_native` -- the real C types (`long`, pointers, `struct timespec` of longs), so cffi lays
  the structs out like the host's C compiler: the layout a DVK built for this machine would use.
  It also declares libc's `ioctl`, used by `KernelDvk`.
* `ffi_i386` -- the same structs with `long` -> `int32_t`, `unsigned long` and every pointer ->
  `uint32_t`, so the i386 layout results on any host.  That is the wire and emulator layout
  and the layout of every deployed DVK node.

`ffi_i386` also declares the kernel-side i386 variants of `dc_usr_t` / `proc_usr_t`
(`dc_kusr_t`, `proc_kusr_t`: 4-byte `cpumask_t` instead of the 128-byte user `cpu_set_t`),
which are the sizes the kernel copies (60 / 92) and the sizes `info.py` encodes.

The header codec between the 120-byte wire `Header` and a native `cmd_t` lives here too
(`header_to_native`, `header_from_native`) so that `wire.py` stays free of cffi.
"""

from __future__ import annotations

import re
from typing import Any

import cffi

from . import consts as C
from . import wire

#: Structs a proxy or test program passes to the kernel (plus the i386 kernel-size variants).
STRUCT_NAMES: tuple[str, ...] = (
    "message", "vcopy_t", "cmd_t", "proxy_payload_t", "dvs_usr_t", "dc_usr_t", "node_usr_t",
    "proxies_usr_t", "proc_usr_t", "priv_usr_t",
    "parm_rcvrqst_t", "parm_getdcinfo_t", "parm_getnodeinfo_t", "parm_relay_t", "parm_wakeup_t",
    "parm_put2lcl_t", "parm_dcnode_t", "parm_dvsinit_t", "parm_pxconn_t", "parm_wait4bind_t",
    "parm_unbind_t", "parm_ipc_t", "parm_notify_t", "parm_priv_t", "parm_get2rmt_t",
    "parm_nodeup_t", "parm_proxyinfo_t", "parm_bind_t", "parm_pxbind_t", "parm_procinfo_t",
    "parm_vcopy_t",
)
#: Only in `ffi_i386`: what the i386 kernel really copies for dc_usr_t / proc_usr_t.
I386_KERNEL_STRUCTS: tuple[str, ...] = ("dc_kusr_t", "proc_kusr_t")

# ------------------------------------------------------------------------------------------------
# The template.  LONG / ULONG / PTR(type) are replaced per layout; one pointer per declaration
# (a `T *a, b` declarator list would make `b` a non-pointer after substitution).
# ------------------------------------------------------------------------------------------------

_PRELUDE_NATIVE = """
typedef int pid_t;
struct timespec { long tv_sec; long tv_nsec; };
typedef struct { unsigned long __bits[%(cpu_words)d]; } cpu_set_t;
struct dvktimer;
typedef void (*dvk_tmr_func_t)(struct dvktimer *tp);
"""

_PRELUDE_I386 = """
typedef int32_t pid_t;
struct timespec { int32_t tv_sec; int32_t tv_nsec; };
typedef struct { uint32_t __bits[32]; } cpu_set_t;     /* glibc: 1024 bits = 128 bytes */
typedef struct { uint32_t bits[1]; } cpumask_t;        /* i386 kernel: NR_CPUS/8 = 4 bytes */
typedef uint32_t dvk_tmr_func_t;
"""

# ipc.h: the message and its union of variants (mess_6 is sized after mess_3: MESS6_LEN).
_MESSAGE = """
typedef struct {
    int m1i1; int m1i2; int m1i3; PTR(char) m1p1; PTR(char) m1p2; PTR(char) m1p3;
} mess_1;
typedef struct { int m2i1; int m2i2; int m2i3; LONG m2l1; LONG m2l2; PTR(char) m2p1; } mess_2;
typedef struct { int m3i1; int m3i2; PTR(char) m3p1; char m3ca1[%(M3_STRING)d]; } mess_3;
"""

_MESSAGE_REST = """
typedef struct { LONG m4l1; LONG m4l2; LONG m4l3; LONG m4l4; LONG m4l5; } mess_4;
typedef struct {
    short m5c1; short m5c2; int m5i1; int m5i2; LONG m5l1; LONG m5l2; LONG m5l3;
} mess_5;
typedef struct { char m6ca1[%(MESS6_LEN)d]; } mess_6;
typedef struct { int m7i1; int m7i2; int m7i3; int m7i4; PTR(char) m7p1; PTR(char) m7p2; } mess_7;
typedef struct {
    int m8i1; int m8i2; PTR(char) m8p1; PTR(char) m8p2; PTR(char) m8p3; PTR(char) m8p4;
} mess_8;
typedef struct { int m9i1; int m9l1; struct timespec m9t1; } mess_9;
typedef struct { int mAdst; int mAnr; int mAia[%(SLOTS_BY_MSG)d]; } mess_A;
typedef struct { LONG mBnr; char mBmd5[%(MD5_SIZE)d]; } mess_B;
typedef struct { int mCi1; int mCi2; int mCi3; int mCi4; char mCca1[%(MC_STRING)d]; } mess_C;

typedef struct {
    int m_source;
    int m_type;
    union {
        mess_1 m_m1; mess_2 m_m2; mess_3 m_m3; mess_4 m_m4; mess_5 m_m5; mess_6 m_m6;
        mess_7 m_m7; mess_8 m_m8; mess_9 m_m9; mess_A m_mA; mess_B m_mB; mess_C m_mC;
    } m_u;
} message;

/* cmd.h */
struct vcopy_s {
    int v_src;
    int v_dst;
    int v_rqtr;
    PTR(void) v_saddr;
    PTR(void) v_daddr;
    int v_bytes;
};
typedef struct vcopy_s vcopy_t;
typedef vcopy_t parm_vcopy_t;

struct cmd_s {
    int c_cmd;
    int c_dcid;
    int c_src;
    int c_dst;
    int c_snode;
    int c_dnode;
    int c_rcode;
    int c_len;
    int c_pid;
    int c_batch_nr;
    ULONG c_flags;
    ULONG c_snd_seq;
    ULONG c_ack_seq;
    struct timespec c_timestamp;
    message c_msg;
    vcopy_t c_vcopy;
};
typedef struct cmd_s cmd_t;
typedef cmd_t proxy_hdr_t;

/* dvs_usr.h */
struct dvs_usr {
    char d_name[%(MAXPROCNAME)d];
    int d_nr_dcs;
    int d_nr_nodes;
    int d_nr_procs;
    int d_nr_tasks;
    int d_nr_sysprocs;
    int d_max_copybuf;
    int d_max_copylen;
    ULONG d_dbglvl;
    int d_version;
    ULONG d_flags;
    int d_size_proc;
};
typedef struct dvs_usr dvs_usr_t;

/* dc_usr.h (user-space version: glibc cpu_set_t) */
struct dc_usr {
    int dc_dcid;
    int dc_flags;
    int dc_nr_procs;
    int dc_nr_tasks;
    int dc_nr_sysprocs;
    int dc_nr_nodes;
    ULONG dc_nodes;
    int dc_warn2proc;
    int dc_warnmsg;
    pid_t dc_pid;
    char dc_name[%(MAXDCNAME)d];
    cpu_set_t dc_cpumask;
};
typedef struct dc_usr dc_usr_t;

/* node_usr.h */
struct node_usr {
    int n_nodeid;
    volatile ULONG n_flags;
    int n_proxies;
    ULONG n_dcs;
    struct timespec n_stimestamp;
    struct timespec n_rtimestamp;
    ULONG n_pxsent;
    ULONG n_pxrcvd;
    char n_name[%(MAXNODENAME)d];
};
typedef struct node_usr node_usr_t;

/* proxy_usr.h */
struct proxies_usr_s {
    unsigned int px_id;
    ULONG px_flags;
    int px_maxbytes;
    int px_maxbcmds;
    char px_name[%(MAXPROXYNAME)d];
};
typedef struct proxies_usr_s proxies_usr_t;

/* proc_usr.h (user-space version: glibc cpu_set_t) */
struct proc_usr {
    int p_nr;
    int p_endpoint;
    int p_dcid;
    volatile ULONG p_rts_flags;
    int p_lpid;
    int p_vpid;
    int p_nodeid;
    ULONG p_nodemap;
    volatile ULONG p_misc_flags;
    int p_getfrom;
    int p_sendto;
    int p_waitmigr;
    int p_waitunbind;
    int p_proxy;
    ULONG p_lclsent;
    ULONG p_rmtsent;
    ULONG p_lclcopy;
    ULONG p_rmtcopy;
    char p_name[%(MAXPROCNAME)d];
    cpu_set_t p_cpumask;
};
typedef struct proc_usr proc_usr_t;

/* types.h, timers.h, priv_usr.h */
typedef unsigned short bitchunk_t;
typedef short dvk_id_t;
typedef struct { bitchunk_t chunk[%(DVK_MAP_CHUNKS)d]; } dvk_map_t;
typedef struct { bitchunk_t chunk[%(IPC_MAP_CHUNKS)d]; } ipc_map_t;
typedef ULONG dvkclock_t;
typedef union { int ta_int; LONG ta_long; PTR(void) ta_ptr; } dvk_tmr_arg_t;
typedef struct dvktimer {
    PTR(struct dvktimer) dvk_tmr_next;
    dvkclock_t dvk_tmr_exp_time;
    dvk_tmr_func_t dvk_tmr_func;
    dvk_tmr_arg_t dvk_tmr_arg;
} dvktimer_t;
struct priv_usr {
    dvk_id_t priv_id;
    int priv_warn;
    int priv_level;
    short priv_trap_mask;
    ipc_map_t priv_ipc_from;
    ipc_map_t priv_ipc_to;
    dvk_map_t priv_dvk_allowed;
    dvktimer_t priv_alarm_timer;
};
typedef struct priv_usr priv_usr_t;
"""

# proxy_usr.h: the payload union needs sizeof(cmd_t) for MAXBATCMD (second cdef pass).
_PAYLOAD = """
typedef union {
    cmd_t pay_cmd[%(MAXBATCMD)d];
    char pay_data[%(MAXCOPYBUF)d];
    proc_usr_t pay_proc_usr;
} proxy_payload_t;

/* dvk_ioparm.h, field order as in the header */
typedef struct parm_rcvrqst_s { PTR(message) parm_mptr; ULONG parm_tout; } parm_rcvrqst_t;
typedef struct parm_getdcinfo_s { int parm_dcid; PTR(dc_usr_t) parm_dc; } parm_getdcinfo_t;
typedef struct parm_getnodeinfo_s {
    int parm_nodeid; PTR(node_usr_t) parm_node;
} parm_getnodeinfo_t;
typedef struct parm_relay_s { int parm_ep; PTR(message) parm_mptr; } parm_relay_t;
typedef struct parm_wakeup_s { int parm_dcid; int parm_ep; } parm_wakeup_t;
typedef struct parm_put2lcl_s {
    PTR(cmd_t) parm_cmd; PTR(proxy_payload_t) parm_pay;
} parm_put2lcl_t;
typedef struct parm_dcnode_s { int parm_dcid; int parm_nodeid; } parm_dcnode_t;
typedef struct parm_dvsinit_s { int parm_nodeid; PTR(dvs_usr_t) parm_dvs; } parm_dvsinit_t;
typedef struct parm_pxconn_s { int parm_pxid; int parm_sts; } parm_pxconn_t;
typedef struct parm_wait4bind_s { int parm_cmd; int parm_ep; ULONG parm_tout; } parm_wait4bind_t;
typedef struct parm_unbind_s { int parm_dcid; int parm_ep; ULONG parm_tout; } parm_unbind_t;
typedef struct parm_ipc_s { int parm_ep; PTR(message) parm_mptr; ULONG parm_tout; } parm_ipc_t;
typedef struct parm_notify_s { int parm_nr; int parm_ep; int parm_val; } parm_notify_t;
typedef struct parm_priv_s { int parm_dcid; int parm_ep; PTR(priv_usr_t) parm_priv; } parm_priv_t;
typedef struct parm_get2rmt_s {
    PTR(cmd_t) parm_cmd; PTR(proxy_payload_t) parm_pay; ULONG parm_tout;
} parm_get2rmt_t;
typedef struct parm_nodeup_s { PTR(char) parm_name; int parm_nodeid; int parm_pxid; } parm_nodeup_t;
typedef struct parm_proxyinfo_s {
    int parm_pxid; PTR(proc_usr_t) parm_spx; PTR(proc_usr_t) parm_rpx;
} parm_proxyinfo_t;
typedef struct parm_bind_s {
    int parm_cmd; int parm_dcid; int parm_pid; int parm_ep; int parm_nodeid;
} parm_bind_t;
typedef struct parm_pxbind_s {
    PTR(char) parm_name; int parm_pxid; int parm_spid; int parm_rpid; int parm_maxbuf;
} parm_pxbind_t;
typedef struct parm_procinfo_s {
    int parm_dcid; int parm_nr; PTR(proc_usr_t) parm_proc;
} parm_procinfo_t;
"""

# The i386 kernel's own sizes of dc_usr_t / proc_usr_t (cpumask_t of 4 bytes).
_I386_KERNEL = """
typedef struct {
    int dc_dcid; int dc_flags; int dc_nr_procs; int dc_nr_tasks; int dc_nr_sysprocs;
    int dc_nr_nodes; uint32_t dc_nodes; int dc_warn2proc; int dc_warnmsg; pid_t dc_pid;
    char dc_name[%(MAXDCNAME)d]; cpumask_t dc_cpumask;
} dc_kusr_t;
typedef struct {
    int p_nr; int p_endpoint; int p_dcid; uint32_t p_rts_flags; int p_lpid; int p_vpid;
    int p_nodeid; uint32_t p_nodemap; uint32_t p_misc_flags; int p_getfrom; int p_sendto;
    int p_waitmigr; int p_waitunbind; int p_proxy; uint32_t p_lclsent; uint32_t p_rmtsent;
    uint32_t p_lclcopy; uint32_t p_rmtcopy; char p_name[%(MAXPROCNAME)d]; cpumask_t p_cpumask;
} proc_kusr_t;
"""

_LIBC = """
int ioctl(int fd, unsigned long request, ...);
"""

NR_DVK_CALLS = 35  # dvk_calls.h (the ioctl numbering); priv bitmap chunks derive from it

_SIZES: dict[str, int] = {
    "M3_STRING": C.M3_STRING, "MC_STRING": C.MC_STRING, "MD5_SIZE": C.MD5_SIZE,
    "SLOTS_BY_MSG": C.SLOTS_BY_MSG, "MAXPROCNAME": C.MAXPROCNAME, "MAXDCNAME": C.MAXDCNAME,
    "MAXNODENAME": C.MAXNODENAME, "MAXPROXYNAME": C.MAXPROXYNAME, "MAXCOPYBUF": C.MAXCOPYBUF,
    "DVK_MAP_CHUNKS": (NR_DVK_CALLS + 15) // 16, "IPC_MAP_CHUNKS": (C.NR_SYS_PROCS + 15) // 16,
}

_PTR_RE = re.compile(r"PTR\(([^)]*)\)")


def _render(template: str, *, i386: bool, extra: dict[str, int]) -> str:
    """Substitute the per-layout type tokens and the array sizes."""
    text = template % {**_SIZES, **extra}
    if i386:
        text = _PTR_RE.sub("uint32_t", text)
        text = re.sub(r"\bULONG\b", "uint32_t", text)
        text = re.sub(r"\bLONG\b", "int32_t", text)
    else:
        text = _PTR_RE.sub(lambda m: m.group(1).strip() + " *", text)
        text = re.sub(r"\bULONG\b", "unsigned long", text)
        text = re.sub(r"\bLONG\b", "long", text)
    return text


def _build(i386: bool) -> cffi.FFI:
    """One FFI with every struct of the DVK interface, in the i386 or the native layout."""
    ffi = cffi.FFI()
    if i386:
        ffi.cdef(_PRELUDE_I386)
    else:
        probe = cffi.FFI()
        ffi.cdef(_PRELUDE_NATIVE % {"cpu_words": 128 // probe.sizeof("unsigned long")})
    ffi.cdef(_render(_MESSAGE, i386=i386, extra={}))
    ffi.cdef(_render(_MESSAGE_REST, i386=i386, extra={"MESS6_LEN": ffi.sizeof("mess_3")}))
    maxbatcmd = C.MAXCOPYBUF // ffi.sizeof("cmd_t")
    ffi.cdef(_render(_PAYLOAD, i386=i386, extra={"MAXBATCMD": maxbatcmd}))
    if i386:
        ffi.cdef(_render(_I386_KERNEL, i386=True, extra={}))
    else:
        ffi.cdef(_LIBC)
    return ffi


#: Host layout (real C types); also declares libc `ioctl`.
ffi_native: cffi.FFI = _build(i386=False)
#: i386 layout on any host (the wire / emulator ABI).
ffi_i386: cffi.FFI = _build(i386=True)


def native_is_i386() -> bool:
    """True when the host's native layout is the i386 one (cmd_t of 120 bytes): the only case
    in which a real DVK can proxy."""
    return (ffi_native.sizeof("cmd_t") == wire.HEADER_SIZE
            and ffi_native.sizeof("message") == wire.MESSAGE_SIZE)


def maxbatcmd(ffi: cffi.FFI = ffi_native) -> int:
    """MAXBATCMD for a layout (546 on i386, 390 on x86_64)."""
    return C.MAXCOPYBUF // ffi.sizeof("cmd_t")


# ------------------------------------------------------------------------------------------------
# Message accessors computed from a layout
# ------------------------------------------------------------------------------------------------

_INT_FMT = {(1, True): "b", (1, False): "B", (2, True): "h", (2, False): "H",
            (4, True): "i", (4, False): "I", (8, True): "q", (8, False): "Q"}
_UNSIGNED_NAMES = ("unsigned", "uint", "size_t", "uintptr_t", "_Bool")


def _scalar_fmt(ffi: cffi.FFI, ctype: Any) -> str:
    """struct-module code of a primitive or pointer ctype (pointers as unsigned integers)."""
    size = ffi.sizeof(ctype)
    if ctype.kind == "pointer" or ctype.kind == "function":
        return _INT_FMT[(size, False)]
    if ctype.kind == "primitive":
        if ctype.cname == "char":
            return "c"
        signed = not ctype.cname.startswith(_UNSIGNED_NAMES)
        return _INT_FMT[(size, signed)]
    raise TypeError(f"no scalar format for {ctype.cname}")


def field_fmt(ffi: cffi.FFI, ctype: Any) -> str:
    """struct-module code of a field: scalars, `char[N]` -> 'Ns', `int[N]` -> 'Ni'."""
    if ctype.kind == "array":
        item = ctype.item
        if item.cname == "char":
            return f"{ctype.length}s"
        return f"{ctype.length}{_scalar_fmt(ffi, item)}"
    return _scalar_fmt(ffi, ctype)


def _accessor(member: str) -> str:
    """C accessor macro name of a union member field: m1i1 -> m1_i1, mAdst -> mA_dst."""
    return f"{member[:2]}_{member[2:]}"


def message_fields(ffi: cffi.FFI) -> dict[str, tuple[int, str]]:
    """Accessor name -> (offset in `message`, struct fmt) for a layout, named like
    `wire.I386_MESSAGE_FIELDS` (m9_t1 split into m9_t1_sec / m9_t1_nsec)."""
    out: dict[str, tuple[int, str]] = {
        "m_source": (ffi.offsetof("message", "m_source"), "i"),
        "m_type": (ffi.offsetof("message", "m_type"), "i"),
    }
    union = ffi.typeof("message").fields[2][1].type
    for variant, vfield in union.fields:
        for member, mfield in vfield.type.fields:
            base = ffi.offsetof("message", "m_u", variant, member)
            name = _accessor(member)
            if mfield.type.kind == "struct":          # m9t1: struct timespec
                for sub, sfield in mfield.type.fields:
                    short = sub[3:] if sub.startswith("tv_") else sub
                    out[f"{name}_{short}"] = (base + sfield.offset,
                                              field_fmt(ffi, sfield.type))
            else:
                out[name] = (base, field_fmt(ffi, mfield.type))
    return out


def native_message_fields() -> dict[str, tuple[int, str]]:
    """`message_fields` of the host layout (equals wire.I386_MESSAGE_FIELDS on i386)."""
    return message_fields(ffi_native)


# ------------------------------------------------------------------------------------------------
# Header codec: wire (i386, 120 bytes) <-> native cmd_t
# ------------------------------------------------------------------------------------------------

def _header_path(name: str) -> tuple[str, ...]:
    """Path inside cmd_t of a wire.HEADER_FIELDS name."""
    if name == "c_tv_sec":
        return ("c_timestamp", "tv_sec")
    if name == "c_tv_nsec":
        return ("c_timestamp", "tv_nsec")
    if name.startswith("v_"):
        return ("c_vcopy", name)
    return (name,)


_HEADER_PATHS: dict[str, tuple[str, ...]] = {n: _header_path(n) for n in wire.HEADER_FIELDS}
_MSG_BODY = slice(8, wire.MESSAGE_SIZE)


_LEAVES: dict[int, list[tuple[str, tuple[str, ...], bool]]] = {}


def _header_leaves(ffi: cffi.FFI) -> list[tuple[str, tuple[str, ...], bool]]:
    """(wire name, path in cmd_t, is a pointer) for every wire header field, per layout."""
    leaves = _LEAVES.get(id(ffi))
    if leaves is None:
        leaves = []
        for name, path in _HEADER_PATHS.items():
            ctype = ffi.typeof("cmd_t")
            for part in path:
                ctype = dict(ctype.fields)[part].type
            leaves.append((name, path, ctype.kind == "pointer"))
        _LEAVES[id(ffi)] = leaves
    return leaves


def _union_is_wire(ffi: cffi.FFI) -> bool:
    return ffi.sizeof("message") == wire.MESSAGE_SIZE and ffi.sizeof("cmd_t") == wire.HEADER_SIZE


def header_to_native(h: wire.Header, ffi: cffi.FFI = ffi_native) -> Any:
    """A new `cmd_t *` of `ffi`'s layout holding `h`'s fields.

    Every scalar field and `c_vcopy` is copied (32-bit wire addresses become pointers);
    of `c_msg` only `m_source` and `m_type`, plus the union body when the layout is the i386
    one (then identical bytes).  On a 64-bit layout the union stays zero: its variants put
    pointers and longs at other offsets, so nothing can convert it (docs/design.md, "The wire").
    """
    p = ffi.new("cmd_t *")
    for name, path, is_ptr in _header_leaves(ffi):
        obj = p
        for part in path[:-1]:
            obj = getattr(obj, part)
        value = getattr(h, name)
        setattr(obj, path[-1], ffi.cast("void *", value) if is_ptr else value)
    msg = h.c_msg
    p.c_msg.m_source = msg.m_source
    p.c_msg.m_type = msg.m_type
    if _union_is_wire(ffi):
        raw = bytes(msg)
        ffi.memmove(ffi.addressof(p.c_msg, "m_u"), raw[_MSG_BODY], len(raw) - 8)
    return p


def _fits(name: str, value: int, fmt: str) -> int:
    """Check that a native value fits the 32-bit wire field (no 64-bit proxying)."""
    lo, hi = ((-(1 << 31), (1 << 31) - 1) if fmt == "i" else (0, (1 << 32) - 1))
    if not lo <= value <= hi:
        raise OverflowError(f"{name}={value:#x} does not fit the 32-bit i386 wire field")
    return value


def header_from_native(p: Any, ffi: cffi.FFI = ffi_native,
                       into: wire.Header | None = None) -> wire.Header:
    """The wire `Header` of a `cmd_t *` of `ffi`'s layout (written into `into` if given).

    Same rules as `header_to_native`: the message union body is copied only when the layout
    is i386; otherwise the header's union is zeroed.  OverflowError when a 64-bit value
    (pointer, flags) does not fit its 32-bit wire field.
    """
    h = wire.Header() if into is None else into
    if into is not None:
        h.buf[:] = bytes(wire.HEADER_SIZE)
    for name, path, is_ptr in _header_leaves(ffi):
        obj = p
        for part in path:
            obj = getattr(obj, part)
        value = int(ffi.cast("uintptr_t", obj)) if is_ptr else obj
        setattr(h, name, _fits(name, value, wire.HEADER_FIELDS[name][1]))
    msg = h.c_msg
    msg.m_source = p.c_msg.m_source
    msg.m_type = p.c_msg.m_type
    if _union_is_wire(ffi):
        body = ffi.buffer(ffi.addressof(p.c_msg, "m_u"), wire.MESSAGE_SIZE - 8)[:]
        h.buf[wire.MSG_OFFSET + 8:wire.MSG_OFFSET + wire.MESSAGE_SIZE] = body
    return h
