// llama-memory's drop-in: llama.cpp's `llama_kv_cache` over this library's KV cache. The
// library owns the cells, the K/V tensors, slot search, masks and indices, and the state
// format; this file maps upstream's members onto its C ABI (llama/llama-memory-abi.h) and
// keeps in C++ what must stay there: the ubatch split, the contexts, the graph-side objects
// llama_context drives (the K-shift graph through its scheduler), llama.cpp's io objects.

#include "llama-kv-cache.h"

#include "llama-memory-abi.h"

#include "ggml-backend.h"
#include "llama-context.h"
#include "llama-impl.h"
#include "llama-model.h"

#include <algorithm>
#include <cassert>
#include <cmath>
#include <cstring>
#include <stdexcept>

namespace {

// The library's view of an upstream slot_info: the same arrays, borrowed.
struct slot_view {
    std::vector<const uint32_t *> ptrs;
    llama_memory_slot_info        c = {};

    explicit slot_view(const llama_kv_cache::slot_info & s) {
        ptrs.reserve(s.idxs.size());
        for (const auto & v : s.idxs) {
            ptrs.push_back(v.data());
        }
        c.s0       = s.s0;
        c.s1       = s.s1;
        c.n_stream = (uint32_t) s.strm.size();
        c.size     = s.idxs.empty() ? 0 : (uint32_t) s.idxs[0].size();
        c.strm     = s.strm.data();
        c.idxs     = ptrs.data();
    }
};

void check(llama_memory_result rc, const char * what) {
    if (rc != LLAMA_MEMORY_OK) {
        llama_memory_dropin_throw(what);
    }
}

// Copies the slot infos out of a list (its arrays are valid until its next use).
llama_kv_cache::slot_info_vec_t read_slots(llama_memory_slots * slots) {
    const size_t n = llama_memory_slots_count(slots);
    llama_kv_cache::slot_info_vec_t res(n);
    for (size_t k = 0; k < n; ++k) {
        llama_memory_slot_info c = {};
        check(llama_memory_slots_get(slots, k, &c), "slot infos");
        auto & s = res[k];
        s.s0 = c.s0;
        s.s1 = c.s1;
        s.resize(c.n_stream);
        for (uint32_t j = 0; j < c.n_stream; ++j) {
            s.strm[j] = c.strm[j];
            s.idxs[j].assign(c.idxs[j], c.idxs[j] + c.size);
        }
    }
    return res;
}

// An orthonormal Walsh-Hadamard matrix of size n (a power of 2), row-major: H(2m) is
// [[H(m), H(m)], [H(m), -H(m)]] and H(1) = 1/sqrt(n), so that H * H = I.
std::vector<float> hadamard(int64_t n) {
    std::vector<float> h((size_t) (n*n));
    h[0] = 1.0f / sqrtf((float) n);
    for (int64_t m = 1; m < n; m *= 2) {
        for (int64_t i = 0; i < m; ++i) {
            for (int64_t j = 0; j < m; ++j) {
                const float x = h[i*n + j];
                h[i*n + (j + m)]       =  x;
                h[(i + m)*n + j]       =  x;
                h[(i + m)*n + (j + m)] = -x;
            }
        }
    }
    return h;
}

} // namespace

//
// llama_kv_cache
//

