#pragma once

// llama.h's state entry points are the drop-in's own (llama-state.cpp): they validate the whole
// input before the first change, and catch every exception at the C boundary. Upstream's
// definitions stay compiled, under other names, for what ours hand on once an input is valid.
//
// The staging inserts `#include "llama-dropin-state.h"` into upstream's llama-context.cpp after
// its last include of llama.h, so llama.h's declarations keep their names and C linkage while
// the definitions below them take the `llama_upstream_` names: C++ functions, declared here
// with hidden visibility, so libllama exports exactly stock's C symbols. (A rename by compile
// definition would rename llama.h's declarations too, and export the new names.)

#include "llama.h"

#define LLAMA_DROPIN_HIDDEN __attribute__((visibility("hidden")))

// llama-state.cpp includes this file for the declarations only.
#ifndef LLAMA_DROPIN_STATE_DECLARATIONS_ONLY
#define llama_state_get_size          llama_upstream_state_get_size
#define llama_get_state_size          llama_upstream_get_state_size
#define llama_state_get_data          llama_upstream_state_get_data
#define llama_copy_state_data         llama_upstream_copy_state_data
#define llama_state_set_data          llama_upstream_state_set_data
#define llama_set_state_data          llama_upstream_set_state_data
#define llama_state_load_file         llama_upstream_state_load_file
#define llama_load_session_file       llama_upstream_load_session_file
#define llama_state_save_file         llama_upstream_state_save_file
#define llama_save_session_file       llama_upstream_save_session_file
#define llama_state_seq_get_size      llama_upstream_state_seq_get_size
#define llama_state_seq_get_data      llama_upstream_state_seq_get_data
#define llama_state_seq_set_data      llama_upstream_state_seq_set_data
#define llama_state_seq_save_file     llama_upstream_state_seq_save_file
#define llama_state_seq_load_file     llama_upstream_state_seq_load_file
#define llama_state_seq_get_size_ext  llama_upstream_state_seq_get_size_ext
#define llama_state_seq_get_data_ext  llama_upstream_state_seq_get_data_ext
#define llama_state_seq_set_data_ext  llama_upstream_state_seq_set_data_ext
// the sequence functions: ours refuse ids no memory has before a composite indexes its own
// per-sequence tables with them (llama-memory-api.cpp)
#define llama_memory_seq_rm           llama_upstream_memory_seq_rm
#define llama_memory_seq_cp           llama_upstream_memory_seq_cp
#define llama_memory_seq_keep         llama_upstream_memory_seq_keep
#define llama_memory_seq_add          llama_upstream_memory_seq_add
#define llama_memory_seq_div          llama_upstream_memory_seq_div
#define llama_memory_seq_pos_min      llama_upstream_memory_seq_pos_min
#define llama_memory_seq_pos_max      llama_upstream_memory_seq_pos_max
#endif

// The sequence ids a memory has: [0, LLAMA_MAX_SEQ), or [0, n_seq_max) for a memory with a
// stream per sequence whatever kv_unified says (deepseek4's, whose composite indexes its
// streams with the id unchecked: stock aborts there). llama-memory-api.cpp.
LLAMA_DROPIN_HIDDEN int32_t llama_dropin_seq_limit(llama_memory_t mem);

LLAMA_DROPIN_HIDDEN size_t llama_upstream_state_get_size(llama_context * ctx);
LLAMA_DROPIN_HIDDEN size_t llama_upstream_get_state_size(llama_context * ctx);
LLAMA_DROPIN_HIDDEN size_t llama_upstream_state_get_data(llama_context * ctx, uint8_t * dst, size_t size);
LLAMA_DROPIN_HIDDEN size_t llama_upstream_copy_state_data(llama_context * ctx, uint8_t * dst);
LLAMA_DROPIN_HIDDEN size_t llama_upstream_state_set_data(llama_context * ctx, const uint8_t * src, size_t size);
LLAMA_DROPIN_HIDDEN size_t llama_upstream_set_state_data(llama_context * ctx, const uint8_t * src);
LLAMA_DROPIN_HIDDEN bool llama_upstream_state_load_file(
        llama_context * ctx, const char * path, llama_token * tokens_out, size_t n_token_capacity, size_t * n_token_count_out);
LLAMA_DROPIN_HIDDEN bool llama_upstream_load_session_file(
        llama_context * ctx, const char * path, llama_token * tokens_out, size_t n_token_capacity, size_t * n_token_count_out);
LLAMA_DROPIN_HIDDEN bool llama_upstream_state_save_file(
        llama_context * ctx, const char * path, const llama_token * tokens, size_t n_token_count);
LLAMA_DROPIN_HIDDEN bool llama_upstream_save_session_file(
        llama_context * ctx, const char * path, const llama_token * tokens, size_t n_token_count);
LLAMA_DROPIN_HIDDEN size_t llama_upstream_state_seq_get_size(llama_context * ctx, llama_seq_id seq_id);
LLAMA_DROPIN_HIDDEN size_t llama_upstream_state_seq_get_data(llama_context * ctx, uint8_t * dst, size_t size, llama_seq_id seq_id);
LLAMA_DROPIN_HIDDEN size_t llama_upstream_state_seq_set_data(
        llama_context * ctx, const uint8_t * src, size_t size, llama_seq_id dest_seq_id);
LLAMA_DROPIN_HIDDEN size_t llama_upstream_state_seq_save_file(
        llama_context * ctx, const char * path, llama_seq_id seq_id, const llama_token * tokens, size_t n_token_count);
LLAMA_DROPIN_HIDDEN size_t llama_upstream_state_seq_load_file(
        llama_context * ctx, const char * path, llama_seq_id dest_seq_id, llama_token * tokens_out,
        size_t n_token_capacity, size_t * n_token_count_out);
LLAMA_DROPIN_HIDDEN size_t llama_upstream_state_seq_get_size_ext(
        llama_context * ctx, llama_seq_id seq_id, llama_state_seq_flags flags);
LLAMA_DROPIN_HIDDEN size_t llama_upstream_state_seq_get_data_ext(
        llama_context * ctx, uint8_t * dst, size_t size, llama_seq_id seq_id, llama_state_seq_flags flags);
LLAMA_DROPIN_HIDDEN size_t llama_upstream_state_seq_set_data_ext(
        llama_context * ctx, const uint8_t * src, size_t size, llama_seq_id dest_seq_id, llama_state_seq_flags flags);
LLAMA_DROPIN_HIDDEN bool llama_upstream_memory_seq_rm(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1);
LLAMA_DROPIN_HIDDEN void llama_upstream_memory_seq_cp(
        llama_memory_t mem, llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1);
LLAMA_DROPIN_HIDDEN void llama_upstream_memory_seq_keep(llama_memory_t mem, llama_seq_id seq_id);
LLAMA_DROPIN_HIDDEN void llama_upstream_memory_seq_add(
        llama_memory_t mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1, llama_pos delta);
LLAMA_DROPIN_HIDDEN void llama_upstream_memory_seq_div(
        llama_memory_t mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1, int d);
LLAMA_DROPIN_HIDDEN llama_pos llama_upstream_memory_seq_pos_min(llama_memory_t mem, llama_seq_id seq_id);
LLAMA_DROPIN_HIDDEN llama_pos llama_upstream_memory_seq_pos_max(llama_memory_t mem, llama_seq_id seq_id);
