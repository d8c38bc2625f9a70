/* A K-shift on a memory part with no layer (drop-in only: stock aborts there).
 *
 *   kshift <model.gguf>
 *
 * lfm2 with a sliding window is a hybrid-iSWA memory whose full-attention cache has no layer.
 * With swa_full both caches can shift. Context A decodes 8 tokens at positions 0..7, moves
 * them by +5 (llama_memory_seq_add) and decodes a 9th token at 13; context B decodes the same
 * 8 tokens at 5..12 and the 9th at 13. The 9th token's logits must agree within the rounding
 * of a shifted key (stored in f16 after its rotation), and A's decode must succeed: stock's
 * K-shift asserts on the empty cache's unallocated shift input; the drop-in's shift moves no
 * tensor there and resets its pending shifts. Exit 0 on success. (Whether the window cache's
 * keys were rotated at all is the equivalence suite's to show, against stock, where stock can
 * shift: here an unshifted reference would need positions the recurrent part refuses.) */
#include "llama.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void quiet_log(enum ggml_log_level level, const char *text, void *user) {
    (void) level;
    (void) text;
    (void) user;
}

static int n_vocab;

static int feed(struct llama_context *ctx, llama_pos pos0, int n, int first, float *logits) {
    struct llama_batch b = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        b.token[i] = (llama_token) (((first + i) * 7 + 3) % n_vocab);
        b.pos[i] = pos0 + i;
        b.n_seq_id[i] = 1;
        b.seq_id[i][0] = 0;
        b.logits[i] = i == n - 1;
    }
    b.n_tokens = n;
    const int rc = llama_decode(ctx, b);
    llama_batch_free(b);
    if (rc == 0 && logits) {
        memcpy(logits, llama_get_logits_ith(ctx, -1), sizeof(float) * (size_t) n_vocab);
    }
    return rc;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: kshift <model.gguf>\n");
        return 2;
    }
    llama_log_set(quiet_log, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    struct llama_model *model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "kshift: cannot load %s\n", argv[1]);
        return 2;
    }
    n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 64;
    cp.n_batch = 64;
    cp.n_ubatch = 32;
    cp.n_seq_max = 1;
    cp.n_threads = 1;
    cp.n_threads_batch = 1;
    cp.swa_full = true;
    cp.no_perf = true;
    struct llama_context *a = llama_init_from_model(model, cp), *b = llama_init_from_model(model, cp);
    if (!a || !b) {
        fprintf(stderr, "kshift: cannot create the contexts\n");
        return 2;
    }
    if (!llama_memory_can_shift(llama_get_memory(a))) {
        fprintf(stderr, "kshift: the memory cannot shift in this configuration\n");
        return 1;
    }
    float *la = malloc(sizeof(float) * (size_t) n_vocab), *lb = malloc(sizeof(float) * (size_t) n_vocab);
    if (feed(a, 0, 8, 0, NULL) != 0 || feed(b, 5, 8, 0, NULL) != 0) {
        fprintf(stderr, "kshift: the prompts failed\n");
        return 2;
    }
    llama_memory_seq_add(llama_get_memory(a), 0, -1, -1, 5);
    const int ra = feed(a, 13, 1, 8, la), rb = feed(b, 13, 1, 8, lb);
    printf("decode after the shift: %d (reference %d); positions %d..%d\n", ra, rb,
           llama_memory_seq_pos_min(llama_get_memory(a), 0), llama_memory_seq_pos_max(llama_get_memory(a), 0));
    if (ra != 0 || rb != 0) {
        printf("FAIL: the decode after the shift failed\n");
        return 1;
    }
    double max_diff = 0, max_abs = 0;
    for (int i = 0; i < n_vocab; i++) {
        max_diff = fmax(max_diff, fabs((double) la[i] - (double) lb[i]));
        max_abs = fmax(max_abs, fabs((double) lb[i]));
    }
    /* f16 keys rotated then rounded: a relative error of about 1e-3 per key */
    const double tol = 2e-2 * (max_abs > 1 ? max_abs : 1);
    printf("logits after the shift vs decoded at the shifted positions: max |diff| %.3g (max |logit| %.3g, tolerance %.3g)\n",
           max_diff, max_abs, tol);
    if (!(max_diff <= tol)) {
        printf("FAIL: the shifted cache does not give the logits of the shifted positions\n");
        return 1;
    }
    llama_free(a);
    llama_free(b);
    llama_model_free(model);
    free(la);
    free(lb);
    printf("ok\n");
    return 0;
}
