// Output helpers shared by the C++ drop-in harnesses that run two contexts (mtp.cpp,
// assistant.cpp): the memory's log lines, logits as exact hex, state blobs and position
// ranges, written in order to `g_out` so that compare.cmake can compare two runs byte for byte.
#pragma once

#include "llama.h"
#include "log_lines.h"

#include <cctype>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

inline FILE * g_out = nullptr;

// The memory's lines and the graph sizes, one per output line; a pointer a line prints (a
// shared layer's tensor data) is replaced by "0x?", since it differs from run to run.
inline void log_cb(ggml_log_level level, const char * text, void * /*user*/) {
    std::string line;
    if (whole_log_line(text, line) &&
        mentions_any(line, {"llama_kv_cache", "llama_memory", "state_", "KV buffer", "graph:", "n_ctx"})) {
        std::string esc;
        for (size_t i = 0; i < line.size(); ++i) {
            const char c = line[i];
            if (c == '0' && i + 1 < line.size() && line[i + 1] == 'x') {
                esc += "0x?";
                for (i += 2; i < line.size() && isxdigit((unsigned char) line[i]); ++i) {
                }
                --i;
                continue;
            }
            esc += c == '\n' ? std::string("\\n") : std::string(1, c);
        }
        fprintf(g_out, "log %d %s\n", (int) level, esc.c_str());
    }
}

// Opens the output file and sends llama.cpp's log to log_cb; false (with a message naming
// `prog`) when the file cannot be written.
inline bool open_out(const char * path, const char * prog) {
    g_out = fopen(path, "w");
    if (!g_out) {
        fprintf(stderr, "%s: cannot write %s\n", prog, path);
        return false;
    }
    llama_log_set(log_cb, nullptr);
    llama_backend_init();
    return true;
}

inline void put_floats(const char * what, const float * v, size_t n) {
    fprintf(g_out, "%s", what);
    for (size_t i = 0; i < n; ++i) {
        uint32_t u;
        memcpy(&u, &v[i], 4);
        fprintf(g_out, " %08x", u);
    }
    fprintf(g_out, "\n");
}

inline void put_blob(const char * what, const std::vector<uint8_t> & b) {
    fprintf(g_out, "blob %s %zu", what, b.size());
    for (uint8_t x : b) {
        fprintf(g_out, "%02x", x);
    }
    fprintf(g_out, "\n");
}

// seq_pos_min/max of sequences 0 and 1
inline void put_ranges(llama_context * ctx, const char * what) {
    llama_memory_t mem = llama_get_memory(ctx);
    fprintf(g_out, "ranges %s", what);
    for (llama_seq_id s = 0; s < 2; ++s) {
        fprintf(g_out, " %d:[%d,%d]", s, llama_memory_seq_pos_min(mem, s), llama_memory_seq_pos_max(mem, s));
    }
    fprintf(g_out, "\n");
}

// decodes tokens at p0.. of seq in the target, every output on
inline int decode_target(llama_context * ctx, llama_seq_id seq, llama_pos p0, const std::vector<llama_token> & toks) {
    llama_batch b = llama_batch_init((int32_t) toks.size(), 0, 1);
    for (size_t i = 0; i < toks.size(); ++i) {
        b.token[i]     = toks[i];
        b.pos[i]       = p0 + (llama_pos) i;
        b.n_seq_id[i]  = 1;
        b.seq_id[i][0] = seq;
        b.logits[i]    = 1;
    }
    b.n_tokens = (int32_t) toks.size();
    const int rc = llama_decode(ctx, b);
    llama_batch_free(b);
    return rc;
}
