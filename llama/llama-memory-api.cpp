// llama.h's sequence functions, owned by the drop-in (llama-dropin-state.h renames upstream's).
// A sequence id outside [0, LLAMA_MAX_SEQ) (deepseek4's memory: [0, n_seq_max)) belongs to no memory: the leaf memories refuse it
// themselves, but a composite can index a per-sequence table with it first (hybrid-idx's
// k-pool bookkeeping: stock aborts there). Such an id gets the function's failure value (false,
// nothing done, -1) and an error line; seq_rm keeps llama.h's "any sequence" for a negative id.
// Everything else is upstream's function, unchanged.
#define LLAMA_DROPIN_STATE_DECLARATIONS_ONLY
#include "llama-dropin-state.h"

#include "llama-cparams.h"
#include "llama-impl.h"
#include "llama-kv-cache-dsv4.h"
#include "llama-kv-cache-iswa.h"

int32_t llama_dropin_seq_limit(llama_memory_t mem) {
    if (const auto * dsv4 = dynamic_cast<const llama_kv_cache_dsv4 *>(mem)) {
        return (int32_t) dsv4->get_raw()->get_swa()->get_n_stream();
    }
    return LLAMA_MAX_SEQ;
}

namespace {

bool valid(llama_memory_t mem, llama_seq_id seq_id, const char * fn) {
    const int32_t limit = mem ? llama_dropin_seq_limit(mem) : LLAMA_MAX_SEQ;
    if (seq_id >= 0 && seq_id < limit) {
        return true;
    }
    LLAMA_LOG_ERROR("%s: invalid seq_id %d (not in [0, %d))\n", fn, seq_id, limit);
    return false;
}

} // namespace

bool llama_memory_seq_rm(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    if (seq_id >= 0 && !valid(mem, seq_id, __func__)) {
        return false;
    }
    return llama_upstream_memory_seq_rm(mem, seq_id, p0, p1);
}

void llama_memory_seq_cp(llama_memory_t mem, llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0,
                         llama_pos p1) {
    if (!valid(mem, seq_id_src, __func__) || !valid(mem, seq_id_dst, __func__)) {
        return;
    }
    // (deepseek4's memory asserts on a part of a sequence: stock aborts)
    if (mem && dynamic_cast<const llama_kv_cache_dsv4 *>(mem) && !(p0 <= 0 && p1 < 0)) {
        LLAMA_LOG_ERROR("%s: this memory copies whole sequences only (p0 <= 0, p1 < 0; got [%d, %d))\n", __func__, p0, p1);
        return;
    }
    llama_upstream_memory_seq_cp(mem, seq_id_src, seq_id_dst, p0, p1);
}

void llama_memory_seq_keep(llama_memory_t mem, llama_seq_id seq_id) {
    if (valid(mem, seq_id, __func__)) {
        llama_upstream_memory_seq_keep(mem, seq_id);
    }
}

void llama_memory_seq_add(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1, llama_pos delta) {
    if (valid(mem, seq_id, __func__)) {
        llama_upstream_memory_seq_add(mem, seq_id, p0, p1, delta);
    }
}

void llama_memory_seq_div(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1, int d) {
    if (valid(mem, seq_id, __func__)) {
        llama_upstream_memory_seq_div(mem, seq_id, p0, p1, d);
    }
}

llama_pos llama_memory_seq_pos_min(llama_memory_t mem, llama_seq_id seq_id) {
    return valid(mem, seq_id, __func__) ? llama_upstream_memory_seq_pos_min(mem, seq_id) : -1;
}

llama_pos llama_memory_seq_pos_max(llama_memory_t mem, llama_seq_id seq_id) {
    return valid(mem, seq_id, __func__) ? llama_upstream_memory_seq_pos_max(mem, seq_id) : -1;
}
