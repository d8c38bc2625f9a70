#pragma once

// llama-memory's drop-in: llama.cpp's `llama_kv_cache` (and its context) as a thin adapter over
// this library's KV cache (src/kv/, src/storage/). Written over upstream's header in the staged
// tree (cmake/LlamaMemoryDropin.cmake). The public interface is upstream's, member for member,
// with the nested `slot_info` / `stream_copy_info` and their inline methods, so that the
// composites (iSWA, hybrid, DSA, MSA, DSV4, hybrid-idx) and the graph code compile unchanged;
// only the private members are ours: the library's handle and what the graph side needs.

#include "llama-batch.h"
#include "llama-graph.h"
#include "llama-kv-cells.h"
#include "llama-memory.h"

#include <unordered_map>
#include <vector>

struct llama_cparams;
struct llama_hparams;
struct llama_model;
struct llama_context;

struct llama_memory_dropin_obj;
struct llama_memory_slots;

//
// llama_kv_cache
//

class llama_kv_cache : public llama_memory_i {
public:
    struct stream_copy_info {
        bool empty() const {
            assert(ssrc.size() == sdst.size());
            return ssrc.empty();
        }

        std::vector<uint32_t> ssrc;
        std::vector<uint32_t> sdst;
    };

    // where each token of a ubatch goes: token[s*size() + i] -> cell idxs[s][i] of stream strm[s]
    struct slot_info {
        using idx_vec_t = std::vector<uint32_t>;

        // streams s0..s1 (ns = s1 - s0 + 1)
        uint32_t s0;
        uint32_t s1;

        std::vector<llama_seq_id> strm; // [ns]
        std::vector<idx_vec_t>    idxs; // [ns]

        uint32_t head() const {
            GGML_ASSERT(idxs.size() == 1);
            GGML_ASSERT(!idxs[0].empty());

            return idxs[0][0];
        }

        void resize(size_t n) {
            strm.resize(n);
            idxs.resize(n);
        }

        size_t size() const {
            GGML_ASSERT(idxs.size() == strm.size());
            GGML_ASSERT(!idxs.empty());

            return idxs[0].size();
        }

        size_t n_stream() const {
            return strm.size();
        }

        bool empty() const {
            return idxs.empty();
        }

        void clear() {
            idxs.clear();
        }

        // true when the indices are head(), head() + 1, ...
        bool is_contiguous() const {
            if (idxs.empty() || idxs[0].empty()) {
                return true;
            }
            if (idxs.size() > 1) {
                return false;
            }
            const uint32_t h = idxs[0][0];
            for (size_t i = 0; i < idxs[0].size(); ++i) {
                if (idxs[0][i] != h + i) {
                    return false;
                }
            }
            return true;
        }
    };

    using slot_info_vec_t = std::vector<slot_info>;

    llama_kv_cache(
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
                 const char *   name_tag = "");

    ~llama_kv_cache();

    llama_kv_cache(const llama_kv_cache &) = delete;
    llama_kv_cache & operator=(const llama_kv_cache &) = delete;

    //
    // llama_memory_i
    //

    llama_memory_context_ptr init_batch(
            llama_batch_allocr & balloc,
            uint32_t n_ubatch,
            bool embd_all) override;

    llama_memory_context_ptr init_full() override;

    llama_memory_context_ptr init_update(llama_context * lctx, bool optimize) override;

    bool get_can_shift() const override;

    void clear(bool data) override;

    bool seq_rm  (llama_seq_id seq_id,                              llama_pos p0, llama_pos p1) override;
    void seq_cp  (llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1) override;
    void seq_keep(llama_seq_id seq_id)                                                          override;
    void seq_add (llama_seq_id seq_id,                              llama_pos p0, llama_pos p1, llama_pos shift) override;
    void seq_div (llama_seq_id seq_id,                              llama_pos p0, llama_pos p1, int d) override;

    llama_pos seq_pos_min(llama_seq_id seq_id) const override;
    llama_pos seq_pos_max(llama_seq_id seq_id) const override;

    std::map<ggml_backend_buffer_type_t, size_t> memory_breakdown() const override;

    // state write/load

    void state_write(llama_io_write_i & io, llama_seq_id seq_id = -1, llama_state_seq_flags flags = 0) const override;
    void state_read (llama_io_read_i  & io, llama_seq_id seq_id = -1, llama_state_seq_flags flags = 0) override;

    // the library's handle (llama-state.cpp checks a state with it before any restore); a view
    // of a half of the library's pair when a llama_kv_cache_iswa holds this cache
    llama_memory_dropin_obj * handle() const { return mem; }

    // the cells changed through a composite holding this cache: the mirrors handed out follow
    void cells_changed() const { changed(); }

    // the cells and tensors are another cache's (mem_other, the gemma4-assistant's cache over
    // its main model's): no state, no handle of its own, every change a no-op, as upstream's
    // [TAG_KV_CACHE_SHARE_CELLS]. That cache must outlive this one, as upstream's must.
    bool shared() const { return other != nullptr; }

