// llama.h's state entry points, owned by the drop-in: every input is parsed and validated
// whole (the context's own fields, every part of every memory, token counts, the ON_DEVICE
// stash) before the first change, and no exception leaves a llama.h function.
//
// A valid input is handed to upstream's own code (renamed, llama-dropin-state.h), so bytes,
// return values and log lines are stock's. An invalid one gets stock's failure value and:
//  - nothing changed when stock changes nothing either (a bad magic, version, arch, token
//    count, stream count, or a sequence's first cell count);
//  - otherwise the destination sequence erased from every part of the memory (a sequence
//    state), or the whole memory cleared (a whole state); a sequence state given destination
//    -1 ("every sequence") that a later part refuses changes nothing. Stock instead leaves a
//    composite's earlier parts restored, or restores a session file and then reports its
//    trailing bytes.
// deepseek4's memory (llama_kv_cache_dsv4) has its own sections between and after its leaf
// caches (a header, the compressed caches' K rows, the compressor states): they are read here
// as its state_read reads them, with its errors.
// Where the first part of the memory is the invalid one, upstream's code runs on the input as
// it is (it fails there, before any other part changes: same log lines, same effect), and the
// other parts of a composite lose the destination too. Files are read whole into memory, from
// regular files only.

#define LLAMA_DROPIN_STATE_DECLARATIONS_ONLY
#include "llama-dropin-state.h"

#include "llama-arch.h"
#include "llama-context.h"
#include "llama-impl.h"
#include "llama-io.h"
#include "llama-kv-cache-dsa-iswa.h"
#include "llama-kv-cache-dsa.h"
#include "llama-kv-cache-dsv4.h"
#include "llama-kv-cache-iswa.h"
#include "llama-kv-cache-msa.h"
#include "llama-kv-cache.h"
#include "llama-memory-abi.h"
#include "llama-memory-hybrid-idx.h"
#include "llama-memory-hybrid-iswa.h"
#include "llama-memory-hybrid.h"
#include "llama-memory-recurrent.h"
#include "llama-model.h"

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <sys/stat.h>
#include <unistd.h>
#include <vector>

// declared in llama-memory-abi.h
thread_local std::vector<llama_memory_dropin_log_line> * llama_memory_dropin_log_capture = nullptr;

namespace {

constexpr uint32_t seq_blob_magic = 0xaf143cd8; // llama_context's io_magic

// One part of the memory a restore reads, in reading order: a leaf memory (a library handle,
// which checks its own state), or a part of a composite's own format that this file reads
// itself (`own`: throws stock's error for what stock's restore refuses).
struct leaf {
    llama_memory_dropin_obj * mem = nullptr;
    bool kv = false;
    std::function<void(llama_io_read_i &)> own;
};

// deepseek4's own state sections (llama_kv_cache_dsv4's format, the pinned tree's constants)
namespace dsv4 {

constexpr uint32_t state_magic     = 0x34565344; // "DSV4"
constexpr uint32_t state_version   = 1;
constexpr uint32_t mode_full       = 0;
constexpr uint32_t mode_partial    = 1;
constexpr uint32_t k_cache_ver     = 2;          // (1, the older, is read too)
constexpr uint32_t comp_state_ver  = 1;

[[noreturn]] void refuse(const char * what) {
    throw std::runtime_error(what);
}

template <typename T> T get(llama_io_read_i & io) {
    T v;
    io.read(&v, sizeof(v));
    return v;
}

// where a restore of seq_id puts `ns` streams, as upstream's (its errors)
uint32_t dst_stream(uint32_t n_stream, llama_seq_id seq_id, uint32_t ns) {
    if (seq_id >= 0) {
        if (ns != 1) {
            refuse("DSV4 sequence state stream count mismatch");
        }
        if (n_stream > 1 && (uint32_t) seq_id >= n_stream) {
            refuse("DSV4 state sequence id out of stream range");
        }
        return n_stream > 1 ? (uint32_t) seq_id : 0;
    }
    if (ns != n_stream) {
        refuse("DSV4 full state stream count mismatch");
    }
    return 0;
}

// one tensor's rows of `ns` streams from s0: its metadata, then the rows
void tensor_rows(llama_io_read_i & io, ggml_tensor * t, uint32_t tensor_rows, uint32_t n_rows, uint32_t s0, uint32_t ns) {
    const int32_t  type     = get<int32_t>(io);
    const uint64_t ne0      = get<uint64_t>(io);
    const uint64_t rows     = get<uint64_t>(io);
    const uint64_t row_size = get<uint64_t>(io);
    const uint64_t row_size_t = ggml_row_size(t->type, t->ne[0]);
    if (type != (int32_t) t->type || ne0 != (uint64_t) t->ne[0] || rows != n_rows || row_size != row_size_t) {
        refuse("DSV4 state tensor metadata mismatch");
    }
    if (n_rows > tensor_rows) {
        refuse("DSV4 state tensor row count exceeds storage");
    }
    const size_t size = (size_t) n_rows*row_size;
    for (uint32_t s = 0; size > 0 && s < ns; ++s) {
        io.read_tensor(t, (size_t) (s0 + s)*tensor_rows*row_size, size);
    }
}

leaf header(bool partial) {
    leaf l;
    l.own = [partial](llama_io_read_i & io) {
        const uint32_t magic   = get<uint32_t>(io);
        const uint32_t version = get<uint32_t>(io);
        if (magic != state_magic) {
            refuse("DSV4 state magic mismatch");
        }
        if (version != state_version) {
            refuse("DSV4 state version mismatch");
        }
        const uint32_t mode = get<uint32_t>(io);
        if (mode != mode_full && mode != mode_partial) {
            refuse("DSV4 state mode mismatch");
        }
        if ((mode == mode_partial) != partial) {
            refuse("DSV4 state flags mismatch");
        }
    };
    return l;
}

// a compressed cache's K rows
leaf k_cache(llama_kv_cache * kv, llama_seq_id seq_id) {
    leaf l;
    l.own = [kv, seq_id](llama_io_read_i & io) {
        const uint32_t version = get<uint32_t>(io);
        const uint32_t n_rows  = get<uint32_t>(io);
        const uint32_t ns      = get<uint32_t>(io);
        const uint32_t n_layer = get<uint32_t>(io);
        if (version != 1 && version != k_cache_ver) {
            refuse("DSV4 K-cache state version mismatch");
        }
        const uint32_t kv_size = kv->get_size();
        if ((version == 1 && n_rows != kv_size) || n_rows > kv_size) {
            // (stock's line, held with the earlier parts' lines until the restore fails)
            const std::string line = format("kv %s ref %d kv %d\n", version == 1 && n_rows != kv_size ? "size" : "rows", n_rows, kv_size);
            if (llama_memory_dropin_log_capture) {
                llama_memory_dropin_log_capture->push_back({ GGML_LOG_LEVEL_INFO, line });
            } else {
                LLAMA_LOG_INFO("%s", line.c_str());
            }
            refuse("DSV4 K-cache state size mismatch");
        }
        const uint32_t s0 = dst_stream(kv->get_n_stream(), seq_id, ns);
        const auto layer_ids = kv->get_layer_ids();
        if (n_layer != layer_ids.size()) {
            refuse("DSV4 K-cache layer count mismatch");
        }
        for (uint32_t il : layer_ids) {
            if (get<uint32_t>(io) != il) {
                refuse("DSV4 K-cache layer id mismatch");
            }
            tensor_rows(io, kv->get_k_storage(il), kv_size, n_rows, s0, ns);
        }
    };
    return l;
}

// What a compressor state's write gives for a sequence: its fields, and the tensors in order
// (the layers' ids, sizes and tensors are private to upstream's class).
class capture : public llama_io_write_i {
public:
    void write(const void * src, size_t size) override {
        bytes.insert(bytes.end(), (const uint8_t *) src, (const uint8_t *) src + size);
    }
    void write_tensor(ggml_tensor * tensor, size_t offset, size_t size) override {
        GGML_UNUSED(offset);
        GGML_UNUSED(size);
        tensors.push_back(tensor);
    }
    size_t n_bytes() override { return bytes.size(); }