llama_kv_cache::llama_kv_cache(
        const llama_model & model,
        const llama_hparams & hparams,
                ggml_type   type_k,
                ggml_type   type_v,
                     bool   v_trans,
                     bool   offload,
                     bool   unified,
                 uint32_t   kv_size,
                 uint32_t   n_seq_max,
                 uint32_t   n_pad,
                 uint32_t   n_swa,
           llama_swa_type   swa_type,
           llama_memory_t   mem_other,
    const layer_filter_cb & filter,
    const  layer_reuse_cb & reuse,
    const  layer_share_cb & share,
             const char *   name_tag) :
    model(model), hparams(hparams), other(static_cast<const llama_kv_cache *>(mem_other)), v_trans(v_trans),
    n_seq_max(n_seq_max), n_stream(unified ? 1 : n_seq_max),
    // shared cells view the other cache's tensors: the cell count follows its allocation
    kv_size(other ? other->get_size() : kv_size), t_k(type_k), t_v(type_v), n_swa(n_swa), swa_type(swa_type) {
    if (other) {
        if (kv_size != this->kv_size) {
            LLAMA_LOG_WARN("%s: kv_size = %u overridden to %u to match the shared source cache\n", __func__, kv_size, this->kv_size);
        }
        init_shared(filter, reuse, share);
        return;
    }

    const uint32_t n_layer = hparams.n_layer_all;
    const bool is_mla = hparams.is_mla();

    // stock's log lines, at stock's levels and in stock's order (creation, layers, reuse,
    // buffers, size, rotation)
    if (v_trans && hparams.is_n_embd_v_gqa_variable()) {
        LLAMA_LOG_WARN("%s: the V embeddings have different sizes across layers and FA is not enabled - padding V cache to %d\n",
                __func__, hparams.n_embd_v_gqa_max());
    }

    std::vector<llama_memory_kv_layer> layers;
    for (uint32_t il = 0; il < n_layer; il++) {
        if (!hparams.has_kv(il)) {
            LLAMA_LOG_DEBUG("%s: layer %3d: does not have KV cache\n", __func__, il);
            continue;
        }
        if (filter && !filter(il)) {
            LLAMA_LOG_DEBUG("%s: layer %3d: filtered\n", __func__, il);
            continue;
        }

        const int32_t hk = (int32_t) hparams.n_embd_head_k(il);
        n_embd_head_k_all = n_embd_head_k_all == 0 ? hk : (n_embd_head_k_all == hk ? hk : -1);
        if (!is_mla) {
            const int32_t hv = (int32_t) hparams.n_embd_head_v(il);
            n_embd_head_v_all = n_embd_head_v_all == 0 ? hv : (n_embd_head_v_all == hv ? hv : -1);
        }

        llama_memory_kv_layer l = {};
        l.il           = il;
        l.n_embd_k_gqa = hparams.n_embd_k_gqa(il);
        l.n_embd_v_gqa = hparams.n_embd_v_gqa(il);
        l.reuse        = -1;
        l.buft         = offload ? ggml_backend_dev_buffer_type(model.dev_layer(il)) : ggml_backend_cpu_buffer_type();
        layers.push_back(l);

        LLAMA_LOG_DEBUG("%s: layer %3d: dev = %s\n", __func__, il, offload ? ggml_backend_dev_name(model.dev_layer(il)) : "CPU");

        layer_ids.push_back(il);
        map_layer_ids[il] = il;
    }

    if (reuse) {
        LLAMA_LOG_DEBUG("%s: reusing layers:\n", __func__);
        for (uint32_t il = 0; il < n_layer; il++) {
            const int32_t il_reuse = reuse(il);
            if (il_reuse < 0) {
                LLAMA_LOG_DEBUG("%s: - layer %3d: no reuse\n", __func__, il);
                continue;
            }
            if (filter && !filter(il)) {
                LLAMA_LOG_DEBUG("%s: - layer %3d: filtered\n", __func__, il);
                continue;
            }
            if (map_layer_ids.find(il_reuse) == map_layer_ids.end()) {
                throw std::runtime_error("llama-memory drop-in: a layer reuses a layer without KV tensors");
            }
            llama_memory_kv_layer l = {};
            l.il           = il;
            l.n_embd_k_gqa = hparams.n_embd_k_gqa(il);
            l.n_embd_v_gqa = hparams.n_embd_v_gqa(il);
            l.reuse        = il_reuse;
            layers.push_back(l);
            map_layer_ids[il] = map_layer_ids[il_reuse];
            LLAMA_LOG_DEBUG("%s: - layer %3d: reuse layer %d, is_swa = %d\n", __func__, il, il_reuse, hparams.is_swa(il));
        }
    }

    // the attention rotation of quantized caches, as llama.cpp decides it
    bool rot_disable = false;
    {
        const char * env = getenv("LLAMA_ATTN_ROT_DISABLE");
        rot_disable = env ? atoi(env) : false;

        bool rot_k = !rot_disable && n_embd_head_k_all > 0 && ggml_is_quantized(type_k) && hparams.n_embd_head_k() % 64 == 0;
        if ((model.arch == LLM_ARCH_DEEPSEEK32 || model.arch == LLM_ARCH_DEEPSEEK4 ||
             model.arch == LLM_ARCH_GLM_DSA || model.arch == LLM_ARCH_DOTS3NOTE) &&
            hparams.n_embd_head_k_full == hparams.indexer_head_size) {
            rot_k = true;
        }
        const bool rot_v = !rot_disable && n_embd_head_v_all > 0 && ggml_is_quantized(type_v) && hparams.n_embd_head_v() % 64 == 0;

        if (rot_k) {
            n_rot_k = 64;
            while (n_embd_head_k_all % (2*n_rot_k) == 0) {
                n_rot_k *= 2;
            }
        }
        if (rot_v) {
            n_rot_v = 64;
        }
        if (n_rot_k || n_rot_v) {
            for (int64_t n = 64; n <= std::max(n_embd_head_k_all, n_embd_head_v_all); n *= 2) {
                attn_rot_hadamard[n] = hadamard(n);
            }
        }
    }

    llama_memory_kv_params p = llama_memory_kv_default_params();
    p.size             = kv_size;
    p.n_seq_max        = n_seq_max;
    p.unified          = unified;
    p.n_pad            = n_pad;
    p.n_swa            = n_swa;
    p.swa_type         = (int32_t) swa_type;
    // (the library takes an M-RoPE model's 4-section ubatches into a cache whose own hparams
    // have no RoPE, hybrid-idx's indexer cache: their 2-D positions kept in the cells, its
    // state and can_shift its own, as upstream's)
    p.n_pos_per_embd   = hparams.n_pos_per_embd();
    p.model_can_shift  = model.arch != LLM_ARCH_STEP35;
    p.use_alibi        = hparams.use_alibi;
    p.non_causal_type  = (int32_t) hparams.non_causal_type;
    p.v_trans          = v_trans;
    // a transposed V is padded to the model's widest V row, as upstream (a filtered-out layer
    // may be the widest); 0 lets the library take the widest of this cache's layers, which a
    // cache without layers needs
    p.n_embd_v_gqa_max = v_trans && !is_mla && !layers.empty() ? hparams.n_embd_v_gqa_max() : 0;
    p.n_rel_attn_bkts  = hparams.n_rel_attn_bkts;
    // n-gram inputs (PLE): the cells keep every row's token id, an embedding row's stand-in
    p.ngram_tokens     = hparams.ple_n_heads > 0;
    p.embd_token       = hparams.ple_image_token_id != 0 ? (llama_token) hparams.ple_image_token_id
                                                         : (llama_token) hparams.ple_eos_token_id;

    llama_memory_kv_storage_params sp = llama_memory_kv_storage_default_params();
    sp.type_k   = type_k;
    sp.type_v   = type_v;
    sp.is_mla   = is_mla;
    sp.n_rot_k  = n_rot_k;
    sp.n_rot_v  = n_rot_v;
    sp.layers   = layers.data();
    sp.n_layers = layers.size();
    sp.name_tag = name_tag;
    // a model loaded to measure (llama.cpp's fit): tensors without memory, sizes reported
    sp.no_alloc = hparams.no_alloc;

    mem = llama_memory_kv_init_with_storage(p, &sp);
    if (!mem) {
        llama_memory_dropin_throw("failed to create the KV cache");
    }
    check(llama_memory_set_stock_compat(mem, true), "KV cache");
    check(llama_memory_set_log(mem, llama_memory_dropin_log, nullptr), "KV cache");
    if (const char * debug = getenv("LLAMA_KV_CACHE_DEBUG")) {
        check(llama_memory_kv_set_debug(mem, atoi(debug)), "KV cache");
    }

    slots = llama_memory_slots_init();
    if (!slots) {
        llama_memory_free(mem);
        llama_memory_dropin_throw("failed to create the KV cache");
    }

    for (const auto & [buft, size] : memory_breakdown()) {
        // stock logs the size of the buffer it made: 0 for a no_alloc one
        const size_t made = hparams.no_alloc ? 0 : size;
        LLAMA_LOG_INFO("%s: %10s KV buffer size = %8.2f MiB\n", __func__, ggml_backend_buft_name(buft), made/1024.0/1024.0);
    }

    {
        size_t memory_size_k = 0;
        size_t memory_size_v = 0;
        for (const uint32_t il : layer_ids) {
            const ggml_tensor * k = llama_memory_kv_get_k_tensor(mem, il);
            const ggml_tensor * v = is_mla ? nullptr : llama_memory_kv_get_v_tensor(mem, il);
            memory_size_k += k ? ggml_nbytes(k) : 0;
            memory_size_v += v ? ggml_nbytes(v) : 0;
        }
        llama_memory_clear_last_error();
        LLAMA_LOG_INFO("%s: size = %7.2f MiB (%6u cells, %3d layers, %2u/%u seqs), K (%s): %7.2f MiB, V (%s): %7.2f MiB\n", __func__,
                (float)(memory_size_k + memory_size_v) / (1024.0f * 1024.0f), kv_size, (int) layer_ids.size(), n_seq_max, n_stream,
                ggml_type_name(type_k), (float)memory_size_k / (1024.0f * 1024.0f),
                ggml_type_name(type_v), (float)memory_size_v / (1024.0f * 1024.0f));
    }

    if (rot_disable) {
        LLAMA_LOG_WARN("%s: attention rotation force disabled (LLAMA_ATTN_ROT_DISABLE)\n", __func__);
    }
    // (stock's second line names n_embd_head_k_all for the V value too)
    LLAMA_LOG_INFO("%s: n_rot_k = %u, n_embd_head_k_all = %d\n", __func__, n_rot_k, n_embd_head_k_all);
    LLAMA_LOG_INFO("%s: n_rot_v = %u, n_embd_head_k_all = %d\n", __func__, n_rot_v, n_embd_head_v_all);
}

