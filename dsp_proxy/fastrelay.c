/*
 * The LB host's compiled relay for established relayed sessions (docs/performance.md,
 * "The compiled relay"), and, at the end of this file, the node DSPs' compiled sender and
 * deliverer.
 *
 * The Python router decides every rule; this file only repeats, for frames of sessions the
 * router handed over, the rewrite the router would do, so that the steady state of a session
 * costs no Python per frame.  Anything it is not certain of (a header the Python check might
 * refuse, a flag, an unknown flow, a PID change, an error code that ends a session, an output
 * link that compresses or batches) stops the walk: the receiver hands that frame, and only
 * that one, to the Python path, which may then take the session back.
 *
 * One mutex guards the whole table: the receivers walk their buffers under it, the router
 * changes sessions and flows under it.
 *
 * The wire of each link: its send lock is a mutex here, which the link's Python writers take
 * as their send lock and the relay takes to write relayed frames itself.  The relay writes
 * only while the link has nothing of its own waiting ("quiet", kept by the writers with a
 * sequence number of the link's queue), and only to the descriptor the link publishes while
 * it is up; the link closes a socket only under the send lock, after withdrawing it.
 * Built by dsp_proxy/fastrelay_build.py (cffi).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <errno.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <time.h>
#include <poll.h>
#include <sys/uio.h>

#define RT_HEADER 120
#define RT_MAX_NODES 64
#define RT_MAX_DCS 32
#define RT_CMD_SLOTS 64
#define RT_FLOW_CAP 16384          /* power of two */
#define RT_SESS_CAP 8192
#define RT_MAX_CODES 16

/* Header offsets (the i386 layout of the wire header). */
enum { O_CMD = 0, O_DCID = 4, O_SRC = 8, O_DST = 12, O_SNODE = 16, O_DNODE = 20, O_RCODE = 24,
       O_LEN = 28, O_PID = 32, O_BATCH_NR = 36, O_FLAGS = 40, O_M_SOURCE = 60, O_V = 96 };

/* The moments at which another thread's step decides whether a rule of the wire holds.  The
 * race tests' build of this file (RT_TEST_HOOKS, tests/test_fastrelay_races.py) calls the
 * test's function there, so that a test can take that step at exactly that moment; in the
 * module the DSP loads they are no code at all. */
enum { RT_AT_SETTLED = 1,      /* rt_wire_settled: nothing queued seen, quiet not yet set */
       RT_AT_WRITE_DONE = 2,   /* write_segments: a whole write, the send lock still held */
       RT_AT_LOCKING = 3 };    /* write_segments: the link looked writable, lock not taken */
#ifdef RT_TEST_HOOKS
void (*rt_test_hook)(int at, int node);
#define RT_HOOK(at, node) (rt_test_hook ? rt_test_hook(at, node) : (void)0)
#else
#define RT_HOOK(at, node) ((void)0)
#endif

/* Command classes, filled from the Python sets so the rules have one source. */
enum { K_VALID = 1, K_DATA = 2, K_REQUEST = 4, K_MSG = 8, K_MSG_ACK = 16, K_VCOPY = 32,
       K_MESSAGE = 64 };

typedef struct {
    int32_t node, off, len, nframes;
} relay_seg;

typedef struct {
    int64_t frames, bytes;         /* signed: a refused frame is taken back (rt_untally) */
    uint64_t cmd_mask, dc_mask;    /* the slots and DCs counted in (the reader visits those) */
    int64_t by_cmd[RT_CMD_SLOTS];
    int64_t dc_cmds[RT_MAX_DCS], dc_msgs[RT_MAX_DCS], dc_data[RT_MAX_DCS];
} relay_tally;

typedef struct {
    int32_t used, dir, peer, dcid, src, dst;   /* key; used: 0 empty, 1 used, 2 deleted */
    int32_t sid, new_ep;                        /* session, endpoint the key's side becomes */
} flow;

typedef struct {
    int32_t used, clt_node, svr_node, dcid, clt_ep, lbsvr_ep, clt_pid, svr_pid, pending;
    uint64_t uses, cmds, bytes;
} fsess;

typedef struct relay_table {
    pthread_mutex_t lock;
    int32_t local, lb_id, nr_nodes, nr_dcs, nr_tasks, gen_size, ack_bit, maxcopybuf;
    int32_t flag_batch, flag_lz4, flag_check;
    int32_t cmd_send, cmd_sndrec, cmd_reply;
    uint8_t cls[RT_CMD_SLOTS];
    int32_t dc_known[RT_MAX_DCS], dc_lo[RT_MAX_DCS], dc_hi[RT_MAX_DCS];
    uint8_t raw_ok[RT_MAX_NODES];
    int32_t reverse[RT_MAX_NODES];              /* the node serves sessions this DSP balances */
    int32_t lb_backlog;                         /* frames the put2lcl thread holds (rt_lb_backlog) */
    pthread_mutex_t wire[RT_MAX_NODES];         /* the links' send locks */
    int32_t fd[RT_MAX_NODES];                   /* where the relay may write, -1 nowhere */
    uint32_t pubs[RT_MAX_NODES];                /* changes of fd[] so far */
    int32_t quiet[RT_MAX_NODES];                /* the link has nothing queued or unsent */
    uint64_t seq[RT_MAX_NODES];                 /* frames the link queued so far */
    double last_tx[RT_MAX_NODES];               /* the relay's last write (CLOCK_MONOTONIC) */
    int32_t ncodes, codes[RT_MAX_CODES];       /* ACK rcodes the Python path must see */
    int32_t nflows, ndeleted;
    flow flows[RT_FLOW_CAP];
    fsess sess[RT_SESS_CAP];
    relay_tally tally[2][RT_MAX_NODES];         /* [0] received from, [1] sent to */
} relay_table;

static int relay_walk(relay_table *t, int peer, unsigned char *buf, int start, int end,
                      relay_seg *segs, int maxsegs, int *nsegs, int *python);

static inline int32_t rd(const unsigned char *h, int off)
{
    int32_t v;
    memcpy(&v, h + off, 4);
    return v;
}

static inline void wr(unsigned char *h, int off, int32_t v)
{
    memcpy(h + off, &v, 4);
}

/* The slot of a command code in the class and tally arrays; -1 for codes outside them. */
static inline int cmd_slot(const relay_table *t, int32_t cmd)
{
    int32_t ack = (int32_t)1 << t->ack_bit;
    if (cmd & ~(0x1F | ack))
        return -1;
    return (cmd & 0x1F) | ((cmd & ack) ? 32 : 0);
}

static inline int endpoint_ok(const relay_table *t, int32_t ep, int32_t lo, int32_t hi)
{
    int64_t p = ((int64_t)ep + t->nr_tasks) % t->gen_size;
    if (p < 0)
        p += t->gen_size;
    p -= t->nr_tasks;
    return -lo <= p && p < hi;
}

static inline uint32_t flow_hash(int32_t dir, int32_t peer, int32_t dcid, int32_t src, int32_t dst)
{
    uint64_t x = ((uint64_t)(uint32_t)src << 32) ^ (uint32_t)dst;
    x ^= ((uint64_t)(uint32_t)(dir * 131 + peer) << 40) ^ ((uint64_t)(uint32_t)dcid << 20);
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return (uint32_t)x & (RT_FLOW_CAP - 1);
}