    uint32_t u32(size_t at) const {
        uint32_t v = 0;
        if (at + sizeof(v) <= bytes.size()) {
            memcpy(&v, bytes.data() + at, sizeof(v));
        }
        return v;
    }

    std::vector<uint8_t> bytes;
    std::vector<ggml_tensor *> tensors;
};

// a compressor state; false (the part unknown) when its own write refuses the sequence
bool comp_state(llama_dsv4_comp_state * cs, const llama_kv_cache_dsv4 * d4, llama_seq_id seq_id,
                llama_state_seq_flags flags, leaf & out) {
    auto cap = std::make_shared<capture>();
    try {
        cs->state_write(*cap, seq_id, flags, d4->get_rs_idx());
    } catch (const std::exception &) {
        return false;
    }
    // version, ratio, state size, state width, streams, layers; per layer its id and two
    // tensors' metadata (i32 + 3 u64), each tensor's rows once per stream
    const uint32_t ns      = cap->u32(16);
    const uint32_t n_layer = cap->u32(20);
    const size_t per_layer = sizeof(uint32_t) + 2*(sizeof(int32_t) + 3*sizeof(uint64_t));
    const uint32_t state_size = cap->u32(8);
    if (cap->bytes.size() != 24 + n_layer*per_layer ||
        (state_size > 0 && cap->tensors.size() != (size_t) 2*n_layer*ns) || ns == 0) {
        return false;
    }
    out.own = [cs, cap, seq_id, n_layer, per_layer, ns_w = ns](llama_io_read_i & io) {
        const uint32_t version      = get<uint32_t>(io);
        const uint32_t ratio        = get<uint32_t>(io);
        const uint32_t state_size   = get<uint32_t>(io);
        const uint32_t n_embd_state = get<uint32_t>(io);
        const uint32_t ns           = get<uint32_t>(io);
        const uint32_t n_layer_ref  = get<uint32_t>(io);
        if (version != comp_state_ver) {
            refuse("DSV4 compressor state version mismatch");
        }
        if (ratio != cap->u32(4) || state_size != cap->u32(8) || n_embd_state != cap->u32(12)) {
            refuse("DSV4 compressor state metadata mismatch");
        }
        if (n_layer_ref != n_layer) {
            refuse("DSV4 compressor state layer count mismatch");
        }
        const uint32_t s0 = dst_stream(cs->get_n_stream(), seq_id, ns);
        for (uint32_t i = 0; i < n_layer; ++i) {
            if (get<uint32_t>(io) != cap->u32(24 + i*per_layer)) {
                refuse("DSV4 compressor state layer id mismatch");
            }
            for (uint32_t j = 0; j < 2; ++j) {
                ggml_tensor * t = state_size > 0 ? cap->tensors[(size_t) (2*i + j)*ns_w] : nullptr;
                if (t == nullptr) {
                    // (no rows: only the metadata, which must say so)
                    get<int32_t>(io);
                    get<uint64_t>(io);
                    if (get<uint64_t>(io) != 0) {
                        refuse("DSV4 state tensor metadata mismatch");
                    }
                    get<uint64_t>(io);
                    continue;
                }
                tensor_rows(io, t, state_size, state_size, s0, ns);
            }
        }
    };
    return true;
}

} // namespace dsv4

// The parts `memory->state_read(io, seq, flags)` reads, in order (the composites' own order
// and PARTIAL_ONLY rule). False for a memory kind this file does not know.
bool leaves_of(llama_memory_i * memory, llama_state_seq_flags flags, std::vector<leaf> & out, llama_seq_id seq_id = -1) {
    const bool partial = (flags & LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY) != 0;
    if (memory == nullptr) {
        return true;
    }
    if (auto * kv = dynamic_cast<llama_kv_cache *>(memory)) {
        // (a cache over another's cells reads and writes no state)
        if (!kv->shared()) {
            out.push_back({ kv->handle(), true, {} });
        }
        return true;
    }
    if (auto * rs = dynamic_cast<llama_memory_recurrent *>(memory)) {
        out.push_back({ rs->handle(), false, {} });
        return true;
    }
    // deepseek4: its header, the raw cache's parts, the compressed caches' K rows (not with
    // PARTIAL_ONLY), then the three compressor states
    if (auto * d4 = dynamic_cast<llama_kv_cache_dsv4 *>(memory)) {
        out.push_back(dsv4::header(partial));
        if (!leaves_of(d4->get_raw(), flags, out, seq_id)) {
            return false;
        }
        if (!partial) {
            for (llama_kv_cache * kv : { d4->get_csa(), d4->get_hca(), d4->get_lid() }) {
                out.push_back(dsv4::k_cache(kv, seq_id));
            }
        }
        for (llama_dsv4_comp_state * cs : { d4->get_csa_state(), d4->get_hca_state(), d4->get_lid_state() }) {
            leaf l;
            if (!dsv4::comp_state(cs, d4, seq_id, flags, l)) {
                return false;
            }
            out.push_back(std::move(l));
        }
        return true;
    }
    if (auto * iswa = dynamic_cast<llama_kv_cache_iswa *>(memory)) {
        return (partial || leaves_of(iswa->get_base(), flags, out, seq_id)) && leaves_of(iswa->get_swa(), flags, out, seq_id);
    }
    // the composites over KV caches that read every part whatever the flags (a KV cache
    // ignores PARTIAL_ONLY), in their state's order
    if (auto * dsa = dynamic_cast<llama_kv_cache_dsa *>(memory)) {
        return leaves_of(dsa->get_mla(), flags, out) && leaves_of(dsa->get_lid(), flags, out);
    }
    if (auto * di = dynamic_cast<llama_kv_cache_dsa_iswa *>(memory)) {
        return (partial || leaves_of(di->get_dsa(), flags, out)) && leaves_of(di->get_swa(), flags, out);
    }
    if (auto * msa = dynamic_cast<llama_kv_cache_msa *>(memory)) {
        return leaves_of(msa->get_base(), flags, out) && leaves_of(msa->get_idx(), flags, out);
    }
    // (before llama_memory_hybrid, which it derives from) attention, recurrent, then the
    // indexer cache, which restores into the attention cache's layout: its dry run searches a
    // slot of its own, which finds room where the attention cache, whose cells it mirrors, does
    if (auto * hx = dynamic_cast<llama_memory_hybrid_idx *>(memory)) {
        return (partial || leaves_of(hx->get_mem_attn(), flags, out)) && leaves_of(hx->get_mem_recr(), flags, out) &&
               (partial || leaves_of(hx->get_mem_idx(), flags, out));
    }
    if (auto * hy = dynamic_cast<llama_memory_hybrid *>(memory)) {
        return (partial || leaves_of(hy->get_mem_attn(), flags, out)) && leaves_of(hy->get_mem_recr(), flags, out);
    }
    if (auto * hi = dynamic_cast<llama_memory_hybrid_iswa *>(memory)) {
        return leaves_of(hi->get_mem_attn(), flags, out) && leaves_of(hi->get_mem_recr(), flags, out);
    }
    return false;
}

// Bytes in memory read in order, as upstream's llama_io_read_host reads them.
class byte_reader : public llama_io_read_i {
public:
    byte_reader(const uint8_t * p, size_t len) : ptr(p), left(len) {}

