/* Bad input on a recurrent memory through the public header: NULL handles and pointers,
 * out-of-range sequence ids on every llama.h function, bad constructor parameters, truncated
 * and corrupted state blobs, and ubatches that are not an equal split. Each case gets the
 * failure value (llama.h's where there is one: seq_rm false, pos_min/max -1), a last error,
 * and leaves the memory unchanged: every cell, head/used/n/rs_z, the per-sequence ranges, and
 * the whole state and every sequence state byte for byte (which hold every row a sequence
 * would read next, rollback planes included). */
#include <limits.h>
#include <stdlib.h>

#include "common.h"

#define RS_SIZE 5
#define RS_NSEQ 4
#define RS_NLAYER 3
#define ROW_R (24 * 4)
#define ROW_S (32 * 4)
#define ROW_P (8 * 4)
/* A one-cell sequence blob: header, cell_count, cell, s_trans, n_layer, R/PLE, S. */
#define OFF_COUNT 8
#define OFF_NSEQ 16
#define OFF_NLAYER 24
#define OFF_R0 28
#define OFF_R2 (OFF_R0 + 12 + ROW_R)
#define OFF_P2 (OFF_R2 + 12 + ROW_R)
#define OFF_S0 (OFF_P2 + 8 + ROW_P)
#define OFF_S2 (OFF_S0 + 12 + ROW_S)
#define SEQ_BLOB_SIZE (OFF_S2 + 12 + ROW_S)

#define EXPECT_ERR(code)                                            \
    do {                                                            \
        CHECK(llama_memory_last_error_code() == (code));            \
        CHECK(llama_memory_last_error() != NULL);                   \
        CHECK(llama_memory_last_error()[0] != '\0');                \
        llama_memory_clear_last_error();                            \
    } while (0)

static llama_memory_t make(uint32_t n_rs_seq) {
    struct llama_memory_rs_params p = llama_memory_rs_default_params();
    struct llama_memory_rs_layer layers[2];
    memset(layers, 0, sizeof(layers));
    layers[0].il = 0;
    layers[1].il = 2;
    layers[0].n_embd_r = layers[1].n_embd_r = 24;
    layers[0].n_embd_s = layers[1].n_embd_s = 32;
    layers[1].n_embd_p = 8;
    p.size = RS_SIZE;
    p.n_seq_max = RS_NSEQ;
    p.n_rs_seq = n_rs_seq;
    p.n_layer = RS_NLAYER;
    p.layers = layers;
    p.n_layers = 2;
    return llama_memory_rs_init(p);
}

/* An equal-split ubatch: set k is sequence seq[k] at positions p0[k] .., n tokens each. */
struct rs_ubatch {
    llama_token tok[32];
    llama_pos pos[32];
    int32_t n_seq_id[32];
    llama_seq_id ids[32];
    const llama_seq_id *ptr[32];
    llama_seq_id unq[8];
    llama_memory_ubatch ub;
};

static void rs_ubatch_init(struct rs_ubatch *u, const llama_seq_id *seq, const llama_pos *p0,
                           int n_sets, int n) {
    int s, k, i = 0, n_unq = 0;
    memset(u, 0, sizeof(*u));
    for (s = 0; s < n_sets; ++s) {
        int j, dup = 0;
        for (k = 0; k < n; ++k, ++i) {
            u->tok[i] = 7;
            u->pos[i] = p0[s] + k;
            u->n_seq_id[i] = 1;
            u->ids[i] = seq[s];
            u->ptr[i] = &u->ids[i];
        }
        for (j = 0; j < n_unq; ++j) {
            dup |= u->unq[j] == seq[s];
        }
        if (!dup) {
            /* insertion into the ascending list */
            for (j = n_unq; j > 0 && u->unq[j - 1] > seq[s]; --j) {
                u->unq[j] = u->unq[j - 1];
            }
            u->unq[j] = seq[s];
            ++n_unq;
        }
    }
    u->ub.n_tokens = (uint32_t) i;
    u->ub.n_seq_tokens = (uint32_t) n;
    u->ub.n_seqs = (uint32_t) n_sets;
    u->ub.n_seqs_unq = (uint32_t) n_unq;
    u->ub.n_pos = 1;
    u->ub.equal_seqs = 1;
    u->ub.token = u->tok;
    u->ub.pos = u->pos;
    u->ub.n_seq_id = u->n_seq_id;
    u->ub.seq_id = u->ptr;
    u->ub.seq_id_unq = u->unq;
}