void llama_kv_cache::init_shared(const layer_filter_cb & filter, const layer_reuse_cb & reuse, const layer_share_cb & share) {
    // (stock's lines come from its constructor)
    const char * func = "llama_kv_cache";
    // The other cache's cells are read with this cache's masks and slot searches, which the
    // library computes with the other's parameters: where they would differ (upstream would
    // mask with its own window, or resize the other's streams), a clear failure.
    if (other->n_stream != n_stream || other->v_trans != v_trans || other->n_swa != n_swa || other->swa_type != swa_type) {
        throw std::runtime_error(format(
            "llama-memory drop-in: a KV cache over another cache's cells needs that cache's streams, V layout and "
            "sliding window (this: %u streams, v_trans %d, n_swa %u, swa_type %d; other: %u, %d, %u, %d)",
            n_stream, v_trans, n_swa, (int) swa_type, other->n_stream, other->v_trans, other->n_swa, (int) other->swa_type));
    }

    if (v_trans && hparams.is_n_embd_v_gqa_variable()) {
        LLAMA_LOG_WARN("%s: the V embeddings have different sizes across layers and FA is not enabled - padding V cache to %d\n",
                func, hparams.n_embd_v_gqa_max());
    }

    size_t memory_size_k = 0;
    size_t memory_size_v = 0;
    for (uint32_t il = 0; il < hparams.n_layer_all; il++) {
        if (!hparams.has_kv(il)) {
            LLAMA_LOG_DEBUG("%s: layer %3d: does not have KV cache\n", func, il);
            continue;
        }
        if (filter && !filter(il)) {
            LLAMA_LOG_DEBUG("%s: layer %3d: filtered\n", func, il);
            continue;
        }
        const int32_t il_share = share ? share(il) : -1;
        if (il_share < 0) {
            // (the pinned tree shares every layer of the one cache it builds over another's)
            throw std::runtime_error("llama-memory drop-in: a KV cache over another cache's cells with tensors of its own is not supported");
        }
        // upstream indexes the other's layers with operator[]: a layer it lacks is its first one
        const auto it = other->map_layer_ids.find(il_share);
        if (it == other->map_layer_ids.end() && other->layer_ids.empty()) {
            throw std::runtime_error("llama-memory drop-in: the shared source cache has no layer");
        }
        const int32_t il_lib = it != other->map_layer_ids.end() ? it->second : (int32_t) other->layer_ids[0];
        const ggml_tensor * k = llama_memory_kv_get_k_tensor(other->mem, (uint32_t) il_lib);
        const ggml_tensor * v = hparams.is_mla() ? nullptr : llama_memory_kv_get_v_tensor(other->mem, (uint32_t) il_lib);
        llama_memory_clear_last_error();
        LLAMA_LOG_WARN("%s: layer %3d: sharing with layer %d. k = %p, v = %p\n", func, il, il_share,
                k ? k->data : nullptr, v ? v->data : nullptr);
        memory_size_k += k ? ggml_nbytes(k) : 0;
        memory_size_v += v ? ggml_nbytes(v) : 0;
        layer_ids.push_back(il);
        map_layer_ids[il] = il_lib;
    }

    if (reuse) {
        LLAMA_LOG_DEBUG("%s: reusing layers:\n", func);
        for (uint32_t il = 0; il < hparams.n_layer_all; il++) {
            const int32_t il_reuse = reuse(il);
            if (il_reuse < 0) {
                LLAMA_LOG_DEBUG("%s: - layer %3d: no reuse\n", func, il);
                continue;
            }
            if (filter && !filter(il)) {
                LLAMA_LOG_DEBUG("%s: - layer %3d: filtered\n", func, il);
                continue;
            }
            if (map_layer_ids.find(il_reuse) == map_layer_ids.end()) {
                throw std::runtime_error("llama-memory drop-in: a layer reuses a layer without KV tensors");
            }
            map_layer_ids[il] = map_layer_ids[il_reuse];
            LLAMA_LOG_DEBUG("%s: - layer %3d: reuse layer %d, is_swa = %d\n", func, il, il_reuse, hparams.is_swa(il));
        }
    }

    // no buffer of its own; the size line counts the shared tensors, as upstream's
    LLAMA_LOG_INFO("%s: size = %7.2f MiB (%6u cells, %3d layers, %2u/%u seqs), K (%s): %7.2f MiB, V (%s): %7.2f MiB\n", func,
            (float)(memory_size_k + memory_size_v) / (1024.0f * 1024.0f), kv_size, (int) layer_ids.size(), n_seq_max, n_stream,
            ggml_type_name(t_k), (float)memory_size_k / (1024.0f * 1024.0f),
            ggml_type_name(t_v), (float)memory_size_v / (1024.0f * 1024.0f));

    // the rotation is the other cache's
    n_rot_k = other->n_rot_k;
    n_rot_v = other->n_rot_v;
    attn_rot_hadamard = other->attn_rot_hadamard;
    LLAMA_LOG_INFO("%s: n_rot_k = %u, n_embd_head_k_all = %d\n", func, n_rot_k, other->n_embd_head_k_all);
    LLAMA_LOG_INFO("%s: n_rot_v = %u, n_embd_head_k_all = %d\n", func, n_rot_v, other->n_embd_head_v_all);

    slots = llama_memory_slots_init();
    if (!slots) {
        llama_memory_dropin_throw("failed to create the KV cache");
    }
}