    void read(void * dst, size_t size) override { memcpy(dst, take(size), size); }

    size_t n_bytes() override { return size_read; }

    size_t remaining() const { return left; }

protected:
    // the next `size` bytes
    const uint8_t * take(size_t size) {
        if (size > left) {
            throw std::runtime_error("unexpectedly reached end of buffer");
        }
        const uint8_t * at = ptr;
        ptr += size;
        left -= size;
        size_read += size;
        return at;
    }

private:
    const uint8_t * ptr;
    size_t left;
    size_t size_read = 0;
};

// Reads a restore's input without applying it: fields from the bytes, tensor ranges counted
// (from the bytes, or, ON_DEVICE, per buffer type from the stash as llama_io_read_device).
class check_reader : public byte_reader {
public:
    check_reader(const uint8_t * p, size_t len, bool device) : byte_reader(p, len), device(device) {}

    void read_tensor(ggml_tensor * tensor, size_t offset, size_t size) override {
        GGML_UNUSED(offset);
        if (device) {
            // (the bytes are the context's stash, not the input's: not checked for finiteness)
            stash[ggml_backend_buffer_get_type(tensor->buffer)] += size;
            return;
        }
        const uint8_t * data = take(size);
        size_t at = 0;
        if (check_finite && llama_memory_data_is_finite(tensor->type, data, size, &at) == 0) {
            non_finite = format("the state's %s data holds a NaN or an infinity (element %zu; "
                                "LLAMA_MEMORY_CHECK_FINITE is set)", ggml_get_name(tensor), at);
            throw std::runtime_error(non_finite);
        }
    }

