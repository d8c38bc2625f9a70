/*
 * kvref: a thin C interface over the *stock* llama_kv_cache of the pinned llama.cpp.
 *
 * It exists only for tests and benchmarks: the differential suite drives the stock cache and
 * llama-memory with the same operations and compares the results. Every function forwards to
 * the pinned llama.cpp's own code; nothing here reimplements cache behaviour.
 *
 * Two objects are offered: kvref, a standalone stock llama_kv_cache driven operation by
 * operation, and kvref_ctx, a stock llama_context used only through the public llama.h API
 * (decode, logits, sequence/whole state save and restore), for compatibility tests of state
 * blobs and files.
 *
 * Environment: KVREF_VERBOSE=1 keeps all of llama.cpp's logging; KVREF_QUIET=1 drops even its
 * error messages (the differential traces hit expected failures).
 *
 * The shim is a shared library that links llama.cpp and ggml statically and is loaded with
 * dlopen(RTLD_LOCAL), so its ggml never meets the ggml that llama-memory links.
 */
#ifndef KVREF_H
#define KVREF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KVREF_MAX_SEQ 256

/* Same layout and meaning as the pointer fields of llama.cpp's llama_ubatch (llama-batch.h). */
typedef struct kvref_ubatch {
    uint32_t n_tokens;      /* total tokens (n_seq_tokens * n_seqs) */
    uint32_t n_seq_tokens;  /* tokens per sequence set */
    uint32_t n_seqs;        /* sequence sets in the ubatch */
    uint32_t n_seqs_unq;    /* unique sequence ids in the ubatch */
    uint32_t n_pos;         /* position sections per token (1, or 4 for M-RoPE) */
    uint32_t equal_seqs;    /* 0/1 */
    const int32_t *token;          /* [n_tokens] or NULL (embeddings) */
    const int32_t *pos;            /* [n_tokens * n_pos], section-major */
    const int32_t *n_seq_id;       /* [n_tokens] */
    const int32_t *const *seq_id;  /* [n_tokens] -> [n_seq_id[i]] */
    const int32_t *seq_id_unq;     /* [n_seqs_unq], ascending */
} kvref_ubatch;

/* Where a ubatch goes: token k*n_per_stream + i -> cell idxs[k*n_per_stream + i] of stream strm[k]. */
typedef struct kvref_slot {
    uint32_t s0;
    uint32_t s1;
    uint32_t n_stream;       /* 0 means "no slot" (find_slot failed) */
    uint32_t n_per_stream;
    int32_t strm[KVREF_MAX_SEQ];
    uint32_t *idxs;          /* caller-owned, capacity given by idxs_cap (elements); a slot that
                                does not fit (n_tokens > idxs_cap) is reported as "no slot" */
    uint32_t idxs_cap;
} kvref_slot;

typedef struct kvref_params {
    uint32_t kv_size;        /* cells per stream */
    uint32_t n_seq_max;
    bool unified;
    uint32_t n_swa;
    int32_t swa_type;        /* llama_swa_type: 0 none, 1 standard, 2 chunked, 3 symmetric */
    bool v_trans;
    int32_t type_k;          /* ggml_type */
    int32_t type_v;          /* ggml_type */
    bool use_alibi;          /* overrides hparams.use_alibi */
    bool mrope;              /* rope_type = M-RoPE: n_pos_per_embd 4, cell ext kept */
    uint32_t n_rel_attn_bkts;/* for pos buckets; 0 = leave the model's */
    int32_t non_causal_type; /* llama_non_causal_type override, -1 = leave the model's */
    uint32_t ple_n_heads;    /* hparams.ple_n_heads override (> 0: cells keep token ids, n-gram inputs) */
    uint32_t ple_eos_token_id;   /* hparams.ple_eos_token_id */
    uint32_t ple_image_token_id; /* hparams.ple_image_token_id */
} kvref_params;

typedef struct kvref kvref;

/* sizeof(kvref_ubatch), sizeof(kvref_slot), sizeof(kvref_params), sizeof(kvref_ctx_params) for
 * which = 0, 1, 2, 3 (0 otherwise): lets a binding that mirrors the structs check it was built
 * against this header. */
size_t kvref_sizeof(int32_t which);

/* Fills p with the defaults: 256 cells, 1 seq, unified, no SWA, v_trans, f16/f16, no alibi. */
void kvref_default_params(kvref_params *p);

