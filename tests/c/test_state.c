/* Sequence state through the C ABI on a KV cache with tensors: save, restore into another
 * sequence, whole-memory get/set, files, and malformed input (failure value, last error, memory
 * unchanged). Byte-level compatibility with llama.cpp is shown by tests/kv_state_compat.rs. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

#define F16 1 /* GGML_TYPE_F16 */

static llama_memory_t make_with(bool no_alloc, const char *name_tag) {
    struct llama_memory_kv_params p = llama_memory_kv_default_params();
    struct llama_memory_kv_storage_params sp = llama_memory_kv_storage_default_params();
    struct llama_memory_kv_layer layers[2];
    int i;
    p.size = 64;
    p.n_seq_max = 2;
    for (i = 0; i < 2; ++i) {
        layers[i].il = (uint32_t) i;
        layers[i].n_embd_k_gqa = 16;
        layers[i].n_embd_v_gqa = 16;
        layers[i].reuse = -1;
        layers[i].buft = NULL;
    }
    sp.type_k = F16;
    sp.type_v = F16;
    sp.layers = layers;
    sp.n_layers = 2;
    sp.no_alloc = no_alloc;
    sp.name_tag = name_tag;
    return llama_memory_kv_init_with_storage(p, &sp);
}

static llama_memory_t make(void) {
    return make_with(false, NULL);
}

/* A no_alloc memory (llama.cpp's measuring model): the breakdown of an allocated one, no
 * bytes to read or write; a name_tag longer than 32 bytes is refused. */
static int test_no_alloc(void) {
    llama_memory_t real = make(), measured = make_with(true, NULL);
    struct ggml_backend_buffer_type *bt[2], *bt2[2];
    size_t sz[2], sz2[2], n;
    uint8_t *buf;
    CHECK(real != NULL && measured != NULL);
    CHECK(llama_memory_get_breakdown(real, bt, sz, 2) == 1);
    CHECK(llama_memory_get_breakdown(measured, bt2, sz2, 2) == 1);
    CHECK(bt[0] == bt2[0] && sz[0] == sz2[0]);
    /* the cells work (a measuring context places ubatches to reserve graphs) */
    CHECK(test_place(measured, 0, 0, 5) == 0);
    CHECK(llama_memory_seq_pos_max(measured, 0) == 4);
    /* the bytes do not exist: the size is known, the data cannot be read */
    CHECK(test_place(real, 0, 0, 5) == 0);
    n = llama_memory_state_seq_get_size(measured, 0);
    CHECK(n > 0 && n == llama_memory_state_seq_get_size(real, 0));
    buf = malloc(n);
    CHECK(buf != NULL);
    CHECK(llama_memory_state_seq_get_data(measured, buf, n, 0) == 0);
    CHECK(llama_memory_last_error() != NULL && strstr(llama_memory_last_error(), "no_alloc") != NULL);
    free(buf);
    llama_memory_clear(measured, true);
    CHECK(llama_memory_seq_pos_max(measured, 0) == -1);
    llama_memory_free(real);
    llama_memory_free(measured);

    CHECK(make_with(false, "0123456789012345678901234567890123") == NULL);
    CHECK(llama_memory_last_error_code() == LLAMA_MEMORY_ERR_INVALID_ARGUMENT);
    real = make_with(false, "idx_");
    CHECK(real != NULL);
    llama_memory_free(real);
    return 0;
}

/* Collects the memory's log lines. */
static char log_buf[4096];
static int log_level;

static void collect(int32_t level, const char *text, void *user) {
    (void) user;
    log_level = level;
    strncat(log_buf, text, sizeof(log_buf) - strlen(log_buf) - 1);
}

