/*
 * Greedy generation on a real model, llama.h only: built unchanged against the drop-in
 * libllama (`llama`) and against stock (`llama_stock`); tests/dropin/compare.cmake runs both
 * and compares the outputs byte for byte.
 *
 *   generate <model.gguf> <out.txt> [--n-predict N] [--n-ctx N] [--threads N]
 *            [--flash-attn -1|0|1] [--n-ubatch N] [--prompt TEXT]
 *
 * Loads the model, tokenizes a fixed prompt with llama_tokenize (special tokens added as the
 * vocabulary asks), decodes it in one batch, then N tokens (256 by default), each the argmax of
 * the last logits (lowest id on a tie; end-of-generation tokens do not stop it, so the count is
 * fixed), decoded one at a time. <out.txt> gets the prompt's token ids, every generated id
 * with an FNV-1a hash of the float bits of the logits it was chosen from, the sequence's
 * position range and state size at the end, and the raw bits of the last logit vector, in hex.
 * The generated text goes to stdout, the timings to stderr (neither is compared).
 *
 * Exit status: 0 when the generation ran, 1 on a failure (arguments, model, context, decode).
 */
#include "llama.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char *default_prompt =
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg";

static void die(const char *what) {
    fprintf(stderr, "generate: %s\n", what);
    exit(1);
}

static void quiet_log(enum ggml_log_level level, const char *text, void *user_data) {
    (void) user_data;
    if (level == GGML_LOG_LEVEL_ERROR) {
        fputs(text, stderr);
    }
}

static double now(void) {
    struct timespec ts;
    timespec_get(&ts, TIME_UTC); /* C11 */
    return (double) ts.tv_sec + (double) ts.tv_nsec * 1e-9;
}

static uint32_t float_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static uint64_t fnv1a_floats(const float *p, int n) {
    uint64_t h = 1469598103934665603ull;
    for (int i = 0; i < n; i++) {
        uint32_t u = float_bits(p[i]);
        for (int b = 0; b < 4; b++) {
            h ^= (u >> (8 * b)) & 0xffu;
            h *= 1099511628211ull;
        }
    }
    return h;
}