    std::map<ggml_backend_buffer_type_t, size_t> stash;
    // LLAMA_MEMORY_CHECK_FINITE: tensor data with a NaN or an infinity is refused (and why)
    bool check_finite = false;
    std::string non_finite;

private:
    bool device;
};

// A restore's reader over bytes in memory, as upstream's llama_io_read_host: tensor ranges are
// written when it is destroyed, unless discarded.
class host_reader : public byte_reader {
public:
    using byte_reader::byte_reader;

    ~host_reader() override {
        for (const auto & w : pending) {
            ggml_backend_tensor_set(w.tensor, w.src, w.offset, w.size);
        }
    }

    void read_tensor(ggml_tensor * tensor, size_t offset, size_t size) override {
        pending.push_back({ tensor, take(size), offset, size });
    }

    void discard() override { pending.clear(); }

private:
    struct write {
        ggml_tensor * tensor;
        const uint8_t * src;
        size_t offset;
        size_t size;
    };

    std::vector<write> pending;
};

// What a dry run of a memory's restore found.
struct verdict {
    bool known = true;   // every part is a memory kind this file can check
    bool ok = true;
    size_t part = 0;     // the first invalid part
    bool unchanged = false; // stock's restore would fail before changing anything
    bool own = false;    // a failure only the drop-in sees (stock's restore would take it)
    std::string what;    // the error stock's restore would throw
    std::vector<llama_memory_dropin_log_line> lines; // what the parts up to it would have logged
    size_t consumed = 0;
    size_t remaining = 0;
    std::map<ggml_backend_buffer_type_t, size_t> stash;
};

verdict check_memory(llama_memory_i * memory, const uint8_t * p, size_t len, llama_seq_id seq_id,
                     llama_state_seq_flags flags) {
    verdict v;
    std::vector<leaf> leaves;
    if (!leaves_of(memory, flags, leaves, seq_id)) {
        v.known = false;
        return v;
    }
    check_reader io(p, len, (flags & LLAMA_STATE_SEQ_FLAGS_ON_DEVICE) != 0);
    // read at each restore, so a program can set it at any time
    const char * env = getenv("LLAMA_MEMORY_CHECK_FINITE");
    io.check_finite = env != nullptr && *env != '\0' && strcmp(env, "0") != 0;
    // stock's restore logs each part's lines as it goes: they are printed if a later part fails
    std::vector<llama_memory_dropin_log_line> lines;
    // a composite's own header before its first leaf changes nothing when stock's restore
    // fails there: up to that leaf, a failure is the first part's
    size_t first_leaf = 0;
    while (first_leaf < leaves.size() && leaves[first_leaf].mem == nullptr) {
        ++first_leaf;
    }
    for (size_t i = 0; i < leaves.size(); ++i) {
        const leaf & l = leaves[i];
        if (l.own) {
            try {
                llama_memory_dropin_log_capture = &lines;
                l.own(io);
                llama_memory_dropin_log_capture = nullptr;
                continue;
            } catch (const std::exception & e) {
                llama_memory_dropin_log_capture = nullptr;
                v.ok = false;
                v.part = i < first_leaf ? 0 : i;
                v.unchanged = i < first_leaf;
                v.what = e.what();
            }
            if (!io.non_finite.empty()) {
                v.own = true;
                v.unchanged = false;
            }
            v.lines = std::move(lines);
            return v;
        }
        llama_memory_dropin_reader r{ io };
        const llama_memory_io_read cb = r.callbacks();
        llama_memory_dropin_log_capture = &lines;
        const llama_memory_result rc = llama_memory_state_check_io(l.mem, seq_id, flags, &cb);
        llama_memory_dropin_log_capture = nullptr;
        if (rc == LLAMA_MEMORY_OK) {
            continue;
        }
        const int32_t stage = llama_memory_state_read_stage(l.mem);
        v.ok = false;
        v.part = i == first_leaf ? 0 : i;
        v.unchanged = i == first_leaf &&
            (stage == LLAMA_MEMORY_READ_HEADER || (seq_id != -1 && l.kv && stage == LLAMA_MEMORY_READ_COUNT));
        try {
            std::rethrow_exception(llama_memory_dropin_read_error(l.mem, r.error, l.kv));
        } catch (const std::exception & e) {
            v.what = e.what();
        }
        if (!io.non_finite.empty()) {
            v.own = true;
            v.unchanged = false;
            v.what = io.non_finite;
        }
        v.lines = std::move(lines);
        return v;
    }
    v.consumed = io.n_bytes();
    v.remaining = io.remaining();
    v.stash = std::move(io.stash);
    return v;
}

// The failure effect for a state stock's restore would have changed: the destination erased
// from every part (its rows zeroed where stock's state_clear zeroes them), or, for a whole
// state, everything cleared.
void erase_everywhere(llama_memory_i * memory, llama_seq_id seq_id) {
    std::vector<leaf> all;
    leaves_of(memory, 0, all);
    for (const leaf & l : all) {
        if (l.mem == nullptr) {
            // (a composite's own part: its seq_rm/clear below erases it)
            continue;
        }
        if (seq_id == -1) {
            llama_memory_dropin_clear(l.mem, true);
        } else if (l.kv) {
            llama_memory_kv_state_clear(l.mem, seq_id);
        } else {
            llama_memory_dropin_seq_rm(l.mem, seq_id, -1, -1);
        }
    }
    // then the same through the composite, on parts already empty there: its own bookkeeping
    // of what changed behind it (hybrid-idx's k-pool layout, which a restore's failure
    // re-derives in upstream's state_drop) and the adapters' cell mirrors follow
    // (a negative id other than -1 is no sequence: seq_rm would take it for "every sequence")
    try {
        if (seq_id == -1) {
            memory->clear(true);
        } else if (seq_id >= 0 && seq_id < LLAMA_MAX_SEQ) {
            memory->seq_rm(seq_id, -1, -1);
        }
    } catch (...) {
        // (nothing left to remove: a part that refuses has nothing to refuse)
    }
}

size_t n_leaves(llama_memory_i * memory) {
    std::vector<leaf> all;
    leaves_of(memory, 0, all);
    size_t n = 0;
    for (const leaf & l : all) {
        n += l.mem != nullptr;
    }
    return n;
}

// Reads the arch string of a whole state (llama_context::state_read_data's first field)
// without allocating what a hostile length asks for. False when it is not this model's.
bool check_arch(const llama_context * ctx, const uint8_t * p, size_t len, size_t & used) {
    uint32_t n = 0;
    if (len < sizeof(n)) {
        return false;
    }
    memcpy(&n, p, sizeof(n));
    const std::string cur = llm_arch_name(ctx->get_model().arch);
    if (n != cur.size() || len - sizeof(n) < n || memcmp(p + sizeof(n), cur.data(), n) != 0) {
        return false;
    }
    used = sizeof(n) + n;
    return true;
}

// A whole file, from a regular file only: a FIFO, a device or a directory is refused before
// any read (opened non-blocking, so a FIFO without a writer cannot hang the open).
bool read_file(const char * path, std::vector<uint8_t> & out, std::string & err) {
    if (path == nullptr) {
        err = "the path is NULL";
        return false;
    }
    const int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        err = format("failed to open %s: %s", path, strerror(errno));
        return false;
    }
    struct stat st = {};
    bool ok = fstat(fd, &st) == 0;
    if (!ok) {
        err = format("failed to open %s: %s", path, strerror(errno));
    } else if (!S_ISREG(st.st_mode)) {
        err = format("failed to open %s: not a regular file", path);
        ok = false;
    }
    if (ok) {
        try {
            out.resize((size_t) st.st_size);
        } catch (const std::exception &) {
            err = format("failed to open %s: %lld bytes do not fit in memory", path, (long long) st.st_size);
            ok = false;
        }
    }
    size_t got = 0;
    while (ok && got < out.size()) {
        const ssize_t n = ::read(fd, out.data() + got, out.size() - got);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            err = n < 0 ? format("read error: %s", strerror(errno)) : std::string("the file shrank while it was read");
            ok = false;
            break;
        }
        got += (size_t) n;
    }
    close(fd);
    return ok;
}

