// kvref: the kvref.h interface implemented by forwarding to the pinned llama.cpp's own
// llama_kv_cache. Test-only code: see kvref.h for why it exists.

#include <algorithm>
#include <array>
#include <atomic>
#include <bitset>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "ggml.h"
#include "ggml-backend.h"
#include "gguf.h"
#include "llama.h"

// Internal headers of the pinned tree (its src/ is on the include path). Every header the two
// patched ones below depend on is included first, so that the access hack only applies to the
// text of llama-kv-cells.h and llama-kv-cache.h themselves.
#include "llama-arch.h"
#include "llama-batch.h"
#include "llama-cparams.h"
#include "llama-graph.h"
#include "llama-hparams.h"
#include "llama-io.h"
#include "llama-memory.h"
#include "llama-model.h"

// The shim must observe state the stock classes keep private (heads, raw cell arrays, pending
// stream copies). Turning `private` into `public` changes neither layout nor mangling, and
// this file is never part of a product build.
#define private public
#include "llama-kv-cells.h"
#include "llama-kv-cache.h"
#undef private

// Only the kvref_* API is exported (see shim/kvref.map); everything else in this file and in
// the static llama/ggml archives is compiled with hidden visibility.
#pragma GCC visibility push(default)
#include "kvref.h"
#include "rsref.h"
#pragma GCC visibility pop

static_assert(KVREF_MAX_SEQ == LLAMA_MAX_SEQ, "kvref.h and the pinned tree disagree on the seq limit");

#include "kvref-common.h"

using namespace kvref_shim;

namespace {

// set_input_* only require a host buffer on the destination and then write through
// dst->data. One permanent host buffer serves as that marker for every call, and data points
// straight at the caller's array, so the stock code writes the result in place: no
// allocation and no copy per call, which keeps the shim's overhead out of benchmarks.
ggml_backend_buffer_t host_marker_buffer() {
    alignas(64) static uint8_t backing[64];
    static ggml_backend_buffer_t buf = ggml_backend_cpu_buffer_from_ptr(backing, sizeof(backing));
    return buf;
}

ggml_tensor host_tensor(ggml_type type, int64_t ne0, int64_t ne1, int64_t ne2, int64_t ne3, void * data) {
    ggml_tensor t;
    memset(&t, 0, sizeof(t));
    t.type   = type;
    t.buffer = host_marker_buffer();
    t.ne[0] = ne0;
    t.ne[1] = ne1;
    t.ne[2] = ne2;
    t.ne[3] = ne3;
    t.nb[0] = ggml_type_size(type);
    t.nb[1] = t.nb[0]*ne0;
    t.nb[2] = t.nb[1]*ne1;
    t.nb[3] = t.nb[2]*ne2;
    t.data  = data;
    return t;
}

using slot_info = llama_kv_cache::slot_info;

slot_info to_slot_info(const kvref_slot * s) {
    slot_info si;
    si.s0 = s->s0;
    si.s1 = s->s1;
    si.resize(s->n_stream);
    for (uint32_t k = 0; k < s->n_stream; ++k) {
        si.strm[k] = s->strm[k];
        si.idxs[k].assign(s->idxs + (size_t) k*s->n_per_stream, s->idxs + (size_t) (k + 1)*s->n_per_stream);
    }
    return si;
}

void clear_slot(kvref_slot * out) {
    out->s0 = 0;
    out->s1 = 0;
    out->n_stream = 0;
    out->n_per_stream = 0;
}

bool from_slot_info(const slot_info & si, kvref_slot * out) {
    if (si.empty()) {
        clear_slot(out);
        return false;
    }
    const size_t ns = si.n_stream();
    const size_t n  = si.size();
    // the caller sizes idxs for the ubatch's tokens; anything else is a caller bug
    if (ns > KVREF_MAX_SEQ || ns*n > out->idxs_cap || !out->idxs) {
        clear_slot(out);
        return false;
    }
    out->s0 = si.s0;
    out->s1 = si.s1;
    out->n_stream = (uint32_t) ns;
    out->n_per_stream = (uint32_t) n;
    for (size_t k = 0; k < ns; ++k) {
        out->strm[k] = si.strm[k];
        memcpy(out->idxs + k*n, si.idxs[k].data(), n*sizeof(uint32_t));
    }
    return true;
}

} // namespace

struct kvref {
    llama_model * model = nullptr;
    // the cache keeps a reference to its hparams, so they live (at a fixed address) as long as it;
    // hparams_owned is set for the caches of kvref_new, whose hparams the params override
    std::unique_ptr<llama_hparams> hparams_owned;
    const llama_hparams * hparams = nullptr;
    // the cache every function works on: owned (kvref_new) or borrowed (a view, kv_view_new, of a
    // part of a composite memory that its cmpref owns)
    std::unique_ptr<llama_kv_cache> owned;
    llama_kv_cache * kv = nullptr;
    // only needed by update(): stream copies synchronize it and the K-shift graph runs on its
    // scheduler. Created on first use because most caches never shift.
    llama_context * lctx = nullptr;

