/*
 * End-to-end benchmark of a libllama: llama.h only, built once and run against the drop-in
 * libllama or against stock (both have the soname libllama.so.0, so LD_LIBRARY_PATH picks
 * the library; the one loaded is printed from /proc/self/maps). scripts/bench-dropin.sh
 * writes the models, builds this file and runs the two libraries alternately.
 *
 *   bench <model.gguf> <test> [--threads N] [--reps N] [--steps N] [--kv-unified 0|1]
 *
 * Tests (each prints `RESULT <metric> <value> <unit>` lines; every value is a median over
 * --reps repetitions inside the process):
 *
 *   decode1   one sequence, short context (n_ctx 4096): a 32-token prompt, then --steps
 *             (default 256) single-token llama_decode calls; tokens/s.
 *   decode16  16 sequences in 32768 cells (n_seq_max 16, unified cache unless --kv-unified 0):
 *             every sequence filled to 1792 tokens (512-token batches of 32 tokens from each
 *             sequence, so the cells interleave in 32-cell chunks; reported as fill tokens/s),
 *             then --steps (default 64) parallel steps of one token per sequence; tokens/s.
 *             Between repetitions each sequence's steps are removed again (llama_memory_seq_rm).
 *   prompt    one sequence (n_ctx 4096): four 512-token prompt batches (positions 0..2047)
 *             after a llama_memory_clear; tokens/s.
 *   state     one sequence of 4096 tokens (n_ctx 8192): llama_state_seq_get_data into a
 *             buffer and llama_state_seq_set_data of that buffer back into the sequence;
 *             microseconds per call.
 *
 * The decode and prompt tests also print the process CPU time per token (or per step): on a
 * shared machine it is disturbed less by the other tenants than the wall clock.
 * BENCH_PERF_CTL=<fifo> writes "enable" to perf's control fifo at the first timed section
 * (perf record --control=fifo:<fifo> -D -1), so a profile leaves setup and warm-up out.
 *
 * Tokens are a fixed pseudo-random stream (no sampling): both libraries do the same work.
 * Exit status 0 on success, 1 on a setup failure or a failed call.
 */
#include "llama.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static struct llama_model *model;
static int n_vocab;
static int n_threads = 1;
static int reps = 5;
static int steps = -1;
static int kv_unified = 1;

static void die(const char *what) {
    fprintf(stderr, "bench: %s\n", what);
    exit(1);
}