/* Writes a tiny random-weight `llama` GGUF (2 layers, n_embd 64, 4 heads, 2 KV heads) to path.
 * Returns true on success. Same bytes as kvref_write_model_ex(path, 2, 64, 4, 2). */
bool kvref_write_model(const char *path);

/* Like kvref_write_model, with a chosen shape: head_dim = n_embd / n_head must divide exactly
 * and be even (RoPE), n_head must be a multiple of n_head_kv; n_ff = 2 * n_embd, vocabulary 32,
 * F32 weights from the same fixed seed. Returns true on success (false for an invalid shape). */
bool kvref_write_model_ex(const char *path, uint32_t n_layer, uint32_t n_embd, uint32_t n_head,
                          uint32_t n_head_kv);

/* Sanity check of a model file: loads it (cached like kvref_new), decodes n_tokens tokens of
 * seq 0 with llama_decode on a fresh 256-cell context and checks the last logits are finite.
 * Returns llama_decode's result (0 = success), or -100 load failed, -101 context creation failed,
 * -102 non-finite logits, -103 no logits, -104 unexpected seq_pos_max afterwards. */
int32_t kvref_sanity_decode(const char *model_path, uint32_t n_tokens);

/* Creates a stock llama_kv_cache over the model at model_path (loaded once per path) with
 * the given parameters. NULL on failure. */
kvref *kvref_new(const char *model_path, const kvref_params *p);
void kvref_free(kvref *r);

uint32_t kvref_size(const kvref *r);
uint32_t kvref_n_stream(const kvref *r);
uint32_t kvref_n_embd_v_gqa_max(const kvref *r);

/* llama_memory_i operations, forwarded as they are (stock asserts abort: callers pass valid input). */
void kvref_clear(kvref *r, bool data);
bool kvref_seq_rm(kvref *r, int32_t seq, int32_t p0, int32_t p1);
void kvref_seq_cp(kvref *r, int32_t src, int32_t dst, int32_t p0, int32_t p1);
void kvref_seq_keep(kvref *r, int32_t seq);
void kvref_seq_add(kvref *r, int32_t seq, int32_t p0, int32_t p1, int32_t delta);
void kvref_seq_div(kvref *r, int32_t seq, int32_t p0, int32_t p1, int32_t d);
int32_t kvref_seq_pos_min(const kvref *r, int32_t seq);
int32_t kvref_seq_pos_max(const kvref *r, int32_t seq);
bool kvref_can_shift(const kvref *r);
bool kvref_has_shift(const kvref *r);

/* find_slot(ubatch, cont). Returns true and fills out on success; false (out->n_stream = 0) otherwise. */
bool kvref_find_slot(const kvref *r, const kvref_ubatch *ub, bool cont, kvref_slot *out);
void kvref_apply_ubatch(kvref *r, const kvref_slot *slot, const kvref_ubatch *ub);
/* prepare(ubatches): on success fills slots[0..n) and returns true; the cells are rolled back as stock does. */
bool kvref_prepare(kvref *r, const kvref_ubatch *ubs, uint32_t n, kvref_slot *slots);
uint32_t kvref_get_n_kv(const kvref *r, const kvref_slot *slot);

/* init_update(lctx, false) then apply(): applies pending stream copies and the K-shift.
 * Returns the status of the update context (0 success, 1 no update, 2/3 failures). */
int32_t kvref_update(kvref *r);

/* Cell table of one stream: arrays of kv_size elements (seq: 4 words per cell, bit s of word s/64;
 * ext: x, y, tok per cell). Any pointer may be NULL. */
void kvref_cells(const kvref *r, uint32_t stream, int32_t *pos, int32_t *shift, uint64_t *seq, int32_t *ext);
/* head of the slot search, used cells, used_min, used_max_p1, has_shift of one stream. */
void kvref_stream_info(const kvref *r, uint32_t stream, uint32_t *head, uint32_t *used,
                       uint32_t *used_min, uint32_t *used_max_p1, bool *has_shift);
/* Number of pending stream copies (sc_info). */
uint32_t kvref_pending_copies(const kvref *r);
/* The pending stream copies in the order update() applies them: copy k goes from stream src[k]
 * to stream dst[k], for k < min(n, cap). Returns n, the number of pending copies. */