void llama_kv_cache::shared_clear() {
    check(llama_memory_kv_reset_cells(other->mem), "clear");
    other->changed();
}

llama_kv_cache::~llama_kv_cache() {
    llama_memory_slots_free(slots);
    llama_memory_free(mem);
}

LLAMA_MEMORY_DROPIN_FORWARDERS(llama_kv_cache)

llama_memory_context_ptr llama_kv_cache::init_batch(
            llama_batch_allocr & balloc,
            uint32_t n_ubatch,
            bool embd_all) {
    GGML_UNUSED(embd_all);

    balloc.split_reset();

    std::vector<llama_ubatch> ubatches;
    for (;;) {
        // one stream: simple splits; a stream per sequence: equal splits, one sequence per set
        llama_ubatch ubatch = n_stream == 1 ? balloc.split_simple(n_ubatch) : balloc.split_equal(n_ubatch, true, 0);
        if (ubatch.n_tokens == 0) {
            break;
        }
        ubatches.push_back(std::move(ubatch)); // NOLINT
    }

    if (balloc.get_n_used() < balloc.get_n_tokens()) {
        return std::make_unique<llama_kv_cache_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
    }

    auto sinfos = prepare(ubatches);
    if (sinfos.empty()) {
        return std::make_unique<llama_kv_cache_context>(LLAMA_MEMORY_STATUS_FAILED_PREPARE);
    }

    return std::make_unique<llama_kv_cache_context>(this, std::move(sinfos), std::move(ubatches));
}

llama_memory_context_ptr llama_kv_cache::init_full() {
    return std::make_unique<llama_kv_cache_context>(this);
}

llama_memory_context_ptr llama_kv_cache::init_update(llama_context * lctx, bool optimize) {
    const bool do_shift = get_has_shift();

    if (shared()) {
        // (the other cache's pending shift: this cache's update is upstream's no-op)
        return std::make_unique<llama_kv_cache_context>(this, lctx, do_shift, stream_copy_info(), false);
    }

    // Defragmentation, opt-in by llama_context_params.defrag_thold (deprecated and ignored by
    // the pinned llama.cpp, so the default, -1, keeps the drop-in identical to stock): as the
    // llama.cpp that still had it, forced by `optimize` (decode's retry after a failed slot
    // search), else when a stream's fragmentation exceeds the threshold; the move budget is
    // the seed's, from the graph's node budget.
    bool do_defrag = false;
    const float thold = lctx ? lctx->get_cparams().defrag_thold : -1.0f;
    if (thold > 0.0f) {
        const uint32_t n_max_nodes = lctx->graph_max_nodes(lctx->get_cparams().n_ubatch);
        const uint32_t max_moves = llama_memory_kv_defrag_max_moves((int32_t) n_max_nodes, (uint32_t) layer_ids.size());
        const float frag = llama_memory_kv_get_fragmentation(mem);
        const int32_t n_moves = llama_memory_kv_defrag_prepare(mem, optimize ? -1.0f : thold, max_moves);
        if (n_moves < 0) {
            LLAMA_LOG_ERROR("%s: %s\n", __func__, llama_memory_last_error());
        } else if (n_moves > 0) {
            LLAMA_LOG_DEBUG("%s: fragmentation: %.2f - %s defrag, %d cell moves\n", __func__, frag,
                    optimize ? "forced" : "requesting", n_moves);
            do_defrag = true;
        }
    }

    // the pending stream copies move into the update context, as upstream's
    stream_copy_info sc;
    const size_t n = llama_memory_kv_take_stream_copies(mem, nullptr, nullptr, 0);
    if (n > 0) {
        sc.ssrc.resize(n);
        sc.sdst.resize(n);
        if (llama_memory_kv_take_stream_copies(mem, sc.ssrc.data(), sc.sdst.data(), n) != n) {
            llama_memory_dropin_throw("failed to take the pending stream copies");
        }
    }

    return std::make_unique<llama_kv_cache_context>(this, lctx, do_shift, std::move(sc), do_defrag);
}

llama_kv_cache::slot_info_vec_t llama_kv_cache::prepare(const std::vector<llama_ubatch> & ubatches) {
    if (shared()) {
        // placing a ubatch changes no shared cell (upstream's apply_ubatch is a no-op there), so
        // each ubatch's slot is searched on the cells as they are. The search starts at the
        // other cache's head where upstream's starts at its own (always 0): whether a slot is
        // found is the same, only its cells may differ, and they only address K/V writes,
        // which a cache over another's cells never makes (gemma4-assistant's layers are
        // query-only)
        slot_info_vec_t res;
        for (const auto & ub : ubatches) {
            res.push_back(find_slot(ub, false));
            if (res.back().empty()) {
                return {};
            }
        }
        return res;
    }

    std::vector<llama_memory_ubatch> ubs;
    ubs.reserve(ubatches.size());
    for (const auto & ub : ubatches) {
        ubs.push_back(llama_memory_dropin_ubatch(ub));
    }

    const llama_memory_result rc = llama_memory_kv_prepare(mem, ubs.data(), ubs.size(), slots);
    if (rc != LLAMA_MEMORY_OK) {
        if (rc != LLAMA_MEMORY_ERR_NO_SLOT) {
            LLAMA_LOG_ERROR("%s: %s\n", __func__, llama_memory_last_error());
        }
        return {};
    }

    return read_slots(slots);
}

llama_kv_cache::slot_info llama_kv_cache::find_slot(const llama_ubatch & ubatch, bool cont) const {
    const llama_memory_ubatch ub = llama_memory_dropin_ubatch(ubatch);
    const llama_memory_result rc = llama_memory_kv_find_slot(cells_mem(), &ub, cont, slots);
    if (rc != LLAMA_MEMORY_OK) {
        if (rc != LLAMA_MEMORY_ERR_NO_SLOT) {
            LLAMA_LOG_ERROR("%s: %s\n", __func__, llama_memory_last_error());
        }
        return {};
    }
    auto res = read_slots(slots);
    return res.empty() ? slot_info{} : std::move(res[0]);
}

