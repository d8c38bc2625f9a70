// rsref: the rsref.h interface implemented by forwarding to the pinned llama.cpp's own
// llama_memory_recurrent, and the writers of the tiny mamba / lfm2 / jamba / gemma3 / qwen2vl test
// models. Test-only code:
// see kvref.h and rsref.h for why it exists.

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "ggml.h"
#include "ggml-backend.h"
#include "gguf.h"
#include "llama.h"

// Every header the patched one depends on first, so that the access hack below only applies to
// the text of llama-memory-recurrent.h itself.
#include "llama-arch.h"
#include "llama-batch.h"
#include "llama-cparams.h"
#include "llama-graph.h"
#include "llama-hparams.h"
#include "llama-io.h"
#include "llama-memory.h"
#include "llama-model.h"

// The shim observes (and the tests set) state the stock class keeps private: n_seq_max,
// ctxs_bufs. Same trick as kvref.cpp: no change of layout or mangling.
#define private public
#include "llama-memory-recurrent.h"
#undef private

// Only the kvref_* / rsref_* API is exported (see shim/kvref.map).
#pragma GCC visibility push(default)
#include "kvref.h"
#include "rsref.h"
#pragma GCC visibility pop

#include "kvref-common.h"

using namespace kvref_shim;

namespace {

// ---------------------------------------------------------------------------------------------
// GGUF writing

struct wspec {
    std::string name;
    int64_t ne0, ne1; // ne1 == 0: 1-D
    float offset;     // value = offset + scale * w, w uniform in [-0.1, 0.1)
    float scale;
    int64_t ne2 = 0;  // > 0: 3-D [ne0, ne1, ne2]
};

wspec rnd3(std::string name, int64_t ne0, int64_t ne1, int64_t ne2) {
    return {std::move(name), ne0, ne1, 0.0f, 1.0f, ne2};
}

wspec zeros(std::string name, int64_t ne0) {
    return {std::move(name), ne0, 0, 0.0f, 0.0f};
}

wspec rnd(std::string name, int64_t ne0, int64_t ne1 = 0) {
    return {std::move(name), ne0, ne1, 0.0f, 1.0f};
}

wspec ones(std::string name, int64_t ne0, int64_t ne1 = 0) {
    return {std::move(name), ne0, ne1, 1.0f, 0.0f};
}

// Writes the tensors of specs (F32, in order, values from the same fixed-seed xorshift as
// kvref_write_model) and the metadata set by set_kv to path.
bool write_gguf(const char * path, const char * arch, const std::function<void(gguf_context *)> & set_kv,
                const std::vector<wspec> & specs) {
    size_t n_floats = 0;
    for (const auto & s : specs) {
        n_floats += (size_t) s.ne0*(s.ne1 ? s.ne1 : 1)*(s.ne2 ? s.ne2 : 1);
    }

    ggml_init_params ip = {
        /*.mem_size   =*/ n_floats*sizeof(float) + specs.size()*(ggml_tensor_overhead() + 64),
        /*.mem_buffer =*/ nullptr,
        /*.no_alloc   =*/ false,
    };
    ggml_context * ctx = ggml_init(ip);
    if (!ctx) {
        return false;
    }
    gguf_context * gctx = gguf_init_empty();

    gguf_set_val_str(gctx, "general.architecture", arch);
    gguf_set_val_str(gctx, "tokenizer.ggml.model", "no_vocab");
    set_kv(gctx);

    uint64_t state = 0x9e3779b97f4a7c15ull;
    auto next_weight = [&state]() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        return ((float) (state >> 40) / (float) (1ull << 24) - 0.5f)*0.2f; // [-0.1, 0.1)
    };

    for (const auto & s : specs) {
        ggml_tensor * t = s.ne2 ? ggml_new_tensor_3d(ctx, GGML_TYPE_F32, s.ne0, s.ne1, s.ne2)
                        : s.ne1 ? ggml_new_tensor_2d(ctx, GGML_TYPE_F32, s.ne0, s.ne1)
                                : ggml_new_tensor_1d(ctx, GGML_TYPE_F32, s.ne0);
        ggml_set_name(t, s.name.c_str());
        float * d = (float *) t->data;
        for (int64_t i = 0; i < ggml_nelements(t); ++i) {
            d[i] = s.offset + (s.scale != 0.0f ? s.scale*next_weight() : 0.0f);
        }
        gguf_add_tensor(gctx, t);
    }

    const bool ok = gguf_write_to_file(gctx, path, /*only_meta =*/ false);

    gguf_free(gctx);
    ggml_free(ctx);
    return ok;
}

constexpr uint32_t TINY_VOCAB = 32;

// The tensors every writer starts with: token embeddings, the final norm (named `norm`) and the
// output projection.
std::vector<wspec> head_specs(int64_t n_embd, int64_t n_vocab, const char * norm = "output_norm.weight") {
    return {
        rnd("token_embd.weight", n_embd, n_vocab),
        ones(norm, n_embd),
        rnd("output.weight", n_embd, n_vocab),
    };
}

// "blk.<il>.", the prefix of layer il's tensor names.
std::string blk(int64_t il) {
    return "blk." + std::to_string(il) + ".";
}

// The Q, K and V projections of an attention layer, in that order.
void push_qkv(std::vector<wspec> & specs, const std::string & b, int64_t n_embd, int64_t n_embd_kv) {
    specs.push_back(rnd(b + "attn_q.weight", n_embd, n_embd));
    specs.push_back(rnd(b + "attn_k.weight", n_embd, n_embd_kv));
    specs.push_back(rnd(b + "attn_v.weight", n_embd, n_embd_kv));
}

// "<arch>.context_length" (4096), "<arch>.embedding_length" and "<arch>.block_count", the first
// keys of every writer.
void set_shape_kv(gguf_context * g, const std::string & arch, int64_t n_embd, int64_t n_layer) {
    gguf_set_val_u32(g, (arch + ".context_length").c_str(), 4096);
    gguf_set_val_u32(g, (arch + ".embedding_length").c_str(), (uint32_t) n_embd);
    gguf_set_val_u32(g, (arch + ".block_count").c_str(), (uint32_t) n_layer);
}

} // namespace

// ---------------------------------------------------------------------------------------------
// the standalone memory

struct rsref {
    llama_model * model = nullptr; // owned by the model cache
    // the memory every function works on: owned (rsref_new) or borrowed (a view, rs_view_new, of
    // the recurrent part of a hybrid memory that its cmpref owns)
    std::unique_ptr<llama_memory_recurrent> owned;
    llama_memory_recurrent * mem = nullptr;
};

rsref * kvref_shim::rs_view_new(llama_model * model, llama_memory_recurrent * mem) {
    auto r = std::make_unique<rsref>();
    r->model = model;
    r->mem = mem;
    return r.release();
}

void kvref_shim::rs_view_free(rsref * r) {
    delete r;
}

namespace {

ggml_tensor * tensor_of(const rsref * r, int32_t which, int32_t il) {
    const auto & m = *r->mem;
    if (il < 0 || (size_t) il >= m.r_l.size()) {
        return nullptr;
    }
    switch (which) {
        case 0:  return m.r_l[il];
        case 1:  return m.s_l[il];
        case 2:  return m.p_l[il];
        default: return nullptr;
    }
}

bool ubatch_ok(const kvref_ubatch * ub) {
    // stock find_slot: GGML_ASSERT(ubatch.equal_seqs())
    return ub->equal_seqs != 0;
}

} // namespace