static flow *flow_find(relay_table *t, int32_t dir, int32_t peer, int32_t dcid, int32_t src,
                       int32_t dst)
{
    uint32_t i = flow_hash(dir, peer, dcid, src, dst);
    for (int n = 0; n < RT_FLOW_CAP; n++, i = (i + 1) & (RT_FLOW_CAP - 1)) {
        flow *f = &t->flows[i];
        if (f->used == 0)
            return NULL;
        if (f->used == 1 && f->dir == dir && f->peer == peer && f->dcid == dcid &&
            f->src == src && f->dst == dst)
            return f;
    }
    return NULL;
}

/* Rebuild the flow table without its deleted slots (they lengthen every probe). */
static void flow_rehash(relay_table *t)
{
    flow *keep = malloc(sizeof t->flows);
    int n = 0;
    if (keep == NULL)
        return;
    for (int i = 0; i < RT_FLOW_CAP; i++)
        if (t->flows[i].used == 1)
            keep[n++] = t->flows[i];
    memset(t->flows, 0, sizeof t->flows);
    for (int k = 0; k < n; k++) {
        flow *f = &keep[k];
        uint32_t i = flow_hash(f->dir, f->peer, f->dcid, f->src, f->dst);
        while (t->flows[i].used)
            i = (i + 1) & (RT_FLOW_CAP - 1);
        t->flows[i] = *f;
    }
    t->nflows = n;
    t->ndeleted = 0;
    free(keep);
}

static int flow_put(relay_table *t, int32_t dir, int32_t peer, int32_t dcid, int32_t src,
                    int32_t dst, int32_t sid, int32_t new_ep)
{
    flow *f = flow_find(t, dir, peer, dcid, src, dst);
    if (f != NULL) {
        f->sid = sid;
        f->new_ep = new_ep;
        return 0;
    }
    if (t->nflows + 1 > RT_FLOW_CAP / 2)
        return -1;
    if (t->nflows + t->ndeleted + 1 > RT_FLOW_CAP / 2)
        flow_rehash(t);
    if (t->nflows + t->ndeleted + 1 > RT_FLOW_CAP * 3 / 4)
        return -1;
    uint32_t i = flow_hash(dir, peer, dcid, src, dst);
    while (t->flows[i].used == 1)
        i = (i + 1) & (RT_FLOW_CAP - 1);
    if (t->flows[i].used == 2)
        t->ndeleted--;
    f = &t->flows[i];
    f->used = 1;
    f->dir = dir;
    f->peer = peer;
    f->dcid = dcid;
    f->src = src;
    f->dst = dst;
    f->sid = sid;
    f->new_ep = new_ep;
    t->nflows++;
    return 0;
}

relay_table *rt_new(int local, int lb_id, int nr_nodes, int nr_dcs, int nr_tasks, int gen_size,
                    int ack_bit, int maxcopybuf, int flag_batch, int flag_lz4, int flag_check,
                    int cmd_send, int cmd_sndrec, int cmd_reply)
{
    if (nr_nodes <= 0 || nr_nodes > RT_MAX_NODES || nr_dcs <= 0 || nr_dcs > RT_MAX_DCS ||
        gen_size <= 0 || ack_bit < 6 || ack_bit > 30)
        return NULL;
    relay_table *t = calloc(1, sizeof *t);
    if (t == NULL)
        return NULL;
    pthread_mutex_init(&t->lock, NULL);
    for (int i = 0; i < RT_MAX_NODES; i++) {
        pthread_mutex_init(&t->wire[i], NULL);
        t->fd[i] = -1;
    }
    t->local = local;
    t->lb_id = lb_id;
    t->nr_nodes = nr_nodes;
    t->nr_dcs = nr_dcs;
    t->nr_tasks = nr_tasks;
    t->gen_size = gen_size;
    t->ack_bit = ack_bit;
    t->maxcopybuf = maxcopybuf;
    t->flag_batch = flag_batch;
    t->flag_lz4 = flag_lz4;
    t->flag_check = flag_check;
    t->cmd_send = cmd_send;
    t->cmd_sndrec = cmd_sndrec;
    t->cmd_reply = cmd_reply;
    return t;
}

void rt_free(relay_table *t)
{
    if (t != NULL) {
        pthread_mutex_destroy(&t->lock);
        for (int i = 0; i < RT_MAX_NODES; i++)
            pthread_mutex_destroy(&t->wire[i]);
        free(t);
    }
}

static inline int node_ok(int node)
{
    return node >= 0 && node < RT_MAX_NODES;
}

void rt_wire_lock(relay_table *t, int node)
{
    if (node_ok(node))
        pthread_mutex_lock(&t->wire[node]);
}

int rt_wire_trylock(relay_table *t, int node)
{
    return node_ok(node) && pthread_mutex_trylock(&t->wire[node]) == 0;
}

void rt_wire_unlock(relay_table *t, int node)
{
    if (node_ok(node))
        pthread_mutex_unlock(&t->wire[node]);
}

void rt_wire_fd(relay_table *t, int node, int fd)
{
    if (node_ok(node) && __atomic_exchange_n(&t->fd[node], fd, __ATOMIC_SEQ_CST) != fd)
        __atomic_add_fetch(&t->pubs[node], 1, __ATOMIC_SEQ_CST);
}

/* How many times the socket of the link to `node` changed (published or withdrawn): a
 * sender that read it while its link was up writes only while it is the same. */
uint32_t rt_wire_pubs(relay_table *t, int node)
{
    return node_ok(node) ? __atomic_load_n(&t->pubs[node], __ATOMIC_SEQ_CST) : 0;
}

/* A writer queued a frame: the relay hands its own to the link until the link is quiet. */
void rt_wire_enqueued(relay_table *t, int node)
{
    if (node_ok(node)) {
        __atomic_add_fetch(&t->seq[node], 1, __ATOMIC_SEQ_CST);
        __atomic_store_n(&t->quiet[node], 0, __ATOMIC_SEQ_CST);
    }
}

uint64_t rt_wire_seq(relay_table *t, int node)
{
    return node_ok(node) ? __atomic_load_n(&t->seq[node], __ATOMIC_SEQ_CST) : 0;
}

/* (send lock held) After a write: the link is quiet when nothing of it waits and nothing was
 * queued since `seq` was read (before the queue was looked at). */
void rt_wire_settled(relay_table *t, int node, uint64_t seq, int empty)
{
    if (!node_ok(node))
        return;
    if (!empty || __atomic_load_n(&t->seq[node], __ATOMIC_SEQ_CST) != seq) {
        __atomic_store_n(&t->quiet[node], 0, __ATOMIC_SEQ_CST);
        return;
    }
    /* a writer may queue between the check and the store: look again after it (the relay
     * reads quiet only under the send lock, which the caller holds, so it never sees the 1
     * that is taken back) */
    RT_HOOK(RT_AT_SETTLED, node);
    __atomic_store_n(&t->quiet[node], 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&t->seq[node], __ATOMIC_SEQ_CST) != seq)
        __atomic_store_n(&t->quiet[node], 0, __ATOMIC_SEQ_CST);
}

