// cmpref: the cmpref.h interface implemented by forwarding to the pinned llama.cpp's own composite
// memories (llama_kv_cache_iswa, llama_memory_hybrid, llama_memory_hybrid_iswa), built by
// llama_model::create_memory. Test-only code: see kvref.h and cmpref.h for why it exists.

#include <algorithm>
#include <bitset>
#include <cassert>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <typeinfo>
#include <unordered_map>
#include <vector>

#include "ggml.h"
#include "ggml-backend.h"
#include "llama.h"

// Every header the patched ones depend on first, so that the access hack below only applies to
// the text of llama-kv-cells.h, llama-kv-cache.h and llama-memory-recurrent.h (as in kvref.cpp
// and rsref.cpp: no change of layout or mangling).
#include "llama-arch.h"
#include "llama-batch.h"
#include "llama-cparams.h"
#include "llama-graph.h"
#include "llama-hparams.h"
#include "llama-io.h"
#include "llama-memory.h"
#include "llama-model.h"

// The shim reads the slot infos a stock batch context keeps private (llama_kv_cache_context::
// sinfos) and the settings of the part caches (n_swa, swa_type, v_trans, n_seq_max).
#define private public
#include "llama-kv-cells.h"
#include "llama-kv-cache.h"
#include "llama-memory-recurrent.h"
#undef private

#include "llama-kv-cache-iswa.h"
#include "llama-memory-hybrid.h"
#include "llama-memory-hybrid-iswa.h"

// Only the kvref_* / rsref_* / cmpref_* API is exported (see shim/kvref.map).
#pragma GCC visibility push(default)
#include "kvref.h"
#include "rsref.h"
#include "cmpref.h"
#pragma GCC visibility pop

#include "kvref-common.h"

using namespace kvref_shim;