extern "C" {

bool rsref_write_mamba(const char * path, uint32_t n_layer_u, uint32_t n_embd_u) {
    init_once();

    if (n_layer_u == 0 || n_embd_u == 0) {
        log_error("rsref_write_mamba", "invalid model shape");
        return false;
    }

    const int64_t n_embd = n_embd_u, n_layer = n_layer_u, n_vocab = TINY_VOCAB;
    const int64_t d_inner = 2*n_embd, d_state = 16, d_conv = 4, dt_rank = 4;

    std::vector<wspec> specs = head_specs(n_embd, n_vocab);
    for (int64_t il = 0; il < n_layer; ++il) {
        const std::string b = blk(il);
        specs.push_back(ones(b + "attn_norm.weight", n_embd));
        specs.push_back(rnd(b + "ssm_in.weight", n_embd, 2*d_inner));
        specs.push_back(rnd(b + "ssm_conv1d.weight", d_conv, d_inner));
        specs.push_back(rnd(b + "ssm_conv1d.bias", d_inner));
        specs.push_back(rnd(b + "ssm_x.weight", d_inner, dt_rank + 2*d_state));
        specs.push_back(rnd(b + "ssm_dt.weight", dt_rank, d_inner));
        specs.push_back(rnd(b + "ssm_dt.bias", d_inner));
        // A = -exp(A_log) in converted models: negative, so the state decays
        specs.push_back({b + "ssm_a", d_state, d_inner, -1.0f, 1.0f});
        specs.push_back(ones(b + "ssm_d", d_inner));
        specs.push_back(rnd(b + "ssm_out.weight", d_inner, n_embd));
    }

    return write_gguf(path, "mamba", [&](gguf_context * g) {
        set_shape_kv(g, "mamba", n_embd, n_layer);
        gguf_set_val_u32(g, "mamba.ssm.conv_kernel", (uint32_t) d_conv);
        gguf_set_val_u32(g, "mamba.ssm.inner_size", (uint32_t) d_inner);
        gguf_set_val_u32(g, "mamba.ssm.state_size", (uint32_t) d_state);
        gguf_set_val_u32(g, "mamba.ssm.time_step_rank", (uint32_t) dt_rank);
        gguf_set_val_f32(g, "mamba.attention.layer_norm_rms_epsilon", 1e-5f);
        gguf_set_val_u32(g, "mamba.vocab_size", (uint32_t) n_vocab);
    }, specs);
}

bool rsref_write_lfm2(const char * path, uint32_t n_layer_u, uint32_t n_embd_u, const uint32_t * n_head_kv,
                      uint32_t l_cache) {
    return rsref_write_lfm2_ex(path, n_layer_u, n_embd_u, n_head_kv, l_cache, 0);
}

bool rsref_write_lfm2_ex(const char * path, uint32_t n_layer_u, uint32_t n_embd_u, const uint32_t * n_head_kv,
                         uint32_t l_cache, uint32_t n_swa) {
    init_once();

    const uint32_t n_head = 4;
    bool ok = n_layer_u > 0 && n_embd_u > 0 && n_embd_u % (2*n_head) == 0 && l_cache >= 2 && n_head_kv;
    for (uint32_t il = 0; ok && il < n_layer_u; ++il) {
        ok = n_head_kv[il] == 0 || n_head % n_head_kv[il] == 0;
    }
    if (!ok) {
        log_error("rsref_write_lfm2", "invalid model shape");
        return false;
    }

    const int64_t n_embd = n_embd_u, n_layer = n_layer_u, n_vocab = TINY_VOCAB, n_ff = 2*n_embd;
    const int64_t head_dim = n_embd/n_head;

    // the final norm is LLM_TENSOR_OUTPUT_NORM_LFM2
    std::vector<wspec> specs = head_specs(n_embd, n_vocab, "token_embd_norm.weight");
    for (int64_t il = 0; il < n_layer; ++il) {
        const std::string b = blk(il);
        specs.push_back(ones(b + "ffn_norm.weight", n_embd));
        specs.push_back(rnd(b + "ffn_gate.weight", n_embd, n_ff));
        specs.push_back(rnd(b + "ffn_down.weight", n_ff, n_embd));
        specs.push_back(rnd(b + "ffn_up.weight", n_embd, n_ff));
        specs.push_back(ones(b + "attn_norm.weight", n_embd));
        if (n_head_kv[il] != 0) {
            const int64_t n_embd_kv = (int64_t) n_head_kv[il]*head_dim;
            specs.push_back(ones(b + "attn_q_norm.weight", head_dim));
            specs.push_back(ones(b + "attn_k_norm.weight", head_dim));
            push_qkv(specs, b, n_embd, n_embd_kv);
            specs.push_back(rnd(b + "attn_output.weight", n_embd, n_embd));
        } else {
            specs.push_back(rnd(b + "shortconv.conv.weight", l_cache, n_embd));
            specs.push_back(rnd(b + "shortconv.in_proj.weight", n_embd, 3*n_embd));
            specs.push_back(rnd(b + "shortconv.out_proj.weight", n_embd, n_embd));
        }
    }

    std::vector<uint32_t> kv_heads(n_head_kv, n_head_kv + n_layer_u);
    return write_gguf(path, "lfm2", [&](gguf_context * g) {
        set_shape_kv(g, "lfm2", n_embd, n_layer);
        gguf_set_val_u32(g, "lfm2.feed_forward_length", (uint32_t) n_ff);
        gguf_set_val_u32(g, "lfm2.attention.head_count", n_head);
        gguf_set_arr_data(g, "lfm2.attention.head_count_kv", GGUF_TYPE_UINT32, kv_heads.data(), kv_heads.size());
        gguf_set_val_f32(g, "lfm2.attention.layer_norm_rms_epsilon", 1e-5f);
        gguf_set_val_f32(g, "lfm2.rope.freq_base", 10000.0f);
        gguf_set_val_u32(g, "lfm2.shortconv.l_cache", l_cache);
        gguf_set_val_u32(g, "lfm2.vocab_size", (uint32_t) n_vocab);
        if (n_swa > 0) {
            // every attention layer becomes SWA (llama_model_lfm2::load_arch_hparams)
            gguf_set_val_u32(g, "lfm2.attention.sliding_window", n_swa);
        }
    }, specs);
}

bool rsref_write_jamba(const char * path, uint32_t n_layer_u, uint32_t n_embd_u, const uint32_t * n_head_kv) {
    init_once();

    const uint32_t n_head = 4;
    bool ok = n_layer_u > 0 && n_embd_u > 0 && n_embd_u % n_head == 0 && n_head_kv;
    for (uint32_t il = 0; ok && il < n_layer_u; ++il) {
        ok = n_head_kv[il] == 0 || n_head % n_head_kv[il] == 0;
    }
    if (!ok) {
        log_error("rsref_write_jamba", "invalid model shape");
        return false;
    }

    const int64_t n_embd = n_embd_u, n_layer = n_layer_u, n_vocab = TINY_VOCAB, n_ff = 2*n_embd;
    const int64_t head_dim = n_embd/n_head;
    // llama.cpp only supports an expansion factor of 2 (GGML_ASSERT(2 * n_embd == d_inner))
    const int64_t d_inner = 2*n_embd, d_state = 16, d_conv = 4, dt_rank = 4;

    std::vector<wspec> specs = head_specs(n_embd, n_vocab);
    for (int64_t il = 0; il < n_layer; ++il) {
        const std::string b = blk(il);
        specs.push_back(ones(b + "attn_norm.weight", n_embd));
        if (n_head_kv[il] == 0) {
            specs.push_back(rnd(b + "ssm_in.weight", n_embd, 2*d_inner));
            specs.push_back(rnd(b + "ssm_conv1d.weight", d_conv, d_inner));
            specs.push_back(rnd(b + "ssm_conv1d.bias", d_inner));
            specs.push_back(rnd(b + "ssm_x.weight", d_inner, dt_rank + 2*d_state));
            specs.push_back(ones(b + "ssm_dt_norm.weight", dt_rank));
            specs.push_back(rnd(b + "ssm_dt.weight", dt_rank, d_inner));
            specs.push_back(rnd(b + "ssm_dt.bias", d_inner));
            specs.push_back(ones(b + "ssm_b_norm.weight", d_state));
            specs.push_back(ones(b + "ssm_c_norm.weight", d_state));
            // A = -exp(A_log) in converted models: negative, so the state decays
            specs.push_back({b + "ssm_a", d_state, d_inner, -1.0f, 1.0f});
            specs.push_back(ones(b + "ssm_d", d_inner));
            specs.push_back(rnd(b + "ssm_out.weight", d_inner, n_embd));
        } else {
            const int64_t n_embd_kv = (int64_t) n_head_kv[il]*head_dim;
            push_qkv(specs, b, n_embd, n_embd_kv);
            specs.push_back(rnd(b + "attn_output.weight", n_embd, n_embd));
        }
        specs.push_back(ones(b + "ffn_norm.weight", n_embd));
        specs.push_back(rnd(b + "ffn_gate.weight", n_embd, n_ff));
        specs.push_back(rnd(b + "ffn_down.weight", n_ff, n_embd));
        specs.push_back(rnd(b + "ffn_up.weight", n_embd, n_ff));
    }

    std::vector<uint32_t> kv_heads(n_head_kv, n_head_kv + n_layer_u);
    return write_gguf(path, "jamba", [&](gguf_context * g) {
        set_shape_kv(g, "jamba", n_embd, n_layer);
        gguf_set_val_u32(g, "jamba.feed_forward_length", (uint32_t) n_ff);
        gguf_set_val_u32(g, "jamba.attention.head_count", n_head);
        gguf_set_arr_data(g, "jamba.attention.head_count_kv", GGUF_TYPE_UINT32, kv_heads.data(), kv_heads.size());
        gguf_set_val_u32(g, "jamba.ssm.conv_kernel", (uint32_t) d_conv);
        gguf_set_val_u32(g, "jamba.ssm.inner_size", (uint32_t) d_inner);
        gguf_set_val_u32(g, "jamba.ssm.state_size", (uint32_t) d_state);
        gguf_set_val_u32(g, "jamba.ssm.time_step_rank", (uint32_t) dt_rank);
        gguf_set_val_f32(g, "jamba.attention.layer_norm_rms_epsilon", 1e-5f);
        gguf_set_val_u32(g, "jamba.vocab_size", (uint32_t) n_vocab);
    }, specs);
}

bool rsref_write_gemma3(const char * path, uint32_t n_layer_u, uint32_t n_embd_u, uint32_t n_swa,
                        uint32_t swa_pattern) {
    init_once();

    const uint32_t n_head = 4, n_head_kv = 2;
    if (n_layer_u == 0 || n_embd_u == 0 || n_embd_u % (2*n_head) != 0) {
        log_error("rsref_write_gemma3", "invalid model shape");
        return false;
    }

    const int64_t n_embd = n_embd_u, n_layer = n_layer_u, n_vocab = TINY_VOCAB, n_ff = 2*n_embd;
    const int64_t head_dim = n_embd/n_head, n_embd_kv = n_head_kv*head_dim;

    std::vector<wspec> specs = head_specs(n_embd, n_vocab);
    for (int64_t il = 0; il < n_layer; ++il) {
        const std::string b = blk(il);
        specs.push_back(ones(b + "attn_norm.weight", n_embd));
        push_qkv(specs, b, n_embd, n_embd_kv);
        specs.push_back(rnd(b + "attn_output.weight", n_embd, n_embd));
        specs.push_back(ones(b + "post_attention_norm.weight", n_embd));
        specs.push_back(ones(b + "attn_k_norm.weight", head_dim));
        specs.push_back(ones(b + "attn_q_norm.weight", head_dim));
        specs.push_back(ones(b + "ffn_norm.weight", n_embd));
        specs.push_back(rnd(b + "ffn_gate.weight", n_embd, n_ff));
        specs.push_back(rnd(b + "ffn_up.weight", n_embd, n_ff));
        specs.push_back(rnd(b + "ffn_down.weight", n_ff, n_embd));
        specs.push_back(ones(b + "post_ffw_norm.weight", n_embd));
    }

    return write_gguf(path, "gemma3", [&](gguf_context * g) {
        set_shape_kv(g, "gemma3", n_embd, n_layer);
        gguf_set_val_u32(g, "gemma3.feed_forward_length", (uint32_t) n_ff);
        gguf_set_val_u32(g, "gemma3.attention.head_count", n_head);
        gguf_set_val_u32(g, "gemma3.attention.head_count_kv", n_head_kv);
        gguf_set_val_f32(g, "gemma3.attention.layer_norm_rms_epsilon", 1e-6f);
        gguf_set_val_f32(g, "gemma3.rope.freq_base", 1000000.0f);
        if (n_swa > 0) {
            gguf_set_val_u32(g, "gemma3.attention.sliding_window", n_swa);
            gguf_set_val_u32(g, "gemma3.attention.sliding_window_pattern", swa_pattern);
            gguf_set_val_f32(g, "gemma3.rope.freq_base_swa", 10000.0f);
        }
        gguf_set_val_u32(g, "gemma3.vocab_size", (uint32_t) n_vocab);
    }, specs);
}

bool rsref_write_gemma4(const char * path, uint32_t n_shared_kv) {
    init_once();

    // 4 layers, sliding window on 0 and 2: with n_shared_kv = 2 the last two layers reuse the
    // KV of the last ones that have it (layer 2 the window layer 0's, layer 3 the full layer
    // 1's), llama.cpp's n_layer_kv_from_start, which needs at least 2 layers with KV
    const int64_t n_layer = 4, n_embd = 64, n_head = 4, n_head_kv = 2, n_vocab = TINY_VOCAB, n_ff = 2*n_embd;
    const int64_t head_dim = n_embd/n_head, n_embd_kv = n_head_kv*head_dim;
    if (n_shared_kv + 2 > n_layer) {
        log_error("rsref_write_gemma4", "at most 2 of the 4 layers can share KV");
        return false;
    }
    const int64_t n_kv_from_start = n_layer - n_shared_kv;

    std::vector<wspec> specs = head_specs(n_embd, n_vocab);
    // the full-attention layers' proportional RoPE factors (divisors of the frequencies: ones)
    specs.push_back(ones("rope_freqs.weight", head_dim/2));
    for (int64_t il = 0; il < n_layer; ++il) {
        const std::string b = blk(il);
        const bool has_kv = il < n_kv_from_start;
        specs.push_back(ones(b + "attn_norm.weight", n_embd));
        specs.push_back(rnd(b + "attn_q.weight", n_embd, n_embd));
        if (has_kv) {
            specs.push_back(rnd(b + "attn_k.weight", n_embd, n_embd_kv));
            specs.push_back(rnd(b + "attn_v.weight", n_embd, n_embd_kv));
            specs.push_back(ones(b + "attn_k_norm.weight", head_dim));
        }
        specs.push_back(rnd(b + "attn_output.weight", n_embd, n_embd));
        specs.push_back(ones(b + "attn_q_norm.weight", head_dim));
        specs.push_back(ones(b + "post_attention_norm.weight", n_embd));
        specs.push_back(ones(b + "ffn_norm.weight", n_embd));
        specs.push_back(rnd(b + "ffn_gate.weight", n_embd, n_ff));
        specs.push_back(rnd(b + "ffn_up.weight", n_embd, n_ff));
        specs.push_back(rnd(b + "ffn_down.weight", n_ff, n_embd));
        specs.push_back(ones(b + "post_ffw_norm.weight", n_embd));
    }

    return write_gguf(path, "gemma4", [&](gguf_context * g) {
        set_shape_kv(g, "gemma4", n_embd, n_layer);
        gguf_set_val_u32(g, "gemma4.feed_forward_length", (uint32_t) n_ff);
        gguf_set_val_u32(g, "gemma4.attention.head_count", (uint32_t) n_head);
        gguf_set_val_u32(g, "gemma4.attention.head_count_kv", (uint32_t) n_head_kv);
        gguf_set_val_f32(g, "gemma4.attention.layer_norm_rms_epsilon", 1e-6f);
        gguf_set_val_f32(g, "gemma4.rope.freq_base", 1000000.0f);
        gguf_set_val_f32(g, "gemma4.rope.freq_base_swa", 10000.0f);
        const bool pattern[4] = {true, false, true, false};
        gguf_set_arr_data(g, "gemma4.attention.sliding_window_pattern", GGUF_TYPE_BOOL, pattern, 4);
        gguf_set_val_u32(g, "gemma4.attention.sliding_window", 16);
        gguf_set_val_u32(g, "gemma4.attention.shared_kv_layers", n_shared_kv);
        gguf_set_val_u32(g, "gemma4.embedding_length_per_layer_input", 0);
        gguf_set_val_u32(g, "gemma4.attention.key_length_swa", (uint32_t) head_dim);
        gguf_set_val_u32(g, "gemma4.attention.value_length_swa", (uint32_t) head_dim);
        gguf_set_val_u32(g, "gemma4.vocab_size", (uint32_t) n_vocab);
    }, specs);
}

bool rsref_write_gemma4_assistant(const char * path) {
    init_once();

    // the draft model of a `gemma4` target (rsref_write_gemma4): 2 layers of width 32 over the
    // target's cells (its last window layer's and last full layer's K/V, so the same head
    // sizes, KV heads and window), queries only; its input is the target's token embedding
    // (width 64) beside the target's hidden state
    const int64_t n_layer = 2, n_embd = 32, n_embd_target = 64, n_head = 4, n_head_kv = 2, head_dim = 16;
    const int64_t n_vocab = TINY_VOCAB, n_ff = 2*n_embd;

    std::vector<wspec> specs;
    // no output.weight: the head is the token embedding
    specs.push_back(rnd("token_embd.weight", n_embd, n_vocab));
    specs.push_back(ones("output_norm.weight", n_embd));
    specs.push_back(rnd("nextn.pre_projection.weight", 2*n_embd_target, n_embd));
    specs.push_back(rnd("nextn.post_projection.weight", n_embd, n_embd_target));
    specs.push_back(ones("rope_freqs.weight", head_dim/2));
    for (int64_t il = 0; il < n_layer; ++il) {
        const std::string b = blk(il);
        specs.push_back(ones(b + "attn_norm.weight", n_embd));
        specs.push_back(rnd(b + "attn_q.weight", n_embd, n_head*head_dim));
        specs.push_back(rnd(b + "attn_output.weight", n_head*head_dim, n_embd));
        specs.push_back(ones(b + "attn_q_norm.weight", head_dim));
        specs.push_back(ones(b + "post_attention_norm.weight", n_embd));
        specs.push_back(ones(b + "layer_output_scale.weight", 1));
        specs.push_back(ones(b + "ffn_norm.weight", n_embd));
        specs.push_back(rnd(b + "ffn_gate.weight", n_embd, n_ff));
        specs.push_back(rnd(b + "ffn_up.weight", n_embd, n_ff));
        specs.push_back(rnd(b + "ffn_down.weight", n_ff, n_embd));
        specs.push_back(ones(b + "post_ffw_norm.weight", n_embd));
    }

    const char * a = "gemma4-assistant";
    return write_gguf(path, a, [&](gguf_context * g) {
        set_shape_kv(g, a, n_embd, n_layer);
        const std::string k = a;
        // every layer is a draft layer
        gguf_set_val_u32(g, (k + ".nextn_predict_layers").c_str(), (uint32_t) n_layer);
        gguf_set_val_u32(g, (k + ".embedding_length_out").c_str(), (uint32_t) n_embd_target);
        gguf_set_val_u32(g, (k + ".feed_forward_length").c_str(), (uint32_t) n_ff);
        gguf_set_val_u32(g, (k + ".attention.head_count").c_str(), (uint32_t) n_head);
        gguf_set_val_u32(g, (k + ".attention.head_count_kv").c_str(), (uint32_t) n_head_kv);
        gguf_set_val_u32(g, (k + ".attention.key_length").c_str(), (uint32_t) head_dim);
        gguf_set_val_u32(g, (k + ".attention.value_length").c_str(), (uint32_t) head_dim);
        gguf_set_val_u32(g, (k + ".attention.key_length_swa").c_str(), (uint32_t) head_dim);
        gguf_set_val_u32(g, (k + ".attention.value_length_swa").c_str(), (uint32_t) head_dim);
        gguf_set_val_f32(g, (k + ".attention.layer_norm_rms_epsilon").c_str(), 1e-6f);
        gguf_set_val_f32(g, (k + ".rope.freq_base").c_str(), 1000000.0f);
        gguf_set_val_f32(g, (k + ".rope.freq_base_swa").c_str(), 10000.0f);
        const bool pattern[2] = {true, false};
        gguf_set_arr_data(g, (k + ".attention.sliding_window_pattern").c_str(), GGUF_TYPE_BOOL, pattern, 2);
        gguf_set_val_u32(g, (k + ".attention.sliding_window").c_str(), 16);
        gguf_set_val_u32(g, (k + ".vocab_size").c_str(), (uint32_t) n_vocab);
    }, specs);
}

bool rsref_write_hy_v3(const char * path) {
    init_once();

    // 2 decoder blocks and 1 NextN (MTP) block, all dense (no expert tensors: the dense FFN
    // path), plain attention: an MTP context's KV cache holds the NextN layer only
    const int64_t n_layer = 3, n_embd = 64, n_head = 4, n_head_kv = 2, n_vocab = TINY_VOCAB, n_ff = 2*n_embd;
    const int64_t head_dim = n_embd/n_head, n_embd_kv = n_head_kv*head_dim;

    std::vector<wspec> specs = head_specs(n_embd, n_vocab);
    for (int64_t il = 0; il < n_layer; ++il) {
        const std::string b = blk(il);
        specs.push_back(ones(b + "attn_norm.weight", n_embd));
        push_qkv(specs, b, n_embd, n_embd_kv);
        specs.push_back(rnd(b + "attn_output.weight", n_embd, n_embd));
        specs.push_back(ones(b + "attn_q_norm.weight", head_dim));
        specs.push_back(ones(b + "attn_k_norm.weight", head_dim));
        specs.push_back(ones(b + "ffn_norm.weight", n_embd));
        specs.push_back(rnd(b + "ffn_gate.weight", n_embd, n_ff));
        specs.push_back(rnd(b + "ffn_up.weight", n_embd, n_ff));
        specs.push_back(rnd(b + "ffn_down.weight", n_ff, n_embd));
        if (il == n_layer - 1) {
            specs.push_back(rnd(b + "nextn.eh_proj.weight", 2*n_embd, n_embd));
            specs.push_back(ones(b + "nextn.enorm.weight", n_embd));
            specs.push_back(ones(b + "nextn.hnorm.weight", n_embd));
        }
    }

    return write_gguf(path, "hy_v3", [&](gguf_context * g) {
        set_shape_kv(g, "hy_v3", n_embd, n_layer);
        gguf_set_val_u32(g, "hy_v3.nextn_predict_layers", 1);
        gguf_set_val_u32(g, "hy_v3.feed_forward_length", (uint32_t) n_ff);
        gguf_set_val_u32(g, "hy_v3.expert_feed_forward_length", (uint32_t) n_ff);
        gguf_set_val_u32(g, "hy_v3.attention.head_count", (uint32_t) n_head);
        gguf_set_val_u32(g, "hy_v3.attention.head_count_kv", (uint32_t) n_head_kv);
        gguf_set_val_f32(g, "hy_v3.attention.layer_norm_rms_epsilon", 1e-6f);
        gguf_set_val_u32(g, "hy_v3.vocab_size", (uint32_t) n_vocab);
    }, specs);
}

// The MLA + lightning-indexer layers of deepseek32 and dots3note: 4 heads, one 48-wide K head
// (kv_lora 32 + rope 16), nope/rope key 32, value 16, an indexer of 2 heads of 64 (top-k 4).
struct mla_dsa {
    static constexpr int64_t n_embd = 64, n_head = 4, n_ff = 2*64;
    static constexpr int64_t q_lora = 32, kv_lora = 32, n_rot = 16, k_mla = 32, v_mla = 16;
    static constexpr int64_t idx_heads = 2, idx_dim = 64;

    // one dense layer's tensors; dots3note's add a norm on the rope key and an output gate
    static void push_layer(std::vector<wspec> & specs, const std::string & b, bool gated, bool indexer) {
        specs.push_back(ones(b + "attn_norm.weight", n_embd));
        specs.push_back(ones(b + "attn_q_a_norm.weight", q_lora));
        specs.push_back(ones(b + "attn_kv_a_norm.weight", kv_lora));
        if (gated) {
            specs.push_back(ones(b + "attn_k_norm.weight", n_rot));
        }
        specs.push_back(rnd(b + "attn_q_a.weight", n_embd, q_lora));
        specs.push_back(rnd(b + "attn_q_b.weight", q_lora, n_head*k_mla));
        specs.push_back(rnd(b + "attn_kv_a_mqa.weight", n_embd, kv_lora + n_rot));
        specs.push_back(rnd3(b + "attn_k_b.weight", k_mla - n_rot, kv_lora, n_head));
        specs.push_back(rnd3(b + "attn_v_b.weight", kv_lora, v_mla, n_head));
        specs.push_back(rnd(b + "attn_output.weight", n_head*v_mla, n_embd));
        if (gated) {
            specs.push_back(rnd(b + "attn_gate.weight", n_embd, n_head));
        }
        specs.push_back(ones(b + "ffn_norm.weight", n_embd));
        if (indexer) {
            specs.push_back(ones(b + "indexer.k_norm.weight", idx_dim));
            specs.push_back(zeros(b + "indexer.k_norm.bias", idx_dim));
            specs.push_back(rnd(b + "indexer.proj.weight", n_embd, idx_heads));
            specs.push_back(rnd(b + "indexer.attn_k.weight", n_embd, idx_dim));
            specs.push_back(rnd(b + "indexer.attn_q_b.weight", q_lora, idx_heads*idx_dim));
        }
        specs.push_back(rnd(b + "ffn_gate.weight", n_embd, n_ff));
        specs.push_back(rnd(b + "ffn_down.weight", n_ff, n_embd));
        specs.push_back(rnd(b + "ffn_up.weight", n_embd, n_ff));
    }

    // the keys both read, for n_layer dense layers
    static void set_kv(gguf_context * g, const std::string & arch, int64_t n_layer) {
        auto key = [&](const char * k) { return arch + "." + k; };
        set_shape_kv(g, arch, n_embd, n_layer);
        gguf_set_val_u32(g, key("feed_forward_length").c_str(), (uint32_t) n_ff);
        gguf_set_val_u32(g, key("attention.head_count").c_str(), (uint32_t) n_head);
        gguf_set_val_u32(g, key("attention.head_count_kv").c_str(), 1);
        gguf_set_val_u32(g, key("attention.key_length").c_str(), (uint32_t) (kv_lora + n_rot));
        gguf_set_val_u32(g, key("attention.value_length").c_str(), (uint32_t) kv_lora);
        gguf_set_val_u32(g, key("attention.key_length_mla").c_str(), (uint32_t) k_mla);
        gguf_set_val_u32(g, key("attention.value_length_mla").c_str(), (uint32_t) v_mla);
        gguf_set_val_u32(g, key("attention.q_lora_rank").c_str(), (uint32_t) q_lora);
        gguf_set_val_u32(g, key("attention.kv_lora_rank").c_str(), (uint32_t) kv_lora);
        gguf_set_val_u32(g, key("rope.dimension_count").c_str(), (uint32_t) n_rot);
        gguf_set_val_f32(g, key("attention.layer_norm_rms_epsilon").c_str(), 1e-6f);
        gguf_set_val_u32(g, key("expert_feed_forward_length").c_str(), 0);
        gguf_set_val_u32(g, key("expert_shared_count").c_str(), 0);
        gguf_set_val_u32(g, key("leading_dense_block_count").c_str(), (uint32_t) n_layer);
        gguf_set_val_u32(g, key("expert_gating_func").c_str(), 2);
        gguf_set_val_u32(g, key("attention.indexer.head_count").c_str(), (uint32_t) idx_heads);
        gguf_set_val_u32(g, key("attention.indexer.key_length").c_str(), (uint32_t) idx_dim);
        gguf_set_val_u32(g, key("attention.indexer.top_k").c_str(), 4);
        gguf_set_val_u32(g, key("vocab_size").c_str(), TINY_VOCAB);
    }
};

bool rsref_write_deepseek32(const char * path) {
    init_once();

    // 2 dense layers with MLA and a lightning indexer on each: the memory is a
    // llama_kv_cache_dsa, an MLA cache beside the indexer's key cache (rotated: its head size
    // is the indexer's)
    const int64_t n_layer = 2;
    std::vector<wspec> specs = head_specs(mla_dsa::n_embd, TINY_VOCAB);
    for (int64_t il = 0; il < n_layer; ++il) {
        mla_dsa::push_layer(specs, blk(il), /*gated =*/ false, /*indexer =*/ true);
    }
    return write_gguf(path, "deepseek32", [&](gguf_context * g) { mla_dsa::set_kv(g, "deepseek32", n_layer); }, specs);
}

bool rsref_write_dots3note(const char * path) {
    init_once();

    // 2 dense MLA layers (with an output gate and a norm on the rope key): layer 0 full
    // attention with a lightning indexer, layer 1 a 16-token sliding window. The memory is a
    // llama_kv_cache_dsa_iswa: a DSA cache (MLA + indexer keys) for layer 0 and a K-only window
    // cache for layer 1
    const int64_t n_layer = 2;
    std::vector<wspec> specs = head_specs(mla_dsa::n_embd, TINY_VOCAB);
    for (int64_t il = 0; il < n_layer; ++il) {
        mla_dsa::push_layer(specs, blk(il), /*gated =*/ true, /*indexer =*/ il == 0);
    }
    return write_gguf(path, "dots3note", [&](gguf_context * g) {
        mla_dsa::set_kv(g, "dots3note", n_layer);
        // the window layers' MLA, as the full ones'
        gguf_set_val_u32(g, "dots3note.attention.kv_lora_rank_swa", (uint32_t) mla_dsa::kv_lora);
        gguf_set_val_u32(g, "dots3note.attention.key_length_mla_swa", (uint32_t) mla_dsa::k_mla);
        gguf_set_val_u32(g, "dots3note.attention.value_length_mla_swa", (uint32_t) mla_dsa::v_mla);
        gguf_set_val_u32(g, "dots3note.attention.sliding_window", 16);
        gguf_set_val_f32(g, "dots3note.rope.freq_base_swa", 10000.0f);
        const bool swa[2] = {false, true};
        gguf_set_arr_data(g, "dots3note.attention.sliding_window_pattern", GGUF_TYPE_BOOL, swa, 2);
        const bool full[2] = {true, false};
        gguf_set_arr_data(g, "dots3note.attention.indexer.types", GGUF_TYPE_BOOL, full, 2);
    }, specs);
}

bool rsref_write_minimax_m3(const char * path) {
    init_once();

    // 2 layers of width 64 (4 query heads, 2 KV heads of 16, partial RoPE over 8): layer 0
    // dense, layer 1 MoE (2 experts, 1 used, 1 shared) with the sparse-attention indexer (2
    // heads of 16, blocks of 4). The memory is a llama_kv_cache_msa: the attention cache and
    // the indexer's key cache over layer 1
    const int64_t n_layer = 2, n_embd = 64, n_head = 4, n_head_kv = 2, n_vocab = TINY_VOCAB, n_ff = 2*n_embd;
    const int64_t head_dim = n_embd/n_head, n_embd_kv = n_head_kv*head_dim;
    const int64_t n_expert = 2, n_ff_exp = 32, idx_heads = 2, idx_dim = 16;

    std::vector<wspec> specs = head_specs(n_embd, n_vocab);
    for (int64_t il = 0; il < n_layer; ++il) {
        const std::string b = blk(il);
        specs.push_back(ones(b + "attn_norm.weight", n_embd));
        push_qkv(specs, b, n_embd, n_embd_kv);
        specs.push_back(rnd(b + "attn_output.weight", n_embd, n_embd));
        specs.push_back(ones(b + "attn_q_norm.weight", head_dim));
        specs.push_back(ones(b + "attn_k_norm.weight", head_dim));
        specs.push_back(ones(b + "ffn_norm.weight", n_embd));
        if (il == 0) {
            specs.push_back(rnd(b + "ffn_gate.weight", n_embd, n_ff));
            specs.push_back(rnd(b + "ffn_down.weight", n_ff, n_embd));
            specs.push_back(rnd(b + "ffn_up.weight", n_embd, n_ff));
        } else {
            specs.push_back(rnd(b + "ffn_gate_inp.weight", n_embd, n_expert));
            specs.push_back(zeros(b + "exp_probs_b.bias", n_expert));
            specs.push_back(rnd3(b + "ffn_gate_exps.weight", n_embd, n_ff_exp, n_expert));
            specs.push_back(rnd3(b + "ffn_down_exps.weight", n_ff_exp, n_embd, n_expert));
            specs.push_back(rnd3(b + "ffn_up_exps.weight", n_embd, n_ff_exp, n_expert));
            specs.push_back(rnd(b + "ffn_gate_shexp.weight", n_embd, n_ff_exp));
            specs.push_back(rnd(b + "ffn_down_shexp.weight", n_ff_exp, n_embd));
            specs.push_back(rnd(b + "ffn_up_shexp.weight", n_embd, n_ff_exp));
            specs.push_back(rnd(b + "indexer.q_proj.weight", n_embd, idx_heads*idx_dim));
            specs.push_back(rnd(b + "indexer.k_proj.weight", n_embd, idx_dim));
            specs.push_back(ones(b + "indexer.q_norm.weight", idx_dim));
            specs.push_back(ones(b + "indexer.k_norm.weight", idx_dim));
        }
    }

    return write_gguf(path, "minimax-m3", [&](gguf_context * g) {
        set_shape_kv(g, "minimax-m3", n_embd, n_layer);
        gguf_set_val_u32(g, "minimax-m3.feed_forward_length", (uint32_t) n_ff);
        gguf_set_val_u32(g, "minimax-m3.attention.head_count", (uint32_t) n_head);
        gguf_set_val_u32(g, "minimax-m3.attention.head_count_kv", (uint32_t) n_head_kv);
        gguf_set_val_u32(g, "minimax-m3.rope.dimension_count", 8);
        gguf_set_val_f32(g, "minimax-m3.attention.layer_norm_rms_epsilon", 1e-6f);
        gguf_set_val_u32(g, "minimax-m3.leading_dense_block_count", 1);
        gguf_set_val_u32(g, "minimax-m3.expert_count", (uint32_t) n_expert);
        gguf_set_val_u32(g, "minimax-m3.expert_used_count", 1);
        gguf_set_val_u32(g, "minimax-m3.expert_feed_forward_length", (uint32_t) n_ff_exp);
        gguf_set_val_u32(g, "minimax-m3.expert_shared_count", 1);
        gguf_set_val_u32(g, "minimax-m3.expert_gating_func", 2);
        gguf_set_val_u32(g, "minimax-m3.attention.indexer.head_count", (uint32_t) idx_heads);
        gguf_set_val_u32(g, "minimax-m3.attention.indexer.key_length", (uint32_t) idx_dim);
        gguf_set_val_u32(g, "minimax-m3.attention.indexer.top_k", 2);
        gguf_set_val_u32(g, "minimax-m3.attention.indexer.block_size", 4);
        gguf_set_val_u32(g, "minimax-m3.attention.indexer.local_blocks", 1);
        gguf_set_val_u32(g, "minimax-m3.vocab_size", (uint32_t) n_vocab);
    }, specs);
}

bool rsref_write_glm5_next(const char * path) {
    init_once();

    // 2 dense layers of width 64 with mHC residuals (4 streams): layer 0 Kimi delta attention
    // (recurrent: head_count_kv 0; 4 heads of 16, conv kernel 4), layer 1 nope MLA (kv_lora
    // 32, no RoPE) with a k-pool lightning indexer (2 heads of 16, top-k 4, pool 2). The memory
    // is a llama_memory_hybrid_idx: the MLA cache, the recurrent state and the indexer's cache
    // (name tag "idx_"), whose restore mirrors the MLA cache's layout (state_read_sinfo)
    const int64_t n_layer = 2, n_embd = 64, n_head = 4, n_vocab = TINY_VOCAB, n_ff = 2*n_embd;
    const int64_t hc = 4, hc_mix = (2 + hc)*hc, hd = 16, d_conv = 4, d_inner = hd*n_head;
    const int64_t q_lora = 32, kv_lora = 32, k_mla = 16, v_mla = 16, idx_heads = 2, idx_dim = 16, kpool = 2;

    std::vector<wspec> specs = head_specs(n_embd, n_vocab);
    for (int64_t il = 0; il < n_layer; ++il) {
        const std::string b = blk(il);
        specs.push_back(ones(b + "attn_norm.weight", n_embd));
        specs.push_back(ones(b + "ffn_norm.weight", n_embd));
        specs.push_back(rnd(b + "hc_attn_fn.weight", hc*n_embd, hc_mix));
        specs.push_back(rnd(b + "hc_attn_base.weight", hc_mix));
        specs.push_back(ones(b + "hc_attn_scale.weight", 3));
        specs.push_back(rnd(b + "hc_ffn_fn.weight", hc*n_embd, hc_mix));
        specs.push_back(rnd(b + "hc_ffn_base.weight", hc_mix));
        specs.push_back(ones(b + "hc_ffn_scale.weight", 3));
        if (il == 0) {
            for (const char * c : {"ssm_conv1d_q.weight", "ssm_conv1d_k.weight", "ssm_conv1d_v.weight"}) {
                specs.push_back(rnd3(b + c, d_conv, 1, d_inner));
            }
            specs.push_back(rnd(b + "attn_q.weight", n_embd, d_inner));
            specs.push_back(rnd(b + "attn_k.weight", n_embd, d_inner));
            specs.push_back(rnd(b + "attn_v.weight", n_embd, d_inner));
            specs.push_back(rnd(b + "ssm_f_a.weight", n_embd, hd));
            specs.push_back(rnd(b + "ssm_f_b.weight", hd, d_inner));
            specs.push_back(rnd(b + "ssm_beta.weight", n_embd, n_head));
            specs.push_back({b + "ssm_a", n_head, 0, -1.0f, 1.0f}); // -exp(A_log): negative
            specs.push_back(rnd(b + "ssm_dt.bias", d_inner));
            specs.push_back(rnd(b + "ssm_g_a.weight", n_embd, hd));
            specs.push_back(rnd(b + "ssm_g_b.weight", hd, d_inner));
            specs.push_back(ones(b + "ssm_norm.weight", hd));
            specs.push_back(rnd(b + "attn_output.weight", d_inner, n_embd));
        } else {
            specs.push_back(ones(b + "attn_q_a_norm.weight", q_lora));
            specs.push_back(ones(b + "attn_kv_a_norm.weight", kv_lora));
            specs.push_back(rnd(b + "attn_q_a.weight", n_embd, q_lora));
            specs.push_back(rnd(b + "attn_q_b.weight", q_lora, n_head*k_mla));
            specs.push_back(rnd(b + "attn_kv_a_mqa.weight", n_embd, kv_lora));
            specs.push_back(rnd3(b + "attn_k_b.weight", k_mla, kv_lora, n_head));
            specs.push_back(rnd3(b + "attn_v_b.weight", kv_lora, v_mla, n_head));
            specs.push_back(rnd(b + "attn_output.weight", n_head*v_mla, n_embd));
            specs.push_back(ones(b + "indexer.k_norm.weight", idx_dim));
            specs.push_back(zeros(b + "indexer.k_norm.bias", idx_dim));
            specs.push_back(rnd(b + "indexer.proj.weight", n_embd, idx_heads));
            specs.push_back(rnd(b + "indexer.attn_k.weight", n_embd, idx_dim));
            specs.push_back(rnd(b + "indexer.attn_q_b.weight", q_lora, idx_heads*idx_dim));
            specs.push_back(rnd(b + "indexer_compressor_gate.weight", n_embd, idx_dim));
            specs.push_back(rnd(b + "indexer_compressor_ape.weight", idx_dim, kpool));
        }
        specs.push_back(rnd(b + "ffn_gate.weight", n_embd, n_ff));
        specs.push_back(rnd(b + "ffn_down.weight", n_ff, n_embd));
        specs.push_back(rnd(b + "ffn_up.weight", n_embd, n_ff));
    }

    return write_gguf(path, "glm5-next", [&](gguf_context * g) {
        set_shape_kv(g, "glm5-next", n_embd, n_layer);
        gguf_set_val_u32(g, "glm5-next.feed_forward_length", (uint32_t) n_ff);
        gguf_set_val_u32(g, "glm5-next.attention.head_count", (uint32_t) n_head);
        const uint32_t head_kv[2] = {0, 1};
        gguf_set_arr_data(g, "glm5-next.attention.head_count_kv", GGUF_TYPE_UINT32, head_kv, 2);
        gguf_set_val_u32(g, "glm5-next.attention.key_length", (uint32_t) kv_lora);
        gguf_set_val_u32(g, "glm5-next.rope.dimension_count", 0);
        gguf_set_val_f32(g, "glm5-next.attention.layer_norm_rms_epsilon", 1e-6f);
        gguf_set_val_u32(g, "glm5-next.attention.key_length_mla", (uint32_t) k_mla);
        gguf_set_val_u32(g, "glm5-next.attention.value_length_mla", (uint32_t) v_mla);
        gguf_set_val_u32(g, "glm5-next.attention.q_lora_rank", (uint32_t) q_lora);
        gguf_set_val_u32(g, "glm5-next.attention.kv_lora_rank", (uint32_t) kv_lora);
        gguf_set_val_u32(g, "glm5-next.ssm.conv_kernel", (uint32_t) d_conv);
        gguf_set_val_u32(g, "glm5-next.kda.head_dim", (uint32_t) hd);
        gguf_set_val_u32(g, "glm5-next.expert_feed_forward_length", 0);
        gguf_set_val_u32(g, "glm5-next.expert_shared_count", 0);
        gguf_set_val_u32(g, "glm5-next.leading_dense_block_count", (uint32_t) n_layer);
        gguf_set_val_u32(g, "glm5-next.attention.indexer.head_count", (uint32_t) idx_heads);
        gguf_set_val_u32(g, "glm5-next.attention.indexer.key_length", (uint32_t) idx_dim);
        gguf_set_val_u32(g, "glm5-next.attention.indexer.top_k", 4);
        gguf_set_val_u32(g, "glm5-next.attention.indexer.kpool", (uint32_t) kpool);
        gguf_set_val_u32(g, "glm5-next.hyper_connection.count", (uint32_t) hc);
        gguf_set_val_u32(g, "glm5-next.hyper_connection.sinkhorn_iterations", 2);
        gguf_set_val_f32(g, "glm5-next.hyper_connection.epsilon", 1e-6f);
        gguf_set_val_u32(g, "glm5-next.vocab_size", (uint32_t) n_vocab);
    }, specs);
}

bool rsref_write_deepseek4(const char * path) {
    init_once();

    // 3 layers of width 64 with mHC residuals (4 streams), all with a 8-token raw window: layer
    // 0 window only (compress ratio 0), layer 1 CSA (ratio 4: compressed keys picked by a
    // lightning indexer of 2 heads of 64, top-k 4), layer 2 HCA (ratio 128). Attention: 4 heads
    // of 32 (rope 16) over one shared K=V head, grouped low-rank output (2 groups, rank 16);
    // every layer MoE (2 experts, 1 used, sqrt-softplus gating) plus a shared expert. The memory
    // is a llama_kv_cache_dsv4: the raw window cache (an iSWA whose full cache is empty), the
    // CSA, HCA and indexer key caches and the three compressor states (csa, hca, lid)
    const int64_t n_layer = 3, n_embd = 64, n_head = 4, n_vocab = TINY_VOCAB;
    const int64_t hd = 32, n_rot = 16, q_lora = 32, o_groups = 2, o_lora = 16;
    const int64_t hc = 4, hc_mix = (2 + hc)*hc, n_expert = 2, n_ff_exp = 32;
    const int64_t idx_heads = 2, idx_dim = 64;
    const uint32_t ratios[3] = {0, 4, 128};

    std::vector<wspec> specs = head_specs(n_embd, n_vocab);
    specs.push_back(rnd("output_hc_fn.weight", hc*n_embd, hc));
    specs.push_back(rnd("output_hc_base.weight", hc));
    specs.push_back(ones("output_hc_scale.weight", 1));
    for (int64_t il = 0; il < n_layer; ++il) {
        const std::string b = blk(il);
        specs.push_back(ones(b + "attn_norm.weight", n_embd));
        specs.push_back(rnd(b + "attn_sinks.weight", n_head));
        specs.push_back(rnd(b + "attn_q_a.weight", n_embd, q_lora));
        specs.push_back(ones(b + "attn_q_a_norm.weight", q_lora));
        specs.push_back(rnd(b + "attn_q_b.weight", q_lora, n_head*hd));
        specs.push_back(rnd(b + "attn_kv.weight", n_embd, hd));
        specs.push_back(ones(b + "attn_kv_a_norm.weight", hd));
        specs.push_back(rnd3(b + "attn_output_a.weight", n_head*hd/o_groups, o_lora, o_groups));
        specs.push_back(rnd(b + "attn_output_b.weight", o_groups*o_lora, n_embd));
        specs.push_back(rnd(b + "hc_attn_fn.weight", hc*n_embd, hc_mix));
        specs.push_back(rnd(b + "hc_attn_base.weight", hc_mix));
        specs.push_back(ones(b + "hc_attn_scale.weight", 3));
        specs.push_back(rnd(b + "hc_ffn_fn.weight", hc*n_embd, hc_mix));
        specs.push_back(rnd(b + "hc_ffn_base.weight", hc_mix));
        specs.push_back(ones(b + "hc_ffn_scale.weight", 3));
        if (ratios[il] != 0) {
            const int64_t coff = ratios[il] == 4 ? 2 : 1;
            specs.push_back(rnd(b + "attn_compressor_kv.weight", n_embd, coff*hd));
            specs.push_back(rnd(b + "attn_compressor_gate.weight", n_embd, coff*hd));
            specs.push_back(rnd(b + "attn_compressor_ape.weight", coff*hd, ratios[il]));
            specs.push_back(ones(b + "attn_compressor_norm.weight", hd));
        }
        if (ratios[il] == 4) {
            specs.push_back(rnd(b + "indexer.proj.weight", n_embd, idx_heads));
            specs.push_back(rnd(b + "indexer.attn_q_b.weight", q_lora, idx_heads*idx_dim));
            specs.push_back(rnd(b + "indexer_compressor_kv.weight", n_embd, 2*idx_dim));
            specs.push_back(rnd(b + "indexer_compressor_gate.weight", n_embd, 2*idx_dim));
            specs.push_back(rnd(b + "indexer_compressor_ape.weight", 2*idx_dim, 4));
            specs.push_back(ones(b + "indexer_compressor_norm.weight", idx_dim));
        }
        specs.push_back(rnd(b + "ffn_gate_inp.weight", n_embd, n_expert));
        specs.push_back(zeros(b + "exp_probs_b.bias", n_expert));
        specs.push_back(ones(b + "ffn_norm.weight", n_embd));
        specs.push_back(rnd3(b + "ffn_gate_exps.weight", n_embd, n_ff_exp, n_expert));
        specs.push_back(rnd3(b + "ffn_down_exps.weight", n_ff_exp, n_embd, n_expert));
        specs.push_back(rnd3(b + "ffn_up_exps.weight", n_embd, n_ff_exp, n_expert));
        specs.push_back(rnd(b + "ffn_gate_shexp.weight", n_embd, n_ff_exp));
        specs.push_back(rnd(b + "ffn_down_shexp.weight", n_ff_exp, n_embd));
        specs.push_back(rnd(b + "ffn_up_shexp.weight", n_embd, n_ff_exp));
    }

    return write_gguf(path, "deepseek4", [&](gguf_context * g) {
        set_shape_kv(g, "deepseek4", n_embd, n_layer);
        gguf_set_val_u32(g, "deepseek4.attention.head_count", (uint32_t) n_head);
        gguf_set_val_u32(g, "deepseek4.attention.head_count_kv", 1);
        // != the indexer's key length: only the indexer's key cache gets the Hadamard rotation
        gguf_set_val_u32(g, "deepseek4.attention.key_length", (uint32_t) hd);
        gguf_set_val_u32(g, "deepseek4.attention.value_length", (uint32_t) hd);
        gguf_set_val_u32(g, "deepseek4.rope.dimension_count", (uint32_t) n_rot);
        gguf_set_val_f32(g, "deepseek4.attention.layer_norm_rms_epsilon", 1e-6f);
        gguf_set_val_u32(g, "deepseek4.attention.q_lora_rank", (uint32_t) q_lora);
        gguf_set_val_u32(g, "deepseek4.attention.sliding_window", 8);
        gguf_set_val_u32(g, "deepseek4.expert_count", (uint32_t) n_expert);
        gguf_set_val_u32(g, "deepseek4.expert_used_count", 1);
        gguf_set_val_u32(g, "deepseek4.expert_feed_forward_length", (uint32_t) n_ff_exp);
        gguf_set_val_u32(g, "deepseek4.expert_shared_count", 1);
        gguf_set_val_f32(g, "deepseek4.expert_weights_scale", 1.0f);
        gguf_set_val_bool(g, "deepseek4.expert_weights_norm", true);
        gguf_set_val_f32(g, "deepseek4.swiglu_clamp_exp", 0.0f);
        gguf_set_val_u32(g, "deepseek4.expert_gating_func", 4); // sqrt(softplus), the only one it takes
        gguf_set_val_u32(g, "deepseek4.attention.indexer.head_count", (uint32_t) idx_heads);
        gguf_set_val_u32(g, "deepseek4.attention.indexer.key_length", (uint32_t) idx_dim);
        gguf_set_val_u32(g, "deepseek4.attention.indexer.top_k", 4);
        gguf_set_val_u32(g, "deepseek4.attention.output_group_count", (uint32_t) o_groups);
        gguf_set_val_u32(g, "deepseek4.attention.output_lora_rank", (uint32_t) o_lora);
        gguf_set_val_f32(g, "deepseek4.attention.compress_rope_freq_base", 10000.0f);
        gguf_set_arr_data(g, "deepseek4.attention.compress_ratios", GGUF_TYPE_UINT32, ratios, 3);
        gguf_set_val_u32(g, "deepseek4.hyper_connection.count", (uint32_t) hc);
        gguf_set_val_u32(g, "deepseek4.hyper_connection.sinkhorn_iterations", 2);
        gguf_set_val_f32(g, "deepseek4.hyper_connection.epsilon", 1e-6f);
        gguf_set_val_u32(g, "deepseek4.hash_layer_count", 0);
        gguf_set_val_u32(g, "deepseek4.vocab_size", (uint32_t) n_vocab);
    }, specs);
}

bool rsref_write_qwen4exp(const char * path, bool ple) {
    init_once();

    // 2 MoE layers of width 64 (2 experts, 1 used, a gated shared expert) with low-rank
    // hyper-connections (2 streams, rank 8) and IMRoPE (rope 8, sections 2/1/1/0): layer 0 a
    // gated delta net (conv kernel 4, 2 key heads and 4 value heads of 16) carrying the PLE
    // n-gram embedding (bigrams hashed into 2 heads of 32 rows of a 32-row table, a 2-tap conv
    // dilated by 2), layer 1 gated full attention (4 heads of 16, 2 KV heads) with a QSA k-pool
    // indexer (2 heads of 16, top-k 4, blocks of 2: compress ratio 2). The memory is a
    // llama_memory_hybrid_idx: the attention cache (its cells keep the token ids, which the PLE
    // input reads back through get_prev_tokens), the recurrent state (with the PLE conv history
    // row cache_ple_r_l0) and the indexer's cache. Without `ple`, no n-gram embedding: the
    // attention cache keeps no token ids, the indexer cache's state no cell ext
    const int64_t n_layer = 2, n_embd = 64, n_head = 4, n_head_kv = 2, n_vocab = TINY_VOCAB;
    const int64_t hd = 16, n_embd_kv = n_head_kv*hd, hc = 2, hc_lr = 8, hc_dim = hc*n_embd;
    const int64_t d_conv = 4, d_state = 16, n_group = 2, dt_rank = 4;
    const int64_t key_dim = d_state*n_group, value_dim = d_state*dt_rank, conv_dim = 2*key_dim + value_dim;
    const int64_t n_expert = 2, n_ff_exp = 32, idx_heads = 2, idx_dim = 16;
    const int64_t ple_head_dim = 32, ple_rows = 32, ple_kernel = 2;

    std::vector<wspec> specs = {
        rnd("token_embd.weight", n_embd, n_vocab),
        rnd("output.weight", n_embd, n_vocab),
        // no output_norm: the final hyper-connection mixer is the output norm
        ones("output_hc_norm.weight", n_embd, hc),
        rnd("output_hc_down.weight", hc_dim, hc_lr),
        rnd("output_hc_up.weight", hc_lr, hc_dim),
    };
    if (ple) {
        specs.push_back(rnd("per_layer_token_embd.weight", ple_head_dim, ple_rows));
    }
    for (int64_t il = 0; il < n_layer; ++il) {
        const std::string b = blk(il);
        for (const char * m : {"hc_attn_", "hc_ffn_"}) {
            specs.push_back(ones(b + m + "norm.weight", n_embd, hc));
            specs.push_back(rnd(b + m + "down.weight", hc_dim, hc_lr));
            specs.push_back(rnd(b + m + "up.weight", hc_lr, hc_dim));
            specs.push_back(rnd(b + m + "inject.weight", hc_dim, hc));
        }
        if (il == 0) {
            specs.push_back(rnd(b + "attn_qkv.weight", n_embd, conv_dim));
            specs.push_back(rnd(b + "attn_gate.weight", n_embd, value_dim));
            specs.push_back(rnd(b + "ssm_conv1d.weight", d_conv, conv_dim));
            specs.push_back(rnd(b + "ssm_dt.bias", dt_rank));
            specs.push_back({b + "ssm_a", dt_rank, 0, -1.0f, 1.0f}); // -exp(A_log): negative
            specs.push_back(rnd(b + "ssm_beta.weight", n_embd, dt_rank));
            specs.push_back(rnd(b + "ssm_alpha.weight", n_embd, dt_rank));
            specs.push_back(ones(b + "ssm_norm.weight", d_state));
            specs.push_back(rnd(b + "ssm_out.weight", value_dim, n_embd));
        }
        if (il == 0 && ple) {
            specs.push_back(rnd(b + "ple_key.weight", n_embd, hc_dim));
            specs.push_back(rnd(b + "ple_value.weight", n_embd, n_embd));
            specs.push_back(ones(b + "ple_norm_key.weight", n_embd, hc));
            specs.push_back(ones(b + "ple_norm_query.weight", n_embd, hc));
            specs.push_back(ones(b + "ple_norm_conv.weight", n_embd, hc));
            specs.push_back(rnd(b + "ple_conv1d.weight", ple_kernel, hc_dim));
        }
        if (il != 0) {
            specs.push_back(rnd(b + "attn_q.weight", n_embd, 2*n_head*hd)); // query | gate per head
            specs.push_back(rnd(b + "attn_k.weight", n_embd, n_embd_kv));
            specs.push_back(rnd(b + "attn_v.weight", n_embd, n_embd_kv));
            specs.push_back(rnd(b + "attn_output.weight", n_head*hd, n_embd));
            specs.push_back(ones(b + "attn_q_norm.weight", hd));
            specs.push_back(ones(b + "attn_k_norm.weight", hd));
            specs.push_back(rnd(b + "indexer.q_proj.weight", n_embd, idx_heads*idx_dim));
            specs.push_back(rnd(b + "indexer.k_proj.weight", n_embd, idx_dim));
            specs.push_back(ones(b + "indexer.q_norm.weight", idx_dim));
            specs.push_back(ones(b + "indexer.k_norm.weight", idx_dim));
        }
        specs.push_back(rnd(b + "ffn_gate_inp.weight", n_embd, n_expert));
        specs.push_back(rnd3(b + "ffn_gate_exps.weight", n_embd, n_ff_exp, n_expert));
        specs.push_back(rnd3(b + "ffn_down_exps.weight", n_ff_exp, n_embd, n_expert));
        specs.push_back(rnd3(b + "ffn_up_exps.weight", n_embd, n_ff_exp, n_expert));
        specs.push_back(rnd(b + "ffn_gate_inp_shexp.weight", n_embd));
        specs.push_back(rnd(b + "ffn_gate_shexp.weight", n_embd, n_ff_exp));
        specs.push_back(rnd(b + "ffn_down_shexp.weight", n_ff_exp, n_embd));
        specs.push_back(rnd(b + "ffn_up_shexp.weight", n_embd, n_ff_exp));
    }

    return write_gguf(path, "qwen4exp", [&](gguf_context * g) {
        set_shape_kv(g, "qwen4exp", n_embd, n_layer);
        gguf_set_val_u32(g, "qwen4exp.attention.head_count", (uint32_t) n_head);
        gguf_set_val_u32(g, "qwen4exp.attention.head_count_kv", (uint32_t) n_head_kv);
        gguf_set_val_u32(g, "qwen4exp.rope.dimension_count", 8);
        const int32_t sections[4] = {2, 1, 1, 0}; // summing to rope/2
        gguf_set_arr_data(g, "qwen4exp.rope.dimension_sections", GGUF_TYPE_INT32, sections, 4);
        gguf_set_val_f32(g, "qwen4exp.attention.layer_norm_rms_epsilon", 1e-6f);
        gguf_set_val_u32(g, "qwen4exp.ssm.conv_kernel", (uint32_t) d_conv);
        gguf_set_val_u32(g, "qwen4exp.ssm.state_size", (uint32_t) d_state);
        gguf_set_val_u32(g, "qwen4exp.ssm.group_count", (uint32_t) n_group);
        gguf_set_val_u32(g, "qwen4exp.ssm.time_step_rank", (uint32_t) dt_rank);
        gguf_set_val_u32(g, "qwen4exp.ssm.inner_size", (uint32_t) value_dim);
        gguf_set_val_u32(g, "qwen4exp.hyper_connection.count", (uint32_t) hc);
        gguf_set_val_u32(g, "qwen4exp.hyper_connection.low_rank", (uint32_t) hc_lr);
        gguf_set_val_u32(g, "qwen4exp.attention.indexer.head_count", (uint32_t) idx_heads);
        gguf_set_val_u32(g, "qwen4exp.attention.indexer.key_length", (uint32_t) idx_dim);
        gguf_set_val_u32(g, "qwen4exp.attention.indexer.top_k", 4);
        const uint32_t ratios[2] = {0, 2}; // QSA (k-pool blocks of 2) on the attention layer
        gguf_set_arr_data(g, "qwen4exp.attention.compress_ratios", GGUF_TYPE_UINT32, ratios, 2);
        gguf_set_val_u32(g, "qwen4exp.full_attention_interval", 2); // layer 1 full, layer 0 linear
        gguf_set_val_u32(g, "qwen4exp.expert_count", (uint32_t) n_expert);
        gguf_set_val_u32(g, "qwen4exp.expert_used_count", 1);
        gguf_set_val_u32(g, "qwen4exp.expert_feed_forward_length", (uint32_t) n_ff_exp);
        gguf_set_val_u32(g, "qwen4exp.expert_shared_feed_forward_length", (uint32_t) n_ff_exp);
        gguf_set_val_u32(g, "qwen4exp.vocab_size", (uint32_t) n_vocab);
        if (!ple) {
            return;
        }
        // PLE on the linear layer 0: bigrams ((ngram - 1) * 2 heads of 32 = n_embd)
        const uint32_t ple_layers[1] = {0};
        gguf_set_arr_data(g, "qwen4exp.ple.layers", GGUF_TYPE_UINT32, ple_layers, 1);
        gguf_set_val_u32(g, "qwen4exp.ple.ngram_size", 2);
        gguf_set_val_u32(g, "qwen4exp.ple.heads_per_ngram", 2);
        gguf_set_val_u32(g, "qwen4exp.ple.conv_kernel", (uint32_t) ple_kernel);
        gguf_set_val_u32(g, "qwen4exp.ple.eos_token_id", (uint32_t) n_vocab - 1);
        gguf_set_val_u32(g, "qwen4exp.embedding_length_per_layer_input", (uint32_t) ple_head_dim);
        const uint64_t multipliers[2] = {0x9e3779b97f4a7c15ull, 0xbf58476d1ce4e5b9ull};
        gguf_set_arr_data(g, "qwen4exp.ple.layer_multipliers", GGUF_TYPE_UINT64, multipliers, 2);
        const uint64_t offsets[2] = {0, 16}, vocab_sizes[2] = {16, 16};
        gguf_set_arr_data(g, "qwen4exp.ple.head_offsets", GGUF_TYPE_UINT64, offsets, 2);
        gguf_set_arr_data(g, "qwen4exp.ple.head_vocab_sizes", GGUF_TYPE_UINT64, vocab_sizes, 2);
    }, specs);
}

bool rsref_write_qwen2vl(const char * path, uint32_t n_layer_u, uint32_t n_embd_u, const int32_t * sections) {
    init_once();

    const uint32_t n_head = 4, n_head_kv = 2;
    // ggml_rope_multi rotates n_rot/2 pairs split over the (at most) four sections
    const int64_t head_dim = n_embd_u/n_head;
    bool ok = n_layer_u > 0 && n_embd_u > 0 && n_embd_u % (2*n_head) == 0 && sections;
    int64_t n_sect = 0;
    for (int i = 0; ok && i < 4; ++i) {
        ok = sections[i] >= 0;
        n_sect += ok ? sections[i] : 0;
    }
    if (!ok || n_sect != head_dim/2) {
        log_error("rsref_write_qwen2vl", "invalid model shape");
        return false;
    }

    const int64_t n_embd = n_embd_u, n_layer = n_layer_u, n_vocab = TINY_VOCAB, n_ff = 2*n_embd;
    const int64_t n_embd_kv = n_head_kv*head_dim;

    std::vector<wspec> specs = head_specs(n_embd, n_vocab);
    for (int64_t il = 0; il < n_layer; ++il) {
        const std::string b = blk(il);
        specs.push_back(ones(b + "attn_norm.weight", n_embd));
        push_qkv(specs, b, n_embd, n_embd_kv);
        // Qwen2 has Q/K/V biases
        specs.push_back(rnd(b + "attn_q.bias", n_embd));
        specs.push_back(rnd(b + "attn_k.bias", n_embd_kv));
        specs.push_back(rnd(b + "attn_v.bias", n_embd_kv));
        specs.push_back(rnd(b + "attn_output.weight", n_embd, n_embd));
        specs.push_back(ones(b + "ffn_norm.weight", n_embd));
        specs.push_back(rnd(b + "ffn_gate.weight", n_embd, n_ff));
        specs.push_back(rnd(b + "ffn_down.weight", n_ff, n_embd));
        specs.push_back(rnd(b + "ffn_up.weight", n_embd, n_ff));
    }

    std::vector<int32_t> sect(sections, sections + 4);
    return write_gguf(path, "qwen2vl", [&](gguf_context * g) {
        set_shape_kv(g, "qwen2vl", n_embd, n_layer);
        gguf_set_val_u32(g, "qwen2vl.feed_forward_length", (uint32_t) n_ff);
        gguf_set_val_u32(g, "qwen2vl.attention.head_count", n_head);
        gguf_set_val_u32(g, "qwen2vl.attention.head_count_kv", n_head_kv);
        gguf_set_val_f32(g, "qwen2vl.attention.layer_norm_rms_epsilon", 1e-6f);
        gguf_set_val_f32(g, "qwen2vl.rope.freq_base", 1000000.0f);
        gguf_set_arr_data(g, "qwen2vl.rope.dimension_sections", GGUF_TYPE_INT32, sect.data(), sect.size());
        gguf_set_val_u32(g, "qwen2vl.vocab_size", (uint32_t) n_vocab);
    }, specs);
}

size_t rsref_sizeof(int32_t which) {
    return which == 0 ? sizeof(rsref_params) : 0;
}

rsref * rsref_new(const char * model_path, const rsref_params * p) {
    init_once();

    try {
        llama_model * model = load_model(model_path);
        if (!model) {
            return nullptr;
        }

        const llama_hparams & hp = model->hparams;
        llama_memory_i::layer_filter_cb filter = nullptr;
        if (p->filter) {
            std::vector<bool> keep(p->filter, p->filter + p->n_filter);
            filter = [keep](int32_t il) { return il >= 0 && (size_t) il < keep.size() && keep[il]; };
        } else if (!llm_arch_is_recurrent(model->arch)) {
            // llama_memory_hybrid's default for a null filter_recr
            filter = [&hp](int32_t il) { return hp.is_recr(il); };
        }

        auto r = std::make_unique<rsref>();
        r->model = model;
        r->owned = std::make_unique<llama_memory_recurrent>(
                *model, (ggml_type) p->type_r, (ggml_type) p->type_s, /*offload =*/ false,
                p->mem_size, p->n_seq_max, p->n_rs_seq, filter);
        r->mem = r->owned.get();
        return r.release();
    } catch (const std::exception & e) {
        log_error("rsref_new", e.what());
        return nullptr;
    } catch (...) {
        return nullptr;
    }
}

void rsref_free(rsref * r) {
    delete r;
}

void rsref_clear(rsref * r, bool data) {
    r->mem->clear(data);
}

bool rsref_seq_rm(rsref * r, int32_t seq, int32_t p0, int32_t p1) {
    return r->mem->seq_rm(seq, p0, p1);
}

void rsref_seq_cp(rsref * r, int32_t src, int32_t dst, int32_t p0, int32_t p1) {
    r->mem->seq_cp(src, dst, p0, p1);
}

void rsref_seq_keep(rsref * r, int32_t seq) {
    r->mem->seq_keep(seq);
}

void rsref_seq_add(rsref * r, int32_t seq, int32_t p0, int32_t p1, int32_t delta) {
    r->mem->seq_add(seq, p0, p1, delta);
}

void rsref_seq_div(rsref * r, int32_t seq, int32_t p0, int32_t p1, int32_t d) {
    r->mem->seq_div(seq, p0, p1, d);
}

int32_t rsref_seq_pos_min(const rsref * r, int32_t seq) {
    return r->mem->seq_pos_min(seq);
}

int32_t rsref_seq_pos_max(const rsref * r, int32_t seq) {
    return r->mem->seq_pos_max(seq);
}

bool rsref_can_shift(const rsref * r) {
    return r->mem->get_can_shift();
}

bool rsref_find_slot(rsref * r, const kvref_ubatch * ub) {
    if (!ubatch_ok(ub)) {
        log_error("rsref_find_slot", "the ubatch is not from an equal split (stock asserts equal_seqs)");
        return false;
    }
    const llama_ubatch u = to_ubatch(ub);
    return r->mem->find_slot(u);
}

bool rsref_prepare(rsref * r, const kvref_ubatch * ubs, uint32_t n) {
    std::vector<llama_ubatch> v;
    v.reserve(n);
    for (uint32_t i = 0; i < n; ++i) {
        if (!ubatch_ok(&ubs[i])) {
            log_error("rsref_prepare", "a ubatch is not from an equal split (stock asserts equal_seqs)");
            return false;
        }
        v.push_back(to_ubatch(&ubs[i]));
    }
    return r->mem->prepare(v);
}

void rsref_cells(const rsref * r, int32_t * pos, int32_t * src, int32_t * src0, int32_t * tail, uint64_t * seq) {
    const auto & cells = r->mem->cells;
    for (size_t i = 0; i < cells.size(); ++i) {
        const auto & c = cells[i];
        if (pos)  { pos[i]  = c.pos; }
        if (src)  { src[i]  = c.src; }
        if (src0) { src0[i] = c.src0; }
        if (tail) { tail[i] = c.tail; }
        if (seq) {
            uint64_t * w = seq + 4*i;
            w[0] = w[1] = w[2] = w[3] = 0;
            for (const llama_seq_id s : c.seq_id) {
                if (s >= 0 && s < 256) {
                    w[s/64] |= 1ull << (s % 64);
                }
            }
        }
    }
}

void rsref_info(const rsref * r, uint32_t * head, uint32_t * used, uint32_t * size, uint32_t * n,
                int32_t * rs_z, uint32_t * n_rs_seq, uint32_t * n_seq_max) {
    const auto & m = *r->mem;
    if (head)      { *head      = m.head; }
    if (used)      { *used      = m.used; }
    if (size)      { *size      = m.size; }
    if (n)         { *n         = m.n; }
    if (rs_z)      { *rs_z      = m.rs_z; }
    if (n_rs_seq)  { *n_rs_seq  = m.n_rs_seq; }
    if (n_seq_max) { *n_seq_max = m.n_seq_max; }
}

uint32_t rsref_rs_idx(const rsref * r, uint32_t * out, uint32_t cap) {
    const auto & v = r->mem->rs_idx;
    for (size_t i = 0; i < v.size() && i < cap; ++i) {
        out[i] = v[i];
    }
    return (uint32_t) v.size();
}

void rsref_ctx_info(const rsref * r, bool full, uint32_t * n_rs, uint32_t * head, int32_t * rs_z) {
    auto * mem = r->mem;
    // init_full() for the full context; the batch constructor with no ubatches for the other
    // (init_batch would also split a batch and run prepare(), which does not change these)
    const auto ctx = full ? std::make_unique<llama_memory_recurrent_context>(mem)
                          : std::make_unique<llama_memory_recurrent_context>(mem, std::vector<llama_ubatch>{});
    if (n_rs) { *n_rs = ctx->get_n_rs(); }
    if (head) { *head = ctx->get_head(); }
    if (rs_z) { *rs_z = ctx->get_rs_z(); }
}

int32_t rsref_s_copy(rsref * r, uint32_t i) {
    auto * mem = r->mem;
    if ((size_t) mem->head + i >= mem->size) {
        return INT32_MIN;
    }
    const llama_memory_recurrent_context ctx(mem, std::vector<llama_ubatch>{});
    return ctx.s_copy((int) i);
}

size_t rsref_state_write(const rsref * r, int32_t seq, uint32_t flags, uint8_t * buf, size_t cap) {
    const auto & m = *r->mem;

    // the stock aborts, checked on the same cell selection as state_write
    size_t n_ranges = 0;
    bool prev = false;
    for (uint32_t i = 0; i < m.size; ++i) {
        const auto & c = m.cells[i];
        const bool sel = (seq == -1 && !c.is_empty()) || c.has_seq_id(seq);
        if (sel && !prev) {
            ++n_ranges;
        }
        prev = sel;
        if (!sel || m.n_rs_seq == 0) {
            continue;
        }
        if (seq != -1) {
            if (seq < 0 || (size_t) seq >= m.rs_idx.size()) {
                log_error("rsref_state_write", "seq has no rollback index (stock asserts)");
                return 0;
            }
            continue;
        }
        bool first = true;
        uint32_t idx = 0;
        for (const llama_seq_id s : c.seq_id) {
            if (s < 0 || (size_t) s >= m.rs_idx.size()) {
                log_error("rsref_state_write", "a cell seq has no rollback index (stock asserts)");
                return 0;
            }
            if (!first && m.rs_idx[s] != idx) {
                log_error("rsref_state_write", "shared cell with different rollback indices (stock aborts)");
                return 0;
            }
            idx = m.rs_idx[s];
            first = false;
        }
    }
    if ((flags & LLAMA_STATE_SEQ_FLAGS_ON_DEVICE) && n_ranges > 1) {
        log_error("rsref_state_write", "several cell ranges on device (stock aborts)");
        return 0;
    }

    try {
        io_write_buf io(buf, cap);
        m.state_write(io, seq, flags);
        return io.n_bytes();
    } catch (const std::exception & e) {
        log_error("rsref_state_write", e.what());
        return 0;
    } catch (...) {
        return 0;
    }
}

bool rsref_state_read(rsref * r, int32_t seq, uint32_t flags, const uint8_t * buf, size_t size,
                      size_t * consumed) {
    auto & m = *r->mem;
    if (consumed) {
        *consumed = 0;
    }

    if (seq != -1) {
        if (m.n_rs_seq != 0 && seq >= 0 && (uint32_t) seq >= m.n_seq_max && (uint32_t) seq < m.size) {
            log_error("rsref_state_read", "seq >= n_seq_max with rollback (stock asserts in set_rs_idx)");
            return false;
        }
        // a parsable single-seq meta of 2..size cells reaches asserts that want one cell per cell
        uint32_t cell_count = 0;
        if (size >= sizeof(cell_count)) {
            memcpy(&cell_count, buf, sizeof(cell_count));
        }
        if (cell_count >= 2 && cell_count <= m.size && seq >= 0 && (uint32_t) seq < m.size &&
            size >= sizeof(uint32_t) + (size_t) cell_count*2*sizeof(uint32_t)) {
            bool agnostic = true;
            for (uint32_t k = 0; k < cell_count; ++k) {
                uint32_t n_seq_id;
                memcpy(&n_seq_id, buf + sizeof(uint32_t) + (size_t) k*8 + 4, sizeof(n_seq_id));
                agnostic = agnostic && n_seq_id == 0;
            }
            if (agnostic) {
                log_error("rsref_state_read", "single-seq state of several cells (stock asserts)");
                return false;
            }
        }
    }

    io_read_buf io(buf, size);
    try {
        m.state_read(io, seq, flags);
        if (consumed) {
            *consumed = io.n_bytes();
        }
        return true;
    } catch (const std::exception & e) {
        io.discard();
        log_error("rsref_state_read", e.what());
        if (consumed) {
            *consumed = io.n_bytes();
        }
        return false;
    } catch (...) {
        io.discard();
        if (consumed) {
            *consumed = io.n_bytes();
        }
        return false;
    }
}

uint32_t rsref_n_layer(const rsref * r) {
    return r->model->hparams.n_layer();
}

uint32_t rsref_n_embd_r(const rsref * r) {
    return r->model->hparams.n_embd_r();
}

uint32_t rsref_n_embd_s(const rsref * r) {
    return r->model->hparams.n_embd_s();
}

bool rsref_has_tensor(const rsref * r, int32_t which, int32_t il) {
    return tensor_of(r, which, il) != nullptr;
}

size_t rsref_tensor_get(const rsref * r, int32_t which, int32_t il, uint8_t * out, size_t cap) {
    ggml_tensor * t = tensor_of(r, which, il);
    if (!t) {
        return 0;
    }
    const size_t n = ggml_nbytes(t);
    if (out && cap >= n && n > 0) {
        ggml_backend_tensor_get(t, out, 0, n);
    }
    return n;
}

bool rsref_tensor_set(rsref * r, int32_t which, int32_t il, const uint8_t * data, size_t size) {
    ggml_tensor * t = tensor_of(r, which, il);
    if (!t || size != ggml_nbytes(t)) {
        return false;
    }
    if (size > 0) {
        ggml_backend_tensor_set(t, data, 0, size);
    }
    return true;
}

} // extern "C"
