/* The hostile tier: llama.h's state API fed malformed, crafted and hostile inputs, each case in
 * a forked child with a timeout and a memory limit, built once against each library (drop-in
 * and stock) from this one source.
 *
 *   hostile <model.gguf> <work dir> [--sample N] [--jobs N] [--timeout S] [--flash-attn 0|1]
 *           [--require-clean 0|1] [--label NAME] [--case INDEX] [--second-part BYTES]
 *
 * Every case starts from scratch in its child: the model loaded, two contexts A and B set up
 * alike (three sequences of tokens), the case's valid input made from A (a whole state, a
 * sequence state of seq 1 with flags 0, PARTIAL_ONLY or ON_DEVICE, a session file, a sequence
 * file), A and B then changed alike (seq 0 decoded anew), so that a restore, whole or partial,
 * is visible. The input is damaged (cut at an offset, a bit flipped, a u32 overwritten with a
 * crafted value, bytes appended), or given with an out-of-range destination, every flag
 * combination, or a path that is a FIFO, a directory, /dev/zero or missing, and restored into
 * A (a sequence state into seq 2, which holds other tokens). Beside them, llama.h's sequence
 * functions with hostile arguments (ids out of range, reversed ranges, overflowing shifts, a
 * divisor of 0), each followed by a decode: counted as accepted unless the child dies. Every
 * slice includes the special cases: ids, flags, paths, appended bytes, the sequence functions,
 * and a composite's sequence state damaged in its second part (a valid first part before it).
 *
 * Outcomes, per case:
 *   accepted   the library took the input (a damaged byte in tensor data is still a state);
 *   rejected   it refused it, and A is in a state the failure promises: unchanged, or the
 *              destination erased (every sequence emptied, for a whole state). B gets the same
 *              effect; every sequence's positions and the next decode's logits (one token on
 *              each of the 4 sequences) must be identical in A and B;
 *   corrupt    refused, but A is in neither state (or its logits differ from B's);
 *   exception  the child died of an exception that left the C API (std::terminate);
 *   abort      SIGABRT otherwise (GGML_ASSERT, GGML_ABORT);
 *   signal     any other signal (SIGSEGV, SIGFPE, SIGBUS...);
 *   hang       the child outlived the timeout.
 * Prints the counts, the first cases of each bad outcome, and with --require-clean 1 exits 1
 * when any of the five bad counts is not 0. --sample N runs N cases spread evenly over the
 * whole corpus (and every special case); 0 runs all of it. */
#define _POSIX_C_SOURCE 200809L
#include "llama.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define N_SEQ 4
#define SRC_SEQ 1
#define DEST_SEQ 2

enum kind { K_WHOLE, K_SEQ, K_SEQ_PARTIAL, K_SEQ_DEVICE, K_SESSION_FILE, K_SEQ_FILE, N_KINDS };
static const char *kind_name[N_KINDS] = {"whole", "seq", "seq_partial", "seq_on_device", "session_file",
                                         "seq_file"};
enum op { OP_NONE, OP_TRUNC, OP_FLIP, OP_U32, OP_APPEND, OP_DEST, OP_FLAGS, OP_PATH, OP_SEQ_OP };
static const char *op_name[] = {"none", "cut", "flip", "u32", "append", "dest", "flags", "path", "seq_op"};

/* llama.h's memory functions with hostile arguments (ids out of range, reversed and negative
 * ranges, shifts that overflow, a divisor of 0 or below): no crash is the whole check */
