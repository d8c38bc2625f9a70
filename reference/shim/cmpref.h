/*
 * cmpref: a thin C interface over the *stock* composite memories of the pinned llama.cpp:
 * llama_kv_cache_iswa, llama_memory_hybrid and llama_memory_hybrid_iswa (and, for completeness,
 * a plain llama_kv_cache), built by the model's own llama_model::create_memory exactly as a
 * llama_context would build them.
 *
 * Test-only, like kvref.h and rsref.h (same library, same logging rules, same model cache):
 * every function forwards to the pinned llama.cpp's own code. The parts of a composite can be
 * inspected (and driven) through borrowed kvref / rsref views, which every kvref_* / rsref_*
 * function accepts.
 *
 * Stock assertions abort the process: callers pass valid sequence ids (< n_seq_max) and
 * positions, as for kvref. The guards this shim adds are documented per function.
 */
#ifndef CMPREF_H
#define CMPREF_H

#include "kvref.h"
#include "rsref.h"

#ifdef __cplusplus
extern "C" {
#endif

/* What the memory of a cmpref is (cmpref_kind). */
#define CMPREF_KIND_KV          0  /* llama_kv_cache */
#define CMPREF_KIND_ISWA        1  /* llama_kv_cache_iswa */
#define CMPREF_KIND_HYBRID      2  /* llama_memory_hybrid */
#define CMPREF_KIND_HYBRID_ISWA 3  /* llama_memory_hybrid_iswa */

typedef struct cmpref_params {
    uint32_t n_ctx;      /* cells per stream: cparams.n_ctx_seq, the kv_size the constructor gets
                            (the iSWA's SWA cache is sized by stock from it, n_swa and n_ubatch) */
    uint32_t n_seq_max;
    bool unified;        /* cparams.kv_unified */
    bool swa_full;       /* llama_memory_params.swa_full */
    uint32_t n_ubatch;   /* cparams.n_ubatch (sizes the SWA cache) */
    bool v_trans;        /* !cparams.flash_attn */
    int32_t type_k;      /* ggml_type */
    int32_t type_v;      /* ggml_type */
    uint32_t n_rs_seq;   /* cparams.n_rs_seq: recurrent rollback snapshots per seq; clamped to 0 for
                            archs without rollback, as llama_context does */
} cmpref_params;

/* One ubatch of cmpref_init_batch's split. */
typedef struct cmpref_split {
    uint32_t n_tokens;
    uint32_t n_seq_tokens;
    uint32_t n_seqs;
    uint32_t n_seqs_unq;
    uint32_t equal_seqs;  /* 0/1 */
    uint32_t n_outputs;   /* tokens with the output flag */
    uint32_t idx_off;     /* its tokens' indices into the input batch are
                             batch_idxs[idx_off .. idx_off + n_tokens), in ubatch order */
} cmpref_split;

typedef struct cmpref cmpref;

/* sizeof(cmpref_params), sizeof(cmpref_split) for which = 0, 1 (0 otherwise). */
size_t cmpref_sizeof(int32_t which);

/* Fills p with the defaults: 256 cells, 1 seq, unified, no swa_full, n_ubatch 256, v_trans,
 * f16/f16, n_rs_seq 0. */
void cmpref_default_params(cmpref_params *p);

/* Builds the memory the model's arch asks for through llama_model::create_memory (default
 * context type, no offload, n_pad 1), with the given parameters. NULL when the model cannot be
 * loaded, the constructor throws, the arch makes no memory or another kind than the four above
 * (recurrent-only, DSA, MSA, hybrid_idx, ...), or it needs another context (gemma4-assistant). */
cmpref *cmpref_new(const char *model_path, const cmpref_params *p);
/* Frees the memory and its part views. */
void cmpref_free(cmpref *r);

/* CMPREF_KIND_*. */
int32_t cmpref_kind(const cmpref *r);
/* The n_rs_seq the memory was built with (after the clamp). */
uint32_t cmpref_n_rs_seq(const cmpref *r);

/* llama_memory_i operations on the composite, forwarded as they are. */
void cmpref_clear(cmpref *r, bool data);
bool cmpref_seq_rm(cmpref *r, int32_t seq, int32_t p0, int32_t p1);
void cmpref_seq_cp(cmpref *r, int32_t src, int32_t dst, int32_t p0, int32_t p1);
void cmpref_seq_keep(cmpref *r, int32_t seq);
void cmpref_seq_add(cmpref *r, int32_t seq, int32_t p0, int32_t p1, int32_t delta);
void cmpref_seq_div(cmpref *r, int32_t seq, int32_t p0, int32_t p1, int32_t d);
int32_t cmpref_seq_pos_min(const cmpref *r, int32_t seq);
int32_t cmpref_seq_pos_max(const cmpref *r, int32_t seq);
bool cmpref_can_shift(const cmpref *r);

/* Borrowed part views, owned by r and valid until cmpref_free(r); never pass them to kvref_free
 * or rsref_free. NULL when the part does not exist.
 * cmpref_kv_part: which 0 = the base cache (the plain cache itself, the iSWA's base, the hybrid's
 * attention cache, the hybrid-iSWA's base), 1 = the SWA cache (iSWA, hybrid-iSWA).
 * cmpref_rs_part: the recurrent memory of a hybrid or hybrid-iSWA.
 * Operations on a view act on that part alone (the composite's other parts do not follow).
 * kvref_update on a view works (its own helper llama_context, as for kvref_new caches). */
kvref *cmpref_kv_part(cmpref *r, int32_t which);
rsref *cmpref_rs_part(cmpref *r);
/* The kvref_params describing KV part `which` (kv_size, n_seq_max, unified, n_swa, swa_type,
 * v_trans, type_k, type_v, use_alibi, mrope from the cache; the rest kvref defaults). False when
 * the part does not exist. */
bool cmpref_kv_part_params(const cmpref *r, int32_t which, kvref_params *out);

/* What the composite's init_batch does after its split, on caller-given ubatches: each part's
 * prepare(ubatches) in stock order (iSWA: base, swa; hybrid: recurrent, attention; hybrid-iSWA:
 * recurrent, base, swa; plain: the cache), then the composite's stock context built from the slot
 * infos, and apply()/next() over every ubatch as llama_context::decode does. The slot infos are
 * kept for cmpref_slot. Returns 0 success, 2 a prepare failed (LLAMA_MEMORY_STATUS_FAILED_PREPARE;
 * nothing applied), 3 an apply failed, -1 invalid input (n == 0, or a memory with a recurrent part
 * and a ubatch without equal_seqs: the stock recurrent find_slot asserts it), -2 an exception.
 * Not guarded: with several streams (not unified) stock find_slot asserts n_tokens % n_seqs_unq
 * == 0 and one sequence per set in seq-major order (an equal split, as kvref_find_slot). */
int32_t cmpref_apply_ubatches(cmpref *r, const kvref_ubatch *ubs, uint32_t n);

/* The slot info of KV part `which` for ubatch k of the last successful cmpref_apply_ubatches or
 * cmpref_init_batch (planned or applied); false (out->n_stream = 0) if there is none or it does
 * not fit out->idxs_cap. cmpref_n_slots gives the number of ubatches of that call. */
bool cmpref_slot(const cmpref *r, int32_t which, uint32_t k, kvref_slot *out);
uint32_t cmpref_n_slots(const cmpref *r);

/* The whole stock path of llama_context::decode up to the graph: the batch (tokens, pos — NULL:
 * continue each sequence from the memory, n_seq_id / seq_id — NULL: all seq 0, logits — NULL: the
 * last token only) goes through llama_batch_compat into a llama_batch_ext (n_seq_max, memory for
 * validation and position inference, the model's vocab and widths), a llama_batch_allocr is
 * initialised over it (output_all = embd_all), and the composite's init_batch(balloc, n_ubatch,
 * embd_all) splits and prepares it. On success the ubatches are reported into out[0..min(n, cap))
 * and their tokens' batch indices into batch_idxs (n_tokens entries), *n_split gets their number
 * n, and unless plan_only they are applied (apply()/next(), as decode does). Pending shifts are
 * not applied first (decode's memory_update): call cmpref_update before.
 * Returns the memory status (0 success, 2 failed prepare: nothing reported), 3 an apply failed,
 * -1 the batch allocator rejected the batch (invalid token, seq id, inconsistent positions; stock
 * logs why) or the shim refused it (no token, n_ubatch 0, or a hybrid with n_rs_seq > 0 and
 * n_ubatch <= n_rs_seq + 1, which stock's split_equal asserts), -2 an exception or no memory
 * context. */
int32_t cmpref_init_batch(cmpref *r, const int32_t *tokens, const int32_t *pos, const int32_t *n_seq_id,
                          const int32_t *const *seq_id, const int8_t *logits, uint32_t n_tokens,
                          uint32_t n_ubatch, bool embd_all, bool plan_only, cmpref_split *out,
                          uint32_t cap, int32_t *batch_idxs, uint32_t *n_split);

/* init_update(lctx, false) then apply() on the composite: pending stream copies and K-shifts of
 * its KV parts. lctx is a helper llama_context over the model (256 cells), created on first use.
 * Returns the status (0 success, 1 no update, 2/3 failures). */
int32_t cmpref_update(cmpref *r);

/* state_write(io, seq, flags) into buf (cap bytes); buf == NULL: the size only. Bytes written,
 * 0 on failure (exception caught). The recurrent part's stock aborts are not guarded here (see
 * rsref_state_write for them). */
size_t cmpref_state_write(const cmpref *r, int32_t seq, uint32_t flags, uint8_t *buf, size_t cap);
/* state_read(io, seq, flags) from buf. Bytes consumed, 0 on failure (exception caught; the
 * stock cleanup done). The recurrent part's stock asserts are not guarded (see rsref_state_read). */
size_t cmpref_state_read(cmpref *r, int32_t seq, uint32_t flags, const uint8_t *buf, size_t size);

#ifdef __cplusplus
}
#endif

#endif /* CMPREF_H */
