// The start-up of llama.cpp's `common` programs (common/fit.cpp, on by default): a model and a
// context created with `no_alloc` to measure memory, freed, then the real ones. Built against
// stock libllama and against the drop-in; compare.cmake compares the outputs byte for byte.
//
//   fit <model.gguf> <out.txt> [--n-ctx N] [--n-seq N] [--flash-attn 0|1] [--kv-unified 0|1]
//       [--fit-target-kib K]
//
// Writes, for each phase (no_alloc, then allocated): the memory's log lines (creation, buffer
// sizes, the compute buffers the context reserves) and llama_get_memory_breakdown per buffer
// type (model, context, compute bytes). Checks, on whichever library it runs:
//   - the no_alloc context reports the same context bytes per buffer type as the real one
//     (what fit reads is what the real context takes);
//   - the no_alloc phase does not allocate the memory: its peak resident size grows by less
//     than half of the memory's bytes (checked when those are at least 16 MiB; the peak is
//     reset through /proc/self/clear_refs first). The growth goes to stderr.
// With --fit-target-kib, then common's fit itself (common_fit_params, compiled from the pinned
// tree's common/fit.cpp): the context size left unset, the host margin set so that K KiB may be
// used, fit measures the model at its full and minimum context sizes (no_alloc models and
// contexts) and interpolates; writes the fitted parameters (status, n_ctx, n_gpu_layers). The
// target must make fit reduce the context to a size strictly between the two, or the run
// fails: a fitted size that is one of the bounds would not show that both libraries measured
// the same bytes.
// Exit 0 when all hold, 1 otherwise.
#include "fit.h"
#include "llama.h"
#include "llama-ext.h"
#include "log_lines.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

// common's log (log.cpp, linked for fit.cpp) asks common.cpp, which is not linked, whether the
// terminal takes colours: it does not, the harness's output is a file
bool tty_can_use_colors() {
    return false;
}
bool tty_enable_ansi() {
    return false;
}

namespace {

std::vector<std::string> g_log;

void log_cb(ggml_log_level level, const char * text, void * /*user*/) {
    std::string line;
    // the memory's lines and the sizes a fit reads
    if (whole_log_line(text, line) && level != GGML_LOG_LEVEL_DEBUG &&
        mentions_any(line, {"llama_kv_cache", "llama_memory_recurrent", "iswa", "hybrid", "buffer size", "graph",
                            "n_ctx", "n_seq"})) {
        g_log.push_back(line);
    }
}

long read_status_kib(const char * key) {
    FILE * f = fopen("/proc/self/status", "r");
    if (!f) {
        return -1;
    }
    char buf[256];
    long v = -1;
    const size_t n = strlen(key);
    while (fgets(buf, sizeof buf, f)) {
        if (strncmp(buf, key, n) == 0) {
            v = strtol(buf + n, nullptr, 10);
            break;
        }
    }
    fclose(f);
    return v;
}

// resets VmHWM to the current resident size (Linux >= 4.0); false where that is not possible
bool reset_peak() {
    FILE * f = fopen("/proc/self/clear_refs", "w");
    if (!f) {
        return false;
    }
    const bool ok = fputs("5", f) >= 0;
    return fclose(f) == 0 && ok;
}

struct phase_result {
    std::vector<std::pair<std::string, size_t>> context;  // buffer type name, context bytes
    size_t context_total = 0;
};

bool run_phase(FILE * out, const char * path, bool no_alloc, const llama_context_params & cp, phase_result & res,
               long & peak_growth_kib) {
    fprintf(out, "phase %s\n", no_alloc ? "no_alloc" : "allocated");
    g_log.clear();
    const bool peak_ok = reset_peak();
    const long hwm0 = read_status_kib("VmHWM:");

    llama_model_params mp = llama_model_default_params();
    mp.no_alloc  = no_alloc;
    mp.load_mode = LLAMA_LOAD_MODE_NONE;  // as common's fit loads its measuring model
    llama_model * model = llama_model_load_from_file(path, mp);
    if (!model) {
        fprintf(stderr, "fit: cannot load %s\n", path);
        return false;
    }
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "fit: cannot create the context\n");
        llama_model_free(model);
        return false;
    }
    const long hwm1 = read_status_kib("VmHWM:");
    peak_growth_kib = peak_ok && hwm0 >= 0 && hwm1 >= 0 ? hwm1 - hwm0 : -1;
    // where the resident pages are (anonymous: allocations; file: the libraries' code)
    fprintf(stderr, "%s phase: RssAnon %ld KiB, RssFile %ld KiB; ", no_alloc ? "no_alloc" : "allocated",
            read_status_kib("RssAnon:"), read_status_kib("RssFile:"));

    for (const std::string & l : g_log) {
        fprintf(out, "log %s", l.c_str());
    }
    for (const auto & [buft, mb] : llama_get_memory_breakdown(ctx)) {
        fprintf(out, "breakdown %s model %zu context %zu compute %zu\n", ggml_backend_buft_name(buft), mb.model,
                mb.context, mb.compute);
        res.context.emplace_back(ggml_backend_buft_name(buft), mb.context);
        res.context_total += mb.context;
    }
    llama_free(ctx);
    llama_model_free(model);
    return true;
}

// the model's training context (a model without weights)
uint32_t n_ctx_train_of(const char * path) {
    llama_model_params mp = llama_model_default_params();
    mp.no_alloc  = true;
    mp.load_mode = LLAMA_LOAD_MODE_NONE;
    llama_model * model = llama_model_load_from_file(path, mp);
    const uint32_t n = model ? (uint32_t) llama_model_n_ctx_train(model) : 0;
    llama_model_free(model);
    return n;
}