    ~kvref() {
        owned.reset();
        if (lctx) {
            llama_free(lctx);
        }
    }
};

kvref * kvref_shim::kv_view_new(llama_model * model, llama_kv_cache * kv) {
    auto r = std::make_unique<kvref>();
    r->model = model;
    r->hparams = &kv->hparams;
    r->kv = kv;
    return r.release();
}

void kvref_shim::kv_view_free(kvref * r) {
    delete r;
}

extern "C" {

size_t kvref_sizeof(int32_t which) {
    switch (which) {
        case 0:  return sizeof(kvref_ubatch);
        case 1:  return sizeof(kvref_slot);
        case 2:  return sizeof(kvref_params);
        case 3:  return sizeof(kvref_ctx_params);
        default: return 0;
    }
}

void kvref_default_params(kvref_params * p) {
    p->kv_size = 256;
    p->n_seq_max = 1;
    p->unified = true;
    p->n_swa = 0;
    p->swa_type = LLAMA_SWA_TYPE_NONE;
    p->v_trans = true;
    p->type_k = GGML_TYPE_F16;
    p->type_v = GGML_TYPE_F16;
    p->use_alibi = false;
    p->mrope = false;
    p->n_rel_attn_bkts = 0;
    p->non_causal_type = -1;
    p->ple_n_heads = 0;
    p->ple_eos_token_id = 0;
    p->ple_image_token_id = 0;
}

bool kvref_write_model(const char * path) {
    return kvref_write_model_ex(path, 2, 64, 4, 2);
}

bool kvref_write_model_ex(const char * path, uint32_t n_layer_u, uint32_t n_embd_u, uint32_t n_head_u,
                          uint32_t n_head_kv_u) {
    init_once();

    if (n_layer_u == 0 || n_head_u == 0 || n_head_kv_u == 0 || n_embd_u % n_head_u != 0 ||
        (n_embd_u/n_head_u) % 2 != 0 || n_head_u % n_head_kv_u != 0) {
        log_error("kvref_write_model_ex", "invalid model shape");
        return false;
    }

    const int64_t n_embd = n_embd_u, n_vocab = 32, n_ff = 2*n_embd, n_layer = n_layer_u;
    const int64_t n_head = n_head_u, n_head_kv = n_head_kv_u, head_dim = n_embd/n_head;
    const int64_t n_embd_kv = n_head_kv*head_dim;

    struct spec {
        std::string name;
        int64_t ne0, ne1; // ne1 == 0: 1-D
        bool norm;
    };
    std::vector<spec> specs = {
        {"token_embd.weight",  n_embd, n_vocab, false},
        {"output_norm.weight", n_embd, 0,       true},
        {"output.weight",      n_embd, n_vocab, false},
    };
    for (int64_t il = 0; il < n_layer; ++il) {
        const std::string b = "blk." + std::to_string(il) + ".";
        specs.push_back({b + "attn_norm.weight",   n_embd, 0,         true});
        specs.push_back({b + "attn_q.weight",      n_embd, n_embd,    false});
        specs.push_back({b + "attn_k.weight",      n_embd, n_embd_kv, false});
        specs.push_back({b + "attn_v.weight",      n_embd, n_embd_kv, false});
        specs.push_back({b + "attn_output.weight", n_embd, n_embd,    false});
        specs.push_back({b + "ffn_norm.weight",    n_embd, 0,         true});
        specs.push_back({b + "ffn_gate.weight",    n_embd, n_ff,      false});
        specs.push_back({b + "ffn_up.weight",      n_embd, n_ff,      false});
        specs.push_back({b + "ffn_down.weight",    n_ff,   n_embd,    false});
    }

    size_t n_floats = 0;
    for (const auto & s : specs) {
        n_floats += (size_t) s.ne0*(s.ne1 ? s.ne1 : 1);
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

    gguf_set_val_str(gctx, "general.architecture", "llama");
    gguf_set_val_str(gctx, "tokenizer.ggml.model", "no_vocab");
    gguf_set_val_u32(gctx, "llama.context_length", 4096);
    gguf_set_val_u32(gctx, "llama.embedding_length", (uint32_t) n_embd);
    gguf_set_val_u32(gctx, "llama.block_count", (uint32_t) n_layer);
    gguf_set_val_u32(gctx, "llama.feed_forward_length", (uint32_t) n_ff);
    gguf_set_val_u32(gctx, "llama.attention.head_count", (uint32_t) n_head);
    gguf_set_val_u32(gctx, "llama.attention.head_count_kv", (uint32_t) n_head_kv);
    gguf_set_val_f32(gctx, "llama.attention.layer_norm_rms_epsilon", 1e-5f);
    gguf_set_val_f32(gctx, "llama.rope.freq_base", 10000.0f);
    gguf_set_val_u32(gctx, "llama.vocab_size", (uint32_t) n_vocab);

    // fixed-seed xorshift: the same file (and the same logits) on every machine
    uint64_t state = 0x9e3779b97f4a7c15ull;
    auto next_weight = [&state]() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        return ((float) (state >> 40) / (float) (1ull << 24) - 0.5f)*0.2f; // [-0.1, 0.1)
    };

    for (const auto & s : specs) {
        ggml_tensor * t = s.ne1 ? ggml_new_tensor_2d(ctx, GGML_TYPE_F32, s.ne0, s.ne1)
                                : ggml_new_tensor_1d(ctx, GGML_TYPE_F32, s.ne0);
        ggml_set_name(t, s.name.c_str());
        float * d = (float *) t->data;
        for (int64_t i = 0; i < ggml_nelements(t); ++i) {
            d[i] = s.norm ? 1.0f : next_weight();
        }
        gguf_add_tensor(gctx, t);
    }

    const bool ok = gguf_write_to_file(gctx, path, /*only_meta =*/ false);

    gguf_free(gctx);
    ggml_free(ctx);
    return ok;
}

int32_t kvref_sanity_decode(const char * model_path, uint32_t n_tokens) {
    init_once();

    llama_model * model = load_model(model_path);
    if (!model) {
        return -100;
    }

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 256;
    cp.n_batch = 256;
    cp.n_ubatch = 256;
    cp.n_threads = 1;
    cp.n_threads_batch = 1;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        return -101;
    }

    std::vector<llama_token> tokens(n_tokens);
    for (uint32_t i = 0; i < n_tokens; ++i) {
        tokens[i] = (llama_token) (i % 32);
    }

    int32_t ret = llama_decode(ctx, llama_batch_get_one(tokens.data(), (int32_t) n_tokens));
    if (ret == 0) {
        const float * logits = llama_get_logits_ith(ctx, -1);
        const int32_t n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
        for (int32_t i = 0; logits && i < n_vocab; ++i) {
            if (!std::isfinite(logits[i])) {
                ret = -102;
                break;
            }
        }
        if (!logits) {
            ret = -103;
        } else if (llama_memory_seq_pos_max(llama_get_memory(ctx), 0) != (llama_pos) n_tokens - 1) {
            ret = -104;
        }
    }

    llama_free(ctx);
    return ret;
}