void llama_kv_cache::apply_ubatch(const slot_info & sinfo, const llama_ubatch & ubatch) {
    if (shared()) {
        return;
    }
    const slot_view sv(sinfo);
    const llama_memory_ubatch ub = llama_memory_dropin_ubatch(ubatch);
    check(llama_memory_kv_apply_ubatch(mem, &sv.c, &ub), "apply_ubatch");
    changed();
}

bool llama_kv_cache::update(llama_context * lctx, bool do_shift, const stream_copy_info & sc_info, bool do_defrag) {
    if (shared()) {
        // (the other cache shifts its cells, as upstream's)
        return true;
    }

    bool updated = false;

    if (!sc_info.empty()) {
        llama_synchronize(lctx);
        for (size_t i = 0; i < sc_info.ssrc.size(); ++i) {
            LLAMA_LOG_DEBUG("%s: copying KV buffer: stream %d to stream %d\n", __func__, sc_info.ssrc[i], sc_info.sdst[i]);
            check(llama_memory_kv_copy_stream(mem, sc_info.ssrc[i], sc_info.sdst[i]), "stream copy");
        }
    }

    if (do_shift) {
        if (!get_can_shift()) {
            throw std::runtime_error("the KV cache / model configuration does not support K-shift");
        }

        LLAMA_LOG_DEBUG("%s: applying K-shift\n", __func__);

        if (hparams.rope_type != LLAMA_ROPE_TYPE_NONE) {
            auto * sched = lctx->get_sched();
            ggml_backend_sched_reset(sched);

            auto * res = lctx->get_gf_res_reserve();
            res->reset();

            auto * gf = build_graph_shift(res, lctx);
            if (!ggml_backend_sched_alloc_graph(sched, gf)) {
                LLAMA_LOG_ERROR("%s: failed to allocate compute graph for K-shift\n", __func__);
                return updated;
            }

            res->set_inputs(nullptr);

            if (lctx->graph_compute(gf, false) != GGML_STATUS_SUCCESS) {
                LLAMA_LOG_ERROR("%s: failed to compute K-shift\n", __func__);
                return updated;
            }

            updated = true;
        }

        check(llama_memory_kv_reset_shift(mem), "K-shift");
    }

    if (do_defrag) {
        LLAMA_LOG_DEBUG("%s: defragmenting KV cache\n", __func__);
        // the rows move with ggml_backend_tensor_get/set on a non-host buffer: let the
        // backend finish what it still computes on them first
        llama_synchronize(lctx);
        const int32_t n = llama_memory_kv_defrag_apply(mem);
        if (n < 0) {
            // refused with nothing changed (the cells changed since the plan): no update
            LLAMA_LOG_ERROR("%s: %s\n", __func__, llama_memory_last_error());
        } else {
            updated = true;
        }
    }

    changed();
    return updated;
}

bool llama_kv_cache::get_can_shift() const {
    if (shared()) {
        // upstream's rule for any cache of this model, shared or not
        return model.arch != LLM_ARCH_STEP35 && hparams.n_pos_per_embd() == 1;
    }
    return llama_memory_dropin_can_shift(mem);
}

uint32_t llama_kv_cache::get_size() const {
    return kv_size;
}

uint32_t llama_kv_cache::get_n_seq_max() const {
    return n_seq_max;
}

uint32_t llama_kv_cache::get_n_stream() const {
    return n_stream;
}

bool llama_kv_cache::get_has_shift() const {
    return llama_memory_kv_get_has_shift(cells_mem());
}

ggml_type llama_kv_cache::type_k() const {
    return t_k;
}

ggml_type llama_kv_cache::type_v() const {
    return t_v;
}

std::vector<uint32_t> llama_kv_cache::get_layer_ids() const {
    return layer_ids;
}

ggml_tensor * llama_kv_cache::get_k_storage(int32_t il) const {
    return llama_memory_kv_get_k_tensor(cells_mem(), (uint32_t) map_layer_ids.at(il));
}

const llama_kv_cells & llama_kv_cache::get_cells(llama_seq_id seq_id) const {
    if (shared()) {
        return other->get_cells(seq_id);
    }
    const uint32_t strm = get_stream(seq_id);
    cells_mirror.resize(n_stream);
    mirror_out.resize(n_stream, false);
    fill_mirror(strm);
    mirror_out[strm] = true;
    return cells_mirror[strm];
}

void llama_kv_cache::fill_mirror(uint32_t strm) const {
    auto & cells = cells_mirror[strm];
    cells.reset();
    cells.resize(kv_size);
    cells_pos.resize(kv_size);
    cells_bits.resize((size_t) kv_size * 4);
    cells_ext.resize((size_t) kv_size * 3);
    check(llama_memory_kv_get_cells(mem, strm, cells_pos.data(), cells_bits.data(), kv_size), "get_cells");
    check(llama_memory_kv_get_cells_ext(mem, strm, cells_ext.data(), kv_size), "get_cells");
    for (uint32_t i = 0; i < kv_size; ++i) {
        if (cells_pos[i] < 0) {
            continue;
        }
        cells.pos_set(i, cells_pos[i]);
        // (the 2-D positions hybrid-idx rotates a pooled key to, the n-gram token)
        llama_kv_cell_ext e;
        e.x   = cells_ext[(size_t) i*3 + 0];
        e.y   = cells_ext[(size_t) i*3 + 1];
        e.tok = cells_ext[(size_t) i*3 + 2];
        cells.ext_set(i, e);
        for (int w = 0; w < 4; ++w) {
            for (uint64_t bits = cells_bits[(size_t) i*4 + w]; bits; bits &= bits - 1) {
                cells.seq_add(i, w*64 + __builtin_ctzll(bits));
            }
        }
    }
}

void llama_kv_cache::changed() const {
    for (uint32_t s = 0; s < (uint32_t) mirror_out.size(); ++s) {
        if (mirror_out[s]) {
            fill_mirror(s);
        }
    }
}

uint32_t llama_kv_cache::get_stream(llama_seq_id seq_id) const {
    GGML_ASSERT(seq_id >= 0 && seq_id < LLAMA_MAX_SEQ);
    return n_stream == 1 ? 0 : (uint32_t) seq_id;
}

uint32_t llama_kv_cache::get_n_kv(const slot_info & sinfo) const {
    const slot_view sv(sinfo);
    return llama_memory_kv_get_n_kv(cells_mem(), &sv.c);
}