static int rs_place(llama_memory_t mem, const llama_seq_id *seq, const llama_pos *p0, int n_sets,
                    int n) {
    struct rs_ubatch u;
    llama_memory_ctx_t ctx;
    int rc = 1;
    rs_ubatch_init(&u, seq, p0, n_sets, n);
    ctx = llama_memory_init_batch(mem, &u.ub, 1);
    if (ctx && llama_memory_ctx_get_status(ctx) == LLAMA_MEMORY_CTX_SUCCESS &&
        llama_memory_ctx_apply(ctx) == LLAMA_MEMORY_OK) {
        rc = 0;
    }
    llama_memory_ctx_free(ctx);
    return rc;
}

/* Everything observable through the header. */
struct rs_snap {
    struct llama_memory_rs_info info;
    struct llama_memory_rs_cell cell[RS_SIZE];
    llama_seq_id seqs[RS_SIZE][RS_NSEQ];
    llama_pos pmin[RS_NSEQ], pmax[RS_NSEQ];
    size_t n_state, n_blob[RS_NSEQ];
    uint8_t state[4096];
    uint8_t blob[RS_NSEQ][1024];
};

static int rs_snap_take(llama_memory_t mem, struct rs_snap *s) {
    uint32_t i;
    int q;
    memset(s, 0, sizeof(*s));
    CHECK(llama_memory_rs_get_info(mem, &s->info) == LLAMA_MEMORY_OK);
    CHECK(s->info.size == RS_SIZE);
    for (i = 0; i < RS_SIZE; ++i) {
        CHECK(llama_memory_rs_get_cell(mem, i, &s->cell[i], s->seqs[i], RS_NSEQ) ==
              LLAMA_MEMORY_OK);
    }
    for (q = 0; q < RS_NSEQ; ++q) {
        s->pmin[q] = llama_memory_seq_pos_min(mem, q);
        s->pmax[q] = llama_memory_seq_pos_max(mem, q);
        s->n_blob[q] = llama_memory_state_seq_get_size(mem, q);
        CHECK(s->n_blob[q] > 0 && s->n_blob[q] <= sizeof(s->blob[q]));
        CHECK(llama_memory_state_seq_get_data(mem, s->blob[q], s->n_blob[q], q) == s->n_blob[q]);
    }
    s->n_state = llama_memory_state_get_size(mem);
    CHECK(s->n_state > 0 && s->n_state <= sizeof(s->state));
    CHECK(llama_memory_state_get_data(mem, s->state, s->n_state) == s->n_state);
    return 0;
}

static struct rs_snap snap_before, snap_after;

#define SNAP_BEFORE(mem) CHECK(rs_snap_take((mem), &snap_before) == 0)
#define EXPECT_UNCHANGED(mem)                                                  \
    do {                                                                       \
        CHECK(rs_snap_take((mem), &snap_after) == 0);                          \
        CHECK(memcmp(&snap_before, &snap_after, sizeof(snap_before)) == 0);    \
    } while (0)

/* Recognisable bytes in every row of a one-cell sequence blob. */
static void fill_rows(uint8_t *b, int seed) {
    const size_t starts[5] = {OFF_R0 + 12, OFF_R2 + 12, OFF_P2 + 8, OFF_S0 + 12, OFF_S2 + 12};
    const size_t lens[5] = {ROW_R, ROW_R, ROW_P, ROW_S, ROW_S};
    size_t k, i;
    for (k = 0; k < 5; ++k) {
        for (i = 0; i < lens[k]; ++i) {
            b[starts[k] + i] = (uint8_t) (i * 31 + k * 7 + (size_t) seed * 57 + 1);
        }
    }
}

/* seq 0 and 2 at 0..4, seq 1 at 0..3 through equal-split ubatches, nonzero rows, seq 3 sharing
 * seq 1's cell, and (with rollback planes) seq 0 rolled back one token. */
