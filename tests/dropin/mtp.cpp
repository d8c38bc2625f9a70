// An MTP (multi-token prediction) context next to its target context, as llama.cpp's MTP
// speculative decoding drives them (common/speculative.cpp): the model loaded with its NextN
// block (load_mtp), the target decoding prompts with its NextN hidden states on, and an
// LLAMA_CONTEXT_TYPE_MTP context whose KV cache holds the NextN layer only (create_memory's
// filter), fed each token with the target's hidden state of the token before it. Then the
// memory functions and states on the MTP context, and more drafts. Built against stock libllama
// and the drop-in; compare.cmake compares the outputs byte for byte.
//
//   mtp <model.gguf> <out.txt> [--flash-attn 0|1] [--kv-unified 0|1]
//
// Writes the memory's log lines, every logit vector (as exact hex), every return value, the
// position ranges and the state blobs (hex) in order.
#include "llama.h"
#include "llama-ext.h"
#include "out_lines.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

// the MTP step: token i of toks at p0 + i paired with the hidden state h[i] (one n_embd row each)
int decode_mtp(llama_context * ctx, llama_seq_id seq, llama_pos p0, const std::vector<llama_token> & toks,
               const std::vector<const float *> & h, int32_t n_embd) {
    llama_batch_ext * b = llama_batch_ext_init(ctx);
    int rc = 0;
    for (size_t i = 0; i < toks.size() && rc == 0; ++i) {
        const int32_t idx = llama_batch_ext_add_token(b, seq, toks[i]);
        const llama_pos pos = p0 + (llama_pos) i;
        if (idx < 0 || !llama_batch_ext_set_pos(b, idx, &pos) ||
            !llama_batch_ext_set_embd_token(b, idx, { h[i], 1, (size_t) n_embd }) ||
            !llama_batch_ext_set_output_logits(b, idx, i + 1 == toks.size())) {
            rc = -100;
        }
    }
    if (rc == 0) {
        rc = llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, b);
    }
    llama_batch_ext_free(b);
    return rc;
}

}  // namespace

int main(int argc, char ** argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s <model.gguf> <out.txt> [--flash-attn 0|1] [--kv-unified 0|1]\n", argv[0]);
        return 2;
    }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx     = 256;
    cp.n_batch   = 64;
    cp.n_ubatch  = 64;
    cp.n_seq_max = 2;
    cp.n_threads = cp.n_threads_batch = 1;
    for (int i = 3; i + 1 < argc; i += 2) {
        const long v = strtol(argv[i + 1], nullptr, 10);
        if (!strcmp(argv[i], "--flash-attn")) {
            cp.flash_attn_type = v ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
        } else if (!strcmp(argv[i], "--kv-unified")) {
            cp.kv_unified = v != 0;
        } else {
            fprintf(stderr, "mtp: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (!open_out(argv[2], "mtp")) {
        return 2;
    }

    llama_model_params mp = llama_model_default_params();
    mp.load_mtp = true;
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "mtp: cannot load %s\n", argv[1]);
        return 1;
    }
    const int32_t n_embd  = llama_model_n_embd(model);
    const int32_t n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));

    llama_context * tgt = llama_init_from_model(model, cp);
    llama_context_params mcp = cp;
    mcp.ctx_type = LLAMA_CONTEXT_TYPE_MTP;
    llama_context * mtp = tgt ? llama_init_from_model(model, mcp) : nullptr;
    if (!tgt || !mtp) {
        fprintf(stderr, "mtp: cannot create the contexts\n");
        return 1;
    }
    llama_set_embeddings_nextn(tgt, true, false);

    const std::vector<float> zeros(n_embd, 0.0f);
    int failures = 0;
    auto check = [&](const char * what, int rc) {
        fprintf(g_out, "rc %s %d\n", what, rc);
        if (rc != 0) {
            ++failures;
        }
    };

    // prompts of 10 tokens on each sequence, then each prompt's MTP step
    std::vector<std::vector<float>> hidden(2);
    for (llama_seq_id seq = 0; seq < 2; ++seq) {
        std::vector<llama_token> toks;
        for (int i = 0; i < 10; ++i) {
            toks.push_back((llama_token) ((i * 7 + seq * 3 + 1) % n_vocab));
        }
        check("target decode", decode_target(tgt, seq, 0, toks));
        const float * h = llama_get_embeddings_nextn(tgt);
        if (!h) {
            fprintf(stderr, "mtp: no NextN embeddings\n");
            return 1;
        }
        hidden[seq].assign(h, h + (size_t) n_embd * toks.size());
        // the token at position i goes with the target's state at i - 1 (zeros for the first)
        std::vector<const float *> rows = { zeros.data() };
        for (size_t i = 1; i < toks.size(); ++i) {
            rows.push_back(hidden[seq].data() + (i - 1) * n_embd);
        }
        check("mtp decode", decode_mtp(mtp, seq, 0, toks, rows, n_embd));
        put_floats("logits", llama_get_logits_ith(mtp, -1), (size_t) n_vocab);
        put_ranges(mtp, "after prompts");
    }

    // the memory functions on the MTP context: a rejected draft trimmed, a sequence copied,
    // states saved and restored
    llama_memory_t mem = llama_get_memory(mtp);
    fprintf(g_out, "seq_rm %d\n", llama_memory_seq_rm(mem, 0, 6, -1) ? 1 : 0);
    put_ranges(mtp, "after seq_rm(0, 6)");
    std::vector<uint8_t> seq_state(llama_state_seq_get_size(mtp, 0));
    const size_t n_seq = llama_state_seq_get_data(mtp, seq_state.data(), seq_state.size(), 0);
    fprintf(g_out, "state_seq_get_data %zu\n", n_seq);
    put_blob("seq0", seq_state);
    fprintf(g_out, "state_seq_set_data %zu\n", llama_state_seq_set_data(mtp, seq_state.data(), seq_state.size(), 1));
    put_ranges(mtp, "after restoring seq 0 into seq 1");
    std::vector<uint8_t> whole(llama_state_get_size(mtp));
    fprintf(g_out, "state_get_data %zu\n", llama_state_get_data(mtp, whole.data(), whole.size()));
    put_blob("whole", whole);
    llama_memory_clear(mem, true);
    put_ranges(mtp, "after clear");
    fprintf(g_out, "state_set_data %zu\n", llama_state_set_data(mtp, whole.data(), whole.size()));
    put_ranges(mtp, "after restoring the whole state");

    // drafts continue from position 6 on both sequences (seq 1 holds seq 0's cells now)
    for (llama_seq_id seq = 0; seq < 2; ++seq) {
        const std::vector<llama_token> toks = { 5, 9 };
        const std::vector<const float *> rows = { hidden[0].data() + 5 * n_embd, hidden[0].data() + 6 * n_embd };
        check("mtp draft", decode_mtp(mtp, seq, 6, toks, rows, n_embd));
        put_floats("logits", llama_get_logits_ith(mtp, -1), (size_t) n_vocab);
    }
    put_ranges(mtp, "after the drafts");
    fprintf(g_out, "can_shift %d\n", llama_memory_can_shift(mem) ? 1 : 0);

    fclose(g_out);
    llama_free(mtp);
    llama_free(tgt);
    llama_model_free(model);
    llama_backend_free();
    if (failures) {
        fprintf(stderr, "mtp: %d calls failed\n", failures);
    }
    return failures ? 1 : 0;
}
