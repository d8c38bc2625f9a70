// The drop-in's llama_kv_cache_iswa over this library's sliding-window pair (see the header).

#include "llama-kv-cache-iswa.h"

#include "llama-memory-abi.h"

#include "llama-batch.h"
#include "llama-impl.h"
#include "llama-model.h"

#include <cassert>

llama_kv_cache_iswa::llama_kv_cache_iswa(
        const llama_model & model,
                ggml_type   type_k,
                ggml_type   type_v,
                     bool   v_trans,
                     bool   offload,
                     bool   swa_full,
                     bool   unified,
                 uint32_t   kv_size,
                 uint32_t   n_seq_max,
                 uint32_t   n_ubatch,
                 uint32_t   n_pad,
           llama_memory_t   mem_other,
    const layer_filter_cb & filter,
    const  layer_reuse_cb & reuse,
    const  layer_share_cb & share) :
    llama_kv_cache_iswa(model, model.hparams, type_k, type_v, v_trans, offload, swa_full, unified,
            kv_size, n_seq_max, n_ubatch, n_pad, mem_other, filter, reuse, share) {
}

llama_kv_cache_iswa::llama_kv_cache_iswa(
        const llama_model & model,
        const llama_hparams & hparams,
                ggml_type   type_k,
                ggml_type   type_v,
                     bool   v_trans,
                     bool   offload,
                     bool   swa_full,
                     bool   unified,
                 uint32_t   kv_size,
                 uint32_t   n_seq_max,
                 uint32_t   n_ubatch,
                 uint32_t   n_pad,
           llama_memory_t   mem_other,
    const layer_filter_cb & filter,
    const  layer_reuse_cb & reuse,
    const  layer_share_cb & share) : unified(unified) {
    // which half a layer goes to: the caller's filter first, then the model's SWA pattern
    const layer_filter_cb in_base = [&](int32_t il) {
        return (!filter || filter(il)) && !model.hparams.is_swa(il);
    };
    const layer_filter_cb in_swa = [&](int32_t il) {
        return (!filter || filter(il)) && model.hparams.is_swa(il);
    };

    const uint32_t size_base = kv_size;
    const uint32_t size_swa  = llama_memory_iswa_swa_size(size_base, hparams.n_swa, unified, n_seq_max, n_ubatch, swa_full);

    if (swa_full) {
        LLAMA_LOG_WARN("%s: using full-size SWA cache (ref: %s)\n",
                __func__, "https://github.com/ggml-org/llama.cpp/pull/13194#issuecomment-2868343055");
    }

    LLAMA_LOG_INFO("%s: creating non-SWA KV cache, size = %u cells\n", __func__, size_base);

    auto * other = static_cast<llama_kv_cache_iswa *>(mem_other);

    kv_base = std::make_unique<llama_kv_cache>(
            model, hparams, type_k, type_v, v_trans, offload, unified, size_base, n_seq_max, n_pad,
            0, LLAMA_SWA_TYPE_NONE, other ? other->get_base() : nullptr, in_base, reuse, share);

    LLAMA_LOG_INFO("%s: creating     SWA KV cache, size = %u cells\n", __func__, size_swa);

    kv_swa = std::make_unique<llama_kv_cache>(
            model, hparams, type_k, type_v, v_trans, offload, unified, size_swa, n_seq_max, n_pad,
            hparams.n_swa, hparams.swa_type, other ? other->get_swa() : nullptr, in_swa, reuse, share);

    // the library's pair over the halves' handles (which become views of its halves); a pair
    // over another pair's cells has none, and a pair the library does not take (it checks
    // that the halves have the same sequences and streams and no common layer) stays two
    // halves, as upstream's
    if (!kv_base->shared() && !kv_swa->shared()) {
        mem = llama_memory_iswa_init(kv_base->handle(), kv_swa->handle());
        llama_memory_clear_last_error();
        if (mem) {
            // llama.cpp's semantics for every operation (the halves are stock-compatible
            // already); llama-state.cpp checks every restore whole beforehand
            llama_memory_set_stock_compat(mem, true);
        }
    }
}

llama_kv_cache_iswa::~llama_kv_cache_iswa() {
    // the halves first: their handles are views of the pair's, which end with it
    kv_base.reset();
    kv_swa.reset();
    llama_memory_free(mem);
}

void llama_kv_cache_iswa::changed() const {
    kv_base->cells_changed();
    kv_swa->cells_changed();
}

void llama_kv_cache_iswa::clear(bool data) {
    if (!mem) {
        kv_base->clear(data);
        kv_swa ->clear(data);
        return;
    }
    llama_memory_dropin_clear(mem, data);
    changed();
}

bool llama_kv_cache_iswa::seq_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    if (!mem) {
        const bool b = kv_base->seq_rm(seq_id, p0, p1);
        const bool s = kv_swa ->seq_rm(seq_id, p0, p1);
        return b && s;
    }
    const bool ok = llama_memory_dropin_seq_rm(mem, seq_id, p0, p1);
    changed();
    return ok;
}

