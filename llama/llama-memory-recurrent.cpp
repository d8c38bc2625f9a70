// llama-memory's drop-in: llama.cpp's `llama_memory_recurrent` over this library's recurrent
// memory. The library owns the cells, the R/S/PLE tensors and the state format; this file
// maps upstream's members onto its C ABI (llama/llama-memory-abi.h) and keeps what must stay
// in C++: the ubatch split (llama_batch_allocr), the contexts, llama.cpp's io objects.

#include "llama-memory-recurrent.h"

#include "llama-memory-abi.h"

#include "ggml-backend.h"
#include "llama-impl.h"
#include "llama-model.h"

#include <cassert>
#include <stdexcept>

//
// llama_memory_recurrent
//

llama_memory_recurrent::llama_memory_recurrent(
        const llama_model & model,
                ggml_type   type_r,
                ggml_type   type_s,
                     bool   offload,
                 uint32_t   mem_size,
                 uint32_t   n_seq_max,
                 uint32_t   n_rs_seq,
    const layer_filter_cb & filter) : n_rs_seq(n_rs_seq) {
    const auto & hparams = model.hparams;
    const uint32_t n_layer = hparams.n_layer();

    // the layers the filter keeps, on the device the model puts them (CPU unless offloaded)
    std::vector<llama_memory_rs_layer> layers;
    for (uint32_t il = 0; il < n_layer; ++il) {
        if (filter && !filter(il)) {
            LLAMA_LOG_DEBUG("%s: layer %3d: skipped\n", __func__, il);
            continue;
        }
        ggml_backend_buffer_type_t buft = ggml_backend_cpu_buffer_type();
        if (offload) {
            buft = ggml_backend_dev_buffer_type(model.dev_layer(il));
        }
        // (stock's own punctuation)
        LLAMA_LOG_DEBUG("%s, layer %3d: dev = %s\n", __func__, il, offload ? ggml_backend_dev_name(model.dev_layer(il)) : "CPU");
        llama_memory_rs_layer l = {};
        l.il       = il;
        l.n_embd_r = hparams.n_embd_r();
        l.n_embd_s = hparams.n_embd_s();
        l.n_embd_p = hparams.ple_conv_state() > 0 && hparams.is_ple(il) ? hparams.ple_conv_state() : 0;
        l.buft     = buft;
        layers.push_back(l);
    }

    llama_memory_rs_params params = llama_memory_rs_default_params();
    params.size      = mem_size;
    params.n_seq_max = n_seq_max;
    params.n_rs_seq  = n_rs_seq;
    params.n_layer   = n_layer;
    params.type_r    = type_r;
    params.type_s    = type_s;
    params.layers    = layers.data();
    params.n_layers  = layers.size();

    mem = llama_memory_rs_init(params);
    if (!mem) {
        llama_memory_dropin_throw("failed to create the recurrent memory");
    }
    if (llama_memory_set_stock_compat(mem, true) != LLAMA_MEMORY_OK ||
        llama_memory_set_log(mem, llama_memory_dropin_log, nullptr) != LLAMA_MEMORY_OK) {
        llama_memory_free(mem);
        llama_memory_dropin_throw("failed to create the recurrent memory");
    }

    r_l.assign(n_layer, nullptr);
    s_l.assign(n_layer, nullptr);
    p_l.assign(n_layer, nullptr);
    for (const auto & l : layers) {
        r_l[l.il] = llama_memory_rs_get_r_tensor(mem, l.il);
        s_l[l.il] = llama_memory_rs_get_s_tensor(mem, l.il);
        if (l.n_embd_p > 0) {
            p_l[l.il] = llama_memory_rs_get_p_tensor(mem, l.il);
        }
    }
    llama_memory_clear_last_error();

    const auto bd = memory_breakdown();
    for (const auto & [buft, size] : bd) {
        LLAMA_LOG_INFO("%s: %10s RS buffer size = %8.2f MiB\n", __func__, ggml_backend_buft_name(buft), size/1024.0/1024.0);
    }

    // a memory without layers keeps no rollback planes (the library uses none; the composites
    // read this member, as upstream's)
    if (layers.empty() && this->n_rs_seq > 0) {
        this->n_rs_seq = 0;
        LLAMA_LOG_INFO("%s: disabling rollback snapshots because the memory module is empty\n", __func__);
    }

    {
        size_t memory_size_r = 0;
        size_t memory_size_s = 0;
        size_t memory_size_p = 0;
        for (uint32_t il = 0; il < n_layer; ++il) {
            memory_size_r += r_l[il] ? ggml_nbytes(r_l[il]) : 0;
            memory_size_s += s_l[il] ? ggml_nbytes(s_l[il]) : 0;
            memory_size_p += p_l[il] ? ggml_nbytes(p_l[il]) : 0;
        }
        LLAMA_LOG_INFO("%s: size = %7.2f MiB (%6u cells, %3d layers, %2u seqs %2u rs_seq), R (%s): %7.2f MiB, S (%s): %7.2f MiB, P (%s): %7.2f MiB\n", __func__,
                (float)(memory_size_r + memory_size_s + memory_size_p) / (1024.0f * 1024.0f), mem_size, n_layer, n_seq_max, this->n_rs_seq,
                ggml_type_name(type_r), (float)memory_size_r / (1024.0f * 1024.0f),
                ggml_type_name(type_s), (float)memory_size_s / (1024.0f * 1024.0f),
                ggml_type_name(type_r), (float)memory_size_p / (1024.0f * 1024.0f));
    }
}