kvref * kvref_new(const char * model_path, const kvref_params * p) {
    init_once();

    try {
        llama_model * model = load_model(model_path);
        if (!model) {
            return nullptr;
        }

        auto r = std::make_unique<kvref>();
        r->model = model;
        r->hparams_owned = std::make_unique<llama_hparams>(model->hparams);
        r->hparams = r->hparams_owned.get();

        llama_hparams & hp = *r->hparams_owned;
        hp.n_swa     = p->n_swa;
        hp.swa_type  = (llama_swa_type) p->swa_type;
        hp.use_alibi = p->use_alibi;
        if (p->mrope) {
            // n_pos_per_embd() derives from rope_type: 4 sections for M-RoPE, and cell ext kept
            hp.rope_type = LLAMA_ROPE_TYPE_MROPE;
        }
        if (p->n_rel_attn_bkts != 0) {
            hp.n_rel_attn_bkts = p->n_rel_attn_bkts;
        }
        if (p->non_causal_type >= 0) {
            hp.non_causal_type = (llama_non_causal_type) p->non_causal_type;
        }
        if (p->ple_n_heads > 0) {
            hp.ple_n_heads        = p->ple_n_heads;
            hp.ple_eos_token_id   = p->ple_eos_token_id;
            hp.ple_image_token_id = p->ple_image_token_id;
        }

        r->owned = std::make_unique<llama_kv_cache>(
                *model, hp,
                (ggml_type) p->type_k, (ggml_type) p->type_v,
                p->v_trans, /*offload =*/ false, p->unified,
                p->kv_size, p->n_seq_max, /*n_pad =*/ 1u,
                p->n_swa, (llama_swa_type) p->swa_type,
                /*mem_other =*/ nullptr,
                /*filter    =*/ nullptr,
                /*reuse     =*/ nullptr,
                /*share     =*/ nullptr);
        r->kv = r->owned.get();

        return r.release();
    } catch (const std::exception & e) {
        fprintf(stderr, "kvref_new: %s\n", e.what());
        return nullptr;
    } catch (...) {
        return nullptr;
    }
}

void kvref_free(kvref * r) {
    delete r;
}

uint32_t kvref_size(const kvref * r) {
    return r->kv->get_size();
}

uint32_t kvref_n_stream(const kvref * r) {
    return r->kv->get_n_stream();
}

uint32_t kvref_n_embd_v_gqa_max(const kvref * r) {
    return r->hparams->n_embd_v_gqa_max();
}

void kvref_clear(kvref * r, bool data) {
    r->kv->clear(data);
}

