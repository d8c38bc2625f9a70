// llama.h's sequence functions, owned by the drop-in (llama-dropin-state.h renames upstream's).
// A sequence id outside [0, LLAMA_MAX_SEQ) belongs to no memory: the leaf memories refuse it
// themselves, but a composite can index a per-sequence table with it first (hybrid-idx's
// k-pool bookkeeping: stock aborts there). Such an id gets the function's failure value (false,
// nothing done, -1) and an error line; seq_rm keeps llama.h's "any sequence" for a negative id.
// Everything else is upstream's function, unchanged.
#define LLAMA_DROPIN_STATE_DECLARATIONS_ONLY
#include "llama-dropin-state.h"

#include "llama-cparams.h"
#include "llama-impl.h"

namespace {

bool valid(llama_seq_id seq_id, const char * fn) {
    if (seq_id >= 0 && seq_id < LLAMA_MAX_SEQ) {
        return true;
    }
    LLAMA_LOG_ERROR("%s: invalid seq_id %d (not in [0, %d))\n", fn, seq_id, LLAMA_MAX_SEQ);
    return false;
}

} // namespace

bool llama_memory_seq_rm(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    if (seq_id >= LLAMA_MAX_SEQ && !valid(seq_id, __func__)) {
        return false;
    }
    return llama_upstream_memory_seq_rm(mem, seq_id, p0, p1);
}

void llama_memory_seq_cp(llama_memory_t mem, llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0,
                         llama_pos p1) {
    if (valid(seq_id_src, __func__) && valid(seq_id_dst, __func__)) {
        llama_upstream_memory_seq_cp(mem, seq_id_src, seq_id_dst, p0, p1);
    }
}

void llama_memory_seq_keep(llama_memory_t mem, llama_seq_id seq_id) {
    if (valid(seq_id, __func__)) {
        llama_upstream_memory_seq_keep(mem, seq_id);
    }
}

void llama_memory_seq_add(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1, llama_pos delta) {
    if (valid(seq_id, __func__)) {
        llama_upstream_memory_seq_add(mem, seq_id, p0, p1, delta);
    }
}

void llama_memory_seq_div(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1, int d) {
    if (valid(seq_id, __func__)) {
        llama_upstream_memory_seq_div(mem, seq_id, p0, p1, d);
    }
}

llama_pos llama_memory_seq_pos_min(llama_memory_t mem, llama_seq_id seq_id) {
    return valid(seq_id, __func__) ? llama_upstream_memory_seq_pos_min(mem, seq_id) : -1;
}

llama_pos llama_memory_seq_pos_max(llama_memory_t mem, llama_seq_id seq_id) {
    return valid(seq_id, __func__) ? llama_upstream_memory_seq_pos_max(mem, seq_id) : -1;
}
