/* llama_memory_can_seq_rm against llama_memory_seq_rm itself, from the public header: on a KV
 * cache and on recurrent memories with 0, 1 and 3 rollback planes, thousands of random
 * (sequence, range) removals between random placements. Before each removal the query must
 * change nothing (the whole state blob, and a recurrent memory's counters and pending
 * rollbacks) and say what the removal then returns; a recurrent memory refuses some of them
 * (the end of a state that no rollback plane can undo), and the test requires both answers to
 * occur. */
#include <stdlib.h>
#include <string.h>

#include "common.h"

#define N_SEQ 4
#define RS_LAYERS 2

static uint32_t rng = 12345;

static uint32_t next_u32(void) {
    rng = rng * 1664525u + 1013904223u;
    return rng >> 8;
}

/* n tokens of one sequence from p0, as one equal set (what a recurrent memory takes) */
static int place(llama_memory_t mem, llama_seq_id seq, llama_pos p0, int n) {
    struct test_ubatch t;
    test_ubatch_init(&t, seq, p0, n);
    t.ub.n_seq_tokens = (uint32_t) n;
    t.ub.n_seqs = 1;
    t.ub.equal_seqs = 1;
    return test_apply(mem, &t.ub);
}

/* everything a query could change: the state, and a recurrent memory's counters and each
 * cell's pending rollback (not part of the state) */
struct observed {
    uint8_t blob[1 << 16];
    size_t n;
    int32_t rs[4 + 2 * N_SEQ];
};

static void observe(llama_memory_t mem, int recurrent, struct observed *o) {
    memset(o, 0, sizeof(*o));
    o->n = llama_memory_state_get_data(mem, o->blob, sizeof(o->blob));
    if (recurrent) {
        struct llama_memory_rs_info info;
        struct llama_memory_rs_cell cell;
        int32_t seqs[N_SEQ];
        uint32_t i;
        llama_memory_rs_get_info(mem, &info);
        o->rs[0] = (int32_t) info.head;
        o->rs[1] = (int32_t) info.used;
        o->rs[2] = (int32_t) info.n;
        o->rs[3] = info.rs_z;
        for (i = 0; i < N_SEQ; ++i) {
            llama_memory_rs_get_cell(mem, i, &cell, seqs, N_SEQ);
            o->rs[4 + 2 * i] = (int32_t) cell.rs_idx;
            o->rs[5 + 2 * i] = cell.pos;
        }
    }
}

static int same(const struct observed *a, const struct observed *b) {
    return a->n == b->n && memcmp(a->blob, b->blob, a->n) == 0 && memcmp(a->rs, b->rs, sizeof(a->rs)) == 0;
}

/* n_steps random steps; counts the removals that return false */
static int run(llama_memory_t mem, int recurrent, int n_steps, int *n_false, int *n_true) {
    static struct observed before, after;
    int step;
    for (step = 0; step < n_steps; ++step) {
        const llama_seq_id seq = (llama_seq_id) (next_u32() % N_SEQ);
        const llama_pos pmax = llama_memory_seq_pos_max(mem, seq);
        if (next_u32() % 3 == 0) {
            if (place(mem, seq, pmax + 1, 1 + (int) (next_u32() % 4)) != 0) {
                llama_memory_clear(mem, false);
            }
            continue;
        }
        /* a range around the sequence's positions: from before 0 to past its end, often a
         * suffix (p1 -1), sometimes empty or reversed */
        {
            const llama_pos p0 = (llama_pos) (next_u32() % (uint32_t) (pmax + 4)) - 1;
            const llama_pos p1 = next_u32() % 3 == 0 ? -1 : p0 + (llama_pos) (next_u32() % 6) - 1;
            int q, r;
            observe(mem, recurrent, &before);
            q = llama_memory_can_seq_rm(mem, seq, p0, p1);
            observe(mem, recurrent, &after);
            CHECK(same(&before, &after));
            r = llama_memory_seq_rm(mem, seq, p0, p1);
            if (q != r) {
                fprintf(stderr, "step %d: seq %d [%d, %d): query %d, seq_rm %d\n", step, seq, p0, p1, q, r);
            }
            CHECK(q == r);
            if (r) {
                (*n_true)++;
            } else {
                (*n_false)++;
            }
        }
    }
    return 0;
}

static llama_memory_t make_rs(uint32_t n_rs_seq) {
    struct llama_memory_rs_params p = llama_memory_rs_default_params();
    struct llama_memory_rs_layer layers[RS_LAYERS];
    memset(layers, 0, sizeof(layers));
    layers[0].il = 0;
    layers[1].il = 1;
    layers[0].n_embd_r = layers[1].n_embd_r = 8;
    layers[0].n_embd_s = layers[1].n_embd_s = 16;
    p.n_seq_max = N_SEQ;
    p.n_rs_seq = n_rs_seq;
    p.n_layer = RS_LAYERS;
    p.layers = layers;
    p.n_layers = RS_LAYERS;
    return llama_memory_rs_init(p);
}

int main(void) {
    struct llama_memory_kv_params kp = llama_memory_kv_default_params();
    llama_memory_t mem;
    int n_false = 0, n_true = 0, n_false_rs = 0, n_true_rs = 0;
    uint32_t planes;

    /* a KV cache: every valid removal succeeds, and the query says so */
    kp.n_seq_max = N_SEQ;
    mem = llama_memory_kv_init(kp);
    CHECK(mem != NULL);
    CHECK(run(mem, 0, 1200, &n_false, &n_true) == 0);
    CHECK(n_false == 0 && n_true > 500);
    /* ids seq_rm refuses: the query refuses them too, with the last error set */
    CHECK(!llama_memory_can_seq_rm(mem, N_SEQ, 0, -1) && llama_memory_last_error() != NULL);
    CHECK(llama_memory_can_seq_rm(mem, -1, 0, -1));
    llama_memory_free(mem);
    CHECK(llama_memory_can_seq_rm(NULL, 0, 0, -1));

    /* recurrent memories without and with rollback planes */
    for (planes = 0; planes <= 3; planes += planes == 0 ? 1 : 2) {
        mem = make_rs(planes);
        CHECK(mem != NULL);
        CHECK(run(mem, 1, 1200, &n_false_rs, &n_true_rs) == 0);
        CHECK(!llama_memory_can_seq_rm(mem, -2, 0, -1));
        llama_memory_free(mem);
    }
    CHECK(n_false_rs > 100 && n_true_rs > 1000);
    printf("can_seq_rm: KV %d removals (all true); recurrent %d true, %d false, each as the query said\n",
           n_true, n_true_rs, n_false_rs);
    return 0;
}