// False for a path a save would block on (a FIFO without a reader) or that is a socket, and
// for NULL where the save would read.
bool writable_path(const char * path, std::string & err, const llama_token * tokens, size_t n_tokens) {
    if (path == nullptr) {
        err = "the path is NULL";
        return false;
    }
    if (tokens == nullptr && n_tokens > 0) {
        err = "tokens is NULL";
        return false;
    }
    struct stat st = {};
    if (stat(path, &st) == 0 && (S_ISFIFO(st.st_mode) || S_ISSOCK(st.st_mode))) {
        err = format("failed to open %s: not a regular file", path);
        return false;
    }
    return true;
}

uint32_t u32_at(const uint8_t * p) {
    uint32_t v;
    memcpy(&v, p, sizeof(v));
    return v;
}

} // namespace

// A friend of llama_context: reads its ON_DEVICE stash, calls its private state readers.
struct llama_memory_dropin_state {
    // A destination no memory can have (stock aborts on it): refused before anything runs,
    // upstream's restore included (a composite's failure path would take a negative id for
    // "every sequence": hybrid-idx's state_drop empties every recurrent state with it).
    static bool dest_exists(llama_context * ctx, llama_seq_id seq_id, const char * prefix) {
        llama_memory_i * memory = ctx->get_memory();
        if (seq_id >= -1 && seq_id < (memory ? llama_dropin_seq_limit(memory) : LLAMA_MAX_SEQ)) {
            return true;
        }
        LLAMA_LOG_ERROR("%sinvalid destination sequence %d\n", prefix, seq_id);
        return false;
    }

    // After a dry run found the input invalid: stock's failure value, with the effect the file
    // header describes. `stock` runs upstream's restore on the input (for an invalid first
    // part: it fails there, and what it returns is returned); `prefix` is the entry point's
    // error line.
    template <typename R, typename F>
    static R fail(llama_context * ctx, const verdict & v, llama_seq_id seq_id, F && stock, const char * prefix,
                  bool seq_entry = false) {
        llama_memory_i * memory = ctx->get_memory();
        if (v.part == 0 && !v.own) {
            const R r = stock();
            if (!r && !v.unchanged && n_leaves(memory) > 1) {
                erase_everywhere(memory, seq_id);
            }
            return r;
        }
        for (const auto & line : v.lines) {
            llama_log_internal((ggml_log_level) line.level, "%s", line.text.c_str());
        }
        LLAMA_LOG_ERROR("%s%s\n", prefix, v.what.c_str());
        // (a sequence state restored "into every sequence" names no destination to erase: the
        // dry run refused it before any change, and nothing changes)
        if (!(seq_entry && seq_id == -1)) {
            erase_everywhere(memory, seq_id);
        }
        return R();
    }