struct seq_op {
    char fn; /* r(m), c(p), k(eep), a(dd), d(iv), n (pos_min), x (pos_max) */
    llama_seq_id a, b;
    llama_pos p0, p1;
    int arg;
};
static const struct seq_op seq_ops[] = {
    {'r', -5, 0, 0, 10, 0},      {'r', 1000, 0, -1, -1, 0},   {'r', 1, 0, 10, 2, 0},
    {'r', 1, 0, -7, -9, 0},      {'r', 256, 0, -1, -1, 0},    {'c', 0, 300, -1, -1, 0},
    {'c', -3, 1, -1, -1, 0},     {'c', 0, 1, 10, 2, 0},       {'c', 0, -1, -1, -1, 0},
    {'c', 0, 255, -1, -1, 0},    {'k', -2, 0, 0, 0, 0},       {'k', 100000, 0, 0, 0, 0},
    {'a', 1, 0, 10, 2, 5},       {'a', 300, 0, 0, -1, 1},     {'a', 1, 0, 0, -1, 2147483647},
    {'a', 1, 0, 0, -1, -2147483647 - 1}, {'a', -1, 0, 0, -1, 3}, {'d', 1, 0, 0, -1, 0},
    {'d', 1, 0, 0, -1, -3},      {'d', 700, 0, 0, -1, 2},     {'d', 1, 0, 9, 1, 2},
    {'n', -9, 0, 0, 0, 0},       {'x', 1 << 20, 0, 0, 0, 0},
};
enum outcome { O_ACCEPTED, O_REJECTED, O_CORRUPT, O_EXCEPTION, O_ABORT, O_SIGNAL, O_HANG, O_SETUP, N_OUTCOMES };
static const char *outcome_name[N_OUTCOMES] = {"accepted", "rejected", "corrupt", "exception", "abort",
                                               "signal", "hang", "setup-failure"};

struct kase {
    enum kind kind;
    enum op op;
    long long off;
    long long val;
};

static const char *model_path, *work_dir;
static int flash_attn;
static struct llama_model *model;
static int n_vocab;

/* HOSTILE_LOG=1: the library's log lines to stderr (with --case, to see why a case ended so) */
static void quiet_log(enum ggml_log_level level, const char *text, void *user) {
    (void) level;
    (void) user;
    if (getenv("HOSTILE_LOG")) {
        fputs(text, stderr);
    }
}

static void die(const char *msg) {
    fprintf(stderr, "hostile: %s\n", msg);
    exit(2);
}

static struct llama_context *new_ctx(void) {
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 256;
    cp.n_batch = 256;
    cp.n_ubatch = 32;
    cp.n_seq_max = N_SEQ;
    cp.n_threads = 1;
    cp.n_threads_batch = 1;
    cp.flash_attn_type = flash_attn ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.no_perf = true;
    return llama_init_from_model(model, cp);
}

/* n tokens of seq from pos0, salted; the logits of every token are kept when out != NULL */
static int feed(struct llama_context *ctx, llama_seq_id seq, llama_pos pos0, int n, int salt) {
    struct llama_batch b = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        b.token[i] = (llama_token) ((i * 7 + salt * 13 + 3) % n_vocab);
        b.pos[i] = pos0 + i;
        b.n_seq_id[i] = 1;
        b.seq_id[i][0] = seq;
        b.logits[i] = i == n - 1;
    }
    b.n_tokens = n;
    const int rc = llama_decode(ctx, b);
    llama_batch_free(b);
    return rc;
}

static int fill(struct llama_context *ctx) {
    return feed(ctx, 0, 0, 5, 1) || feed(ctx, 1, 0, 3, 2) || feed(ctx, 2, 0, 4, 3);
}

/* A's and B's common change after the input was made: seq 0 anew */
static int alter(struct llama_context *ctx) {
    llama_memory_seq_rm(llama_get_memory(ctx), 0, -1, -1);
    return feed(ctx, 0, 0, 6, 4);
}

/* one token on each sequence after its last position; the logits of all four */
static int probe(struct llama_context *ctx, float *logits) {
    llama_memory_t mem = llama_get_memory(ctx);
    struct llama_batch b = llama_batch_init(N_SEQ, 0, 1);
    for (int s = 0; s < N_SEQ; s++) {
        b.token[s] = (llama_token) ((s * 11 + 5) % n_vocab);
        b.pos[s] = llama_memory_seq_pos_max(mem, s) + 1;
        b.n_seq_id[s] = 1;
        b.seq_id[s][0] = s;
        b.logits[s] = 1;
    }
    b.n_tokens = N_SEQ;
    const int rc = llama_decode(ctx, b);
    llama_batch_free(b);
    if (rc != 0) {
        return rc;
    }
    for (int s = 0; s < N_SEQ; s++) {
        const float *l = llama_get_logits_ith(ctx, s);
        if (!l) {
            return -1;
        }
        memcpy(logits + (size_t) s * n_vocab, l, sizeof(float) * (size_t) n_vocab);
    }
    return 0;
}

