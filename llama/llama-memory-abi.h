#pragma once

// This library's C ABI as the drop-in adapters see it. Included by llama/*.cpp only.
//
// Inside libllama, llama.h's `llama_memory_t` is `llama_memory_i *`, libllama's own abstract
// class. Our handles are not that class, so they get a type of their own here
// (`llama_memory_dropin_t`), and llama.h's nine `llama_memory_*` names, which libllama
// exports itself, are ours as `llama_memory_dropin_*` (the library is built with the cargo
// feature `dropin`, which leaves llama.h's names out).

#define LLAMA_MEMORY_DROPIN
#define llama_memory_i llama_memory_dropin_obj
#define llama_memory_t llama_memory_dropin_t
#include <llama_memory/llama-memory.h>
#undef llama_memory_t
#undef llama_memory_i

#include <stdexcept>
#include <string>

// Throws the library's last error as std::runtime_error, as llama.cpp's memories throw:
// llama_context catches it at the llama.h boundary.
[[noreturn]] inline void llama_memory_dropin_throw(const char * what) {
    const char * msg = llama_memory_last_error();
    throw std::runtime_error(std::string(what) + ": " + (msg && *msg ? msg : "unknown error"));
}

#include "llama-batch.h"
#include "llama-impl.h"
#include "llama-io.h"

#include <cstdint>
#include <exception>
#include <map>
#include <vector>

// llama_memory_i::memory_breakdown through the library's llama_memory_get_breakdown.
inline std::map<ggml_backend_buffer_type_t, size_t> llama_memory_dropin_breakdown(llama_memory_dropin_t mem) {
    std::map<ggml_backend_buffer_type_t, size_t> ret;
    const size_t n = llama_memory_get_breakdown(mem, nullptr, nullptr, 0);
    std::vector<ggml_backend_buffer_type_t> bufts(n);
    std::vector<size_t> sizes(n);
    const size_t got = llama_memory_get_breakdown(mem, bufts.data(), sizes.data(), n);
    for (size_t i = 0; i < got && i < n; ++i) {
        ret[bufts[i]] += sizes[i];
    }
    return ret;
}

// The part of llama_memory_i every adapter implements the same way, over its library handle
// `mem`: clear, the sequence functions, seq_pos_min/max and memory_breakdown (the library
// gives each its llama.h semantics). An adapter whose cells are another cache's (`shared()`,
// upstream's [TAG_KV_CACHE_SHARE_CELLS]) changes none of them: its sequence functions are
// upstream's no-ops, its positions the other cache's, its clear `shared_clear()`, and it has
// no buffer of its own.
#define LLAMA_MEMORY_DROPIN_FORWARDERS(cls)                                                         \
    void cls::clear(bool data) {                                                                    \
        if (shared()) {                                                                             \
            shared_clear();                                                                         \
            return;                                                                                 \
        }                                                                                           \
        llama_memory_dropin_clear(mem, data);                                                       \
        changed();                                                                                  \
    }                                                                                               \
    bool cls::seq_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1) {                            \
        if (shared()) {                                                                             \
            return true;                                                                            \
        }                                                                                           \
        const bool ok = llama_memory_dropin_seq_rm(mem, seq_id, p0, p1);                            \
        changed();                                                                                  \
        return ok;                                                                                  \
    }                                                                                               \
    void cls::seq_cp(llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1) { \
        if (!shared()) {                                                                            \
            llama_memory_dropin_seq_cp(mem, seq_id_src, seq_id_dst, p0, p1);                        \
            changed();                                                                              \
        }                                                                                           \
    }                                                                                               \
    void cls::seq_keep(llama_seq_id seq_id) {                                                       \
        if (!shared()) {                                                                            \
            llama_memory_dropin_seq_keep(mem, seq_id);                                              \
            changed();                                                                              \
        }                                                                                           \
    }                                                                                               \
    void cls::seq_add(llama_seq_id seq_id, llama_pos p0, llama_pos p1, llama_pos shift) {           \
        if (!shared()) {                                                                            \
            llama_memory_dropin_seq_add(mem, seq_id, p0, p1, shift);                                \
            changed();                                                                              \
        }                                                                                           \
    }                                                                                               \
    void cls::seq_div(llama_seq_id seq_id, llama_pos p0, llama_pos p1, int d) {                     \
        if (!shared()) {                                                                            \
            llama_memory_dropin_seq_div(mem, seq_id, p0, p1, d);                                    \
            changed();                                                                              \
        }                                                                                           \
    }                                                                                               \
    llama_pos cls::seq_pos_min(llama_seq_id seq_id) const {                                         \
        return llama_memory_dropin_seq_pos_min(cells_mem(), seq_id);                                \
    }                                                                                               \
    llama_pos cls::seq_pos_max(llama_seq_id seq_id) const {                                         \
        return llama_memory_dropin_seq_pos_max(cells_mem(), seq_id);                                \
    }                                                                                               \
    std::map<ggml_backend_buffer_type_t, size_t> cls::memory_breakdown() const {                    \
        if (shared()) {                                                                             \
            return {};                                                                              \
        }                                                                                           \
        return llama_memory_dropin_breakdown(mem);                                                  \
    }

