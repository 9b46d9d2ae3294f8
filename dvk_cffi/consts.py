"""DVK constants (dvk_abi.md §3): commands, flags, limits, endpoints, bind types.

Names follow the C headers so a reader of `cmd.h`, `proxy_usr.h`, `com.h` finds them.
"""

# --- device and ioctl (§1.1, §1.2) -------------------------------------------------------------
DVK_FILE_NAME = "/dev/dvk"
DVK_MAJOR = 33
DVK_IOC_MAGIC = 0xE3
DVK_IOC_MAXNR = 35

# --- commands (§3.1) ---------------------------------------------------------------------------
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
#: Commands whose message body is a real message (its m_source names the sender).
MESSAGE_BODY_CMDS = MESSAGE_CMDS | {CMD_NTFY_MSG}
#: A client's requests: what opens (or, with a new PID, restarts) a balanced session.
REQUEST_CMDS = frozenset({CMD_SEND_MSG, CMD_SNDREC_MSG, CMD_NTFY_MSG})
#: The ACKs that answer a client's SEND or SNDREC.
MESSAGE_ACK_CMDS = frozenset({CMD_SEND_ACK, CMD_SNDREC_ACK})
#: COPY data frames: never batched; the only frames LZ4 compresses.
COPY_DATA_CMDS = frozenset({CMD_COPYIN_DATA, CMD_COPYOUT_DATA})
#: Commands whose vcopy sub-header names endpoints (v_src, v_dst, v_rqtr).
VCOPY_CMDS = frozenset({CMD_COPYIN_DATA, CMD_COPYOUT_RQST, CMD_COPYLCL_RQST, CMD_COPYRMT_RQST,
                        CMD_COPYIN_RQST, CMD_COPYIN_ACK, CMD_COPYOUT_DATA, CMD_COPYLCL_ACK,
                        CMD_COPYRMT_ACK})
#: Every command code a frame may carry.
VALID_CMDS = frozenset(CMD_NAMES)

#: Commands put2lcl accepts (§4.6 step 17); everything else is EDVSBADREQUEST.
PUT2LCL_CMDS = frozenset({
    CMD_SEND_MSG, CMD_SNDREC_MSG, CMD_REPLY_MSG, CMD_NTFY_MSG, CMD_COPYIN_DATA,
    CMD_COPYIN_RQST, CMD_COPYOUT_RQST, CMD_COPYLCL_RQST, CMD_COPYRMT_RQST,
    CMD_SEND_ACK, CMD_SNDREC_ACK, CMD_COPYIN_ACK, CMD_COPYLCL_ACK, CMD_COPYOUT_DATA,
    CMD_COPYRMT_ACK,
})

# --- c_flags bits (§3.2) -----------------------------------------------------------------------
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

# --- requests and the ACKs that answer them ------------------------------------------------------
#: The error ACK a proxy sends back for a request that could not be delivered: what the
#: requester waits for (a sendrec caller waits in receive and needs CMD_SNDREC_ACK; a send or
#: reply caller needs CMD_SEND_ACK; a copy requester its copy ACK).  NTFY has none: a notify
#: caller does not wait.
ERROR_ACK_CMD = {
    CMD_SEND_MSG: CMD_SEND_ACK, CMD_REPLY_MSG: CMD_SEND_ACK,
    CMD_SNDREC_MSG: CMD_SNDREC_ACK, CMD_COPYIN_DATA: CMD_COPYIN_ACK,
    CMD_COPYOUT_RQST: CMD_COPYOUT_DATA, CMD_COPYLCL_RQST: CMD_COPYLCL_ACK,
    CMD_COPYRMT_RQST: CMD_COPYRMT_ACK, CMD_COPYIN_RQST: CMD_COPYRMT_ACK,
}

# --- proxy pair status px_flags (§3.3) ---------------------------------------------------------
PX_BIT_INUSE = 0
PX_BIT_SCONNECTED = 1
PX_BIT_RCONNECTED = 2
PROXIES_FREE = 0x0
PROXIES_INUSE = 0x1
PROXIES_SCONNECTED = 0x2
PROXIES_RCONNECTED = 0x4
NO_PROXIES = -1
PROXY_NO_DC = -1

# --- node flags n_flags (§3.4) -----------------------------------------------------------------
NODE_FREE = 0
NODE_RUNNING = 0
NODE_BIT_ATTACHED = 1
NODE_BIT_SCONNECTED = 2
NODE_BIT_RCONNECTED = 3
NODE_ATTACHED = 1 << NODE_BIT_ATTACHED
NODE_SCONNECTED = 1 << NODE_BIT_SCONNECTED
NODE_RCONNECTED = 1 << NODE_BIT_RCONNECTED
MAXNODENAME = 16

# --- p_misc_flags (§3.5) -----------------------------------------------------------------------
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

# --- p_rts_flags (§3.6) ------------------------------------------------------------------------
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

# --- DVS / DC flags (§3.7) ---------------------------------------------------------------------
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

# --- proxy_conn status (§3.8) ------------------------------------------------------------------
CONNECT_SPROXY = 1
CONNECT_RPROXY = 2
DISCONNECT_SPROXY = 3
DISCONNECT_RPROXY = 4
PROXY_NO_REPLY = 0
PROXY_REPLY = 1
MAXPROXYNAME = 16

# --- timeouts (§3.9), milliseconds -------------------------------------------------------------
TIMEOUT_NOWAIT = 0
TIMEOUT_FOREVER = -1
TIMEOUT_MOLCALL = 30000
TIMEOUT_MS = 60000
HELLO_PERIOD = 30000
RETRY_MS = 2000

# --- limits (§3.10) ----------------------------------------------------------------------------
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

# --- endpoints (§3.11) -------------------------------------------------------------------------
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

# --- HELLO message types (§5) ------------------------------------------------------------------
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