ggml_tensor * llama_kv_cache::get_k(ggml_context * ctx, int32_t il, uint32_t n_kv, const slot_info & sinfo) const {
    return llama_memory_kv_view_k(cells_mem(), ctx, lib_layer(il), n_kv, sinfo.s0, sinfo.s1, hparams.n_embd_head_k(il));
}

ggml_tensor * llama_kv_cache::get_v(ggml_context * ctx, int32_t il, uint32_t n_kv, const slot_info & sinfo) const {
    return llama_memory_kv_view_v(cells_mem(), ctx, lib_layer(il), n_kv, sinfo.s0, sinfo.s1, hparams.n_embd_head_v(il));
}

ggml_tensor * llama_kv_cache::cpy_k(ggml_context * ctx, ggml_tensor * k_cur, ggml_tensor * k_idxs, int32_t il, const slot_info & sinfo) const {
    GGML_UNUSED(sinfo);
    return llama_memory_kv_cpy_k(cells_mem(), ctx, lib_layer(il), k_cur, k_idxs);
}

ggml_tensor * llama_kv_cache::cpy_v(ggml_context * ctx, ggml_tensor * v_cur, ggml_tensor * v_idxs, int32_t il, const slot_info & sinfo) const {
    GGML_UNUSED(sinfo);
    return llama_memory_kv_cpy_v(cells_mem(), ctx, lib_layer(il), v_cur, v_idxs);
}

ggml_tensor * llama_kv_cache::build_input_k_idxs(ggml_context * ctx, const llama_ubatch & ubatch) const {
    ggml_tensor * t = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, ubatch.n_tokens);
    ggml_set_input(t);
    ggml_set_name(t, "attn_inp_k_idxs");
    return t;
}

ggml_tensor * llama_kv_cache::build_input_v_idxs(ggml_context * ctx, const llama_ubatch & ubatch) const {
    // a transposed V takes one index per scalar of each row
    const int64_t n = v_trans ? (int64_t) ubatch.n_tokens*hparams.n_embd_v_gqa_max() : ubatch.n_tokens;
    ggml_tensor * t = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, n);
    ggml_set_input(t);
    ggml_set_name(t, "attn_inp_v_idxs");
    return t;
}

ggml_tensor * llama_kv_cache::build_input_k_rot(ggml_context * ctx) const {
    if (!n_rot_k) {
        return nullptr;
    }
    ggml_tensor * t = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_rot_k, n_rot_k);
    ggml_set_input(t);
    ggml_set_name(t, "attn_inp_k_rot");
    return t;
}

ggml_tensor * llama_kv_cache::build_input_v_rot(ggml_context * ctx) const {
    if (!n_rot_v) {
        return nullptr;
    }
    ggml_tensor * t = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, n_rot_v, n_rot_v);
    ggml_set_input(t);
    ggml_set_name(t, "attn_inp_v_rot");
    return t;
}

void llama_kv_cache::set_input_k_idxs(ggml_tensor * dst, const llama_ubatch * ubatch, const slot_info & sinfo) const {
    const slot_view sv(sinfo);
    const llama_memory_ubatch ub = llama_memory_dropin_ubatch(*ubatch);
    check(llama_memory_kv_set_input_k_idxs_tensor(cells_mem(), dst, &ub, &sv.c), "set_input_k_idxs");
}

void llama_kv_cache::set_input_v_idxs(ggml_tensor * dst, const llama_ubatch * ubatch, const slot_info & sinfo) const {
    const slot_view sv(sinfo);
    const llama_memory_ubatch ub = llama_memory_dropin_ubatch(*ubatch);
    check(llama_memory_kv_set_input_v_idxs_tensor(cells_mem(), dst, &ub, &sv.c), "set_input_v_idxs");
}

void llama_kv_cache::set_input_k_shift(ggml_tensor * dst) const {
    check(llama_memory_kv_set_input_k_shift_tensor(cells_mem(), dst), "set_input_k_shift");
}

void llama_kv_cache::set_input_kq_mask(ggml_tensor * dst, const llama_ubatch * ubatch, bool causal_attn) const {
    const llama_memory_ubatch ub = llama_memory_dropin_ubatch(*ubatch);
    check(llama_memory_kv_set_input_kq_mask_tensor(cells_mem(), dst, &ub, causal_attn), "set_input_kq_mask");
}

void llama_kv_cache::set_input_pos_bucket(ggml_tensor * dst, const llama_ubatch * ubatch) const {
    const llama_memory_ubatch ub = llama_memory_dropin_ubatch(*ubatch);
    check(llama_memory_kv_set_input_pos_bucket_tensor(cells_mem(), dst, &ub), "set_input_pos_bucket");
}

void llama_kv_cache::set_input_k_rot(ggml_tensor * dst) const {
    GGML_ASSERT(ggml_backend_buffer_is_host(dst->buffer));
    const auto & h = attn_rot_hadamard.at(dst->ne[0]);
    memcpy(dst->data, h.data(), ggml_nbytes(dst));
}

void llama_kv_cache::set_input_v_rot(ggml_tensor * dst) const {
    GGML_ASSERT(ggml_backend_buffer_is_host(dst->buffer));
    const auto & h = attn_rot_hadamard.at(dst->ne[0]);
    memcpy(dst->data, h.data(), ggml_nbytes(dst));
}

bool llama_kv_cache::has_cell_ext() const {
    return hparams.n_pos_per_embd() > 1 || hparams.ple_n_heads > 0;
}

void llama_kv_cache::get_prev_tokens(const llama_ubatch & ubatch, uint32_t n, std::vector<llama_token> & res) const {
    res.assign((size_t) ubatch.n_tokens*n, LLAMA_TOKEN_NULL);
    const llama_memory_ubatch ub = llama_memory_dropin_ubatch(ubatch);
    check(llama_memory_kv_get_prev_tokens(cells_mem(), &ub, n, res.data(), res.size()), "get_prev_tokens");
}

void llama_kv_cache::state_write(llama_io_write_i & io, llama_seq_id seq_id, llama_state_seq_flags flags) const {
    if (shared()) {
        // (the cells are the other cache's, which writes them: upstream writes nothing here)
        return;
    }
    llama_memory_dropin_writer w{ io };
    const llama_memory_io_write cb = w.callbacks();
    if (llama_memory_state_write_io(mem, seq_id, flags, &cb) != LLAMA_MEMORY_OK) {
        llama_memory_dropin_throw("failed to write the KV cache state");
    }
}