/* When the relay last wrote bytes of its own to the link's socket (0: never): the link's
 * keep-alive counts them as the link's writes. */
double rt_wire_last_tx(relay_table *t, int node)
{
    double when = 0;
    if (node_ok(node))
        __atomic_load(&t->last_tx[node], &when, __ATOMIC_RELAXED);
    return when;
}

static double monotonic_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

int rt_set_cmd(relay_table *t, int cmd, int cls)
{
    int s = cmd_slot(t, cmd);
    if (s < 0)
        return -1;
    t->cls[s] = (uint8_t)cls;
    return 0;
}

int rt_set_code(relay_table *t, int code)
{
    if (t->ncodes >= RT_MAX_CODES)
        return -1;
    t->codes[t->ncodes++] = code;
    return 0;
}

void rt_set_dc(relay_table *t, int dcid, int known, int lo, int hi)
{
    if (dcid < 0 || dcid >= RT_MAX_DCS)
        return;
    pthread_mutex_lock(&t->lock);
    t->dc_known[dcid] = known;
    t->dc_lo[dcid] = lo;
    t->dc_hi[dcid] = hi;
    pthread_mutex_unlock(&t->lock);
}

void rt_set_raw_ok(relay_table *t, int node, int ok)
{
    if (node >= 0 && node < RT_MAX_NODES)
        t->raw_ok[node] = (uint8_t)(ok != 0);
}

/* Whether frames from `node` may be a server's traffic in a session this DSP balances, which
 * the router rewrites (the deliverer leaves them to it). */
void rt_set_reverse(relay_table *t, int node, int on)
{
    if (node_ok(node))
        __atomic_store_n(&t->reverse[node], on != 0, __ATOMIC_SEQ_CST);
}

/* The put2lcl thread holds `delta` frames more (queued, being put or parked): while it holds
 * any, the deliverers leave the LB node's traffic to it, so that none overtakes another.
 * Returns how many it holds now. */
int rt_lb_backlog(relay_table *t, int delta)
{
    return __atomic_add_fetch(&t->lb_backlog, delta, __ATOMIC_SEQ_CST);
}

int rt_give(relay_table *t, int clt_node, int svr_node, int dcid, int clt_ep, int lbsvr_ep,
            int clt_pid, int svr_pid, int pending)
{
    if (clt_node < 0 || clt_node >= RT_MAX_NODES || svr_node < 0 || svr_node >= RT_MAX_NODES ||
        !t->raw_ok[clt_node] || !t->raw_ok[svr_node])
        return -1;
    pthread_mutex_lock(&t->lock);
    int sid = -1;
    for (int i = 0; i < RT_SESS_CAP; i++)
        if (!t->sess[i].used) {
            sid = i;
            break;
        }
    if (sid >= 0) {
        fsess *s = &t->sess[sid];
        memset(s, 0, sizeof *s);
        s->used = 1;
        s->clt_node = clt_node;
        s->svr_node = svr_node;
        s->dcid = dcid;
        s->clt_ep = clt_ep;
        s->lbsvr_ep = lbsvr_ep;
        s->clt_pid = clt_pid;
        s->svr_pid = svr_pid;
        s->pending = pending;
    }
    pthread_mutex_unlock(&t->lock);
    return sid;
}

/* Route `client_side` (an endpoint the client addresses) to `server_side`, and back. */
int rt_map(relay_table *t, int sid, int client_side, int server_side)
{
    if (sid < 0 || sid >= RT_SESS_CAP)
        return -1;
    pthread_mutex_lock(&t->lock);
    fsess *s = &t->sess[sid];
    int rc = -1;
    if (s->used)
        rc = flow_put(t, 0, s->clt_node, s->dcid, s->clt_ep, client_side, sid, server_side) ||
             flow_put(t, 1, s->svr_node, s->dcid, server_side, s->lbsvr_ep, sid, client_side);
    pthread_mutex_unlock(&t->lock);
    return rc ? -1 : 0;
}

/* A session's state since the last call: out = {pending, uses, cmds, bytes} (the three
 * counters are zeroed).  drop: remove the session and its flows (the Python path owns it). */
int rt_take(relay_table *t, int sid, int drop, int64_t *out)
{
    if (sid < 0 || sid >= RT_SESS_CAP)
        return -1;
    pthread_mutex_lock(&t->lock);
    fsess *s = &t->sess[sid];
    int rc = -1;
    if (s->used) {
        out[0] = s->pending;
        out[1] = (int64_t)s->uses;
        out[2] = (int64_t)s->cmds;
        out[3] = (int64_t)s->bytes;
        s->uses = s->cmds = s->bytes = 0;
        if (drop) {
            for (int i = 0; i < RT_FLOW_CAP; i++)
                if (t->flows[i].used == 1 && t->flows[i].sid == sid) {
                    t->flows[i].used = 2;
                    t->nflows--;
                    t->ndeleted++;
                }
            s->used = 0;
        }
        rc = 0;
    }
    pthread_mutex_unlock(&t->lock);
    return rc;
}

static inline void tally_add(relay_tally *y, const relay_table *t, int slot, int dcid,
                             int64_t len, int64_t sign)
{
    uint8_t c = t->cls[slot];
    y->frames += sign;
    y->bytes += sign * (RT_HEADER + len);
    y->by_cmd[slot] += sign;
    y->dc_cmds[dcid] += sign;
    y->cmd_mask |= (uint64_t)1 << slot;
    y->dc_mask |= (uint64_t)1 << dcid;
    if (c & K_MESSAGE)
        y->dc_msgs[dcid] += sign;
    if (c & K_DATA)
        y->dc_data[dcid] += sign * len;
}

/* Whether a tally holds a figure other than 0: a take-back can bring the frames and bytes
 * to 0 and leave per-command or per-DC figures (one command taken back, another counted). */
static int tally_any(const relay_tally *y)
{
    if (y->frames || y->bytes)
        return 1;
    for (int s = 0; s < RT_CMD_SLOTS; s++)
        if ((y->cmd_mask >> s & 1) && y->by_cmd[s])
            return 1;
    for (int d = 0; d < RT_MAX_DCS; d++)
        if ((y->dc_mask >> d & 1) && (y->dc_cmds[d] || y->dc_msgs[d] || y->dc_data[d]))
            return 1;
    return 0;
}

/* The link counters of node `node` (dir 0: received from it, 1: sent to it) since the last
 * call, which zeroes them: 1 and *out filled, or 0 when every figure is 0.  The caller adds
 * them to counters that only it may change at that moment (the receiver's own thread for
 * dir 0, the link's send lock held for dir 1): the Python counters have no lock. */
int rt_fold(relay_table *t, int node, int dir, relay_tally *out)
{
    int any = 0;
    if (node < 0 || node >= RT_MAX_NODES || dir < 0 || dir > 1)
        return 0;
    pthread_mutex_lock(&t->lock);
    relay_tally *y = &t->tally[dir][node];
    if (y->cmd_mask | y->dc_mask) {
        any = tally_any(y);
        if (any)
            *out = *y;
        memset(y, 0, sizeof *y);
    }
    pthread_mutex_unlock(&t->lock);
    return any;
}

