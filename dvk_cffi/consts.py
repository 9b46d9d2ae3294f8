"""DVK constants (the module's headers): commands, flags, limits, endpoints, bind types.

Names follow the C headers so a reader of `cmd.h`, `proxy_usr.h`, `com.h` finds them.
"""

# --- device and ioctl -------------------------------------------------------------------------
DVK_FILE_NAME = "/dev/dvk"
DVK_MAJOR = 33
DVK_IOC_MAGIC = 0xE3
DVK_IOC_MAXNR = 35

# --- commands ---------------------------------------------------------------------------------
BIT_ACKNOWLEDGE = 13
MASK_ACKNOWLEDGE = 1 << BIT_ACKNOWLEDGE

CMD_NONE = 0
CMD_SEND_MSG = 1
CMD_NTFY_MSG = 2
CMD_SNDREC_MSG = 3
CMD_REPLY_MSG = 4
CMD_COPYIN_DATA = 5
CMD_COPYOUT_RQST = 6
CMD_COPYLCL_RQST = 7
CMD_COPYRMT_RQST = 8
CMD_COPYIN_RQST = 9
CMD_HELLO = 10
CMD_SHUTDOWN = 11
CMD_PROCINFO = 12
CMD_PROCBIND = 13
CMD_PROCUNBIND = 14
CMD_LAST_CMD = 15

CMD_SEND_ACK = CMD_SEND_MSG | MASK_ACKNOWLEDGE
CMD_NTFY_ACK = CMD_NTFY_MSG | MASK_ACKNOWLEDGE
CMD_SNDREC_ACK = CMD_SNDREC_MSG | MASK_ACKNOWLEDGE
CMD_REPLY_ACK = CMD_REPLY_MSG | MASK_ACKNOWLEDGE
CMD_COPYIN_ACK = CMD_COPYIN_DATA | MASK_ACKNOWLEDGE
CMD_COPYOUT_DATA = CMD_COPYOUT_RQST | MASK_ACKNOWLEDGE
CMD_COPYLCL_ACK = CMD_COPYLCL_RQST | MASK_ACKNOWLEDGE
CMD_COPYRMT_ACK = CMD_COPYRMT_RQST | MASK_ACKNOWLEDGE
CMD_PROCINFO_ACK = CMD_PROCINFO | MASK_ACKNOWLEDGE
CMD_PROCBIND_ACK = CMD_PROCBIND | MASK_ACKNOWLEDGE
CMD_PROCUNBIND_ACK = CMD_PROCUNBIND | MASK_ACKNOWLEDGE

CMD_NAMES = {
    v: k for k, v in list(globals().items())
    if k.startswith("CMD_") and isinstance(v, int) and k not in ("CMD_LAST_CMD",)
}

#: Commands that carry a payload of `c_len` data bytes on the wire.
DATA_CMDS = frozenset({CMD_COPYIN_DATA, CMD_COPYOUT_DATA, CMD_COPYIN_RQST})

#: The message commands (what the C statistics count as messages).
MESSAGE_CMDS = frozenset({CMD_SEND_MSG, CMD_SNDREC_MSG, CMD_REPLY_MSG})
#: A client's requests: what opens (or, with a new PID, restarts) a balanced session.
REQUEST_CMDS = frozenset({CMD_SEND_MSG, CMD_SNDREC_MSG, CMD_NTFY_MSG})
#: COPY data frames: never batched; the only frames LZ4 compresses.
COPY_DATA_CMDS = frozenset({CMD_COPYIN_DATA, CMD_COPYOUT_DATA})
#: Commands whose vcopy sub-header names endpoints (v_src, v_dst, v_rqtr).
VCOPY_CMDS = frozenset({CMD_COPYIN_DATA, CMD_COPYOUT_RQST, CMD_COPYLCL_RQST, CMD_COPYRMT_RQST,
                        CMD_COPYIN_RQST, CMD_COPYIN_ACK, CMD_COPYOUT_DATA, CMD_COPYLCL_ACK,
                        CMD_COPYRMT_ACK})
#: Every command code a frame may carry.
VALID_CMDS = frozenset(CMD_NAMES)

#: Commands put2lcl accepts; everything else is EDVSBADREQUEST.
PUT2LCL_CMDS = frozenset({
    CMD_SEND_MSG, CMD_SNDREC_MSG, CMD_REPLY_MSG, CMD_NTFY_MSG, CMD_COPYIN_DATA,
    CMD_COPYIN_RQST, CMD_COPYOUT_RQST, CMD_COPYLCL_RQST, CMD_COPYRMT_RQST,
    CMD_SEND_ACK, CMD_SNDREC_ACK, CMD_COPYIN_ACK, CMD_COPYLCL_ACK, CMD_COPYOUT_DATA,
    CMD_COPYRMT_ACK,
})

