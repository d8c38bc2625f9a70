/* The composite memories from the public header: a sliding-window pair
 * (llama_memory_iswa_init), a hybrid (llama_memory_hybrid_init over a KV cache) and a hybrid
 * with a pair, each made of memories of the leaf constructors.
 *
 * On each, thousands of random steps (placements, removals, copies, restores):
 * - llama_memory_can_seq_rm says what llama_memory_seq_rm then returns, and changes nothing;
 * - a removal that fails (a hybrid's recurrent part cannot roll back) leaves the whole state
 *   byte-identical;
 * - a restore from a damaged state fails and leaves the whole state byte-identical: every
 *   truncation of a valid sequence state, and a valid first part followed by a second part
 *   whose cell count is corrupt (the case llama.cpp restores half of);
 * - the context's parts (llama_memory_ctx_get_part) give each part's inputs, and are refused
 *   by llama_memory_ctx_free.
 * The ownership rules of the constructors are checked too: a refused composition leaves both
 * parts to the caller. */
#include <stdlib.h>
#include <string.h>

#include "common.h"

#define N_SEQ 3
#define GQA 16
#define BLOB_MAX (1 << 18)

static uint32_t rng = 777;

static uint32_t next_u32(void) {
    rng = rng * 1664525u + 1013904223u;
    return rng >> 8;
}

static llama_memory_t make_kv(uint32_t size, const uint32_t *ils, int n, uint32_t n_swa) {
    struct llama_memory_kv_params p = llama_memory_kv_default_params();
    struct llama_memory_kv_storage_params sp = llama_memory_kv_storage_default_params();
    struct llama_memory_kv_layer layers[4];
    int i;
    memset(layers, 0, sizeof(layers));
    for (i = 0; i < n; ++i) {
        layers[i].il = ils[i];
        layers[i].n_embd_k_gqa = GQA;
        layers[i].n_embd_v_gqa = GQA;
        layers[i].reuse = -1;
    }
    p.size = size;
    p.n_seq_max = N_SEQ;
    p.unified = true;
    if (n_swa > 0) {
        p.n_swa = n_swa;
        p.swa_type = LLAMA_MEMORY_SWA_TYPE_STANDARD;
    }
    sp.layers = layers;
    sp.n_layers = (size_t) n;
    return llama_memory_kv_init_with_storage(p, &sp);
}

static llama_memory_t make_rs(void) {
    struct llama_memory_rs_params p = llama_memory_rs_default_params();
    struct llama_memory_rs_layer layers[2];
    memset(layers, 0, sizeof(layers));
    layers[0].il = 4;
    layers[1].il = 5;
    layers[0].n_embd_r = layers[1].n_embd_r = 8;
    layers[0].n_embd_s = layers[1].n_embd_s = 16;
    p.n_seq_max = N_SEQ;
    p.n_rs_seq = 1;
    p.n_layer = 6;
    p.layers = layers;
    p.n_layers = 2;
    return llama_memory_rs_init(p);
}

static llama_memory_t make_pair(void) {
    static const uint32_t base_il[] = {0, 2}, swa_il[] = {1, 3};
    const uint32_t n_swa = 8;
    const uint32_t swa_cells = llama_memory_iswa_swa_size(512, n_swa, true, N_SEQ, 8, false);
    llama_memory_t base = make_kv(512, base_il, 2, 0);
    llama_memory_t swa = make_kv(swa_cells, swa_il, 2, n_swa);
    llama_memory_t m;
    if (!base || !swa || swa_cells != 256) {
        return NULL;
    }
    /* halves that share a layer are refused (a layer's tensors must be in one part) */
    {
        llama_memory_t dup = make_kv(swa_cells, base_il, 2, n_swa);
        if (!dup || llama_memory_iswa_init(base, dup) != NULL) {
            return NULL;
        }
        llama_memory_free(dup);
    }
    /* the halves the wrong way round are refused, and stay the caller's */
    if (llama_memory_iswa_init(swa, base) != NULL || llama_memory_kv_size(base) != 512) {
        return NULL;
    }
    m = llama_memory_iswa_init(base, swa);
    /* the halves' handles are now views of the pair's halves: borrowed, not freeable */
    if (!m || llama_memory_kv_size(base) != 512 || llama_memory_kv_size(swa) != 256) {
        return NULL;
    }
    llama_memory_clear_last_error();
    llama_memory_free(base);
    if (llama_memory_last_error() == NULL || llama_memory_kv_size(base) != 512) {
        return NULL;
    }
    /* and cannot go into another composite */
    if (llama_memory_iswa_init(base, swa) != NULL) {
        return NULL;
    }
    return m;
}