/* Frames relayed to `node` that its link refused: they were not sent after all. */
void rt_untally(relay_table *t, int node, const unsigned char *buf, int len)
{
    if (node < 0 || node >= RT_MAX_NODES)
        return;
    pthread_mutex_lock(&t->lock);
    for (int off = 0; off + RT_HEADER <= len;) {
        const unsigned char *h = buf + off;
        int32_t clen = rd(h, O_LEN), dcid = rd(h, O_DCID);
        int slot = cmd_slot(t, rd(h, O_CMD));
        if (clen < 0 || clen > t->maxcopybuf)
            break;          /* not a span the walk produced: nothing more to take back */
        if (slot >= 0 && dcid >= 0 && dcid < t->nr_dcs)
            tally_add(&t->tally[1][node], t, slot, dcid, clen, -1);
        off += RT_HEADER + clen;
    }
    pthread_mutex_unlock(&t->lock);
}

/* Rewrite endpoint `old` as `new` where a header of command class `c` names it: c_dst
 * (dst_side) or c_src and the message's m_source, and the vcopy endpoints. */
/* Each endpoint a copy command names (v_src, v_dst, v_rqtr) is `a` or `b`. */
static inline int vcopy_between(const unsigned char *h, int32_t a, int32_t b)
{
    for (int k = 0; k < 3; k++) {
        int32_t v = rd(h, O_V + 4 * k);
        if (v != a && v != b)
            return 0;
    }
    return 1;
}

static inline void swap_ep(unsigned char *h, uint8_t c, int32_t old, int32_t new, int dst_side)
{
    if (old == new)
        return;
    if (dst_side) {
        if (rd(h, O_DST) == old)
            wr(h, O_DST, new);
    } else {
        if (rd(h, O_SRC) == old)
            wr(h, O_SRC, new);
        if ((c & K_MSG) && rd(h, O_M_SOURCE) == old)
            wr(h, O_M_SOURCE, new);
    }
    if (c & K_VCOPY)
        for (int k = 0; k < 3; k++)
            if (rd(h, O_V + 4 * k) == old)
                wr(h, O_V + 4 * k, new);
}

/* Relay the whole frames of buf[start:end] that arrived on the link to `peer`, rewriting each
 * in place, until one needs the Python path (or the buffer ends).  Each run of consecutive
 * frames for one node becomes a segment.  Returns the offset of the first frame not relayed;
 * *python is 1 when that frame is whole (the Python path takes it), 0 when more must be read
 * (a bad c_len counts as whole: the Python check refuses it). */
int rt_relay(relay_table *t, int peer, unsigned char *buf, int start, int end, relay_seg *segs,
             int maxsegs, int *nsegs, int *python)
{
    int off = start, n = 0;
    *nsegs = 0;
    *python = 0;
    if (peer < 0 || peer >= t->nr_nodes) {
        *python = end - start >= RT_HEADER;
        return start;
    }
    pthread_mutex_lock(&t->lock);
    off = relay_walk(t, peer, buf, start, end, segs, maxsegs, &n, python);
    pthread_mutex_unlock(&t->lock);
    *nsegs = n;
    return off;
}

/* Write the relayed segments whose links are quiet, in order, while each is taken whole.
 * Stops at the first one the relay may not write or the socket does not take whole: that one
 * and the rest stay for the caller (moved to the front of segs).  A segment written in part
 * keeps its link's send lock for the caller (*held = its node, *sent = bytes written to
 * descriptor *held_fd), who keeps the rest as the link's unsent bytes and releases it.  A
 * writer that queued a frame while the relay held a link's lock left it to the relay: *flush
 * is then that node, whose queue the caller writes.  A write that took bytes stamps the
 * node's last_tx with `now` (the time of the read that brought the frames, microseconds
 * before).  Returns the segments left. */
static int write_segments(relay_table *t, const unsigned char *buf, relay_seg *segs, int n,
                          int *held, int *held_fd, int *sent, int *flush, double now)
{
    int k;
    for (k = 0; k < n; k++) {
        int node = segs[k].node;
        if (__atomic_load_n(&t->fd[node], __ATOMIC_SEQ_CST) < 0 ||
            !__atomic_load_n(&t->quiet[node], __ATOMIC_SEQ_CST) ||
            (RT_HOOK(RT_AT_LOCKING, node), pthread_mutex_trylock(&t->wire[node])) != 0)
            break;
        int fd = __atomic_load_n(&t->fd[node], __ATOMIC_SEQ_CST);
        if (fd < 0 || !__atomic_load_n(&t->quiet[node], __ATOMIC_SEQ_CST)) {
            pthread_mutex_unlock(&t->wire[node]);
            break;
        }
        ssize_t w;
        do
            w = send(fd, buf + segs[k].off, (size_t)segs[k].len, MSG_DONTWAIT | MSG_NOSIGNAL);
        while (w < 0 && errno == EINTR);
        if (w > 0)
            __atomic_store(&t->last_tx[node], &now, __ATOMIC_RELAXED);
        if (w == segs[k].len) {
            RT_HOOK(RT_AT_WRITE_DONE, node);
            pthread_mutex_unlock(&t->wire[node]);
            if (!__atomic_load_n(&t->quiet[node], __ATOMIC_SEQ_CST)) {
                *flush = node;
                k++;
                break;
            }
            continue;
        }
        if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
            pthread_mutex_unlock(&t->wire[node]);   /* the link's own write reports it */
            break;
        }
        __atomic_store_n(&t->quiet[node], 0, __ATOMIC_SEQ_CST);
        *held = node;
        *held_fd = fd;
        *sent = w < 0 ? 0 : (int)w;
        break;
    }
    if (k > 0)
        memmove(segs, segs + k, sizeof(relay_seg) * (size_t)(n - k));
    return n - k;
}

/* A link's connection carries frames one way only, so Linux answers each small frame it
 * receives with an ACK of its own, sent inside the recv that reads it (a connection that
 * answers with data carries the ACK on its reply).  TCP_QUICKACK 0 puts the socket in
 * Linux's interactive mode, in which the ACK waits (every second frame, or the delayed-ACK
 * timer, still sends one); Linux leaves that mode when that timer fires, at least 40 ms
 * after the last ACK, so a read that follows a silence of RT_ACK_GAP seconds sets it again.
 * An error (a socket that is not TCP) changes nothing: the ACKs stay immediate. */
#define RT_ACK_GAP 1e-3

static void delay_acks(int fd)
{
    static const int off = 0;
    (void)setsockopt(fd, IPPROTO_TCP, TCP_QUICKACK, &off, sizeof off);
}

/* One read of a link's socket into buf[*end:cap], after moving the unread frames
 * buf[*start:*end] to the front when the room after them could not hold a whole frame (see
 * rt_pump).  Returns the bytes read, 0 when the peer closed the connection, or -errno. */
static int link_read(relay_table *t, int fd, unsigned char *buf, int cap, int *start, int *end,
                     double *last_rx)
{
    int s = *start, e = *end;
    if (s == e) {
        s = e = 0;
    } else if (cap - e < RT_HEADER + t->maxcopybuf) {
        memmove(buf, buf + s, (size_t)(e - s));
        e -= s;
        s = 0;
    }
    *start = s;
    *end = e;
    ssize_t got;
    do
        got = recv(fd, buf + e, (size_t)(cap - e), 0);
    while (got < 0 && errno == EINTR);
    if (got <= 0)
        return got < 0 ? -errno : 0;
    double now = monotonic_now();
    if (now - *last_rx > RT_ACK_GAP)
        delay_acks(fd);
    *last_rx = now;
    *end = e + (int)got;
    return (int)got;
}