    static size_t set_data(llama_context * ctx, const uint8_t * src, size_t size) {
        size_t off = 0;
        if (src == nullptr || !check_arch(ctx, src, size, off)) {
            // upstream fails on its first field, changing nothing
            return src ? llama_upstream_state_set_data(ctx, src, size) : 0;
        }
        const verdict v = check_memory(ctx->get_memory(), src + off, size - off, -1, 0);
        if (!v.known || v.ok) {
            return llama_upstream_state_set_data(ctx, src, size);
        }
        return fail<size_t>(ctx, v, -1, [&] { return llama_upstream_state_set_data(ctx, src, size); },
                            "state_set_data: error loading state: ");
    }

    static size_t seq_set_data(llama_context * ctx, const uint8_t * src, size_t size, llama_seq_id seq_id,
                               llama_state_seq_flags flags) {
        const bool device = (flags & LLAMA_STATE_SEQ_FLAGS_ON_DEVICE) != 0;
        const char * prefix = "state_seq_set_data: error loading state: ";
        if (!dest_exists(ctx, seq_id, prefix)) {
            return 0;
        }
        if (src == nullptr || size < 8 || u32_at(src) != seq_blob_magic) {
            if (!device && src != nullptr) {
                // upstream fails on its first fields, inside its try, changing nothing
                return llama_upstream_state_seq_set_data_ext(ctx, src, size, seq_id, flags);
            }
            // (upstream reads an ON_DEVICE blob's first fields outside its try: the exception
            // would leave llama.h)
            LLAMA_LOG_ERROR("%s%s\n", prefix,
                src == nullptr ? "the state is NULL" :
                size < 8       ? "unexpectedly reached end of buffer" : "wrong sequence state magic");
            return 0;
        }
        llama_seq_id seq_id_read;
        memcpy(&seq_id_read, src + 4, sizeof(seq_id_read));
        auto stored = ctx->mem_storage.end();
        if (device) {
            stored = ctx->mem_storage.find(seq_id_read);
            if (stored == ctx->mem_storage.end()) {
                LLAMA_LOG_ERROR("%sno ON_DEVICE state of sequence %d was saved by this context\n", prefix, seq_id_read);
                return 0;
            }
        }
        const verdict v = check_memory(ctx->get_memory(), src + 8, size - 8, seq_id, flags);
        if (!v.known) {
            return llama_upstream_state_seq_set_data_ext(ctx, src, size, seq_id, flags);
        }
        if (!v.ok) {
            return fail<size_t>(ctx, v, seq_id,
                                [&] { return llama_upstream_state_seq_set_data_ext(ctx, src, size, seq_id, flags); },
                                prefix, true);
        }
        if (device) {
            // llama_io_read_device's own checks, which abort: the blob read to its end, and
            // per buffer type as many tensor bytes as the stash holds
            std::string why;
            if (v.remaining != 0) {
                why = format("%zu bytes after the state", v.remaining);
            }
            for (const auto & [buft, n] : v.stash) {
                const auto it = stored->second.find(buft);
                if (why.empty() && (it == stored->second.end() || !it->second.buf || it->second.total_size != n)) {
                    why = format("the state's %zu tensor bytes in %s do not match the %zu bytes stashed for sequence %d",
                                 n, ggml_backend_buft_name(buft),
                                 it == stored->second.end() ? (size_t) 0 : it->second.total_size, seq_id_read);
                }
            }
            if (!why.empty()) {
                LLAMA_LOG_ERROR("%s%s\n", prefix, why.c_str());
                erase_everywhere(ctx->get_memory(), seq_id);
                return 0;
            }
        }
        return llama_upstream_state_seq_set_data_ext(ctx, src, size, seq_id, flags);
    }

    static bool load_file(llama_context * ctx, const char * path, llama_token * tokens_out, size_t n_token_capacity,
                          size_t * n_token_count_out) {
        const char * prefix = "llama_state_load_file: error loading session file: ";
        ctx->synchronize();
        std::vector<uint8_t> buf;
        std::string err;
        if (!read_file(path, buf, err)) {
            LLAMA_LOG_ERROR("%s%s\n", prefix, err.c_str());
            return false;
        }
        if (buf.size() < 12) {
            LLAMA_LOG_ERROR("%s%s\n", prefix, "unexpectedly reached end of file");
            return false;
        }
        const uint32_t magic = u32_at(buf.data());
        const uint32_t version = u32_at(buf.data() + 4);
        if (magic != LLAMA_SESSION_MAGIC || version != LLAMA_SESSION_VERSION) {
            LLAMA_LOG_ERROR("%s: unknown (magic, version) for session file: %08x, %08x\n", "state_load_file", magic, version);
            return false;
        }
        const uint32_t n_token_count = u32_at(buf.data() + 8);
        if (n_token_count > n_token_capacity) {
            LLAMA_LOG_ERROR("%s: token count in session file exceeded capacity! %u > %zu\n", "state_load_file",
                            n_token_count, n_token_capacity);
            return false;
        }
        const size_t n_tokens_bytes = sizeof(llama_token) * (size_t) n_token_count;
        if (buf.size() - 12 < n_tokens_bytes || (n_token_count > 0 && tokens_out == nullptr) || n_token_count_out == nullptr) {
            LLAMA_LOG_ERROR("%s%s\n", prefix,
                n_token_count_out == nullptr ? "n_token_count_out is NULL" :
                buf.size() - 12 < n_tokens_bytes ? "unexpectedly reached end of file" : "tokens_out is NULL");
            return false;
        }
        const uint8_t * state = buf.data() + 12 + n_tokens_bytes;
        const size_t n_state = buf.size() - 12 - n_tokens_bytes;

        auto restore = [&]() -> bool {
            host_reader io(state, n_state);
            try {
                ctx->state_read_data(io);
                return true;
            } catch (const std::exception & e) {
                LLAMA_LOG_ERROR("%s%s\n", prefix, e.what());
                io.discard();
                return false;
            }
        };
        // (upstream's restore runs on an input it fails on, for its logs and effect: a bad arch,
        // an invalid first part; should it succeed after all, the state is restored)
        bool restored = false;
        size_t off = 0;
        if (!check_arch(ctx, state, n_state, off)) {
            if (!restore()) {
                return false;
            }
            restored = true;
        } else {
            const verdict v = check_memory(ctx->get_memory(), state + off, n_state - off, -1, 0);
            if (v.known && !v.ok) {
                if (!fail<bool>(ctx, v, -1, restore, prefix)) {
                    return false;
                }
                restored = true;
            } else if (v.known && v.remaining != 0) {
                LLAMA_LOG_ERROR("%s: did not read all of the session file data! size %zu, got %zu\n",
                                "state_load_file", n_state, off + v.consumed);
                erase_everywhere(ctx->get_memory(), -1);
                return false;
            }
        }
        if (!restored && !restore()) {
            return false;
        }
        memcpy(tokens_out, buf.data() + 12, n_tokens_bytes);
        *n_token_count_out = n_token_count;
        return true;
    }