# --- c_flags bits -----------------------------------------------------------------------------
FLAG_BATCH_BIT = 0
FLAG_LZ4_BIT = 1
FLAG_CHECK_HDR_BIT = 2
FLAG_BATCH = 1 << FLAG_BATCH_BIT
FLAG_LZ4 = 1 << FLAG_LZ4_BIT
FLAG_CHECK_HDR = 1 << FLAG_CHECK_HDR_BIT
#: Set by this project's DSPs on every CMD_NONE frame they send (HELLO, load report, control):
#: the announcement that the sender is such a DSP.  A C DSP's HELLO always has c_flags 0, so a
#: stale HELLO body can never pass for a control frame.
FLAG_DSP_PEER_BIT = 12
FLAG_DSP_PEER = 1 << FLAG_DSP_PEER_BIT


# --- proxy pair status px_flags ---------------------------------------------------------------
PX_BIT_INUSE = 0
PX_BIT_SCONNECTED = 1
PX_BIT_RCONNECTED = 2
PROXIES_FREE = 0x0
PROXIES_INUSE = 0x1
PROXIES_SCONNECTED = 0x2
PROXIES_RCONNECTED = 0x4
NO_PROXIES = -1
PROXY_NO_DC = -1

# --- node flags n_flags -----------------------------------------------------------------------
NODE_FREE = 0
NODE_RUNNING = 0
NODE_BIT_ATTACHED = 1
NODE_BIT_SCONNECTED = 2
NODE_BIT_RCONNECTED = 3
NODE_ATTACHED = 1 << NODE_BIT_ATTACHED
NODE_SCONNECTED = 1 << NODE_BIT_SCONNECTED
NODE_RCONNECTED = 1 << NODE_BIT_RCONNECTED
MAXNODENAME = 16

# --- p_misc_flags -----------------------------------------------------------------------------
MIS_PROXY = 0x1
MIS_CONNECTED = 0x2
MIS_NOTIFY = 0x4
MIS_NEEDMIG = 0x8
MIS_RMTBACKUP = 0x10
MIS_GRPLEADER = 0x20
MIS_KTHREAD = 0x40
MIS_REPLICATED = 0x80
MIS_KILLED = 0x100
MIS_WOKENUP = 0x200
MIS_USERMODE = 0x400
MIS_RMTINFO = 0x800
MIS_NOMIGRATE = 0x1000
MIS_BIT_ATOMIC = 13
MIS_ATOMIC = 1 << MIS_BIT_ATOMIC
MIS_ENQUEUED = 0x4000

# --- p_rts_flags ------------------------------------------------------------------------------
SLOT_FREE = 0x1
NO_MAP = 0x2
SENDING = 0x4
RECEIVING = 0x8
SIGNALED = 0x10
SIG_PENDING = 0x20
P_STOP = 0x40
NO_PRIV = 0x80
NO_PRIORITY = 0x100
NO_ENDPOINT = 0x200
ONCOPY = 0x400
MIGRATING = 0x800
REMOTE = 0x1000
RMTOPER = 0x2000
WAITMIGR = 0x8000
WAITUNBIND = 0x20000
WAITBIND = 0x40000

# --- DVS / DC flags ---------------------------------------------------------------------------
DVS_RUNNING = 0
DVS_NO_INIT = -1
DVK_IPC = 0x1
DVK_IOCTL = 0x2
DVK_USERMODE = 0x4
DVK_INITIALIZED = 0x100
DC_RUNNING = 0
BIT_DC_FREE = 1
DC_FREE = 1 << BIT_DC_FREE
MAXDCNAME = 16
DVS_VERSION = 202202

# --- proxy_conn status ------------------------------------------------------------------------
CONNECT_SPROXY = 1
CONNECT_RPROXY = 2
DISCONNECT_SPROXY = 3
DISCONNECT_RPROXY = 4
PROXY_NO_REPLY = 0
PROXY_REPLY = 1
MAXPROXYNAME = 16

# --- timeouts, milliseconds -------------------------------------------------------------------
TIMEOUT_NOWAIT = 0
TIMEOUT_FOREVER = -1
TIMEOUT_MOLCALL = 30000
TIMEOUT_MS = 60000
HELLO_PERIOD = 30000
RETRY_MS = 2000

