/*
 * rsref: a thin C interface over the *stock* llama_memory_recurrent of the pinned llama.cpp,
 * plus writers of tiny random-weight recurrent (`mamba`), hybrid (`lfm2`, `jamba`), iSWA
 * (`gemma3`) and M-RoPE (`qwen2vl`) models.
 *
 * Test-only, like kvref.h (same library, same logging rules, same model cache): every
 * function forwards to the pinned llama.cpp's own code. Where the stock code would abort
 * (GGML_ASSERT / GGML_ABORT) on an input these functions can recognise cheaply, they return a
 * failure value instead; each such guard is documented below. Everything else is passed
 * through as it is.
 */
#ifndef RSREF_H
#define RSREF_H

#include "kvref.h"

#ifdef __cplusplus
extern "C" {
#endif

/* --------------------------------------------------------------------------------------------
 * Model writers (F32 weights from a fixed-seed xorshift, vocabulary 32, `no_vocab` tokenizer).
 */

/* A `mamba` GGUF: n_layer layers, width n_embd, d_inner = 2*n_embd, d_state 16, d_conv 4,
 * dt_rank 4. ssm_a is negative (-1 - |w|) and ssm_d, norms are 1 so decoding stays finite.
 * n_embd_r = 3*d_inner, n_embd_s = 16*d_inner. Returns true on success. */
bool rsref_write_mamba(const char *path, uint32_t n_layer, uint32_t n_embd);

/* An `lfm2` GGUF: n_layer layers of width n_embd, 4 query heads (n_embd % 8 == 0),
 * n_head_kv[il] KV heads per layer (0 = short-conv, i.e. recurrent, layer; else must divide 4),
 * feed-forward width 2*n_embd, shortconv.l_cache = l_cache (>= 2).
 * n_embd_r = n_embd*(l_cache-1), n_embd_s = 0. Returns true on success. */
bool rsref_write_lfm2(const char *path, uint32_t n_layer, uint32_t n_embd, const uint32_t *n_head_kv,
                      uint32_t l_cache);

/* rsref_write_lfm2 with a sliding window: n_swa > 0 writes lfm2.attention.sliding_window, which
 * makes every attention layer SWA (standard) and the context memory llama_memory_hybrid_iswa;
 * n_swa == 0 is rsref_write_lfm2, byte for byte. */
bool rsref_write_lfm2_ex(const char *path, uint32_t n_layer, uint32_t n_embd, const uint32_t *n_head_kv,
                         uint32_t l_cache, uint32_t n_swa);

/* A `jamba` GGUF (hybrid: llama_memory_hybrid): n_layer layers of width n_embd (a multiple of 4),
 * 4 query heads, n_head_kv[il] KV heads per layer (0 = mamba layer, else must divide 4; attention
 * layers have no RoPE), feed-forward width 2*n_embd (dense, no MoE). Mamba layers as in
 * rsref_write_mamba (d_inner = 2*n_embd, d_state 16, d_conv 4, dt_rank 4) plus unit dt/B/C norms.
 * n_embd_r = 3*d_inner, n_embd_s = 16*d_inner. Returns true on success. */
bool rsref_write_jamba(const char *path, uint32_t n_layer, uint32_t n_embd, const uint32_t *n_head_kv);

/* A `gemma3` GGUF: n_layer layers of width n_embd (a multiple of 8), 4 query heads, 2 KV heads,
 * feed-forward width 2*n_embd, Q/K norms and post-attention/post-FFN norms (all 1). n_swa > 0:
 * standard sliding window of n_swa tokens with sliding_window_pattern swa_pattern (layer il is SWA
 * unless il % swa_pattern == swa_pattern - 1; 0: every layer SWA), which makes the context
 * memory llama_kv_cache_iswa; n_swa == 0: no SWA (llama_kv_cache). Returns true on success. */
bool rsref_write_gemma3(const char *path, uint32_t n_layer, uint32_t n_embd, uint32_t n_swa, uint32_t swa_pattern);

/* A `gemma4` GGUF: 4 layers of width 64 (4 query heads, 2 KV heads of 16), a 16-token sliding
 * window on layers 0 and 2, dense feed-forward, no per-layer embeddings; its last n_shared_kv
 * (0..=2) layers have no KV of their own and reuse that of the last window / full layer that has
 * (llama.cpp's shared_kv_layers, n_layer_kv_from_start). Memory: llama_kv_cache_iswa with a
 * reuse callback. */
bool rsref_write_gemma4(const char *path, uint32_t n_shared_kv);
/* A `gemma4-assistant` GGUF: the draft model of rsref_write_gemma4's, 2 query-only layers (window,
 * full) of width 32 over the target context's cells. */
bool rsref_write_gemma4_assistant(const char *path);

/* A `hy_v3` GGUF with one NextN (MTP) block: 2 dense decoder blocks and the NextN block 2 (width
 * 64, 4 query heads, 2 KV heads). Loaded with load_mtp, an LLAMA_CONTEXT_TYPE_MTP context gets a
 * KV cache over layer 2 only (create_memory's filter il >= n_layer()). */
bool rsref_write_hy_v3(const char *path);

/* A `deepseek32` GGUF: 2 dense layers of width 64, MLA attention (4 heads, one 48-wide K head:
 * kv_lora 32 + rope 16) with a lightning indexer (2 heads of 64, top-k 4) on every layer. Memory:
 * llama_kv_cache_dsa (an MLA K-only cache and the indexer's key cache). */
bool rsref_write_deepseek32(const char *path);

/* A `dots3note` GGUF: 2 dense MLA layers of width 64 (as deepseek32's, with an output gate),
 * layer 0 full attention with a lightning indexer, layer 1 a 16-token sliding window. Memory:
 * llama_kv_cache_dsa_iswa. */
bool rsref_write_dots3note(const char *path);

/* A `minimax-m3` GGUF: 2 layers of width 64, layer 0 dense, layer 1 MoE with the sparse
 * attention's indexer. Memory: llama_kv_cache_msa (its sparse path runs with flash attention
 * and one sequence or several streams). */
bool rsref_write_minimax_m3(const char *path);

/* A `glm5-next` GGUF: 2 dense layers of width 64 with mHC residuals, layer 0 Kimi delta attention
 * (recurrent), layer 1 nope MLA with a k-pool lightning indexer. Memory: llama_memory_hybrid_idx
 * (its indexer cache is named `cache_idx_*` and restores into the MLA cache's layout). */
bool rsref_write_glm5_next(const char *path);

/* A `deepseek4` GGUF: 3 MoE layers of width 64 with mHC residuals, every layer an 8-token raw
 * window, layer 1 also CSA (compress ratio 4, with a lightning indexer of 2 heads of 64) and
 * layer 2 HCA (ratio 128). Memory: llama_kv_cache_dsv4 (the raw window iSWA, the CSA, HCA and
 * indexer key caches, the csa/hca/lid compressor states). */
bool rsref_write_deepseek4(const char *path);

/* A `qwen4exp` GGUF: 2 MoE layers of width 64 with low-rank hyper-connections and IMRoPE, layer 0
 * a gated delta net (recurrent) with the PLE n-gram (bigram) per-layer embedding, layer 1 gated
 * full attention with a QSA k-pool indexer (compress ratio 2). Memory: llama_memory_hybrid_idx
 * (the attention cache keeps each cell's token id, read back by get_prev_tokens for the n-gram
 * hash; the recurrent state holds the PLE conv history too). Without `ple`: no n-gram embedding. */
bool rsref_write_qwen4exp(const char *path, bool ple);

/* A `qwen2vl` GGUF (M-RoPE, n_pos_per_embd 4): n_layer layers of width n_embd (a multiple of 8),
 * 4 query heads, 2 KV heads, Q/K/V biases, feed-forward width 2*n_embd, rope.dimension_sections
 * sections[0..4) (non-negative, summing to head_dim/2 = n_embd/8). Token batches get the text
 * positions [p, p, p, 0]; the KV cache cannot shift (seq_add/seq_div assert). Returns true on
 * success. */
bool rsref_write_qwen2vl(const char *path, uint32_t n_layer, uint32_t n_embd, const int32_t *sections);

/* --------------------------------------------------------------------------------------------
 * rsref: a standalone stock llama_memory_recurrent over a model file.
 */

typedef struct rsref_params {
    uint32_t mem_size;       /* cells (stock contexts use max(1, n_seq_max)) */
    uint32_t n_seq_max;
    uint32_t n_rs_seq;       /* rollback snapshots per seq (tensors get 1 + n_rs_seq planes) */
    int32_t type_r;          /* ggml_type */
    int32_t type_s;          /* ggml_type */
    const uint8_t *filter;   /* per-layer 0/1 for layers < n_filter (others: skipped), or NULL:
                                no filter for recurrent archs (every layer, as create_memory), the
                                hybrid default hparams.is_recr(il) otherwise */
    uint32_t n_filter;
} rsref_params;

typedef struct rsref rsref;

/* sizeof(rsref_params) for which = 0 (0 otherwise). */
size_t rsref_sizeof(int32_t which);

/* NULL if the model cannot be loaded or the constructor throws. */
rsref *rsref_new(const char *model_path, const rsref_params *p);
void rsref_free(rsref *r);

/* llama_memory_i operations, forwarded as they are. */
void rsref_clear(rsref *r, bool data);
bool rsref_seq_rm(rsref *r, int32_t seq, int32_t p0, int32_t p1);
void rsref_seq_cp(rsref *r, int32_t src, int32_t dst, int32_t p0, int32_t p1);
void rsref_seq_keep(rsref *r, int32_t seq);
void rsref_seq_add(rsref *r, int32_t seq, int32_t p0, int32_t p1, int32_t delta);
void rsref_seq_div(rsref *r, int32_t seq, int32_t p0, int32_t p1, int32_t d);
int32_t rsref_seq_pos_min(const rsref *r, int32_t seq);
int32_t rsref_seq_pos_max(const rsref *r, int32_t seq);
bool rsref_can_shift(const rsref *r);

/* The mutating stock find_slot(ubatch). The ubatch's equal_seqs flag is passed through as
 * b_equal_seqs; a ubatch without it returns false without calling find_slot (which asserts it).
 * Other stock assertions still abort: the caller must leave an empty cell for every sequence
 * set whose sequence has no cell of its own (always true when mem_size >= n_seq_max). */
bool rsref_find_slot(rsref *r, const kvref_ubatch *ub);
/* prepare(ubatches): find_slot on each, then the cells (all fields), used and head are restored;
 * rs_z and n keep the values of the last find_slot, as in stock. Same equal_seqs guard as
 * rsref_find_slot. */
bool rsref_prepare(rsref *r, const kvref_ubatch *ubs, uint32_t n);

/* Cell table, arrays of size() elements, any pointer may be NULL; seq: 4 words per cell, bit s of
 * word s/64 (only seqs in [0, 256) are representable; others are dropped). */
void rsref_cells(const rsref *r, int32_t *pos, int32_t *src, int32_t *src0, int32_t *tail, uint64_t *seq);
/* head, used, size, n, rs_z, n_rs_seq, n_seq_max (any pointer may be NULL). */
void rsref_info(const rsref *r, uint32_t *head, uint32_t *used, uint32_t *size, uint32_t *n,
                int32_t *rs_z, uint32_t *n_rs_seq, uint32_t *n_seq_max);
/* rs_idx[0..min(n_seq_max, cap)); returns n_seq_max. */
uint32_t rsref_rs_idx(const rsref *r, uint32_t *out, uint32_t cap);

/* A stock llama_memory_recurrent_context over the current state: full (init_full) or batch
 * mode (not full). get_n_rs / get_head / get_rs_z of that context. */
void rsref_ctx_info(const rsref *r, bool full, uint32_t *n_rs, uint32_t *head, int32_t *rs_z);
/* s_copy(i) of a batch-mode context: what set_input writes into s_copy[i]. Side effect as in
 * stock: with n_rs_seq > 0 it resets rs_idx of the cell's first sequence. INT32_MIN when
 * head + i >= size (stock would read out of bounds). */
int32_t rsref_s_copy(rsref *r, uint32_t i);

/* state_write(io, seq, flags) into buf (cap bytes); buf == NULL: size only. Bytes written, 0 on
 * failure. Returns 0 without calling the stock code where it would abort: ON_DEVICE with more
 * than one cell range; n_rs_seq > 0 and a selected cell holding a seq >= n_seq_max; n_rs_seq > 0,
 * seq == -1 and a cell whose seqs have different rs_idx. */
size_t rsref_state_write(const rsref *r, int32_t seq, uint32_t flags, uint8_t *buf, size_t cap);
/* state_read(io, seq, flags) from buf. True on success; false when the stock code threw (its
 * own cleanup done) or would abort (then not called; *consumed = 0): a single-seq read of
 * 2..size cells whose metadata parses (stock asserts one cell per seq), or a seq in
 * [n_seq_max, size) with n_rs_seq > 0. *consumed (may be NULL) gets the bytes read. */
bool rsref_state_read(rsref *r, int32_t seq, uint32_t flags, const uint8_t *buf, size_t size,
                      size_t *consumed);

/* hparams.n_layer(), n_embd_r(), n_embd_s(). */
uint32_t rsref_n_layer(const rsref *r);
uint32_t rsref_n_embd_r(const rsref *r);
uint32_t rsref_n_embd_s(const rsref *r);
/* which: 0 = r_l, 1 = s_l, 2 = p_l. Whether layer il has that tensor. */
bool rsref_has_tensor(const rsref *r, int32_t which, int32_t il);
/* ggml_nbytes of the tensor (0 if absent); with out != NULL and cap >= nbytes, its bytes (all
 * planes) are copied into out. */
size_t rsref_tensor_get(const rsref *r, int32_t which, int32_t il, uint8_t *out, size_t cap);
/* Overwrites the whole tensor; false if absent or size != nbytes. */
bool rsref_tensor_set(rsref *r, int32_t which, int32_t il, const uint8_t *data, size_t size);

/* --------------------------------------------------------------------------------------------
 * Additions to kvref_ctx (stock llama_context) for multi-sequence batches.
 */

/* llama_decode of a general batch: token i has position pos[i], n_seq_id[i] sequence ids
 * seq_id[i][..] and output flag logits[i] (may be NULL: last token only). Returns
 * llama_decode's result (-1 also on a caught exception). */
int32_t rsref_ctx_decode_batch(kvref_ctx *c, const int32_t *tokens, const int32_t *pos,
                               const int32_t *n_seq_id, const int32_t *const *seq_id,
                               const int8_t *logits, uint32_t n);
/* llama_get_logits_ith(ctx, i) copied into out[n_vocab]; false if NULL or no successful
 * decode. */
bool rsref_ctx_logits_ith(kvref_ctx *c, int32_t i, float *out);

#ifdef __cplusplus
}
#endif

#endif /* RSREF_H */
