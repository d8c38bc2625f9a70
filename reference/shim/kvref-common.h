// Helpers shared by the shim's translation units (kvref.cpp, rsref.cpp, cmpref.cpp): process-wide
// setup, the model cache, the ubatch view, the host byte-buffer IO and the borrowed part views.
// Internal to libkvref.so.
#ifndef KVREF_COMMON_H
#define KVREF_COMMON_H

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "ggml.h"
#include "ggml-backend.h"
#include "llama.h"

#include "llama-batch.h"
#include "llama-io.h"
#include "llama-model.h"

#include "kvref.h"
#include "rsref.h"

class llama_kv_cache;
class llama_memory_recurrent;

namespace kvref_shim {

// ---------------------------------------------------------------------------------------------
// borrowed views (cmpref.cpp): a kvref / rsref over a cache or recurrent memory that something
// else owns (a part of a stock composite memory). Every kvref_* / rsref_* function accepts them;
// they are destroyed with the view_free functions below, never with kvref_free / rsref_free.
// Defined in kvref.cpp and rsref.cpp, which know the structs.

kvref * kv_view_new(llama_model * model, llama_kv_cache * kv);
void    kv_view_free(kvref * r);
rsref * rs_view_new(llama_model * model, llama_memory_recurrent * mem);
void    rs_view_free(rsref * r);


// ---------------------------------------------------------------------------------------------
// process-wide setup

inline bool g_silent = false;

inline void quiet_log(ggml_log_level level, const char * text, void * /*user*/) {
    // errors still reach stderr: a failing stock call should explain itself in test output,
    // unless KVREF_QUIET=1 (random traces hit expected failures, e.g. an oversized ubatch)
    if (level == GGML_LOG_LEVEL_ERROR && !g_silent) {
        fputs(text, stderr);
    }
}

// The shim's own error messages (caught exceptions) follow the same rule as llama.cpp's.
inline void log_error(const char * fn, const char * what) {
    if (!g_silent) {
        fprintf(stderr, "%s: %s\n", fn, what);
    }
}

inline void init_once() {
    static std::once_flag once;
    std::call_once(once, [] {
        // KVREF_VERBOSE=1 keeps llama.cpp's own logging, useful when a stock call misbehaves
        const char * verbose = getenv("KVREF_VERBOSE");
        const char * quiet = getenv("KVREF_QUIET");
        g_silent = quiet && atoi(quiet) != 0;
        if (!verbose || atoi(verbose) == 0) {
            llama_log_set(quiet_log, nullptr);
        }
        llama_backend_init();
    });
}

// Models are never freed: tests create many caches over the same file, and reloading it each
// time would dominate their run time.
inline llama_model * load_model(const char * path) {
    static std::mutex mtx;
    static std::map<std::string, llama_model *> models;

    std::lock_guard<std::mutex> lock(mtx);
    auto it = models.find(path);
    if (it != models.end()) {
        return it->second;
    }

    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;

    llama_model * model = llama_model_load_from_file(path, mp);
    if (model) {
        models.emplace(path, model);
    }
    return model;
}

// A non-owning llama_ubatch over the caller's arrays. The kv cache reads token, pos,
// n_seq_id, seq_id, seq_id_unq, the counts, equal_seqs and (through is_mixed) type; seq_idx,
// output and embd are only used by the graph/output code, so they stay null.
inline llama_ubatch to_ubatch(const kvref_ubatch * u) {
    llama_ubatch ub{};
    ub.b_equal_seqs = u->equal_seqs ? 1 : 0;
    ub.n_tokens     = u->n_tokens;
    ub.n_seq_tokens = u->n_seq_tokens;
    ub.n_seqs       = u->n_seqs;
    ub.n_seqs_unq   = u->n_seqs_unq;
    ub.n_pos        = u->n_pos;
    ub.token        = const_cast<llama_token *>(u->token);
    ub.embd         = nullptr;
    ub.pos          = const_cast<llama_pos *>(u->pos);
    ub.n_seq_id     = const_cast<int32_t *>(u->n_seq_id);
    ub.seq_id       = const_cast<llama_seq_id **>(u->seq_id);
    ub.seq_id_unq   = const_cast<llama_seq_id *>(u->seq_id_unq);
    ub.seq_idx      = nullptr;
    ub.output       = nullptr;
    ub.type         = nullptr;
    ub.decision_order = nullptr;
    return ub;
}

// Host byte-buffer IO in the manner of llama_context's llama_io_{write,read}_host, whose
// behaviour a state_seq_{get,set}_data call shows: tensor bytes are fetched as they come and
// a failed read drops the tensor uploads it has not applied yet.
class io_write_buf : public llama_io_write_i {
public:
    io_write_buf(uint8_t * p, size_t cap) : ptr(p), cap(cap) {}

    void write(const void * src, size_t size) override {
        if (ptr) {
            if (size > cap - n) {
                throw std::runtime_error("unexpectedly reached end of buffer");
            }
            memcpy(ptr + n, src, size);
        }
        n += size;
    }

    void write_tensor(ggml_tensor * tensor, size_t offset, size_t size) override {
        if (ptr) {
            if (size > cap - n) {
                throw std::runtime_error("unexpectedly reached end of buffer");
            }
            ggml_backend_tensor_get(tensor, ptr + n, offset, size);
        }
        n += size;
    }

    size_t n_bytes() override { return n; }

private:
    uint8_t * ptr; // null: count only
    size_t cap;
    size_t n = 0;
};

class io_read_buf : public llama_io_read_i {
public:
    io_read_buf(const uint8_t * p, size_t size) : ptr(p), size(size) {}

    ~io_read_buf() override {
        for (const auto & u : uploads) {
            ggml_backend_tensor_set(u.tensor, u.src, u.offset, u.size);
        }
    }

    void read(void * dst, size_t sz) override {
        if (sz > size - n) {
            throw std::runtime_error("unexpectedly reached end of buffer");
        }
        memcpy(dst, ptr + n, sz);
        n += sz;
    }

    void read_tensor(ggml_tensor * tensor, size_t offset, size_t sz) override {
        if (sz > size - n) {
            throw std::runtime_error("unexpectedly reached end of buffer");
        }
        uploads.push_back({tensor, ptr + n, offset, sz});
        n += sz;
    }

    void discard() override { uploads.clear(); }

    size_t n_bytes() override { return n; }

private:
    struct upload {
        ggml_tensor * tensor;
        const uint8_t * src;
        size_t offset;
        size_t size;
    };

    const uint8_t * ptr;
    size_t size;
    size_t n = 0;
    std::vector<upload> uploads;
};

} // namespace kvref_shim

#endif // KVREF_COMMON_H