static llama_memory_t populated(uint32_t n_rs_seq) {
    const llama_seq_id a[2] = {0, 2}, b[1] = {1}, c[2] = {2, 0};
    const llama_pos a0[2] = {0, 0}, b0[1] = {0}, c0[2] = {3, 3};
    uint8_t blob[SEQ_BLOB_SIZE];
    llama_memory_t mem = make(n_rs_seq);
    int q;
    if (!mem || rs_place(mem, a, a0, 2, 3) || rs_place(mem, b, b0, 1, 4) ||
        rs_place(mem, c, c0, 2, 2)) {
        llama_memory_free(mem);
        return NULL;
    }
    for (q = 0; q < 3; ++q) {
        if (llama_memory_state_seq_get_size(mem, q) != SEQ_BLOB_SIZE ||
            llama_memory_state_seq_get_data(mem, blob, SEQ_BLOB_SIZE, q) != SEQ_BLOB_SIZE) {
            llama_memory_free(mem);
            return NULL;
        }
        fill_rows(blob, q);
        if (llama_memory_state_seq_set_data(mem, blob, SEQ_BLOB_SIZE, q) != SEQ_BLOB_SIZE) {
            llama_memory_free(mem);
            return NULL;
        }
    }
    llama_memory_seq_cp(mem, 1, 3, -1, -1);
    if (n_rs_seq > 0 && !llama_memory_seq_rm(mem, 0, 4, -1)) {
        llama_memory_free(mem);
        return NULL;
    }
    return mem;
}

static int null_handles_and_pointers(void) {
    llama_memory_t mem = populated(2);
    struct llama_memory_rs_info info;
    struct llama_memory_rs_cell cell;
    llama_seq_id ids[4];
    struct llama_memory_rs_params p = llama_memory_rs_default_params();
    struct ggml_backend_buffer_type *bt[2];
    size_t sz[2];
    int32_t s_copy[8];
    uint8_t buf[16];
    CHECK(mem != NULL);
    SNAP_BEFORE(mem);

    CHECK(llama_memory_rs_get_info(NULL, &info) == LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    CHECK(llama_memory_rs_get_info(mem, NULL) == LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    CHECK(llama_memory_rs_get_cell(NULL, 0, &cell, ids, 4) == LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    CHECK(llama_memory_rs_get_cell(mem, 0, NULL, ids, 4) == LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    /* cell 0 holds a sequence: its ids need a buffer */
    CHECK(llama_memory_rs_get_cell(mem, 0, &cell, NULL, 4) == LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    CHECK(llama_memory_rs_get_cell(mem, RS_SIZE, &cell, ids, 4) ==
          LLAMA_MEMORY_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_ARGUMENT);
    CHECK(llama_memory_rs_get_cell(mem, UINT32_MAX, &cell, ids, 4) ==
          LLAMA_MEMORY_ERR_INVALID_ARGUMENT);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_ARGUMENT);

    CHECK(llama_memory_rs_get_r_tensor(NULL, 0) == NULL);
    EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    CHECK(llama_memory_rs_get_s_tensor(NULL, 0) == NULL);
    EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    CHECK(llama_memory_rs_get_p_tensor(NULL, 2) == NULL);
    EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    CHECK(llama_memory_rs_get_r_tensor(mem, 0) != NULL && llama_memory_rs_get_p_tensor(mem, 2));
    CHECK(llama_memory_rs_get_r_tensor(mem, 1) == NULL); /* a layer without tensors */
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_ARGUMENT);
    CHECK(llama_memory_rs_get_s_tensor(mem, 3) == NULL);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_ARGUMENT);
    CHECK(llama_memory_rs_get_p_tensor(mem, 0) == NULL); /* no PLE row in layer 0 */
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_ARGUMENT);
    CHECK(llama_memory_get_breakdown(NULL, bt, sz, 2) == 0);
    EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    CHECK(llama_memory_get_breakdown(mem, NULL, NULL, 2) == 0);
    EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    CHECK(llama_memory_get_breakdown(mem, NULL, NULL, 0) == 1);

    /* context functions */
    CHECK(llama_memory_ctx_get_n_rs(NULL) == 0);
    EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    CHECK(llama_memory_ctx_get_rs_head(NULL) == 0);
    EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    CHECK(llama_memory_ctx_get_rs_z(NULL) == -1);
    EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    CHECK(llama_memory_ctx_set_input_s_copy(NULL, s_copy, 8) == LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    CHECK(llama_memory_ctx_set_input_s_copy_tensor(NULL, NULL) != LLAMA_MEMORY_OK);
    llama_memory_clear_last_error();
    {
        const llama_seq_id s1[1] = {1};
        const llama_pos p1[1] = {4};
        struct rs_ubatch u;
        llama_memory_ctx_t ctx;
        rs_ubatch_init(&u, s1, p1, 1, 1);
        ctx = llama_memory_init_batch(mem, &u.ub, 1);
        CHECK(ctx != NULL && llama_memory_ctx_get_status(ctx) == LLAMA_MEMORY_CTX_SUCCESS);
        /* planning puts the cells back but, as upstream's prepare, keeps the n and rs_z of
         * its search: compare from here */
        SNAP_BEFORE(mem);
        CHECK(llama_memory_ctx_set_input_s_copy(ctx, NULL, 8) == LLAMA_MEMORY_ERR_NULL_ARGUMENT);
        EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);
        CHECK(llama_memory_ctx_set_input_s_copy_tensor(ctx, NULL) != LLAMA_MEMORY_OK);
        llama_memory_clear_last_error();
        llama_memory_ctx_free(ctx);
    }

    /* state functions */
    CHECK(llama_memory_state_get_size(NULL) == 0);
    EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    CHECK(llama_memory_state_get_data(mem, NULL, 16) == 0);
    EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    CHECK(llama_memory_state_get_data(mem, buf, sizeof(buf)) == 0);
    EXPECT_ERR(LLAMA_MEMORY_ERR_BUFFER_TOO_SMALL);
    CHECK(llama_memory_state_set_data(NULL, buf, sizeof(buf)) == 0);
    EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    CHECK(llama_memory_state_set_data(mem, NULL, 16) == 0);
    EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    CHECK(llama_memory_state_seq_get_size(NULL, 0) == 0);
    EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    CHECK(llama_memory_state_seq_get_data(mem, NULL, 16, 0) == 0);
    EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    CHECK(llama_memory_state_seq_set_data(mem, NULL, 16, 0) == 0);
    EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    CHECK(llama_memory_state_seq_set_data_ext(NULL, buf, 16, 0, 0) == 0);
    EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);

    /* llama.h functions on a NULL handle */
    llama_memory_clear(NULL, true);
    EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    CHECK(llama_memory_seq_pos_min(NULL, 0) == -1);
    EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    CHECK(llama_memory_seq_pos_max(NULL, 0) == -1);
    EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    llama_memory_seq_keep(NULL, 0);
    EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    CHECK(llama_memory_init_batch(mem, NULL, 1) == NULL);
    EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);

    /* a NULL layer list with layers claimed */
    p.n_seq_max = 2;
    p.n_layer = 2;
    p.n_layers = 2;
    CHECK(llama_memory_rs_init(p) == NULL);
    EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);

    EXPECT_UNCHANGED(mem);
    llama_memory_free(mem);
    return 0;
}

