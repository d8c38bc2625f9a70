/* The slot-level KV API from C, used the way a drop-in llama_kv_cache adapter uses it: prepare
 * into a reused slots list, copy each slot info out into caller-owned arrays (as into
 * llama.cpp's slot_info), apply caller slot infos, then n_kv and the graph inputs for them.
 * Run plain, under ASan/UBSan and under valgrind: the list must not leak. */
#include <stdlib.h>

#include "common.h"

/* A caller-owned slot info with room for one stream (a unified cache), as an adapter would
 * keep it in a std::vector. */
struct my_slot {
    uint32_t s0, s1, size;
    llama_seq_id strm[1];
    uint32_t idxs[MAX_TOKENS];
    const uint32_t *ptrs[1];
};

static void my_slot_view(struct my_slot *s, struct llama_memory_slot_info *v) {
    s->ptrs[0] = s->idxs;
    v->s0 = s->s0;
    v->s1 = s->s1;
    v->n_stream = 1;
    v->size = s->size;
    v->strm = s->strm;
    v->idxs = s->ptrs;
}

/* n-gram inputs: with ngram_tokens the cells keep each row's token id (an embedding row gets
 * embd_token), and llama_memory_kv_get_prev_tokens reads the n tokens before each token of a
 * ubatch, oldest first, -1 before the sequence starts (llama_kv_cache::get_prev_tokens). */
