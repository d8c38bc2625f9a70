//! Malformed states through the C ABI: every input gets the failure value (0), a last-error
//! code and message, and leaves the memory exactly as it was: cells, per-sequence ranges and
//! every byte of every K/V tensor (including cells the state does not cover).
//!
//! llama.cpp differs here on purpose: it erases the destination sequence (or the whole cache)
//! when a restore fails, and aborts or throws on some of these inputs.
//!
//! Every rejected input (of a host blob with a well-formed header) is also fed through a
//! caller's reader (`llama_memory_state_read_io`, what the drop-in's adapter uses), which must
//! refuse it too and change nothing; `io_path_matches_the_blob_path` checks that the reader and
//! writer paths give the same bytes and the same restores as the blob path.

use std::ffi::{CStr, CString};

use llama_memory::ffi::error::{
    llama_memory_last_error, llama_memory_last_error_code, llama_memory_result,
};
use llama_memory::ffi::*;

const F16: i32 = 1;
const SIZE: u32 = 32;
const GQA: u32 = 8;

struct Mem(llama_memory_t);

impl Drop for Mem {
    fn drop(&mut self) {
        llama_memory_free(self.0);
    }
}

fn mem(unified: bool, v_trans: bool, n_seq_max: u32) -> Mem {
    let mut p = llama_memory_kv_default_params();
    p.size = SIZE;
    p.n_seq_max = n_seq_max;
    p.unified = unified;
    p.v_trans = v_trans;
    let layers: Vec<llama_memory_kv_layer> = (0..2)
        .map(|il| llama_memory_kv_layer {
            il,
            n_embd_k_gqa: GQA,
            n_embd_v_gqa: GQA,
            reuse: -1,
            buft: std::ptr::null_mut(),
        })
        .collect();
    let mut sp = llama_memory_kv_storage_default_params();
    sp.type_k = F16;
    sp.type_v = F16;
    sp.layers = layers.as_ptr();
    sp.n_layers = layers.len();
    let m = llama_memory_kv_init_with_storage(p, &sp);
    assert!(!m.is_null(), "{}", last_error());
    Mem(m)
}