uint32_t kvref_pending_copy_list(const kvref *r, uint32_t *src, uint32_t *dst, uint32_t cap);

/* Graph inputs, written by the stock set_input_* functions into a host tensor and copied out.
 * kq mask: ne = [n_kv, n_tokens / n_stream_m, 1, n_stream_m], f16 as raw uint16 when f16. */
void kvref_kq_mask(const kvref *r, const kvref_ubatch *ub, bool causal, bool f16, uint32_t n_kv,
                   uint32_t n_stream_m, void *out);
void kvref_k_idxs(const kvref *r, const kvref_ubatch *ub, const kvref_slot *slot, int64_t *out);
/* out: n_tokens elements, or n_tokens * n_embd_v_gqa_max when V is transposed. */
void kvref_v_idxs(const kvref *r, const kvref_ubatch *ub, const kvref_slot *slot, int64_t *out);
/* out: kv_size * n_stream elements. */
void kvref_k_shift(const kvref *r, int32_t *out);
/* out: n_kv * n_tokens elements. */
/* llama_kv_cache::get_prev_tokens(ub, n): out holds ub->n_tokens * n tokens. */
void kvref_get_prev_tokens(const kvref *r, const kvref_ubatch *ub, uint32_t n, int32_t *out);

void kvref_pos_bucket(const kvref *r, const kvref_ubatch *ub, uint32_t n_kv, int32_t *out);

/* The stock graph view get_k (v = false) or get_v (v = true) of layer il over n_kv cells of
 * streams s0..s1, made in a scratch context: its ne, nb and byte offset into the layer tensor
 * (view_offs), and when data != NULL the bytes it sees, gathered row by row (ne[0] elements per
 * row, rows in ne order) into data (cap bytes). Returns the gathered byte count (the count
 * needed when data == NULL or cap is too small), 0 on invalid arguments. */
size_t kvref_view(const kvref *r, bool v, int32_t il, uint32_t n_kv, uint32_t s0, uint32_t s1,
                  int64_t ne[4], size_t nb[4], size_t *offs, uint8_t *data, size_t cap);

/* Raw bytes of the K (v = false) or V (v = true) tensor of layer il, all streams:
 * kvref_tensor_nbytes gives its size (0 for a layer or tensor the cache does not hold),
 * kvref_tensor_get/set copy n bytes at offset out of / into it (false if out of range). */
size_t kvref_tensor_nbytes(const kvref *r, bool v, int32_t il);
bool kvref_tensor_get(const kvref *r, bool v, int32_t il, size_t offset, void *dst, size_t n);
bool kvref_tensor_set(kvref *r, bool v, int32_t il, size_t offset, const void *src, size_t n);

/* state_write(io, seq, flags) into buf (cap bytes). With buf == NULL returns the size only.
 * Returns bytes written, 0 on failure. */
size_t kvref_state_write(const kvref *r, int32_t seq, uint32_t flags, uint8_t *buf, size_t cap);
/* state_read(io, seq, flags) from buf. Returns bytes consumed, 0 on failure (exception caught). */
size_t kvref_state_read(kvref *r, int32_t seq, uint32_t flags, const uint8_t *buf, size_t size);

/* llama_kv_cache::state_read_sinfo: a restore that reports where each stream's cells went
 * (counts_out: n_stream entries, cells_out: their cells stream after stream, size * n_stream
 * room) and, with counts_in (NULL: none) and cells_in, goes to the given cells (a mirrored
 * cache). The bytes read, 0 on a failure (the exception caught). */
size_t kvref_state_read_sinfo(kvref *r, int32_t seq, const uint8_t *buf, size_t size, const uint32_t *counts_in,
                              const uint32_t *cells_in, uint32_t *counts_out, uint32_t *cells_out);
/* state_clear(seq): what a failed restore leaves (-1: clear(true); else seq_rm(seq) and zero the
 * K/V rows of the cells seq held alone). */
void kvref_state_clear(kvref *r, int32_t seq);

/* ---------------------------------------------------------------------------------------------
 * kvref_ctx: a stock llama_context over a model file, driven through the public llama.h API only.
 * Stock assertions abort here too: callers pass valid sequence ids (< n_seq_max) and positions.
 */