# --- limits -----------------------------------------------------------------------------------
_NR_FIXED_TASKS = 3
NR_NODES = 32
NR_SYSTASKS = NR_NODES
NR_TASKS = _NR_FIXED_TASKS + NR_SYSTASKS
NR_PROCS = 256 - NR_TASKS
NR_SERVERS = 29
NR_SYS_PROCS = NR_SERVERS + NR_TASKS
NR_USR_PROCS = NR_PROCS - NR_SYS_PROCS
NR_DCS = 32
MAXCOPYBUF = 65536
MAXCOPYLEN = 1048576
MAXPROCNAME = 16
M3_STRING = 14
MC_STRING = 10
MD5_SIZE = 16
SLOTS_BY_MSG = 4

# --- endpoints --------------------------------------------------------------------------------
ANY = 0x7ACE
NONE = 0x6ACE
SELF = 0x8ACE
LOCALNODE = -1
PROC_NO_PID = -1
KERNEL = HARDWARE = -1
SYSTEM = -2
SLOTS = SYSTEM - 32
CLOCK = -35
IDLE = PROXY = -36
NOTIFY_MESSAGE = 0x1000
_ENDPOINT_GEN_SIZE = NR_TASKS + SELF + 1


def SYSTASK(node: int) -> int:
    """Endpoint of a node's SYSTASK (one per node)."""
    return -2 - node


def NOTIFY_FROM(p_nr: int) -> int:
    """m_type of a notification from process number `p_nr`."""
    return NOTIFY_MESSAGE | p_nr


def _ENDPOINT(gen: int, p_nr: int) -> int:
    """Endpoint from generation and process number (endpoint.h)."""
    return gen * _ENDPOINT_GEN_SIZE + p_nr


def _ENDPOINT_P(ep: int) -> int:
    """Process number of an endpoint (endpoint.h)."""
    return ((ep + NR_TASKS) % _ENDPOINT_GEN_SIZE) - NR_TASKS


# bind types
SELF_BIND = 0
LCL_BIND = 1
RMT_BIND = 2
BKUP_BIND = 3
REPLICA_BIND = 4
USERMODE_BIND = 5
MAX_BIND_TYPE = USERMODE_BIND
WAIT_BIND = 0
WAIT_UNBIND = 1
MIGR_START = 0
MIGR_COMMIT = 1
MIGR_ROLLBACK = 2

# privilege levels (priv_usr.h)
USER_PRIV = 0
SERVER_PRIV = 1
TASK_PRIV = 2
SYSTEM_PRIV = 3
KERNEL_PRIV = 4
PROXY_PRIV = 5

# --- HELLO message types ----------------------------------------------------------------------
MT_CLT_WAIT_BIND = 1
MT_CLT_WAIT_UNBIND = 2
MT_SVR_WAIT_UNBIND = 3
MT_LOAD_THRESHOLDS = 4
MT_LOAD_LEVEL = 5
MT_RUN_COMMAND = 6
MT_RMTBIND = 7
MT_GET_DVSINFO = 8
MT_GET_DCINFO = 9
MT_GET_PROCINFO = 10
MT_ACKNOWLEDGE = 0x1000

LVL_NOTINIT = -1
LVL_IDLE = 0
LVL_BUSY = 1
LVL_SATURATED = 2

# --- DVS/DC defaults used when no DVK is open (test_dvs_init / DC0.cfg) -------------------------
DEFAULT_DVS = dict(
    d_name="DEFAULT", d_nr_dcs=NR_DCS, d_nr_nodes=NR_NODES, d_nr_procs=NR_PROCS,
    d_nr_tasks=NR_TASKS, d_nr_sysprocs=NR_SYS_PROCS, d_max_copybuf=MAXCOPYBUF,
    d_max_copylen=MAXCOPYLEN,
)
DEFAULT_DC0 = dict(
    dc_dcid=0, dc_nr_procs=221, dc_nr_tasks=34, dc_nr_sysprocs=64, dc_nr_nodes=32, dc_name="DC0",
)

# ================================================================================================
# --- the emulated node kernel's command sets and ACK tables (dvk_cffi/emu) ----------------------
# Appended as one section; the emulator takes these from here and from nowhere else.