fn last_error() -> String {
    // SAFETY: the library returns a valid NUL-terminated string.
    unsafe { CStr::from_ptr(llama_memory_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Places `n` tokens of `seq` at positions `p0..`, then writes recognisable bytes into every
/// K/V element of the cells it got.
fn fill(m: &Mem, seq: i32, p0: i32, n: usize) {
    let pos: Vec<i32> = (p0..p0 + n as i32).collect();
    let tok = vec![1; n];
    let n_seq = vec![1i32; n];
    let seq_ids = vec![seq; n];
    let seq_ptrs: Vec<*const i32> = seq_ids.iter().map(|s| s as *const i32).collect();
    let ub = llama_memory_ubatch {
        n_tokens: n as u32,
        n_seq_tokens: n as u32,
        n_seqs: 1,
        n_seqs_unq: 1,
        n_pos: 1,
        equal_seqs: 0,
        token: tok.as_ptr(),
        pos: pos.as_ptr(),
        n_seq_id: n_seq.as_ptr(),
        seq_id: seq_ptrs.as_ptr(),
        seq_id_unq: &seq,
        seq_idx: std::ptr::null(),
        output: std::ptr::null(),
        type_: std::ptr::null(),
    };
    let ctx = llama_memory_init_batch(m.0, &ub, 1);
    assert!(!ctx.is_null(), "{}", last_error());
    assert_eq!(
        llama_memory_ctx_apply(ctx),
        llama_memory_result::LLAMA_MEMORY_OK
    );
    llama_memory_ctx_free(ctx);
    for il in 0..2 {
        for t in [
            llama_memory_kv_get_k_tensor(m.0, il),
            llama_memory_kv_get_v_tensor(m.0, il),
        ] {
            // SAFETY: a live tensor of the memory, in a host buffer.
            let bytes = unsafe { ggml_sys::ggml_nbytes(t) };
            let data: Vec<u8> = (0..bytes)
                .map(|i| (i * 7 + seq as usize * 13 + 1) as u8)
                .collect();
            // SAFETY: same tensor, exactly its size.
            unsafe { ggml_sys::ggml_backend_tensor_set(t, data.as_ptr().cast(), 0, bytes) };
        }
    }
}

/// Everything observable: whole state, per-sequence ranges, used cells, every tensor byte.
fn snapshot(m: &Mem) -> Vec<u8> {
    let n = llama_memory_state_get_size(m.0);
    let mut out = vec![0u8; n];
    assert_eq!(llama_memory_state_get_data(m.0, out.as_mut_ptr(), n), n);
    for s in 0..llama_memory_n_seq_max(m.0) as i32 {
        out.extend(llama_memory_seq_pos_min(m.0, s).to_ne_bytes());
        out.extend(llama_memory_seq_pos_max(m.0, s).to_ne_bytes());
    }
    for st in 0..llama_memory_kv_n_stream(m.0) {
        out.extend(llama_memory_kv_n_used(m.0, st).to_ne_bytes());
    }
    for il in 0..2 {
        for t in [
            llama_memory_kv_get_k_tensor(m.0, il),
            llama_memory_kv_get_v_tensor(m.0, il),
        ] {
            // SAFETY: live host tensor, read in full.
            let bytes = unsafe { ggml_sys::ggml_nbytes(t) };
            let mut d = vec![0u8; bytes];
            // SAFETY: as above; `d` holds the `bytes` bytes read.
            unsafe { ggml_sys::ggml_backend_tensor_get(t, d.as_mut_ptr().cast(), 0, bytes) };
            out.extend(d);
        }
    }
    out
}

fn seq_blob(m: &Mem, seq: i32) -> Vec<u8> {
    let n = llama_memory_state_seq_get_size(m.0, seq);
    assert!(n > 0, "{}", last_error());
    let mut b = vec![0u8; n];
    assert_eq!(
        llama_memory_state_seq_get_data(m.0, b.as_mut_ptr(), n, seq),
        n
    );
    b
}

/// A populated unified memory: seq 0 at positions 0..6, seq 1 at 0..4.
fn populated() -> Mem {
    let m = mem(true, true, 2);
    fill(&m, 0, 0, 6);
    fill(&m, 1, 0, 4);
    m
}

/// Restores `blob` into `dest` and expects failure with `code` and no change at all.
#[track_caller]
fn rejects(m: &Mem, blob: &[u8], dest: i32, code: llama_memory_result) -> String {
    let before = snapshot(m);
    let r = llama_memory_state_seq_set_data(m.0, blob.as_ptr(), blob.len(), dest);
    let msg = last_error();
    assert_eq!(r, 0, "accepted a malformed blob (dest {dest})");
    assert_eq!(llama_memory_last_error_code(), code, "{msg}");
    assert!(!msg.is_empty());
    assert!(snapshot(m) == before, "the memory changed after: {msg}");
    // The same body through a caller's reader, when the blob header is well-formed.
    if blob.len() >= 8 && blob[..4] == 0xaf14_3cd8u32.to_ne_bytes() {
        io_rejects(m, &blob[8..], dest, &before);
    }
    msg
}

#[track_caller]
fn rejects_whole(m: &Mem, state: &[u8], code: llama_memory_result) -> String {
    let before = snapshot(m);
    let r = llama_memory_state_set_data(m.0, state.as_ptr(), state.len());
    let msg = last_error();
    assert_eq!(r, 0, "accepted a malformed whole state");
    assert_eq!(llama_memory_last_error_code(), code, "{msg}");
    assert!(snapshot(m) == before, "the memory changed after: {msg}");
    io_rejects(m, state, -1, &before);
    msg
}

thread_local! {
    /// Inputs the current test fed through a caller's reader (each test has its own thread).
    static IO_CASES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

#[path = "common/io.rs"]
mod io_common;
use io_common::Writer;

/// Restores `body` into `dest` through a caller's reader (see `io_common::io_read`).
fn io_read(m: &Mem, body: &[u8], dest: i32, flags: u32) -> (llama_memory_result, usize) {
    io_common::io_read(m.0, body, dest, flags)
}

#[track_caller]
fn io_rejects(m: &Mem, body: &[u8], dest: i32, before: &[u8]) {
    let (rc, _) = io_read(m, body, dest, 0);
    assert_ne!(
        rc, LLAMA_MEMORY_OK,
        "the reader path accepted a malformed state (dest {dest})"
    );
    assert!(!last_error().is_empty());
    assert!(
        snapshot(m) == before,
        "the reader path changed the memory: {}",
        last_error()
    );
    IO_CASES.set(IO_CASES.get() + 1);
}

/// Prints how many inputs the current test also fed through a caller's reader.
fn report(test: &str) {
    eprintln!(
        "{test}: {} rejected inputs also refused by the reader path",
        IO_CASES.get()
    );
}

/// The state of `seq` written through a caller's writer.
fn io_write(m: &Mem, seq: i32, flags: u32) -> Writer {
    let (rc, w) = io_common::io_write(m.0, seq, flags);
    assert_eq!(rc, LLAMA_MEMORY_OK, "{}", last_error());
    w
}

use llama_memory_result::*;

// Offsets in a single-stream, f16, transposed-V sequence blob with `n` cells and 2 layers.
const OFF_MAGIC: usize = 0;
const OFF_N_STREAM: usize = 8;
const OFF_CELL_COUNT: usize = 12;
fn off_cell(i: usize) -> usize {
    16 + 12 * i
}
fn off_data(n: usize) -> usize {
    16 + 12 * n
}
fn off_k_type(n: usize, layer: usize) -> usize {
    off_data(n) + 16 + layer * (12 + n * GQA as usize * 2)
}
fn off_v(n: usize, layer: usize) -> usize {
    off_k_type(n, 2) + layer * (12 + n * GQA as usize * 2)
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

#[test]
fn layout_offsets_match_the_blob() {
    let m = populated();
    let b = seq_blob(&m, 0);
    let n = 6;
    assert_eq!(b.len(), off_v(n, 2), "offsets of this test are wrong");
    assert_eq!(&b[OFF_N_STREAM..OFF_N_STREAM + 4], &1u32.to_ne_bytes());
    assert_eq!(
        &b[off_k_type(n, 1)..off_k_type(n, 1) + 4],
        &(F16 as u32).to_ne_bytes()
    );
    assert_eq!(&b[off_v(n, 1) + 8..off_v(n, 1) + 12], &GQA.to_ne_bytes());
}

#[test]
fn truncated_at_every_byte() {
    let m = populated();
    let b = seq_blob(&m, 0);
    let mut n = 0;
    for len in 0..b.len() {
        for dest in [0, 1, -1] {
            let msg = rejects(&m, &b[..len], dest, LLAMA_MEMORY_ERR_INVALID_STATE);
            assert!(
                msg.contains("truncated") || msg.contains("not a sequence"),
                "{msg}"
            );
            n += 1;
        }
    }
    // Whole states too.
    let mut whole = vec![0u8; llama_memory_state_get_size(m.0)];
    llama_memory_state_get_data(m.0, whole.as_mut_ptr(), whole.len());
    for len in 0..whole.len() {
        rejects_whole(&m, &whole[..len], LLAMA_MEMORY_ERR_INVALID_STATE);
        n += 1;
    }
    eprintln!("{n} truncations rejected with the memory unchanged");
    report("truncated_at_every_byte");
}

#[test]
fn wrong_magic() {
    let m = populated();
    let mut b = seq_blob(&m, 0);
    put32(&mut b, OFF_MAGIC, 0x6767_7371);
    assert!(rejects(&m, &b, 1, LLAMA_MEMORY_ERR_INVALID_STATE).contains("magic"));
    report("wrong_magic");
}

#[test]
fn stream_count_mismatch() {
    let m = populated();
    let mut b = seq_blob(&m, 0);
    for v in [0, 2, u32::MAX] {
        put32(&mut b, OFF_N_STREAM, v);
        assert!(rejects(&m, &b, 1, LLAMA_MEMORY_ERR_INVALID_STATE).contains("streams"));
    }
    report("stream_count_mismatch");
}

#[test]
fn oversize_cell_counts() {
    let m = populated();
    let b0 = seq_blob(&m, 0);
    for v in [SIZE + 1, 1 << 20, u32::MAX] {
        let mut b = b0.clone();
        put32(&mut b, OFF_CELL_COUNT, v);
        rejects(&m, &b, 1, LLAMA_MEMORY_ERR_INVALID_STATE);
        rejects(&m, &b, -1, LLAMA_MEMORY_ERR_INVALID_STATE);
    }
    // Counts that fit the cache but not the blob: the cells then run into the data section,
    // or the data section past the end.
    for v in [5, 7, SIZE] {
        let mut b = b0.clone();
        put32(&mut b, OFF_CELL_COUNT, v);
        rejects(&m, &b, 1, LLAMA_MEMORY_ERR_INVALID_STATE);
        rejects(&m, &b, -1, LLAMA_MEMORY_ERR_INVALID_STATE);
    }
    report("oversize_cell_counts");
}

#[test]
fn bad_cell_metadata() {
    let m = populated();
    let b0 = seq_blob(&m, 0);
    // Negative position.
    let mut b = b0.clone();
    put32(&mut b, off_cell(2), (-5i32) as u32);
    assert!(rejects(&m, &b, 1, LLAMA_MEMORY_ERR_INVALID_STATE).contains("position"));
    assert!(rejects(&m, &b, -1, LLAMA_MEMORY_ERR_INVALID_STATE).contains("position"));
    // A per-sequence state must have exactly one sequence id per cell.
    for v in [0, 2, u32::MAX] {
        let mut b = b0.clone();
        put32(&mut b, off_cell(3) + 4, v);
        rejects(&m, &b, 1, LLAMA_MEMORY_ERR_INVALID_STATE);
    }
    report("bad_cell_metadata");
}

#[test]
fn bad_seq_ids_in_a_whole_state() {
    let m = populated();
    let b0 = seq_blob(&m, 0);
    // The blob body is a valid whole state of one stream (n_seq_id = 1, seq 0).
    let body = &b0[8..];
    for bad in [-1i32, 2, 255, 256, i32::MAX, i32::MIN] {
        let mut b = body.to_vec();
        put32(&mut b, off_cell(1) - 8 + 8, bad as u32);
        assert!(rejects_whole(&m, &b, LLAMA_MEMORY_ERR_INVALID_STATE).contains("seq_id"));
    }
    // More ids than sequences.
    let mut b = body.to_vec();
    put32(&mut b, off_cell(0) - 8 + 4, 3);
    rejects_whole(&m, &b, LLAMA_MEMORY_ERR_INVALID_STATE);
    // Invalid destinations are argument errors.
    let full = seq_blob(&m, 0);
    rejects(&m, &full, 2, LLAMA_MEMORY_ERR_INVALID_SEQ_ID);
    rejects(&m, &full, -2, LLAMA_MEMORY_ERR_INVALID_SEQ_ID);
    report("bad_seq_ids_in_a_whole_state");
}

#[test]
fn mismatched_layout_fields() {
    let m = populated();
    let n = 6;
    let b0 = seq_blob(&m, 0);
    let d = off_data(n);
    let cases: Vec<(usize, u32, &str)> = vec![
        (d, 0, "v_trans"),
        (d, 2, "v_trans"),
        (d + 4, 1, "layers"),
        (d + 4, 3, "layers"),
        (d + 4, u32::MAX, "layers"),
        (d + 8, 64, "rotation"),
        (d + 12, 64, "rotation"),
        (off_k_type(n, 0), 0, "K type"),
        (off_k_type(n, 1), 8, "K type"),
        (off_k_type(n, 1), u32::MAX, "K type"),
        (off_k_type(n, 0) + 4, 17, "K row size"),
        (off_k_type(n, 0) + 8, u32::MAX, "K row size"),
        (off_v(n, 0), 0, "V type"),
        (off_v(n, 1) + 4, 4, "transposed V"),
        (off_v(n, 1) + 8, GQA + 1, "transposed V"),
        (off_v(n, 0) + 8, u32::MAX, "transposed V"),
    ];
    for (off, v, what) in cases {
        let mut b = b0.clone();
        put32(&mut b, off, v);
        let msg = rejects(&m, &b, 1, LLAMA_MEMORY_ERR_INVALID_STATE);
        assert!(msg.contains(what), "{what}: {msg}");
        rejects(&m, &b, -1, LLAMA_MEMORY_ERR_INVALID_STATE);
    }
    report("mismatched_layout_fields");
}

#[test]
fn other_configurations_are_rejected_whole() {
    // A blob of a non-transposed, two-stream cache does not fit this one, and the reverse.
    let a = populated();
    let b = mem(false, false, 2);
    fill(&b, 1, 0, 3);
    let from_b = seq_blob(&b, 1);
    rejects(&a, &from_b, 0, LLAMA_MEMORY_ERR_INVALID_STATE);
    let from_a = seq_blob(&a, 0);
    rejects(&b, &from_a, 0, LLAMA_MEMORY_ERR_INVALID_STATE);
    report("other_configurations_are_rejected_whole");
}

#[test]
fn cells_in_two_streams_for_one_sequence() {
    let m = mem(false, false, 2);
    fill(&m, 0, 0, 3);
    fill(&m, 1, 0, 2);
    let n = llama_memory_state_get_size(m.0);
    let mut whole = vec![0u8; n];
    llama_memory_state_get_data(m.0, whole.as_mut_ptr(), n);
    let mut blob = Vec::new();
    blob.extend(0xaf14_3cd8u32.to_ne_bytes());
    blob.extend(0i32.to_ne_bytes());
    blob.extend(&whole);
    let msg = rejects(&m, &blob, 0, LLAMA_MEMORY_ERR_INVALID_STATE);
    assert!(msg.contains("more than one stream"), "{msg}");
    report("cells_in_two_streams_for_one_sequence");
}

#[test]
fn no_room_undoes_the_removal_of_the_destination() {
    // 32 cells: seq 1 holds 20, seq 0 holds 10; a 24-cell state for seq 0 needs 24 free cells
    // after its own 10 are removed, but only 12 are.
    let m = mem(true, true, 2);
    fill(&m, 1, 0, 20);
    fill(&m, 0, 0, 10);
    let donor = mem(true, true, 2);
    fill(&donor, 0, 100, 24);
    let blob = seq_blob(&donor, 0);
    let msg = rejects(&m, &blob, 0, LLAMA_MEMORY_ERR_NO_SLOT);
    assert!(msg.contains("unchanged"), "{msg}");
    // With room it works, and the sequence is replaced.
    llama_memory_seq_rm(m.0, 1, 0, 20);
    let r = llama_memory_state_seq_set_data(m.0, blob.as_ptr(), blob.len(), 0);
    assert_eq!(r, blob.len(), "{}", last_error());
    assert_eq!(llama_memory_seq_pos_min(m.0, 0), 100);
    assert_eq!(llama_memory_seq_pos_max(m.0, 0), 123);
}

#[test]
fn trailing_bytes_are_ignored_like_llama_cpp() {
    let m = populated();
    let mut b = seq_blob(&m, 0);
    let n = b.len();
    b.extend([0xde, 0xad]);
    assert_eq!(
        llama_memory_state_seq_set_data(m.0, b.as_ptr(), b.len(), 1),
        n
    );
}

#[test]
fn on_device_without_stash() {
    let m = populated();
    let flags = LLAMA_MEMORY_STATE_SEQ_FLAGS_ON_DEVICE;
    let n = llama_memory_state_seq_get_size_ext(m.0, 0, flags);
    let mut b = vec![0u8; n];
    // Saved on another handle: this one has no stash for seq 0.
    let other = populated();
    assert_eq!(
        llama_memory_state_seq_get_data_ext(other.0, b.as_mut_ptr(), n, 0, flags),
        n
    );
    let before = snapshot(&m);
    assert_eq!(
        llama_memory_state_seq_set_data_ext(m.0, b.as_ptr(), n, 1, flags),
        0
    );
    assert_eq!(
        llama_memory_last_error_code(),
        LLAMA_MEMORY_ERR_INVALID_STATE
    );
    assert!(snapshot(&m) == before);
    // On the handle that saved it, the metadata-only blob restores with the stashed tensors.
    assert_eq!(
        llama_memory_state_seq_set_data_ext(other.0, b.as_ptr(), n, 1, flags),
        n
    );
    assert_eq!(
        llama_memory_seq_pos_max(other.0, 1),
        llama_memory_seq_pos_max(other.0, 0)
    );
    assert_eq!(seq_blob(&other, 1).len(), seq_blob(&other, 0).len());
    // Unknown flags are argument errors.
    assert_eq!(llama_memory_state_seq_get_size_ext(m.0, 0, 4), 0);
    assert_eq!(
        llama_memory_last_error_code(),
        LLAMA_MEMORY_ERR_INVALID_ARGUMENT
    );
}

fn write_file(name: &str, bytes: &[u8]) -> (std::path::PathBuf, CString) {
    let dir = std::env::temp_dir().join(format!("llama-memory-malformed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    let c = CString::new(p.to_str().unwrap()).unwrap();
    (p, c)
}

#[test]
fn sequence_files() {
    let m = populated();
    let (_, path) = write_file("good.ggsq", &[]);
    let toks = [5, 6, 7];
    let n = llama_memory_state_seq_save_file(m.0, path.as_ptr(), 0, toks.as_ptr(), toks.len());
    assert!(n > 0, "{}", last_error());
    let good = std::fs::read(path.to_str().unwrap()).unwrap();
    assert_eq!(good.len(), n);

    let load = |bytes: &[u8], cap: usize, code: llama_memory_result| {
        let (_, c) = write_file("bad.ggsq", bytes);
        let before = snapshot(&m);
        let mut out = vec![0i32; cap];
        let mut count = 0usize;
        let r =
            llama_memory_state_seq_load_file(m.0, c.as_ptr(), 1, out.as_mut_ptr(), cap, &mut count);
        assert_eq!(r, 0, "accepted a malformed file");
        assert_eq!(llama_memory_last_error_code(), code, "{}", last_error());
        assert!(snapshot(&m) == before);
    };
    // Truncated at every byte.
    for len in 0..good.len() {
        load(&good[..len], 8, LLAMA_MEMORY_ERR_INVALID_STATE);
    }
    // Wrong magic and versions.
    for (off, v) in [(0usize, 0x6767_736e_u32), (4, 3), (4, 5), (4, 0)] {
        let mut b = good.clone();
        put32(&mut b, off, v);
        load(&b, 8, LLAMA_MEMORY_ERR_INVALID_STATE);
    }
    // Token counts: larger than the caller's buffer, and absurd.
    load(&good, 2, LLAMA_MEMORY_ERR_BUFFER_TOO_SMALL);
    let mut b = good.clone();
    put32(&mut b, 8, u32::MAX);
    load(&b, 8, LLAMA_MEMORY_ERR_BUFFER_TOO_SMALL);
    let mut b = good.clone();
    put32(&mut b, 8, 1000);
    let (_, c) = write_file("count.ggsq", &b);
    let mut count = 0usize;
    let r =
        llama_memory_state_seq_load_file(m.0, c.as_ptr(), 1, std::ptr::null_mut(), 0, &mut count);
    assert_eq!(
        (r, llama_memory_last_error_code()),
        (0, LLAMA_MEMORY_ERR_INVALID_STATE)
    );
    // Missing file, NULL path.
    let missing = CString::new("/nonexistent/dir/x.ggsq").unwrap();
    let mut out = [0i32; 8];
    assert_eq!(
        llama_memory_state_seq_load_file(m.0, missing.as_ptr(), 1, out.as_mut_ptr(), 8, &mut count),
        0
    );
    assert_eq!(llama_memory_last_error_code(), LLAMA_MEMORY_ERR_IO);
    assert_eq!(
        llama_memory_state_seq_load_file(m.0, std::ptr::null(), 1, out.as_mut_ptr(), 8, &mut count),
        0
    );
    assert_eq!(
        llama_memory_last_error_code(),
        LLAMA_MEMORY_ERR_NULL_ARGUMENT
    );
    // The good file still loads, and a NULL token buffer only reads the header (as llama.cpp).
    assert_eq!(
        llama_memory_state_seq_load_file(
            m.0,
            path.as_ptr(),
            1,
            std::ptr::null_mut(),
            0,
            &mut count
        ),
        12
    );
    assert_eq!(count, 3);
    assert_eq!(
        llama_memory_state_seq_load_file(m.0, path.as_ptr(), 1, out.as_mut_ptr(), 8, &mut count),
        n
    );
    assert_eq!(&out[..3], &toks);
    assert_eq!(seq_blob(&m, 1)[8..].len(), seq_blob(&m, 0)[8..].len());
}

#[test]
fn null_arguments() {
    let m = populated();
    let b = seq_blob(&m, 0);
    assert_eq!(
        llama_memory_state_seq_set_data(std::ptr::null_mut(), b.as_ptr(), b.len(), 0),
        0
    );
    assert_eq!(
        llama_memory_last_error_code(),
        LLAMA_MEMORY_ERR_NULL_ARGUMENT
    );
    assert_eq!(
        llama_memory_state_seq_set_data(m.0, std::ptr::null(), 10, 0),
        0
    );
    assert_eq!(
        llama_memory_last_error_code(),
        LLAMA_MEMORY_ERR_NULL_ARGUMENT
    );
    assert_eq!(
        llama_memory_state_seq_get_data(m.0, std::ptr::null_mut(), 10, 0),
        0
    );
    assert_eq!(
        llama_memory_last_error_code(),
        LLAMA_MEMORY_ERR_NULL_ARGUMENT
    );
    let mut small = vec![0u8; b.len() - 1];
    assert_eq!(
        llama_memory_state_seq_get_data(m.0, small.as_mut_ptr(), small.len(), 0),
        0
    );
    assert_eq!(
        llama_memory_last_error_code(),
        LLAMA_MEMORY_ERR_BUFFER_TOO_SMALL
    );
    assert_eq!(llama_memory_state_get_size(std::ptr::null_mut()), 0);
}

const PARTIAL_ONLY: u32 = LLAMA_MEMORY_STATE_SEQ_FLAGS_PARTIAL_ONLY;
const N_SEQ: i32 = 3;

/// (unified, v_trans) of every configuration below.
const CONFIGS: [(bool, bool); 4] = [(true, true), (true, false), (false, true), (false, false)];

/// Random bytes into every K/V tensor.
fn scramble(m: &Mem, seed: u64) {
    let mut x = seed | 1;
    for il in 0..2 {
        for t in [
            llama_memory_kv_get_k_tensor(m.0, il),
            llama_memory_kv_get_v_tensor(m.0, il),
        ] {
            // SAFETY: a live tensor of the memory, in a host buffer.
            let n = unsafe { ggml_sys::ggml_nbytes(t) };
            let data: Vec<u8> = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 24) as u8
                })
                .collect();
            // SAFETY: same tensor, exactly its size.
            unsafe { ggml_sys::ggml_backend_tensor_set(t, data.as_ptr().cast(), 0, n) };
        }
    }
}

/// Three sequences placed in several pieces, with holes, seq 1 sharing its first two cells with
/// seq 2 in a unified cache, random tensor bytes.
fn populated_cfg(unified: bool, v_trans: bool, seed: u64) -> Mem {
    let m = mem(unified, v_trans, N_SEQ as u32);
    for (seq, p0, n) in [(0, 0, 5), (1, 0, 3), (0, 5, 4), (2, 0, 6), (1, 3, 2)] {
        fill(&m, seq, p0, n);
    }
    // holes in every stream, one of them filled again
    assert!(llama_memory_seq_rm(m.0, 0, 2, 4));
    assert!(llama_memory_seq_rm(m.0, 2, 1, 2));
    fill(&m, 2, 6, 1);
    if unified {
        llama_memory_seq_cp(m.0, 1, 2, 0, 2);
    }
    scramble(&m, seed);
    m
}

fn seq_blob_ext(m: &Mem, seq: i32, flags: u32) -> Vec<u8> {
    let n = llama_memory_state_seq_get_size_ext(m.0, seq, flags);
    assert!(n > 0, "{}", last_error());
    let mut b = vec![0u8; n];
    assert_eq!(
        llama_memory_state_seq_get_data_ext(m.0, b.as_mut_ptr(), n, seq, flags),
        n,
        "{}",
        last_error()
    );
    b
}

fn whole(m: &Mem) -> Vec<u8> {
    let n = llama_memory_state_get_size(m.0);
    let mut b = vec![0u8; n];
    assert_eq!(llama_memory_state_get_data(m.0, b.as_mut_ptr(), n), n);
    b
}

/// Truncations and corrupted counts in every configuration, blob and reader paths alike.
#[test]
fn truncated_at_every_byte_in_every_configuration() {
    for (unified, v_trans) in CONFIGS {
        let m = populated_cfg(unified, v_trans, 7);
        for src in 0..N_SEQ {
            let b = seq_blob(&m, src);
            for len in (0..b.len()).step_by(3) {
                rejects(
                    &m,
                    &b[..len],
                    (src + 1) % N_SEQ,
                    LLAMA_MEMORY_ERR_INVALID_STATE,
                );
            }
        }
        let w = whole(&m);
        for len in (0..w.len()).step_by(5) {
            rejects_whole(&m, &w[..len], LLAMA_MEMORY_ERR_INVALID_STATE);
        }
    }
    report("truncated_at_every_byte_in_every_configuration");
}

/// The caller-io path (llama.cpp's `llama_io_write_i`/`llama_io_read_i`, used by the drop-in
/// adapters) writes exactly the blob's bytes and restores exactly what the blob path restores,
/// tensor bytes included.
#[test]
fn io_path_matches_the_blob_path() {
    let mut n = 0;
    for (unified, v_trans) in CONFIGS {
        for flags in [0, PARTIAL_ONLY] {
            let cfg = format!("unified {unified}, v_trans {v_trans}, flags {flags}");
            let m = populated_cfg(unified, v_trans, 11);
            assert_eq!(io_write(&m, -1, flags).bytes, whole(&m), "{cfg}");
            for seq in 0..N_SEQ {
                assert_eq!(
                    io_write(&m, seq, flags).bytes,
                    seq_blob_ext(&m, seq, flags)[8..],
                    "{cfg}, seq {seq}"
                );
            }
            for src in 0..N_SEQ {
                for dest in 0..N_SEQ {
                    let by_blob = populated_cfg(unified, v_trans, 13);
                    let by_io = populated_cfg(unified, v_trans, 13);
                    let b = seq_blob_ext(&m, src, flags);
                    assert_eq!(
                        llama_memory_state_seq_set_data_ext(
                            by_blob.0,
                            b.as_ptr(),
                            b.len(),
                            dest,
                            flags
                        ),
                        b.len(),
                        "{}",
                        last_error()
                    );
                    let (rc, used) = io_read(&by_io, &b[8..], dest, flags);
                    assert_eq!(rc, LLAMA_MEMORY_OK, "{}", last_error());
                    assert_eq!(used, b.len() - 8, "bytes consumed");
                    assert!(
                        snapshot(&by_io) == snapshot(&by_blob),
                        "{cfg}: seq {src} -> {dest}"
                    );
                    n += 1;
                }
            }
            // The whole state into a fresh memory and into a used one (the other rows zeroed),
            // then a state of fewer cells into a used one.
            let w = whole(&m);
            let fewer = populated_cfg(unified, v_trans, 17);
            assert!(llama_memory_seq_rm(fewer.0, 0, -1, -1));
            let w2 = whole(&fewer);
            for (state, fresh) in [(&w, true), (&w, false), (&w2, false)] {
                let (by_blob, by_io) = if fresh {
                    (
                        mem(unified, v_trans, N_SEQ as u32),
                        mem(unified, v_trans, N_SEQ as u32),
                    )
                } else {
                    (
                        populated_cfg(unified, v_trans, 19),
                        populated_cfg(unified, v_trans, 19),
                    )
                };
                assert_eq!(
                    llama_memory_state_set_data(by_blob.0, state.as_ptr(), state.len()),
                    state.len(),
                    "{}",
                    last_error()
                );
                let (rc, used) = io_read(&by_io, state, -1, flags);
                assert_eq!(rc, LLAMA_MEMORY_OK, "{}", last_error());
                assert_eq!(used, state.len());
                assert!(snapshot(&by_io) == snapshot(&by_blob), "{cfg}: whole state");
                assert_eq!(whole(&by_io), *state);
                n += 1;
            }
        }
    }
    eprintln!("io_path_matches_the_blob_path: {n} restores compared");
}

/// The ranges a writer's `write_tensor` receives are llama.cpp's (`state_write_data`): per
/// stream with cells, for each layer the K rows of each run of selected cells, then per layer
/// the V rows of each run or, transposed, for each channel the elements of each run. The
/// tensor is the whole one and the offset includes the stream's (llama.cpp passes the stream's
/// view and the offset within it).
#[test]
fn write_tensor_gets_llama_cpps_ranges() {
    const ROW: usize = GQA as usize * 2;
    for (unified, v_trans) in CONFIGS {
        let m = populated_cfg(unified, v_trans, 23);
        let n_stream = llama_memory_kv_n_stream(m.0);
        for seq in -1..N_SEQ {
            let mut want = Vec::new();
            for s in 0..n_stream {
                let mut runs: Vec<(usize, usize)> = Vec::new();
                for c in 0..SIZE {
                    let mut pos = 0;
                    let mut bits = [0u64; 4];
                    assert_eq!(
                        llama_memory_kv_get_cell(
                            m.0,
                            s,
                            c,
                            &mut pos,
                            std::ptr::null_mut(),
                            bits.as_mut_ptr()
                        ),
                        LLAMA_MEMORY_OK
                    );
                    let hit = pos >= 0 && (seq == -1 || bits[0] >> seq & 1 == 1);
                    let c = c as usize;
                    match runs.last_mut() {
                        Some((_, e)) if hit && *e == c => *e = c + 1,
                        _ if hit => runs.push((c, c + 1)),
                        _ => {}
                    }
                }
                if runs.is_empty() {
                    continue;
                }
                for il in 0..2 {
                    let k = llama_memory_kv_get_k_tensor(m.0, il);
                    // SAFETY: a live tensor of the memory.
                    let base = s as usize * unsafe { (*k).nb[2] };
                    for &(a, e) in &runs {
                        want.push((k, base + a * ROW, (e - a) * ROW));
                    }
                }
                for il in 0..2 {
                    let v = llama_memory_kv_get_v_tensor(m.0, il);
                    // SAFETY: as above.
                    let base = s as usize * unsafe { (*v).nb[2] };
                    if !v_trans {
                        for &(a, e) in &runs {
                            want.push((v, base + a * ROW, (e - a) * ROW));
                        }
                    } else {
                        for j in 0..GQA as usize {
                            for &(a, e) in &runs {
                                want.push((v, base + (a + j * SIZE as usize) * 2, (e - a) * 2));
                            }
                        }
                    }
                }
            }
            assert!(!want.is_empty());
            assert_eq!(
                io_write(&m, seq, 0).ranges,
                want,
                "unified {unified}, v_trans {v_trans}, seq {seq}"
            );
        }
    }
}

fn tensor_bytes(t: *mut ggml_sys::ggml_tensor) -> Vec<u8> {
    // SAFETY: a live tensor of the memory, read in full.
    let n = unsafe { ggml_sys::ggml_nbytes(t) };
    let mut d = vec![0u8; n];
    // SAFETY: as above; `d` holds the n bytes read.
    unsafe { ggml_sys::ggml_backend_tensor_get(t, d.as_mut_ptr().cast(), 0, n) };
    d
}

/// `llama_memory_kv_state_clear` (llama.cpp's `llama_kv_cache::state_clear`; compared with
/// stock in tests/kv_differential.rs): the sequence's cells go, the rows of those it held alone
/// are zeroed, shared cells and every other byte stay.
#[test]
fn kv_state_clear_zeroes_what_the_sequence_held_alone() {
    const ROW: usize = GQA as usize * 2;
    for (unified, v_trans) in CONFIGS {
        let m = populated_cfg(unified, v_trans, 29);
        let n_stream = llama_memory_kv_n_stream(m.0);
        let seq = 1;
        let strm = if unified { 0 } else { seq as u32 };
        // the cells of seq 1: held alone, or shared (with seq 2, in the unified cache)
        let (mut alone, mut shared) = (Vec::new(), Vec::new());
        for c in 0..SIZE {
            let mut pos = 0;
            let mut bits = [0u64; 4];
            llama_memory_kv_get_cell(
                m.0,
                strm,
                c,
                &mut pos,
                std::ptr::null_mut(),
                bits.as_mut_ptr(),
            );
            if pos >= 0 && bits[0] >> seq & 1 == 1 {
                if bits[0].count_ones() == 1 {
                    alone.push(c as usize);
                } else {
                    shared.push(c as usize);
                }
            }
        }
        assert!(!alone.is_empty());
        assert_eq!(shared.is_empty(), !unified);
        let mut want = Vec::new();
        for il in 0..2 {
            let k = llama_memory_kv_get_k_tensor(m.0, il);
            let v = llama_memory_kv_get_v_tensor(m.0, il);
            // SAFETY: live tensors of the memory.
            let (sk, sv) = unsafe { ((*k).nb[2], (*v).nb[2]) };
            let (base_k, base_v) = (strm as usize * sk, strm as usize * sv);
            let mut kb = tensor_bytes(k);
            let mut vb = tensor_bytes(v);
            for &c in &alone {
                kb[base_k + c * ROW..base_k + (c + 1) * ROW].fill(0);
                if v_trans {
                    for j in 0..GQA as usize {
                        let o = base_v + (j * SIZE as usize + c) * 2;
                        vb[o..o + 2].fill(0);
                    }
                } else {
                    vb[base_v + c * ROW..base_v + (c + 1) * ROW].fill(0);
                }
            }
            want.push((k, kb));
            want.push((v, vb));
        }
        let pos_2 = (
            llama_memory_seq_pos_min(m.0, 2),
            llama_memory_seq_pos_max(m.0, 2),
        );
        // invalid sequences change nothing
        let before = snapshot(&m);
        for bad in [-2, N_SEQ, 1000] {
            assert_ne!(llama_memory_kv_state_clear(m.0, bad), LLAMA_MEMORY_OK);
            assert_eq!(
                llama_memory_last_error_code(),
                LLAMA_MEMORY_ERR_INVALID_SEQ_ID
            );
            assert!(snapshot(&m) == before);
        }
        assert_eq!(llama_memory_kv_state_clear(m.0, seq), LLAMA_MEMORY_OK);
        assert_eq!(llama_memory_seq_pos_max(m.0, seq), -1);
        assert_eq!(
            (
                llama_memory_seq_pos_min(m.0, 2),
                llama_memory_seq_pos_max(m.0, 2)
            ),
            pos_2
        );
        for (t, bytes) in &want {
            assert!(
                tensor_bytes(*t) == *bytes,
                "unified {unified}, v_trans {v_trans}"
            );
        }
        // -1: everything cleared and zeroed
        assert_eq!(llama_memory_kv_state_clear(m.0, -1), LLAMA_MEMORY_OK);
        for s in 0..n_stream {
            assert_eq!(llama_memory_kv_n_used(m.0, s), 0);
        }
        for (t, _) in &want {
            assert!(tensor_bytes(*t).iter().all(|&b| b == 0));
        }
    }
}
