#pragma once

// llama-memory's drop-in: llama.cpp's `llama_memory_recurrent` as a thin adapter over this
// library's recurrent memory (src/recurrent/). Written over upstream's header in the staged
// tree (cmake/LlamaMemoryDropin.cmake); the public interface is upstream's, member for
// member, so the hybrid memories and the model graphs compile unchanged against it. The
// cells, tensors and state live in the library; of upstream's public data members only
// `n_rs_seq` remains (the hybrids read it), so any other reader fails to compile.

#include "llama-batch.h"
#include "llama-graph.h"
#include "llama-memory.h"

#include <map>
#include <vector>

struct llama_memory_dropin_obj;

class llama_memory_recurrent : public llama_memory_i {
public:
    llama_memory_recurrent(
            const llama_model & model,
                    ggml_type   type_r,
                    ggml_type   type_s,
                         bool   offload,
                     uint32_t   mem_size,
                     uint32_t   n_seq_max,
                     uint32_t   n_rs_seq,
        const layer_filter_cb & filter);

    ~llama_memory_recurrent();

    llama_memory_recurrent(const llama_memory_recurrent &) = delete;
    llama_memory_recurrent & operator=(const llama_memory_recurrent &) = delete;

    //
    // llama_memory_i
    //

    llama_memory_context_ptr init_batch(
            llama_batch_allocr & balloc,
            uint32_t n_ubatch,
            bool embd_all) override;

    llama_memory_context_ptr init_full() override;

    llama_memory_context_ptr init_update(llama_context * lctx, bool optimize) override;

    void clear(bool data) override;

    bool seq_rm  (llama_seq_id seq_id,                              llama_pos p0, llama_pos p1) override;
    void seq_cp  (llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1) override;
    void seq_keep(llama_seq_id seq_id)                                                          override;
    void seq_add (llama_seq_id seq_id,                              llama_pos p0, llama_pos p1, llama_pos shift) override;
    void seq_div (llama_seq_id seq_id,                              llama_pos p0, llama_pos p1, int d) override;

    llama_pos seq_pos_min(llama_seq_id seq_id) const override;
    llama_pos seq_pos_max(llama_seq_id seq_id) const override;

    std::map<ggml_backend_buffer_type_t, size_t> memory_breakdown() const override;

    bool prepare(const std::vector<llama_ubatch> & ubatches);

    // places the ubatch's sequences in the cells (the library's slot search)
    bool find_slot(const llama_ubatch & ubatch);

    bool get_can_shift() const override;

    // state write/load

    void state_write(llama_io_write_i & io, llama_seq_id seq_id = -1, llama_state_seq_flags flags = 0) const override;
    void state_read (llama_io_read_i  & io, llama_seq_id seq_id = -1, llama_state_seq_flags flags = 0) override;

    // the library's handle (llama-state.cpp checks a state with it before any restore)
    llama_memory_dropin_obj * handle() const { return mem; }

    // number of recurrent-state snapshots per seq for rollback (the constructor's argument; 0
    // for a memory without layers, as upstream)
    uint32_t n_rs_seq = 0;

    //
    // for llama_memory_recurrent_context
    //

    uint32_t get_size() const;
    uint32_t get_head() const;
    uint32_t get_n()    const;
    int32_t  get_rs_z() const;

    ggml_tensor * get_r_l(int32_t il) const;
    ggml_tensor * get_s_l(int32_t il) const;
    ggml_tensor * get_p_l(int32_t il) const;

    // s_copy(i) of the last placement; consumes the pending rollback it reads, as upstream
    int32_t s_copy(int i) const;

private:
    // (the forwarders call it after every change; the recurrent memory hands out no mirror)
    void changed() const {}

    // (a recurrent memory never shares another's cells)
    bool shared() const { return false; }
    void shared_clear() {}
    llama_memory_dropin_obj * cells_mem() const { return mem; }

    // the library's counters (size, head, n, rs_z) in one call
    struct llama_memory_rs_info info() const;

    llama_memory_dropin_obj * mem = nullptr;

    // per model layer, nullptr where the layer has none (filtered out, or no PLE row)
    std::vector<ggml_tensor *> r_l;
    std::vector<ggml_tensor *> s_l;
    std::vector<ggml_tensor *> p_l;
};

class llama_memory_recurrent_context : public llama_memory_context_i {
public:
    // used for errors
    llama_memory_recurrent_context(llama_memory_status status);

    // used to create a full-cache or update context
    llama_memory_recurrent_context(
            llama_memory_recurrent * mem);

    // used to create a batch processing context from a batch
    llama_memory_recurrent_context(
            llama_memory_recurrent * mem,
            std::vector<llama_ubatch> ubatches);

    virtual ~llama_memory_recurrent_context();

    //
    // llama_memory_context_i
    //

    bool next()  override;
    bool apply() override;

    llama_memory_status  get_status() const override;
    const llama_ubatch & get_ubatch() const override;

    //
    // llama_memory_recurrent_context specific API
    //

    uint32_t get_n_rs() const;
    uint32_t get_head() const;
    int32_t  get_rs_z() const;
    uint32_t get_size() const;

    ggml_tensor * get_r_l(int32_t il) const;
    ggml_tensor * get_s_l(int32_t il) const;
    ggml_tensor * get_p_l(int32_t il) const;

    int32_t s_copy(int i) const;

private:
    const llama_memory_status status;

    llama_memory_recurrent * mem = nullptr;

    size_t i_next = 0;

    std::vector<llama_ubatch> ubatches;

    const bool is_full = false;
};
