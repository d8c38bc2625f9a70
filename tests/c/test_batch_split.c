/* llama_memory_init_batch_split from the public header: a whole batch of several sequences
 * (interleaved, with a token shared by two sequences on the unified cache) handed to a KV cache
 * with one stream, one with a stream per sequence, a sliding-window pair and a hybrid; every
 * ubatch is walked with llama_memory_ctx_get_batch_idxs and applied. The splits must cover each
 * batch token exactly once, hold at most n_ubatch tokens (the equal split's sets in
 * increasing batch order within each sequence), and leave each sequence's positions in the
 * memory; a hybrid with every token an output splits by sequence (one sequence set per
 * ubatch). Invalid batches are refused with the last error set, changing nothing. The splits
 * themselves are compared with stock llama_batch_allocr in tests/composite_differential.rs. */
#include <stdlib.h>
#include <string.h>

#include "common.h"

#define N_SEQ 3
#define N_TOK 40

static llama_memory_t make_kv(int unified, uint32_t size, uint32_t n_swa, const uint32_t *ils, int n) {
    struct llama_memory_kv_params p = llama_memory_kv_default_params();
    struct llama_memory_kv_storage_params sp = llama_memory_kv_storage_default_params();
    struct llama_memory_kv_layer layers[2];
    int i;
    memset(layers, 0, sizeof(layers));
    for (i = 0; i < n; ++i) {
        layers[i].il = ils[i];
        layers[i].n_embd_k_gqa = 8;
        layers[i].n_embd_v_gqa = 8;
        layers[i].reuse = -1;
    }
    p.size = size;
    p.n_seq_max = N_SEQ;
    p.unified = unified != 0;
    if (n_swa) {
        p.n_swa = n_swa;
        p.swa_type = LLAMA_MEMORY_SWA_TYPE_STANDARD;
    }
    sp.layers = layers;
    sp.n_layers = (size_t) n;
    return llama_memory_kv_init_with_storage(p, &sp);
}

static llama_memory_t make_rs(void) {
    struct llama_memory_rs_params p = llama_memory_rs_default_params();
    struct llama_memory_rs_layer l;
    memset(&l, 0, sizeof(l));
    l.il = 0;
    l.n_embd_r = 4;
    l.n_embd_s = 4;
    p.n_seq_max = N_SEQ;
    p.n_layer = 2;
    p.layers = &l;
    p.n_layers = 1;
    return llama_memory_rs_init(p);
}

struct batch {
    llama_token tok[N_TOK];
    llama_pos pos[N_TOK];
    int32_t n_seq_id[N_TOK];
    llama_seq_id ids[N_TOK][2];
    const llama_seq_id *seq_ptr[N_TOK];
    int8_t logits[N_TOK];
    llama_memory_batch b;
};

/* tokens of the N_SEQ sequences interleaved (sequence i % N_SEQ), each sequence's positions
 * continuing from `next`; with `shared`, token 0 belongs to sequences 0 and 1 (both at 0) */
static void make_batch(struct batch *t, const llama_pos *next, int shared, int all_out) {
    llama_pos p[N_SEQ];
    int i;
    memcpy(p, next, sizeof(p));
    for (i = 0; i < N_TOK; ++i) {
        const int s = i % N_SEQ;
        t->tok[i] = i;
        t->n_seq_id[i] = 1;
        t->ids[i][0] = s;
        t->pos[i] = p[s]++;
        t->seq_ptr[i] = t->ids[i];
        t->logits[i] = (int8_t) (all_out || i == N_TOK - 1);
    }
    if (shared) {
        /* token 0 is in sequences 0 and 2 at position 0 (a shared prefix), so sequence 2's own
         * tokens start at position 1 */
        t->n_seq_id[0] = 2;
        t->ids[0][1] = 2;
        for (i = 2; i < N_TOK; i += N_SEQ) {
            t->pos[i] += 1;
        }
    }
    memset(&t->b, 0, sizeof(t->b));
    t->b.n_tokens = N_TOK;
    t->b.n_pos = 1;
    t->b.token = t->tok;
    t->b.pos = t->pos;
    t->b.n_seq_id = t->n_seq_id;
    t->b.seq_id = t->seq_ptr;
    t->b.logits = t->logits;
}