llama_memory_recurrent::~llama_memory_recurrent() {
    llama_memory_free(mem);
}

LLAMA_MEMORY_DROPIN_FORWARDERS(llama_memory_recurrent)

llama_memory_context_ptr llama_memory_recurrent::init_batch(llama_batch_allocr & balloc, uint32_t n_ubatch, bool embd_all) {
    balloc.split_reset();

    std::vector<llama_ubatch> ubatches;
    for (;;) {
        // all outputs: one sequence per ubatch; else equal splits that keep each sequence's
        // last (1 + n_rs_seq) tokens together, so that the rollback planes stay valid
        llama_ubatch ubatch = embd_all
            ? balloc.split_seq(n_ubatch)
            : balloc.split_equal(n_ubatch, true, n_rs_seq > 0 ? n_rs_seq + 1 : 0);
        if (ubatch.n_tokens == 0) {
            break;
        }
        ubatches.push_back(std::move(ubatch)); // NOLINT
    }

    if (balloc.get_n_used() < balloc.get_n_tokens() || !prepare(ubatches)) {
        return std::make_unique<llama_memory_recurrent_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
    }

    return std::make_unique<llama_memory_recurrent_context>(this, std::move(ubatches));
}

llama_memory_context_ptr llama_memory_recurrent::init_full() {
    return std::make_unique<llama_memory_recurrent_context>(this);
}

llama_memory_context_ptr llama_memory_recurrent::init_update(llama_context * lctx, bool optimize) {
    GGML_UNUSED(lctx);
    GGML_UNUSED(optimize);

    return std::make_unique<llama_memory_recurrent_context>(LLAMA_MEMORY_STATUS_NO_UPDATE);
}

bool llama_memory_recurrent::prepare(const std::vector<llama_ubatch> & ubatches) {
    std::vector<llama_memory_ubatch> ubs;
    ubs.reserve(ubatches.size());
    for (const auto & ub : ubatches) {
        ubs.push_back(llama_memory_dropin_ubatch(ub));
    }
    const bool ok = llama_memory_rs_prepare(mem, ubs.data(), ubs.size());
    if (!ok) {
        LLAMA_LOG_DEBUG("%s: %s\n", __func__, llama_memory_last_error());
    }
    return ok;
}

bool llama_memory_recurrent::find_slot(const llama_ubatch & ubatch) {
    const llama_memory_ubatch ub = llama_memory_dropin_ubatch(ubatch);
    const bool ok = llama_memory_rs_find_slot(mem, &ub);
    if (!ok) {
        LLAMA_LOG_ERROR("%s: %s\n", __func__, llama_memory_last_error());
    }
    return ok;
}

bool llama_memory_recurrent::get_can_shift() const {
    return llama_memory_dropin_can_shift(mem);
}

void llama_memory_recurrent::state_write(llama_io_write_i & io, llama_seq_id seq_id, llama_state_seq_flags flags) const {
    llama_memory_dropin_writer w{ io };
    const llama_memory_io_write cb = w.callbacks();
    if (llama_memory_state_write_io(mem, seq_id, flags, &cb) != LLAMA_MEMORY_OK) {
        llama_memory_dropin_throw("failed to write the recurrent state");
    }
}