#: DVK call numbers (dvk_calls.h) used in a descriptor's allowed-calls set.
DVK_SEND, DVK_RECEIVE, DVK_NOTIFY, DVK_SENDREC, DVK_RCVRQST, DVK_REPLY = 2, 3, 4, 5, 6, 7
DVK_UNBIND, DVK_VCOPY, DVK_GETEP, DVK_WAIT4BIND = 10, 13, 26, 29
DVK_PROXYBIND, DVK_PROXYUNBIND, DVK_PUT2LCL, DVK_GET2RMT = 17, 18, 20, 21
#: What a system process, a user process and each half of a proxy pair may call.
DVK_ALL_CALLS = frozenset(range(35))
DVK_USER_CALLS = frozenset({DVK_SENDREC, DVK_UNBIND, DVK_GETEP, DVK_WAIT4BIND})
DVK_SPROXY_CALLS = frozenset({DVK_PROXYBIND, DVK_PROXYUNBIND, DVK_GET2RMT})
DVK_RPROXY_CALLS = frozenset({DVK_PROXYBIND, DVK_PROXYUNBIND, DVK_PUT2LCL})

#: Commands that carry an IPC message (`c_msg`).
MSG_CMDS = frozenset({CMD_SEND_MSG, CMD_SNDREC_MSG, CMD_REPLY_MSG, CMD_NTFY_MSG})
#: Message commands whose message lands in the receiver's buffer (a notify is made there).
MSG_DELIVER_CMDS = MESSAGE_CMDS
#: ACKs that end a message sender's wait.
MSG_ACK_CMDS = frozenset({CMD_SEND_ACK, CMD_SNDREC_ACK})
#: Requests of a copy (one chunk of a remote vcopy each).
COPY_RQST_CMDS = frozenset({CMD_COPYIN_DATA, CMD_COPYOUT_RQST, CMD_COPYLCL_RQST,
                            CMD_COPYRMT_RQST, CMD_COPYIN_RQST})
#: Requests: commands a remote process sends and then waits on (put2lcl row 11 refuses a new one
#: while the requester still has one under way).
RQST_CMDS = MSG_CMDS | COPY_RQST_CMDS
#: ACKs that end a copy requester's wait.
COPY_ACK_CMDS = frozenset({CMD_COPYIN_ACK, CMD_COPYLCL_ACK, CMD_COPYRMT_ACK})
#: The DVK call a message command needs in the remote sender's allowed set (put2lcl row 16);
#: copy requests need DVK_VCOPY in the requester's.
CMD_CALL = {CMD_SEND_MSG: DVK_SEND, CMD_SNDREC_MSG: DVK_SENDREC, CMD_REPLY_MSG: DVK_REPLY,
            CMD_NTFY_MSG: DVK_NOTIFY}

#: The error ACK the node kernel's put2lcl queues itself for a request it refuses in the rows
#: that ACK (destination denied, remote, dead or migrating).
#:
#: It differs from the ACK a proxy sends for a put2lcl failure the kernel did not ACK
#: (`PROXY_ERROR_ACK`) in two rows, on purpose:
#: - SNDREC_MSG: the kernel answers with a SEND_ACK, as the module does.  At the origin that
#:   requester left SENDING when its sender proxy took the command, so the SEND_ACK is refused
#:   with EDVSACKDST there; the proxy delivering it then turns it into a SNDREC_ACK, which ends
#:   the sendrec with the error.  A proxy that answers a failure itself sends SNDREC_ACK at once.
#: - NTFY_MSG: the kernel queues a SEND_ACK, as the module does; a notifier never waits (it
#:   returned when its sender proxy took the command), so the origin refuses it and nothing
#:   changes.  A proxy sends nothing for a failed notify.
KERNEL_ERROR_ACK = {
    CMD_SEND_MSG: CMD_SEND_ACK, CMD_SNDREC_MSG: CMD_SEND_ACK, CMD_REPLY_MSG: CMD_SEND_ACK,
    CMD_NTFY_MSG: CMD_SEND_ACK, CMD_COPYIN_DATA: CMD_COPYIN_ACK,
    CMD_COPYOUT_RQST: CMD_COPYOUT_DATA, CMD_COPYLCL_RQST: CMD_COPYLCL_ACK,
    CMD_COPYRMT_RQST: CMD_COPYRMT_ACK, CMD_COPYIN_RQST: CMD_COPYRMT_ACK,
}
#: The error ACK a proxy sends for a request whose put2lcl failed without a kernel ACK (the
#: requester waits for one).  Same as the kernel's table but SNDREC_MSG -> SNDREC_ACK and no
#: NTFY_MSG row (see `KERNEL_ERROR_ACK`).
PROXY_ERROR_ACK = {
    **{cmd: ack for cmd, ack in KERNEL_ERROR_ACK.items() if cmd != CMD_NTFY_MSG},
    CMD_SNDREC_MSG: CMD_SNDREC_ACK,
}
# ================================================================================================
