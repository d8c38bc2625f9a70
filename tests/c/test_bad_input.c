/* Bad input at the ABI: each case returns the documented failure value, sets the last error,
 * and leaves the memory exactly as it was (where llama.cpp would abort or corrupt it). */
#include "common.h"

#define EXPECT_ERR(code)                                   \
    do {                                                   \
        CHECK(llama_memory_last_error_code() == (code));   \
        CHECK(llama_memory_last_error() != NULL);          \
        llama_memory_clear_last_error();                   \
    } while (0)

static int null_handles(void) {
    llama_memory_clear_last_error();
    llama_memory_clear(NULL, true);
    EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    CHECK(llama_memory_seq_rm(NULL, 0, 0, -1)); /* llama.h: true for NULL */
    EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    llama_memory_seq_cp(NULL, 0, 1, -1, -1);
    EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    llama_memory_seq_keep(NULL, 0);
    llama_memory_seq_add(NULL, 0, 0, -1, 1);
    llama_memory_seq_div(NULL, 0, 0, -1, 2);
    CHECK(llama_memory_seq_pos_min(NULL, 0) == -1);
    CHECK(llama_memory_seq_pos_max(NULL, 0) == -1);
    CHECK(!llama_memory_can_shift(NULL));
    EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    llama_memory_free(NULL);
    llama_memory_ctx_free(NULL);
    CHECK(llama_memory_init_full(NULL) == NULL);
    CHECK(llama_memory_init_batch(NULL, NULL, 1) == NULL);
    EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    CHECK(llama_memory_ctx_apply(NULL) == LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    CHECK(llama_memory_ctx_get_status(NULL) == LLAMA_MEMORY_CTX_FAILED_PREPARE);
    return 0;
}

static int bad_params(void) {
    struct llama_memory_kv_params p = llama_memory_kv_default_params();
    p.swa_type = 9; /* unknown enum value */
    CHECK(llama_memory_kv_init(p) == NULL);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_ARGUMENT);
    p = llama_memory_kv_default_params();
    p.non_causal_type = -4;
    CHECK(llama_memory_kv_init(p) == NULL);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_ARGUMENT);
    p = llama_memory_kv_default_params();
    p.n_seq_max = 257;
    CHECK(llama_memory_kv_init(p) == NULL);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_ARGUMENT);
    p = llama_memory_kv_default_params();
    p.swa_type = LLAMA_MEMORY_SWA_TYPE_CHUNKED;
    p.n_swa = 0; /* would divide by zero */
    CHECK(llama_memory_kv_init(p) == NULL);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_ARGUMENT);
    return 0;
}

