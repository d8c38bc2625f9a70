// A gemma4-assistant draft context over its target's cells, as llama.cpp's speculative
// decoding drives the pair (common/speculative.cpp): the target (a `gemma4` model) decodes with
// its NextN hidden states on; the assistant's context takes the target's context
// (llama_context_params::ctx_other) and its memory is an iSWA cache over the target's cells and
// tensors (upstream's [TAG_KV_CACHE_SHARE_CELLS]), which it reads and never changes. Drafts go
// at the target's next position, each with the hidden state before it. Then the assistant's
// memory functions (no-ops, positions read from the target's cells, a clear that empties the
// target's cells), its states, a shift and a trim on the target seen by later drafts. Built
// against stock libllama and the drop-in; compare.cmake compares the outputs byte for byte.
//
//   assistant <target.gguf> <out.txt> --assistant <assistant.gguf> [--flash-attn 0|1] [--kv-unified 0|1]
//
// Writes the memories' log lines, every logit vector (as exact hex), every return value, the
// position ranges of both contexts and the state blobs (hex) in order.
#include "llama.h"
#include "llama-ext.h"
#include "out_lines.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

namespace {

struct draft_row {
    llama_seq_id  seq;
    llama_token   tok;
    llama_pos     pos;
    const float * h;
};

// one assistant step: a token per sequence with the hidden state it follows (target width)
int decode_draft(llama_context * ctx, const std::vector<draft_row> & rows, int32_t n_embd_target) {
    llama_batch_ext * b = llama_batch_ext_init(ctx);
    int rc = 0;
    for (const auto & r : rows) {
        const int32_t idx = llama_batch_ext_add_token(b, r.seq, r.tok);
        if (idx < 0 || !llama_batch_ext_set_pos(b, idx, &r.pos) ||
            !llama_batch_ext_set_embd_token(b, idx, { r.h, 1, (size_t) n_embd_target }) ||
            !llama_batch_ext_set_output_logits(b, idx, true)) {
            rc = -100;
            break;
        }
    }
    if (rc == 0) {
        rc = llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, b);
    }
    llama_batch_ext_free(b);
    return rc;
}

llama_token argmax(const float * v, int32_t n) {
    llama_token best = 0;
    for (int32_t i = 1; i < n; ++i) {
        if (v[i] > v[best]) {
            best = i;
        }
    }
    return best;
}

}  // namespace