static uint8_t *read_all(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        return NULL;
    }
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *b = malloc(len > 0 ? (size_t) len : 1);
    *n = len > 0 && fread(b, 1, (size_t) len, f) == (size_t) len ? (size_t) len : 0;
    fclose(f);
    return b;
}

static int write_all(const char *path, const uint8_t *b, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) {
        return -1;
    }
    const int ok = fwrite(b, 1, n, f) == n;
    return fclose(f) == 0 && ok ? 0 : -1;
}

static const llama_token file_tokens[6] = {1, 2, 3, 4, 5, 6};

/* The case's valid input, made from ctx (the files written under the child's own names). */
static uint8_t *make_input(struct llama_context *ctx, enum kind k, size_t *n, const char *path) {
    uint8_t *b = NULL;
    *n = 0;
    switch (k) {
    case K_WHOLE:
        *n = llama_state_get_size(ctx);
        b = malloc(*n);
        *n = llama_state_get_data(ctx, b, *n);
        return b;
    case K_SEQ:
    case K_SEQ_PARTIAL:
    case K_SEQ_DEVICE: {
        const llama_state_seq_flags fl = k == K_SEQ ? 0 : k == K_SEQ_PARTIAL ? LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
                                                                            : LLAMA_STATE_SEQ_FLAGS_ON_DEVICE;
        *n = llama_state_seq_get_size_ext(ctx, SRC_SEQ, fl);
        b = malloc(*n ? *n : 1);
        *n = llama_state_seq_get_data_ext(ctx, b, *n, SRC_SEQ, fl);
        return b;
    }
    case K_SESSION_FILE:
        if (!llama_state_save_file(ctx, path, file_tokens, 6)) {
            return NULL;
        }
        return read_all(path, n);
    case K_SEQ_FILE:
        if (!llama_state_seq_save_file(ctx, path, SRC_SEQ, file_tokens, 6)) {
            return NULL;
        }
        return read_all(path, n);
    default:
        return NULL;
    }
}

static int mutate(uint8_t **b, size_t *n, const struct kase *c) {
    switch (c->op) {
    case OP_TRUNC:
        if ((size_t) c->off > *n) return -1;
        *n = (size_t) c->off;
        return 0;
    case OP_FLIP:
        if ((size_t) c->off >= *n) return -1;
        (*b)[c->off] ^= (uint8_t) (1u << (c->val & 7));
        return 0;
    case OP_U32: {
        if ((size_t) c->off + 4 > *n) return -1;
        const uint32_t v = (uint32_t) c->val;
        memcpy(*b + c->off, &v, 4);
        return 0;
    }
    case OP_APPEND:
        *b = realloc(*b, *n + (size_t) c->off);
        memset(*b + *n, (int) c->val, (size_t) c->off);
        *n += (size_t) c->off;
        return 0;
    default:
        return 0;
    }
}