static int out_of_range_seq_ids(void) {
    const llama_seq_id bad[7] = {-1, -2, RS_NSEQ, RS_NSEQ + 1, 255, 256, INT_MAX};
    llama_memory_t mem = populated(2);
    int k;
    CHECK(mem != NULL);
    SNAP_BEFORE(mem);
    for (k = 0; k < 7; ++k) {
        llama_seq_id s = bad[k];
        /* seq_rm: false (llama.cpp's recurrent memory also fails seq_rm(-1)) */
        CHECK(!llama_memory_seq_rm(mem, s, -1, -1));
        EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_SEQ_ID);
        CHECK(!llama_memory_seq_rm(mem, s, 2, -1));
        EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_SEQ_ID);
        llama_memory_seq_cp(mem, s, 1, -1, -1);
        EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_SEQ_ID);
        llama_memory_seq_cp(mem, 1, s, -1, -1);
        EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_SEQ_ID);
        llama_memory_seq_keep(mem, s);
        EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_SEQ_ID);
        llama_memory_seq_add(mem, s, 0, -1, 3);
        EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_SEQ_ID);
        llama_memory_seq_div(mem, s, 0, -1, 2);
        EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_SEQ_ID);
        CHECK(llama_memory_seq_pos_min(mem, s) == -1);
        EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_SEQ_ID);
        CHECK(llama_memory_seq_pos_max(mem, s) == -1);
        EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_SEQ_ID);
        if (s != -1) {
            CHECK(llama_memory_state_seq_get_size(mem, s) == 0);
            EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_SEQ_ID);
        }
    }
    /* seq_div by zero or a negative divisor (llama.cpp divides by it) */
    llama_memory_seq_div(mem, 0, 0, -1, 0);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_ARGUMENT);
    llama_memory_seq_div(mem, 0, 0, -1, -3);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_ARGUMENT);
    /* a suffix removal without a free rollback plane: false, nothing changes */
    CHECK(!llama_memory_seq_rm(mem, 0, 2, -1)); /* seq 0 has a pending rollback */
    CHECK(!llama_memory_seq_rm(mem, 2, 1, -1)); /* 3 tokens back > 2 planes */
    EXPECT_UNCHANGED(mem);
    llama_memory_free(mem);
    return 0;
}