void llama_kv_cache::state_read(llama_io_read_i & io, llama_seq_id seq_id, llama_state_seq_flags flags) {
    state_read_sinfo(io, seq_id, flags, nullptr, nullptr);
}

void llama_kv_cache::state_read_sinfo(
        llama_io_read_i & io,
           llama_seq_id   seq_id,
  llama_state_seq_flags   flags,
      slot_info_vec_t *   sinfos_out,
const slot_info_vec_t *   sinfos_in) {
    if (shared()) {
        // (nothing was written: upstream reads nothing)
        return;
    }

    llama_memory_dropin_reader r{ io };
    const llama_memory_io_read cb = r.callbacks();
    if (!sinfos_out && !sinfos_in) {
        const bool ok = llama_memory_state_read_io(mem, seq_id, flags, &cb) == LLAMA_MEMORY_OK;
        changed(); // (a failure may have erased the destination, as stock's)
        if (ok) {
            return;
        }
        llama_memory_dropin_read_failed(mem, r.error, /* kv = */ true);
    }

    // a cache that mirrors another cell for cell (hybrid-idx): the layout per stream as counts
    // and cells, stream after stream
    std::vector<uint32_t> counts_in, cells_in;
    if (sinfos_in) {
        if (sinfos_in->size() != n_stream) {
            throw std::runtime_error("failed to restore kv cache: mirrored slot layout has the wrong stream count");
        }
        for (const auto & si : *sinfos_in) {
            if (si.empty()) {
                counts_in.push_back(0);
                continue;
            }
            // upstream refuses a layout over several streams in state_read_meta (a count
            // that cannot match gives the library the same refusal)
            const size_t n = si.n_stream() == 1 ? si.idxs[0].size() : kv_size + 1;
            counts_in.push_back((uint32_t) n);
            if (si.n_stream() == 1) {
                cells_in.insert(cells_in.end(), si.idxs[0].begin(), si.idxs[0].end());
            } else {
                cells_in.resize(cells_in.size() + n, 0);
            }
        }
    }
    std::vector<uint32_t> counts_out(n_stream), cells_out((size_t) kv_size*n_stream);
    const bool ok = llama_memory_kv_state_read_io_slots(mem, seq_id, &cb,
                sinfos_in ? counts_in.data() : nullptr, sinfos_in ? cells_in.data() : nullptr,
                counts_out.data(), cells_out.data(), cells_out.size()) == LLAMA_MEMORY_OK;
    changed();
    if (!ok) {
        llama_memory_dropin_read_failed(mem, r.error, /* kv = */ true);
    }
    if (sinfos_out) {
        sinfos_out->assign(n_stream, slot_info{});
        size_t at = 0;
        for (uint32_t s = 0; s < n_stream; ++s) {
            if (counts_out[s] == 0) {
                continue;
            }
            // a sequence's cells are in its own stream, a whole state's in stream s
            const uint32_t strm = seq_id == -1 ? s : (n_stream == 1 ? 0 : (uint32_t) seq_id);
            slot_info & si = (*sinfos_out)[s];
            si.s0 = strm;
            si.s1 = strm;
            si.resize(1);
            si.strm[0] = strm;
            si.idxs[0].assign(cells_out.begin() + at, cells_out.begin() + at + counts_out[s]);
            at += counts_out[s];
        }
    }
}

void llama_kv_cache::state_clear(llama_seq_id seq_id) {
    if (shared()) {
        // (a shared cache reads no state, so no restore of it fails; -1 is a clear)
        if (seq_id == -1) {
            shared_clear();
        }
        return;
    }
    check(llama_memory_kv_state_clear(mem, seq_id), "state_clear");
    changed();
}

//
// K-shift: the graph input and graph (orchestrated through llama_context, as upstream)
//

namespace {

class kv_shift_input : public llm_graph_input_i {
public:
    explicit kv_shift_input(const llama_kv_cache * kv) : kv(kv) {}

    void set_input(const llama_ubatch * ubatch) override {
        GGML_UNUSED(ubatch);
        // (a cache with no layer builds no shift node, so the input was never allocated: the
        // shift moves no tensor, and the cells' pending shifts are reset as for any other)
        if (k_shift && k_shift->buffer) {
            kv->set_input_k_shift(k_shift);
        }
        if (k_rot && k_rot->buffer) {
            kv->set_input_k_rot(k_rot);
        }
    }

    ggml_tensor * k_shift = nullptr; // I32 [kv_size*n_stream]
    ggml_tensor * k_rot   = nullptr; // the Hadamard rotation of a quantized K (its own inverse)

    const llama_kv_cache * kv;
};

} // namespace

ggml_cgraph * llama_kv_cache::build_graph_shift(llm_graph_result * res, llama_context * lctx) const {
    auto * ctx = res->get_ctx();
    auto * gf  = res->get_gf();

    auto inp = std::make_unique<kv_shift_input>(this);

    inp->k_shift = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, (int64_t) kv_size*n_stream);
    ggml_set_input(inp->k_shift);

    inp->k_rot = build_input_k_rot(ctx);

    const auto & cparams = lctx->get_cparams();

    // M-RoPE rotates the whole vector on a shift, which NEOX ordering does
    const int rope_type = hparams.rope_type == LLAMA_ROPE_TYPE_MROPE || hparams.rope_type == LLAMA_ROPE_TYPE_IMROPE
        ? LLAMA_ROPE_TYPE_NEOX : hparams.rope_type;

    for (const uint32_t il : layer_ids) {
        if (!hparams.has_rope(il)) {
            continue;
        }

        llama_memory_rope_params rope = {};
        rope.n_rot       = (int32_t) hparams.n_rot(il);
        // MLA keeps the rotated part after the non-rotated one
        rope.n_embd_nope = hparams.n_lora_kv > 0 ? hparams.n_embd_head_k(il) - hparams.n_rot(il) : 0;
        rope.mode        = rope_type;
        rope.n_ctx_orig  = (int32_t) cparams.n_ctx_orig_yarn;
        rope.freq_base   = model.get_rope_freq_base (cparams, il);
        rope.freq_scale  = model.get_rope_freq_scale(cparams, il);
        rope.ext_factor  = cparams.yarn_ext_factor;
        rope.attn_factor = cparams.yarn_attn_factor;
        rope.beta_fast   = cparams.yarn_beta_fast;
        rope.beta_slow   = cparams.yarn_beta_slow;

        ggml_tensor * cur = llama_memory_kv_build_k_shift(mem, ctx, il, hparams.n_embd_head_k(il), inp->k_shift,
                inp->k_rot, model.get_rope_factors(cparams, il), &rope);
        if (!cur) {
            llama_memory_dropin_throw("K-shift");
        }

        ggml_build_forward_expand(gf, cur);
    }

    res->add_input(std::move(inp));

    return gf;
}