static llama_memory_t make_hybrid(int pair) {
    static const uint32_t attn_il[] = {1, 3};
    llama_memory_t attn = pair ? make_pair() : make_kv(256, attn_il, 2, 0);
    llama_memory_t recr = make_rs();
    if (!attn || !recr) {
        return NULL;
    }
    /* two recurrent memories make no hybrid: refused, both still the caller's */
    {
        llama_memory_t other = make_rs();
        if (llama_memory_hybrid_init(other, recr) != NULL || llama_memory_n_seq_max(other) != N_SEQ) {
            return NULL;
        }
        llama_memory_free(other);
    }
    return llama_memory_hybrid_init(attn, recr);
}

/* n tokens of seq from p0, as one equal-split ubatch (one sequence set) */
static int place(llama_memory_t mem, llama_seq_id seq, llama_pos p0, int n) {
    struct test_ubatch t;
    test_ubatch_init(&t, seq, p0, n);
    t.ub.n_seq_tokens = (uint32_t) n;
    t.ub.n_seqs = 1;
    t.ub.equal_seqs = 1;
    return test_apply(mem, &t.ub);
}

static uint8_t blob_a[BLOB_MAX], blob_b[BLOB_MAX], seq_blob[BLOB_MAX], bad[BLOB_MAX];

static size_t whole(llama_memory_t mem, uint8_t *out) {
    return llama_memory_state_get_data(mem, out, BLOB_MAX);
}

static int unchanged(llama_memory_t mem, size_t n_before) {
    const size_t n = whole(mem, blob_b);
    return n == n_before && memcmp(blob_a, blob_b, n) == 0;
}

struct counts {
    int rm_true, rm_false, restores, bad_truncated, bad_second_part, cp, on_device;
};

static uint8_t od_blob[BLOB_MAX], after_od[BLOB_MAX], packed[BLOB_MAX];

/* an ON_DEVICE save and restore (the tensor bytes stay with the handle, each part's its own)
 * must leave what the host blob leaves: both from the same packed whole state */
static int on_device_matches_host(llama_memory_t mem, llama_seq_id seq, llama_seq_id dst, size_t n_host) {
    const size_t n_packed = whole(mem, packed);
    size_t n_od, n_after;
    CHECK(llama_memory_state_set_data(mem, packed, n_packed) == n_packed);
    n_od = llama_memory_state_seq_get_data_ext(mem, od_blob, BLOB_MAX, seq, LLAMA_MEMORY_STATE_SEQ_FLAGS_ON_DEVICE);
    CHECK(n_od > 8 && n_od <= n_host);
    if (llama_memory_state_seq_set_data_ext(mem, od_blob, n_od, dst, LLAMA_MEMORY_STATE_SEQ_FLAGS_ON_DEVICE) != n_od) {
        /* no room: then the host blob has none either */
        CHECK(llama_memory_state_set_data(mem, packed, n_packed) == n_packed);
        CHECK(llama_memory_state_seq_set_data(mem, seq_blob, n_host, dst) == 0);
        CHECK(llama_memory_state_set_data(mem, packed, n_packed) == n_packed);
        return 0;
    }
    n_after = whole(mem, after_od);
    CHECK(llama_memory_state_set_data(mem, packed, n_packed) == n_packed);
    CHECK(llama_memory_state_seq_set_data(mem, seq_blob, n_host, dst) == n_host);
    CHECK(whole(mem, blob_b) == n_after && memcmp(blob_b, after_od, n_after) == 0);
    return 0;
}

/* copies only on the pair: a recurrent cell shared by sequences with different pending
 * rollbacks is a state llama.cpp aborts on (the recurrent tests cover it) */