static int expect_init_fails(struct llama_memory_rs_params p, llama_memory_result code) {
    llama_memory_t m = llama_memory_rs_init(p);
    if (m != NULL) {
        llama_memory_free(m);
    }
    CHECK(m == NULL);
    EXPECT_ERR(code);
    return 0;
}

static int bad_constructor_params(void) {
    struct llama_memory_rs_layer layers[3];
    struct llama_memory_rs_params p, d = llama_memory_rs_default_params();
    llama_memory_t m;
    int k;
    memset(layers, 0, sizeof(layers));
    for (k = 0; k < 3; ++k) {
        layers[k].il = (uint32_t) k;
        layers[k].n_embd_r = 16;
        layers[k].n_embd_s = 16;
    }
    d.size = 4;
    d.n_seq_max = 4;
    d.n_layer = 3;
    d.layers = layers;
    d.n_layers = 3;
    m = llama_memory_rs_init(d);
    CHECK(m != NULL); /* the base is valid */
    llama_memory_free(m);

    p = d;
    p.size = 3; /* size < n_seq_max */
    CHECK(expect_init_fails(p, LLAMA_MEMORY_ERR_INVALID_ARGUMENT) == 0);
    p = d;
    p.n_seq_max = 0;
    CHECK(expect_init_fails(p, LLAMA_MEMORY_ERR_INVALID_ARGUMENT) == 0);
    p.size = 0; /* 0: max(1, n_seq_max), still n_seq_max 0 */
    CHECK(expect_init_fails(p, LLAMA_MEMORY_ERR_INVALID_ARGUMENT) == 0);
    p = d;
    p.n_seq_max = 257;
    p.size = 257;
    CHECK(expect_init_fails(p, LLAMA_MEMORY_ERR_INVALID_ARGUMENT) == 0);
    p.size = 0;
    CHECK(expect_init_fails(p, LLAMA_MEMORY_ERR_INVALID_ARGUMENT) == 0);
    p = d;
    p.size = 257;
    CHECK(expect_init_fails(p, LLAMA_MEMORY_ERR_INVALID_ARGUMENT) == 0);
    p = d;
    p.n_rs_seq = UINT32_MAX; /* more rows than an i32 s_copy can index */
    CHECK(expect_init_fails(p, LLAMA_MEMORY_ERR_INVALID_ARGUMENT) == 0);
    /* ggml types: invalid, unknown, and not a state type (Q4_K) */
    {
        const int32_t types[4] = {-1, 39, 1000, 12};
        for (k = 0; k < 4; ++k) {
            p = d;
            p.type_r = types[k];
            CHECK(expect_init_fails(p, LLAMA_MEMORY_ERR_INVALID_ARGUMENT) == 0);
            p = d;
            p.type_s = types[k];
            CHECK(expect_init_fails(p, LLAMA_MEMORY_ERR_INVALID_ARGUMENT) == 0);
        }
    }
    /* layers: descending, repeated, at or beyond n_layer */
    p = d;
    layers[0].il = 2;
    layers[2].il = 0;
    CHECK(expect_init_fails(p, LLAMA_MEMORY_ERR_INVALID_ARGUMENT) == 0);
    layers[0].il = 0;
    layers[2].il = 1;
    CHECK(expect_init_fails(p, LLAMA_MEMORY_ERR_INVALID_ARGUMENT) == 0);
    layers[2].il = 3;
    CHECK(expect_init_fails(p, LLAMA_MEMORY_ERR_INVALID_ARGUMENT) == 0);
    layers[2].il = 2;
    p.n_layer = 2;
    CHECK(expect_init_fails(p, LLAMA_MEMORY_ERR_INVALID_ARGUMENT) == 0);
    return 0;
}

