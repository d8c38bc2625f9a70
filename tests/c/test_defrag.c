/* Defragmentation through the C ABI on a cells-only KV cache: the fragmentation figure, the
 * threshold rule of llama_memory_init_update, the two-step prepare/apply and its refusals.
 * Expected values follow the defragmenting llama.cpp's documented rule (holes below the used
 * count filled from the end, fragmentation 1 - (used + n_pad) / extent from 2048 cells on). */
#include <math.h>
#include <stdint.h>

#include "common.h"

static llama_pos cell_pos[4096];

/* The used extent (last used cell + 1) of stream 0. */
static uint32_t extent(llama_memory_t mem) {
    uint32_t i, n = 0;
    if (llama_memory_kv_get_cells(mem, 0, cell_pos, NULL, 4096) != LLAMA_MEMORY_OK) {
        return UINT32_MAX;
    }
    for (i = 0; i < 4096; ++i) {
        if (cell_pos[i] >= 0) {
            n = i + 1;
        }
    }
    return n;
}

int main(void) {
    struct llama_memory_kv_params p = llama_memory_kv_default_params();
    llama_memory_t mem;
    llama_memory_ctx_t ctx;
    float frag;
    int i;

    p.size = 4096;
    p.n_seq_max = 2;
    mem = llama_memory_kv_init(p);
    CHECK(mem != NULL);

    /* 3000 tokens of seq 0 in cells 0..2999, 200 of seq 1 after them */
    for (i = 0; i < 3000; i += 60) {
        CHECK(test_place(mem, 0, i, 60) == 0);
    }
    for (i = 0; i < 200; i += 50) {
        CHECK(test_place(mem, 1, i, 50) == 0);
    }
    CHECK(extent(mem) == 3200);
    /* below 2048 cells of extent nothing is fragmented; a packed cache is not either */
    CHECK(llama_memory_kv_get_fragmentation(mem) == 0.0f);

    /* seq 0 forgets 100..2099: 2000 holes under the extent */
    CHECK(llama_memory_seq_rm(mem, 0, 100, 2100));
    CHECK(llama_memory_kv_n_used(mem, 0) == 1200);
    frag = llama_memory_kv_get_fragmentation(mem);
    CHECK(fabsf(frag - (1.0f - 1201.0f / 3200.0f)) < 1e-6f);

    /* by default an update does not defragment, as the pinned llama.cpp */
    ctx = llama_memory_init_update(mem, false);
    CHECK(ctx != NULL && llama_memory_ctx_get_status(ctx) == LLAMA_MEMORY_CTX_NO_UPDATE);
    llama_memory_ctx_free(ctx);

    /* a threshold above the figure: still nothing; below: the update packs the cells */
    CHECK(llama_memory_kv_set_defrag(mem, 0.7f, UINT32_MAX) == LLAMA_MEMORY_OK);
    ctx = llama_memory_init_update(mem, false);
    CHECK(ctx != NULL && llama_memory_ctx_get_status(ctx) == LLAMA_MEMORY_CTX_NO_UPDATE);
    llama_memory_ctx_free(ctx);
    CHECK(llama_memory_kv_set_defrag(mem, 0.5f, UINT32_MAX) == LLAMA_MEMORY_OK);
    ctx = llama_memory_init_update(mem, false);
    CHECK(ctx != NULL && llama_memory_ctx_get_status(ctx) == LLAMA_MEMORY_CTX_SUCCESS);
    CHECK(extent(mem) == 3200); /* planning changes nothing */
    CHECK(llama_memory_ctx_apply(ctx) == LLAMA_MEMORY_OK);
    llama_memory_ctx_free(ctx);
    CHECK(extent(mem) == 1200 && llama_memory_kv_n_used(mem, 0) == 1200);
    CHECK(llama_memory_kv_get_fragmentation(mem) == 0.0f);
    /* every sequence kept its positions */
    CHECK(llama_memory_seq_pos_min(mem, 0) == 0 && llama_memory_seq_pos_max(mem, 0) == 2999);
    CHECK(llama_memory_seq_pos_min(mem, 1) == 0 && llama_memory_seq_pos_max(mem, 1) == 199);
    /* the holes under the used count (100..1199) took the last 1100 used cells, in their order:
     * cell 100 holds what was cell 2100 (seq 0, position 2100), 999 what was 2999, 1000 seq 1's
     * position 0 (was 3000) */
    CHECK(cell_pos[99] == 99 && cell_pos[100] == 2100 && cell_pos[999] == 2999);
    CHECK(cell_pos[1000] == 0 && cell_pos[1199] == 199);

    /* two steps: prepare plans without changing anything, apply moves */
    CHECK(llama_memory_seq_rm(mem, 0, 0, 50));
    CHECK(llama_memory_kv_defrag_prepare(mem, 0.5f, UINT32_MAX) == 0); /* extent < 2048 */
    CHECK(llama_memory_kv_defrag_prepare(mem, -1.0f, 1) == 1);         /* forced, one run */
    CHECK(extent(mem) == 1200);
    CHECK(llama_memory_kv_defrag_apply(mem) == 1);
    CHECK(extent(mem) == 1150);
    CHECK(llama_memory_kv_defrag_apply(mem) == 0); /* the plan is used up */

    /* a plan whose holes were filled since is refused, and nothing changes */
    CHECK(llama_memory_seq_rm(mem, 1, 150, -1));
    CHECK(llama_memory_kv_defrag_prepare(mem, -1.0f, UINT32_MAX) > 0);
    CHECK(test_place(mem, 1, 150, 50) == 0);
    i = (int) extent(mem);
    CHECK(llama_memory_kv_defrag_apply(mem) == -1);
    CHECK(llama_memory_last_error_code() == LLAMA_MEMORY_ERR_INVALID_STATE);
    CHECK((int) extent(mem) == i);

    /* bad input */
    CHECK(llama_memory_kv_set_defrag(mem, NAN, 10) == LLAMA_MEMORY_ERR_INVALID_ARGUMENT);
    CHECK(llama_memory_kv_defrag_prepare(mem, NAN, 10) == -1);
    CHECK(llama_memory_kv_defrag_prepare(NULL, 0.1f, 10) == -1);
    CHECK(llama_memory_last_error_code() == LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    CHECK(llama_memory_kv_defrag_apply(NULL) == -1);
    CHECK(llama_memory_kv_get_fragmentation(NULL) < 0.0f);
    CHECK(llama_memory_kv_defrag_max_moves(65536, 2) == (65536u - 4u) / 12u);

    llama_memory_free(mem);
    printf("test_defrag: ok\n");
    return 0;
}
