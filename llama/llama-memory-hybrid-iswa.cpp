// The drop-in's llama_memory_hybrid_iswa_iswa over this library's hybrid with a sliding-window pair
// (see llama-memory-hybrid.h).

#include "llama-memory-hybrid-iswa.h"

#include "llama-memory-hybrid-ops.h"

#include "llama-context.h"
#include "llama-impl.h"
#include "llama-model.h"

#include <cassert>

llama_memory_hybrid_iswa::llama_memory_hybrid_iswa(
        const llama_model & model,
                            /* attn */
                ggml_type   type_k,
                ggml_type   type_v,
                     bool   v_trans,
                     bool   swa_full,
                 uint32_t   kv_size,
                 uint32_t   n_ubatch,
                 uint32_t   n_pad,
                            /* recurrent */
                ggml_type   type_r,
                ggml_type   type_s,
                 uint32_t   rs_size,
                            /* common */
                 uint32_t   n_seq_max,
                 uint32_t   n_rs_seq,
                     bool   offload,
                     bool   unified,
                            /* layer filters */
    const layer_filter_cb & filter_attn,
    const layer_filter_cb & filter_recr) : hparams(model.hparams) {
    // the parts, as upstream makes them: by default the attention part takes the layers that
    // are not recurrent, the recurrent part the others
    const layer_filter_cb attn_layers = filter_attn ? filter_attn : [&](int32_t il) { return !hparams.is_recr(il); };
    const layer_filter_cb recr_layers = filter_recr ? filter_recr : [&](int32_t il) { return hparams.is_recr(il); };
    mem_attn.reset(new llama_kv_cache_iswa(model, type_k, type_v, v_trans, offload, swa_full, unified, kv_size,
            n_seq_max, n_ubatch, n_pad, nullptr, attn_layers, nullptr, nullptr));
    mem_recr.reset(new llama_memory_recurrent(model, type_r, type_s, offload, rs_size, n_seq_max, n_rs_seq, recr_layers));

    // the library's hybrid over the parts' handles (which become views of its parts); parts it
    // does not take stay two memories, as upstream's
    mem = llama_memory_hybrid_init(mem_attn->handle(), mem_recr->handle());
    llama_memory_clear_last_error();
    if (mem) {
        // llama.cpp's semantics for ids one part takes and the other ignores (the leaves are
        // stock-compatible already); llama-state.cpp checks every restore whole beforehand
        llama_memory_set_stock_compat(mem, true);
    }
}

llama_memory_hybrid_iswa::~llama_memory_hybrid_iswa() {
    // the parts first: their handles are views of the hybrid's, which end with it
    mem_attn.reset();
    mem_recr.reset();
    llama_memory_free(mem);
}

using hybrid_pair_ops = llama_memory_hybrid_ops<llama_kv_cache_iswa, true>;

llama_memory_context_ptr llama_memory_hybrid_iswa::init_batch(llama_batch_allocr & balloc, uint32_t n_ubatch, bool embd_all) {
    balloc.split_reset();

    // the recurrent part's split: by sequence when every token is an output; else equal sets,
    // sequential unless the attention cache has one stream, keeping each sequence's last
    // n_rs_seq + 1 tokens together ([TAG_RECURRENT_ROLLBACK_SPLITS])
    const bool one_stream = mem_attn->get_base()->get_n_stream() == 1;
    const uint32_t n_rs_seq = mem_recr->n_rs_seq;
    std::vector<llama_ubatch> ubatches;
    while (true) {
        llama_ubatch ub = embd_all
            ? balloc.split_seq(n_ubatch)
            : balloc.split_equal(n_ubatch, !one_stream, n_rs_seq > 0 ? n_rs_seq + 1 : 0);
        if (ub.n_tokens == 0) {
            break;
        }
        ubatches.push_back(std::move(ub));
    }
    if (balloc.get_n_used() < balloc.get_n_tokens()) {
        return std::make_unique<llama_memory_hybrid_iswa_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
    }

    if (!mem_recr->prepare(ubatches)) {
        LLAMA_LOG_ERROR("%s: failed to prepare recurrent ubatches\n", __func__);
        return std::make_unique<llama_memory_hybrid_iswa_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
    }
    auto sinfos_base = mem_attn->get_base()->prepare(ubatches);
    if (sinfos_base.empty()) {
        LLAMA_LOG_ERROR("%s: failed to prepare attention base ubatches\n", __func__);
        return std::make_unique<llama_memory_hybrid_iswa_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
    }
    auto sinfos_swa = mem_attn->get_swa()->prepare(ubatches);
    if (sinfos_swa.empty()) {
        LLAMA_LOG_ERROR("%s: failed to prepare attention swa ubatches\n", __func__);
        return std::make_unique<llama_memory_hybrid_iswa_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
    }
    return std::make_unique<llama_memory_hybrid_iswa_context>(
            this, std::move(sinfos_base), std::move(sinfos_swa), std::move(ubatches));
}

