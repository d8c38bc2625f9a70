/* A recurrent memory driven through the public header: placements of equal-split ubatches,
 * every llama.h sequence op, rollbacks, s_copy, a state round trip and bad input.
 *
 * After every step the test records what it observes (cells, head/used/n/rs_z, pending
 * rollbacks, per-sequence min/max, op results, s_copy rows, blob sizes) and compares the
 * whole record with recurrent_expected.h. Those values were produced by the stock
 * llama_memory_recurrent of the pinned llama.cpp replaying the same steps
 * (tests/recurrent_c_expected.rs, which also checks on every run that stock still produces
 * exactly them). The widths are those of the generated mamba model: 2 layers, R rows of 384
 * and S rows of 2048 floats. */
#include <stdint.h>
#include <stdlib.h>

#include "common.h"
#include "recurrent_expected.h"

#define N_SEQ 4
#define MAX_OBS 4096

static int32_t obs[MAX_OBS];
static int n_obs;

static void record(int32_t v) {
    if (n_obs < MAX_OBS) {
        obs[n_obs] = v;
    }
    n_obs++;
}

static int observe(llama_memory_t mem) {
    struct llama_memory_rs_info info;
    struct llama_memory_rs_cell cell;
    int32_t seqs[N_SEQ];
    uint32_t i;
    CHECK(llama_memory_rs_get_info(mem, &info) == LLAMA_MEMORY_OK);
    record((int32_t) info.head);
    record((int32_t) info.used);
    record((int32_t) info.n);
    record(info.rs_z);
    for (i = 0; i < N_SEQ; ++i) {
        CHECK(llama_memory_rs_get_cell(mem, i, &cell, seqs, N_SEQ) == LLAMA_MEMORY_OK);
        record(cell.pos);
        record(cell.src);
        record(cell.src0);
        record(cell.tail);
        record((int32_t) cell.rs_idx);
        record((int32_t) cell.n_seq);
    }
    for (i = 0; i < N_SEQ; ++i) {
        record(llama_memory_seq_pos_min(mem, (llama_seq_id) i));
        record(llama_memory_seq_pos_max(mem, (llama_seq_id) i));
    }
    return 0;
}

/* Places one ubatch of equal sets (seq, first position), n tokens each, then reads s_copy as
 * the graph would. */
static int place(llama_memory_t mem, const int32_t (*sets)[2], int n_sets, int n) {
    llama_token tok[64];
    llama_pos pos[64];
    int32_t n_seq_id[64];
    llama_seq_id ids[64];
    const llama_seq_id *ptr[64];
    llama_seq_id unq[N_SEQ];
    int32_t s_copy[N_SEQ];
    llama_memory_ubatch ub;
    llama_memory_ctx_t ctx;
    int s, k, t = 0, n_unq = 0, u;
    uint32_t n_rs, r;
    for (s = 0; s < n_sets; ++s) {
        for (k = 0; k < n; ++k, ++t) {
            tok[t] = 7;
            pos[t] = sets[s][1] + k;
            n_seq_id[t] = 1;
            ids[t] = sets[s][0];
            ptr[t] = &ids[t];
        }
    }
    /* ascending unique ids */
    for (u = 0; u < N_SEQ; ++u) {
        for (s = 0; s < n_sets; ++s) {
            if (sets[s][0] == u) {
                unq[n_unq++] = u;
                break;
            }
        }
    }
    memset(&ub, 0, sizeof(ub));
    ub.n_tokens = (uint32_t) t;
    ub.n_seq_tokens = (uint32_t) n;
    ub.n_seqs = (uint32_t) n_sets;
    ub.n_seqs_unq = (uint32_t) n_unq;
    ub.n_pos = 1;
    ub.equal_seqs = 1;
    ub.token = tok;
    ub.pos = pos;
    ub.n_seq_id = n_seq_id;
    ub.seq_id = ptr;
    ub.seq_id_unq = unq;
    ctx = llama_memory_init_batch(mem, &ub, 1);
    CHECK(ctx != NULL);
    CHECK(llama_memory_ctx_get_status(ctx) == LLAMA_MEMORY_CTX_SUCCESS);
    CHECK(llama_memory_ctx_apply(ctx) == LLAMA_MEMORY_OK);
    n_rs = llama_memory_ctx_get_n_rs(ctx);
    CHECK(n_rs <= N_SEQ);
    record((int32_t) n_rs);
    record((int32_t) llama_memory_ctx_get_rs_head(ctx));
    record(llama_memory_ctx_get_rs_z(ctx));
    CHECK(llama_memory_ctx_set_input_s_copy(ctx, s_copy, N_SEQ) == LLAMA_MEMORY_OK);
    for (r = 0; r < n_rs; ++r) {
        record(s_copy[r]);
    }
    /* a buffer smaller than n_rs is refused */
    if (n_rs > 0) {
        CHECK(llama_memory_ctx_set_input_s_copy(ctx, s_copy, n_rs - 1) != LLAMA_MEMORY_OK);
    }
    llama_memory_ctx_free(ctx);
    return observe(mem);
}