static llama_token argmax(const float *logits, int n) {
    llama_token best = 0;
    for (int i = 1; i < n; i++) {
        if (logits[i] > logits[best]) {
            best = i;
        }
    }
    return best;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s <model.gguf> <out.txt> [--n-predict N] [--n-ctx N] [--threads N] "
                        "[--flash-attn -1|0|1] [--n-ubatch N] [--prompt TEXT]\n", argv[0]);
        return 1;
    }
    const char *model_path = argv[1];
    const char *out_path = argv[2];
    const char *text = default_prompt;
    int n_predict = 256, n_ctx = 0, n_threads = 2, flash_attn = -1, n_ubatch = 512;
    for (int i = 3; i < argc; i++) {
        if (i + 1 >= argc) {
            die("option without a value");
        }
        const char *v = argv[++i];
        if (strcmp(argv[i - 1], "--n-predict") == 0) n_predict = atoi(v);
        else if (strcmp(argv[i - 1], "--n-ctx") == 0) n_ctx = atoi(v);
        else if (strcmp(argv[i - 1], "--threads") == 0) n_threads = atoi(v);
        else if (strcmp(argv[i - 1], "--flash-attn") == 0) flash_attn = atoi(v);
        else if (strcmp(argv[i - 1], "--n-ubatch") == 0) n_ubatch = atoi(v);
        else if (strcmp(argv[i - 1], "--prompt") == 0) text = v;
        else die("unknown option");
    }
    if (n_predict < 1 || n_threads < 1 || n_ubatch < 1) {
        die("bad option value");
    }

    llama_log_set(quiet_log, NULL);
    llama_backend_init();

    double t0 = now();
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    struct llama_model *model = llama_model_load_from_file(model_path, mp);
    if (!model) {
        die("cannot load the model");
    }
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);
    if (n_vocab <= 0) {
        die("empty vocabulary");
    }

    /* The prompt's tokens: the first call tells how many there are. */
    const int32_t text_len = (int32_t) strlen(text);
    int32_t n_prompt = -llama_tokenize(vocab, text, text_len, NULL, 0, true, false);
    if (n_prompt <= 0) {
        die("cannot tokenize the prompt");
    }
    llama_token *prompt = malloc(sizeof(llama_token) * (size_t) n_prompt);
    if (!prompt) {
        die("out of memory");
    }
    if (llama_tokenize(vocab, text, text_len, prompt, n_prompt, true, false) != n_prompt) {
        die("cannot tokenize the prompt");
    }

    if (n_ctx <= 0) {
        n_ctx = n_prompt + n_predict;
    }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t) n_ctx;
    cp.n_batch = (uint32_t) (n_prompt > 512 ? n_prompt : 512);
    cp.n_ubatch = (uint32_t) n_ubatch;
    cp.n_seq_max = 1;
    cp.n_threads = n_threads;
    cp.n_threads_batch = n_threads;
    cp.flash_attn_type = flash_attn < 0 ? LLAMA_FLASH_ATTN_TYPE_AUTO
                         : flash_attn   ? LLAMA_FLASH_ATTN_TYPE_ENABLED
                                        : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.no_perf = true;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        die("cannot create the context");
    }
    llama_memory_t mem = llama_get_memory(ctx);
    double t_load = now() - t0;

    FILE *out = fopen(out_path, "wb");
    if (!out) {
        die("cannot open the output file");
    }
    fprintf(out, "setup n_vocab=%d n_ctx=%u n_batch=%u n_ubatch=%u n_threads=%d flash_attn=%d n_prompt=%d n_predict=%d\n",
            n_vocab, llama_n_ctx(ctx), llama_n_batch(ctx), llama_n_ubatch(ctx), n_threads, flash_attn, n_prompt,
            n_predict);
    fprintf(out, "prompt");
    for (int i = 0; i < n_prompt; i++) {
        fprintf(out, " %d", prompt[i]);
    }
    fputc('\n', out);

    t0 = now();
    int rc = llama_decode(ctx, llama_batch_get_one(prompt, n_prompt));
    fprintf(out, "decode prompt rc=%d\n", rc);
    if (rc != 0) {
        fclose(out);
        die("the prompt's decode failed");
    }
    double t_prompt = now() - t0;

    fputs(text, stdout);
    t0 = now();
    const float *logits = NULL;
    for (int i = 0; i < n_predict; i++) {
        logits = llama_get_logits_ith(ctx, -1);
        if (!logits) {
            fclose(out);
            die("no logits");
        }
        llama_token tok = argmax(logits, n_vocab);
        fprintf(out, "token %d id=%d eog=%d logits_fnv=%016llx max_bits=%08x\n", i, tok,
                llama_vocab_is_eog(vocab, tok) ? 1 : 0, (unsigned long long) fnv1a_floats(logits, n_vocab),
                float_bits(logits[tok]));
        char piece[256];
        int n = llama_token_to_piece(vocab, tok, piece, sizeof piece, 0, false);
        if (n > 0) {
            fwrite(piece, 1, (size_t) n, stdout);
        }
        if (i + 1 == n_predict) {
            break; /* the last token's own logits are not needed */
        }
        rc = llama_decode(ctx, llama_batch_get_one(&tok, 1));
        if (rc != 0) {
            fprintf(out, "decode token %d rc=%d\n", i, rc);
            fclose(out);
            die("a decode failed");
        }
    }
    double t_gen = now() - t0;
    fputc('\n', stdout);

    fprintf(out, "memory seq 0 pos=[%d,%d] state_seq_size=%zu\n", llama_memory_seq_pos_min(mem, 0),
            llama_memory_seq_pos_max(mem, 0), llama_state_seq_get_size(ctx, 0));
    fprintf(out, "logits last n=%d fnv=%016llx\n", n_vocab, (unsigned long long) fnv1a_floats(logits, n_vocab));
    for (int i = 0; i < n_vocab; i++) {
        fprintf(out, "%08x%c", float_bits(logits[i]), (i % 8 == 7 || i + 1 == n_vocab) ? '\n' : ' ');
    }
    if (fclose(out) != 0) {
        die("cannot write the output file");
    }
    fprintf(stderr, "generate: load %.2f s, prompt %d tokens %.2f s, %d tokens %.2f s (%.1f tokens/s)\n", t_load,
            n_prompt, t_prompt, n_predict, t_gen, (double) (n_predict - 1) / (t_gen > 0 ? t_gen : 1));

    free(prompt);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