typedef struct kvref_ctx_params {
    uint32_t n_ctx;       /* llama_context_params.n_ctx (llama.cpp pads to 256; non-unified: each
                             sequence gets n_ctx / n_seq_max, padded to 256) */
    uint32_t n_batch;     /* n_batch = n_ubatch; 0 = n_ctx */
    uint32_t n_seq_max;
    bool kv_unified;
    bool flash_attn;      /* false -> LLAMA_FLASH_ATTN_TYPE_DISABLED (V transposed), true -> ENABLED */
    int32_t type_k;       /* ggml_type */
    int32_t type_v;       /* ggml_type */
    uint32_t n_rs_seq;    /* llama_context_params.n_rs_seq: recurrent rollback snapshots per seq
                             (llama.cpp clamps it to 0 for archs without rollback, e.g. mamba) */
} kvref_ctx_params;

typedef struct kvref_ctx kvref_ctx;

/* Fills p with the defaults: n_ctx 256, n_batch 0 (= n_ctx), 1 seq, unified, no flash
 * attention, f16/f16, n_rs_seq 0. */
void kvref_ctx_default_params(kvref_ctx_params *p);

/* Creates a llama_context (1 thread, CPU) over the model at model_path, loaded once per path and
 * shared with kvref_new. NULL on failure (model not loadable, context creation failed). */
kvref_ctx *kvref_ctx_new(const char *model_path, const kvref_ctx_params *p);
void kvref_ctx_free(kvref_ctx *c);

/* llama_decode of n tokens of sequence seq at positions pos0, pos0 + 1, ...; logits are requested
 * for the last token only. Returns llama_decode's result (0 success, 1 no KV slot, < 0 error;
 * -1 also when the shim caught an exception). */
int32_t kvref_ctx_decode(kvref_ctx *c, const int32_t *tokens, uint32_t n, int32_t pos0, int32_t seq);
/* Vocabulary size of the context's model (the length of a logits row). */
uint32_t kvref_ctx_n_vocab(const kvref_ctx *c);
/* Copies the last decode's logits (llama_get_logits_ith(ctx, -1)) into out[n_vocab]. False if
 * there are none (no successful decode since creation, or the last decode failed). */
bool kvref_ctx_logits(kvref_ctx *c, float *out);

/* llama_state_seq_get_size_ext(seq, flags) when buf == NULL, else
 * llama_state_seq_get_data_ext(buf, cap, seq, flags). Bytes (to be) written, 0 on failure. */
size_t kvref_ctx_seq_get(kvref_ctx *c, int32_t seq, uint32_t flags, uint8_t *buf, size_t cap);
/* llama_state_seq_set_data_ext(buf, size, dest, flags): bytes read, 0 on failure. */
size_t kvref_ctx_seq_set(kvref_ctx *c, int32_t dest, uint32_t flags, const uint8_t *buf, size_t size);
/* llama_state_seq_save_file: file size written, 0 on failure. */
size_t kvref_ctx_seq_save_file(kvref_ctx *c, const char *path, int32_t seq, const int32_t *tokens, size_t n);
/* llama_state_seq_load_file: bytes of the file consumed, 0 on failure; *n_out receives the
 * token count. tokens_out == NULL only reports the token count (and returns the header size)
 * without loading any state, as in llama.h. */
size_t kvref_ctx_seq_load_file(kvref_ctx *c, const char *path, int32_t dest, int32_t *tokens_out,
                               size_t cap, size_t *n_out);

/* Whole state: llama_state_get_size when buf == NULL, else llama_state_get_data(buf, cap). */
size_t kvref_ctx_state_get(kvref_ctx *c, uint8_t *buf, size_t cap);
/* llama_state_set_data(buf, size): bytes read, 0 on failure. */
size_t kvref_ctx_state_set(kvref_ctx *c, const uint8_t *buf, size_t size);

/* llama_memory_* on llama_get_memory(ctx). */
bool kvref_ctx_seq_rm(kvref_ctx *c, int32_t seq, int32_t p0, int32_t p1);
int32_t kvref_ctx_seq_pos_min(const kvref_ctx *c, int32_t seq);
int32_t kvref_ctx_seq_pos_max(const kvref_ctx *c, int32_t seq);
void kvref_ctx_memory_clear(kvref_ctx *c, bool data);

#ifdef __cplusplus
}
#endif

#endif /* KVREF_H */