/* Restores the case's input into A; 1 when the library took it. */
static int restore(struct llama_context *a, const struct kase *c, uint8_t *b, size_t n, const char *path) {
    llama_seq_id dest = c->op == OP_DEST ? (llama_seq_id) c->val : DEST_SEQ;
    if (c->op == OP_SEQ_OP) {
        const struct seq_op *o = &seq_ops[c->val];
        llama_memory_t m = llama_get_memory(a);
        switch (o->fn) {
        case 'r': (void) llama_memory_seq_rm(m, o->a, o->p0, o->p1); break;
        case 'c': llama_memory_seq_cp(m, o->a, o->b, o->p0, o->p1); break;
        case 'k': llama_memory_seq_keep(m, o->a); break;
        case 'a': llama_memory_seq_add(m, o->a, o->p0, o->p1, o->arg); break;
        case 'd': llama_memory_seq_div(m, o->a, o->p0, o->p1, o->arg); break;
        case 'n': (void) llama_memory_seq_pos_min(m, o->a); break;
        default: (void) llama_memory_seq_pos_max(m, o->a); break;
        }
        /* and a decode after it */
        float *l = malloc(sizeof(float) * (size_t) n_vocab * N_SEQ);
        (void) probe(a, l);
        free(l);
        return 1;
    }
    llama_token toks[64];
    size_t n_toks = 0;
    const char *p = path;
    if (c->op == OP_PATH) {
        static const char *special[] = {NULL, NULL, "/dev/zero", "/nonexistent/llama-memory-hostile"};
        static char fifo[4096], dir[4096];
        snprintf(fifo, sizeof fifo, "%s/fifo", work_dir);
        snprintf(dir, sizeof dir, "%s", work_dir);
        p = c->val == 0 ? fifo : c->val == 1 ? dir : special[c->val];
    } else if (c->kind >= K_SESSION_FILE && write_all(path, b, n) != 0) {
        _exit(O_SETUP);
    }
    switch (c->kind) {
    case K_WHOLE:
        return llama_state_set_data(a, b, n) != 0;
    case K_SEQ:
    case K_SEQ_PARTIAL:
    case K_SEQ_DEVICE: {
        llama_state_seq_flags fl = c->kind == K_SEQ ? 0 : c->kind == K_SEQ_PARTIAL ? LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY
                                                                                 : LLAMA_STATE_SEQ_FLAGS_ON_DEVICE;
        if (c->op == OP_FLAGS) {
            fl = (llama_state_seq_flags) c->val;
        }
        return llama_state_seq_set_data_ext(a, b, n, dest, fl) != 0;
    }
    case K_SESSION_FILE:
        return llama_state_load_file(a, p, toks, 64, &n_toks);
    case K_SEQ_FILE:
        return llama_state_seq_load_file(a, p, dest, toks, 64, &n_toks) != 0;
    default:
        return 0;
    }
}

static int whole_kind(enum kind k) {
    return k == K_WHOLE || k == K_SESSION_FILE;
}

/* The child: exit status is the outcome (a signal when it dies). */
static void run_case(const struct kase *c) {
    char path[4096];
    snprintf(path, sizeof path, "%s/case-%ld.bin", work_dir, (long) getpid());
    struct llama_context *a = new_ctx(), *b = new_ctx();
    if (!a || !b || fill(a) || fill(b)) {
        _exit(O_SETUP);
    }
    size_t n = 0;
    uint8_t *in = make_input(a, c->kind, &n, path);
    if (!in || alter(a) || alter(b)) {
        _exit(O_SETUP);
    }
    if (mutate(&in, &n, c) != 0) {
        _exit(O_SETUP);
    }
    const int took = restore(a, c, in, n, path);
    unlink(path);
    if (took) {
        _exit(O_ACCEPTED);
    }
    llama_memory_t ma = llama_get_memory(a), mb = llama_get_memory(b);
    /* the effect the failure promises, read off A: the destination emptied, or nothing */
    const llama_seq_id dest = c->op == OP_DEST ? (llama_seq_id) c->val : DEST_SEQ;
    if (whole_kind(c->kind)) {
        int empty = 1;
        for (int s = 0; s < N_SEQ; s++) {
            empty &= llama_memory_seq_pos_max(ma, s) == -1;
        }
        if (empty) {
            llama_memory_clear(mb, true);
        }
    } else if (dest >= 0 && dest < N_SEQ && llama_memory_seq_pos_max(ma, dest) == -1) {
        llama_memory_seq_rm(mb, dest, -1, -1);
    }
    for (int s = 0; s < N_SEQ; s++) {
        if (llama_memory_seq_pos_min(ma, s) != llama_memory_seq_pos_min(mb, s) ||
            llama_memory_seq_pos_max(ma, s) != llama_memory_seq_pos_max(mb, s)) {
            _exit(O_CORRUPT);
        }
    }
    float *la = malloc(sizeof(float) * (size_t) n_vocab * N_SEQ), *lb = malloc(sizeof(float) * (size_t) n_vocab * N_SEQ);
    const int ra = probe(a, la), rb = probe(b, lb);
    if (ra != rb) {
        _exit(O_CORRUPT);
    }
    if (ra == 0) {
        for (size_t i = 0; i < (size_t) n_vocab * N_SEQ; i++) {
            if (!(la[i] == lb[i])) {
                _exit(O_CORRUPT);
            }
        }
    }
    _exit(O_REJECTED);
}