/* The receiver's loop in C: read the link to `peer` into buf (blocking, as the socket's
 * timeout allows), relay what came and write it (write_segments), and read again, until a
 * frame needs the Python path, a segment or a queue is left for the caller, a read fails, or
 * `budget` seconds have passed by the end of a read (a read itself may wait up to the
 * socket's timeout).  The unread frames buf[*start:*end] are moved to the front first when the
 * room after them could not hold a whole frame (no queued frame refers to the buffer then:
 * the caller settled its links, and the relay's own writes were whole).  *last_rx is the time
 * of the link's last read (CLOCK_MONOTONIC): the caller passes the one before the call (0:
 * unknown), which decides whether the first read delays the socket's ACKs again
 * (delay_acks).  Returns the bytes of the last read, 0 when the peer
 * closed the connection, or -errno. */
int rt_pump(relay_table *t, int peer, int fd, unsigned char *buf, int cap, int *start, int *end,
            relay_seg *segs, int maxsegs, int *nsegs, int *python, int *held, int *held_fd,
            int *sent, int *flush, double *last_rx, double budget)
{
    double until = budget > 0 ? monotonic_now() + budget : 0;
    *held = *held_fd = *flush = -1;
    *sent = 0;
    for (;;) {
        *nsegs = 0;
        *python = 0;
        int got = link_read(t, fd, buf, cap, start, end, last_rx);
        if (got <= 0)
            return got;
        *start = rt_relay(t, peer, buf, *start, *end, segs, maxsegs, nsegs, python);
        if (*nsegs)
            *nsegs = write_segments(t, buf, segs, *nsegs, held, held_fd, sent, flush, *last_rx);
        if (*nsegs || *python || *flush >= 0 || *last_rx >= until)
            return (int)got;
    }
}

/* (lock held) The flow of the whole frame at h that came from `peer` (a link's peer, or the
 * local node for a command of a local client), after the checks of a received header and the
 * session's: NULL when anything is doubtful (the Python path decides).  *dir: 0 a client's
 * command, 1 a server's traffic for a client; *out: the node the frame goes to. */
static flow *frame_flow(relay_table *t, int peer, const unsigned char *h, int *dir, int *out)
{
    int32_t cmd = rd(h, O_CMD), dcid = rd(h, O_DCID), src = rd(h, O_SRC),
            dst = rd(h, O_DST), snode = rd(h, O_SNODE), dnode = rd(h, O_DNODE),
            rcode = rd(h, O_RCODE), len = rd(h, O_LEN), pid = rd(h, O_PID),
            batch_nr = rd(h, O_BATCH_NR);
    uint32_t flags = (uint32_t)rd(h, O_FLAGS);
    int slot = cmd_slot(t, cmd);
    if (slot < 0 || cmd == 0 || len < 0 || len > t->maxcopybuf)
        return NULL;
    uint8_t c = t->cls[slot];
    if (!(c & K_VALID) || batch_nr || (flags & (uint32_t)(t->flag_batch | t->flag_lz4)) ||
        (len && !(c & K_DATA)))
        return NULL;
    if (snode != peer || dnode < 0 || dnode >= t->nr_nodes || dcid < 0 ||
        dcid >= t->nr_dcs || !t->dc_known[dcid] ||
        !endpoint_ok(t, src, t->dc_lo[dcid], t->dc_hi[dcid]) ||
        !endpoint_ok(t, dst, t->dc_lo[dcid], t->dc_hi[dcid]))
        return NULL;
    if (dnode == t->lb_id && t->lb_id != t->local)
        *dir = 0;
    else if (dnode == t->local)
        *dir = 1;
    else
        return NULL;
    flow *f = flow_find(t, *dir, peer, dcid, src, dst);
    if (f == NULL)
        return NULL;
    fsess *s = &t->sess[f->sid];
    if (*dir == 0) {
        if ((c & K_REQUEST) && pid > 0 && s->clt_pid > 0 && pid != s->clt_pid)
            return NULL;
        /* a client's copy naming any endpoint but its own and the one it addresses: the
         * router decides whether the session reaches it (Session.may_send) */
        if ((c & K_VCOPY) && !vcopy_between(h, src, dst))
            return NULL;
        *out = s->svr_node;
    } else {
        if ((cmd >> t->ack_bit) & 1)
            for (int k = 0; k < t->ncodes; k++)
                if (rcode == t->codes[k])
                    return NULL;
        if ((c & K_MSG) && pid > 0 && pid != s->svr_pid)
            return NULL;
        *out = s->clt_node;
    }
    return t->raw_ok[*out] ? f : NULL;
}

/* (lock held) The rewrite of a frame of flow f in direction dir, and the session's
 * bookkeeping, as the router does them.  A local client's session has its own endpoint as
 * lbsvr_ep and the local node as clt_node: its source stays as it is. */
static void flow_rewrite(relay_table *t, const flow *f, int dir, unsigned char *h)
{
    fsess *s = &t->sess[f->sid];
    int32_t cmd = rd(h, O_CMD), len = rd(h, O_LEN);
    uint32_t flags = (uint32_t)rd(h, O_FLAGS);
    uint8_t c = t->cls[cmd_slot(t, cmd)];
    if (dir == 0) {
        int32_t src = rd(h, O_SRC), dst = rd(h, O_DST);
        wr(h, O_SNODE, t->local);
        wr(h, O_DNODE, s->svr_node);
        wr(h, O_FLAGS, (int32_t)(flags | (uint32_t)t->flag_check));
        swap_ep(h, c, dst, f->new_ep, 1);
        swap_ep(h, c, src, s->lbsvr_ep, 0);
        if (cmd == t->cmd_sndrec || cmd == t->cmd_send)
            s->pending = cmd;
        s->cmds++;
        s->bytes += RT_HEADER + len;
    } else {
        wr(h, O_SNODE, t->lb_id);
        wr(h, O_DNODE, s->clt_node);
        wr(h, O_FLAGS, (int32_t)(flags & ~(uint32_t)t->flag_check));
        swap_ep(h, c, rd(h, O_SRC), f->new_ep, 0);
        swap_ep(h, c, s->lbsvr_ep, s->clt_ep, 1);
        if ((cmd == t->cmd_send || cmd == t->cmd_reply) && s->pending == t->cmd_sndrec)
            s->pending = 0;
        else if (c & K_MSG_ACK)
            s->pending = 0;
    }
    s->uses++;
}

/* (lock held) The walk of rt_relay; *nsegs is the number of segments filled.  A server's
 * traffic for a client of this node is the deliverer's (rt_deliver), not the relay's. */