bool kvref_seq_rm(kvref * r, int32_t seq, int32_t p0, int32_t p1) {
    return r->kv->seq_rm(seq, p0, p1);
}

void kvref_seq_cp(kvref * r, int32_t src, int32_t dst, int32_t p0, int32_t p1) {
    r->kv->seq_cp(src, dst, p0, p1);
}

void kvref_seq_keep(kvref * r, int32_t seq) {
    r->kv->seq_keep(seq);
}

void kvref_seq_add(kvref * r, int32_t seq, int32_t p0, int32_t p1, int32_t delta) {
    r->kv->seq_add(seq, p0, p1, delta);
}

void kvref_seq_div(kvref * r, int32_t seq, int32_t p0, int32_t p1, int32_t d) {
    r->kv->seq_div(seq, p0, p1, d);
}

int32_t kvref_seq_pos_min(const kvref * r, int32_t seq) {
    return r->kv->seq_pos_min(seq);
}

int32_t kvref_seq_pos_max(const kvref * r, int32_t seq) {
    return r->kv->seq_pos_max(seq);
}

bool kvref_can_shift(const kvref * r) {
    return r->kv->get_can_shift();
}

bool kvref_has_shift(const kvref * r) {
    return r->kv->get_has_shift();
}

bool kvref_find_slot(const kvref * r, const kvref_ubatch * ub, bool cont, kvref_slot * out) {
    const llama_ubatch u = to_ubatch(ub);
    return from_slot_info(r->kv->find_slot(u, cont), out);
}

void kvref_apply_ubatch(kvref * r, const kvref_slot * slot, const kvref_ubatch * ub) {
    const llama_ubatch u = to_ubatch(ub);
    r->kv->apply_ubatch(to_slot_info(slot), u);
}

bool kvref_prepare(kvref * r, const kvref_ubatch * ubs, uint32_t n, kvref_slot * slots) {
    std::vector<llama_ubatch> v;
    v.reserve(n);
    for (uint32_t i = 0; i < n; ++i) {
        v.push_back(to_ubatch(&ubs[i]));
    }

    const auto res = r->kv->prepare(v);

    bool ok = !res.empty() && res.size() == n;
    for (uint32_t i = 0; ok && i < n; ++i) {
        ok = from_slot_info(res[i], &slots[i]);
    }
    if (!ok) {
        for (uint32_t i = 0; i < n; ++i) {
            clear_slot(&slots[i]);
        }
    }
    return ok;
}

uint32_t kvref_get_n_kv(const kvref * r, const kvref_slot * slot) {
    return r->kv->get_n_kv(to_slot_info(slot));
}

int32_t kvref_update(kvref * r) {
    if (!r->lctx) {
        llama_context_params cp = llama_context_default_params();
        cp.n_ctx = 256;
        cp.n_batch = 256;
        cp.n_ubatch = 256;
        cp.n_seq_max = 1;
        cp.n_threads = 1;
        cp.n_threads_batch = 1;
        r->lctx = llama_init_from_model(r->model, cp);
        if (!r->lctx) {
            return LLAMA_MEMORY_STATUS_FAILED_COMPUTE;
        }
    }

    // as llama_context::memory_update: no update -> nothing applied
    auto mctx = r->kv->init_update(r->lctx, false);
    const llama_memory_status status = mctx->get_status();
    if (status == LLAMA_MEMORY_STATUS_SUCCESS) {
        mctx->apply();
    }
    return (int32_t) status;
}

void kvref_cells(const kvref * r, uint32_t stream, int32_t * pos, int32_t * shift, uint64_t * seq, int32_t * ext) {
    const llama_kv_cells & cells = r->kv->v_cells[stream];
    const size_t n = cells.pos.size();

    if (pos) {
        memcpy(pos, cells.pos.data(), n*sizeof(int32_t));
    }
    if (shift) {
        memcpy(shift, cells.shift.data(), n*sizeof(int32_t));
    }
    if (seq) {
#if defined(__GLIBCXX__) && (defined(__x86_64__) || defined(__aarch64__))
        // libstdc++ stores bitset<256> as four little-endian 64-bit words, bit s in word s/64
        static_assert(sizeof(llama_kv_cells::seq_set_t) == 4*sizeof(uint64_t), "unexpected bitset layout");
        memcpy(seq, cells.seq.data(), n*sizeof(llama_kv_cells::seq_set_t));
#else
        for (size_t i = 0; i < n; ++i) {
            for (int w = 0; w < 4; ++w) {
                uint64_t word = 0;
                for (int b = 0; b < 64; ++b) {
                    if (cells.seq[i].test(w*64 + b)) {
                        word |= 1ull << b;
                    }
                }
                seq[i*4 + w] = word;
            }
        }
#endif
    }
    if (ext) {
        static_assert(sizeof(llama_kv_cell_ext) == 3*sizeof(int32_t), "unexpected cell ext layout");
        for (size_t i = 0; i < n; ++i) {
            ext[i*3 + 0] = cells.ext[i].x;
            ext[i*3 + 1] = cells.ext[i].y;
            ext[i*3 + 2] = cells.ext[i].tok;
        }
    }
}