/* the sizes of the six valid inputs, from a child (the parent never touches a context: a
 * forked child must not inherit ggml's threads) */
static int input_sizes(size_t sizes[N_KINDS]) {
    int fds[2];
    if (pipe(fds) != 0) {
        return -1;
    }
    const pid_t pid = fork();
    if (pid == 0) {
        close(fds[0]);
        char path[4096];
        snprintf(path, sizeof path, "%s/sizes-%ld.bin", work_dir, (long) getpid());
        struct llama_context *a = new_ctx();
        if (!a || fill(a)) {
            _exit(1);
        }
        for (int k = 0; k < N_KINDS; k++) {
            size_t n = 0;
            uint8_t *b = make_input(a, (enum kind) k, &n, path);
            if (!b) {
                _exit(1);
            }
            free(b);
            if (write(fds[1], &n, sizeof n) != (ssize_t) sizeof n) {
                _exit(1);
            }
        }
        unlink(path);
        _exit(0);
    }
    close(fds[1]);
    int ok = 1;
    for (int k = 0; k < N_KINDS; k++) {
        ok &= read(fds[0], &sizes[k], sizeof sizes[k]) == (ssize_t) sizeof sizes[k];
    }
    close(fds[0]);
    int st = 0;
    waitpid(pid, &st, 0);
    return ok && WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : -1;
}

static struct kase *cases;
static size_t n_cases, cap_cases;
static size_t n_special; /* the first n_special cases always run */

static void add(enum kind k, enum op op, long long off, long long val) {
    if (n_cases == cap_cases) {
        cap_cases = cap_cases ? 2 * cap_cases : 1024;
        cases = realloc(cases, cap_cases * sizeof *cases);
        if (!cases) die("out of memory");
    }
    cases[n_cases++] = (struct kase){k, op, off, val};
}

static void build_corpus(const size_t sizes[N_KINDS], size_t second_bytes) {
    /* special cases: ids, flags, paths, the valid inputs themselves */
    static const long long dests[] = {-1, -7, 3, 4, 255, 256, 1000, 2147483647LL};
    for (int k = 0; k < N_KINDS; k++) {
        add((enum kind) k, OP_NONE, 0, 0);
    }
    for (size_t i = 0; i < sizeof dests / sizeof dests[0]; i++) {
        add(K_SEQ, OP_DEST, 0, dests[i]);
        add(K_SEQ_FILE, OP_DEST, 0, dests[i]);
        add(K_SEQ_DEVICE, OP_DEST, 0, dests[i]);
    }
    for (int f = 0; f < 8; f++) {
        add(K_SEQ, OP_FLAGS, 0, f);
        add(K_SEQ_PARTIAL, OP_FLAGS, 0, f);
        add(K_SEQ_DEVICE, OP_FLAGS, 0, f);
    }
    for (int p = 0; p < 4; p++) {
        add(K_SESSION_FILE, OP_PATH, 0, p);
        add(K_SEQ_FILE, OP_PATH, 0, p);
    }
    for (size_t i = 0; i < sizeof seq_ops / sizeof seq_ops[0]; i++) {
        add(K_WHOLE, OP_SEQ_OP, 0, (long long) i);
    }
    for (int k = 0; k < N_KINDS; k++) {
        add((enum kind) k, OP_APPEND, 1, 0);
        add((enum kind) k, OP_APPEND, 4, 0xff);
        add((enum kind) k, OP_APPEND, 4096, 0);
    }
    /* the second part of a composite's sequence state (the PARTIAL_ONLY state is its later
     * parts: an iSWA's window cache, a hybrid's recurrent memory), always: cut at each of its
     * first `second_bytes` bytes (--second-part, 96 by default), and crafted values there
     * (counts, positions, n_seq_id, v_trans), so that a valid first part followed by an
     * invalid one is in every slice. On a single memory it is
     * the whole state's start. */
    const size_t second = 8 + sizes[K_SEQ] - sizes[K_SEQ_PARTIAL];
    const size_t second_end = second + second_bytes;
    static const long long second_values[] = {2, 0xffffffffLL, 0xfffffff0LL, 0x7fffffffLL};
    for (size_t off = second; off < second_end && off < sizes[K_SEQ]; off++) {
        add(K_SEQ, OP_TRUNC, (long long) off, 0);
        for (size_t v = 0; v < sizeof second_values / sizeof second_values[0] && off + 4 <= sizes[K_SEQ]; v++) {
            add(K_SEQ, OP_U32, (long long) off, second_values[v]);
        }
    }
    n_special = n_cases;
    /* the corpus: every cut, a bit flip at every byte, crafted u32 at every offset of the
     * metadata region (the first 512 bytes) and at every 4th byte beyond */
    static const long long crafted[] = {0, 1, 2, 3, 255, 256, 0x7fffffffLL, 0x80000000LL, 0xffffffffLL, 0xfffffff0LL};
    for (int k = 0; k < N_KINDS; k++) {
        const size_t n = sizes[k];
        for (size_t off = 0; off < n; off++) {
            add((enum kind) k, OP_TRUNC, (long long) off, 0);
            add((enum kind) k, OP_FLIP, (long long) off, (long long) (off * 5 % 8));
            if (off + 4 <= n && (off < 512 || off % 4 == 0)) {
                for (size_t v = 0; v < sizeof crafted / sizeof crafted[0]; v++) {
                    if (off < 512 || v == off / 4 % 10) {
                        add((enum kind) k, OP_U32, (long long) off, crafted[v]);
                    }
                }
            }
        }
    }
}