void llama_memory_recurrent::state_read(llama_io_read_i & io, llama_seq_id seq_id, llama_state_seq_flags flags) {
    llama_memory_dropin_reader r{ io };
    const llama_memory_io_read cb = r.callbacks();
    if (llama_memory_state_read_io(mem, seq_id, flags, &cb) == LLAMA_MEMORY_OK) {
        return;
    }
    llama_memory_dropin_read_failed(mem, r.error, /* kv = */ false);
}

llama_memory_rs_info llama_memory_recurrent::info() const {
    llama_memory_rs_info res = {};
    llama_memory_rs_get_info(mem, &res);
    return res;
}

uint32_t llama_memory_recurrent::get_size() const {
    return info().size;
}

uint32_t llama_memory_recurrent::get_head() const {
    return info().head;
}

uint32_t llama_memory_recurrent::get_n() const {
    return info().n;
}

int32_t llama_memory_recurrent::get_rs_z() const {
    return info().rs_z;
}

ggml_tensor * llama_memory_recurrent::get_r_l(int32_t il) const {
    return r_l.at(il);
}

ggml_tensor * llama_memory_recurrent::get_s_l(int32_t il) const {
    return s_l.at(il);
}

ggml_tensor * llama_memory_recurrent::get_p_l(int32_t il) const {
    return p_l.at(il);
}

int32_t llama_memory_recurrent::s_copy(int i) const {
    return llama_memory_rs_s_copy(mem, (uint32_t) i);
}

//
// llama_memory_recurrent_context
//

llama_memory_recurrent_context::llama_memory_recurrent_context(llama_memory_status status) : status(status) {}

llama_memory_recurrent_context::llama_memory_recurrent_context(
        llama_memory_recurrent * mem) : status(LLAMA_MEMORY_STATUS_SUCCESS), mem(mem), is_full(true) {
}

llama_memory_recurrent_context::llama_memory_recurrent_context(
        llama_memory_recurrent * mem,
        std::vector<llama_ubatch> ubatches) : status(LLAMA_MEMORY_STATUS_SUCCESS), mem(mem), ubatches(std::move(ubatches)) {}

llama_memory_recurrent_context::~llama_memory_recurrent_context() = default;

bool llama_memory_recurrent_context::next() {
    assert(status == LLAMA_MEMORY_STATUS_SUCCESS);

    return ++i_next < ubatches.size();
}

bool llama_memory_recurrent_context::apply() {
    assert(!llama_memory_status_is_fail(status));

    // no ubatches: an update, and a recurrent memory has nothing to update
    if (ubatches.empty()) {
        assert(status == LLAMA_MEMORY_STATUS_NO_UPDATE);
        return true;
    }

    // prepare() placed these ubatches already: this cannot fail unless the memory changed
    // in between, which llama.cpp does not do
    mem->find_slot(ubatches[i_next]);

    return true;
}

llama_memory_status llama_memory_recurrent_context::get_status() const {
    return status;
}

const llama_ubatch & llama_memory_recurrent_context::get_ubatch() const {
    assert(status == LLAMA_MEMORY_STATUS_SUCCESS);

    return ubatches[i_next];
}

uint32_t llama_memory_recurrent_context::get_n_rs() const {
    return is_full ? mem->get_size() : mem->get_n();
}

uint32_t llama_memory_recurrent_context::get_head() const {
    return is_full ? 0 : mem->get_head();
}

int32_t llama_memory_recurrent_context::get_rs_z() const {
    return is_full ? 0 : mem->get_rs_z();
}

uint32_t llama_memory_recurrent_context::get_size() const {
    return mem->get_size();
}

ggml_tensor * llama_memory_recurrent_context::get_r_l(int32_t il) const {
    return mem->get_r_l(il);
}

ggml_tensor * llama_memory_recurrent_context::get_s_l(int32_t il) const {
    return mem->get_s_l(il);
}

ggml_tensor * llama_memory_recurrent_context::get_p_l(int32_t il) const {
    return mem->get_p_l(il);
}

int32_t llama_memory_recurrent_context::s_copy(int i) const {
    return mem->s_copy(i);
}