static int relay_walk(relay_table *t, int peer, unsigned char *buf, int start, int end,
                      relay_seg *segs, int maxsegs, int *nsegs, int *python)
{
    int off = start, n = 0;
    while (end - off >= RT_HEADER) {
        *python = 1;
        unsigned char *h = buf + off;
        int32_t len = rd(h, O_LEN);
        if (len < 0 || len > t->maxcopybuf)
            break;
        if (end - off < RT_HEADER + len) {
            *python = 0;
            break;
        }
        int dir, out;
        flow *f = frame_flow(t, peer, h, &dir, &out);
        if (f == NULL || out == t->local)
            break;
        if (n > 0 && segs[n - 1].node == out && segs[n - 1].off + segs[n - 1].len == off) {
            segs[n - 1].len += RT_HEADER + len;
            segs[n - 1].nframes++;
        } else if (n < maxsegs) {
            segs[n].node = out;
            segs[n].off = off;
            segs[n].len = RT_HEADER + len;
            segs[n].nframes = 1;
            n++;
        } else {
            break;
        }
        flow_rewrite(t, f, dir, h);
        int slot = cmd_slot(t, rd(h, O_CMD)), dcid = rd(h, O_DCID);
        tally_add(&t->tally[0][peer], t, slot, dcid, len, 1);
        tally_add(&t->tally[1][out], t, slot, dcid, len, 1);
        off += RT_HEADER + len;
        *python = 0;
    }
    *nsegs = n;
    return off;
}

/* ------------------------------------------------------------------------------------------
 * The node DSPs' compiled sender and deliverer (docs/design.md, "The compiled sender and
 * deliverer"): on the emulated DVK, SPROXY's get2rmt calls and the writes of what they
 * fetch, and RPROXY's reads and the put2lcl calls of the frames for its node, each on the
 * thread's own connection to the node kernel.  Python keeps every rule: the requests and the
 * layouts of plain successful replies come from the protocol module, and anything else (a
 * reply of another kind, a frame or command the loop is not sure of, a link with frames of
 * its own waiting, a socket that changed) goes back to the Python path with what was read.
 */

/* A thread's connection to its node kernel, as the loops use it. */
typedef struct {
    int32_t kfd, answer_ms;              /* the connection; answer limit in ms, -1 none */
    unsigned char *req;                  /* the request frame */
    int32_t req_len;
    unsigned char *reply;                /* u32 length, then the last reply's body */
    int32_t reply_cap, reply_len;        /* the body's room and length */
    int32_t ok_len;                      /* a plain success: its body's length ... */
    int32_t nfixed;                      /* ... and its bytes that never change */
    int32_t fixed_off[24];
    uint8_t fixed_val[24];
} rt_channel;

/* Wait until `fd` is ready for `events` within the answer limit: 0, or -errno. */
static int wait_fd(int fd, short events, int ms)
{
    struct pollfd p = { .fd = fd, .events = events };
    int r;
    do
        r = poll(&p, 1, ms);
    while (r < 0 && errno == EINTR);
    if (r < 0)
        return -errno;
    return r == 0 ? -ETIMEDOUT : 0;
}

static int send_all(int fd, const unsigned char *p, int n, int ms)
{
    while (n > 0) {
        ssize_t w = send(fd, p, (size_t)n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                return -errno;
            int r = wait_fd(fd, POLLOUT, ms);
            if (r < 0)
                return r;
            continue;
        }
        p += w;
        n -= (int)w;
    }
    return 0;
}

/* Read between 1 and `cap` bytes: the count, or -errno (-ECONNRESET when the kernel closed
 * the connection).  It waits in poll, never in a blocking recv: Linux wakes a task blocked in
 * recv on a Unix stream socket each time the peer reads what the task sent (the write-space
 * wake-up), so every call would cost a wake-up for nothing; poll's wait answers only the
 * readiness it asked for. */
static int recv_some(int fd, unsigned char *p, int cap, int ms)
{
    for (;;) {
        int r = wait_fd(fd, POLLIN, ms);
        if (r < 0)
            return r;
        ssize_t got = recv(fd, p, (size_t)cap, MSG_DONTWAIT);
        if (got > 0)
            return (int)got;
        if (got == 0)
            return -ECONNRESET;
        if (errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK)
            return -errno;
    }
}

/* Read `n` bytes (as recv_some). */
static int recv_all(int fd, unsigned char *p, int n, int ms)
{
    while (n > 0) {
        int got = recv_some(fd, p, n, ms);
        if (got < 0)
            return got;
        p += got;
        n -= got;
    }
    return 0;
}

/* Whether the channel's fields can be used: the room for a plain success, its fixed bytes. */
static int channel_sane(const rt_channel *c)
{
    if (c->nfixed < 0 || c->nfixed > 24 || c->ok_len < 0 || c->reply_cap < c->ok_len ||
        c->req_len < 0)
        return 0;
    for (int i = 0; i < c->nfixed; i++)
        if (c->fixed_off[i] < 0 || c->fixed_off[i] >= c->ok_len)
            return 0;
    return 1;
}

/* One call: the request, then its reply's body at c->reply + 4.  1 when the reply is a plain
 * success, 0 when it is another, -errno when the connection failed (-ETIMEDOUT: no answer
 * within the limit, -EPROTO: a reply longer than the room for it, or bytes after it). */
static int channel_call(rt_channel *c)
{
    int r = send_all(c->kfd, c->req, c->req_len, c->answer_ms);
    if (r < 0)
        return r;
    int got = recv_some(c->kfd, c->reply, c->reply_cap + 4, c->answer_ms);  /* usually all */
    if (got < 0)
        return got;
    if (got < 4) {
        r = recv_all(c->kfd, c->reply + got, 4 - got, c->answer_ms);
        if (r < 0)
            return r;
        got = 4;
    }
    uint32_t n;
    memcpy(&n, c->reply, 4);
    if (n > (uint32_t)c->reply_cap || (uint32_t)got > n + 4)
        return -EPROTO;
    c->reply_len = (int32_t)n;
    r = recv_all(c->kfd, c->reply + got, (int)(n + 4) - got, c->answer_ms);
    if (r < 0)
        return r;
    if (c->reply_len != c->ok_len)
        return 0;
    for (int i = 0; i < c->nfixed; i++)
        if (c->reply[4 + c->fixed_off[i]] != c->fixed_val[i])
            return 0;
    return 1;
}

/* ---- the sender */
typedef struct {
    rt_channel ch;                       /* req: the GET2RMT request */
    int32_t node;                        /* the link's peer */
    const unsigned char *payload;        /* the buffer the kernel fills */
    int32_t payload_cap;
    int32_t hdr_off;                     /* the command's header in a plain success */
    uint32_t pubs;                       /* the socket publication this serving writes to */
    int32_t held_fd, sent;               /* RS_HELD: the socket and the bytes it took */
} rt_sender;

enum { RS_DUE = 0, RS_REPLY = 1, RS_HELD = 2 };

/* Whether the command of the last (plain successful) reply is one this loop may write. */
static int plain_command(const relay_table *t, const rt_sender *s)
{
    const unsigned char *h = s->ch.reply + 4 + s->hdr_off;
    int32_t len = rd(h, O_LEN), dcid = rd(h, O_DCID);
    return cmd_slot(t, rd(h, O_CMD)) >= 0 && len >= 0 && len <= s->payload_cap &&
           dcid >= 0 && dcid < t->nr_dcs && !(rd(h, O_FLAGS) & (t->flag_batch | t->flag_lz4));
}