void kvref_stream_info(const kvref * r, uint32_t stream, uint32_t * head, uint32_t * used,
                       uint32_t * used_min, uint32_t * used_max_p1, bool * has_shift) {
    const llama_kv_cells & cells = r->kv->v_cells[stream];
    if (head)        { *head        = r->kv->v_heads[stream]; }
    if (used)        { *used        = cells.get_used(); }
    if (used_min)    { *used_min    = cells.used_min(); }
    if (used_max_p1) { *used_max_p1 = cells.used_max_p1(); }
    if (has_shift)   { *has_shift   = cells.get_has_shift(); }
}

uint32_t kvref_pending_copies(const kvref * r) {
    return (uint32_t) r->kv->sc_info.ssrc.size();
}

uint32_t kvref_pending_copy_list(const kvref * r, uint32_t * src, uint32_t * dst, uint32_t cap) {
    const auto & sc = r->kv->sc_info;
    const uint32_t n = (uint32_t) sc.ssrc.size();
    for (uint32_t k = 0; k < n && k < cap; ++k) {
        src[k] = sc.ssrc[k];
        dst[k] = sc.sdst[k];
    }
    return n;
}

void kvref_kq_mask(const kvref * r, const kvref_ubatch * ub, bool causal, bool f16, uint32_t n_kv,
                   uint32_t n_stream_m, void * out) {
    const llama_ubatch u = to_ubatch(ub);
    ggml_tensor dst = host_tensor(f16 ? GGML_TYPE_F16 : GGML_TYPE_F32,
            n_kv, ub->n_tokens/n_stream_m, 1, n_stream_m, out);
    r->kv->set_input_kq_mask(&dst, &u, causal);
}

void kvref_k_idxs(const kvref * r, const kvref_ubatch * ub, const kvref_slot * slot, int64_t * out) {
    const llama_ubatch u = to_ubatch(ub);
    ggml_tensor dst = host_tensor(GGML_TYPE_I64, ub->n_tokens, 1, 1, 1, out);
    r->kv->set_input_k_idxs(&dst, &u, to_slot_info(slot));
}

void kvref_v_idxs(const kvref * r, const kvref_ubatch * ub, const kvref_slot * slot, int64_t * out) {
    const llama_ubatch u = to_ubatch(ub);
    const int64_t n = r->kv->v_trans ? (int64_t) ub->n_tokens*r->hparams->n_embd_v_gqa_max() : ub->n_tokens;
    ggml_tensor dst = host_tensor(GGML_TYPE_I64, n, 1, 1, 1, out);
    r->kv->set_input_v_idxs(&dst, &u, to_slot_info(slot));
}

void kvref_k_shift(const kvref * r, int32_t * out) {
    ggml_tensor dst = host_tensor(GGML_TYPE_I32, (int64_t) r->kv->get_size()*r->kv->get_n_stream(), 1, 1, 1, out);
    r->kv->set_input_k_shift(&dst);
}

void kvref_get_prev_tokens(const kvref * r, const kvref_ubatch * ub, uint32_t n, int32_t * out) {
    const llama_ubatch u = to_ubatch(ub);
    std::vector<llama_token> res;
    r->kv->get_prev_tokens(u, n, res);
    std::copy(res.begin(), res.end(), out);
}

void kvref_pos_bucket(const kvref * r, const kvref_ubatch * ub, uint32_t n_kv, int32_t * out) {
    const llama_ubatch u = to_ubatch(ub);
    ggml_tensor dst = host_tensor(GGML_TYPE_I32, n_kv, ub->n_tokens, 1, 1, out);
    r->kv->set_input_pos_bucket(&dst, &u);
}

size_t kvref_view(const kvref * r, bool v, int32_t il, uint32_t n_kv, uint32_t s0, uint32_t s1,
                  int64_t ne[4], size_t nb[4], size_t * offs, uint8_t * data, size_t cap) {
    if (s1 < s0 || s1 >= r->kv->get_n_stream() || n_kv == 0 || n_kv > r->kv->get_size() ||
        r->kv->map_layer_ids.count(il) == 0) {
        return 0;
    }
    ggml_init_params ip = {
        /*.mem_size   =*/ 4*ggml_tensor_overhead(),
        /*.mem_buffer =*/ nullptr,
        /*.no_alloc   =*/ true,
    };
    ggml_context * ctx = ggml_init(ip);
    if (!ctx) {
        return 0;
    }
    slot_info si;
    si.s0 = s0;
    si.s1 = s1;
    si.resize(s1 - s0 + 1);
    for (uint32_t s = s0; s <= s1; ++s) {
        si.strm[s - s0] = s;
    }
    ggml_tensor * t = v ? r->kv->get_v(ctx, il, n_kv, si) : r->kv->get_k(ctx, il, n_kv, si);
    for (int d = 0; d < 4; ++d) {
        ne[d] = t->ne[d];
        nb[d] = t->nb[d];
    }
    *offs = t->view_offs;
    const size_t row = ggml_row_size(t->type, t->ne[0]);
    const size_t n = row*(size_t) (t->ne[1]*t->ne[2]*t->ne[3]);
    if (data && cap >= n && t->data) {
        // the layer tensors live in a host (CPU) buffer, so the view's data is addressable
        const uint8_t * base = (const uint8_t *) t->data;
        size_t o = 0;
        for (int64_t i3 = 0; i3 < t->ne[3]; ++i3) {
            for (int64_t i2 = 0; i2 < t->ne[2]; ++i2) {
                for (int64_t i1 = 0; i1 < t->ne[1]; ++i1) {
                    memcpy(data + o, base + i1*t->nb[1] + i2*t->nb[2] + i3*t->nb[3], row);
                    o += row;
                }
            }
        }
    }
    ggml_free(ctx);
    return n;
}

