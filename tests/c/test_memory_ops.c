/* The llama.h memory functions through the C ABI on a unified KV cache. Expected values follow
 * llama.cpp's documented semantics (shared cells move together, seq_div's shift sign, ...). */
#include <math.h>
#include <string.h>

#include "common.h"

static int shift_of(llama_memory_t mem, uint32_t cell) {
    llama_pos pos = 0, shift = 0;
    llama_memory_kv_get_cell(mem, 0, cell, &pos, &shift, NULL);
    return shift;
}

int main(void) {
    struct llama_memory_kv_params p = llama_memory_kv_default_params();
    llama_memory_t mem;
    llama_memory_ctx_t ctx;
    struct test_ubatch t;
    llama_pos pos = 0;
    uint64_t seqs[4];
    int32_t k_shift[256];
    float mask[256];
    int i, n_zero = 0;

    p.n_seq_max = 4;
    mem = llama_memory_kv_init(p);
    CHECK(mem != NULL);
    CHECK(llama_memory_kv_size(mem) == 256 && llama_memory_kv_n_stream(mem) == 1);
    CHECK(llama_memory_can_shift(mem));

    /* 8 tokens of seq 0 go to cells 0..7 */
    CHECK(test_place(mem, 0, 0, 8) == 0);
    CHECK(llama_memory_seq_pos_min(mem, 0) == 0 && llama_memory_seq_pos_max(mem, 0) == 7);
    CHECK(llama_memory_kv_n_used(mem, 0) == 8);

    /* share positions 0..3 with seq 1, drop 4.. from seq 0: cells 4..7 are freed */
    llama_memory_seq_cp(mem, 0, 1, 0, 4);
    CHECK(llama_memory_seq_pos_max(mem, 1) == 3);
    CHECK(llama_memory_seq_rm(mem, 0, 4, -1));
    CHECK(llama_memory_seq_pos_max(mem, 0) == 3 && llama_memory_kv_n_used(mem, 0) == 4);

    /* the search restarts at the first freed cell */
    CHECK(test_place(mem, 2, 0, 2) == 0);
    CHECK(llama_memory_kv_get_cell(mem, 0, 4, &pos, NULL, seqs) == LLAMA_MEMORY_OK);
    CHECK(pos == 0 && seqs[0] == (1u << 2));

    /* every cell in one call: the same positions and sequence sets as cell by cell (cells 0..3
     * shared by seqs 0 and 1, 4..5 seq 2, the rest empty) */
    {
        static llama_pos all_pos[256];
        static uint64_t all_bits[256 * 4];
        llama_pos one_pos;
        uint64_t one_bits[4];
        CHECK(llama_memory_kv_get_cells(mem, 0, all_pos, all_bits, 256) == LLAMA_MEMORY_OK);
        for (i = 0; i < 256; ++i) {
            CHECK(llama_memory_kv_get_cell(mem, 0, (uint32_t) i, &one_pos, NULL, one_bits) == LLAMA_MEMORY_OK);
            CHECK(all_pos[i] == one_pos && memcmp(&all_bits[4 * i], one_bits, sizeof(one_bits)) == 0);
        }
        CHECK(all_pos[0] == 0 && all_bits[0] == 3u && all_pos[5] == 1 && all_bits[4 * 5] == 4u);
        CHECK(all_pos[6] == -1 && all_bits[4 * 6] == 0u);
        /* positions alone; too small arrays, a bad stream and NULL are refused */
        CHECK(llama_memory_kv_get_cells(mem, 0, all_pos, NULL, 256) == LLAMA_MEMORY_OK);
        CHECK(llama_memory_kv_get_cells(mem, 0, all_pos, all_bits, 255) == LLAMA_MEMORY_ERR_INVALID_ARGUMENT);
        CHECK(llama_memory_kv_get_cells(mem, 1, all_pos, all_bits, 256) == LLAMA_MEMORY_ERR_INVALID_ARGUMENT);
        CHECK(llama_memory_kv_get_cells(mem, 0, NULL, all_bits, 256) == LLAMA_MEMORY_ERR_NULL_ARGUMENT);
        CHECK(llama_memory_kv_get_cells(NULL, 0, all_pos, all_bits, 256) == LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    }

    /* every cell's ext in one call: no 2-D position, the token each placed cell took (the
     * harness's tokens are 100 + i), none for the empty ones */
    {
        static int32_t ext[256 * 3];
        CHECK(llama_memory_kv_get_cells_ext(mem, 0, ext, 256) == LLAMA_MEMORY_OK);
        CHECK(ext[0] == 0 && ext[1] == 0 && ext[2] == 100 && ext[3 * 3 + 2] == 103);
        CHECK(ext[3 * 4 + 2] == 100 && ext[3 * 5 + 2] == 101);
        CHECK(ext[3 * 6 + 0] == 0 && ext[3 * 6 + 1] == 0 && ext[3 * 6 + 2] == -1);
        CHECK(llama_memory_kv_get_cells_ext(mem, 0, ext, 255) == LLAMA_MEMORY_ERR_INVALID_ARGUMENT);
        CHECK(llama_memory_kv_get_cells_ext(mem, 1, ext, 256) == LLAMA_MEMORY_ERR_INVALID_ARGUMENT);
        CHECK(llama_memory_kv_get_cells_ext(mem, 0, NULL, 256) == LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    }

    /* shifting seq 1 moves the cells it shares with seq 0 */
    llama_memory_seq_add(mem, 1, 0, -1, 10);
    CHECK(llama_memory_seq_pos_min(mem, 0) == 10 && llama_memory_seq_pos_max(mem, 0) == 13);
    CHECK(llama_memory_kv_set_input_k_shift(mem, k_shift, 256) == LLAMA_MEMORY_OK);
    CHECK(k_shift[0] == 10 && k_shift[3] == 10 && k_shift[4] == 0);

    ctx = llama_memory_init_update(mem, false);
    CHECK(ctx != NULL && llama_memory_ctx_get_status(ctx) == LLAMA_MEMORY_CTX_SUCCESS);
    CHECK(llama_memory_ctx_apply(ctx) == LLAMA_MEMORY_OK);
    llama_memory_ctx_free(ctx);
    CHECK(llama_memory_kv_set_input_k_shift(mem, k_shift, 256) == LLAMA_MEMORY_OK);
    CHECK(k_shift[0] == 0);
    ctx = llama_memory_init_update(mem, false);
    CHECK(ctx != NULL && llama_memory_ctx_get_status(ctx) == LLAMA_MEMORY_CTX_NO_UPDATE);
    llama_memory_ctx_free(ctx);

    /* 10..13 / 2 = 5,5,6,6; the pending shift grows by old - new */
    llama_memory_seq_div(mem, 0, 0, -1, 2);
    CHECK(llama_memory_seq_pos_min(mem, 0) == 5 && llama_memory_seq_pos_max(mem, 0) == 6);
    CHECK(shift_of(mem, 0) == 5 && shift_of(mem, 3) == 7);

    /* in a unified cache seq_keep drops every other sequence */
    llama_memory_seq_keep(mem, 2);
    CHECK(llama_memory_seq_pos_max(mem, 0) == -1 && llama_memory_seq_pos_max(mem, 1) == -1);
    CHECK(llama_memory_kv_n_used(mem, 0) == 2);

    /* one more token of seq 2 at pos 2 lands in cell 0; it sees its own three cells */
    test_ubatch_init(&t, 2, 2, 1);
    ctx = llama_memory_init_batch(mem, &t.ub, 1);
    CHECK(ctx != NULL && llama_memory_ctx_get_status(ctx) == LLAMA_MEMORY_CTX_SUCCESS);
    CHECK(llama_memory_ctx_apply(ctx) == LLAMA_MEMORY_OK);
    CHECK(llama_memory_ctx_get_n_kv(ctx) == 256);
    CHECK(llama_memory_ctx_set_input_kq_mask(ctx, true, 256, 1, false, mask, 256) == LLAMA_MEMORY_OK);
    for (i = 0; i < 256; ++i) {
        if (mask[i] == 0.0f) {
            n_zero++;
        } else {
            CHECK(isinf(mask[i]) && mask[i] < 0);
        }
    }
    CHECK(n_zero == 3 && mask[0] == 0.0f && mask[4] == 0.0f && mask[5] == 0.0f);
    CHECK(!llama_memory_ctx_next(ctx));
    llama_memory_ctx_free(ctx);

    /* emptying the cells keeps the slot search where it was (after cell 0, the last placed):
     * the next two tokens go to cells 1 and 2, where a clear would put them at 0 and 1 */
    CHECK(llama_memory_kv_reset_cells(mem) == LLAMA_MEMORY_OK);
    CHECK(llama_memory_seq_pos_max(mem, 2) == -1 && llama_memory_kv_n_used(mem, 0) == 0);
    CHECK(test_place(mem, 3, 0, 2) == 0);
    CHECK(llama_memory_kv_get_cell(mem, 0, 0, &pos, NULL, NULL) == LLAMA_MEMORY_OK && pos == -1);
    CHECK(llama_memory_kv_get_cell(mem, 0, 1, &pos, NULL, seqs) == LLAMA_MEMORY_OK && pos == 0 && seqs[0] == (1u << 3));
    CHECK(llama_memory_kv_get_cell(mem, 0, 2, &pos, NULL, NULL) == LLAMA_MEMORY_OK && pos == 1);
    CHECK(llama_memory_kv_reset_cells(NULL) == LLAMA_MEMORY_ERR_NULL_ARGUMENT);

    llama_memory_clear(mem, true);
    CHECK(llama_memory_seq_pos_max(mem, 2) == -1 && llama_memory_kv_n_used(mem, 0) == 0);

    llama_memory_free(mem);
    printf("test_memory_ops: ok\n");
    return 0;
}
