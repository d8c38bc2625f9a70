/*
 * Equivalence harness of the drop-in libllama: llama.h only, built unchanged against the
 * drop-in (`llama`) and against stock (`llama_stock`); tests/dropin/compare.cmake runs both on
 * one model and compares the outputs byte for byte.
 *
 *   equivalence <model.gguf> <out.txt> [--flash-attn 0|1] [--kv-unified 0|1]
 *               [--type-k f16|q8_0] [--type-v f16|q8_0] [--n-ctx N] [--threads N]
 *               [--kv-debug N]   (LLAMA_KV_CACHE_DEBUG: the slot search's debug lines)
 *               [--rpc 0|1]      (the model's layers and the whole memory on an RPC device:
 *                                 ggml's RPC server in a child process, CPU behind it, over
 *                                 loopback; needs a ggml built with GGML_RPC)
 *               [--gpu 0|1]      (every layer and the whole memory on the GPU devices ggml
 *                                 has, e.g. CUDA: scripts/gpu-check.sh)
 *
 * It decodes a multi-sequence workload: a shared prompt copied to every sequence with
 * llama_memory_seq_cp, parallel decoding (greedy), a finished sequence removed and a new
 * request in its place, a context shift (seq_rm + seq_add, then the K-shift at the next
 * decode; only where llama_memory_can_shift), seq_div, a rollback of a sequence's last tokens
 * (partial seq_rm), sequence state blobs (plain and _ext,
 * with and without PARTIAL_ONLY) saved and restored, truncated and with corrupt fields, sequence files, seq_keep, session files,
 * a whole-state restore, sequence ids in [n_seq_max, 256) on a unified cache, a batch that
 * does not fit (the failure path), and clears. Every return value, every sequence's position
 * range after each memory operation, every logit vector (the float bits) and every state blob
 * or file go into <out.txt>, as text (hex), so `diff` shows where two runs part, and so does
 * every log message (see record_log).
 *
 * With --rpc 1 the cache lives in a non-host buffer (an RPC buffer: the library must go through
 * ggml_backend_tensor_get/set/copy and device graphs for everything): the harness checks that
 * every KV and RS buffer the memory logs is an RPC one, and fails otherwise; with --gpu 1, that
 * none is a host one (CPU, or a GPU backend's pinned *_Host memory). The server's
 * endpoint (its port is free and differs between runs) reads "rpc-endpoint" in the log lines.
 *
 * Exit status: 0 when the workload ran (whatever the calls returned: those are compared), 1 on
 * a setup failure (arguments, model, context, allocation, the RPC server).
 */
#define _POSIX_C_SOURCE 200809L /* setenv, kill */
#include "llama.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

#define N_SEQ 4
#define MAX_BATCH 512

static FILE *out;
static struct llama_context *ctx;
static llama_memory_t mem;
static struct llama_model *model;
static int n_vocab;
static int verbose;
static const char *out_path;

/* The nodes of every graph the scheduler computed since the last decode record (each node is
 * asked about once; observing none, the scheduler computes as without a callback), so each
 * decode's graph size, a K-shift's included, is compared too. */
static long n_nodes;

static bool count_nodes(struct ggml_tensor *t, bool ask, void *user) {
    (void) t;
    (void) user;
    if (ask) {
        n_nodes++;
    }
    return false;
}

static void die(const char *what) {
    fprintf(stderr, "equivalence: %s\n", what);
    exit(1);
}

static void rec(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vfprintf(out, fmt, ap);
    va_end(ap);
    fputc('\n', out);
}

static uint64_t fnv1a(const uint8_t *p, size_t n) {
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 1099511628211ull;
    }
    return h;
}

/* A blob as hex, 64 bytes a line, after a header with its size and hash. */
static void rec_blob(const char *tag, const uint8_t *p, size_t n) {
    rec("blob %s size=%zu fnv=%016llx", tag, n, (unsigned long long) fnv1a(p, n));
    for (size_t i = 0; i < n; i += 64) {
        size_t m = n - i < 64 ? n - i : 64;
        for (size_t j = 0; j < m; j++) {
            fprintf(out, "%02x", p[i + j]);
        }
        fputc('\n', out);
    }
}

/* Every sequence's position range (and a few above the used ones). */
static void rec_seqs(const char *tag) {
    fprintf(out, "seqs %s:", tag);
    for (llama_seq_id s = 0; s < N_SEQ; s++) {
        fprintf(out, " %d:[%d,%d]", s, llama_memory_seq_pos_min(mem, s), llama_memory_seq_pos_max(mem, s));
    }
    fputc('\n', out);
}

static int argmax(const float *l) {
    int best = 0;
    for (int i = 1; i < n_vocab; i++) {
        if (l[i] > l[best]) {
            best = i;
        }
    }
    return best;
}