int main(int argc, char **argv) {
    if (argc < 3) {
        die("usage: hostile <model.gguf> <work dir> [--sample N] [--jobs N] [--timeout S] [--flash-attn 0|1] "
            "[--second-part BYTES] [--require-clean 0|1] [--label NAME] [--case INDEX]");
    }
    model_path = argv[1];
    work_dir = argv[2];
    long sample = 0, only = -1;
    size_t second_bytes = 96;
    int jobs = 2, timeout_s = 20, require_clean = 0;
    const char *label = "";
    for (int i = 3; i + 1 < argc; i += 2) {
        const char *o = argv[i], *v = argv[i + 1];
        if (strcmp(o, "--sample") == 0) sample = atol(v);
        else if (strcmp(o, "--jobs") == 0) jobs = atoi(v);
        else if (strcmp(o, "--timeout") == 0) timeout_s = atoi(v);
        else if (strcmp(o, "--flash-attn") == 0) flash_attn = atoi(v);
        else if (strcmp(o, "--require-clean") == 0) require_clean = atoi(v);
        else if (strcmp(o, "--label") == 0) label = v;
        else if (strcmp(o, "--case") == 0) only = atol(v);
        else if (strcmp(o, "--second-part") == 0) second_bytes = (size_t) atol(v);
        else die("unknown option");
    }
    if (jobs < 1) jobs = 1;
    mkdir(work_dir, 0700);
    char fifo[4096];
    snprintf(fifo, sizeof fifo, "%s/fifo", work_dir);
    unlink(fifo);
    if (mkfifo(fifo, 0600) != 0) {
        die("cannot make the FIFO");
    }

    llama_log_set(quiet_log, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    model = llama_model_load_from_file(model_path, mp);
    if (!model) {
        die("cannot load the model");
    }
    n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));

    size_t sizes[N_KINDS];
    if (input_sizes(sizes) != 0) {
        die("cannot make the valid inputs");
    }
    build_corpus(sizes, second_bytes);
    /* which cases run: the special ones, then `sample` spread evenly over the rest */
    size_t n_run = n_cases;
    size_t *run = malloc(sizeof(size_t) * n_cases);
    for (size_t i = 0; i < n_cases; i++) run[i] = i;
    if (only >= 0 && (size_t) only < n_cases) {
        run[0] = (size_t) only;
        n_run = 1;
    } else if (sample > 0 && (size_t) sample < n_cases - n_special) {
        n_run = n_special;
        for (long j = 0; j < sample; j++) {
            run[n_run++] = n_special + (size_t) ((double) j * (double) (n_cases - n_special) / (double) sample);
        }
    }

    size_t count[N_OUTCOMES] = {0};
    struct running {
        pid_t pid;
        size_t idx;
        char err[4096];
    } *slots = calloc((size_t) jobs, sizeof *slots);
    size_t next = 0, done = 0;
    int shown[N_OUTCOMES] = {0};
    while (done < n_run) {
        for (int j = 0; j < jobs && next < n_run; j++) {
            if (slots[j].pid) continue;
            const size_t idx = run[next++];
            snprintf(slots[j].err, sizeof slots[j].err, "%s/stderr-%d.txt", work_dir, j);
            fflush(stdout);
            const pid_t pid = fork();
            if (pid < 0) die("fork failed");
            if (pid == 0) {
                const int fd = only >= 0 ? -1 : open(slots[j].err, O_WRONLY | O_CREAT | O_TRUNC, 0600);
                if (fd >= 0) {
                    dup2(fd, 2);
                    close(fd);
                }
                struct rlimit rl = {(rlim_t) 4 << 30, (rlim_t) 4 << 30}, no_core = {0, 0};
                setrlimit(RLIMIT_AS, &rl);
                setrlimit(RLIMIT_CORE, &no_core);
                /* an abort's backtrace runs gdb: seconds per case, and nothing this tier reads */
                setenv("GGML_NO_BACKTRACE", "1", 1);
                alarm((unsigned) timeout_s);
                run_case(&cases[idx]);
                _exit(O_SETUP);
            }
            slots[j].pid = pid;
            slots[j].idx = idx;
        }
        int st = 0;
        const pid_t pid = wait(&st);
        if (pid < 0) {
            if (errno == EINTR) continue;
            die("wait failed");
        }
        for (int j = 0; j < jobs; j++) {
            if (slots[j].pid != pid) continue;
            enum outcome o;
            if (WIFEXITED(st)) {
                o = WEXITSTATUS(st) < N_OUTCOMES ? (enum outcome) WEXITSTATUS(st) : O_SETUP;
            } else if (WTERMSIG(st) == SIGALRM) {
                o = O_HANG;
            } else if (WTERMSIG(st) == SIGABRT) {
                size_t n = 0;
                uint8_t *e = read_all(slots[j].err, &n);
                o = O_ABORT;
                if (e && n) {
                    e[n - 1] = 0;
                    if (strstr((char *) e, "terminate called")) o = O_EXCEPTION;
                }
                free(e);
            } else {
                o = O_SIGNAL;
            }
            count[o]++;
            const struct kase *c = &cases[slots[j].idx];
            if (getenv("HOSTILE_VERBOSE")) {
                printf("%s case %zu: %s %s off=%lld val=%lld -> %s\n", label, slots[j].idx, kind_name[c->kind],
                       op_name[c->op], c->off, c->val, outcome_name[o]);
            }
            if (o >= O_CORRUPT && shown[o]++ < 5) {
                printf("%s %s: %s %s off=%lld val=%lld%s\n", label, outcome_name[o], kind_name[c->kind], op_name[c->op],
                       c->off, c->val, WIFSIGNALED(st) ? " (signal)" : "");
            }
            slots[j].pid = 0;
            done++;
        }
    }
    unlink(fifo);
    printf("%s: %zu cases of %zu (sizes:", label, n_run, n_cases);
    for (int k = 0; k < N_KINDS; k++) printf(" %s %zu", kind_name[k], sizes[k]);
    printf(")\n%s:", label);
    for (int o = 0; o < N_OUTCOMES; o++) printf(" %s %zu", outcome_name[o], count[o]);
    printf("\n");
    const size_t bad = count[O_CORRUPT] + count[O_EXCEPTION] + count[O_ABORT] + count[O_SIGNAL] + count[O_HANG] +
                       count[O_SETUP];
    llama_model_free(model);
    return require_clean && bad ? 1 : 0;
}