static int op_result(llama_memory_t mem, int32_t v) {
    record(v);
    return observe(mem);
}

int main(void) {
    struct llama_memory_rs_layer layers[2];
    struct llama_memory_rs_params p = llama_memory_rs_default_params();
    llama_memory_t mem;
    uint8_t *blob, *before, *after;
    size_t n, n_before;
    int i;
    static const int32_t a[2][2] = {{0, 0}, {1, 0}};
    static const int32_t b[2][2] = {{1, 3}, {2, 0}};
    static const int32_t c[1][2] = {{3, 2}};
    static const int32_t d[1][2] = {{2, 0}};

    for (i = 0; i < 2; ++i) {
        layers[i].il = (uint32_t) i;
        layers[i].n_embd_r = 384;
        layers[i].n_embd_s = 2048;
        layers[i].n_embd_p = 0;
        layers[i].buft = NULL;
    }
    p.n_seq_max = N_SEQ;
    p.n_rs_seq = 2;
    p.n_layer = 2;
    p.layers = layers;
    p.n_layers = 2;
    mem = llama_memory_rs_init(p);
    CHECK(mem != NULL);
    CHECK(llama_memory_can_shift(mem));
    CHECK(llama_memory_rs_get_r_tensor(mem, 1) != NULL);
    CHECK(llama_memory_rs_get_p_tensor(mem, 1) == NULL);

    if (observe(mem)) return 1;
    if (place(mem, a, 2, 3)) return 1;
    if (place(mem, b, 2, 1)) return 1;
    llama_memory_seq_cp(mem, 1, 3, -1, -1);
    if (observe(mem)) return 1;
    if (op_result(mem, llama_memory_seq_rm(mem, 1, 2, -1))) return 1;  /* rollback by 2 */
    if (op_result(mem, llama_memory_seq_rm(mem, 0, 1, -1))) return 1;  /* rollback by 2 */
    if (op_result(mem, llama_memory_seq_rm(mem, 0, 2, -1))) return 1;  /* one is pending */
    if (op_result(mem, llama_memory_seq_rm(mem, 2, 0, 1))) return 1;   /* no tail inside */
    llama_memory_seq_add(mem, 2, 0, -1, 5);
    if (observe(mem)) return 1;
    llama_memory_seq_div(mem, 2, 0, -1, 2);
    if (observe(mem)) return 1;
    if (place(mem, c, 1, 1)) return 1; /* seq 3 leaves the cell it shares with seq 1 */

    /* sequence 3's state into sequence 0 */
    n = llama_memory_state_seq_get_size(mem, 3);
    record((int32_t) n);
    blob = malloc(n);
    CHECK(blob != NULL);
    CHECK(llama_memory_state_seq_get_data(mem, blob, n, 3) == n);
    CHECK(llama_memory_state_seq_set_data(mem, blob, n, 0) == n);
    if (observe(mem)) return 1;

    /* bad input changes nothing: a truncated blob, a corrupt cell count, bad ids */
    n_before = llama_memory_state_get_size(mem);
    before = malloc(n_before);
    after = malloc(n_before);
    CHECK(before && after);
    CHECK(llama_memory_state_get_data(mem, before, n_before) == n_before);
    CHECK(llama_memory_state_seq_set_data(mem, blob, n - 1, 1) == 0);
    CHECK(llama_memory_last_error() != NULL);
    blob[8] = 7; /* cell_count 7 > 4 cells */
    CHECK(llama_memory_state_seq_set_data(mem, blob, n, 1) == 0);
    CHECK(!llama_memory_seq_rm(mem, -1, -1, -1));
    CHECK(!llama_memory_seq_rm(mem, N_SEQ, -1, -1));
    CHECK(llama_memory_seq_pos_max(mem, N_SEQ) == -1);
    llama_memory_seq_keep(mem, N_SEQ);
    llama_memory_seq_div(mem, 0, 0, -1, 0);
    CHECK(llama_memory_state_get_data(mem, after, n_before) == n_before);
    CHECK(memcmp(before, after, n_before) == 0);
    free(before);
    free(after);
    free(blob);

    if (op_result(mem, llama_memory_seq_rm(mem, 2, -1, -1))) return 1;
    if (place(mem, d, 1, 2)) return 1;
    llama_memory_seq_keep(mem, 2);
    if (observe(mem)) return 1;
    llama_memory_clear(mem, true);
    if (observe(mem)) return 1;
    llama_memory_free(mem);

    if (n_obs != RS_EXPECTED_N) {
        fprintf(stderr, "recorded %d observations, stock made %d\n", n_obs, RS_EXPECTED_N);
        return 1;
    }
    for (i = 0; i < n_obs; ++i) {
        if (obs[i] != RS_EXPECTED[i]) {
            fprintf(stderr, "observation %d: %d, stock %d\n", i, obs[i], RS_EXPECTED[i]);
            return 1;
        }
    }
    printf("test_recurrent: %d observations identical to stock llama.cpp\n", n_obs);
    return 0;
}
