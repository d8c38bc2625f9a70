/* Non-finite values in a restored state, on the drop-in (llama.h only).
 *
 *   nonfinite <model.gguf> test      the opt-in check, and what a NaN does without it
 *   nonfinite <model.gguf> bench N   restore time of an N-token sequence state, check off/on
 *
 * test (flash attention off, then on): a unified cache holds seq 0 and seq 1; seq 1's state with one K element set to NaN is
 * restored into seq 2. Without LLAMA_MEMORY_CHECK_FINITE it is taken, as stock takes it; the
 * next decode on seq 0 (which never saw seq 2) is then measured, before and after seq 2 is
 * removed (printed: a masked cell still enters attention's sums, so the NaN reaches every
 * sequence and stays until its row is overwritten). With LLAMA_MEMORY_CHECK_FINITE=1 the same
 * state is refused (0, seq 2 left empty) and seq 0's logits are finite and equal to a clean
 * context's; an intact state is still taken. Exit 0 when the check behaves so.
 *
 * bench: median over 31 restores of the same N-token sequence state, with the check off and
 * on, and their ratio (BENCHMARKS.md). */
#define _POSIX_C_SOURCE 200809L
#include "llama.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int n_vocab;
static struct llama_model *model;
static int flash_attn;

static void quiet_log(enum ggml_log_level level, const char *text, void *user) {
    (void) level;
    (void) text;
    (void) user;
}

static struct llama_context *new_ctx(int n_ctx) {
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t) n_ctx;
    cp.n_batch = 512;
    cp.n_ubatch = 256;
    cp.n_seq_max = 4;
    cp.kv_unified = true;
    cp.n_threads = 2;
    cp.n_threads_batch = 2;
    cp.no_perf = true;
    cp.flash_attn_type = flash_attn ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    return llama_init_from_model(model, cp);
}

static int feed(struct llama_context *ctx, llama_seq_id seq, llama_pos pos0, int n, int salt, float *logits) {
    struct llama_batch b = llama_batch_init(512, 0, 1);
    for (int done = 0; done < n;) {
        const int m = n - done < 512 ? n - done : 512;
        for (int i = 0; i < m; i++) {
            b.token[i] = (llama_token) (((done + i) * 7 + salt * 13 + 3) % n_vocab);
            b.pos[i] = pos0 + done + i;
            b.n_seq_id[i] = 1;
            b.seq_id[i][0] = seq;
            b.logits[i] = done + i == n - 1;
        }
        b.n_tokens = m;
        if (llama_decode(ctx, b) != 0) {
            llama_batch_free(b);
            return -1;
        }
        done += m;
    }
    llama_batch_free(b);
    if (logits) {
        memcpy(logits, llama_get_logits_ith(ctx, -1), sizeof(float) * (size_t) n_vocab);
    }
    return 0;
}

static int n_non_finite(const float *l) {
    int n = 0;
    for (int i = 0; i < n_vocab; i++) {
        n += !isfinite(l[i]);
    }
    return n;
}

/* seq 1's state, and a copy with the first K element of layer 0 set to an f16 NaN: the blob is
 * u32 magic, i32 seq, u32 n_stream, u32 cell_count, per cell i32 pos, u32 n_seq_id, i32 seq_id,
 * then u32 v_trans, n_layer, n_rot_k, n_rot_v, i32 K type, u64 K row size, the K rows */
static uint8_t *seq_state(struct llama_context *ctx, size_t *n, uint8_t **bad) {
    *n = llama_state_seq_get_size(ctx, 1);
    uint8_t *b = malloc(*n);
    *n = llama_state_seq_get_data(ctx, b, *n, 1);
    uint32_t n_stream, count, k_type;
    memcpy(&n_stream, b + 8, 4);
    memcpy(&count, b + 12, 4);
    const size_t k_hdr = 16 + (size_t) count * 12 + 16;
    memcpy(&k_type, b + k_hdr, 4);
    if (n_stream != 1 || k_type != 1 /* F16 */ || k_hdr + 12 + 2 > *n) {
        fprintf(stderr, "nonfinite: unexpected state layout (n_stream %u, K type %u)\n", n_stream, k_type);
        exit(2);
    }
    *bad = malloc(*n);
    memcpy(*bad, b, *n);
    const uint16_t nan16 = 0x7e00;
    memcpy(*bad + k_hdr + 12, &nan16, 2);
    return b;
}