int main(void) {
    llama_memory_t mem = make(), other = make();
    struct test_snapshot before, after;
    struct ggml_tensor *k0;
    uint8_t *blob, *blob2, *whole;
    size_t n, n2, nw, count = 0;
    llama_token toks[4] = {1, 2, 3, 4}, toks_out[8];
    char path[256];

    CHECK(mem != NULL && other != NULL);
    CHECK(test_no_alloc() == 0);
    k0 = llama_memory_kv_get_k_tensor(mem, 0);
    CHECK(k0 != NULL);
    CHECK(llama_memory_kv_get_k_tensor(mem, 7) == NULL);
    CHECK(llama_memory_last_error_code() == LLAMA_MEMORY_ERR_INVALID_ARGUMENT);
    {
        struct ggml_backend_buffer_type *bt[2];
        size_t sz[2];
        CHECK(llama_memory_get_breakdown(mem, bt, sz, 2) == 1);
        /* 2 layers x (K + V) x 64 cells x 16 f16 */
        CHECK(sz[0] >= 2 * 2 * 64 * 16 * 2);
    }

    CHECK(test_place(mem, 0, 0, 5) == 0);
    n = llama_memory_state_seq_get_size(mem, 0);
    /* 8 header + 4 n_stream + 4 cell_count + 5 x 12 meta + 16 data header
     * + 2 x (4 + 8 + 5 x 32) K + 2 x (4 + 4 + 4 + 16 x 5 x 2) transposed V */
    CHECK(n == 8 + 4 + 4 + 60 + 16 + 2 * (12 + 160) + 2 * (12 + 160));
    blob = malloc(n);
    CHECK(llama_memory_state_seq_get_data(mem, blob, n, 0) == n);

    /* into seq 1 of the same memory and into seq 0 of another one */
    CHECK(llama_memory_state_seq_set_data(mem, blob, n, 1) == n);
    CHECK(llama_memory_seq_pos_min(mem, 1) == 0 && llama_memory_seq_pos_max(mem, 1) == 4);
    CHECK(llama_memory_kv_n_used(mem, 0) == 10);
    CHECK(llama_memory_state_seq_set_data(other, blob, n, 0) == n);
    blob2 = malloc(n);
    CHECK(llama_memory_state_seq_get_data(other, blob2, n, 0) == n);
    CHECK(memcmp(blob, blob2, n) == 0);

    /* truncated and corrupted blobs: 0, a last error, nothing changed */
    test_snapshot_take(mem, &before);
    for (n2 = 0; n2 < n; n2 += 7) {
        CHECK(llama_memory_state_seq_set_data(mem, blob, n2, 1) == 0);
        CHECK(llama_memory_last_error_code() == LLAMA_MEMORY_ERR_INVALID_STATE);
    }
    blob[8 + 4 + 4 + 60 + 16] ^= 0x40; /* layer 0's K type */
    CHECK(llama_memory_state_seq_set_data(mem, blob, n, 1) == 0);
    CHECK(llama_memory_last_error_code() == LLAMA_MEMORY_ERR_INVALID_STATE);
    CHECK(strstr(llama_memory_last_error(), "K type") != NULL);
    blob[8 + 4 + 4 + 60 + 16] ^= 0x40;
    CHECK(llama_memory_state_seq_set_data(mem, blob, n, 2) == 0);
    CHECK(llama_memory_last_error_code() == LLAMA_MEMORY_ERR_INVALID_SEQ_ID);
    test_snapshot_take(mem, &after);
    CHECK(test_snapshot_equal(&before, &after));
    CHECK(llama_memory_seq_pos_max(mem, 1) == 4);

    /* llama.cpp's log line of a sequence restore through the caller's callback, and how far
     * each cut blob got (header, cell count, cells, tensor data) */
    CHECK(llama_memory_set_log(mem, collect, NULL) == LLAMA_MEMORY_OK);
    CHECK(llama_memory_state_seq_set_data(mem, blob, n, 1) == n);
    CHECK(strcmp(log_buf, "state_read_meta: cell_count = 5, dest_seq_id = 1\n") == 0);
    CHECK(log_level == 1 /* GGML_LOG_LEVEL_DEBUG */);
    CHECK(llama_memory_state_read_stage(mem) == LLAMA_MEMORY_READ_DATA);
    CHECK(llama_memory_state_seq_set_data(mem, blob, 8 + 2, 1) == 0);
    CHECK(llama_memory_state_read_stage(mem) == LLAMA_MEMORY_READ_HEADER);
    CHECK(llama_memory_state_seq_set_data(mem, blob, 8 + 4 + 2, 1) == 0);
    CHECK(llama_memory_state_read_stage(mem) == LLAMA_MEMORY_READ_COUNT);
    CHECK(llama_memory_state_seq_set_data(mem, blob, 8 + 4 + 4 + 30, 1) == 0);
    CHECK(llama_memory_state_read_stage(mem) == LLAMA_MEMORY_READ_META);
    CHECK(llama_memory_state_seq_set_data(mem, blob, 8 + 4 + 4 + 60 + 20, 1) == 0);
    CHECK(llama_memory_state_read_stage(mem) == LLAMA_MEMORY_READ_DATA);
    /* off again: no more lines; bad handles */
    log_buf[0] = '\0';
    CHECK(llama_memory_set_log(mem, NULL, NULL) == LLAMA_MEMORY_OK);
    CHECK(llama_memory_state_seq_set_data(mem, blob, n, 1) == n);
    CHECK(log_buf[0] == '\0');
    CHECK(llama_memory_set_log(NULL, collect, NULL) == LLAMA_MEMORY_ERR_NULL_ARGUMENT);
    CHECK(llama_memory_state_read_stage(NULL) == -1);
    test_snapshot_take(mem, &after);
    CHECK(test_snapshot_equal(&before, &after));

    /* the opt-in non-finite check: a NaN in layer 0's K rows (after the 12-byte K header) is
     * restored while the check is off, refused with the memory unchanged while it is on */
    {
        const size_t k_rows = 8 + 4 + 4 + 60 + 16 + 12;
        const uint16_t nan16 = 0x7e00, one16 = 0x3c00, inf16 = 0x7c00;
        uint16_t halves[3] = {one16, one16, inf16};
        size_t at = 99;
        uint8_t *bad = malloc(n);
        memcpy(bad, blob, n);
        memcpy(bad + k_rows + 3 * 2, &nan16, 2);
        CHECK(llama_memory_data_is_finite(F16, bad + k_rows, 5 * 32, &at) == 0 && at == 3);
        CHECK(llama_memory_data_is_finite(F16, blob + k_rows, 5 * 32, &at) == 1);
        CHECK(llama_memory_data_is_finite(F16, (const uint8_t *) halves, sizeof halves, NULL) == 0);
        CHECK(llama_memory_data_is_finite(F16, NULL, 2, NULL) == -1);
        CHECK(llama_memory_data_is_finite(F16, NULL, 0, NULL) == 1);
        CHECK(llama_memory_set_check_finite(mem, true) == LLAMA_MEMORY_OK);
        CHECK(llama_memory_state_seq_set_data(mem, bad, n, 1) == 0);
        CHECK(llama_memory_last_error_code() == LLAMA_MEMORY_ERR_INVALID_STATE);
        CHECK(strstr(llama_memory_last_error(), "not finite") != NULL);
        test_snapshot_take(mem, &after);
        CHECK(test_snapshot_equal(&before, &after));
        CHECK(llama_memory_state_seq_set_data(mem, blob, n, 1) == n);
        CHECK(llama_memory_set_check_finite(mem, false) == LLAMA_MEMORY_OK);
        CHECK(llama_memory_state_seq_set_data(mem, bad, n, 1) == n);
        CHECK(llama_memory_state_seq_set_data(mem, blob, n, 1) == n);
        CHECK(llama_memory_set_check_finite(NULL, true) == LLAMA_MEMORY_ERR_NULL_ARGUMENT);
        free(bad);
    }

    /* whole memory */
    nw = llama_memory_state_get_size(mem);
    whole = malloc(nw);
    CHECK(llama_memory_state_get_data(mem, whole, nw) == nw);
    llama_memory_clear(other, true);
    CHECK(llama_memory_state_set_data(other, whole, nw) == nw);
    CHECK(llama_memory_seq_pos_max(other, 1) == 4 && llama_memory_kv_n_used(other, 0) == 10);
    CHECK(llama_memory_state_set_data(other, whole, nw - 1) == 0);
    CHECK(llama_memory_kv_n_used(other, 0) == 10);

    /* files */
    snprintf(path, sizeof(path), "%s/llama-memory-c-test-state.ggsq",
             getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    n2 = llama_memory_state_seq_save_file(mem, path, 0, toks, 4);
    CHECK(n2 == 12 + 16 + (n - 8));
    CHECK(llama_memory_state_seq_load_file(other, path, 1, NULL, 0, &count) == 12 && count == 4);
    CHECK(llama_memory_state_seq_load_file(other, path, 1, toks_out, 2, &count) == 0);
    CHECK(llama_memory_last_error_code() == LLAMA_MEMORY_ERR_BUFFER_TOO_SMALL);
    CHECK(llama_memory_state_seq_load_file(other, path, 1, toks_out, 8, &count) == n2);
    CHECK(count == 4 && toks_out[3] == 4);
    remove(path);
    CHECK(llama_memory_state_seq_load_file(other, path, 1, toks_out, 8, &count) == 0);
    CHECK(llama_memory_last_error_code() == LLAMA_MEMORY_ERR_IO);

    /* NULL handles */
    CHECK(llama_memory_state_seq_get_size(NULL, 0) == 0);
    CHECK(llama_memory_state_seq_set_data(NULL, blob, n, 0) == 0);
    CHECK(llama_memory_last_error_code() == LLAMA_MEMORY_ERR_NULL_ARGUMENT);

    free(blob);
    free(blob2);
    free(whole);
    llama_memory_free(mem);
    llama_memory_free(other);
    printf("test_state: ok\n");
    return 0;
}