static int run(llama_memory_t mem, int n_steps, int copies, struct counts *c) {
    int step;
    for (step = 0; step < n_steps; ++step) {
        const llama_seq_id seq = (llama_seq_id) (next_u32() % N_SEQ);
        const llama_pos pmax = llama_memory_seq_pos_max(mem, seq);
        const uint32_t op = next_u32() % 10;
        if (op < 4) {
            if (place(mem, seq, pmax + 1, 1 + (int) (next_u32() % 5)) != 0) {
                llama_memory_clear(mem, true);
            }
        } else if (op < 8) {
            const llama_pos p0 = (llama_pos) (next_u32() % (uint32_t) (pmax + 4)) - 1;
            const llama_pos p1 = next_u32() % 3 == 0 ? -1 : p0 + (llama_pos) (next_u32() % 6) - 1;
            size_t n0 = whole(mem, blob_a);
            int q = llama_memory_can_seq_rm(mem, seq, p0, p1), r;
            CHECK(n0 > 0 && unchanged(mem, n0));
            r = llama_memory_seq_rm(mem, seq, p0, p1);
            if (q != r) {
                fprintf(stderr, "step %d: seq %d [%d, %d): query %d, seq_rm %d\n", step, seq, p0, p1, q, r);
            }
            CHECK(q == r);
            if (r) {
                c->rm_true++;
            } else {
                c->rm_false++;
                CHECK(unchanged(mem, n0));
            }
        } else if (op == 8 && copies) {
            const llama_seq_id dst = (llama_seq_id) (next_u32() % N_SEQ);
            if (dst != seq) {
                llama_memory_seq_cp(mem, seq, dst, -1, -1);
                c->cp++;
            }
        } else if (op == 9) {
            /* save seq, then restore it into dst: whole, truncated, or with a corrupt second part */
            const llama_seq_id dst = (llama_seq_id) (next_u32() % N_SEQ);
            const size_t n = llama_memory_state_seq_get_data(mem, seq_blob, BLOB_MAX, seq);
            const size_t n_partial = llama_memory_state_seq_get_size_ext(mem, seq, 1);
            size_t n0;
            CHECK(n > 8 && n_partial > 8 && n_partial < n);
            n0 = whole(mem, blob_a);
            {
                /* every truncation fails and changes nothing */
                const size_t cut = 1 + next_u32() % (uint32_t) (n - 1);
                CHECK(llama_memory_state_seq_set_data(mem, seq_blob, cut, dst) == 0);
                CHECK(llama_memory_last_error() != NULL);
                CHECK(unchanged(mem, n0));
                c->bad_truncated++;
            }
            {
                /* the second part begins after the first: n - n_partial bytes after the
                 * 8-byte header; its first field is its cell count */
                const size_t at = 8 + (n - n_partial);
                const uint32_t huge = 0x7fffffffu;
                memcpy(bad, seq_blob, n);
                memcpy(bad + at, &huge, 4);
                CHECK(llama_memory_state_seq_set_data(mem, bad, n, dst) == 0);
                CHECK(unchanged(mem, n0));
                c->bad_second_part++;
            }
            if (next_u32() % 4 == 0) {
                CHECK(on_device_matches_host(mem, seq, dst, n) == 0);
                c->on_device++;
            } else if (llama_memory_state_seq_set_data(mem, seq_blob, n, dst) == n) {
                c->restores++;
            }
        }
    }
    return 0;
}

