/* Input that takes a naive implementation down (an abort, a hang, unbounded memory, undefined
 * behaviour) gets a failure value and a last error here, and changes nothing: one case per
 * class of input, as a hostile caller would try it. */
#define _POSIX_C_SOURCE 200809L
#include "common.h"

#include <stdint.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#define EXPECT_ERR(code)                                 \
    do {                                                 \
        CHECK(llama_memory_last_error_code() == (code)); \
        CHECK(llama_memory_last_error() != NULL);        \
        llama_memory_clear_last_error();                 \
    } while (0)

/* Cell tables nobody can allocate: NULL and a message, not an abort on allocation failure. */
static int huge_construction(void) {
    struct llama_memory_kv_params p = llama_memory_kv_default_params();
    p.size = 0xFFFFFF00u; /* a multiple of n_pad 1; 4 G cells of bookkeeping */
    CHECK(llama_memory_kv_init(p) == NULL);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_ARGUMENT);
    p.size = 1u << 24;
    p.n_seq_max = 256;
    p.unified = false; /* 2^24 cells x 256 streams */
    CHECK(llama_memory_kv_init(p) == NULL);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_ARGUMENT);
    return 0;
}

/* A size no buffer can have (above PTRDIFF_MAX) never becomes a slice. */
static int sizes_above_ptrdiff_max(llama_memory_t mem) {
    unsigned char buf[64] = {0};
    struct test_snapshot before, after;
    test_snapshot_take(mem, &before);
    CHECK(llama_memory_state_set_data(mem, buf, SIZE_MAX) == 0);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_ARGUMENT);
    CHECK(llama_memory_state_seq_set_data(mem, buf, (size_t) PTRDIFF_MAX + 1, 0) == 0);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_ARGUMENT);
    CHECK(llama_memory_state_get_data(mem, buf, SIZE_MAX / 2 + 1) == 0);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_ARGUMENT);
    test_snapshot_take(mem, &after);
    CHECK(test_snapshot_equal(&before, &after));
    return 0;
}

/* /dev/zero never ends and a FIFO blocks until its writer closes: both are refused at once. */
static int files_that_never_end(llama_memory_t mem) {
    llama_token toks[8];
    size_t n = 99;
    char fifo[] = "/tmp/llama-memory-fifo-XXXXXX";
    int fd = mkstemp(fifo);
    CHECK(fd >= 0);
    close(fd);
    unlink(fifo);
    CHECK(mkfifo(fifo, 0600) == 0);
    CHECK(llama_memory_state_seq_load_file(mem, "/dev/zero", 0, toks, 8, &n) == 0);
    EXPECT_ERR(LLAMA_MEMORY_ERR_IO);
    CHECK(llama_memory_state_seq_load_file(mem, fifo, 0, toks, 8, &n) == 0);
    EXPECT_ERR(LLAMA_MEMORY_ERR_IO);
    CHECK(llama_memory_state_seq_load_file(mem, "/tmp", 0, toks, 8, &n) == 0);
    EXPECT_ERR(LLAMA_MEMORY_ERR_IO);
    unlink(fifo);
    return 0;
}

/* seq_id_unq must be exactly the ids the tokens use, each in range; seq_idx must agree. */
static int ubatch_sequence_tables(llama_memory_t mem) {
    struct test_ubatch t;
    llama_seq_id unq[2];
    int32_t seq_idx[256];
    int i;
    test_ubatch_init(&t, 0, 100, 2);
    unq[0] = 0;
    unq[1] = 7; /* outside n_seq_max 2, and no token uses it */
    t.ub.seq_id_unq = unq;
    t.ub.n_seqs_unq = 2;
    CHECK(llama_memory_init_batch(mem, &t.ub, 1) == NULL);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_UBATCH);
    unq[1] = 1; /* in range, but unused */
    CHECK(llama_memory_init_batch(mem, &t.ub, 1) == NULL);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_UBATCH);

    test_ubatch_init(&t, 1, 100, 2);
    for (i = 0; i < 256; ++i) {
        seq_idx[i] = -1;
    }
    seq_idx[1] = 0;
    t.ub.seq_idx = seq_idx;
    {
        llama_memory_ctx_t ok = llama_memory_init_batch(mem, &t.ub, 1);
        CHECK(ok != NULL);
        llama_memory_ctx_free(ok);
    }
    seq_idx[0] = 0; /* claims sequence 0 is in the ubatch */
    CHECK(llama_memory_init_batch(mem, &t.ub, 1) == NULL);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_UBATCH);

    test_ubatch_init(&t, 0, 100, 4);
    t.ub.n_seq_tokens = 3; /* 3 x 4 sets != 4 tokens */
    CHECK(llama_memory_init_batch(mem, &t.ub, 1) == NULL);
    EXPECT_ERR(LLAMA_MEMORY_ERR_INVALID_UBATCH);
    return 0;
}

/* A shift on a memory that cannot apply one would wedge every later update (llama.cpp aborts at
 * the next decode): refused up front. */
static int shift_without_k_shift(void) {
    struct llama_memory_kv_params p = llama_memory_kv_default_params();
    struct test_snapshot before, after;
    llama_memory_t mem;
    llama_memory_ctx_t upd;
    p.model_can_shift = false;
    mem = llama_memory_kv_init(p);
    CHECK(mem != NULL);
    CHECK(!llama_memory_can_shift(mem));
    CHECK(test_place(mem, 0, 0, 8) == 0);
    test_snapshot_take(mem, &before);
    llama_memory_seq_add(mem, 0, 2, -1, 5);
    EXPECT_ERR(LLAMA_MEMORY_ERR_UNSUPPORTED);
    llama_memory_seq_div(mem, 0, 0, -1, 2);
    EXPECT_ERR(LLAMA_MEMORY_ERR_UNSUPPORTED);
    test_snapshot_take(mem, &after);
    CHECK(test_snapshot_equal(&before, &after));
    upd = llama_memory_init_update(mem, false);
    CHECK(upd != NULL);
    CHECK(llama_memory_ctx_get_status(upd) == LLAMA_MEMORY_CTX_NO_UPDATE);
    llama_memory_ctx_free(upd);
    llama_memory_free(mem);
    return 0;
}

/* After main returns, the thread's storage is torn down before atexit handlers run: a failing
 * call from there must still return its failure value, not abort while recording the error. */
static llama_memory_t g_exit_mem;
static void call_after_main(void) {
    if (llama_memory_seq_pos_max(g_exit_mem, 999) != -1) {
        _exit(3);
    }
    if (!llama_memory_seq_rm(g_exit_mem, 0, 0, -1)) {
        _exit(4);
    }
    llama_memory_free(g_exit_mem);
}

int main(void) {
    struct llama_memory_kv_params p = llama_memory_kv_default_params();
    llama_memory_t mem;
    p.n_seq_max = 2;
    mem = llama_memory_kv_init(p);
    CHECK(mem != NULL);
    CHECK(test_place(mem, 0, 0, 5) == 0);
    CHECK(test_place(mem, 1, 0, 3) == 0);
    if (huge_construction() || sizes_above_ptrdiff_max(mem) || files_that_never_end(mem) ||
        ubatch_sequence_tables(mem) || shift_without_k_shift()) {
        return 1;
    }
    g_exit_mem = mem;
    CHECK(atexit(call_after_main) == 0);
    printf("test_abort_paths: ok\n");
    return 0;
}
