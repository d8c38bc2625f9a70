/* Defragmentation through llama.h: a continuous-batching workload (sequences of different
 * lengths that end and restart, one token per running sequence per decode) run twice in one
 * process, on a context with llama_context_params.defrag_thold set and on one without (the
 * pinned llama.cpp's behaviour, which ignores the field). Records the attention's n_kv of every
 * decode (the KQ mask's width, seen through cb_eval) and the logits of every output.
 *
 *   defrag <model.gguf> <n_ctx> <flash_attn 0|1> <n_seq> <n_decodes> <defrag_thold> <mode>
 *
 * mode "test": both contexts, the same tokens; fails unless the compacted context's mean n_kv
 * is below the other's and every logit agrees within the tolerance (printed with the maximum
 * difference). mode "bench": one context (defrag_thold as given; -1 for none), prints the mean
 * n_kv, the used cells and the decode rate, for the same workload on stock and drop-in. */
#define _POSIX_C_SOURCE 199309L

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ggml.h"
#include "llama.h"

/* Every logit of the compacted context within TOL * max(1, |x|) of the other's: the attention
 * sums the same keys in another order (and over another number of masked cells), so the float
 * sums round differently while the K and V bytes are the same. With flash attention the CPU
 * kernel accumulates softmax(KQ)·V in f16, where another order changes the rounding at f16's
 * precision; without, the sums are f32. Measured maxima are printed. */
#define TOL_F32 1e-4
#define TOL_FA 2e-2

static long n_kv_sum, n_kv_count, used_sum;
static long cur_n_kv; /* the KQ mask's width in the graph being computed */

/* The mask is a graph input, never a node: it is seen as a source of the nodes that use it. */
static bool watch_mask(struct ggml_tensor *t, bool ask, void *user) {
    int j;
    (void) user;
    if (!ask) {
        return false;
    }
    for (j = 0; j < GGML_MAX_SRC; ++j) {
        const struct ggml_tensor *src = t->src[j];
        /* an iSWA model has two masks of that name: the widest (the full-attention cache's) */
        if (src && strcmp(ggml_get_name(src), "attn_inp_kq_mask") == 0 && src->ne[0] > cur_n_kv) {
            cur_n_kv = src->ne[0];
        }
    }
    return false;
}