static int test(void) {
    float *l = malloc(sizeof(float) * (size_t) n_vocab), *clean = malloc(sizeof(float) * (size_t) n_vocab);
    size_t n = 0;
    uint8_t *bad = NULL, *good = NULL;
    int ok = 1;

    /* a clean context's logits for the probe on seq 0 */
    struct llama_context *ref = new_ctx(256);
    if (feed(ref, 0, 0, 12, 1, NULL) || feed(ref, 1, 0, 8, 2, NULL) || feed(ref, 0, 12, 1, 3, clean)) {
        return 2;
    }
    llama_free(ref);

    /* without the check: stock's behaviour */
    unsetenv("LLAMA_MEMORY_CHECK_FINITE");
    struct llama_context *a = new_ctx(256);
    if (feed(a, 0, 0, 12, 1, NULL) || feed(a, 1, 0, 8, 2, NULL)) {
        return 2;
    }
    good = seq_state(a, &n, &bad);
    const size_t r_off = llama_state_seq_set_data(a, bad, n, 2);
    llama_memory_seq_rm(llama_get_memory(a), 0, 12, -1);
    feed(a, 0, 12, 1, 3, l);
    const int nan_with = n_non_finite(l);
    llama_memory_seq_rm(llama_get_memory(a), 2, -1, -1);
    llama_memory_seq_rm(llama_get_memory(a), 0, 12, -1);
    feed(a, 0, 12, 1, 3, l);
    const int nan_removed = n_non_finite(l);
    printf("flash attention %d, check off: the NaN state restored into seq 2: %zu; non-finite logits of seq 0: %d of %d, "
           "after seq 2 is removed: %d\n", flash_attn, r_off, nan_with, n_vocab, nan_removed);
    llama_free(a);

    /* with the check */
    setenv("LLAMA_MEMORY_CHECK_FINITE", "1", 1);
    a = new_ctx(256);
    if (feed(a, 0, 0, 12, 1, NULL) || feed(a, 1, 0, 8, 2, NULL)) {
        return 2;
    }
    const size_t r_on = llama_state_seq_set_data(a, bad, n, 2);
    const int empty = llama_memory_seq_pos_max(llama_get_memory(a), 2) == -1;
    feed(a, 0, 12, 1, 3, l);
    const int nan_on = n_non_finite(l);
    const int same = memcmp(l, clean, sizeof(float) * (size_t) n_vocab) == 0;
    const size_t r_good = llama_state_seq_set_data(a, good, n, 3);
    printf("flash attention %d, check on: the NaN state: %zu (seq 2 empty: %d); seq 0's logits: %d non-finite, equal to a clean "
           "context's: %d; the intact state into seq 3: %zu\n", flash_attn, r_on, empty, nan_on, same, r_good);
    ok = r_off == n && r_on == 0 && empty && nan_on == 0 && same && r_good == n;
    llama_free(a);
    free(good);
    free(bad);
    free(l);
    free(clean);
    printf("%s\n", ok ? "ok" : "FAIL");
    return ok ? 0 : 1;
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int cmp_double(const void *x, const void *y) {
    const double a = *(const double *) x, b = *(const double *) y;
    return (a > b) - (a < b);
}

static int bench(int n_tokens) {
    struct llama_context *a = new_ctx(n_tokens + 64);
    if (!a || feed(a, 1, 0, n_tokens, 2, NULL)) {
        return 2;
    }
    size_t n = llama_state_seq_get_size(a, 1);
    uint8_t *b = malloc(n);
    n = llama_state_seq_get_data(a, b, n, 1);
    double med[2];
    for (int on = 0; on < 2; on++) {
        if (on) setenv("LLAMA_MEMORY_CHECK_FINITE", "1", 1);
        else unsetenv("LLAMA_MEMORY_CHECK_FINITE");
        double t[31];
        for (int i = 0; i < 31; i++) {
            const double t0 = now_ms();
            if (llama_state_seq_set_data(a, b, n, 1) != n) {
                return 1;
            }
            t[i] = now_ms() - t0;
        }
        qsort(t, 31, sizeof t[0], cmp_double);
        med[on] = t[15];
    }
    printf("restore of a %d-token sequence state (%zu bytes), median of 31: check off %.3f ms, on %.3f ms, "
           "ratio on/off %.3f\n", n_tokens, n, med[0], med[1], med[1] / med[0]);
    free(b);
    llama_free(a);
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: nonfinite <model.gguf> test | bench N\n");
        return 2;
    }
    llama_log_set(quiet_log, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "nonfinite: cannot load %s\n", argv[1]);
        return 2;
    }
    n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    int rc = 0;
    if (strcmp(argv[2], "bench") == 0) {
        rc = bench(argc > 3 ? atoi(argv[3]) : 2048);
    } else {
        for (flash_attn = 0; flash_attn < 2 && rc == 0; flash_attn++) {
            rc = test();
        }
    }
    llama_model_free(model);
    return rc;
}