static int bad_ops_change_nothing(void) {
    struct llama_memory_kv_params p = llama_memory_kv_default_params();
    struct test_snapshot before, after;
    struct test_ubatch t;
    llama_memory_t mem;
    float mask[4];

    p.n_seq_max = 2;
    p.size = 16;
    mem = llama_memory_kv_init(p);
    CHECK(mem != NULL);
    CHECK(test_place(mem, 0, 0, 6) == 0);
    llama_memory_seq_add(mem, 0, 0, 3, 2); /* leave a pending shift in the snapshot */
    test_snapshot_take(mem, &before);

    CHECK(!llama_memory_seq_rm(mem, 2, 0, -1));
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_SEQ_ID);
    CHECK(!llama_memory_seq_rm(mem, -2, 0, -1));
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_SEQ_ID);
    llama_memory_seq_cp(mem, 0, 5, -1, -1);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_SEQ_ID);
    llama_memory_seq_keep(mem, -1);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_SEQ_ID);
    llama_memory_seq_add(mem, 300, 0, -1, 1);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_SEQ_ID);
    llama_memory_seq_div(mem, 0, 0, -1, 0);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_ARGUMENT);
    llama_memory_seq_div(mem, 0, 0, -1, -2);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_ARGUMENT);
    CHECK(llama_memory_seq_pos_max(mem, 2) == -1);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_SEQ_ID);

    /* malformed ubatches */
    test_ubatch_init(&t, 0, 6, 2);
    t.ub.pos = NULL;
    CHECK(llama_memory_init_batch(mem, &t.ub, 1) == NULL);
    EXPECT_ERR(LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    test_ubatch_init(&t, 0, 6, 2);
    t.ub.n_tokens = 0;
    CHECK(llama_memory_init_batch(mem, &t.ub, 1) == NULL);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_UBATCH);
    test_ubatch_init(&t, 0, 6, 2);
    t.seq[1] = 5;
    CHECK(llama_memory_init_batch(mem, &t.ub, 1) == NULL);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_SEQ_ID);
    test_ubatch_init(&t, 0, 6, 2);
    t.n_seq_id[0] = 0;
    CHECK(llama_memory_init_batch(mem, &t.ub, 1) == NULL);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_UBATCH);
    test_ubatch_init(&t, 0, 6, 2);
    t.pos[0] = -3;
    CHECK(llama_memory_init_batch(mem, &t.ub, 1) == NULL);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_UBATCH);

    /* a ubatch larger than the cache does not fit: FAILED_PREPARE, cells untouched */
    {
        llama_memory_ctx_t ctx;
        test_ubatch_init(&t, 1, 0, 20);
        ctx = llama_memory_init_batch(mem, &t.ub, 1);
        CHECK(ctx != NULL && llama_memory_ctx_get_status(ctx) == LLAMA_MEMORY_CTX_FAILED_PREPARE);
        CHECK(llama_memory_ctx_apply(ctx) == LLAMA_MEMORY_ERR_INVALID_ARGUMENT);
        llama_memory_ctx_free(ctx);
        llama_memory_clear_last_error();
    }

    /* a buffer too small for the mask */
    {
        llama_memory_ctx_t ctx;
        test_ubatch_init(&t, 1, 0, 1);
        ctx = llama_memory_init_batch(mem, &t.ub, 1);
        CHECK(ctx != NULL);
        CHECK(llama_memory_ctx_set_input_kq_mask(ctx, true, 16, 1, false, mask, 4) ==
              LLAMA_MEMORY_ERR_BUFFER_TOO_SMALL);
        CHECK(llama_memory_ctx_set_input_kq_mask(ctx, true, 16, 1, false, NULL, 16) ==
              LLAMA_MEMORY_ERR_NULL_ARGUMENT);
        llama_memory_ctx_free(ctx); /* never applied */
        llama_memory_clear_last_error();
    }

    test_snapshot_take(mem, &after);
    CHECK(test_snapshot_equal(&before, &after));
    llama_memory_free(mem);
    return 0;
}

static int streams(void) {
    struct llama_memory_kv_params p = llama_memory_kv_default_params();
    struct test_snapshot before, after;
    llama_memory_t mem;
    llama_memory_ctx_t a, b;
    struct test_ubatch t;
    const llama_seq_id both[2] = {0, 1};
    const llama_seq_id unq[2] = {0, 1};

    p.n_seq_max = 2;
    p.unified = false;
    p.size = 16;
    mem = llama_memory_kv_init(p);
    CHECK(mem != NULL && llama_memory_kv_n_stream(mem) == 2);
    CHECK(test_place(mem, 0, 0, 4) == 0);
    test_snapshot_take(mem, &before);

    /* between streams only whole sequences can be copied (llama.cpp aborts) */
    llama_memory_seq_cp(mem, 0, 1, 2, -1);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_RANGE);

    /* a token in two sequences cannot go to two streams at once */
    test_ubatch_init(&t, 0, 4, 2);
    t.n_seq_id[0] = 2;
    t.seq_ptr[0] = both;
    t.seq_ptr[1] = &unq[1];
    t.ub.n_seqs_unq = 2;
    t.ub.seq_id_unq = unq;
    CHECK(llama_memory_init_batch(mem, &t.ub, 1) == NULL);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_UBATCH);

    /* a plan made stale by a later change is refused at apply */
    test_ubatch_init(&t, 0, 4, 2);
    a = llama_memory_init_batch(mem, &t.ub, 1);
    b = llama_memory_init_batch(mem, &t.ub, 1);
    CHECK(a != NULL && b != NULL);
    CHECK(llama_memory_ctx_apply(a) == LLAMA_MEMORY_OK);
    test_snapshot_take(mem, &before);
    CHECK(llama_memory_ctx_apply(b) == LLAMA_MEMORY_ERR_INVALID_ARGUMENT);
    llama_memory_clear_last_error();
    llama_memory_ctx_free(a);
    llama_memory_ctx_free(b);

    test_snapshot_take(mem, &after);
    CHECK(test_snapshot_equal(&before, &after));
    llama_memory_free(mem);
    return 0;
}

int main(void) {
    if (null_handles() || bad_params() || bad_ops_change_nothing() || streams()) {
        return 1;
    }
    printf("test_bad_input: ok\n");
    return 0;
}
