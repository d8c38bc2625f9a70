// dfref: dfref.h implemented over llama-cpp-sys-2 0.1.121's own llama_kv_cache_unified.
// Test-only code: see dfref.h.

#include <bitset>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <vector>

#include "ggml.h"
#include "ggml-backend.h"
#include "llama.h"

#include "llama-arch.h"
#include "llama-batch.h"
#include "llama-cparams.h"
#include "llama-graph.h"
#include "llama-hparams.h"
#include "llama-io.h"
#include "llama-memory.h"
#include "llama-model.h"

// defrag_prepare and the cell table are private; turning `private` into `public` changes
// neither layout nor mangling, and this file is never part of a product build.
#define private public
#include "llama-kv-cells.h"
#include "llama-kv-cache-unified.h"
#undef private

#pragma GCC visibility push(default)
#include "dfref.h"
#pragma GCC visibility pop

struct dfref {
    llama_model * model = nullptr;
    std::unique_ptr<llama_kv_cache_unified> kv;
};

namespace {

void quiet_log(ggml_log_level, const char *, void *) {}

llama_kv_cells_unified & cells_of(dfref * r) {
    return r->kv->v_cells[0];
}

}  // namespace

extern "C" {

dfref * dfref_new(const char * model_path, uint32_t kv_size) {
    try {
        llama_log_set(quiet_log, nullptr);
        static bool init = (llama_backend_init(), true);
        (void) init;
        llama_model_params mp = llama_model_default_params();
        mp.n_gpu_layers = 0;
        llama_model * model = llama_model_load_from_file(model_path, mp);
        if (!model) {
            return nullptr;
        }
        auto r = std::make_unique<dfref>();
        r->model = model;
        r->kv = std::make_unique<llama_kv_cache_unified>(
            *model, nullptr, GGML_TYPE_F16, GGML_TYPE_F16, /*v_trans*/ true, /*offload*/ false,
            /*unified*/ true, kv_size, /*n_seq_max*/ 1, /*n_pad*/ 1, /*n_swa*/ 0, LLAMA_SWA_TYPE_NONE);
        return r.release();
    } catch (const std::exception &) {
        return nullptr;
    }
}

void dfref_free(dfref * r) {
    if (!r) {
        return;
    }
    r->kv.reset();
    llama_model_free(r->model);
    delete r;
}

uint32_t dfref_n_layer(const dfref * r) {
    return (uint32_t) r->kv->layers.size();
}

bool dfref_set_cells(dfref * r, const int32_t * pos, const uint64_t * seq_mask, uint32_t n) {
    try {
        auto & cells = cells_of(r);
        if (n > cells.size()) {
            return false;
        }
        cells.reset();
        r->kv->v_heads[0] = 0;
        for (uint32_t i = 0; i < n; ++i) {
            if (pos[i] < 0) {
                continue;
            }
            if (seq_mask[i] == 0) {
                return false;
            }
            cells.pos_set(i, pos[i]);
            for (int s = 0; s < 64; ++s) {
                if (seq_mask[i] >> s & 1) {
                    cells.seq_add(i, s);
                }
            }
        }
        return true;
    } catch (const std::exception &) {
        return false;
    }
}

uint32_t dfref_plan(dfref * r, int32_t n_max_nodes, uint32_t * ids, uint32_t cap) {
    try {
        const auto info = r->kv->defrag_prepare(n_max_nodes);
        if (info.ids.size() > cap) {
            return UINT32_MAX;
        }
        std::copy(info.ids.begin(), info.ids.end(), ids);
        return (uint32_t) info.ids.size();
    } catch (const std::exception &) {
        return UINT32_MAX;
    }
}

bool dfref_apply(dfref * r, const uint32_t * ids, uint32_t n) {
    try {
        auto & cells = cells_of(r);
        for (uint32_t i = 0; i < n; ++i) {
            if (ids[i] == n || ids[i] == i) {
                continue;
            }
            cells.mv(i, ids[i]);
        }
        r->kv->v_heads[0] = 0;
        return true;
    } catch (const std::exception &) {
        return false;
    }
}

bool dfref_get_cells(const dfref * r, int32_t * pos, int32_t * shift, uint64_t * seq_mask, uint32_t n,
                     uint32_t * head) {
    const auto & cells = r->kv->v_cells[0];
    if (n > cells.size()) {
        return false;
    }
    for (uint32_t i = 0; i < n; ++i) {
        pos[i] = cells.pos[i];
        shift[i] = cells.shift[i];
        uint64_t m = 0;
        for (int s = 0; s < 64; ++s) {
            if (cells.seq[i].test(s)) {
                m |= uint64_t(1) << s;
            }
        }
        seq_mask[i] = m;
    }
    *head = r->kv->v_heads[0];
    return true;
}

}  // extern "C"
