#pragma once

// What the drop-in's two hybrids (llama-memory-hybrid.cpp, llama-memory-hybrid-iswa.cpp) do the
// same way over the library's hybrid `mem` (nullptr: over their parts, as upstream's): the
// sequence functions, positions, can_shift, the breakdown and the state. `Attn` is the
// attention part's adapter (`llama_kv_cache` or `llama_kv_cache_iswa`); with `pair` the state
// always holds the attention part (the pair drops its base half under PARTIAL_ONLY itself) and
// a failed recurrent restore does not erase it, as upstream's llama_memory_hybrid_iswa.

#include "llama-memory-abi.h"
#include "llama-memory-recurrent.h"

#include <algorithm>
#include <map>

template <typename Attn, bool pair>
struct llama_memory_hybrid_ops {
    Attn & attn;
    llama_memory_recurrent & recr;
    llama_memory_dropin_obj * mem;

    void changed() const { attn.cells_changed(); }

    void clear(bool data) const {
        if (!mem) {
            attn.clear(data);
            recr.clear(data);
            return;
        }
        llama_memory_dropin_clear(mem, data);
        changed();
    }

    bool seq_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1) const {
        if (!mem) {
            // the recurrent part first: it is the one that can refuse, changing nothing
            return recr.seq_rm(seq_id, p0, p1) && attn.seq_rm(seq_id, p0, p1);
        }
        const bool ok = llama_memory_dropin_seq_rm(mem, seq_id, p0, p1);
        changed();
        return ok;
    }

    template <typename F, typename G>
    void both(F on_mem, G on_parts) const {
        if (!mem) {
            on_parts();
            return;
        }
        on_mem();
        changed();
    }

    llama_pos seq_pos_min(llama_seq_id s) const {
        return mem ? llama_memory_dropin_seq_pos_min(mem, s) : std::max(attn.seq_pos_min(s), recr.seq_pos_min(s));
    }

    llama_pos seq_pos_max(llama_seq_id s) const {
        return mem ? llama_memory_dropin_seq_pos_max(mem, s) : std::min(attn.seq_pos_max(s), recr.seq_pos_max(s));
    }

    bool get_can_shift() const {
        return mem ? llama_memory_dropin_can_shift(mem) : attn.get_can_shift();
    }

    std::map<ggml_backend_buffer_type_t, size_t> memory_breakdown() const {
        if (mem) {
            return llama_memory_dropin_breakdown(mem);
        }
        auto mb = attn.memory_breakdown();
        for (const auto & [buft, n] : recr.memory_breakdown()) {
            mb[buft] += n;
        }
        return mb;
    }

    static bool writes_attn(llama_state_seq_flags flags) {
        return pair || (flags & LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY) == 0;
    }

    void state_write(llama_io_write_i & io, llama_seq_id seq_id, llama_state_seq_flags flags) const {
        if (!mem) {
            if (writes_attn(flags)) {
                attn.state_write(io, seq_id, flags);
            }
            recr.state_write(io, seq_id, flags);
            return;
        }
        llama_memory_dropin_writer w{ io };
        const llama_memory_io_write cb = w.callbacks();
        if (llama_memory_state_write_io(mem, seq_id, flags, &cb) != LLAMA_MEMORY_OK) {
            llama_memory_dropin_throw("failed to write the hybrid memory state");
        }
    }

    void state_read(llama_io_read_i & io, llama_seq_id seq_id, llama_state_seq_flags flags) const {
        // ON_DEVICE: the tensor bytes come from the reader's device stash, which only the parts'
        // own readers reach (llama-state.cpp checked the whole input before this restore)
        if (!mem || (flags & LLAMA_STATE_SEQ_FLAGS_ON_DEVICE) != 0) {
            const bool read_attn = writes_attn(flags);
            if (read_attn) {
                attn.state_read(io, seq_id, flags);
            }
            try {
                recr.state_read(io, seq_id, flags);
            } catch (...) {
                if constexpr (!pair) {
                    if (read_attn) {
                        // upstream's hybrid undoes its restored attention part
                        attn.state_clear(seq_id);
                    }
                }
                throw;
            }
            return;
        }
        // the hybrid reads the whole input and checks both parts before it changes either
        llama_memory_dropin_reader r{ io };
        const llama_memory_io_read cb = r.callbacks();
        const bool ok = llama_memory_state_read_io(mem, seq_id, flags, &cb) == LLAMA_MEMORY_OK;
        changed();
        if (!ok) {
            llama_memory_dropin_read_failed(mem, r.error, /* kv = */ true);
        }
    }
};