    //
    // llama_kv_cache specific API
    //

    uint32_t get_size()     const;
    uint32_t get_n_seq_max() const;
    uint32_t get_n_stream() const;

    bool get_has_shift() const;

    ggml_type type_k() const;
    ggml_type type_v() const;

    std::vector<uint32_t> get_layer_ids() const;
    ggml_tensor * get_k_storage(int32_t il) const;

    // a copy of the stream's cells, rebuilt from the library's on each call
    const llama_kv_cells & get_cells(llama_seq_id seq_id) const;

    uint32_t get_stream(llama_seq_id seq_id) const;

    // state_read, plus the cells the restored tokens went to (not supported with given slots)
    void state_read_sinfo(
            llama_io_read_i & io,
               llama_seq_id   seq_id,
      llama_state_seq_flags   flags,
          slot_info_vec_t *   sinfos_out,
    const slot_info_vec_t *   sinfos_in);

    // undo a state_read() of seq_id (-1 for the whole cache) that another memory module failed to complete
    void state_clear(llama_seq_id seq_id);

    //
    // graph_build API
    //

    uint32_t get_n_kv(const slot_info & sinfo) const;

    ggml_tensor * get_k(ggml_context * ctx, int32_t il, uint32_t n_kv, const slot_info & sinfo) const;
    ggml_tensor * get_v(ggml_context * ctx, int32_t il, uint32_t n_kv, const slot_info & sinfo) const;

    ggml_tensor * cpy_k(ggml_context * ctx, ggml_tensor * k_cur, ggml_tensor * k_idxs, int32_t il, const slot_info & sinfo) const;
    ggml_tensor * cpy_v(ggml_context * ctx, ggml_tensor * v_cur, ggml_tensor * v_idxs, int32_t il, const slot_info & sinfo) const;

    //
    // preparation API
    //

    // slots for the ubatches in turn (the cells are put back afterwards); empty on failure
    slot_info_vec_t prepare(const std::vector<llama_ubatch> & ubatches);

    // do_defrag: apply the defragmentation init_update planned (after the K-shift, as the seed)
    bool update(llama_context * lctx, bool do_shift, const stream_copy_info & sc_info, bool do_defrag = false);

    // a slot for the ubatch, the cells unchanged; empty when none
    slot_info find_slot(const llama_ubatch & ubatch, bool cont) const;

    void apply_ubatch(const slot_info & sinfo, const llama_ubatch & ubatch);

    //
    // input API
    //

    ggml_tensor * build_input_k_idxs(ggml_context * ctx, const llama_ubatch & ubatch) const;
    ggml_tensor * build_input_v_idxs(ggml_context * ctx, const llama_ubatch & ubatch) const;

    ggml_tensor * build_input_k_rot(ggml_context * ctx) const;
    ggml_tensor * build_input_v_rot(ggml_context * ctx) const;

    void set_input_k_idxs(ggml_tensor * dst, const llama_ubatch * ubatch, const slot_info & sinfo) const;
    void set_input_v_idxs(ggml_tensor * dst, const llama_ubatch * ubatch, const slot_info & sinfo) const;

    void set_input_k_shift(ggml_tensor * dst) const;

    void set_input_kq_mask   (ggml_tensor * dst, const llama_ubatch * ubatch, bool causal_attn) const;
    void set_input_pos_bucket(ggml_tensor * dst, const llama_ubatch * ubatch) const;

    void set_input_k_rot(ggml_tensor * dst) const;
    void set_input_v_rot(ggml_tensor * dst) const;

    bool has_cell_ext() const;

    // the n-gram inputs of qwen4exp: the n tokens before each token, from the cells
    void get_prev_tokens(const llama_ubatch & ubatch, uint32_t n, std::vector<llama_token> & res) const;

private:
    const llama_model & model;
    const llama_hparams & hparams;

    llama_memory_dropin_obj * mem = nullptr;

    // the cache whose cells and tensors this one uses, or nullptr (see shared())
    const llama_kv_cache * other = nullptr;

    // the library handle holding the cells: the other cache's for a shared one
    llama_memory_dropin_obj * cells_mem() const { return other ? other->mem : mem; }

    // a shared cache's clear: upstream resets the shared cells (the other cache's tensors and
    // its slot-search heads stay as they are)
    void shared_clear();
    // a model layer's layer in the library handle: the other cache's for a shared one (an
    // own cache's handle maps reused layers itself)
    uint32_t lib_layer(int32_t il) const { return other ? (uint32_t) map_layer_ids.at(il) : (uint32_t) il; }

    void init_shared(const layer_filter_cb & filter, const layer_reuse_cb & reuse, const layer_share_cb & share);

    // reused by prepare()
    llama_memory_slots * slots = nullptr;

    const bool     v_trans;
    const uint32_t n_seq_max;
    const uint32_t n_stream;
    const uint32_t kv_size;