/* Write the command of the last reply to the link while it is quiet and its socket is the one
 * this serving started with.  1: written whole (counted as sent), 0: not written (the caller
 * queues it), RS_HELD: written in part (counted as sent: the link writes the rest), the send
 * lock held for the caller. */
static int write_command(relay_table *t, rt_sender *s)
{
    int node = s->node;
    const unsigned char *h = s->ch.reply + 4 + s->hdr_off;
    if (!t->raw_ok[node] || __atomic_load_n(&t->fd[node], __ATOMIC_SEQ_CST) < 0 ||
        !__atomic_load_n(&t->quiet[node], __ATOMIC_SEQ_CST) ||
        pthread_mutex_trylock(&t->wire[node]) != 0)
        return 0;
    int fd = __atomic_load_n(&t->fd[node], __ATOMIC_SEQ_CST);
    if (fd < 0 || !__atomic_load_n(&t->quiet[node], __ATOMIC_SEQ_CST) ||
        __atomic_load_n(&t->pubs[node], __ATOMIC_SEQ_CST) != s->pubs) {
        pthread_mutex_unlock(&t->wire[node]);
        return 0;
    }
    int32_t len = rd(h, O_LEN);
    struct iovec iov[2] = { { (void *)h, RT_HEADER }, { (void *)s->payload, (size_t)len } };
    struct msghdr m = { .msg_iov = iov, .msg_iovlen = len ? 2 : 1 };
    ssize_t w;
    do
        w = sendmsg(fd, &m, MSG_DONTWAIT | MSG_NOSIGNAL);
    while (w < 0 && errno == EINTR);
    if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
        pthread_mutex_unlock(&t->wire[node]);   /* the link's own write reports it */
        return 0;
    }
    double now = monotonic_now();
    if (w > 0)
        __atomic_store(&t->last_tx[node], &now, __ATOMIC_RELAXED);
    pthread_mutex_lock(&t->lock);
    tally_add(&t->tally[1][node], t, cmd_slot(t, rd(h, O_CMD)), rd(h, O_DCID), len, 1);
    pthread_mutex_unlock(&t->lock);
    if (w == RT_HEADER + len) {
        pthread_mutex_unlock(&t->wire[node]);
        return 1;
    }
    __atomic_store_n(&t->quiet[node], 0, __ATOMIC_SEQ_CST);
    s->held_fd = fd;
    s->sent = w < 0 ? 0 : (int)w;
    return RS_HELD;
}

/* get2rmt, `write` what it fetched, again, until `until` came before a call (RS_DUE), a reply
 * is for the caller (RS_REPLY: one that is not a plain command, for the protocol module to
 * decode, or a command `write` left as it was: 0), or `write` kept the send lock of a command
 * written in part (RS_HELD).  -errno when the kernel connection failed (see channel_call),
 * -EINVAL when the sender's fields cannot be used. */
static int send_loop(relay_table *t, rt_sender *s, double until,
                     int (*write)(relay_table *, rt_sender *))
{
    if (!channel_sane(&s->ch) || s->hdr_off < 0 || s->hdr_off + RT_HEADER > s->ch.ok_len)
        return -EINVAL;
    s->held_fd = -1;
    s->sent = 0;
    for (;;) {
        if (until > 0 && monotonic_now() >= until)
            return RS_DUE;
        int r = channel_call(&s->ch);
        if (r < 0)
            return r;
        if (r == 0 || !plain_command(t, s))
            return RS_REPLY;
        r = write(t, s);
        if (r != 1)
            return r == 0 ? RS_REPLY : r;
    }
}

/* The sender's loop (send_loop, write_command): a command this loop did not write is queued
 * on the link by the caller; RS_HELD: the send lock is held, the rest is for the link. */
int rt_send_pump(relay_table *t, rt_sender *s, double until)
{
    return node_ok(s->node) ? send_loop(t, s, until, write_command) : -EINVAL;
}

/* A command fetched on the LB pair: when it belongs to a local client's session handed over
 * (frame_flow from the local node) and that server's link is quiet, rewritten for the server
 * and written to its link.  1: written whole, 0: not rewritten (the router takes it as it
 * came), RS_HELD: written in part or not at all after the rewrite (s->node is its server, the
 * send lock held, s->sent bytes taken; the link keeps the rest). */
static int lb_write_command(relay_table *t, rt_sender *s)
{
    unsigned char *h = s->ch.reply + 4 + s->hdr_off;
    int32_t len = rd(h, O_LEN);
    int dir, out = -1;
    pthread_mutex_lock(&t->lock);
    flow *f = frame_flow(t, t->local, h, &dir, &out);
    int fd = -1;
    if (f != NULL && dir == 0 && out != t->local &&
        __atomic_load_n(&t->quiet[out], __ATOMIC_SEQ_CST) &&
        pthread_mutex_trylock(&t->wire[out]) == 0) {
        fd = __atomic_load_n(&t->fd[out], __ATOMIC_SEQ_CST);
        if (fd < 0 || !__atomic_load_n(&t->quiet[out], __ATOMIC_SEQ_CST)) {
            pthread_mutex_unlock(&t->wire[out]);
            fd = -1;
        }
    }
    if (fd < 0) {
        pthread_mutex_unlock(&t->lock);
        return 0;
    }
    flow_rewrite(t, f, dir, h);
    tally_add(&t->tally[1][out], t, cmd_slot(t, rd(h, O_CMD)), rd(h, O_DCID), len, 1);
    pthread_mutex_unlock(&t->lock);
    struct iovec iov[2] = { { h, RT_HEADER }, { (void *)s->payload, (size_t)len } };
    struct msghdr m = { .msg_iov = iov, .msg_iovlen = len ? 2 : 1 };
    ssize_t w;
    do
        w = sendmsg(fd, &m, MSG_DONTWAIT | MSG_NOSIGNAL);
    while (w < 0 && errno == EINTR);
    if (w > 0) {
        double now = monotonic_now();
        __atomic_store(&t->last_tx[out], &now, __ATOMIC_RELAXED);
    }
    if (w == RT_HEADER + len) {
        pthread_mutex_unlock(&t->wire[out]);
        return 1;
    }
    /* the rest (all of it after an error, which the link's own write then meets) */
    __atomic_store_n(&t->quiet[out], 0, __ATOMIC_SEQ_CST);
    s->node = out;
    s->held_fd = fd;
    s->sent = w < 0 ? 0 : (int)w;
    return RS_HELD;
}

/* The LB pair's sender loop (send_loop, lb_write_command): a command it did not rewrite comes
 * back as RS_REPLY for the router; RS_HELD as lb_write_command says. */
int rt_lb_send_pump(relay_table *t, rt_sender *s, double until)
{
    return send_loop(t, s, until, lb_write_command);
}

/* ---- the deliverer */
typedef struct {
    rt_channel ch;                       /* req: a PUT2LCL request, the header at req_hdr_off */
    int32_t peer;                        /* the link's peer */
    int32_t req_hdr_off;
    unsigned char *payload;              /* the buffer put2lcl reads the payload from */
    int32_t payload_cap;
    int32_t value_off;                   /* put2lcl's result in a plain success */
    int32_t python_flags;                /* header flags whose frames take the Python path */
    int32_t deliver;                     /* 0: only read (the Python path delivers meanwhile) */
    int32_t lb;                          /* 1: may put the LB node's traffic (see rt_deliver) */
    int32_t done_off;                    /* RD_REPLY, RD_KERNEL: where that frame starts */
    int32_t done_lb;                     /* ... and whether it is the LB node's (rewritten:
                                          * counted in lb_backlog until the Python side has
                                          * handed it to the put2lcl thread) */
    int32_t kerr;                        /* RD_KERNEL: errno of the kernel connection */
} rt_receiver;

