/* dfref: the KV-cache defragmentation of the last llama.cpp that had it (llama-cpp-sys-2
 * 0.1.121), behind a C interface, for differential tests of this library's defragmentation.
 *
 * Test-only code. A handle owns a model loaded from a GGUF file (kvref_write_model writes one)
 * and a single-stream llama_kv_cache_unified over it, whose cell table the caller fills
 * directly: the plan depends only on which cells are used, and writing them is the shortest
 * way to give both implementations the same cells. Every function catches exceptions and
 * reports failure through its return value. */
#ifndef DFREF_H
#define DFREF_H

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct dfref dfref;

/* Loads the model (CPU only) and makes a cache of kv_size cells (f16 K and V, transposed V,
 * one stream, n_pad 1, no sliding window). NULL on failure. */
dfref *dfref_new(const char *model_path, uint32_t kv_size);
void dfref_free(dfref *r);

/* Layers of the cache (the plan's move budget divides by them). */
uint32_t dfref_n_layer(const dfref *r);

/* Empties the cache, then gives cell i the position pos[i] (-1: empty) and the sequences whose
 * bits are set in seq_mask[i] (ids 0..63), for i < n <= kv_size. False on bad input. */
bool dfref_set_cells(dfref *r, const int32_t *pos, const uint64_t *seq_mask, uint32_t n);

/* defrag_prepare(n_max_nodes): writes the plan's ids (cell i moves to ids[i]; ids[i] == i or
 * == the plan's length: not moved) to ids[0..cap) and returns the plan's length, 0 when the
 * plan is empty (nothing to move). Returns UINT32_MAX on failure or when cap is too small. */
uint32_t dfref_plan(dfref *r, int32_t n_max_nodes, uint32_t *ids, uint32_t cap);

/* Applies a plan to the cells as the old update() did (cells.mv in index order, head reset). */
bool dfref_apply(dfref *r, const uint32_t *ids, uint32_t n);

/* Reads the cell table back: pos, pending shift and sequence mask (ids 0..63) of cells 0..n,
 * and the head. */
bool dfref_get_cells(const dfref *r, int32_t *pos, int32_t *shift, uint64_t *seq_mask, uint32_t n,
                     uint32_t *head);

#ifdef __cplusplus
}
#endif

#endif