/* the context's parts: each gives its own n_kv / n_rs; a view cannot be freed or applied */
static int check_parts(llama_memory_t mem, int pair, int recurrent) {
    struct test_ubatch t;
    llama_memory_ctx_t ctx, a, b;
    test_ubatch_init(&t, 0, llama_memory_seq_pos_max(mem, 0) + 1, 1);
    t.ub.n_seq_tokens = 1;
    t.ub.n_seqs = 1;
    t.ub.equal_seqs = 1;
    ctx = llama_memory_init_batch(mem, &t.ub, 1);
    CHECK(ctx != NULL && llama_memory_ctx_get_status(ctx) == LLAMA_MEMORY_CTX_SUCCESS);
    CHECK(llama_memory_ctx_apply(ctx) == LLAMA_MEMORY_OK);
    if (recurrent) {
        a = llama_memory_ctx_get_part(ctx, LLAMA_MEMORY_PART_ATTN);
        b = llama_memory_ctx_get_part(ctx, LLAMA_MEMORY_PART_RECR);
        CHECK(a != NULL && b != NULL);
        CHECK(llama_memory_ctx_get_n_rs(b) >= 1);
        CHECK(llama_memory_ctx_get_part(ctx, LLAMA_MEMORY_PART_SWA) == NULL);
        if (pair) {
            llama_memory_ctx_t s = llama_memory_ctx_get_part(a, LLAMA_MEMORY_PART_SWA);
            CHECK(s != NULL && llama_memory_ctx_get_n_kv(s) > 0);
        } else {
            CHECK(llama_memory_ctx_get_n_kv(a) > 0);
        }
    } else {
        a = llama_memory_ctx_get_part(ctx, LLAMA_MEMORY_PART_BASE);
        b = llama_memory_ctx_get_part(ctx, LLAMA_MEMORY_PART_SWA);
        CHECK(a != NULL && b != NULL && a != b);
        CHECK(llama_memory_ctx_get_n_kv(a) > 0 && llama_memory_ctx_get_n_kv(b) > 0);
        /* the same view each time */
        CHECK(llama_memory_ctx_get_part(ctx, LLAMA_MEMORY_PART_SWA) == b);
    }
    /* a view is borrowed: free and apply refuse it */
    llama_memory_clear_last_error();
    llama_memory_ctx_free(a);
    CHECK(llama_memory_last_error() != NULL);
    CHECK(llama_memory_ctx_apply(b) != LLAMA_MEMORY_OK);
    CHECK(llama_memory_ctx_get_status(a) == LLAMA_MEMORY_CTX_SUCCESS);
    llama_memory_ctx_free(ctx);
    return 0;
}

int main(void) {
    const char *names[3] = {"pair", "hybrid", "hybrid with a pair"};
    /* the sanitizer and valgrind runs take a short trace (tests/c_tests.rs) */
    const int quick = getenv("LLAMA_MEMORY_C_TEST_QUICK") != NULL;
    const int steps = quick ? 120 : 2000;
    const int at_least = quick ? 0 : 10;
    struct counts all;
    int kind;
    memset(&all, 0, sizeof(all));
    for (kind = 0; kind < 3; ++kind) {
        struct counts c;
        llama_memory_t mem = kind == 0 ? make_pair() : make_hybrid(kind == 2);
        memset(&c, 0, sizeof(c));
        CHECK(mem != NULL);
        CHECK(run(mem, steps, kind == 0, &c) == 0);
        CHECK(check_parts(mem, kind != 1, kind != 0) == 0);
        /* in stock-compatible mode too (each part reads its own stashed bytes) */
        CHECK(llama_memory_set_stock_compat(mem, true) == LLAMA_MEMORY_OK);
        {
            llama_seq_id s;
            for (s = 0; s < N_SEQ; ++s) {
                const size_t n = llama_memory_state_seq_get_data(mem, seq_blob, BLOB_MAX, s);
                CHECK(n > 8 && on_device_matches_host(mem, s, (s + 1) % N_SEQ, n) == 0);
            }
        }
        printf("%s: %d removals (%d refused), %d copies, %d restores, %d ON_DEVICE restores, %d "
               "truncated and %d second-part-corrupt states refused unchanged\n",
               names[kind], c.rm_true + c.rm_false, c.rm_false, c.cp, c.restores, c.on_device,
               c.bad_truncated, c.bad_second_part);
        CHECK(c.restores > at_least && c.bad_second_part > at_least && c.on_device > at_least);
        if (kind != 0) {
            CHECK(c.rm_false > at_least);
        }
        all.rm_true += c.rm_true;
        all.rm_false += c.rm_false;
        llama_memory_free(mem);
    }
    CHECK(quick || all.rm_true + all.rm_false > 2000);
    return 0;
}