// The library's log lines (llama.cpp's own lines of these memories, with their levels) into
// llama.cpp's logger; set on every memory the adapters create.
// While a thread's `llama_memory_dropin_log_capture` is set (llama-state.cpp's dry runs of a
// restore), its lines are held there instead: printed only if the input turns out invalid.
struct llama_memory_dropin_log_line {
    int32_t     level;
    std::string text;
};
// (hidden: a global variable's name is not mangled, and libllama exports only stock's C names;
// defined in llama-state.cpp, not inline: an inline one is a GNU "unique" symbol, which the
// static drop-in's merge cannot make local)
extern __attribute__((visibility("hidden"))) thread_local std::vector<llama_memory_dropin_log_line> *
    llama_memory_dropin_log_capture;

inline void llama_memory_dropin_log(int32_t level, const char * text, void * user) {
    (void) user;
    if (llama_memory_dropin_log_capture) {
        llama_memory_dropin_log_capture->push_back({ level, text });
        return;
    }
    llama_log_internal((ggml_log_level) level, "%s", text);
}

// After a failed restore, the error llama.cpp reports for it: the reader's own when the input
// ended before the tensor data (`io_error`), "n_stream mismatch" for a KV state of another
// stream count, and "failed to restore kv cache" for everything else (every failure in the
// data included), as upstream's state_read; the library already gave the failure stock's
// effect on the memory (stock-compatible mode).
inline std::exception_ptr llama_memory_dropin_read_error(
        llama_memory_dropin_t mem, const std::exception_ptr & io_error, bool kv) {
    const int32_t stage = llama_memory_state_read_stage(mem);
    if (io_error && stage != LLAMA_MEMORY_READ_DATA) {
        return io_error;
    }
    if (kv && stage == LLAMA_MEMORY_READ_HEADER) {
        return std::make_exception_ptr(std::runtime_error("n_stream mismatch"));
    }
    return std::make_exception_ptr(std::runtime_error("failed to restore kv cache"));
}

[[noreturn]] inline void llama_memory_dropin_read_failed(
        llama_memory_dropin_t mem, const std::exception_ptr & io_error, bool kv) {
    std::rethrow_exception(llama_memory_dropin_read_error(mem, io_error, kv));
}

// The library's view of a llama_ubatch: the same arrays, borrowed (no token data copied).
inline llama_memory_ubatch llama_memory_dropin_ubatch(const llama_ubatch & ub) {
    llama_memory_ubatch out = {};
    out.n_tokens     = ub.n_tokens;
    out.n_seq_tokens = ub.n_seq_tokens;
    out.n_seqs       = ub.n_seqs;
    out.n_seqs_unq   = ub.n_seqs_unq;
    out.n_pos        = ub.n_pos;
    out.equal_seqs   = ub.b_equal_seqs;
    out.token        = ub.token;
    out.pos          = ub.pos;
    out.n_seq_id     = ub.n_seq_id;
    out.seq_id       = ub.seq_id;
    out.seq_id_unq   = ub.seq_id_unq;
    out.seq_idx      = ub.seq_idx;
    out.output       = ub.output;
    out.type_        = ub.type; // a mixed ubatch's row kinds (NULL otherwise)
    return out;
}

// llama.cpp's io objects behind the library's io callbacks. An exception (the io ran out of
// input, a file error) becomes a non-zero return: it never unwinds through the library.
struct llama_memory_dropin_writer {
    llama_io_write_i & io;

    static int write(void * user, const void * src, size_t n) {
        try {
            static_cast<llama_memory_dropin_writer *>(user)->io.write(src, n);
            return 0;
        } catch (...) {
            return -1;
        }
    }

    static int write_tensor(void * user, ggml_tensor * t, size_t offset, size_t n) {
        try {
            static_cast<llama_memory_dropin_writer *>(user)->io.write_tensor(t, offset, n);
            return 0;
        } catch (...) {
            return -1;
        }
    }

    llama_memory_io_write callbacks() {
        return llama_memory_io_write{ this, &write, &write_tensor };
    }
};

struct llama_memory_dropin_reader {
    llama_io_read_i & io;
    std::exception_ptr error;     // what the io threw, rethrown by the adapter

    static int read(void * user, void * dst, size_t n) {
        auto * self = static_cast<llama_memory_dropin_reader *>(user);
        try {
            self->io.read(dst, n);
            return 0;
        } catch (...) {
            self->error = std::current_exception();
            return -1;
        }
    }

    static int read_tensor(void * user, ggml_tensor * t, size_t offset, size_t n) {
        auto * self = static_cast<llama_memory_dropin_reader *>(user);
        try {
            self->io.read_tensor(t, offset, n);
            return 0;
        } catch (...) {
            self->error = std::current_exception();
            return -1;
        }
    }

    llama_memory_io_read callbacks() {
        return llama_memory_io_read{ this, &read, &read_tensor };
    }
};