void llama_kv_cache_iswa::seq_cp(llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1) {
    if (!mem) {
        kv_base->seq_cp(seq_id_src, seq_id_dst, p0, p1);
        kv_swa ->seq_cp(seq_id_src, seq_id_dst, p0, p1);
        return;
    }
    llama_memory_dropin_seq_cp(mem, seq_id_src, seq_id_dst, p0, p1);
    changed();
}

void llama_kv_cache_iswa::seq_keep(llama_seq_id seq_id) {
    if (!mem) {
        kv_base->seq_keep(seq_id);
        kv_swa ->seq_keep(seq_id);
        return;
    }
    llama_memory_dropin_seq_keep(mem, seq_id);
    changed();
}

void llama_kv_cache_iswa::seq_add(llama_seq_id seq_id, llama_pos p0, llama_pos p1, llama_pos shift) {
    if (!mem) {
        kv_base->seq_add(seq_id, p0, p1, shift);
        kv_swa ->seq_add(seq_id, p0, p1, shift);
        return;
    }
    llama_memory_dropin_seq_add(mem, seq_id, p0, p1, shift);
    changed();
}

void llama_kv_cache_iswa::seq_div(llama_seq_id seq_id, llama_pos p0, llama_pos p1, int d) {
    if (!mem) {
        kv_base->seq_div(seq_id, p0, p1, d);
        kv_swa ->seq_div(seq_id, p0, p1, d);
        return;
    }
    llama_memory_dropin_seq_div(mem, seq_id, p0, p1, d);
    changed();
}

llama_pos llama_kv_cache_iswa::seq_pos_min(llama_seq_id seq_id) const {
    // the SWA half holds the later positions (the base half a superset)
    return mem ? llama_memory_dropin_seq_pos_min(mem, seq_id) : kv_swa->seq_pos_min(seq_id);
}

llama_pos llama_kv_cache_iswa::seq_pos_max(llama_seq_id seq_id) const {
    return mem ? llama_memory_dropin_seq_pos_max(mem, seq_id) : kv_swa->seq_pos_max(seq_id);
}

std::map<ggml_backend_buffer_type_t, size_t> llama_kv_cache_iswa::memory_breakdown() const {
    if (mem) {
        return llama_memory_dropin_breakdown(mem);
    }
    auto mb = kv_base->memory_breakdown();
    for (const auto & [buft, n] : kv_swa->memory_breakdown()) {
        mb[buft] += n;
    }
    return mb;
}

bool llama_kv_cache_iswa::get_can_shift() const {
    if (mem) {
        return llama_memory_dropin_can_shift(mem);
    }
    return kv_base->get_can_shift() && kv_swa->get_can_shift() && kv_base->get_size() == kv_swa->get_size();
}

// the ubatches of one split of the whole batch, or none when the split leaves tokens out
template <typename F>
static std::vector<llama_ubatch> iswa_split(llama_batch_allocr & balloc, F next) {
    balloc.split_reset();
    std::vector<llama_ubatch> out;
    for (llama_ubatch ub = next(); ub.n_tokens > 0; ub = next()) {
        out.push_back(std::move(ub));
    }
    if (balloc.get_n_used() < balloc.get_n_tokens()) {
        out.clear();
    }
    return out;
}

llama_memory_context_ptr llama_kv_cache_iswa::init_batch(llama_batch_allocr & balloc, uint32_t n_ubatch, bool embd_all) {
    GGML_UNUSED(embd_all);

    // one stream: the simple split first; then (or with a stream per sequence) the equal
    // split, sequential with several streams; each half prepares every ubatch
    for (int attempt = unified ? 0 : 1; attempt < 2; ++attempt) {
        auto ubatches = attempt == 0
            ? iswa_split(balloc, [&] { return balloc.split_simple(n_ubatch); })
            : iswa_split(balloc, [&] { return balloc.split_equal(n_ubatch, !unified, 0); });
        if (ubatches.empty()) {
            continue;
        }
        auto sinfos_base = kv_base->prepare(ubatches);
        if (sinfos_base.empty()) {
            continue;
        }
        auto sinfos_swa = kv_swa->prepare(ubatches);
        if (sinfos_swa.empty()) {
            continue;
        }
        assert(sinfos_base.size() == sinfos_swa.size());
        return std::make_unique<llama_kv_cache_iswa_context>(
                this, std::move(sinfos_base), std::move(sinfos_swa), std::move(ubatches));
    }

    return std::make_unique<llama_kv_cache_iswa_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
}

llama_memory_context_ptr llama_kv_cache_iswa::init_full() {
    return std::make_unique<llama_kv_cache_iswa_context>(this);
}

llama_memory_context_ptr llama_kv_cache_iswa::init_update(llama_context * lctx, bool optimize) {
    return std::make_unique<llama_kv_cache_iswa_context>(this, lctx, optimize);
}