static ggml_tensor * layer_tensor(const kvref * r, bool v, int32_t il) {
    const auto it = r->kv->map_layer_ids.find(il);
    if (it == r->kv->map_layer_ids.end()) {
        return nullptr;
    }
    const auto & layer = r->kv->layers[it->second];
    return v ? layer.v : layer.k;
}

size_t kvref_tensor_nbytes(const kvref * r, bool v, int32_t il) {
    ggml_tensor * t = layer_tensor(r, v, il);
    return t ? ggml_nbytes(t) : 0;
}

bool kvref_tensor_get(const kvref * r, bool v, int32_t il, size_t offset, void * dst, size_t n) {
    ggml_tensor * t = layer_tensor(r, v, il);
    if (!t || offset > ggml_nbytes(t) || n > ggml_nbytes(t) - offset) {
        return false;
    }
    ggml_backend_tensor_get(t, dst, offset, n);
    return true;
}

bool kvref_tensor_set(kvref * r, bool v, int32_t il, size_t offset, const void * src, size_t n) {
    ggml_tensor * t = layer_tensor(r, v, il);
    if (!t || offset > ggml_nbytes(t) || n > ggml_nbytes(t) - offset) {
        return false;
    }
    ggml_backend_tensor_set(t, src, offset, n);
    return true;
}

size_t kvref_state_write(const kvref * r, int32_t seq, uint32_t flags, uint8_t * buf, size_t cap) {
    try {
        io_write_buf io(buf, cap);
        r->kv->state_write(io, seq, flags);
        return io.n_bytes();
    } catch (const std::exception & e) {
        fprintf(stderr, "kvref_state_write: %s\n", e.what());
        return 0;
    } catch (...) {
        return 0;
    }
}

void kvref_state_clear(kvref * r, int32_t seq) {
    r->kv->state_clear(seq);
}

size_t kvref_state_read(kvref * r, int32_t seq, uint32_t flags, const uint8_t * buf, size_t size) {
    io_read_buf io(buf, size);
    try {
        r->kv->state_read(io, seq, flags);
        return io.n_bytes();
    } catch (...) {
        io.discard();
        return 0;
    }
}

size_t kvref_state_read_sinfo(kvref * r, int32_t seq, const uint8_t * buf, size_t size, const uint32_t * counts_in,
                              const uint32_t * cells_in, uint32_t * counts_out, uint32_t * cells_out) {
    const uint32_t n_stream = r->kv->get_n_stream();
    llama_kv_cache::slot_info_vec_t in, out;
    if (counts_in) {
        size_t at = 0;
        in.resize(n_stream);
        for (uint32_t s = 0; s < n_stream; ++s) {
            if (counts_in[s] == 0) {
                continue;
            }
            in[s].s0 = in[s].s1 = s;
            in[s].resize(1);
            in[s].strm[0] = s;
            in[s].idxs[0].assign(cells_in + at, cells_in + at + counts_in[s]);
            at += counts_in[s];
        }
    }
    io_read_buf io(buf, size);
    try {
        r->kv->state_read_sinfo(io, seq, 0, &out, counts_in ? &in : nullptr);
    } catch (...) {
        io.discard();
        return 0;
    }
    size_t at = 0;
    for (uint32_t s = 0; s < n_stream; ++s) {
        const bool has = s < out.size() && !out[s].empty();
        counts_out[s] = has ? (uint32_t) out[s].idxs[0].size() : 0;
        for (uint32_t i = 0; i < counts_out[s]; ++i) {
            cells_out[at++] = out[s].idxs[0][i];
        }
    }
    return io.n_bytes();
}

// ---------------------------------------------------------------------------------------------
// kvref_ctx: a stock llama_context, public llama.h API only