// common's fit with the context size unset and `target_kib` of host memory to use; false
// when it fails or leaves the context at a bound
bool run_fit(FILE * out, const char * path, const llama_context_params & cp, size_t target_kib) {
    // (with a GPU, fit budgets against the device's free memory, which varies: the check is
    // for the host-only fit of these machines)
    if (ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_GPU) || ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_IGPU)) {
        fprintf(out, "fit skipped: a GPU device is present\n");
        return true;
    }
    const uint32_t n_ctx_min = 256;
    ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    size_t free_host = 0, total_host = 0;
    ggml_backend_dev_memory(cpu, &free_host, &total_host);
    const size_t target = target_kib * 1024;
    if (total_host <= target) {
        fprintf(stderr, "fit: the target exceeds the host memory\n");
        return false;
    }
    std::vector<size_t> margins(llama_max_devices(), total_host - target);
    std::vector<float> split(llama_max_devices(), 0.0f);
    std::vector<llama_model_tensor_buft_override> overrides(llama_max_tensor_buft_overrides());
    llama_model_params mp = llama_model_default_params();
    llama_context_params fcp = cp;
    fcp.n_ctx = 0;
    const common_params_fit_status st = common_fit_params(path, &mp, &fcp, split.data(), overrides.data(),
            margins.data(), n_ctx_min, nullptr, GGML_LOG_LEVEL_ERROR);
    // (fit sets its own logger while it measures)
    llama_log_set(log_cb, nullptr);
    fprintf(out, "fit status %d n_ctx %u n_gpu_layers %d\n", (int) st, fcp.n_ctx, mp.n_gpu_layers);
    const uint32_t n_streams = cp.kv_unified ? 1 : cp.n_seq_max;
    const uint32_t n_ctx_max = n_ctx_train_of(path) * n_streams;
    if (st != COMMON_PARAMS_FIT_STATUS_SUCCESS || fcp.n_ctx <= n_ctx_min * n_streams || fcp.n_ctx >= n_ctx_max) {
        fprintf(stderr, "fit: status %d, n_ctx %u: not a reduced context strictly between %u and %u (choose another target)\n",
                (int) st, fcp.n_ctx, n_ctx_min * n_streams, n_ctx_max);
        return false;
    }
    return true;
}

}  // namespace

int main(int argc, char ** argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s <model.gguf> <out.txt> [--n-ctx N] [--n-seq N] [--flash-attn 0|1] [--kv-unified 0|1]\n",
                argv[0]);
        return 2;
    }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx     = 131072;
    cp.n_batch   = 64;  // a small ubatch keeps the reserved compute buffers (the mask) small
    cp.n_ubatch  = 64;
    cp.n_seq_max = 1;
    cp.n_threads = cp.n_threads_batch = 1;
    size_t fit_target_kib = 0;
    for (int i = 3; i + 1 < argc; i += 2) {
        const long v = strtol(argv[i + 1], nullptr, 10);
        if (!strcmp(argv[i], "--n-ctx")) {
            cp.n_ctx = (uint32_t) v;
        } else if (!strcmp(argv[i], "--n-seq")) {
            cp.n_seq_max = (uint32_t) v;
        } else if (!strcmp(argv[i], "--flash-attn")) {
            cp.flash_attn_type = v ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
        } else if (!strcmp(argv[i], "--kv-unified")) {
            cp.kv_unified = v != 0;
        } else if (!strcmp(argv[i], "--fit-target-kib")) {
            fit_target_kib = (size_t) v;
        } else {
            fprintf(stderr, "fit: unknown option %s\n", argv[i]);
            return 2;
        }
    }
    FILE * out = fopen(argv[2], "w");
    if (!out) {
        fprintf(stderr, "fit: cannot write %s\n", argv[2]);
        return 2;
    }
    llama_log_set(log_cb, nullptr);
    llama_backend_init();

    phase_result measured, real;
    long growth_measured = -1, growth_real = -1;
    bool ok = run_phase(out, argv[1], true, cp, measured, growth_measured) &&
              run_phase(out, argv[1], false, cp, real, growth_real);
    if (ok && measured.context != real.context) {
        fprintf(stderr, "fit: the no_alloc context reports other context bytes than the real one\n");
        ok = false;
    }
    fprintf(out, "no_alloc context bytes equal the allocated ones: %s\n", ok ? "yes" : "no");
    if (ok && measured.context_total >= (16u << 20)) {
        if (growth_measured < 0) {
            fprintf(stderr, "fit: cannot read the peak resident size\n");
            ok = false;
        } else if ((size_t) growth_measured * 1024 * 2 >= measured.context_total) {
            fprintf(stderr, "fit: the no_alloc phase grew the peak resident size by %ld KiB: the %zu bytes of memory were allocated\n",
                    growth_measured, measured.context_total);
            ok = false;
        }
        fprintf(out, "no_alloc phase allocates less than half the memory's bytes: %s\n", ok ? "yes" : "no");
    }
    if (ok && fit_target_kib > 0) {
        ok = run_fit(out, argv[1], cp, fit_target_kib);
    }
    fprintf(stderr, "peak resident growth: no_alloc phase %ld KiB, allocated phase %ld KiB; memory %zu KiB\n",
            growth_measured, growth_real, measured.context_total / 1024);
    fclose(out);
    llama_backend_free();
    return ok ? 0 : 1;
}