void llama_kv_cache_iswa::state_write(llama_io_write_i & io, llama_seq_id seq_id, llama_state_seq_flags flags) const {
    if (!mem) {
        if ((flags & LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY) == 0) {
            kv_base->state_write(io, seq_id, flags);
        }
        kv_swa->state_write(io, seq_id, flags);
        return;
    }
    llama_memory_dropin_writer w{ io };
    const llama_memory_io_write cb = w.callbacks();
    if (llama_memory_state_write_io(mem, seq_id, flags, &cb) != LLAMA_MEMORY_OK) {
        llama_memory_dropin_throw("failed to write the KV cache state");
    }
}

void llama_kv_cache_iswa::state_read(llama_io_read_i & io, llama_seq_id seq_id, llama_state_seq_flags flags) {
    // ON_DEVICE: the tensor bytes come from the reader's device stash, which only the halves'
    // own readers reach (llama-state.cpp checked the whole input before this restore)
    if (!mem || (flags & LLAMA_STATE_SEQ_FLAGS_ON_DEVICE) != 0) {
        if ((flags & LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY) == 0) {
            kv_base->state_read(io, seq_id, flags);
        }
        kv_swa->state_read(io, seq_id, flags);
        return;
    }
    // the pair reads the whole input and checks both halves before it changes either
    llama_memory_dropin_reader r{ io };
    const llama_memory_io_read cb = r.callbacks();
    const bool ok = llama_memory_state_read_io(mem, seq_id, flags, &cb) == LLAMA_MEMORY_OK;
    changed();
    if (!ok) {
        llama_memory_dropin_read_failed(mem, r.error, /* kv = */ true);
    }
}

llama_kv_cache * llama_kv_cache_iswa::get_base() const {
    return kv_base.get();
}

llama_kv_cache * llama_kv_cache_iswa::get_swa() const {
    return kv_swa.get();
}

//
// llama_kv_cache_iswa_context: the halves' contexts, moved and applied together
//

llama_kv_cache_iswa_context::llama_kv_cache_iswa_context(llama_memory_status status) : status(status) {}

llama_kv_cache_iswa_context::llama_kv_cache_iswa_context(llama_kv_cache_iswa * kv) :
    ctx_base(kv->get_base()->init_full()),
    ctx_swa (kv->get_swa ()->init_full()),
    status(llama_memory_status_combine(ctx_base->get_status(), ctx_swa->get_status())) {
}

llama_kv_cache_iswa_context::llama_kv_cache_iswa_context(llama_kv_cache_iswa * kv, llama_context * lctx, bool optimize) :
    ctx_base(kv->get_base()->init_update(lctx, optimize)),
    ctx_swa (kv->get_swa ()->init_update(lctx, optimize)),
    status(llama_memory_status_combine(ctx_base->get_status(), ctx_swa->get_status())) {
}

llama_kv_cache_iswa_context::llama_kv_cache_iswa_context(
        llama_kv_cache_iswa * kv,
        slot_info_vec_t sinfos_base,
        slot_info_vec_t sinfos_swa,
        std::vector<llama_ubatch> ubatches) :
    ubatches(std::move(ubatches)),
    ctx_base(new llama_kv_cache_context(kv->get_base(), std::move(sinfos_base), this->ubatches)),
    ctx_swa (new llama_kv_cache_context(kv->get_swa (), std::move(sinfos_swa),  this->ubatches)),
    status(llama_memory_status_combine(ctx_base->get_status(), ctx_swa->get_status())) {
}

llama_kv_cache_iswa_context::~llama_kv_cache_iswa_context() = default;

bool llama_kv_cache_iswa_context::next() {
    assert(status == LLAMA_MEMORY_STATUS_SUCCESS);
    ctx_base->next();
    ctx_swa ->next();
    return ++i_next < ubatches.size();
}

bool llama_kv_cache_iswa_context::apply() {
    assert(!llama_memory_status_is_fail(status));
    const bool b = ctx_base->apply();
    const bool s = ctx_swa ->apply();
    return b && s;
}

llama_memory_status llama_kv_cache_iswa_context::get_status() const {
    return status;
}

const llama_ubatch & llama_kv_cache_iswa_context::get_ubatch() const {
    assert(status == LLAMA_MEMORY_STATUS_SUCCESS);
    return ubatches[i_next];
}

const llama_kv_cache_context * llama_kv_cache_iswa_context::get_base() const {
    assert(status == LLAMA_MEMORY_STATUS_SUCCESS);
    return static_cast<const llama_kv_cache_context *>(ctx_base.get());
}

const llama_kv_cache_context * llama_kv_cache_iswa_context::get_swa() const {
    assert(status == LLAMA_MEMORY_STATUS_SUCCESS);
    return static_cast<const llama_kv_cache_context *>(ctx_swa.get());
}