namespace {

using slot_info       = llama_kv_cache::slot_info;
using slot_info_vec_t = llama_kv_cache::slot_info_vec_t;

bool export_slot(const slot_info & si, kvref_slot * out) {
    const size_t ns = si.empty() ? 0 : si.n_stream();
    const size_t n  = si.empty() ? 0 : si.size();
    if (ns == 0 || ns > KVREF_MAX_SEQ || ns*n > out->idxs_cap || !out->idxs) {
        out->s0 = out->s1 = out->n_stream = out->n_per_stream = 0;
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

struct cmpref {
    llama_model * model = nullptr; // owned by the model cache
    std::unique_ptr<llama_memory_i> mem;
    int32_t kind = -1;
    uint32_t n_rs_seq = 0;
    cmpref_params params{};

    // the parts (owned by mem) and their borrowed views (owned here)
    llama_kv_cache * kv_base = nullptr;
    llama_kv_cache * kv_swa  = nullptr;
    llama_memory_recurrent * rs = nullptr;
    kvref * view_base = nullptr;
    kvref * view_swa  = nullptr;
    rsref * view_rs   = nullptr;

    // the slot infos of the last successful apply / init_batch, per KV part
    slot_info_vec_t last_base;
    slot_info_vec_t last_swa;

    // only for update(), as in kvref
    llama_context * lctx = nullptr;

    llama_kv_cache * kv_part(int32_t which) const {
        return which == 0 ? kv_base : which == 1 ? kv_swa : nullptr;
    }

    ~cmpref() {
        if (view_base) { kv_view_free(view_base); }
        if (view_swa)  { kv_view_free(view_swa); }
        if (view_rs)   { rs_view_free(view_rs); }
        mem.reset();
        if (lctx) {
            llama_free(lctx);
        }
    }
};

namespace {

std::vector<llama_ubatch> to_ubatches(const kvref_ubatch * ubs, uint32_t n) {
    std::vector<llama_ubatch> v;
    v.reserve(n);
    for (uint32_t i = 0; i < n; ++i) {
        v.push_back(to_ubatch(&ubs[i]));
    }
    return v;
}

// The slot infos a composite batch context holds for its KV parts (empty for a missing part).
void context_sinfos(const cmpref * r, llama_memory_context_i * mctx, slot_info_vec_t & base, slot_info_vec_t & swa) {
    base.clear();
    swa.clear();
    switch (r->kind) {
        case CMPREF_KIND_KV:
            base = static_cast<llama_kv_cache_context *>(mctx)->sinfos;
            break;
        case CMPREF_KIND_ISWA: {
            const auto * c = static_cast<llama_kv_cache_iswa_context *>(mctx);
            base = c->get_base()->sinfos;
            swa  = c->get_swa()->sinfos;
        } break;
        case CMPREF_KIND_HYBRID:
            base = static_cast<llama_memory_hybrid_context *>(mctx)->get_attn()->sinfos;
            break;
        case CMPREF_KIND_HYBRID_ISWA: {
            const auto * c = static_cast<llama_memory_hybrid_iswa_context *>(mctx)->get_attn();
            base = c->get_base()->sinfos;
            swa  = c->get_swa()->sinfos;
        } break;
        default:
            break;
    }
}

// apply()/next() over every ubatch of a batch context, as llama_context::decode does.
int32_t apply_all(llama_memory_context_i * mctx) {
    do {
        if (!mctx->apply()) {
            return LLAMA_MEMORY_STATUS_FAILED_COMPUTE;
        }
    } while (mctx->next());
    return LLAMA_MEMORY_STATUS_SUCCESS;
}

} // namespace

extern "C" {

size_t cmpref_sizeof(int32_t which) {
    switch (which) {
        case 0:  return sizeof(cmpref_params);
        case 1:  return sizeof(cmpref_split);
        default: return 0;
    }
}

void cmpref_default_params(cmpref_params * p) {
    p->n_ctx = 256;
    p->n_seq_max = 1;
    p->unified = true;
    p->swa_full = false;
    p->n_ubatch = 256;
    p->v_trans = true;
    p->type_k = GGML_TYPE_F16;
    p->type_v = GGML_TYPE_F16;
    p->n_rs_seq = 0;
}

cmpref * cmpref_new(const char * model_path, const cmpref_params * p) {
    init_once();

    try {
        llama_model * model = load_model(model_path);
        if (!model) {
            return nullptr;
        }
        if (model->arch == LLM_ARCH_GEMMA4_ASSISTANT) {
            // create_memory reads the memory of cparams.ctx_other, which a standalone memory lacks
            log_error("cmpref_new", "gemma4-assistant needs a target context");
            return nullptr;
        }

        // what llama_context's constructor passes (default context type, CPU, no offload)
        llama_cparams cp{};
        cp.n_ctx       = p->unified ? p->n_ctx : p->n_ctx*std::max(1u, p->n_seq_max);
        cp.n_ctx_seq   = p->n_ctx;
        cp.n_batch     = p->n_ubatch;
        cp.n_ubatch    = p->n_ubatch;
        cp.n_seq_max   = p->n_seq_max;
        cp.n_rs_seq    = llm_arch_supports_rs_rollback(model->arch) ? p->n_rs_seq : 0;
        cp.causal_attn = true;
        cp.offload_kqv = false;
        cp.flash_attn  = !p->v_trans;
        cp.kv_unified  = p->unified;
        cp.ctx_type    = LLAMA_CONTEXT_TYPE_DEFAULT;
        cp.ctx_other   = nullptr;

        llama_memory_params mp = {
            /*.type_k    =*/ (ggml_type) p->type_k,
            /*.type_v    =*/ (ggml_type) p->type_v,
            /*.swa_full  =*/ p->swa_full,
            /*.ctx_type  =*/ LLAMA_CONTEXT_TYPE_DEFAULT,
            /*.mem_other =*/ nullptr,
        };

        std::unique_ptr<llama_memory_i> mem(model->create_memory(mp, cp));
        if (!mem) {
            log_error("cmpref_new", "the model's arch makes no memory");
            return nullptr;
        }

        auto r = std::make_unique<cmpref>();
        r->model = model;
        r->n_rs_seq = cp.n_rs_seq;
        r->params = *p;

        // exact types: the derived composites (DSA, MSA, hybrid_idx, ...) are not these kinds
        const std::type_info & t = typeid(*mem);
        if (t == typeid(llama_kv_cache)) {
            r->kind = CMPREF_KIND_KV;
            r->kv_base = static_cast<llama_kv_cache *>(mem.get());
        } else if (t == typeid(llama_kv_cache_iswa)) {
            auto * m = static_cast<llama_kv_cache_iswa *>(mem.get());
            r->kind = CMPREF_KIND_ISWA;
            r->kv_base = m->get_base();
            r->kv_swa  = m->get_swa();
        } else if (t == typeid(llama_memory_hybrid)) {
            auto * m = static_cast<llama_memory_hybrid *>(mem.get());
            r->kind = CMPREF_KIND_HYBRID;
            r->kv_base = m->get_mem_attn();
            r->rs      = m->get_mem_recr();
        } else if (t == typeid(llama_memory_hybrid_iswa)) {
            auto * m = static_cast<llama_memory_hybrid_iswa *>(mem.get());
            r->kind = CMPREF_KIND_HYBRID_ISWA;
            r->kv_base = m->get_mem_attn()->get_base();
            r->kv_swa  = m->get_mem_attn()->get_swa();
            r->rs      = m->get_mem_recr();
        } else {
            log_error("cmpref_new", "the model's memory is not a KV cache, iSWA, hybrid or hybrid-iSWA memory");
            return nullptr;
        }
        r->mem = std::move(mem);

        if (r->kv_base) { r->view_base = kv_view_new(model, r->kv_base); }
        if (r->kv_swa)  { r->view_swa  = kv_view_new(model, r->kv_swa); }
        if (r->rs)      { r->view_rs   = rs_view_new(model, r->rs); }

        return r.release();
    } catch (const std::exception & e) {
        log_error("cmpref_new", e.what());
        return nullptr;
    } catch (...) {
        return nullptr;
    }
}

void cmpref_free(cmpref * r) {
    delete r;
}

int32_t cmpref_kind(const cmpref * r) {
    return r->kind;
}

uint32_t cmpref_n_rs_seq(const cmpref * r) {
    return r->n_rs_seq;
}

void cmpref_clear(cmpref * r, bool data) {
    r->mem->clear(data);
}

bool cmpref_seq_rm(cmpref * r, int32_t seq, int32_t p0, int32_t p1) {
    return r->mem->seq_rm(seq, p0, p1);
}

void cmpref_seq_cp(cmpref * r, int32_t src, int32_t dst, int32_t p0, int32_t p1) {
    r->mem->seq_cp(src, dst, p0, p1);
}

void cmpref_seq_keep(cmpref * r, int32_t seq) {
    r->mem->seq_keep(seq);
}

void cmpref_seq_add(cmpref * r, int32_t seq, int32_t p0, int32_t p1, int32_t delta) {
    r->mem->seq_add(seq, p0, p1, delta);
}

void cmpref_seq_div(cmpref * r, int32_t seq, int32_t p0, int32_t p1, int32_t d) {
    r->mem->seq_div(seq, p0, p1, d);
}

int32_t cmpref_seq_pos_min(const cmpref * r, int32_t seq) {
    return r->mem->seq_pos_min(seq);
}

int32_t cmpref_seq_pos_max(const cmpref * r, int32_t seq) {
    return r->mem->seq_pos_max(seq);
}

bool cmpref_can_shift(const cmpref * r) {
    return r->mem->get_can_shift();
}

kvref * cmpref_kv_part(cmpref * r, int32_t which) {
    return which == 0 ? r->view_base : which == 1 ? r->view_swa : nullptr;
}

rsref * cmpref_rs_part(cmpref * r) {
    return r->view_rs;
}

bool cmpref_kv_part_params(const cmpref * r, int32_t which, kvref_params * out) {
    const llama_kv_cache * kv = r->kv_part(which);
    if (!kv) {
        return false;
    }
    kvref_default_params(out);
    out->kv_size   = kv->get_size();
    out->n_seq_max = kv->n_seq_max;
    out->unified   = kv->n_stream == 1;
    out->n_swa     = kv->n_swa;
    out->swa_type  = (int32_t) kv->swa_type;
    out->v_trans   = kv->v_trans;
    out->type_k    = kv->layers.empty() ? r->params.type_k : (int32_t) kv->layers[0].k->type;
    out->type_v    = kv->layers.empty() || !kv->layers[0].v ? r->params.type_v : (int32_t) kv->layers[0].v->type;
    out->use_alibi = kv->hparams.use_alibi;
    out->mrope     = kv->hparams.rope_type == LLAMA_ROPE_TYPE_MROPE;
    return true;
}

int32_t cmpref_apply_ubatches(cmpref * r, const kvref_ubatch * ubs, uint32_t n) {
    if (n == 0 || !ubs) {
        return -1;
    }
    if (r->rs) {
        for (uint32_t i = 0; i < n; ++i) {
            if (!ubs[i].equal_seqs) {
                log_error("cmpref_apply_ubatches", "a ubatch is not from an equal split (the stock recurrent find_slot asserts equal_seqs)");
                return -1;
            }
        }
    }

    try {
        std::vector<llama_ubatch> ubatches = to_ubatches(ubs, n);

        slot_info_vec_t sinfos_base, sinfos_swa;
        if (r->rs && !r->rs->prepare(ubatches)) {
            return LLAMA_MEMORY_STATUS_FAILED_PREPARE;
        }
        sinfos_base = r->kv_base->prepare(ubatches);
        if (sinfos_base.empty()) {
            return LLAMA_MEMORY_STATUS_FAILED_PREPARE;
        }
        if (r->kv_swa) {
            sinfos_swa = r->kv_swa->prepare(ubatches);
            if (sinfos_swa.empty()) {
                return LLAMA_MEMORY_STATUS_FAILED_PREPARE;
            }
        }

        r->last_base = sinfos_base;
        r->last_swa  = sinfos_swa;

        llama_memory_context_ptr mctx;
        switch (r->kind) {
            case CMPREF_KIND_KV:
                mctx = std::make_unique<llama_kv_cache_context>(r->kv_base, std::move(sinfos_base), std::move(ubatches));
                break;
            case CMPREF_KIND_ISWA:
                mctx = std::make_unique<llama_kv_cache_iswa_context>(static_cast<llama_kv_cache_iswa *>(r->mem.get()),
                        std::move(sinfos_base), std::move(sinfos_swa), std::move(ubatches));
                break;
            case CMPREF_KIND_HYBRID:
                mctx = std::make_unique<llama_memory_hybrid_context>(static_cast<llama_memory_hybrid *>(r->mem.get()),
                        std::move(sinfos_base), std::move(ubatches));
                break;
            case CMPREF_KIND_HYBRID_ISWA:
                mctx = std::make_unique<llama_memory_hybrid_iswa_context>(static_cast<llama_memory_hybrid_iswa *>(r->mem.get()),
                        std::move(sinfos_base), std::move(sinfos_swa), std::move(ubatches));
                break;
            default:
                return -1;
        }
        if (mctx->get_status() != LLAMA_MEMORY_STATUS_SUCCESS) {
            return (int32_t) mctx->get_status();
        }
        return apply_all(mctx.get());
    } catch (const std::exception & e) {
        log_error("cmpref_apply_ubatches", e.what());
        return -2;
    } catch (...) {
        return -2;
    }
}

bool cmpref_slot(const cmpref * r, int32_t which, uint32_t k, kvref_slot * out) {
    const slot_info_vec_t * v = which == 0 ? &r->last_base : which == 1 ? &r->last_swa : nullptr;
    if (!v || k >= v->size()) {
        out->s0 = out->s1 = out->n_stream = out->n_per_stream = 0;
        return false;
    }
    return export_slot((*v)[k], out);
}

uint32_t cmpref_n_slots(const cmpref * r) {
    return (uint32_t) r->last_base.size();
}

int32_t cmpref_init_batch(cmpref * r, const int32_t * tokens, const int32_t * pos, const int32_t * n_seq_id,
                          const int32_t * const * seq_id, const int8_t * logits, uint32_t n_tokens,
                          uint32_t n_ubatch, bool embd_all, bool plan_only, cmpref_split * out,
                          uint32_t cap, int32_t * batch_idxs, uint32_t * n_split) {
    if (n_split) {
        *n_split = 0;
    }
    if (n_tokens == 0 || !tokens || n_ubatch == 0) {
        // the stock allocator asserts a non-empty batch
        return -1;
    }
    if (r->rs && !embd_all && r->n_rs_seq > 0 && n_ubatch <= r->n_rs_seq + 1) {
        // the hybrids' split_equal keeps n_rs_seq + 1 trailing tokens together and asserts
        // n_ubatch > n_rs_seq + 1
        log_error("cmpref_init_batch", "n_ubatch must exceed n_rs_seq + 1 (stock asserts)");
        return -1;
    }

    try {
        const llama_model & model = *r->model;
        const llama_hparams & hp = model.hparams;

        // llama_decode(ctx, batch): llama_batch_compat over a llama_batch_ext built as
        // llama_batch_ext(ctx) builds it
        llama_batch_ext batch_ext(
                n_tokens,
                llama_batch_ext_select_n_embd_inp(LLAMA_CONTEXT_TYPE_DEFAULT, model.arch, hp),
                hp.n_embd_inp_enc(),
                (llama_seq_id) r->params.n_seq_max,
                r->mem.get(),
                llama_vocab_n_tokens(llama_model_get_vocab(&model)),
                hp.n_pos_per_embd());

        llama_batch batch = {
            /*.n_tokens =*/ (int32_t) n_tokens,
            /*.token    =*/ const_cast<llama_token *>(tokens),
            /*.embd     =*/ nullptr,
            /*.pos      =*/ const_cast<llama_pos *>(pos),
            /*.n_seq_id =*/ const_cast<int32_t *>(n_seq_id),
            /*.seq_id   =*/ const_cast<llama_seq_id **>(seq_id),
            /*.logits   =*/ const_cast<int8_t *>(logits),
        };
        llama_batch_compat::init(batch_ext, batch);

        llama_batch_allocr balloc(hp.n_pos_per_embd(), llm_arch_supports_mixed_batch(model.arch));
        if (!balloc.init(batch_ext, model.vocab, embd_all)) {
            return -1;
        }

        llama_memory_context_ptr mctx = r->mem->init_batch(balloc, n_ubatch, embd_all);
        if (!mctx) {
            return -2;
        }
        const llama_memory_status status = mctx->get_status();
        if (status != LLAMA_MEMORY_STATUS_SUCCESS) {
            return (int32_t) status;
        }

        // the slot infos of the parts, then the split, read with get_ubatch() while walking the
        // context with next() and (unless plan_only) applying each ubatch as decode does
        context_sinfos(r, mctx.get(), r->last_base, r->last_swa);

        uint32_t k = 0;
        uint32_t off = 0;
        int32_t ret = LLAMA_MEMORY_STATUS_SUCCESS;
        do {
            const llama_ubatch & ub = mctx->get_ubatch();
            if (k < cap && out) {
                cmpref_split & s = out[k];
                s.n_tokens     = ub.n_tokens;
                s.n_seq_tokens = ub.n_seq_tokens;
                s.n_seqs       = ub.n_seqs;
                s.n_seqs_unq   = ub.n_seqs_unq;
                s.equal_seqs   = ub.equal_seqs() ? 1 : 0;
                s.n_outputs    = 0;
                for (uint32_t i = 0; ub.output && i < ub.n_tokens; ++i) {
                    s.n_outputs += ub.output[i] != 0;
                }
                s.idx_off = off;
            }
            if (batch_idxs && ub.data) {
                for (uint32_t i = 0; i < ub.n_tokens && off + i < n_tokens; ++i) {
                    batch_idxs[off + i] = ub.data->batch_idxs[i];
                }
            }
            off += ub.n_tokens;
            ++k;
            if (!plan_only && !mctx->apply()) {
                ret = LLAMA_MEMORY_STATUS_FAILED_COMPUTE;
                break;
            }
        } while (mctx->next());

        if (n_split) {
            *n_split = k;
        }
        return ret;
    } catch (const std::exception & e) {
        log_error("cmpref_init_batch", e.what());
        return -2;
    } catch (...) {
        return -2;
    }
}

int32_t cmpref_update(cmpref * r) {
    try {
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
        auto mctx = r->mem->init_update(r->lctx, false);
        const llama_memory_status status = mctx->get_status();
        if (status == LLAMA_MEMORY_STATUS_SUCCESS) {
            mctx->apply();
        }
        return (int32_t) status;
    } catch (const std::exception & e) {
        log_error("cmpref_update", e.what());
        return LLAMA_MEMORY_STATUS_FAILED_COMPUTE;
    } catch (...) {
        return LLAMA_MEMORY_STATUS_FAILED_COMPUTE;
    }
}

size_t cmpref_state_write(const cmpref * r, int32_t seq, uint32_t flags, uint8_t * buf, size_t cap) {
    try {
        io_write_buf io(buf, cap);
        r->mem->state_write(io, seq, flags);
        return io.n_bytes();
    } catch (const std::exception & e) {
        log_error("cmpref_state_write", e.what());
        return 0;
    } catch (...) {
        return 0;
    }
}

size_t cmpref_state_read(cmpref * r, int32_t seq, uint32_t flags, const uint8_t * buf, size_t size) {
    io_read_buf io(buf, size);
    try {
        r->mem->state_read(io, seq, flags);
        return io.n_bytes();
    } catch (const std::exception & e) {
        io.discard();
        log_error("cmpref_state_read", e.what());
        return 0;
    } catch (...) {
        io.discard();
        return 0;
    }
}

} // extern "C"