llama_memory_context_ptr llama_memory_hybrid_iswa::init_full() {
    return std::make_unique<llama_memory_hybrid_iswa_context>(this);
}

llama_memory_context_ptr llama_memory_hybrid_iswa::init_update(llama_context * lctx, bool optimize) {
    return std::make_unique<llama_memory_hybrid_iswa_context>(this, lctx, optimize);
}

bool llama_memory_hybrid_iswa::get_can_shift() const {
    return hybrid_pair_ops{ *mem_attn, *mem_recr, mem }.get_can_shift();
}

void llama_memory_hybrid_iswa::clear(bool data) {
    hybrid_pair_ops{ *mem_attn, *mem_recr, mem }.clear(data);
}

bool llama_memory_hybrid_iswa::seq_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    return hybrid_pair_ops{ *mem_attn, *mem_recr, mem }.seq_rm(seq_id, p0, p1);
}

void llama_memory_hybrid_iswa::seq_cp(llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1) {
    hybrid_pair_ops{ *mem_attn, *mem_recr, mem }.both(
        [&] { llama_memory_dropin_seq_cp(mem, seq_id_src, seq_id_dst, p0, p1); },
        [&] { mem_attn->seq_cp(seq_id_src, seq_id_dst, p0, p1); mem_recr->seq_cp(seq_id_src, seq_id_dst, p0, p1); });
}

void llama_memory_hybrid_iswa::seq_keep(llama_seq_id seq_id) {
    hybrid_pair_ops{ *mem_attn, *mem_recr, mem }.both(
        [&] { llama_memory_dropin_seq_keep(mem, seq_id); },
        [&] { mem_attn->seq_keep(seq_id); mem_recr->seq_keep(seq_id); });
}

void llama_memory_hybrid_iswa::seq_add(llama_seq_id seq_id, llama_pos p0, llama_pos p1, llama_pos shift) {
    hybrid_pair_ops{ *mem_attn, *mem_recr, mem }.both(
        [&] { llama_memory_dropin_seq_add(mem, seq_id, p0, p1, shift); },
        [&] { mem_attn->seq_add(seq_id, p0, p1, shift); mem_recr->seq_add(seq_id, p0, p1, shift); });
}

void llama_memory_hybrid_iswa::seq_div(llama_seq_id seq_id, llama_pos p0, llama_pos p1, int d) {
    hybrid_pair_ops{ *mem_attn, *mem_recr, mem }.both(
        [&] { llama_memory_dropin_seq_div(mem, seq_id, p0, p1, d); },
        [&] { mem_attn->seq_div(seq_id, p0, p1, d); mem_recr->seq_div(seq_id, p0, p1, d); });
}

llama_pos llama_memory_hybrid_iswa::seq_pos_min(llama_seq_id seq_id) const {
    return hybrid_pair_ops{ *mem_attn, *mem_recr, mem }.seq_pos_min(seq_id);
}

llama_pos llama_memory_hybrid_iswa::seq_pos_max(llama_seq_id seq_id) const {
    return hybrid_pair_ops{ *mem_attn, *mem_recr, mem }.seq_pos_max(seq_id);
}