struct tok {
    llama_token t;
    llama_pos pos;
    llama_seq_id seq;
    int8_t output;
};

/* Decodes the tokens as one llama_batch; records the return value and the logits of every
 * output. next[seq] gets the greedy token of that sequence's last output. */
static int decode(const char *tag, const struct tok *toks, int n, llama_token next[N_SEQ]) {
    struct llama_batch b = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        b.token[i] = toks[i].t;
        b.pos[i] = toks[i].pos;
        b.n_seq_id[i] = 1;
        b.seq_id[i][0] = toks[i].seq;
        b.logits[i] = toks[i].output;
    }
    b.n_tokens = n;
    n_nodes = 0;
    int rc = llama_decode(ctx, b);
    rec("decode %s n=%d rc=%d graph nodes=%ld", tag, n, rc, n_nodes);
    if (rc == 0) {
        for (int i = 0; i < n; i++) {
            if (!toks[i].output) {
                continue;
            }
            const float *l = llama_get_logits_ith(ctx, i);
            if (!l) {
                rec("logits %d seq=%d pos=%d: none", i, toks[i].seq, toks[i].pos);
                continue;
            }
            fprintf(out, "logits %d seq=%d pos=%d argmax=%d:", i, toks[i].seq, toks[i].pos, argmax(l));
            for (int v = 0; v < n_vocab; v++) {
                uint32_t bits;
                memcpy(&bits, &l[v], sizeof bits);
                fprintf(out, " %08x", bits);
            }
            fputc('\n', out);
            if (next) {
                next[toks[i].seq] = argmax(l);
            }
        }
    }
    llama_batch_free(b);
    if (verbose) {
        fprintf(stderr, "decode %s n=%d rc=%d\n", tag, n, rc);
    }
    return rc;
}

/* A prompt of n tokens on one sequence from position pos0; outputs: all, or the last only. */
static int prompt(const char *tag, llama_seq_id seq, llama_pos pos0, int n, int salt, int all_outputs,
                  llama_token next[N_SEQ]) {
    static struct tok toks[MAX_BATCH];
    if (n > MAX_BATCH) {
        die("prompt too long");
    }
    for (int i = 0; i < n; i++) {
        toks[i].t = (llama_token) ((i * 7 + salt * 13 + 3) % n_vocab);
        toks[i].pos = pos0 + i;
        toks[i].seq = seq;
        toks[i].output = (int8_t) (all_outputs || i == n - 1);
    }
    return decode(tag, toks, n, next);
}

/* One greedy step on each listed sequence, after its highest position. */
static int step(const char *tag, const llama_seq_id *seqs, int n, llama_token next[N_SEQ]) {
    struct tok toks[N_SEQ];
    for (int i = 0; i < n; i++) {
        toks[i].t = next[seqs[i]];
        toks[i].pos = llama_memory_seq_pos_max(mem, seqs[i]) + 1;
        toks[i].seq = seqs[i];
        toks[i].output = 1;
    }
    return decode(tag, toks, n, next);
}

static int step_all(const char *tag, llama_token next[N_SEQ]) {
    static const llama_seq_id all[N_SEQ] = {0, 1, 2, 3};
    return step(tag, all, N_SEQ, next);
}

static int step_one(const char *tag, llama_seq_id seq, llama_token next[N_SEQ]) {
    return step(tag, &seq, 1, next);
}

static uint8_t *seq_blob(const char *tag, llama_seq_id seq, int ext, llama_state_seq_flags flags, size_t *n_out) {
    size_t n = ext ? llama_state_seq_get_size_ext(ctx, seq, flags) : llama_state_seq_get_size(ctx, seq);
    uint8_t *buf = malloc(n ? n : 1);
    if (!buf) {
        die("out of memory");
    }
    size_t w = ext ? llama_state_seq_get_data_ext(ctx, buf, n, seq, flags) : llama_state_seq_get_data(ctx, buf, n, seq);
    rec("state_seq_get %s seq=%d ext=%d flags=%u size=%zu written=%zu", tag, seq, ext, (unsigned) flags, n, w);
    rec_blob(tag, buf, w);
    *n_out = w;
    return buf;
}

static uint32_t get_u32(const uint8_t *b, size_t at) {
    uint32_t v;
    memcpy(&v, b + at, sizeof v);
    return v;
}

/* --composite 1: the model's memory is a composite llama.h cannot tell (MSA: a main cache and
 * an indexer cache, whose restore stock does not undo when the first part fails) */
static int composite;

/* After a failed sequence restore into `dest`. On a composite memory (hybrid, iSWA) stock may
 * leave its parts disagreeing (one part's destination erased or restored, the other's not),
 * where the drop-in erases the destination from every part (README, "Invalid input"): the
 * harness erases it on both libraries before comparing further. The drop-in's effect itself is
 * checked by the hostile tier (tests/dropin/hostile.c), against a clean context. */