/* splits, applies and checks one batch; returns the number of ubatches (0 on failure) */
static int run(llama_memory_t mem, const struct batch *t, uint32_t n_ubatch, int embd_all, int by_seq) {
    int seen[N_TOK];
    int32_t idx[N_TOK];
    int n_ub = 0, i;
    llama_memory_ctx_t ctx = llama_memory_init_batch_split(mem, &t->b, n_ubatch, embd_all != 0);
    memset(seen, 0, sizeof(seen));
    CHECK(ctx != NULL && llama_memory_ctx_get_status(ctx) == LLAMA_MEMORY_CTX_SUCCESS);
    do {
        const size_t n = llama_memory_ctx_get_batch_idxs(ctx, NULL, 0);
        CHECK(n > 0 && n <= n_ubatch && n == llama_memory_ctx_get_n_tokens(ctx));
        CHECK(llama_memory_ctx_get_batch_idxs(ctx, idx, N_TOK) == n);
        for (i = 0; i < (int) n; ++i) {
            CHECK(idx[i] >= 0 && idx[i] < N_TOK && !seen[idx[i]]);
            seen[idx[i]] = 1;
            if (by_seq && i > 0) {
                /* split_seq: one sequence (set) per ubatch */
                CHECK(t->ids[idx[i]][0] == t->ids[idx[0]][0]);
            }
        }
        CHECK(llama_memory_ctx_apply(ctx) == LLAMA_MEMORY_OK);
        ++n_ub;
    } while (llama_memory_ctx_next(ctx));
    for (i = 0; i < N_TOK; ++i) {
        CHECK(seen[i]);
    }
    llama_memory_ctx_free(ctx);
    return n_ub;
}

static int check_positions(llama_memory_t mem, const struct batch *t) {
    int s, i;
    for (s = 0; s < N_SEQ; ++s) {
        llama_pos want = -1;
        for (i = 0; i < N_TOK; ++i) {
            if (t->ids[i][0] == s || (t->n_seq_id[i] > 1 && t->ids[i][1] == s)) {
                want = t->pos[i] > want ? t->pos[i] : want;
            }
        }
        CHECK(llama_memory_seq_pos_max(mem, s) == want);
    }
    return 0;
}

int main(void) {
    static const uint32_t l0[] = {0}, l1[] = {1};
    const llama_pos zero[N_SEQ] = {0, 0, 0};
    struct batch t;
    llama_memory_t mem;
    int n;

    /* one stream: the simple split, 40 tokens in ubatches of 16 */
    mem = make_kv(1, 256, 0, l0, 1);
    make_batch(&t, zero, 1, 0);
    n = run(mem, &t, 16, 0, 0);
    CHECK(n == 3);
    CHECK(check_positions(mem, &t) == 0);
    llama_memory_free(mem);

    /* a stream per sequence: sequential equal sets (3 sequences of 13-14 tokens, ubatches of
     * at most 16 tokens: sets of 5 tokens each) */
    mem = make_kv(0, 256, 0, l0, 1);
    make_batch(&t, zero, 0, 0);
    n = run(mem, &t, 16, 0, 0);
    CHECK(n >= 3);
    CHECK(check_positions(mem, &t) == 0);
    llama_memory_free(mem);

    /* a sliding-window pair (unified): the simple split fits */
    {
        llama_memory_t base = make_kv(1, 512, 0, l0, 1);
        llama_memory_t swa = make_kv(1, llama_memory_iswa_swa_size(512, 8, true, N_SEQ, 16, false), 8, l1, 1);
        mem = llama_memory_iswa_init(base, swa);
        CHECK(mem != NULL);
        make_batch(&t, zero, 1, 0);
        CHECK(run(mem, &t, 16, 0, 0) == 3);
        CHECK(check_positions(mem, &t) == 0);
        llama_memory_free(mem);
    }

    /* a hybrid: equal sets; with every token an output, one sequence per ubatch */
    {
        llama_memory_t attn = make_kv(1, 256, 0, l1, 1);
        mem = llama_memory_hybrid_init(attn, make_rs());
        CHECK(mem != NULL);
        make_batch(&t, zero, 0, 1);
        n = run(mem, &t, 8, 1, 1);
        CHECK(n >= 6);
        CHECK(check_positions(mem, &t) == 0);
        {
            /* invalid batches: refused, nothing changes */
            uint8_t before[1 << 14], after[1 << 14];
            const size_t nb = llama_memory_state_get_data(mem, before, sizeof(before));
            static struct batch bad;
            int i;
            bad = t;
            for (i = 0; i < N_TOK; ++i) {
                bad.seq_ptr[i] = bad.ids[i];
            }
            bad.b.seq_id = bad.seq_ptr;
            bad.b.n_seq_id = bad.n_seq_id;
            bad.ids[5][0] = N_SEQ;
            CHECK(llama_memory_init_batch_split(mem, &bad.b, 8, false) == NULL);
            CHECK(llama_memory_last_error() != NULL);
            CHECK(llama_memory_init_batch_split(mem, NULL, 8, false) == NULL);
            CHECK(llama_memory_init_batch_split(mem, &t.b, 0, false) == NULL);
            bad.ids[5][0] = 2;
            bad.n_seq_id[3] = 0;
            CHECK(llama_memory_init_batch_split(mem, &bad.b, 8, false) == NULL);
            CHECK(nb > 0 && llama_memory_state_get_data(mem, after, sizeof(after)) == nb);
            CHECK(memcmp(before, after, nb) == 0);
        }
        llama_memory_free(mem);
    }
    printf("batch split: simple, equal, pair and by-sequence splits cover every token once\n");
    return 0;
}