static void quiet_log(enum ggml_log_level level, const char *text, void *user) {
    (void) user;
    if (level == GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint32_t rnd(uint32_t n) {
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t) (rng_state >> 33) % n;
}

struct run {
    struct llama_context *ctx;
    float *logits; /* the last decode's outputs, n_out * n_vocab */
    double mean_n_kv;
    double seconds;
    long n_tokens;
};

#define MAX_SEQ 64

/* LLAMA_MEMORY_BENCH_THREADS, else 2: more threads than cores spin against each other. */
static int n_threads = 2;
static double tol = TOL_F32;

/* The workload: sequence s holds len[s] tokens and stops at goal[s], then restarts with a new
 * prompt. Every decode: the prompts of restarting sequences, then one token of every running
 * sequence. The random choices depend only on the step, so both contexts see the same. */
static int run_workload(struct llama_context *ctx, int n_seq, int n_decodes, int n_ctx, int n_vocab,
                        const struct llama_context *other, struct run *r, double *max_diff, long *n_cmp) {
    llama_memory_t mem = llama_get_memory(ctx);
    struct llama_batch b = llama_batch_init(n_ctx, 0, 1);
    int len[MAX_SEQ], goal[MAX_SEQ];
    int s, step, i;
    const int budget = n_ctx / n_seq; /* tokens a sequence may hold */
    struct timespec t0, t1;
    rng_state = 0x9e3779b97f4a7c15ull;
    n_kv_sum = n_kv_count = used_sum = 0;
    for (s = 0; s < n_seq; ++s) {
        len[s] = 0;
        goal[s] = 0;
    }
    r->n_tokens = 0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (step = 0; step < n_decodes; ++step) {
        b.n_tokens = 0;
        for (s = 0; s < n_seq; ++s) {
            if (len[s] >= goal[s]) {
                /* done: free it and start a new one with a prompt */
                llama_memory_seq_rm(mem, s, -1, -1);
                if (other) {
                    llama_memory_seq_rm(llama_get_memory(other), s, -1, -1);
                }
                goal[s] = budget / 2 + (int) rnd((uint32_t) (budget / 2));
                len[s] = 0;
                {
                    int n_prompt = 1 + (int) rnd((uint32_t) (goal[s] / 2 + 1));
                    for (i = 0; i < n_prompt; ++i) {
                        b.token[b.n_tokens] = (llama_token) rnd((uint32_t) n_vocab);
                        b.pos[b.n_tokens] = len[s]++;
                        b.n_seq_id[b.n_tokens] = 1;
                        b.seq_id[b.n_tokens][0] = s;
                        b.logits[b.n_tokens] = i == n_prompt - 1;
                        b.n_tokens++;
                    }
                }
            } else {
                b.token[b.n_tokens] = (llama_token) rnd((uint32_t) n_vocab);
                b.pos[b.n_tokens] = len[s]++;
                b.n_seq_id[b.n_tokens] = 1;
                b.seq_id[b.n_tokens][0] = s;
                b.logits[b.n_tokens] = 1;
                b.n_tokens++;
            }
        }
        r->n_tokens += b.n_tokens;
        cur_n_kv = -1;
        if (llama_decode(ctx, b) != 0) {
            fprintf(stderr, "defrag: decode %d failed\n", step);
            llama_batch_free(b);
            return 1;
        }
        if (cur_n_kv < 0) {
            fprintf(stderr, "defrag: decode %d: no KQ mask seen\n", step);
            llama_batch_free(b);
            return 1;
        }
        n_kv_sum += cur_n_kv;
        n_kv_count++;
        for (s = 0; s < n_seq; ++s) {
            used_sum += len[s]; /* one cell per token, none shared */
        }
        if (other) {
            /* the other context decodes the same batch; every output is compared */
            struct llama_context *o = (struct llama_context *) other;
            if (llama_decode(o, b) != 0) {
                fprintf(stderr, "defrag: decode %d failed on the reference context\n", step);
                llama_batch_free(b);
                return 1;
            }
            for (i = 0; i < b.n_tokens; ++i) {
                const float *x, *y;
                int k;
                if (!b.logits[i]) {
                    continue;
                }
                x = llama_get_logits_ith(ctx, i);
                y = llama_get_logits_ith(o, i);
                for (k = 0; k < n_vocab; ++k) {
                    double d = fabs((double) x[k] - (double) y[k]) / fmax(1.0, fabs((double) y[k]));
                    if (d > *max_diff) {
                        *max_diff = d;
                    }
                    if (d > tol) {
                        fprintf(stderr, "defrag: decode %d, output %d, logit %d: %g vs %g\n", step, i, k,
                                (double) x[k], (double) y[k]);
                        llama_batch_free(b);
                        return 1;
                    }
                }
                (*n_cmp)++;
            }
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    r->seconds = (double) (t1.tv_sec - t0.tv_sec) + 1e-9 * (double) (t1.tv_nsec - t0.tv_nsec);
    llama_batch_free(b);
    return 0;
}

static struct llama_context *make_ctx(struct llama_model *model, int n_ctx, int fa, int n_seq, float thold) {
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t) n_ctx;
    cp.n_batch = (uint32_t) n_ctx;
    cp.n_ubatch = 512;
    cp.n_seq_max = (uint32_t) n_seq;
    cp.kv_unified = true;
    cp.flash_attn_type = fa ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.defrag_thold = thold;
    cp.cb_eval = watch_mask;
    cp.no_perf = true;
    cp.n_threads = n_threads;
    cp.n_threads_batch = n_threads;
    return llama_init_from_model(model, cp);
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: defrag <model> <n_ctx> <fa> <n_seq> <n_decodes> <defrag_thold> <test|bench>\n");
        return 2;
    }
    const char *path = argv[1];
    const int n_ctx = atoi(argv[2]), fa = atoi(argv[3]), n_seq = atoi(argv[4]), n_decodes = atoi(argv[5]);
    const float thold = (float) atof(argv[6]);
    const int test = strcmp(argv[7], "test") == 0;
    struct llama_model_params mp = llama_model_default_params();
    struct llama_model *model;
    struct llama_context *ctx, *ref = NULL;
    struct run r, rr;
    int n_vocab, rc;
    double max_diff = 0, mean_ref = 0;
    long n_cmp = 0;

    if (n_seq < 1 || n_seq > MAX_SEQ) {
        return 2;
    }
    tol = fa ? TOL_FA : TOL_F32;
    if (getenv("LLAMA_MEMORY_BENCH_THREADS")) {
        n_threads = atoi(getenv("LLAMA_MEMORY_BENCH_THREADS"));
    }
    llama_log_set(quiet_log, NULL);
    llama_backend_init();
    mp.n_gpu_layers = 0;
    model = llama_model_load_from_file(path, mp);
    if (!model) {
        fprintf(stderr, "defrag: cannot load %s\n", path);
        return 1;
    }
    n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    ctx = make_ctx(model, n_ctx, fa, n_seq, thold);
    if (!ctx) {
        return 1;
    }
    memset(&r, 0, sizeof(r));
    memset(&rr, 0, sizeof(rr));
    if (test) {
        /* first the reference alone for its n_kv, then both in step for the logits */
        ref = make_ctx(model, n_ctx, fa, n_seq, -1.0f);
        if (!ref || run_workload(ref, n_seq, n_decodes, n_ctx, n_vocab, NULL, &rr, NULL, NULL) != 0) {
            return 1;
        }
        mean_ref = (double) n_kv_sum / (double) (n_kv_count ? n_kv_count : 1);
        llama_memory_clear(llama_get_memory(ref), true);
        rc = run_workload(ctx, n_seq, n_decodes, n_ctx, n_vocab, ref, &r, &max_diff, &n_cmp);
        /* n_kv_sum now counts both contexts' masks: run ours alone once more */
        if (rc == 0) {
            llama_memory_clear(llama_get_memory(ctx), true);
            rc = run_workload(ctx, n_seq, n_decodes, n_ctx, n_vocab, NULL, &r, NULL, NULL);
        }
        if (rc != 0) {
            return 1;
        }
        r.mean_n_kv = (double) n_kv_sum / (double) (n_kv_count ? n_kv_count : 1);
        printf("defrag test: fa %d, %d seqs, %d decodes: mean n_kv %.1f compacted vs %.1f; %ld outputs compared, "
               "max |logit diff| / max(1, |logit|) %.3g (tolerance %g)\n",
               fa, n_seq, n_decodes, r.mean_n_kv, mean_ref, n_cmp, max_diff, tol);
        if (!(r.mean_n_kv < mean_ref)) {
            fprintf(stderr, "defrag: no compaction (mean n_kv %.1f vs %.1f)\n", r.mean_n_kv, mean_ref);
            return 1;
        }
        llama_free(ref);
    } else {
        if (run_workload(ctx, n_seq, n_decodes, n_ctx, n_vocab, NULL, &r, NULL, NULL) != 0) {
            return 1;
        }
        r.mean_n_kv = (double) n_kv_sum / (double) (n_kv_count ? n_kv_count : 1);
        printf("{\"fa\": %d, \"n_seq\": %d, \"n_ctx\": %d, \"decodes\": %d, \"thold\": %g, \"mean_n_kv\": %.1f, "
               "\"mean_used\": %.1f, \"tokens\": %ld, \"seconds\": %.4f, \"tok_per_s\": %.1f}\n",
               fa, n_seq, n_ctx, n_decodes, (double) thold, r.mean_n_kv,
               (double) used_sum / (double) (n_kv_count ? n_kv_count : 1), r.n_tokens, r.seconds,
               (double) r.n_tokens / r.seconds);
    }
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