static void failed_restore_effect(llama_seq_id dest) {
    if (composite || llama_model_is_hybrid(model) || llama_model_n_swa(model) > 0) {
        rec("composite: seq_rm %d after the failed restore: %d", dest, llama_memory_seq_rm(mem, dest, -1, -1));
    }
}

/* Restores a copy of `blob` with the u32 at `at` set to `v` into seq 3: it fails as stock's
 * does, with stock's error lines (recorded with the log) and stock's erase. */
static void corrupt_restore(const char *what, const uint8_t *blob, size_t n, size_t at, uint32_t v) {
    if (at + 4 > n) {
        rec("corrupt %s: outside the blob", what);
        return;
    }
    uint8_t *c = malloc(n);
    if (!c) {
        die("out of memory");
    }
    memcpy(c, blob, n);
    memcpy(c + at, &v, sizeof v);
    const size_t r = llama_state_seq_set_data(ctx, c, n, 3);
    rec("state_seq_set corrupt %s -> 3: %zu", what, r);
    if (r == 0) {
        failed_restore_effect(3);
    }
    rec_seqs("after corrupt restore");
    free(c);
}

/* Corrupt fields of a sequence blob's first part, after the blob's header (u32 magic, i32
 * seq_id): the KV cache's (u32 n_stream, per stream
 * u32 cell_count, the cells: i32 pos, u32 n_seq_id, [12 bytes of ext with M-RoPE], i32 seq_id;
 * then u32 v_trans, n_layer, n_rot_k, n_rot_v, per layer i32 K type, u64 K row size, rows...)
 * or, for a recurrent-only model, the recurrent memory's (u32 cell_count, i32 pos, u32 n_seq_id
 * per cell; then u32 s_trans, n_layer, per layer i32 R type, u64 R row size, rows...). */
static void corrupt_restores(const uint8_t *b, size_t n, int recurrent_only, int cell_ext) {
    const size_t h = 8;
    if (n < h + 4) {
        return;
    }
    if (recurrent_only) {
        const size_t data = h + 4 + (size_t) get_u32(b, h) * 8;
        corrupt_restore("cell_count", b, n, h, 0x7fffffffu);
        corrupt_restore("n_seq_id", b, n, h + 8, 1);
        corrupt_restore("s_trans", b, n, data, 1);
        if (data + 16 <= n) {
            corrupt_restore("n_layer", b, n, data + 4, get_u32(b, data + 4) + 1);
            corrupt_restore("R type", b, n, data + 8, get_u32(b, data + 8) + 1);
            corrupt_restore("R row size", b, n, data + 12, get_u32(b, data + 12) + 1);
        }
        return;
    }
    const uint32_t n_stream = get_u32(b, h);
    size_t at = h + 4;
    uint32_t count = 0;
    for (uint32_t s = 0; s < n_stream && at + 4 <= n; s++, at += 4) {
        if ((count = get_u32(b, at)) != 0) {
            break;
        }
    }
    if (count == 0) {
        rec("corrupt: no cells");
        return;
    }
    const size_t meta = at + 4, data = meta + (size_t) count * (cell_ext ? 24 : 12);
    corrupt_restore("n_stream", b, n, h, n_stream + 1);
    corrupt_restore("cell_count", b, n, at, 0x7fffffffu);
    corrupt_restore("n_seq_id", b, n, meta + 4, 2);
    if (data + 24 <= n) {
        corrupt_restore("v_trans", b, n, data, get_u32(b, data) ^ 1);
        corrupt_restore("n_layer", b, n, data + 4, get_u32(b, data + 4) + 1);
        corrupt_restore("n_rot_k", b, n, data + 8, get_u32(b, data + 8) + 64);
        corrupt_restore("K type", b, n, data + 16, get_u32(b, data + 16) + 1);
        corrupt_restore("K row size", b, n, data + 20, get_u32(b, data + 20) + 1);
    }
}

static void rec_file(const char *tag, const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        rec("file %s: cannot open", tag);
        return;
    }
    uint8_t *buf = NULL;
    size_t n = 0, cap = 0;
    for (;;) {
        if (n == cap) {
            cap = cap ? cap * 2 : 65536;
            uint8_t *nb = realloc(buf, cap);
            if (!nb) {
                die("out of memory");
            }
            buf = nb;
        }
        size_t r = fread(buf + n, 1, cap - n, f);
        if (r == 0) {
            break;
        }
        n += r;
    }
    fclose(f);
    rec_blob(tag, buf, n);
    free(buf);
}

/* Every log message of llama.cpp and ggml, at every level, goes into <out.txt> as one line
 * "log <level> <text>" (newlines as \n, addresses and millisecond timings masked), so the
 * drop-in's log is compared with stock's message by message: the memory's own lines (layers,
 * buffer sizes, size summary, n_rot, K-shift, restores, purges) and the graph sizes
 * sched_reserve reports. Messages before <out.txt> is open wait in memory. */