void kvref_ctx_default_params(kvref_ctx_params * p) {
    p->n_ctx = 256;
    p->n_batch = 0;
    p->n_seq_max = 1;
    p->kv_unified = true;
    p->flash_attn = false;
    p->type_k = GGML_TYPE_F16;
    p->type_v = GGML_TYPE_F16;
    p->n_rs_seq = 0;
}

} // extern "C"

struct kvref_ctx {
    llama_model * model = nullptr;  // owned by the model cache
    llama_context * ctx = nullptr;
    int32_t n_vocab = 0;
    bool has_logits = false;        // the last decode succeeded (and so produced one output)

    // the batch arrays, reused across decodes
    std::vector<llama_token> token;
    std::vector<llama_pos> pos;
    std::vector<int32_t> n_seq_id;
    std::vector<llama_seq_id> seq_val;
    std::vector<llama_seq_id *> seq_id;
    std::vector<int8_t> logits;

    ~kvref_ctx() {
        if (ctx) {
            llama_free(ctx);
        }
    }
};

extern "C" {

kvref_ctx * kvref_ctx_new(const char * model_path, const kvref_ctx_params * p) {
    init_once();

    try {
        llama_model * model = load_model(model_path);
        if (!model) {
            return nullptr;
        }

        llama_context_params cp = llama_context_default_params();
        cp.n_ctx           = p->n_ctx;
        cp.n_batch         = p->n_batch ? p->n_batch : p->n_ctx;
        cp.n_ubatch        = cp.n_batch;
        cp.n_seq_max       = p->n_seq_max;
        cp.n_threads       = 1;
        cp.n_threads_batch = 1;
        cp.kv_unified      = p->kv_unified;
        cp.flash_attn_type = p->flash_attn ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
        cp.type_k          = (ggml_type) p->type_k;
        cp.type_v          = (ggml_type) p->type_v;
        cp.n_rs_seq        = p->n_rs_seq;

        auto c = std::make_unique<kvref_ctx>();
        c->model = model;
        c->ctx = llama_init_from_model(model, cp);
        if (!c->ctx) {
            return nullptr;
        }
        c->n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
        return c.release();
    } catch (const std::exception & e) {
        log_error("kvref_ctx_new", e.what());
        return nullptr;
    } catch (...) {
        return nullptr;
    }
}

void kvref_ctx_free(kvref_ctx * c) {
    delete c;
}

int32_t kvref_ctx_decode(kvref_ctx * c, const int32_t * tokens, uint32_t n, int32_t pos0, int32_t seq) {
    c->has_logits = false;
    try {
        c->token.assign(tokens, tokens + n);
        c->pos.resize(n);
        c->n_seq_id.assign(n, 1);
        c->seq_val.assign(n, seq);
        c->seq_id.resize(n);
        c->logits.assign(n, 0);
        for (uint32_t i = 0; i < n; ++i) {
            c->pos[i] = pos0 + (llama_pos) i;
            c->seq_id[i] = &c->seq_val[i];
        }
        if (n > 0) {
            c->logits[n - 1] = 1;
        }

        llama_batch batch = {
            /*.n_tokens =*/ (int32_t) n,
            /*.token    =*/ c->token.data(),
            /*.embd     =*/ nullptr,
            /*.pos      =*/ c->pos.data(),
            /*.n_seq_id =*/ c->n_seq_id.data(),
            /*.seq_id   =*/ c->seq_id.data(),
            /*.logits   =*/ c->logits.data(),
        };
        const int32_t ret = llama_decode(c->ctx, batch);
        c->has_logits = ret == 0 && n > 0;
        return ret;
    } catch (const std::exception & e) {
        log_error("kvref_ctx_decode", e.what());
        return -1;
    } catch (...) {
        return -1;
    }
}

uint32_t kvref_ctx_n_vocab(const kvref_ctx * c) {
    return (uint32_t) c->n_vocab;
}

bool kvref_ctx_logits(kvref_ctx * c, float * out) {
    if (!c->has_logits) {
        return false;
    }
    const float * logits = llama_get_logits_ith(c->ctx, -1);
    if (!logits) {
        return false;
    }
    memcpy(out, logits, (size_t) c->n_vocab*sizeof(float));
    return true;
}

int32_t rsref_ctx_decode_batch(kvref_ctx * c, const int32_t * tokens, const int32_t * pos,
                               const int32_t * n_seq_id, const int32_t * const * seq_id,
                               const int8_t * logits, uint32_t n) {
    c->has_logits = false;
    try {
        c->token.assign(tokens, tokens + n);
        c->pos.assign(pos, pos + n);
        c->n_seq_id.assign(n_seq_id, n_seq_id + n);
        c->seq_val.clear();
        for (uint32_t i = 0; i < n; ++i) {
            c->seq_val.insert(c->seq_val.end(), seq_id[i], seq_id[i] + n_seq_id[i]);
        }
        c->seq_id.resize(n);
        size_t off = 0;
        for (uint32_t i = 0; i < n; ++i) {
            c->seq_id[i] = c->seq_val.data() + off;
            off += (size_t) n_seq_id[i];
        }
        bool any_output = false;
        if (logits) {
            c->logits.assign(logits, logits + n);
            any_output = std::any_of(logits, logits + n, [](int8_t l) { return l != 0; });
        } else {
            c->logits.assign(n, 0);
            if (n > 0) {
                c->logits[n - 1] = 1;
                any_output = true;
            }
        }

        llama_batch batch = {
            /*.n_tokens =*/ (int32_t) n,
            /*.token    =*/ c->token.data(),
            /*.embd     =*/ nullptr,
            /*.pos      =*/ c->pos.data(),
            /*.n_seq_id =*/ c->n_seq_id.data(),
            /*.seq_id   =*/ c->seq_id.data(),
            /*.logits   =*/ c->logits.data(),
        };
        const int32_t ret = llama_decode(c->ctx, batch);
        c->has_logits = ret == 0 && any_output;
        return ret;
    } catch (const std::exception & e) {
        log_error("rsref_ctx_decode_batch", e.what());
        return -1;
    } catch (...) {
        return -1;
    }
}

bool rsref_ctx_logits_ith(kvref_ctx * c, int32_t i, float * out) {
    if (!c->has_logits) {
        return false;
    }
    const float * logits = llama_get_logits_ith(c->ctx, i);
    if (!logits) {
        return false;
    }
    memcpy(out, logits, (size_t) c->n_vocab*sizeof(float));
    return true;
}

size_t kvref_ctx_seq_get(kvref_ctx * c, int32_t seq, uint32_t flags, uint8_t * buf, size_t cap) {
    try {
        return buf ? llama_state_seq_get_data_ext(c->ctx, buf, cap, seq, flags)
                   : llama_state_seq_get_size_ext(c->ctx, seq, flags);
    } catch (const std::exception & e) {
        log_error("kvref_ctx_seq_get", e.what());
        return 0;
    } catch (...) {
        return 0;
    }
}

size_t kvref_ctx_seq_set(kvref_ctx * c, int32_t dest, uint32_t flags, const uint8_t * buf, size_t size) {
    try {
        return llama_state_seq_set_data_ext(c->ctx, buf, size, dest, flags);
    } catch (const std::exception & e) {
        // only LLAMA_STATE_SEQ_FLAGS_ON_DEVICE reads the header outside llama.cpp's own try
        log_error("kvref_ctx_seq_set", e.what());
        return 0;
    } catch (...) {
        return 0;
    }
}

size_t kvref_ctx_seq_save_file(kvref_ctx * c, const char * path, int32_t seq, const int32_t * tokens, size_t n) {
    try {
        return llama_state_seq_save_file(c->ctx, path, seq, tokens, n);
    } catch (const std::exception & e) {
        log_error("kvref_ctx_seq_save_file", e.what());
        return 0;
    } catch (...) {
        return 0;
    }
}

size_t kvref_ctx_seq_load_file(kvref_ctx * c, const char * path, int32_t dest, int32_t * tokens_out,
                               size_t cap, size_t * n_out) {
    try {
        size_t n = 0;
        const size_t ret = llama_state_seq_load_file(c->ctx, path, dest, tokens_out, cap, &n);
        if (n_out) {
            *n_out = n;
        }
        return ret;
    } catch (const std::exception & e) {
        log_error("kvref_ctx_seq_load_file", e.what());
        return 0;
    } catch (...) {
        return 0;
    }
}

size_t kvref_ctx_state_get(kvref_ctx * c, uint8_t * buf, size_t cap) {
    try {
        return buf ? llama_state_get_data(c->ctx, buf, cap) : llama_state_get_size(c->ctx);
    } catch (const std::exception & e) {
        log_error("kvref_ctx_state_get", e.what());
        return 0;
    } catch (...) {
        return 0;
    }
}

size_t kvref_ctx_state_set(kvref_ctx * c, const uint8_t * buf, size_t size) {
    try {
        return llama_state_set_data(c->ctx, buf, size);
    } catch (const std::exception & e) {
        log_error("kvref_ctx_state_set", e.what());
        return 0;
    } catch (...) {
        return 0;
    }
}

bool kvref_ctx_seq_rm(kvref_ctx * c, int32_t seq, int32_t p0, int32_t p1) {
    return llama_memory_seq_rm(llama_get_memory(c->ctx), seq, p0, p1);
}

int32_t kvref_ctx_seq_pos_min(const kvref_ctx * c, int32_t seq) {
    return llama_memory_seq_pos_min(llama_get_memory(c->ctx), seq);
}

int32_t kvref_ctx_seq_pos_max(const kvref_ctx * c, int32_t seq) {
    return llama_memory_seq_pos_max(llama_get_memory(c->ctx), seq);
}

void kvref_ctx_memory_clear(kvref_ctx * c, bool data) {
    llama_memory_clear(llama_get_memory(c->ctx), data);
}

} // extern "C"