//
// llama_kv_cache_context
//

llama_kv_cache_context::llama_kv_cache_context(llama_memory_status status) : status(status) {}

llama_kv_cache_context::llama_kv_cache_context(
        llama_kv_cache * kv) : status(LLAMA_MEMORY_STATUS_SUCCESS), kv(kv) {
    n_kv = kv->get_size();

    // a placeholder slot over every stream: only its shape matters for the worst-case graph
    const uint32_t n_stream = kv->get_n_stream();
    sinfos.resize(1);
    sinfos[0].s0 = 0;
    sinfos[0].s1 = n_stream - 1;
    sinfos[0].idxs.resize(n_stream);
    for (uint32_t s = 0; s < n_stream; ++s) {
        sinfos[0].strm.push_back(s);
        sinfos[0].idxs[s].resize(1, 0);
    }
}

llama_kv_cache_context::llama_kv_cache_context(
        llama_kv_cache * kv,
        llama_context * lctx,
        bool do_shift,
        stream_copy_info sc_info,
        bool do_defrag) : status(LLAMA_MEMORY_STATUS_SUCCESS), kv(kv), lctx(lctx), do_shift(do_shift), sc_info(std::move(sc_info)), do_defrag(do_defrag) {
    if (!do_shift && this->sc_info.empty() && !do_defrag) {
        status = LLAMA_MEMORY_STATUS_NO_UPDATE;
    }
}

llama_kv_cache_context::llama_kv_cache_context(
        llama_kv_cache * kv,
        llama_kv_cache::slot_info_vec_t sinfos,
        std::vector<llama_ubatch> ubatches) : status(LLAMA_MEMORY_STATUS_SUCCESS), kv(kv), sinfos(std::move(sinfos)), ubatches(std::move(ubatches)) {
}

llama_kv_cache_context::~llama_kv_cache_context() = default;

bool llama_kv_cache_context::next() {
    assert(status == LLAMA_MEMORY_STATUS_SUCCESS);

    return ++i_cur < ubatches.size();
}

bool llama_kv_cache_context::apply() {
    assert(!llama_memory_status_is_fail(status));

    // no ubatches: an update
    if (ubatches.empty()) {
        kv->update(lctx, do_shift, sc_info, do_defrag);
        return true;
    }

    kv->apply_ubatch(sinfos[i_cur], ubatches[i_cur]);
    n_kv = kv->get_n_kv(sinfos[i_cur]);

    return true;
}

llama_memory_status llama_kv_cache_context::get_status() const {
    return status;
}

const llama_ubatch & llama_kv_cache_context::get_ubatch() const {
    assert(status == LLAMA_MEMORY_STATUS_SUCCESS);

    return ubatches[i_cur];
}

uint32_t llama_kv_cache_context::get_n_kv() const {
    return n_kv;
}

ggml_type llama_kv_cache_context::type_k() const {
    return kv->type_k();
}

ggml_type llama_kv_cache_context::type_v() const {
    return kv->type_v();
}

ggml_tensor * llama_kv_cache_context::get_k(ggml_context * ctx, int32_t il) const {
    return kv->get_k(ctx, il, n_kv, sinfos[i_cur]);
}

ggml_tensor * llama_kv_cache_context::get_v(ggml_context * ctx, int32_t il) const {
    return kv->get_v(ctx, il, n_kv, sinfos[i_cur]);
}

ggml_tensor * llama_kv_cache_context::cpy_k(ggml_context * ctx, ggml_tensor * k_cur, ggml_tensor * k_idxs, int32_t il) const {
    return kv->cpy_k(ctx, k_cur, k_idxs, il, sinfos[i_cur]);
}

ggml_tensor * llama_kv_cache_context::cpy_v(ggml_context * ctx, ggml_tensor * v_cur, ggml_tensor * v_idxs, int32_t il) const {
    return kv->cpy_v(ctx, v_cur, v_idxs, il, sinfos[i_cur]);
}

ggml_tensor * llama_kv_cache_context::build_input_k_idxs(ggml_context * ctx, const llama_ubatch & ubatch) const {
    return kv->build_input_k_idxs(ctx, ubatch);
}

ggml_tensor * llama_kv_cache_context::build_input_v_idxs(ggml_context * ctx, const llama_ubatch & ubatch) const {
    return kv->build_input_v_idxs(ctx, ubatch);
}

ggml_tensor * llama_kv_cache_context::build_input_k_rot(ggml_context * ctx) const {
    return kv->build_input_k_rot(ctx);
}

ggml_tensor * llama_kv_cache_context::build_input_v_rot(ggml_context * ctx) const {
    return kv->build_input_v_rot(ctx);
}

void llama_kv_cache_context::set_input_k_shift(ggml_tensor * dst) const {
    kv->set_input_k_shift(dst);
}

void llama_kv_cache_context::set_input_k_idxs(ggml_tensor * dst, const llama_ubatch * ubatch) const {
    kv->set_input_k_idxs(dst, ubatch, sinfos[i_cur]);
}

void llama_kv_cache_context::set_input_v_idxs(ggml_tensor * dst, const llama_ubatch * ubatch) const {
    kv->set_input_v_idxs(dst, ubatch, sinfos[i_cur]);
}

void llama_kv_cache_context::set_input_kq_mask(ggml_tensor * dst, const llama_ubatch * ubatch, bool causal_attn) const {
    kv->set_input_kq_mask(dst, ubatch, causal_attn);
}

void llama_kv_cache_context::set_input_pos_bucket(ggml_tensor * dst, const llama_ubatch * ubatch) const {
    kv->set_input_pos_bucket(dst, ubatch);
}

void llama_kv_cache_context::set_input_k_rot(ggml_tensor * dst) const {
    kv->set_input_k_rot(dst);
}

void llama_kv_cache_context::set_input_v_rot(ggml_tensor * dst) const {
    kv->set_input_v_rot(dst);
}

void llama_kv_cache_context::get_prev_tokens(const llama_ubatch & ubatch, uint32_t n, std::vector<llama_token> & res) const {
    kv->get_prev_tokens(ubatch, n, res);
}
