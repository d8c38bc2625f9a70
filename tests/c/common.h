/* Helpers shared by the C tests: a CHECK macro that reports and fails, and a ubatch builder. */
#ifndef LLAMA_MEMORY_TEST_COMMON_H
#define LLAMA_MEMORY_TEST_COMMON_H

#include <stdio.h>
#include <string.h>

#include "llama-memory.h"

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            const char *err_ = llama_memory_last_error();                            \
            fprintf(stderr, "%s:%d: CHECK failed: %s (last error: %s)\n", __FILE__, \
                    __LINE__, #cond, err_ ? err_ : "none");                          \
            return 1;                                                                \
        }                                                                            \
    } while (0)

#define MAX_TOKENS 64

/* Tokens of one sequence at consecutive positions, as llama.cpp's simple split produces. */
struct test_ubatch {
    llama_token tok[MAX_TOKENS];
    llama_pos pos[MAX_TOKENS];
    int32_t n_seq_id[MAX_TOKENS];
    llama_seq_id seq[MAX_TOKENS];
    const llama_seq_id *seq_ptr[MAX_TOKENS];
    llama_seq_id unq[1];
    llama_memory_ubatch ub;
};

static inline void test_ubatch_init(struct test_ubatch *t, llama_seq_id seq, llama_pos p0, int n) {
    int i;
    for (i = 0; i < n; ++i) {
        t->tok[i] = 100 + i;
        t->pos[i] = p0 + i;
        t->n_seq_id[i] = 1;
        t->seq[i] = seq;
        t->seq_ptr[i] = &t->seq[i];
    }
    t->unq[0] = seq;
    memset(&t->ub, 0, sizeof(t->ub));
    t->ub.n_tokens = (uint32_t) n;
    t->ub.n_seq_tokens = 1;
    t->ub.n_seqs = (uint32_t) n;
    t->ub.n_seqs_unq = 1;
    t->ub.n_pos = 1;
    t->ub.token = t->tok;
    t->ub.pos = t->pos;
    t->ub.n_seq_id = t->n_seq_id;
    t->ub.seq_id = t->seq_ptr;
    t->ub.seq_id_unq = t->unq;
}

/* Plans and applies one ubatch; returns 0 on success. */
static inline int test_apply(llama_memory_t mem, const llama_memory_ubatch *ub) {
    llama_memory_ctx_t ctx = llama_memory_init_batch(mem, ub, 1);
    int rc = 1;
    if (ctx && llama_memory_ctx_get_status(ctx) == LLAMA_MEMORY_CTX_SUCCESS &&
        llama_memory_ctx_apply(ctx) == LLAMA_MEMORY_OK) {
        rc = 0;
    }
    llama_memory_ctx_free(ctx);
    return rc;
}

/* Places n tokens of seq from p0 as one simple-split ubatch; returns 0 on success. */
static inline int test_place(llama_memory_t mem, llama_seq_id seq, llama_pos p0, int n) {
    struct test_ubatch t;
    test_ubatch_init(&t, seq, p0, n);
    return test_apply(mem, &t.ub);
}

/* Snapshot of every cell's position, shift and sequences, to show that a call changed nothing. */
struct test_snapshot {
    llama_pos pos[1024];
    llama_pos shift[1024];
    uint64_t seq[1024][4];
    uint32_t n;
};

static inline void test_snapshot_take(llama_memory_t mem, struct test_snapshot *s) {
    uint32_t st, c, k = 0;
    memset(s, 0, sizeof(*s));
    for (st = 0; st < llama_memory_kv_n_stream(mem); ++st) {
        for (c = 0; c < llama_memory_kv_size(mem) && k < 1024; ++c, ++k) {
            llama_memory_kv_get_cell(mem, st, c, &s->pos[k], &s->shift[k], s->seq[k]);
        }
    }
    s->n = k;
}

static inline int test_snapshot_equal(const struct test_snapshot *a, const struct test_snapshot *b) {
    return a->n == b->n && memcmp(a->pos, b->pos, sizeof(a->pos)) == 0 &&
           memcmp(a->shift, b->shift, sizeof(a->shift)) == 0 &&
           memcmp(a->seq, b->seq, sizeof(a->seq)) == 0;
}

#endif