int main(int argc, char ** argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s <target.gguf> <out.txt> --assistant <assistant.gguf> [--flash-attn 0|1] [--kv-unified 0|1]\n", argv[0]);
        return 2;
    }
    const char * path_dft = nullptr;
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx     = 256;
    cp.n_batch   = 64;
    cp.n_ubatch  = 64;
    cp.n_seq_max = 2;
    cp.n_threads = cp.n_threads_batch = 1;
    for (int i = 3; i + 1 < argc; i += 2) {
        const long v = strtol(argv[i + 1], nullptr, 10);
        if (!strcmp(argv[i], "--assistant")) {
            path_dft = argv[i + 1];
        } else if (!strcmp(argv[i], "--flash-attn")) {
            cp.flash_attn_type = v ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
        } else if (!strcmp(argv[i], "--kv-unified")) {
            cp.kv_unified = v != 0;
        } else {
            fprintf(stderr, "assistant: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    if (!path_dft) {
        fprintf(stderr, "assistant: no --assistant model\n");
        return 2;
    }
    if (!open_out(argv[2], "assistant")) {
        return 2;
    }

    llama_model_params mp = llama_model_default_params();
    llama_model * model_tgt = llama_model_load_from_file(argv[1], mp);
    llama_model * model_dft = model_tgt ? llama_model_load_from_file(path_dft, mp) : nullptr;
    if (!model_tgt || !model_dft) {
        fprintf(stderr, "assistant: cannot load the models\n");
        return 1;
    }
    const int32_t n_embd  = llama_model_n_embd(model_tgt);
    const int32_t n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model_tgt));

    llama_context * tgt = llama_init_from_model(model_tgt, cp);
    llama_context_params dcp = cp;
    dcp.ctx_other = tgt;
    dcp.ctx_type  = LLAMA_CONTEXT_TYPE_MTP;
    llama_context * dft = tgt ? llama_init_from_model(model_dft, dcp) : nullptr;
    if (!tgt || !dft) {
        fprintf(stderr, "assistant: cannot create the contexts\n");
        return 1;
    }
    fprintf(g_out, "ctx_other %d\n", llama_get_ctx_other(dft) == tgt ? 1 : 0);
    llama_set_embeddings_nextn(tgt, true, false);
    llama_set_embeddings_nextn(dft, true, true);

    int failures = 0;
    auto check = [&](const char * what, int rc) {
        fprintf(g_out, "rc %s %d\n", what, rc);
        if (rc != 0) {
            ++failures;
        }
    };
    auto ranges = [&](const char * what) {
        put_ranges(tgt, (std::string("target ") + what).c_str());
        put_ranges(dft, (std::string("assistant ") + what).c_str());
    };

    // the target's hidden state of each sequence's last token, and its next position
    std::vector<std::vector<float>> last_h(2, std::vector<float>(n_embd, 0.0f));
    std::vector<llama_pos> next_pos(2, 0);
    std::vector<llama_token> last_tok(2, 0);
    auto prompt = [&](llama_seq_id seq, llama_pos p0, int n, int salt) {
        std::vector<llama_token> toks;
        for (int i = 0; i < n; ++i) {
            toks.push_back((llama_token) ((i * 7 + seq * 3 + salt) % n_vocab));
        }
        check("target decode", decode_target(tgt, seq, p0, toks));
        put_floats("target logits", llama_get_logits_ith(tgt, -1), (size_t) n_vocab);
        const float * h = llama_get_embeddings_nextn(tgt);
        if (h) {
            last_h[seq].assign(h + (size_t) n_embd * (n - 1), h + (size_t) n_embd * n);
        } else {
            ++failures;
            fprintf(g_out, "no target hidden states\n");
        }
        next_pos[seq] = p0 + n;
        last_tok[seq] = toks.back();
    };
    // `steps` drafts on both sequences at once, each from the last one's token and hidden state
    auto drafts = [&](int steps) {
        std::vector<std::vector<float>> h = last_h;
        std::vector<llama_token> tok = last_tok;
        for (int s = 0; s < steps; ++s) {
            std::vector<draft_row> rows;
            for (llama_seq_id seq = 0; seq < 2; ++seq) {
                rows.push_back({ seq, tok[seq], next_pos[seq], h[seq].data() });
            }
            const int rc = decode_draft(dft, rows, n_embd);
            check("draft", rc);
            if (rc != 0) {
                return;
            }
            const float * hn = llama_get_embeddings_nextn(dft);
            for (llama_seq_id seq = 0; seq < 2; ++seq) {
                const float * lg = llama_get_logits_ith(dft, seq);
                put_floats("draft logits", lg, (size_t) n_vocab);
                tok[seq] = argmax(lg, n_vocab);
                if (hn) {
                    h[seq].assign(hn + (size_t) n_embd * seq, hn + (size_t) n_embd * (seq + 1));
                }
            }
            fprintf(g_out, "draft tokens %d %d\n", tok[0], tok[1]);
        }
    };

    prompt(0, 0, 12, 1);
    prompt(1, 0, 9, 2);
    ranges("after the prompts");
    drafts(3);

    // the assistant's memory functions change nothing; its positions are the target's
    llama_memory_t mem = llama_get_memory(dft);
    fprintf(g_out, "seq_rm %d\n", llama_memory_seq_rm(mem, 0, 4, -1) ? 1 : 0);
    llama_memory_seq_cp(mem, 0, 1, -1, -1);
    llama_memory_seq_keep(mem, 1);
    llama_memory_seq_add(mem, 0, 0, -1, 5);
    llama_memory_seq_div(mem, 1, 0, -1, 2);
    ranges("after the assistant's sequence functions");
    fprintf(g_out, "can_shift %d\n", llama_memory_can_shift(mem) ? 1 : 0);

    // the assistant's states hold no memory
    std::vector<uint8_t> seq_state(llama_state_seq_get_size(dft, 0));
    fprintf(g_out, "state_seq_get_data %zu\n", llama_state_seq_get_data(dft, seq_state.data(), seq_state.size(), 0));
    put_blob("assistant seq0", seq_state);
    fprintf(g_out, "state_seq_set_data %zu\n", llama_state_seq_set_data(dft, seq_state.data(), seq_state.size(), 1));
    std::vector<uint8_t> whole(llama_state_get_size(dft));
    fprintf(g_out, "state_get_data %zu\n", llama_state_get_data(dft, whole.data(), whole.size()));
    put_blob("assistant whole", whole);
    fprintf(g_out, "state_set_data %zu\n", llama_state_set_data(dft, whole.data(), whole.size()));
    ranges("after the assistant's states");

    // the target's trim and shift, seen by the next drafts (the shift still pending in the
    // target's cells when the assistant decodes)
    llama_memory_t mem_tgt = llama_get_memory(tgt);
    fprintf(g_out, "target seq_rm %d\n", llama_memory_seq_rm(mem_tgt, 0, 8, -1) ? 1 : 0);
    next_pos[0] = 8;
    llama_memory_seq_add(mem_tgt, 1, 0, -1, 3);
    next_pos[1] += 3;
    ranges("after the target's trim and shift");
    drafts(2);
    prompt(0, next_pos[0], 3, 5);
    prompt(1, next_pos[1], 2, 6);
    drafts(2);

    // the target's states, with the assistant decoding over the restored cells
    std::vector<uint8_t> tgt_seq(llama_state_seq_get_size(tgt, 1));
    fprintf(g_out, "target state_seq_get_data %zu\n", llama_state_seq_get_data(tgt, tgt_seq.data(), tgt_seq.size(), 1));
    put_blob("target seq1", tgt_seq);

    // a clear through the assistant empties the target's cells and keeps the target's slot
    // search where it was: with one stream (--kv-unified 1), the next 12-token prompt starts
    // after the old cells (stock's head) and the one after it wraps to cell 0, so the whole
    // state lists sequence 0 first; a clear that also reset the target's search would list
    // sequence 1 first
    llama_memory_clear(mem, true);
    ranges("after the assistant's clear");
    prompt(1, 0, 12, 3);
    prompt(0, 0, 7, 4);
    ranges("after the new prompts");
    drafts(2);
    std::vector<uint8_t> tgt_whole(llama_state_get_size(tgt));
    fprintf(g_out, "target state_get_data %zu\n", llama_state_get_data(tgt, tgt_whole.data(), tgt_whole.size()));
    put_blob("target whole", tgt_whole);

    // the earlier sequence 1 restored in the target, drafts over it
    fprintf(g_out, "target state_seq_set_data %zu\n", llama_state_seq_set_data(tgt, tgt_seq.data(), tgt_seq.size(), 1));
    ranges("after the restore");
    next_pos[1] = llama_memory_seq_pos_max(llama_get_memory(tgt), 1) + 1;
    drafts(1);

    fclose(g_out);
    llama_free(dft);
    llama_free(tgt);
    llama_model_free(model_dft);
    llama_model_free(model_tgt);
    llama_backend_free();
    if (failures) {
        fprintf(stderr, "assistant: %d calls failed\n", failures);
    }
    return failures ? 1 : 0;
}