static int bad_state_blobs(void) {
    llama_memory_t mem = populated(2), other = populated(2);
    uint8_t blob[SEQ_BLOB_SIZE], bad[SEQ_BLOB_SIZE + 8], *whole;
    size_t n, nw, len;
    int dest;
    CHECK(mem != NULL && other != NULL);
    n = llama_memory_state_seq_get_size(mem, 2);
    CHECK(n == SEQ_BLOB_SIZE);
    CHECK(llama_memory_state_seq_get_data(mem, blob, n, 2) == n);
    nw = llama_memory_state_get_size(mem);
    whole = malloc(nw);
    CHECK(whole != NULL);
    CHECK(llama_memory_state_get_data(mem, whole, nw) == nw);
    SNAP_BEFORE(mem);

    /* truncated, into every destination */
    for (len = 0; len < n; len += 5) {
        for (dest = -1; dest < RS_NSEQ; ++dest) {
            CHECK(llama_memory_state_seq_set_data(mem, blob, len, dest) == 0);
            EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_STATE);
        }
    }
    for (len = 0; len < nw; len += 3) {
        CHECK(llama_memory_state_set_data(mem, whole, len) == 0);
        EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_STATE);
    }
    /* corrupted fields */
    {
        struct {
            size_t off;
            uint32_t v;
        } edits[] = {
            {0, 0x67677371u},          /* magic */
            {OFF_COUNT, 2},            /* two cells in a sequence state */
            {OFF_COUNT, RS_SIZE + 1},  /* more cells than the memory */
            {OFF_COUNT, UINT32_MAX},
            {OFF_NSEQ, 1},             /* sequence ids in a sequence state */
            {OFF_NLAYER - 4, 1},       /* s_trans */
            {OFF_NLAYER, 2},           /* n_layer */
            {OFF_R0, 1},               /* R type F16 */
            {OFF_R2 + 4, ROW_R + 4},   /* R row size */
            {OFF_P2, ROW_P * 2},       /* PLE row size */
            {OFF_S0, 8},               /* S type Q8_0 */
            {OFF_S2 + 4, ROW_S - 4},   /* S row size */
        };
        size_t k;
        for (k = 0; k < sizeof(edits) / sizeof(edits[0]); ++k) {
            memcpy(bad, blob, n);
            memcpy(bad + edits[k].off, &edits[k].v, 4);
            for (dest = -1; dest < RS_NSEQ; ++dest) {
                CHECK(llama_memory_state_seq_set_data(mem, bad, n, dest) == 0);
                EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_STATE);
            }
        }
    }
    /* a whole state whose first cell claims an out-of-range and then a taken sequence */
    {
        uint8_t *w2 = malloc(nw);
        uint32_t v = RS_NSEQ;
        CHECK(w2 != NULL);
        memcpy(w2, whole, nw);
        memcpy(w2 + 12, &v, 4); /* cell_count, pos, n_seq_id, seq_id[0] */
        CHECK(llama_memory_state_set_data(mem, w2, nw) == 0);
        EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_STATE);
        v = (uint32_t) -1;
        memcpy(w2 + 12, &v, 4);
        CHECK(llama_memory_state_set_data(mem, w2, nw) == 0);
        EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_STATE);
        v = 1; /* seq 1 also has the shared cell */
        memcpy(w2 + 12, &v, 4);
        CHECK(llama_memory_state_set_data(mem, w2, nw) == 0);
        EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_STATE);
        free(w2);
    }
    /* invalid destinations, unknown flags */
    CHECK(llama_memory_state_seq_set_data(mem, blob, n, RS_NSEQ) == 0);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_SEQ_ID);
    CHECK(llama_memory_state_seq_set_data(mem, blob, n, -2) == 0);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_SEQ_ID);
    CHECK(llama_memory_state_seq_set_data_ext(mem, blob, n, 1, 4) == 0);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_ARGUMENT);
    /* ON_DEVICE: saved on another handle, so this one has no tensor data for it */
    {
        size_t nd = llama_memory_state_seq_get_size_ext(other, 2, LLAMA_MEMORY_STATE_SEQ_FLAGS_ON_DEVICE);
        CHECK(nd > 0 && nd < n);
        CHECK(llama_memory_state_seq_get_data_ext(other, bad, nd, 2,
                                                  LLAMA_MEMORY_STATE_SEQ_FLAGS_ON_DEVICE) == nd);
        CHECK(llama_memory_state_seq_set_data_ext(mem, bad, nd, 1,
                                                  LLAMA_MEMORY_STATE_SEQ_FLAGS_ON_DEVICE) == 0);
        EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_STATE);
        /* and a metadata-only blob read as a host one */
        CHECK(llama_memory_state_seq_set_data(mem, bad, nd, 1) == 0);
        EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_STATE);
    }
    EXPECT_UNCHANGED(mem);

    /* the good blob still restores, and trailing bytes are not counted */
    memcpy(bad, blob, n);
    memset(bad + n, 0xee, 8);
    CHECK(llama_memory_state_seq_set_data(mem, bad, n + 8, 1) == n);
    CHECK(llama_memory_seq_pos_max(mem, 1) == 4);
    free(whole);
    llama_memory_free(mem);
    llama_memory_free(other);
    return 0;
}