static int test_prev_tokens(void) {
    struct llama_memory_kv_params p = llama_memory_kv_default_params();
    struct test_ubatch t;
    llama_token prev[2 * 5];
    const llama_token want2[4] = {101, 102, 102, 103};
    const llama_token want5[5] = {-1, -1, 100, 101, 102};
    llama_memory_t mem;
    p.n_seq_max = 2;
    p.ngram_tokens = true;
    p.embd_token = 7;
    mem = llama_memory_kv_init(p);
    CHECK(mem != NULL);
    CHECK(test_place(mem, 0, 0, 5) == 0); /* tokens 100..104 at positions 0..4 */
    test_ubatch_init(&t, 0, 3, 2);        /* the rows at positions 3 and 4 */
    CHECK(llama_memory_kv_get_prev_tokens(mem, &t.ub, 2, prev, 4) == LLAMA_MEMORY_OK);
    CHECK(memcmp(prev, want2, sizeof want2) == 0);
    test_ubatch_init(&t, 0, 3, 1);
    CHECK(llama_memory_kv_get_prev_tokens(mem, &t.ub, 5, prev, 5) == LLAMA_MEMORY_OK);
    CHECK(memcmp(prev, want5, sizeof want5) == 0);
    /* a destination of the wrong size: refused, nothing written */
    prev[0] = 42;
    CHECK(llama_memory_kv_get_prev_tokens(mem, &t.ub, 5, prev, 4) == LLAMA_MEMORY_ERR_INVALID_ARGUMENT);
    CHECK(prev[0] == 42);
    CHECK(llama_memory_kv_get_prev_tokens(NULL, &t.ub, 1, prev, 1) == LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    /* an embedding ubatch of seq 1: its cells hold the stand-in */
    test_ubatch_init(&t, 1, 0, 3);
    t.ub.token = NULL;
    {
        llama_memory_ctx_t ctx = llama_memory_init_batch(mem, &t.ub, 1);
        CHECK(ctx != NULL && llama_memory_ctx_apply(ctx) == LLAMA_MEMORY_OK);
        llama_memory_ctx_free(ctx);
    }
    test_ubatch_init(&t, 1, 2, 1);
    CHECK(llama_memory_kv_get_prev_tokens(mem, &t.ub, 2, prev, 2) == LLAMA_MEMORY_OK);
    CHECK(prev[0] == 7 && prev[1] == 7);
    llama_memory_free(mem);
    return 0;
}

int main(void) {
    struct llama_memory_kv_params p = llama_memory_kv_default_params();
    struct test_ubatch a, b, c;
    struct llama_memory_ubatch ubs[2];
    struct llama_memory_slot_info view;
    struct my_slot mine[2];
    struct test_snapshot before, after;
    llama_memory_slots_t slots;
    llama_memory_t mem, small;
    int64_t k_idxs[8], v_idxs[8 * 4];
    float mask[256 * 8];
    uint32_t i, j;
    llama_pos pos;
    int n_visible = 0;

    CHECK(test_prev_tokens() == 0);

    p.n_seq_max = 2;
    p.n_embd_v_gqa_max = 4; /* transposed V: 4 indices per token */
    mem = llama_memory_kv_init(p);
    CHECK(mem != NULL);
    slots = llama_memory_slots_init();
    CHECK(slots != NULL && llama_memory_slots_count(slots) == 0);

    /* two ubatches planned together: the second goes after the first, nothing is placed yet */
    test_ubatch_init(&a, 0, 0, 8);
    test_ubatch_init(&b, 1, 0, 4);
    ubs[0] = a.ub;
    ubs[1] = b.ub;
    CHECK(llama_memory_kv_prepare(mem, ubs, 2, slots) == LLAMA_MEMORY_OK);
    CHECK(llama_memory_slots_count(slots) == 2);
    CHECK(llama_memory_kv_n_used(mem, 0) == 0);
    for (i = 0; i < 2; ++i) {
        CHECK(llama_memory_slots_get(slots, i, &view) == LLAMA_MEMORY_OK);
        CHECK(view.n_stream == 1 && view.s0 == 0 && view.s1 == 0 && view.strm[0] == 0);
        CHECK(view.size == (i == 0 ? 8u : 4u));
        mine[i].s0 = view.s0;
        mine[i].s1 = view.s1;
        mine[i].size = view.size;
        mine[i].strm[0] = view.strm[0];
        memcpy(mine[i].idxs, view.idxs[0], view.size * sizeof(uint32_t));
    }
    for (j = 0; j < 8; ++j) {
        CHECK(mine[0].idxs[j] == j);
    }
    for (j = 0; j < 4; ++j) {
        CHECK(mine[1].idxs[j] == 8 + j);
    }

    /* apply both from the caller's copies, with the inputs of the first */
    my_slot_view(&mine[0], &view);
    CHECK(llama_memory_kv_apply_ubatch(mem, &view, &a.ub) == LLAMA_MEMORY_OK);
    CHECK(llama_memory_kv_get_n_kv(mem, &view) == 256);
    CHECK(llama_memory_kv_set_input_k_idxs(mem, &a.ub, &view, k_idxs, 8) == LLAMA_MEMORY_OK);
    CHECK(llama_memory_kv_set_input_v_idxs(mem, &a.ub, &view, v_idxs, 8 * 4) == LLAMA_MEMORY_OK);
    for (j = 0; j < 8; ++j) {
        CHECK(k_idxs[j] == (int64_t) j);
        CHECK(v_idxs[j * 4 + 3] == (int64_t) (3 * 256 + j)); /* channel 3 of cell j */
    }
    CHECK(llama_memory_kv_set_input_kq_mask(mem, &a.ub, true, 256, 1, false, mask, 256 * 8) ==
          LLAMA_MEMORY_OK);
    for (j = 0; j < 256 * 8; ++j) {
        n_visible += mask[j] == 0.0f;
    }
    CHECK(n_visible == 8 * 9 / 2); /* causal: token i sees cells 0..i */
    my_slot_view(&mine[1], &view);
    CHECK(llama_memory_kv_apply_ubatch(mem, &view, &b.ub) == LLAMA_MEMORY_OK);
    CHECK(llama_memory_kv_n_used(mem, 0) == 12 && llama_memory_seq_pos_max(mem, 1) == 3);

    /* a slot the caller builds: two tokens of seq 1 into cells 100 and 50 */
    test_ubatch_init(&c, 1, 4, 2);
    mine[0].size = 2;
    mine[0].idxs[0] = 100;
    mine[0].idxs[1] = 50;
    my_slot_view(&mine[0], &view);
    CHECK(llama_memory_kv_apply_ubatch(mem, &view, &c.ub) == LLAMA_MEMORY_OK);
    CHECK(llama_memory_kv_get_cell(mem, 0, 100, &pos, NULL, NULL) == LLAMA_MEMORY_OK && pos == 4);
    CHECK(llama_memory_kv_get_cell(mem, 0, 50, &pos, NULL, NULL) == LLAMA_MEMORY_OK && pos == 5);

    /* overwriting cell 0 (seq 0, pos 0): seq 0 loses its positions up to 0, as llama.cpp */
    test_ubatch_init(&c, 1, 6, 1);
    mine[0].size = 1;
    mine[0].idxs[0] = 0;
    my_slot_view(&mine[0], &view);
    CHECK(llama_memory_kv_apply_ubatch(mem, &view, &c.ub) == LLAMA_MEMORY_OK);
    CHECK(llama_memory_seq_pos_min(mem, 0) == 1 && llama_memory_seq_pos_max(mem, 1) == 6);

    /* bad input changes nothing: a cell outside the cache, a bad stream, a size mismatch */
    test_snapshot_take(mem, &before);
    mine[0].idxs[0] = 256;
    my_slot_view(&mine[0], &view);
    CHECK(llama_memory_kv_apply_ubatch(mem, &view, &c.ub) == LLAMA_MEMORY_ERR_INVALID_ARGUMENT);
    CHECK(llama_memory_kv_get_n_kv(mem, &view) == 0);
    mine[0].idxs[0] = 200;
    mine[0].strm[0] = 1;
    mine[0].s1 = 1;
    my_slot_view(&mine[0], &view);
    CHECK(llama_memory_kv_apply_ubatch(mem, &view, &c.ub) == LLAMA_MEMORY_ERR_INVALID_ARGUMENT);
    mine[0].strm[0] = 0;
    mine[0].s1 = 0;
    mine[0].size = 2;
    mine[0].idxs[1] = 201;
    my_slot_view(&mine[0], &view);
    CHECK(llama_memory_kv_apply_ubatch(mem, &view, &c.ub) == LLAMA_MEMORY_ERR_INVALID_ARGUMENT);
    CHECK(llama_memory_kv_apply_ubatch(mem, NULL, &c.ub) == LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    test_snapshot_take(mem, &after);
    CHECK(test_snapshot_equal(&before, &after));

    /* a batch that does not fit: NO_SLOT, an empty list, nothing placed */
    p.size = 32;
    small = llama_memory_kv_init(p);
    CHECK(small != NULL);
    test_ubatch_init(&a, 0, 0, 40);
    CHECK(llama_memory_kv_prepare(small, &a.ub, 1, slots) == LLAMA_MEMORY_ERR_NO_SLOT);
    CHECK(llama_memory_slots_count(slots) == 0 && llama_memory_kv_n_used(small, 0) == 0);
    CHECK(llama_memory_slots_get(slots, 0, &view) == LLAMA_MEMORY_ERR_INVALID_ARGUMENT);
    llama_memory_free(small);

    /* state_clear drops the sequence */
    CHECK(llama_memory_kv_state_clear(mem, 1) == LLAMA_MEMORY_OK);
    CHECK(llama_memory_seq_pos_max(mem, 1) == -1 && llama_memory_seq_pos_max(mem, 0) == 7);

    llama_memory_slots_free(slots);
    llama_memory_slots_free(NULL);
    llama_memory_free(mem);
    puts("test_slots: ok");
    return 0;
}