enum { RD_BUDGET = 0, RD_PYTHON = 1, RD_REPLY = 2, RD_KERNEL = 3 };

/* Whether the whole frame at h is one the loop delivers: the checks of the Python receiver
 * (a valid command, its payload, no batch, its node, DC and endpoints) passed, for this node,
 * and no flag for the Python path.  2 when it comes from a node that serves sessions this DSP
 * balances: it may be a server's traffic for a local client, which is rewritten first. */
static int deliverable(const relay_table *t, const rt_receiver *r, const unsigned char *h)
{
    int32_t cmd = rd(h, O_CMD), dcid = rd(h, O_DCID), len = rd(h, O_LEN);
    int slot = cmd_slot(t, cmd);
    if (cmd == 0 || slot < 0 || !(t->cls[slot] & K_VALID) || len < 0 || len > t->maxcopybuf ||
        len > r->payload_cap ||
        (len && !(t->cls[slot] & K_DATA)) || rd(h, O_BATCH_NR) != 0 ||
        (rd(h, O_FLAGS) & r->python_flags))
        return 0;
    if (rd(h, O_SNODE) != r->peer || r->peer >= t->nr_nodes || rd(h, O_DNODE) != t->local ||
        t->local < 0 || t->local >= t->nr_nodes || dcid < 0 || dcid >= t->nr_dcs ||
        !t->dc_known[dcid])
        return 0;
    if (!endpoint_ok(t, rd(h, O_SRC), t->dc_lo[dcid], t->dc_hi[dcid]) ||
        !endpoint_ok(t, rd(h, O_DST), t->dc_lo[dcid], t->dc_hi[dcid]))
        return 0;
    return __atomic_load_n(&t->reverse[r->peer], __ATOMIC_SEQ_CST) ? 2 : 1;
}

/* A server's traffic for a local client (deliverable's 2): rewritten to come from the LB node
 * when its session is handed over and the put2lcl thread holds no frame of the LB node's
 * traffic (which this one would overtake).  0: the Python path routes it. */
static int lb_rewrite(relay_table *t, const rt_receiver *r, unsigned char *h)
{
    if (!r->lb || __atomic_load_n(&t->lb_backlog, __ATOMIC_SEQ_CST) != 0)
        return 0;
    int dir, out, ok = 0;
    pthread_mutex_lock(&t->lock);
    flow *f = frame_flow(t, r->peer, h, &dir, &out);
    if (f != NULL && dir == 1 && out == t->local) {
        flow_rewrite(t, f, dir, h);
        ok = 1;
    }
    pthread_mutex_unlock(&t->lock);
    return ok;
}

/* The put2lcl of the frame at h: 1 a plain success (a result of 0 or more), 0 another reply
 * (for the Python path), -errno when the kernel connection failed. */
static int put2lcl_call(rt_receiver *r, const unsigned char *h)
{
    int32_t len = rd(h, O_LEN);
    if (len)
        memcpy(r->payload, h + RT_HEADER, (size_t)len);
    memcpy(r->ch.req + r->req_hdr_off, h, RT_HEADER);
    int rc = channel_call(&r->ch);
    if (rc <= 0)
        return rc;
    int64_t value;
    memcpy(&value, r->ch.reply + 4 + r->value_off, sizeof value);
    return value >= 0;
}

/* Deliver the whole frames of buf[*start:end] until one is for the Python path (RD_PYTHON),
 * a reply is (RD_REPLY: *start is past its frame, which starts at r->done_off), the kernel
 * connection failed during a put2lcl (RD_KERNEL, errno in r->kerr: that frame's answer is the
 * failure's, as for the Python path's put2lcl; *start and r->done_off as for RD_REPLY) or the
 * frames run out (RD_BUDGET).  Each frame a put2lcl was made for counts as received from the
 * peer. */
int rt_deliver(relay_table *t, rt_receiver *r, unsigned char *buf, int *start, int end)
{
    int off = *start;
    if (!node_ok(r->peer) || !channel_sane(&r->ch) || r->req_hdr_off < 0 ||
        r->req_hdr_off + RT_HEADER > r->ch.req_len || r->value_off < 0 ||
        r->value_off + 8 > r->ch.ok_len)
        return RD_PYTHON;
    while (end - off >= RT_HEADER) {
        const unsigned char *h = buf + off;
        int32_t len = rd(h, O_LEN);
        if (len < 0 || len > t->maxcopybuf)
            return RD_PYTHON;     /* the Python check says what is wrong with it */
        if (end - off < RT_HEADER + len)
            return RD_BUDGET;
        int kind = r->deliver ? deliverable(t, r, buf + off) : 0;
        if (kind == 0 || (kind == 2 && !lb_rewrite(t, r, buf + off)))
            return RD_PYTHON;
        int rc = put2lcl_call(r, h);
        pthread_mutex_lock(&t->lock);
        tally_add(&t->tally[0][r->peer], t, cmd_slot(t, rd(h, O_CMD)), rd(h, O_DCID), len, 1);
        pthread_mutex_unlock(&t->lock);
        *start = off += RT_HEADER + len;
        if (rc <= 0) {
            r->done_off = off - RT_HEADER - len;
            r->done_lb = kind == 2;
            /* the frame is the put2lcl thread's from now on: counted at once, so that no
             * other receiver's frame of the LB node's traffic passes it while the Python
             * side hands it over (which releases this count once that thread holds it) */
            if (kind == 2)
                __atomic_add_fetch(&t->lb_backlog, 1, __ATOMIC_SEQ_CST);
            if (rc == 0)
                return RD_REPLY;
            /* never made again on another connection: the kernel may have carried out the
             * request before the connection broke (the frame would be delivered twice) */
            r->kerr = -rc;
            return RD_KERNEL;
        }
    }
    return RD_BUDGET;
}

/* The deliverer's loop: read the link to r->peer (blocking, as the socket's timeout allows)
 * and deliver what came (rt_deliver), until rt_deliver stops for the Python path, a read
 * fails, or `budget` seconds have passed by the end of a read.  Returns rt_deliver's answer
 * and, through *got, the bytes of the last read (0: the peer closed the connection; -errno:
 * the read failed, and then the answer is RD_BUDGET).  *last_rx as for rt_pump. */
int rt_deliver_pump(relay_table *t, rt_receiver *r, int fd, unsigned char *buf, int cap,
                    int *start, int *end, double *last_rx, double budget, int *got)
{
    double until = budget > 0 ? monotonic_now() + budget : 0;
    for (;;) {
        *got = link_read(t, fd, buf, cap, start, end, last_rx);
        if (*got <= 0)
            return RD_BUDGET;
        int why = rt_deliver(t, r, buf, start, *end);
        if (why != RD_BUDGET || *last_rx >= until)
            return why;
    }
}