    static size_t seq_load_file(llama_context * ctx, const char * path, llama_seq_id seq_id, llama_token * tokens_out,
                                size_t n_token_capacity, size_t * n_token_count_out) {
        const char * prefix = "llama_state_seq_load_file: error loading sequence state file: ";
        if (!dest_exists(ctx, seq_id, prefix)) {
            return 0;
        }
        ctx->synchronize();
        std::vector<uint8_t> buf;
        std::string err;
        if (!read_file(path, buf, err)) {
            LLAMA_LOG_ERROR("%s%s\n", prefix, err.c_str());
            return 0;
        }
        if (buf.size() < 12) {
            LLAMA_LOG_ERROR("%s%s\n", prefix, "unexpectedly reached end of file");
            return 0;
        }
        const uint32_t magic = u32_at(buf.data());
        const uint32_t version = u32_at(buf.data() + 4);
        if (magic != LLAMA_STATE_SEQ_MAGIC || version != LLAMA_STATE_SEQ_VERSION) {
            LLAMA_LOG_ERROR("%s: unknown (magic, version) for sequence state file: %08x, %08x\n", "state_seq_load_file",
                            magic, version);
            return 0;
        }
        const uint32_t n_token_count = u32_at(buf.data() + 8);
        if (n_token_count_out == nullptr) {
            LLAMA_LOG_ERROR("%s%s\n", prefix, "n_token_count_out is NULL");
            return 0;
        }
        if (tokens_out == nullptr) {
            const size_t n_token_max = (buf.size() - 12) / sizeof(llama_token);
            if (n_token_count > n_token_max) {
                LLAMA_LOG_ERROR("%s: token count in sequence state file exceeds the file size! %u > %zu\n",
                                "state_seq_load_file", n_token_count, n_token_max);
                return 0;
            }
            *n_token_count_out = n_token_count;
            return 12;
        }
        if (n_token_count > n_token_capacity) {
            LLAMA_LOG_ERROR("%s: token count in sequence state file exceeded capacity! %u > %zu\n", "state_seq_load_file",
                            n_token_count, n_token_capacity);
            return 0;
        }
        const size_t n_tokens_bytes = sizeof(llama_token) * (size_t) n_token_count;
        if (buf.size() - 12 < n_tokens_bytes) {
            LLAMA_LOG_ERROR("%s%s\n", prefix, "unexpectedly reached end of file");
            return 0;
        }
        const uint8_t * state = buf.data() + 12 + n_tokens_bytes;
        const size_t n_state = buf.size() - 12 - n_tokens_bytes;

        size_t nread = 0;
        auto restore = [&]() -> bool {
            host_reader io(state, n_state);
            try {
                nread = ctx->state_seq_read_data(io, seq_id, 0);
                return true;
            } catch (const std::exception & e) {
                LLAMA_LOG_ERROR("%s%s\n", prefix, e.what());
                io.discard();
                return false;
            }
        };
        const verdict v = check_memory(ctx->get_memory(), state, n_state, seq_id, 0);
        if (v.known && !v.ok ? !fail<bool>(ctx, v, seq_id, restore, prefix, true) : !restore()) {
            return 0;
        }
        if (nread == 0) {
            LLAMA_LOG_ERROR("%s: failed to restore sequence state\n", "state_seq_load_file");
            return 0;
        }
        memcpy(tokens_out, buf.data() + 12, n_tokens_bytes);
        *n_token_count_out = n_token_count;
        return 12 + n_tokens_bytes + nread;
    }
};

//
// llama.h: every entry point catches everything
//

#define LLAMA_DROPIN_GUARD(fail_value, body)                                          \
    if (ctx == nullptr) {                                                             \
        LLAMA_LOG_ERROR("%s: the context is NULL\n", __func__);                       \
        return fail_value;                                                            \
    }                                                                                 \
    try {                                                                             \
        body                                                                          \
    } catch (const std::exception & e) {                                              \
        LLAMA_LOG_ERROR("%s: %s\n", __func__, e.what());                              \
    } catch (...) {                                                                   \
        LLAMA_LOG_ERROR("%s: unknown exception\n", __func__);                         \
    }                                                                                 \
    return fail_value;