static void quiet_log(enum ggml_log_level level, const char *text, void *user) {
    (void) user;
    if (level == GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

static double clock_s(clockid_t id) {
    struct timespec ts;
    clock_gettime(id, &ts);
    return (double) ts.tv_sec + (double) ts.tv_nsec * 1e-9;
}

/* Wall time; cpu_now() is the process's CPU time (all threads), which the other tenants of a
 * shared machine disturb less than the wall clock. */
static double now(void) { return clock_s(CLOCK_MONOTONIC); }
static double cpu_now(void) { return clock_s(CLOCK_PROCESS_CPUTIME_ID); }

/* With BENCH_PERF_CTL=<fifo> (perf record --control=fifo:<fifo> -D -1), the profile starts
 * at the first timed section: setup and warm-up are left out. */
static void perf_enable(void) {
    static int done;
    const char *path = getenv("BENCH_PERF_CTL");
    if (done || !path || !*path) {
        return;
    }
    done = 1;
    FILE *f = fopen(path, "w");
    if (f) {
        fputs("enable\n", f);
        fclose(f);
    }
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *) a, y = *(const double *) b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, (size_t) n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static uint32_t rng = 12345;
static llama_token next_token(void) {
    rng = rng * 1664525u + 1013904223u;
    return (llama_token) ((rng >> 8) % (uint32_t) n_vocab);
}

/* Which libllama this process mapped: the path from /proc/self/maps. */
static void print_library(void) {
    FILE *f = fopen("/proc/self/maps", "r");
    char line[4096];
    while (f && fgets(line, sizeof line, f)) {
        char *p = strstr(line, "libllama");
        if (p) {
            char *path = strchr(line, '/');
            if (path) {
                path[strcspn(path, "\n")] = 0;
                printf("LIBRARY %s\n", path);
            }
            break;
        }
    }
    if (f) {
        fclose(f);
    }
}

static struct llama_context *new_ctx(uint32_t n_ctx, uint32_t n_seq_max, uint32_t n_batch, int unified) {
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_ctx;
    cp.n_batch = n_batch;
    cp.n_ubatch = n_batch;
    cp.n_seq_max = n_seq_max;
    cp.n_threads = n_threads;
    cp.n_threads_batch = n_threads;
    cp.kv_unified = unified != 0;
    cp.no_perf = true;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        die("cannot create the context");
    }
    return ctx;
}

/* A batch of n tokens of one sequence at positions pos0.., output on the last only. */
static void fill_seq(struct llama_batch *b, llama_seq_id seq, llama_pos pos0, int n) {
    for (int i = 0; i < n; i++) {
        int k = b->n_tokens++;
        b->token[k] = next_token();
        b->pos[k] = pos0 + i;
        b->n_seq_id[k] = 1;
        b->seq_id[k][0] = seq;
        b->logits[k] = (int8_t) (i == n - 1);
    }
}

static void decode(struct llama_context *ctx, struct llama_batch b) {
    int rc = llama_decode(ctx, b);
    if (rc != 0) {
        fprintf(stderr, "bench: llama_decode returned %d (n_tokens %d)\n", rc, b.n_tokens);
        exit(1);
    }
}

static void prompt_one(struct llama_context *ctx, struct llama_batch *b, llama_seq_id seq, llama_pos pos0, int n) {
    b->n_tokens = 0;
    fill_seq(b, seq, pos0, n);
    decode(ctx, *b);
}

static void test_decode1(void) {
    const int n_steps = steps > 0 ? steps : 256, n_prompt = 32;
    struct llama_context *ctx = new_ctx(4096, 1, 512, 1);
    llama_memory_t mem = llama_get_memory(ctx);
    struct llama_batch b = llama_batch_init(512, 0, 1);
    double *tps = calloc((size_t) reps, sizeof *tps), *cpu = calloc((size_t) reps, sizeof *cpu);
    for (int r = -1; r < reps; r++) { /* r = -1: warm-up */
        llama_memory_clear(mem, true);
        prompt_one(ctx, &b, 0, 0, n_prompt);
        if (r >= 0) {
            perf_enable();
        }
        double t0 = now(), c0 = cpu_now();
        for (int i = 0; i < n_steps; i++) {
            prompt_one(ctx, &b, 0, n_prompt + i, 1);
        }
        double dt = now() - t0, dc = cpu_now() - c0;
        if (r >= 0) {
            tps[r] = n_steps / dt;
            cpu[r] = 1e6 * dc / n_steps;
        }
    }
    printf("RESULT decode1_tok_per_s %.1f tok/s\n", median(tps, reps));
    printf("RESULT decode1_cpu_us_per_tok %.1f us\n", median(cpu, reps));
    free(tps);
    free(cpu);
    llama_batch_free(b);
    llama_free(ctx);
}

static void test_decode16(void) {
    enum { N_SEQ = 16, FILL = 1792, CHUNK = 32 };
    const int n_steps = steps > 0 ? steps : 64;
    struct llama_context *ctx = new_ctx(32768, N_SEQ, 512, kv_unified);
    llama_memory_t mem = llama_get_memory(ctx);
    struct llama_batch b = llama_batch_init(512, 0, 1);

    /* Fill: batches of 512 tokens, CHUNK from each sequence. */
    double t0 = now(), c0 = cpu_now();
    for (int pos = 0; pos < FILL; pos += CHUNK) {
        b.n_tokens = 0;
        for (llama_seq_id s = 0; s < N_SEQ; s++) {
            fill_seq(&b, s, pos, CHUNK);
        }
        decode(ctx, b);
    }
    double fill_s = now() - t0, fill_cpu = cpu_now() - c0;
    printf("RESULT decode16_fill_tok_per_s %.1f tok/s\n", N_SEQ * FILL / fill_s);
    printf("RESULT decode16_fill_cpu_us_per_tok %.2f us\n", 1e6 * fill_cpu / (N_SEQ * FILL));

    double *tps = calloc((size_t) reps, sizeof *tps), *cpu = calloc((size_t) reps, sizeof *cpu);
    for (int r = -1; r < reps; r++) {
        for (llama_seq_id s = 0; s < N_SEQ; s++) {
            if (!llama_memory_seq_rm(mem, s, FILL, -1)) {
                die("seq_rm failed");
            }
        }
        if (r >= 0) {
            perf_enable();
        }
        double t1 = now(), c1 = cpu_now();
        for (int i = 0; i < n_steps; i++) {
            b.n_tokens = 0;
            for (llama_seq_id s = 0; s < N_SEQ; s++) {
                fill_seq(&b, s, FILL + i, 1);
            }
            decode(ctx, b);
        }
        double dt = now() - t1, dc = cpu_now() - c1;
        if (r >= 0) {
            tps[r] = N_SEQ * n_steps / dt;
            cpu[r] = 1e6 * dc / n_steps;
        }
    }
    printf("RESULT decode16_tok_per_s %.1f tok/s\n", median(tps, reps));
    printf("RESULT decode16_cpu_us_per_step %.1f us\n", median(cpu, reps));
    free(tps);
    free(cpu);
    llama_batch_free(b);
    llama_free(ctx);
}

static void test_prompt(void) {
    enum { N_PROMPT = 512, N_BATCHES = 4 };
    struct llama_context *ctx = new_ctx(4096, 1, N_PROMPT, 1);
    llama_memory_t mem = llama_get_memory(ctx);
    struct llama_batch b = llama_batch_init(N_PROMPT, 0, 1);
    double *tps = calloc((size_t) reps, sizeof *tps), *cpu = calloc((size_t) reps, sizeof *cpu);
    for (int r = -1; r < reps; r++) {
        llama_memory_clear(mem, true);
        if (r >= 0) {
            perf_enable();
        }
        double t0 = now(), c0 = cpu_now();
        for (int k = 0; k < N_BATCHES; k++) {
            prompt_one(ctx, &b, 0, k * N_PROMPT, N_PROMPT);
        }
        double dt = now() - t0, dc = cpu_now() - c0;
        if (r >= 0) {
            tps[r] = N_PROMPT * N_BATCHES / dt;
            cpu[r] = 1e6 * dc / (N_PROMPT * N_BATCHES);
        }
    }
    printf("RESULT prompt512_tok_per_s %.1f tok/s\n", median(tps, reps));
    printf("RESULT prompt512_cpu_us_per_tok %.2f us\n", median(cpu, reps));
    free(tps);
    free(cpu);
    llama_batch_free(b);
    llama_free(ctx);
}

static void test_state(void) {
    enum { N_TOK = 4096 };
    const int n_calls = 20;
    struct llama_context *ctx = new_ctx(8192, 1, 512, 1);
    struct llama_batch b = llama_batch_init(512, 0, 1);
    for (int pos = 0; pos < N_TOK; pos += 512) {
        prompt_one(ctx, &b, 0, pos, 512);
    }
    size_t n = llama_state_seq_get_size(ctx, 0);
    uint8_t *buf = malloc(n);
    if (!buf) {
        die("out of memory");
    }
    double *get_us = calloc((size_t) reps, sizeof *get_us);
    double *set_us = calloc((size_t) reps, sizeof *set_us);
    for (int r = -1; r < reps; r++) {
        if (r >= 0) {
            perf_enable();
        }
        double t0 = now();
        for (int i = 0; i < n_calls; i++) {
            if (llama_state_seq_get_data(ctx, buf, n, 0) != n) {
                die("llama_state_seq_get_data failed");
            }
        }
        double t1 = now();
        for (int i = 0; i < n_calls; i++) {
            if (llama_state_seq_set_data(ctx, buf, n, 0) != n) {
                die("llama_state_seq_set_data failed");
            }
        }
        double t2 = now();
        if (r >= 0) {
            get_us[r] = 1e6 * (t1 - t0) / n_calls;
            set_us[r] = 1e6 * (t2 - t1) / n_calls;
        }
    }
    if (llama_memory_seq_pos_max(llama_get_memory(ctx), 0) != N_TOK - 1) {
        die("the restored sequence has the wrong positions");
    }
    printf("RESULT state_bytes %zu B\n", n);
    printf("RESULT state_get_us %.1f us\n", median(get_us, reps));
    printf("RESULT state_set_us %.1f us\n", median(set_us, reps));
    free(get_us);
    free(set_us);
    free(buf);
    llama_batch_free(b);
    llama_free(ctx);
}

int main(int argc, char **argv) {
    if (argc < 3 || (argc - 3) % 2) {
        fprintf(stderr, "usage: %s <model.gguf> decode1|decode16|prompt|state "
                        "[--threads N] [--reps N] [--steps N] [--kv-unified 0|1]\n", argv[0]);
        return 1;
    }
    for (int i = 4; i < argc; i += 2) {
        int v = atoi(argv[i]);
        if (strcmp(argv[i - 1], "--threads") == 0) n_threads = v;
        else if (strcmp(argv[i - 1], "--reps") == 0) reps = v;
        else if (strcmp(argv[i - 1], "--steps") == 0) steps = v;
        else if (strcmp(argv[i - 1], "--kv-unified") == 0) kv_unified = v;
        else die("unknown option");
    }
    if (reps < 1) {
        die("--reps must be at least 1");
    }
    llama_log_set(quiet_log, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        die("cannot load the model");
    }
    n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    print_library();

    const char *test = argv[2];
    if (strcmp(test, "decode1") == 0) test_decode1();
    else if (strcmp(test, "decode16") == 0) test_decode16();
    else if (strcmp(test, "prompt") == 0) test_prompt();
    else if (strcmp(test, "state") == 0) test_state();
    else die("unknown test");

    llama_model_free(model);
    llama_backend_free();
    return 0;
}