std::map<ggml_backend_buffer_type_t, size_t> llama_memory_hybrid_iswa::memory_breakdown() const {
    return hybrid_pair_ops{ *mem_attn, *mem_recr, mem }.memory_breakdown();
}

void llama_memory_hybrid_iswa::state_write(llama_io_write_i & io, llama_seq_id seq_id, llama_state_seq_flags flags) const {
    hybrid_pair_ops{ *mem_attn, *mem_recr, mem }.state_write(io, seq_id, flags);
}

void llama_memory_hybrid_iswa::state_read(llama_io_read_i & io, llama_seq_id seq_id, llama_state_seq_flags flags) {
    hybrid_pair_ops{ *mem_attn, *mem_recr, mem }.state_read(io, seq_id, flags);
}

llama_kv_cache_iswa * llama_memory_hybrid_iswa::get_mem_attn() const {
    return mem_attn.get();
}

llama_memory_recurrent * llama_memory_hybrid_iswa::get_mem_recr() const {
    return mem_recr.get();
}

//
// llama_memory_hybrid_iswa_context: the parts' contexts, moved and applied together
//

llama_memory_hybrid_iswa_context::llama_memory_hybrid_iswa_context(llama_memory_status status) : status(status) {}

llama_memory_hybrid_iswa_context::llama_memory_hybrid_iswa_context(llama_memory_hybrid_iswa * mem) :
    ctx_attn(mem->get_mem_attn()->init_full()),
    ctx_recr(mem->get_mem_recr()->init_full()),
    status(llama_memory_status_combine(ctx_attn->get_status(), ctx_recr->get_status())) {
}

llama_memory_hybrid_iswa_context::llama_memory_hybrid_iswa_context(llama_memory_hybrid_iswa * mem, llama_context * lctx, bool optimize) :
    ctx_attn(mem->get_mem_attn()->init_update(lctx, optimize)),
    ctx_recr(mem->get_mem_recr()->init_update(lctx, optimize)),
    status(llama_memory_status_combine(ctx_attn->get_status(), ctx_recr->get_status())) {
}

llama_memory_hybrid_iswa_context::llama_memory_hybrid_iswa_context(
        llama_memory_hybrid_iswa * mem, slot_info_vec_t sinfos_base, slot_info_vec_t sinfos_swa,
        std::vector<llama_ubatch> ubatches) :
    ubatches(std::move(ubatches)),
    ctx_attn(new llama_kv_cache_iswa_context(mem->get_mem_attn(), std::move(sinfos_base), std::move(sinfos_swa), this->ubatches)),
    ctx_recr(new llama_memory_recurrent_context(mem->get_mem_recr(), this->ubatches)),
    status(llama_memory_status_combine(ctx_attn->get_status(), ctx_recr->get_status())) {
}

bool llama_memory_hybrid_iswa_context::next() {
    assert(status == LLAMA_MEMORY_STATUS_SUCCESS);
    ctx_attn->next();
    ctx_recr->next();
    return ++i_next < ubatches.size();
}

bool llama_memory_hybrid_iswa_context::apply() {
    assert(!llama_memory_status_is_fail(status));
    const bool a = ctx_attn->apply();
    const bool r = ctx_recr->apply();
    return a && r;
}

llama_memory_status llama_memory_hybrid_iswa_context::get_status() const {
    return status;
}

const llama_ubatch & llama_memory_hybrid_iswa_context::get_ubatch() const {
    assert(status == LLAMA_MEMORY_STATUS_SUCCESS);
    return ubatches[i_next];
}

const llama_kv_cache_iswa_context * llama_memory_hybrid_iswa_context::get_attn() const {
    return static_cast<const llama_kv_cache_iswa_context *>(ctx_attn.get());
}

const llama_memory_recurrent_context * llama_memory_hybrid_iswa_context::get_recr() const {
    return static_cast<const llama_memory_recurrent_context *>(ctx_recr.get());
}