size_t llama_state_get_size(llama_context * ctx) {
    LLAMA_DROPIN_GUARD(0, { return llama_upstream_state_get_size(ctx); })
}

size_t llama_get_state_size(llama_context * ctx) {
    return llama_state_get_size(ctx);
}

size_t llama_state_get_data(llama_context * ctx, uint8_t * dst, size_t size) {
    LLAMA_DROPIN_GUARD(0, {
        if (dst == nullptr && size > 0) {
            LLAMA_LOG_ERROR("%s: dst is NULL\n", __func__);
            return 0;
        }
        return llama_upstream_state_get_data(ctx, dst, size);
    })
}

size_t llama_copy_state_data(llama_context * ctx, uint8_t * dst) {
    return llama_state_get_data(ctx, dst, -1);
}

size_t llama_state_set_data(llama_context * ctx, const uint8_t * src, size_t size) {
    LLAMA_DROPIN_GUARD(0, {
        ctx->synchronize();
        return llama_memory_dropin_state::set_data(ctx, src, size);
    })
}

size_t llama_set_state_data(llama_context * ctx, const uint8_t * src) {
    return llama_state_set_data(ctx, src, -1);
}

bool llama_state_load_file(llama_context * ctx, const char * path_session, llama_token * tokens_out,
                           size_t n_token_capacity, size_t * n_token_count_out) {
    LLAMA_DROPIN_GUARD(false, {
        return llama_memory_dropin_state::load_file(ctx, path_session, tokens_out, n_token_capacity, n_token_count_out);
    })
}

bool llama_load_session_file(llama_context * ctx, const char * path_session, llama_token * tokens_out,
                             size_t n_token_capacity, size_t * n_token_count_out) {
    return llama_state_load_file(ctx, path_session, tokens_out, n_token_capacity, n_token_count_out);
}

bool llama_state_save_file(llama_context * ctx, const char * path_session, const llama_token * tokens,
                           size_t n_token_count) {
    LLAMA_DROPIN_GUARD(false, {
        std::string err;
        if (!writable_path(path_session, err, tokens, n_token_count)) {
            LLAMA_LOG_ERROR("llama_state_save_file: error saving session file: %s\n", err.c_str());
            return false;
        }
        return llama_upstream_state_save_file(ctx, path_session, tokens, n_token_count);
    })
}

bool llama_save_session_file(llama_context * ctx, const char * path_session, const llama_token * tokens,
                             size_t n_token_count) {
    return llama_state_save_file(ctx, path_session, tokens, n_token_count);
}

size_t llama_state_seq_get_size(llama_context * ctx, llama_seq_id seq_id) {
    return llama_state_seq_get_size_ext(ctx, seq_id, 0);
}

size_t llama_state_seq_get_data(llama_context * ctx, uint8_t * dst, size_t size, llama_seq_id seq_id) {
    return llama_state_seq_get_data_ext(ctx, dst, size, seq_id, 0);
}

size_t llama_state_seq_set_data(llama_context * ctx, const uint8_t * src, size_t size, llama_seq_id seq_id) {
    return llama_state_seq_set_data_ext(ctx, src, size, seq_id, 0);
}

size_t llama_state_seq_get_size_ext(llama_context * ctx, llama_seq_id seq_id, llama_state_seq_flags flags) {
    LLAMA_DROPIN_GUARD(0, { return llama_upstream_state_seq_get_size_ext(ctx, seq_id, flags); })
}

size_t llama_state_seq_get_data_ext(llama_context * ctx, uint8_t * dst, size_t size, llama_seq_id seq_id,
                                    llama_state_seq_flags flags) {
    LLAMA_DROPIN_GUARD(0, {
        if (dst == nullptr && size > 0) {
            LLAMA_LOG_ERROR("%s: dst is NULL\n", __func__);
            return 0;
        }
        return llama_upstream_state_seq_get_data_ext(ctx, dst, size, seq_id, flags);
    })
}

size_t llama_state_seq_set_data_ext(llama_context * ctx, const uint8_t * src, size_t size, llama_seq_id seq_id,
                                    llama_state_seq_flags flags) {
    LLAMA_DROPIN_GUARD(0, {
        ctx->synchronize();
        return llama_memory_dropin_state::seq_set_data(ctx, src, size, seq_id, flags);
    })
}

size_t llama_state_seq_save_file(llama_context * ctx, const char * filepath, llama_seq_id seq_id,
                                 const llama_token * tokens, size_t n_token_count) {
    LLAMA_DROPIN_GUARD(0, {
        std::string err;
        if (!writable_path(filepath, err, tokens, n_token_count)) {
            LLAMA_LOG_ERROR("llama_state_seq_save_file: error saving sequence state file: %s\n", err.c_str());
            return 0;
        }
        return llama_upstream_state_seq_save_file(ctx, filepath, seq_id, tokens, n_token_count);
    })
}

size_t llama_state_seq_load_file(llama_context * ctx, const char * filepath, llama_seq_id dest_seq_id,
                                 llama_token * tokens_out, size_t n_token_capacity, size_t * n_token_count_out) {
    LLAMA_DROPIN_GUARD(0, {
        return llama_memory_dropin_state::seq_load_file(ctx, filepath, dest_seq_id, tokens_out, n_token_capacity,
                                                        n_token_count_out);
    })
}