static int bad_ubatches(void) {
    llama_memory_t mem = populated(2);
    struct rs_ubatch u;
    const llama_seq_id two[2] = {0, 1};
    const llama_seq_id same[2] = {1, 1};
    const llama_pos p0[2] = {5, 5};
    const llama_seq_id both[2] = {0, 1};
    CHECK(mem != NULL);
    SNAP_BEFORE(mem);

    /* not an equal split (llama.cpp asserts) */
    rs_ubatch_init(&u, two, p0, 2, 2);
    u.ub.equal_seqs = 0;
    CHECK(llama_memory_init_batch(mem, &u.ub, 1) == NULL);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_UBATCH);
    /* a simple split's shape with equal_seqs claimed: the tokens of a set differ */
    rs_ubatch_init(&u, two, p0, 2, 2);
    u.ub.n_seq_tokens = 4;
    u.ub.n_seqs = 1;
    CHECK(llama_memory_init_batch(mem, &u.ub, 1) == NULL);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_UBATCH);
    /* one sequence in two sets (llama.cpp aborts) */
    rs_ubatch_init(&u, same, p0, 2, 2);
    CHECK(llama_memory_init_batch(mem, &u.ub, 1) == NULL);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_UBATCH);
    /* a set {0, 1} and a set {1}: sequence 1 in two sets */
    rs_ubatch_init(&u, two, p0, 2, 1);
    u.n_seq_id[0] = 2;
    u.ptr[0] = both;
    CHECK(llama_memory_init_batch(mem, &u.ub, 1) == NULL);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_UBATCH);
    /* counts that do not multiply */
    rs_ubatch_init(&u, two, p0, 2, 2);
    u.ub.n_seq_tokens = 3;
    CHECK(llama_memory_init_batch(mem, &u.ub, 1) == NULL);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_UBATCH);
    /* an out-of-range sequence */
    rs_ubatch_init(&u, two, p0, 2, 2);
    u.ids[2] = u.ids[3] = RS_NSEQ;
    u.unq[1] = RS_NSEQ;
    CHECK(llama_memory_init_batch(mem, &u.ub, 1) == NULL);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_SEQ_ID);
    /* NULL arrays */
    rs_ubatch_init(&u, two, p0, 2, 2);
    u.ub.seq_id = NULL;
    CHECK(llama_memory_init_batch(mem, &u.ub, 1) == NULL);
    EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    /* a placed ubatch whose s_copy buffer is too small: the pending rollback stays */
    {
        llama_memory_ctx_t ctx;
        int32_t s_copy[1];
        EXPECT_UNCHANGED(mem);
        rs_ubatch_init(&u, two, p0, 2, 2);
        ctx = llama_memory_init_batch(mem, &u.ub, 1);
        CHECK(ctx != NULL && llama_memory_ctx_get_status(ctx) == LLAMA_MEMORY_CTX_SUCCESS);
        CHECK(llama_memory_ctx_apply(ctx) == LLAMA_MEMORY_OK);
        CHECK(llama_memory_ctx_get_n_rs(ctx) >= 2);
        SNAP_BEFORE(mem);
        CHECK(llama_memory_ctx_set_input_s_copy(ctx, s_copy, 1) ==
              LLAMA_MEMORY_ERR_BUFFER_TOO_SMALL);
        EXPECT_ERR(LLAMA_MEMORY_ERR_BUFFER_TOO_SMALL);
        llama_memory_ctx_free(ctx);
        EXPECT_UNCHANGED(mem);
    }
    llama_memory_free(mem);
    return 0;
}

int main(void) {
    if (null_handles_and_pointers() || out_of_range_seq_ids() || bad_constructor_params() ||
        bad_state_blobs() || bad_ubatches()) {
        return 1;
    }
    printf("test_recurrent_bad_input: ok\n");
    return 0;
}