    ggml_type t_k;
    ggml_type t_v;

    // model layers with their own tensors, in order; model layer -> the layer whose tensors it
    // uses (for a shared cache: the other cache's layer, in that cache's library handle)
    std::vector<uint32_t> layer_ids;
    std::unordered_map<int32_t, int32_t> map_layer_ids;

    const uint32_t       n_swa;
    const llama_swa_type swa_type;

    // the head sizes of every layer (-1: they differ), for the rotation
    int32_t n_embd_head_k_all = 0;
    int32_t n_embd_head_v_all = 0;

    // attention rotation (quantized caches): the Hadamard sizes and matrices
    uint32_t n_rot_k = 0;
    uint32_t n_rot_v = 0;
    std::unordered_map<int64_t, std::vector<float>> attn_rot_hadamard;

    // get_cells hands out references to mirrors of the library's cells; upstream's callers
    // (hybrid-idx's k-pool layout, msa) keep them, as references to live cells, across
    // apply_ubatch and the other changes: every change rebuilds the mirrors handed out
    mutable std::vector<llama_kv_cells> cells_mirror;
    mutable std::vector<bool>           mirror_out;
    mutable std::vector<llama_pos>      cells_pos;  // get_cells' buffers, kept between calls
    mutable std::vector<uint64_t>       cells_bits;
    mutable std::vector<int32_t>        cells_ext;

    void fill_mirror(uint32_t strm) const;
    void changed() const;

    ggml_cgraph * build_graph_shift(llm_graph_result * res, llama_context * lctx) const;
};

class llama_kv_cache_context : public llama_memory_context_i {
public:
    using slot_info_vec_t  = llama_kv_cache::slot_info_vec_t;
    using stream_copy_info = llama_kv_cache::stream_copy_info;

    // used for errors
    llama_kv_cache_context(llama_memory_status status);

    // used to create a full-cache context
    llama_kv_cache_context(
            llama_kv_cache * kv);

    // used to create an update context
    llama_kv_cache_context(
            llama_kv_cache * kv,
            llama_context * lctx,
            bool do_shift,
            stream_copy_info sc_info,
            bool do_defrag = false);

    // used to create a batch processing context from a batch
    llama_kv_cache_context(
            llama_kv_cache * kv,
            slot_info_vec_t sinfos,
            std::vector<llama_ubatch> ubatches);

    virtual ~llama_kv_cache_context();

    //
    // llama_memory_context_i
    //

    bool next()  override;
    bool apply() override;

    llama_memory_status  get_status() const override;
    const llama_ubatch & get_ubatch() const override;

    //
    // llama_kv_cache_context specific API
    //

    uint32_t get_n_kv() const;

    ggml_type type_k() const;
    ggml_type type_v() const;

    ggml_tensor * get_k(ggml_context * ctx, int32_t il) const;
    ggml_tensor * get_v(ggml_context * ctx, int32_t il) const;

    ggml_tensor * cpy_k(ggml_context * ctx, ggml_tensor * k_cur, ggml_tensor * k_idxs, int32_t il) const;
    ggml_tensor * cpy_v(ggml_context * ctx, ggml_tensor * v_cur, ggml_tensor * v_idxs, int32_t il) const;

    ggml_tensor * build_input_k_idxs(ggml_context * ctx, const llama_ubatch & ubatch) const;
    ggml_tensor * build_input_v_idxs(ggml_context * ctx, const llama_ubatch & ubatch) const;

    ggml_tensor * build_input_k_rot(ggml_context * ctx) const;
    ggml_tensor * build_input_v_rot(ggml_context * ctx) const;

    void set_input_k_idxs(ggml_tensor * dst, const llama_ubatch * ubatch) const;
    void set_input_v_idxs(ggml_tensor * dst, const llama_ubatch * ubatch) const;

    void set_input_k_shift   (ggml_tensor * dst) const;
    void set_input_kq_mask   (ggml_tensor * dst, const llama_ubatch * ubatch, bool causal_attn) const;
    void set_input_pos_bucket(ggml_tensor * dst, const llama_ubatch * ubatch) const;

    void set_input_k_rot(ggml_tensor * dst) const;
    void set_input_v_rot(ggml_tensor * dst) const;

    void get_prev_tokens(const llama_ubatch & ubatch, uint32_t n, std::vector<llama_token> & res) const;

private:
    llama_memory_status status;

    llama_kv_cache * kv = nullptr;
    llama_context * lctx = nullptr;

    // update context
    bool do_shift = false;
    stream_copy_info sc_info;
    bool do_defrag = false; // a defragmentation is planned in the library (llama_memory_kv_defrag_prepare)

    // batch processing context
    size_t i_cur = 0;
    slot_info_vec_t sinfos;
    std::vector<llama_ubatch> ubatches;

    // cells the current ubatch attends to (see get_n_kv)
    int32_t n_kv = 0;
};