static char *pending;
static size_t pending_len, pending_cap;

static void put_log(const char *s, size_t n) {
    if (out) {
        fwrite(s, 1, n, out);
        return;
    }
    if (pending_len + n > pending_cap) {
        size_t cap = pending_cap ? pending_cap * 2 : 1 << 16;
        while (cap < pending_len + n) cap *= 2;
        char *p = realloc(pending, cap);
        if (!p) die("out of memory");
        pending = p;
        pending_cap = cap;
    }
    memcpy(pending + pending_len, s, n);
    pending_len += n;
}

static int is_hex(char c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

static void record_log(enum ggml_log_level level, const char *text) {
    char head[16];
    snprintf(head, sizeof head, "log %d ", (int) level);
    put_log(head, strlen(head));
    for (const char *p = text; *p;) {
        if (p[0] == '0' && p[1] == 'x' && is_hex(p[2])) {
            put_log("0x#", 3);
            for (p += 2; is_hex(*p); p++) {}
            continue;
        }
        if (*p >= '0' && *p <= '9') {
            const char *q = p;
            while ((*q >= '0' && *q <= '9') || *q == '.') q++;
            if (strncmp(q, " ms", 3) == 0) {
                put_log("#", 1);
            } else {
                put_log(p, (size_t) (q - p));
            }
            p = q;
            continue;
        }
        if (*p == '\n') {
            put_log("\\n", 2);
        } else {
            put_log(p, 1);
        }
        p++;
    }
    put_log("\n", 1);
}

/* The RPC server's endpoint ("127.0.0.1:<port>", empty without --rpc), --gpu, and what the
 * memory's buffer lines ("<func>: <buffer name> KV buffer size = ...") said: how many KV/RS
 * buffers it allocated, how many of them not where --rpc or --gpu put them. */
static char rpc_endpoint[64];
static int gpu;
static int n_cache_buffers, n_cache_buffers_elsewhere;

static void note_cache_buffer(const char *text) {
    const char *end = strstr(text, " KV buffer size = ");
    if (!end) {
        end = strstr(text, " RS buffer size = ");
    }
    const char *colon = strchr(text, ':');
    if (!end || !colon || colon > end) {
        return;
    }
    const char *name = colon + 1;
    while (*name == ' ') name++;
    char buf[128];
    size_t n = (size_t) (end - name) < sizeof buf - 1 ? (size_t) (end - name) : sizeof buf - 1;
    memcpy(buf, name, n);
    buf[n] = '\0';
    n_cache_buffers++;
    if (rpc_endpoint[0] ? strncmp(buf, "RPC", 3) != 0
                        : gpu && (strstr(buf, "CPU") || strstr(buf, "_Host") || strstr(buf, "RPC"))) {
        n_cache_buffers_elsewhere++;
    }
}

static void quiet_log(enum ggml_log_level level, const char *text, void *user) {
    (void) user;
    note_cache_buffer(text);
    if (rpc_endpoint[0] && strstr(text, rpc_endpoint)) {
        /* every occurrence of the endpoint, whose port differs between runs, as a fixed word */
        const size_t ne = strlen(rpc_endpoint);
        char *t = malloc(strlen(text) * 2 + 16);
        if (!t) die("out of memory");
        char *w = t;
        for (const char *p = text; *p;) {
            if (strncmp(p, rpc_endpoint, ne) == 0) {
                w += sprintf(w, "rpc-endpoint");
                p += ne;
            } else {
                *w++ = *p++;
            }
        }
        *w = '\0';
        record_log(level, t);
        free(t);
    } else {
        record_log(level, text);
    }
    if (verbose || level == GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

/* --rpc: ggml's RPC server, in a child process (killed at exit; on Linux also when this
 * process dies), serving this machine's CPU device on a free loopback port. */
static pid_t rpc_server;

static void stop_rpc_server(void) {
    if (rpc_server > 0) {
        kill(rpc_server, SIGKILL);
        waitpid(rpc_server, NULL, 0);
        rpc_server = 0;
    }
}

typedef void (*rpc_start_server_fn)(const char *endpoint, const char *cache_dir, size_t n_threads,
                                    size_t n_devices, ggml_backend_dev_t *devices);
typedef ggml_backend_reg_t (*rpc_add_server_fn)(const char *endpoint);

static void *rpc_proc(const char *name) {
    ggml_backend_reg_t reg = ggml_backend_reg_by_name("RPC");
    if (!reg) {
        die("--rpc: this ggml has no RPC backend (build it with GGML_RPC=ON)");
    }
    void *f = ggml_backend_reg_get_proc_address(reg, name);
    if (!f) {
        die("--rpc: the RPC backend does not export the function it needs");
    }
    return f;
}

static int loopback_socket(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) {
        die("--rpc: socket");
    }
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t) port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (port == 0) {
        socklen_t n = sizeof a;
        if (bind(fd, (struct sockaddr *) &a, sizeof a) != 0 || getsockname(fd, (struct sockaddr *) &a, &n) != 0) {
            die("--rpc: cannot find a free port");
        }
        close(fd);
        return ntohs(a.sin_port);
    }
    const int ok = connect(fd, (struct sockaddr *) &a, sizeof a) == 0;
    close(fd);
    return ok;
}

/* Starts the server and registers its device; returns that device. */
static ggml_backend_dev_t start_rpc(int n_threads) {
    const int port = loopback_socket(0);
    snprintf(rpc_endpoint, sizeof rpc_endpoint, "127.0.0.1:%d", port);
    rpc_start_server_fn start = (rpc_start_server_fn) rpc_proc("ggml_backend_rpc_start_server");
    fflush(NULL);
    rpc_server = fork();
    if (rpc_server < 0) {
        die("--rpc: fork");
    }
    if (rpc_server == 0) {
#ifdef __linux__
        prctl(PR_SET_PDEATHSIG, SIGKILL);
#endif
        /* the server's banner is not the harness's output */
        if (!freopen("/dev/null", "w", stdout)) {
            _exit(1);
        }
        ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
        if (!cpu) {
            _exit(1);
        }
        start(rpc_endpoint, NULL, (size_t) n_threads, 1, &cpu);
        _exit(1);
    }
    atexit(stop_rpc_server);
    for (int i = 0; !loopback_socket(port); i++) {
        if (i == 500 || waitpid(rpc_server, NULL, WNOHANG) != 0) {
            die("--rpc: the RPC server did not start");
        }
        const struct timespec ms10 = {0, 10 * 1000 * 1000};
        nanosleep(&ms10, NULL);
    }
    ggml_backend_reg_t reg = ((rpc_add_server_fn) rpc_proc("ggml_backend_rpc_add_server"))(rpc_endpoint);
    if (!reg || ggml_backend_reg_dev_count(reg) < 1) {
        die("--rpc: cannot reach the RPC server");
    }
    ggml_backend_register(reg);
    return ggml_backend_reg_dev_get(reg, 0);
}

static enum ggml_type parse_type(const char *s) {
    if (strcmp(s, "f16") == 0) return GGML_TYPE_F16;
    if (strcmp(s, "f32") == 0) return GGML_TYPE_F32;
    if (strcmp(s, "bf16") == 0) return GGML_TYPE_BF16;
    if (strcmp(s, "q8_0") == 0) return GGML_TYPE_Q8_0;
    if (strcmp(s, "q4_0") == 0) return GGML_TYPE_Q4_0;
    die("unknown cache type");
    return GGML_TYPE_F16;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s <model.gguf> <out.txt> [--flash-attn 0|1] [--kv-unified 0|1] "
                        "[--type-k T] [--type-v T] [--n-ctx N] [--threads N] [--n-rs-seq N] [--swa-full 0|1] "
                        "[--on-device 0|1] [--kv-debug N] [--rpc 0|1] [--gpu 0|1] [--composite 0|1]\n", argv[0]);
        return 1;
    }
    const char *model_path = argv[1];
    out_path = argv[2];
    int flash_attn = 0, kv_unified = 1, n_ctx = 256, n_threads = 2, n_rs_seq = 0, swa_full = 0, on_device = 1, rpc = 0;
    enum ggml_type type_k = GGML_TYPE_F16, type_v = GGML_TYPE_F16;
    for (int i = 3; i < argc; i++) {
        if (i + 1 >= argc) {
            die("option without a value");
        }
        const char *v = argv[++i];
        if (strcmp(argv[i - 1], "--flash-attn") == 0) flash_attn = atoi(v);
        else if (strcmp(argv[i - 1], "--kv-unified") == 0) kv_unified = atoi(v);
        else if (strcmp(argv[i - 1], "--type-k") == 0) type_k = parse_type(v);
        else if (strcmp(argv[i - 1], "--type-v") == 0) type_v = parse_type(v);
        else if (strcmp(argv[i - 1], "--n-ctx") == 0) n_ctx = atoi(v);
        else if (strcmp(argv[i - 1], "--threads") == 0) n_threads = atoi(v);
        else if (strcmp(argv[i - 1], "--n-rs-seq") == 0) n_rs_seq = atoi(v);
        else if (strcmp(argv[i - 1], "--swa-full") == 0) swa_full = atoi(v);
        else if (strcmp(argv[i - 1], "--on-device") == 0) on_device = atoi(v);
        else if (strcmp(argv[i - 1], "--kv-debug") == 0) setenv("LLAMA_KV_CACHE_DEBUG", v, 1);
        else if (strcmp(argv[i - 1], "--rpc") == 0) rpc = atoi(v);
        else if (strcmp(argv[i - 1], "--gpu") == 0) gpu = atoi(v);
        else if (strcmp(argv[i - 1], "--composite") == 0) composite = atoi(v);
        else die("unknown option");
    }
    verbose = getenv("EQUIVALENCE_VERBOSE") != NULL;

    llama_log_set(quiet_log, NULL);
    llama_backend_init();

    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    ggml_backend_dev_t rpc_devices[2] = {NULL, NULL};
    if (rpc) {
        rpc_devices[0] = start_rpc(n_threads);
        mp.devices = rpc_devices;
        mp.n_gpu_layers = -1;
    } else if (gpu) {
        mp.n_gpu_layers = -1;
    }
    model = llama_model_load_from_file(model_path, mp);
    if (!model) {
        die("cannot load the model");
    }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t) n_ctx;
    cp.n_batch = (uint32_t) n_ctx;
    cp.n_ubatch = 32;
    cp.n_seq_max = N_SEQ;
    cp.n_threads = n_threads;
    cp.n_threads_batch = n_threads;
    cp.flash_attn_type = flash_attn ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.kv_unified = kv_unified != 0;
    cp.type_k = type_k;
    cp.type_v = type_v;
    cp.n_rs_seq = (uint32_t) n_rs_seq;
    cp.swa_full = swa_full != 0;
    cp.no_perf = true;
    cp.cb_eval = count_nodes;
    ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        die("cannot create the context");
    }
    mem = llama_get_memory(ctx);
    if (n_cache_buffers == 0 || n_cache_buffers_elsewhere != 0) {
        fprintf(stderr, "equivalence: %d cache buffers, %d of them not on the %s device\n", n_cache_buffers,
                n_cache_buffers_elsewhere, rpc ? "RPC" : "GPU");
        die(n_cache_buffers ? "the memory is not (all) on the device asked for" : "the memory logged no buffer");
    }
    n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    if (n_vocab <= 0) {
        die("empty vocabulary");
    }

    out = fopen(out_path, "wb");
    if (!out) {
        die("cannot open the output file");
    }
    fwrite(pending, 1, pending_len, out);
    free(pending);
    pending = NULL;
    const int can_shift = llama_memory_can_shift(mem);
    const int n_ctx_seq = (int) llama_n_ctx_seq(ctx);
    rec("setup n_vocab=%d n_ctx=%u n_ctx_seq=%d n_seq_max=%u recurrent=%d hybrid=%d can_shift=%d "
        "flash_attn=%d kv_unified=%d type_k=%d type_v=%d n_rs_seq=%u swa_full=%d",
        n_vocab, llama_n_ctx(ctx), n_ctx_seq, llama_n_seq_max(ctx), llama_model_is_recurrent(model),
        llama_model_is_hybrid(model), can_shift, flash_attn, kv_unified, (int) type_k, (int) type_v,
        llama_n_rs_seq(ctx), swa_full);
    rec("cache buffers: %d, on %s", n_cache_buffers,
        rpc ? "the RPC device (not host memory)" : gpu ? "the GPU (not host memory)" : "the CPU");

    llama_token next[N_SEQ] = {0};

    /* 1. A shared prompt on seq 0 (every output), copied to the other sequences. */
    prompt("prompt", 0, 0, 20, 0, 1, next);
    for (llama_seq_id s = 1; s < N_SEQ; s++) {
        llama_memory_seq_cp(mem, 0, s, -1, -1);
        next[s] = (next[0] + s) % n_vocab;
    }
    rec_seqs("after seq_cp");

    /* 2. Parallel decoding. */
    for (int i = 0; i < 6; i++) {
        step_all("parallel", next);
    }
    rec_seqs("after parallel");

    /* 3. Sequence and whole states. */
    size_t n_seq2 = 0, n_seq2_partial = 0, n_whole = 0, n_tmp = 0;
    for (llama_seq_id s = 0; s < N_SEQ; s++) {
        if (s != 2) {
            free(seq_blob("seq", s, 0, 0, &n_tmp));
        }
    }
    uint8_t *blob_seq2 = seq_blob("seq2", 2, 0, 0, &n_seq2);
    uint8_t *blob_seq2_partial = seq_blob("seq2_partial", 2, 1, LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY, &n_seq2_partial);
    free(seq_blob("seq0_ext_none", 0, 1, LLAMA_STATE_SEQ_FLAGS_NONE, &n_tmp));
    size_t whole_size = llama_state_get_size(ctx);
    uint8_t *blob_whole = malloc(whole_size ? whole_size : 1);
    if (!blob_whole) {
        die("out of memory");
    }
    n_whole = llama_state_get_data(ctx, blob_whole, whole_size);
    rec("state_get size=%zu written=%zu", whole_size, n_whole);
    rec_blob("whole", blob_whole, n_whole);

    /* 4. Seq 1 finishes; a new request takes its place. */
    rec("seq_rm finished seq 1: %d", llama_memory_seq_rm(mem, 1, -1, -1));
    rec_seqs("after seq_rm 1");
    prompt("new request seq 1", 1, 0, 12, 1, 0, next);
    step_all("parallel", next);

    /* 5. Context shift on seq 0: keep 4, discard 8, shift the rest down; the next decode
     *    applies the K-shift. */
    if (can_shift) {
        const int n_keep = 4, n_discard = 8;
        rec("shift seq_rm: %d", llama_memory_seq_rm(mem, 0, n_keep, n_keep + n_discard));
        llama_memory_seq_add(mem, 0, n_keep + n_discard, -1, -n_discard);
        rec_seqs("after shift");
        step_one("after shift", 0, next);
        step_all("parallel", next);
        /* 6. seq_div (self-extend style) on seq 3. */
        llama_memory_seq_div(mem, 3, 0, -1, 2);
        rec_seqs("after seq_div 3");
        step_one("after seq_div", 3, next);
    } else {
        rec("no shift: can_shift is false");
        rec("partial seq_rm: %d", llama_memory_seq_rm(mem, 0, 4, 12));
    }
    for (int i = 0; i < 3; i++) {
        step_all("parallel", next);
    }
    rec_seqs("after parallel 2");
    /* A 4-token draft on seq 2 in one batch, then its last two tokens rolled back (speculative
     * decoding): a partial seq_rm, which a recurrent memory refuses unless it keeps rollback
     * snapshots (n_rs_seq) for the architecture. */
    prompt("draft seq 2", 2, llama_memory_seq_pos_max(mem, 2) + 1, 4, 7, 1, next);
    rec("rollback seq_rm 2: %d", llama_memory_seq_rm(mem, 2, llama_memory_seq_pos_max(mem, 2) - 1, -1));
    rec_seqs("after rollback");
    step_one("after rollback", 2, next);

    /* 7. Restore the saved seq 2 into seq 1, the PARTIAL_ONLY one into seq 3. */
    rec("seq_rm 1: %d", llama_memory_seq_rm(mem, 1, -1, -1));
    rec("state_seq_set seq2 -> 1: %zu", llama_state_seq_set_data(ctx, blob_seq2, n_seq2, 1));
    rec_seqs("after restore into 1");
    free(seq_blob("seq1_restored", 1, 0, 0, &n_tmp));
    step_one("after restore", 1, next);
    rec("seq_rm 3: %d", llama_memory_seq_rm(mem, 3, -1, -1));
    rec("state_seq_set_ext partial seq2 -> 3: %zu",
        llama_state_seq_set_data_ext(ctx, blob_seq2_partial, n_seq2_partial, 3, LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY));
    rec_seqs("after partial restore into 3");
    step_one("after partial restore", 3, next);
    /* a malformed (truncated) blob: refused */
    {
        const size_t r = llama_state_seq_set_data(ctx, blob_seq2, n_seq2 / 2, 3);
        rec("state_seq_set truncated -> 3: %zu", r);
        if (r == 0) {
            failed_restore_effect(3);
        }
    }
    rec_seqs("after truncated restore");
    /* corrupt fields of the first part: stock's error lines, stock's erase */
    const enum llama_rope_type rope = llama_model_rope_type(model);
    corrupt_restores(blob_seq2, n_seq2, llama_model_is_recurrent(model),
                     rope == LLAMA_ROPE_TYPE_MROPE || rope == LLAMA_ROPE_TYPE_IMROPE);

    /* 7b. ON_DEVICE: seq 2's tensor data stays with the context; restore it into seq 1. */
    if (on_device) {
        size_t n_dev = 0;
        uint8_t *b = seq_blob("seq2_on_device", 2, 1, LLAMA_STATE_SEQ_FLAGS_ON_DEVICE, &n_dev);
        rec("seq_rm 1: %d", llama_memory_seq_rm(mem, 1, -1, -1));
        rec("state_seq_set_ext on_device seq2 -> 1: %zu",
            llama_state_seq_set_data_ext(ctx, b, n_dev, 1, LLAMA_STATE_SEQ_FLAGS_ON_DEVICE));
        rec_seqs("after on_device restore into 1");
        free(seq_blob("seq1_after_on_device", 1, 0, 0, &n_tmp));
        step_one("after on_device restore", 1, next);
        free(b);
    }

    /* 8. Sequence file of seq 0: save, drop, load back, continue. */
    char path[4096];
    llama_token file_tokens[16];
    for (int i = 0; i < 16; i++) {
        file_tokens[i] = (llama_token) ((i * 5 + 1) % n_vocab);
    }
    snprintf(path, sizeof path, "%s.seq", out_path);
    rec("state_seq_save_file seq 0: %zu", llama_state_seq_save_file(ctx, path, 0, file_tokens, 16));
    rec_file("seq_file", path);
    rec("seq_rm 0: %d", llama_memory_seq_rm(mem, 0, -1, -1));
    {
        llama_token got[32];
        size_t n_got = 0;
        size_t r = llama_state_seq_load_file(ctx, path, 0, got, 32, &n_got);
        rec("state_seq_load_file -> 0: %zu tokens=%zu first=%d", r, n_got, n_got ? got[0] : -1);
    }
    rec_seqs("after seq file");
    step_one("after seq file", 0, next);

    /* 9. seq_keep. */
    llama_memory_seq_keep(mem, 0);
    rec_seqs("after seq_keep 0");
    step_one("after seq_keep", 0, next);

    /* 10. Session file: save, clear, decode something else, load back, continue. */
    snprintf(path, sizeof path, "%s.session", out_path);
    rec("state_save_file: %d", llama_state_save_file(ctx, path, file_tokens, 16));
    rec_file("session_file", path);
    llama_memory_clear(mem, true);
    rec_seqs("after clear");
    prompt("other prompt", 0, 0, 9, 2, 0, next);
    {
        llama_token got[32];
        size_t n_got = 0;
        bool ok = llama_state_load_file(ctx, path, got, 32, &n_got);
        rec("state_load_file: %d tokens=%zu first=%d", ok, n_got, n_got ? got[0] : -1);
    }
    rec_seqs("after session load");
    step_one("after session load", 0, next);

    /* 11. Whole state saved in 3. */
    rec("state_set_data whole: %zu", llama_state_set_data(ctx, blob_whole, n_whole));
    rec_seqs("after whole restore");
    step_all("after whole restore", next);
    {
        size_t n = llama_state_get_size(ctx);
        uint8_t *b = malloc(n ? n : 1);
        if (!b) {
            die("out of memory");
        }
        size_t w = llama_state_get_data(ctx, b, n);
        rec("state_get size=%zu written=%zu", n, w);
        rec_blob("whole_after", b, w);
        free(b);
    }

    /* 12. Sequence ids in [n_seq_max, 256) on a unified cache and a recurrent memory, alone or
     *     in a hybrid: accepted by stock; seq_keep of such an id keeps nothing in any part. */
    if (kv_unified) {
        const llama_seq_id id = N_SEQ + 3;
        rec("out of range seq %d: pos_min=%d pos_max=%d", id, llama_memory_seq_pos_min(mem, id),
            llama_memory_seq_pos_max(mem, id));
        rec("out of range seq_rm: %d", llama_memory_seq_rm(mem, id, -1, -1));
        rec("out of range state_seq_get_size: %zu", llama_state_seq_get_size(ctx, id));
        rec_seqs("after out of range");
        /* a copy into such an id, its sequence state (stock's bytes), that state restored into
         * seq 1, and the id removed again */
        llama_memory_seq_cp(mem, 0, id, -1, -1);
        rec_seqs("after out of range seq_cp");
        {
            size_t n_id = 0;
            uint8_t *b = seq_blob("out_of_range_copy", id, 0, 0, &n_id);
            const size_t r = llama_state_seq_set_data(ctx, b, n_id, 1);
            rec("state_seq_set out of range copy -> 1: %zu", r);
            if (r == 0) {
                failed_restore_effect(1);
            }
            rec_seqs("after out of range copy restored into 1");
            free(b);
        }
        rec("out of range seq_rm after seq_cp: %d", llama_memory_seq_rm(mem, id, -1, -1));
        llama_memory_seq_keep(mem, id);
        rec_seqs("after out of range seq_keep");
    }

    /* 13. A batch that does not fit: the failure path (memory restored), then one that does. */
    llama_memory_clear(mem, true);
    const int fill = n_ctx_seq - 40 > 8 ? n_ctx_seq - 40 : 8;
    prompt("fill", 0, 0, fill, 3, 0, next);
    prompt("too big", 0, fill, 60, 4, 0, next);
    rec_seqs("after too big");
    prompt("fits", 0, llama_memory_seq_pos_max(mem, 0) + 1, 8, 5, 1, next);

    /* 14. Clear without data, a fresh prompt. */
    llama_memory_clear(mem, false);
    rec_seqs("after clear(false)");
    prompt("fresh", 2, 0, 10, 6, 1, next);
    rec_seqs("end");

    free(blob_seq2);
    free(blob_seq2_partial);
    free(blob_whole);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    stop_rpc_server();
    if (fclose(out) != 0) {
        die("cannot write the output file");
    }
    return 0;
}
