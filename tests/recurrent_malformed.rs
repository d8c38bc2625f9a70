//! Malformed recurrent states through the C ABI (issue 9, item 8): every corruption of every
//! field of llama.cpp's `RSState` (§7.5 of the spec), in a sequence blob and in a whole state,
//! gets the failure value (0), a last-error code and message, and leaves the memory exactly as
//! it was: every cell (pos, src, src0, tail, rs_idx, sequences), head/used/n/rs_z, the
//! per-sequence ranges and every byte of every R/S/PLE tensor, all rollback planes included.
//!
//! The memory: 3 model layers of which 0 and 2 have tensors (F32, n_embd_r 24, n_embd_s 32,
//! layer 2 with a PLE row of 8), 5 cells, 4 sequences, with 0 and with 2 rollback planes,
//! filled through equal-split ubatches, one cell shared by two sequences (`seq_cp`), and random
//! tensor bytes. llama.cpp erases the destination (or everything) when a restore fails and
//! aborts on some of these inputs; this library must not.

use std::ffi::CStr;

use llama_memory::ffi::error::{
    llama_memory_clear_last_error, llama_memory_last_error, llama_memory_last_error_code,
    llama_memory_result,
};
use llama_memory::ffi::*;

use llama_memory_result::*;

const F32: i32 = 0;
const SIZE: u32 = 5;
const N_SEQ: u32 = 4;
const N_LAYER: u32 = 3;
const EMBD_R: u32 = 24;
const EMBD_S: u32 = 32;
const EMBD_P: u32 = 8;
/// Model layers with tensors and their PLE width.
const LAYERS: [(u32, u32); 2] = [(0, 0), (2, EMBD_P)];
const ROW_R: usize = EMBD_R as usize * 4;
const ROW_S: usize = EMBD_S as usize * 4;
const ROW_P: usize = EMBD_P as usize * 4;
const ON_DEVICE: u32 = LLAMA_MEMORY_STATE_SEQ_FLAGS_ON_DEVICE;
/// Rollback-plane configurations every test runs on.
const CONFIGS: [u32; 2] = [0, 2];

struct Mem(llama_memory_t);

thread_local! {
    /// Rejected inputs checked by the current test (each test runs on its own thread).
    static CASES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Prints how many rejections the current test checked.
fn report(test: &str) {
    eprintln!(
        "{test}: {} malformed inputs rejected with the memory unchanged",
        CASES.get()
    );
}

impl Drop for Mem {
    fn drop(&mut self) {
        llama_memory_free(self.0);
    }
}

/// The last error message, "" when there is none (the library returns NULL then).
fn last_error() -> String {
    let p = llama_memory_last_error();
    if p.is_null() {
        return String::new();
    }
    // SAFETY: the library returns a valid NUL-terminated string.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn new_mem(n_rs_seq: u32) -> Mem {
    let layers: Vec<llama_memory_rs_layer> = LAYERS
        .iter()
        .map(|&(il, p)| llama_memory_rs_layer {
            il,
            n_embd_r: EMBD_R,
            n_embd_s: EMBD_S,
            n_embd_p: p,
            buft: std::ptr::null_mut(),
        })
        .collect();
    let mut p = llama_memory_rs_default_params();
    p.size = SIZE;
    p.n_seq_max = N_SEQ;
    p.n_rs_seq = n_rs_seq;
    p.n_layer = N_LAYER;
    p.type_r = F32;
    p.type_s = F32;
    p.layers = layers.as_ptr();
    p.n_layers = layers.len();
    let m = llama_memory_rs_init(p);
    assert!(!m.is_null(), "{}", last_error());
    Mem(m)
}

/// Plans and applies an equal-split ubatch: one set per `(seq, p0)`, `n` tokens each.
fn place(m: &Mem, sets: &[(i32, i32)], n: usize) {
    let mut pos = Vec::new();
    let mut ids = Vec::new();
    for &(s, p0) in sets {
        for k in 0..n as i32 {
            pos.push(p0 + k);
            ids.push(s);
        }
    }
    let n_tok = pos.len();
    let tok = vec![1; n_tok];
    let n_seq_id = vec![1i32; n_tok];
    let ptrs: Vec<*const i32> = ids.iter().map(|s| s as *const i32).collect();
    let mut unq: Vec<i32> = sets.iter().map(|s| s.0).collect();
    unq.sort_unstable();
    let ub = llama_memory_ubatch {
        n_tokens: n_tok as u32,
        n_seq_tokens: n as u32,
        n_seqs: sets.len() as u32,
        n_seqs_unq: unq.len() as u32,
        n_pos: 1,
        equal_seqs: 1,
        token: tok.as_ptr(),
        pos: pos.as_ptr(),
        n_seq_id: n_seq_id.as_ptr(),
        seq_id: ptrs.as_ptr(),
        seq_id_unq: unq.as_ptr(),
        seq_idx: std::ptr::null(),
        output: std::ptr::null(),
        type_: std::ptr::null(),
    };
    let ctx = llama_memory_init_batch(m.0, &ub, 1);
    assert!(!ctx.is_null(), "{}", last_error());
    assert_eq!(llama_memory_ctx_get_status(ctx), LLAMA_MEMORY_CTX_SUCCESS);
    assert_eq!(
        llama_memory_ctx_apply(ctx),
        LLAMA_MEMORY_OK,
        "{}",
        last_error()
    );
    llama_memory_ctx_free(ctx);
}

/// Every tensor of the memory: R and S of layers 0 and 2, PLE of layer 2.
fn tensors(m: &Mem) -> Vec<*mut ggml_sys::ggml_tensor> {
    let mut v = Vec::new();
    for &(il, p) in &LAYERS {
        v.push(llama_memory_rs_get_r_tensor(m.0, il));
        v.push(llama_memory_rs_get_s_tensor(m.0, il));
        if p > 0 {
            v.push(llama_memory_rs_get_p_tensor(m.0, il));
        }
    }
    assert!(v.iter().all(|t| !t.is_null()), "{}", last_error());
    v
}

fn tensor_bytes(t: *mut ggml_sys::ggml_tensor) -> Vec<u8> {
    // SAFETY: a live tensor of the memory, in a host buffer, read in full.
    let n = unsafe { ggml_sys::ggml_nbytes(t) };
    let mut d = vec![0u8; n];
    // SAFETY: as above; `d` holds the n bytes read.
    unsafe { ggml_sys::ggml_backend_tensor_get(t, d.as_mut_ptr().cast(), 0, n) };
    d
}

/// Random bytes into every row of every plane of every tensor.
fn randomize(m: &Mem, seed: u64) {
    let mut x = seed | 1;
    for t in tensors(m) {
        // SAFETY: as in tensor_bytes.
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

/// Everything observable about a recurrent memory.
#[derive(Clone, PartialEq, Eq)]
struct Snapshot {
    /// Per cell: pos, src, src0, tail, rs_idx, sequences.
    cells: Vec<(i32, i32, i32, i32, u32, Vec<i32>)>,
    /// size, head, used, n, rs_z, n_rs_seq.
    info: (u32, u32, u32, u32, i32, u32),
    /// Per sequence: pos_min, pos_max.
    ranges: Vec<(i32, i32)>,
    tensors: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sums: Vec<u64> = self
            .tensors
            .iter()
            .map(|t| {
                t.iter()
                    .enumerate()
                    .map(|(i, &b)| (i as u64 + 1) * b as u64)
                    .sum()
            })
            .collect();
        f.debug_struct("Snapshot")
            .field("cells", &self.cells)
            .field("info", &self.info)
            .field("ranges", &self.ranges)
            .field("tensor checksums", &sums)
            .finish()
    }
}

fn snapshot(m: &Mem) -> Snapshot {
    let mut info = llama_memory_rs_info::default();
    assert_eq!(llama_memory_rs_get_info(m.0, &mut info), LLAMA_MEMORY_OK);
    let cells = (0..info.size)
        .map(|i| {
            let mut c = llama_memory_rs_cell::default();
            let mut seqs = vec![0i32; 256];
            assert_eq!(
                llama_memory_rs_get_cell(m.0, i, &mut c, seqs.as_mut_ptr(), seqs.len()),
                LLAMA_MEMORY_OK
            );
            seqs.truncate(c.n_seq as usize);
            (c.pos, c.src, c.src0, c.tail, c.rs_idx, seqs)
        })
        .collect();
    let ranges = (0..N_SEQ as i32)
        .map(|s| {
            (
                llama_memory_seq_pos_min(m.0, s),
                llama_memory_seq_pos_max(m.0, s),
            )
        })
        .collect();
    Snapshot {
        cells,
        info: (
            info.size,
            info.head,
            info.used,
            info.n,
            info.rs_z,
            info.n_rs_seq,
        ),
        ranges,
        tensors: tensors(m).into_iter().map(tensor_bytes).collect(),
    }
}

/// A populated memory: seq 0 and 2 at 0..5 and seq 1 at 0..4 placed through three equal-split
/// ubatches, seq 3 sharing seq 1's cell, random tensor bytes; with rollback planes, seq 0 rolled
/// back one token (a pending `rs_idx`). Seq 3's stash holds an empty ON_DEVICE save (it was
/// saved before it had a cell), for the short-stash cases.
fn populated(n_rs_seq: u32) -> Mem {
    let m = new_mem(n_rs_seq);
    // 8 header, cell_count, s_trans, n_layer, 2 x (R type, row), PLE row, 2 x (S type, row)
    assert_eq!(
        seq_blob_ext(&m, 3, ON_DEVICE).len(),
        8 + 12 + 2 * 12 + 8 + 2 * 12
    );
    place(&m, &[(0, 0), (2, 0)], 3);
    place(&m, &[(1, 0)], 4);
    place(&m, &[(2, 3), (0, 3)], 2);
    llama_memory_seq_cp(m.0, 1, 3, -1, -1);
    randomize(&m, 0x9e37_79b9_7f4a_7c15 ^ n_rs_seq as u64);
    if n_rs_seq > 0 {
        assert!(llama_memory_seq_rm(m.0, 0, 4, -1), "{}", last_error());
    }
    let s = snapshot(&m);
    assert_eq!(s.info.2, 3, "{s:?}");
    assert_eq!(
        s.ranges,
        vec![
            (4 - (n_rs_seq > 0) as i32, 4 - (n_rs_seq > 0) as i32),
            (3, 3),
            (4, 4),
            (3, 3)
        ]
    );
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

fn seq_blob(m: &Mem, seq: i32) -> Vec<u8> {
    seq_blob_ext(m, seq, 0)
}

fn whole(m: &Mem) -> Vec<u8> {
    let n = llama_memory_state_get_size(m.0);
    assert!(n > 0, "{}", last_error());
    let mut b = vec![0u8; n];
    assert_eq!(llama_memory_state_get_data(m.0, b.as_mut_ptr(), n), n);
    b
}

/// Restores `blob` into `dest` with `flags` and expects failure with `code`, a message, and no
/// change at all.
#[track_caller]
fn rejects_ext(m: &Mem, blob: &[u8], dest: i32, flags: u32, code: llama_memory_result) -> String {
    let before = snapshot(m);
    llama_memory_clear_last_error();
    let r = llama_memory_state_seq_set_data_ext(m.0, blob.as_ptr(), blob.len(), dest, flags);
    let got = llama_memory_last_error_code();
    let msg = last_error();
    assert_eq!(
        r, 0,
        "accepted a malformed blob (dest {dest}, flags {flags})"
    );
    assert_eq!(got, code, "{msg}");
    assert!(!msg.is_empty());
    let after = snapshot(m);
    assert!(
        after == before,
        "the memory changed after: {msg}\nbefore {before:?}\nafter  {after:?}"
    );
    // The same body through a caller's reader (what the drop-in's adapter uses), when it is
    // a host blob with a well-formed header: refused too, nothing changed.
    if flags == 0 && blob.len() >= 8 && get32(blob, 0) == 0xaf14_3cd8 {
        io_rejects(m, &blob[8..], dest, &before);
    }
    CASES.set(CASES.get() + 1);
    msg
}

#[path = "common/io.rs"]
mod io_common;

/// Restores `body` into `dest` through a caller's reader (see `io_common::io_read`).
fn io_read(m: &Mem, body: &[u8], dest: i32) -> (llama_memory_result, usize) {
    io_common::io_read(m.0, body, dest, 0)
}

#[track_caller]
fn io_rejects(m: &Mem, body: &[u8], dest: i32, before: &Snapshot) {
    let (rc, _) = io_read(m, body, dest);
    assert_ne!(
        rc, LLAMA_MEMORY_OK,
        "the reader path accepted a malformed state (dest {dest})"
    );
    assert!(!last_error().is_empty());
    let after = snapshot(m);
    assert!(
        after == *before,
        "the reader path changed the memory: {}\nbefore {before:?}\nafter  {after:?}",
        last_error()
    );
}

/// The state of `seq` written through a caller's writer (tensor ranges copied by it).
fn io_write(m: &Mem, seq: i32) -> Vec<u8> {
    let (rc, w) = io_common::io_write(m.0, seq, 0);
    assert_eq!(rc, LLAMA_MEMORY_OK, "{}", last_error());
    w.bytes
}

#[track_caller]
fn rejects(m: &Mem, blob: &[u8], dest: i32, code: llama_memory_result) -> String {
    rejects_ext(m, blob, dest, 0, code)
}

#[track_caller]
fn rejects_whole(m: &Mem, state: &[u8], code: llama_memory_result) -> String {
    let before = snapshot(m);
    llama_memory_clear_last_error();
    let r = llama_memory_state_set_data(m.0, state.as_ptr(), state.len());
    let got = llama_memory_last_error_code();
    let msg = last_error();
    assert_eq!(r, 0, "accepted a malformed whole state");
    assert_eq!(got, code, "{msg}");
    assert!(!msg.is_empty());
    let after = snapshot(m);
    assert!(
        after == before,
        "the memory changed after: {msg}\nbefore {before:?}\nafter  {after:?}"
    );
    io_rejects(m, state, -1, &before);
    CASES.set(CASES.get() + 1);
    msg
}

/// Offsets of every field of an `RSState` (from the start of the state, after the 8-byte blob
/// header of a sequence blob), read from a valid state of this test's memory.
#[derive(Debug)]
struct Layout {
    cell_count: usize,
    /// Per cell: offset of pos, of n_seq_id, of each seq_id.
    cells: Vec<(usize, usize, Vec<usize>)>,
    s_trans: usize,
    n_layer: usize,
    /// Per layer with tensors: offset of the R type and of the R row size.
    r: Vec<(usize, usize)>,
    /// Offset of the PLE row size (layer 2).
    p_row: usize,
    /// Per layer with tensors: offset of the S type and of the S row size.
    s: Vec<(usize, usize)>,
    end: usize,
}

fn get32(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes(b[off..off + 4].try_into().unwrap())
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}

fn layout(state: &[u8]) -> Layout {
    let n = get32(state, 0) as usize;
    let mut off = 4;
    let mut cells = Vec::new();
    for _ in 0..n {
        let k = get32(state, off + 4) as usize;
        let ids = (0..k).map(|j| off + 8 + 4 * j).collect();
        cells.push((off, off + 4, ids));
        off += 8 + 4 * k;
    }
    let (s_trans, n_layer) = (off, off + 4);
    off += 8;
    let mut r = Vec::new();
    let mut p_row = 0;
    for &(_, p) in &LAYERS {
        r.push((off, off + 4));
        off += 12 + n * ROW_R;
        if p > 0 {
            p_row = off;
            off += 8 + n * ROW_P;
        }
    }
    let mut s = Vec::new();
    for _ in &LAYERS {
        s.push((off, off + 4));
        off += 12 + n * ROW_S;
    }
    Layout {
        cell_count: 0,
        cells,
        s_trans,
        n_layer,
        r,
        p_row,
        s,
        end: off,
    }
}

/// A sequence blob and its layout, with offsets shifted past the 8-byte blob header.
fn seq_layout(blob: &[u8]) -> Layout {
    let mut l = layout(&blob[8..]);
    let sh = |o: &mut usize| *o += 8;
    sh(&mut l.cell_count);
    for c in &mut l.cells {
        sh(&mut c.0);
        sh(&mut c.1);
        c.2.iter_mut().for_each(sh);
    }
    sh(&mut l.s_trans);
    sh(&mut l.n_layer);
    for x in l.r.iter_mut().chain(l.s.iter_mut()) {
        sh(&mut x.0);
        sh(&mut x.1);
    }
    sh(&mut l.p_row);
    sh(&mut l.end);
    l
}

/// Sequences whose blobs the tests corrupt: one alone in its cell, one sharing a cell, and the
/// one with a pending rollback.
const SRC_SEQS: [i32; 3] = [0, 2, 3];
/// Destinations: its own, another, a shared cell's, and the whole memory.
const DESTS: [i32; 4] = [0, 1, 3, -1];

#[test]
fn layout_matches_the_written_states() {
    for n_rs in CONFIGS {
        let m = populated(n_rs);
        for s in 0..N_SEQ as i32 {
            let b = seq_blob(&m, s);
            let l = seq_layout(&b);
            assert_eq!(l.end, b.len(), "seq {s}: offsets of this test are wrong");
            assert_eq!(get32(&b, l.cell_count), 1);
            assert_eq!(get32(&b, l.cells[0].1), 0, "n_seq_id of a sequence state");
            assert_eq!(get32(&b, l.n_layer), N_LAYER);
            assert_eq!(get32(&b, l.r[1].1) as usize, ROW_R);
            assert_eq!(get32(&b, l.p_row) as usize, ROW_P);
            assert_eq!(get32(&b, l.s[1].1) as usize, ROW_S);
        }
        let w = whole(&m);
        let l = layout(&w);
        assert_eq!(l.end, w.len());
        assert_eq!(l.cells.len(), 3);
        let ids: Vec<Vec<u32>> = l
            .cells
            .iter()
            .map(|c| c.2.iter().map(|&o| get32(&w, o)).collect())
            .collect();
        assert!(ids.contains(&vec![1, 3]), "{ids:?}");
    }
}

#[test]
fn truncated_at_every_byte() {
    for n_rs in CONFIGS {
        let m = populated(n_rs);
        for src in SRC_SEQS {
            let b = seq_blob(&m, src);
            for len in 0..b.len() {
                for dest in DESTS {
                    let msg = rejects(&m, &b[..len], dest, LLAMA_MEMORY_ERR_INVALID_STATE);
                    assert!(msg.contains("truncated"), "{msg}");
                }
            }
        }
        let w = whole(&m);
        for len in 0..w.len() {
            let msg = rejects_whole(&m, &w[..len], LLAMA_MEMORY_ERR_INVALID_STATE);
            assert!(msg.contains("truncated"), "{msg}");
            // the same body behind a blob header, into the whole memory
            let mut b = 0xaf14_3cd8u32.to_ne_bytes().to_vec();
            b.extend(0i32.to_ne_bytes());
            b.extend(&w[..len]);
            rejects(&m, &b, -1, LLAMA_MEMORY_ERR_INVALID_STATE);
        }
        // ON_DEVICE: the metadata-only blob cut short, with its stash present.
        let d = seq_blob_ext(&m, 0, ON_DEVICE);
        for len in 0..d.len() {
            for dest in DESTS {
                rejects_ext(
                    &m,
                    &d[..len],
                    dest,
                    ON_DEVICE,
                    LLAMA_MEMORY_ERR_INVALID_STATE,
                );
            }
        }
    }
    report("truncated_at_every_byte");
}

#[test]
fn cell_count_too_large_or_wrong() {
    for n_rs in CONFIGS {
        let m = populated(n_rs);
        for src in SRC_SEQS {
            let b0 = seq_blob(&m, src);
            let l = seq_layout(&b0);
            // A sequence state holds one cell; more would make llama.cpp abort.
            for v in [2, 3, N_SEQ, SIZE] {
                let mut b = b0.clone();
                put32(&mut b, l.cell_count, v);
                for dest in [0, 1, 3] {
                    let msg = rejects(&m, &b, dest, LLAMA_MEMORY_ERR_INVALID_STATE);
                    assert!(msg.contains("one recurrent cell"), "{msg}");
                }
            }
            for v in [SIZE + 1, 256, 1 << 20, u32::MAX] {
                let mut b = b0.clone();
                put32(&mut b, l.cell_count, v);
                for dest in DESTS {
                    let msg = rejects(&m, &b, dest, LLAMA_MEMORY_ERR_INVALID_STATE);
                    assert!(msg.contains("do not fit"), "{msg}");
                }
            }
            // No cell: the cell's pos is then read as s_trans.
            let mut b = b0.clone();
            put32(&mut b, l.cell_count, 0);
            for dest in DESTS {
                rejects(&m, &b, dest, LLAMA_MEMORY_ERR_INVALID_STATE);
            }
        }
        let w0 = whole(&m);
        for v in [SIZE + 1, 256, 1 << 20, u32::MAX] {
            let mut w = w0.clone();
            put32(&mut w, 0, v);
            let msg = rejects_whole(&m, &w, LLAMA_MEMORY_ERR_INVALID_STATE);
            assert!(msg.contains("do not fit"), "{msg}");
        }
        // Counts that fit the memory but not the state: the cells run into the data section.
        for v in [0, 1, 2, 4, SIZE] {
            let mut w = w0.clone();
            put32(&mut w, 0, v);
            rejects_whole(&m, &w, LLAMA_MEMORY_ERR_INVALID_STATE);
        }
    }
    report("cell_count_too_large_or_wrong");
}

#[test]
fn sequence_ids_in_a_sequence_state() {
    for n_rs in CONFIGS {
        let m = populated(n_rs);
        for src in SRC_SEQS {
            let b0 = seq_blob(&m, src);
            let l = seq_layout(&b0);
            for v in [1, 2, N_SEQ, 256, u32::MAX] {
                let mut b = b0.clone();
                put32(&mut b, l.cells[0].1, v);
                for dest in [0, 1, 3] {
                    let msg = rejects(&m, &b, dest, LLAMA_MEMORY_ERR_INVALID_STATE);
                    assert!(msg.contains("expected 0"), "{msg}");
                }
            }
        }
    }
    report("sequence_ids_in_a_sequence_state");
}

#[test]
fn sequence_ids_in_a_whole_state() {
    for n_rs in CONFIGS {
        let m = populated(n_rs);
        let w0 = whole(&m);
        let l = layout(&w0);
        // Out of range, in every id slot of every cell.
        for (k, c) in l.cells.iter().enumerate() {
            for &o in &c.2 {
                for bad in [-1i32, -2, i32::MIN, N_SEQ as i32, 255, 256, i32::MAX] {
                    let mut w = w0.clone();
                    put32(&mut w, o, bad as u32);
                    let msg = rejects_whole(&m, &w, LLAMA_MEMORY_ERR_INVALID_STATE);
                    assert!(msg.contains("outside"), "cell {k} id {bad}: {msg}");
                }
            }
        }
        // Two cells claiming one sequence, and one cell listing a sequence twice.
        let firsts: Vec<u32> = l.cells.iter().map(|c| get32(&w0, c.2[0])).collect();
        for (a, &first) in firsts.iter().enumerate() {
            for (b, cell) in l.cells.iter().enumerate() {
                for &o in &cell.2 {
                    if a == b || get32(&w0, o) == first {
                        continue;
                    }
                    let mut w = w0.clone();
                    put32(&mut w, o, first);
                    let msg = rejects_whole(&m, &w, LLAMA_MEMORY_ERR_INVALID_STATE);
                    assert!(msg.contains("already has a cell"), "{msg}");
                }
            }
        }
        let shared = l.cells.iter().find(|c| c.2.len() == 2).unwrap();
        for (x, y) in [(0, 1), (1, 0)] {
            let mut w = w0.clone();
            let v = get32(&w0, shared.2[x]);
            put32(&mut w, shared.2[y], v);
            let msg = rejects_whole(&m, &w, LLAMA_MEMORY_ERR_INVALID_STATE);
            assert!(msg.contains("already has a cell"), "{msg}");
        }
        // More ids than there are: the ids run into the next cell or the data section.
        for c in &l.cells {
            for v in [c.2.len() as u32 + 1, N_SEQ + 1, 300, 1 << 30, u32::MAX] {
                let mut w = w0.clone();
                put32(&mut w, c.1, v);
                rejects_whole(&m, &w, LLAMA_MEMORY_ERR_INVALID_STATE);
            }
        }
        // The same in a blob restored into the whole memory.
        let mut b = 0xaf14_3cd8u32.to_ne_bytes().to_vec();
        b.extend(0i32.to_ne_bytes());
        b.extend(&w0);
        put32(&mut b, 8 + l.cells[0].2[0], N_SEQ);
        rejects(&m, &b, -1, LLAMA_MEMORY_ERR_INVALID_STATE);
    }
    report("sequence_ids_in_a_whole_state");
}

/// Applies `edit` to a sequence blob of every source sequence and to the whole state, and
/// expects every destination to reject it with a message containing `what`.
fn each_state(m: &Mem, what: &str, edit: &dyn Fn(&mut [u8], &Layout)) {
    for src in SRC_SEQS {
        let mut b = seq_blob(m, src);
        let l = seq_layout(&b);
        edit(&mut b, &l);
        for dest in DESTS {
            let msg = rejects(m, &b, dest, LLAMA_MEMORY_ERR_INVALID_STATE);
            assert!(msg.contains(what), "{what}: {msg}");
        }
    }
    let mut w = whole(m);
    let l = layout(&w);
    edit(&mut w, &l);
    let msg = rejects_whole(m, &w, LLAMA_MEMORY_ERR_INVALID_STATE);
    assert!(msg.contains(what), "{what}: {msg}");
}

#[test]
fn s_trans_and_n_layer() {
    for n_rs in CONFIGS {
        let m = populated(n_rs);
        for v in [1, 2, 0x8000_0000, u32::MAX] {
            each_state(&m, "s_trans", &|b, l| put32(b, l.s_trans, v));
        }
        // 2 is the number of layers with tensors, a plausible mistake.
        for v in [0, 1, 2, 4, 64, u32::MAX] {
            each_state(&m, "layers", &|b, l| put32(b, l.n_layer, v));
        }
    }
    report("s_trans_and_n_layer");
}

#[test]
fn r_and_s_type_mismatch() {
    for n_rs in CONFIGS {
        let m = populated(n_rs);
        for k in 0..LAYERS.len() {
            for v in [1i32, 8, 30, -1, i32::MIN, i32::MAX] {
                each_state(&m, "r type", &|b, l| put32(b, l.r[k].0, v as u32));
                each_state(&m, "s type", &|b, l| put32(b, l.s[k].0, v as u32));
            }
        }
    }
    report("r_and_s_type_mismatch");
}

#[test]
fn row_size_mismatch() {
    for n_rs in CONFIGS {
        let m = populated(n_rs);
        let bad = |row: usize| {
            [
                0,
                1,
                row as u64 - 1,
                row as u64 + 1,
                row as u64 / 2,
                row as u64 * 2,
                1 << 40,
                u64::MAX,
            ]
        };
        for k in 0..LAYERS.len() {
            for v in bad(ROW_R) {
                each_state(&m, "r row", &|b, l| put64(b, l.r[k].1, v));
            }
            for v in bad(ROW_S) {
                each_state(&m, "s row", &|b, l| put64(b, l.s[k].1, v));
            }
        }
        for v in bad(ROW_P) {
            each_state(&m, "ple row", &|b, l| put64(b, l.p_row, v));
        }
    }
    report("row_size_mismatch");
}

#[test]
fn invalid_destinations_and_flags() {
    for n_rs in CONFIGS {
        let m = populated(n_rs);
        let b = seq_blob(&m, 0);
        for dest in [-2, i32::MIN, N_SEQ as i32, 255, 256, i32::MAX] {
            rejects(&m, &b, dest, LLAMA_MEMORY_ERR_INVALID_SEQ_ID);
        }
        for flags in [4, 8, 0x8000_0000, u32::MAX] {
            rejects_ext(&m, &b, 1, flags, LLAMA_MEMORY_ERR_INVALID_ARGUMENT);
        }
        let mut bad = b.clone();
        put32(&mut bad, 0, 0x6767_7371);
        assert!(rejects(&m, &bad, 1, LLAMA_MEMORY_ERR_INVALID_STATE).contains("magic"));
    }
    report("invalid_destinations_and_flags");
}

/// Trailing bytes after a state: the readers stop where the state ends and return the bytes
/// they read, as llama.cpp (and the KV cache, tests/kv_state_malformed.rs) does; the caller
/// notices from the return value. The restore is the same as without them.
#[test]
fn trailing_bytes_are_ignored_and_not_counted() {
    for n_rs in CONFIGS {
        for src in SRC_SEQS {
            let clean = populated(n_rs);
            let dirty = populated(n_rs);
            let b = seq_blob(&clean, src);
            let mut g = b.clone();
            g.extend([0xde, 0xad, 0xbe, 0xef, 1, 2, 3]);
            let n = b.len();
            assert_eq!(
                llama_memory_state_seq_set_data(clean.0, b.as_ptr(), n, 1),
                n,
                "{}",
                last_error()
            );
            assert_eq!(
                llama_memory_state_seq_set_data(dirty.0, g.as_ptr(), g.len(), 1),
                n,
                "{}",
                last_error()
            );
            assert_eq!(snapshot(&clean), snapshot(&dirty));
        }
        let clean = populated(n_rs);
        let dirty = populated(n_rs);
        let w = whole(&clean);
        let mut g = w.clone();
        g.extend([0u8; 13]);
        assert_eq!(
            llama_memory_state_set_data(dirty.0, g.as_ptr(), g.len()),
            w.len()
        );
        assert_eq!(
            llama_memory_state_set_data(clean.0, w.as_ptr(), w.len()),
            w.len()
        );
        assert_eq!(snapshot(&clean), snapshot(&dirty));
    }
}

#[test]
fn on_device_blobs_without_their_stash() {
    for n_rs in CONFIGS {
        let other = populated(n_rs);
        let fresh = new_mem(n_rs);
        for src in [0, 1, 2, 3] {
            // Saved on another handle: this one has no stash at all.
            let d = seq_blob_ext(&other, src, ON_DEVICE);
            for dest in DESTS {
                let msg = rejects_ext(&fresh, &d, dest, ON_DEVICE, LLAMA_MEMORY_ERR_INVALID_STATE);
                assert!(msg.contains("no tensor data"), "{msg}");
            }
        }
        // Seq 3's stash holds the empty save made before it had a cell: never save it here.
        for src in [0, 1, 2] {
            let m = populated(n_rs);
            let d = seq_blob_ext(&m, src, ON_DEVICE);
            // Stored ids this handle never saved.
            for stored in [(src + 1) % 3, -1, 4, 1000] {
                let mut b = d.clone();
                put32(&mut b, 4, stored as u32);
                for dest in DESTS {
                    let msg = rejects_ext(&m, &b, dest, ON_DEVICE, LLAMA_MEMORY_ERR_INVALID_STATE);
                    assert!(msg.contains("no tensor data"), "{msg}");
                }
            }
            // A short stash: one cell described, no rows kept.
            let mut b = d.clone();
            put32(&mut b, 4, 3);
            for dest in DESTS {
                let msg = rejects_ext(&m, &b, dest, ON_DEVICE, LLAMA_MEMORY_ERR_INVALID_STATE);
                assert!(msg.contains("truncated"), "{msg}");
            }
            // Without the flag the rows are looked for in the blob; a host blob with the flag
            // is read as metadata where its rows are.
            for dest in DESTS {
                rejects(&m, &d, dest, LLAMA_MEMORY_ERR_INVALID_STATE);
            }
            let h = seq_blob(&m, src);
            for dest in DESTS {
                rejects_ext(&m, &h, dest, ON_DEVICE, LLAMA_MEMORY_ERR_INVALID_STATE);
            }
            // Metadata fields corrupted, with the stash present.
            let l = seq_layout(&h);
            for (off, v, what) in [
                (l.cell_count, 2u32, "one recurrent cell"),
                (l.cells[0].1, 1, "expected 0"),
                (l.s_trans, 1, "s_trans"),
                (l.n_layer, 2, "layers"),
                (l.r[0].0, 1, "r type"),
            ] {
                let mut b = d.clone();
                put32(&mut b, off, v);
                let msg = rejects_ext(&m, &b, 1, ON_DEVICE, LLAMA_MEMORY_ERR_INVALID_STATE);
                assert!(msg.contains(what), "{what}: {msg}");
            }
        }
    }
    report("on_device_blobs_without_their_stash");
}

/// An ON_DEVICE blob that describes fewer rows than its stash holds: the KV cache rejects
/// that ("the stashed tensor data has N bytes more than the state describes",
/// src/kv/memory.rs); the recurrent memory must too, and change nothing. (Found by this
/// test: the first version accepted such a blob and erased the destination.)
#[test]
fn on_device_stash_longer_than_the_state() {
    for n_rs in CONFIGS {
        let m = populated(n_rs);
        for src in SRC_SEQS {
            let d = seq_blob_ext(&m, src, ON_DEVICE);
            // cell_count 0 and the cell's 8 metadata bytes removed: a valid empty state whose
            // stash still holds one cell's rows.
            let mut b = d[..8].to_vec();
            b.extend(0u32.to_ne_bytes());
            b.extend(&d[8 + 4 + 8..]);
            for dest in DESTS {
                let msg = rejects_ext(&m, &b, dest, ON_DEVICE, LLAMA_MEMORY_ERR_INVALID_STATE);
                assert!(msg.contains("more than"), "{msg}");
            }
        }
    }
    report("on_device_stash_longer_than_the_state");
}

#[test]
fn good_states_round_trip() {
    for n_rs in CONFIGS {
        // A sequence blob into every other sequence re-serializes to the same bytes (all but
        // the stored sequence id of the blob header).
        for src in 0..N_SEQ as i32 {
            for dest in 0..N_SEQ as i32 {
                let m = populated(n_rs);
                let b = seq_blob(&m, src);
                assert_eq!(
                    llama_memory_state_seq_set_data(m.0, b.as_ptr(), b.len(), dest),
                    b.len(),
                    "{}",
                    last_error()
                );
                let again = seq_blob(&m, dest);
                assert_eq!(again[8..], b[8..], "seq {src} -> {dest}");
                assert_eq!(llama_memory_seq_pos_max(m.0, dest), get32(&b, 12) as i32);
                // ON_DEVICE, same handle: the same restore from the stash.
                let m2 = populated(n_rs);
                let d = seq_blob_ext(&m2, src, ON_DEVICE);
                assert_eq!(
                    llama_memory_state_seq_set_data_ext(m2.0, d.as_ptr(), d.len(), dest, ON_DEVICE),
                    d.len(),
                    "{}",
                    last_error()
                );
                assert_eq!(
                    seq_blob(&m2, dest)[8..],
                    b[8..],
                    "ON_DEVICE {src} -> {dest}"
                );
                assert_eq!(snapshot(&m2), snapshot(&m));
            }
        }
        // The whole state into a fresh memory, and into the memory it came from.
        let m = populated(n_rs);
        let w = whole(&m);
        let fresh = new_mem(n_rs);
        assert_eq!(
            llama_memory_state_set_data(fresh.0, w.as_ptr(), w.len()),
            w.len(),
            "{}",
            last_error()
        );
        assert_eq!(whole(&fresh), w);
        for s in 0..N_SEQ as i32 {
            assert_eq!(seq_blob(&fresh, s)[8..], seq_blob(&m, s)[8..], "seq {s}");
        }
        assert_eq!(
            llama_memory_state_set_data(m.0, w.as_ptr(), w.len()),
            w.len()
        );
        assert_eq!(whole(&m), w);
        // src0 is what the last placement staged; a restore keeps it, as llama.cpp's clear.
        let no_src0 = |s: Snapshot| -> Vec<_> {
            s.cells
                .into_iter()
                .map(|(p, src, _, t, r, q)| (p, src, t, r, q))
                .collect()
        };
        assert_eq!(no_src0(snapshot(&m)), no_src0(snapshot(&fresh)));
        // The stored sequence id of a host blob is ignored, as llama.cpp.
        let m = populated(n_rs);
        let mut b = seq_blob(&m, 2);
        put32(&mut b, 4, (-7i32) as u32);
        assert_eq!(
            llama_memory_state_seq_set_data(m.0, b.as_ptr(), b.len(), 1),
            b.len()
        );
        assert_eq!(seq_blob(&m, 1)[8..], b[8..]);
    }
}

/// The caller-io path (llama.cpp's `llama_io_write_i`/`llama_io_read_i`, used by the drop-in
/// adapter) writes exactly the blob's bytes and restores exactly what the blob path restores.
#[test]
fn io_path_matches_the_blob_path() {
    let mut n = 0;
    for n_rs in CONFIGS {
        let m = populated(n_rs);
        assert_eq!(io_write(&m, -1), whole(&m));
        for seq in 0..N_SEQ as i32 {
            assert_eq!(io_write(&m, seq), seq_blob(&m, seq)[8..], "seq {seq}");
        }
        for src in 0..N_SEQ as i32 {
            for dest in 0..N_SEQ as i32 {
                let by_blob = populated(n_rs);
                let by_io = populated(n_rs);
                let b = seq_blob(&by_blob, src);
                assert_eq!(
                    llama_memory_state_seq_set_data(by_blob.0, b.as_ptr(), b.len(), dest),
                    b.len()
                );
                let (rc, used) = io_read(&by_io, &b[8..], dest);
                assert_eq!(rc, LLAMA_MEMORY_OK, "{}", last_error());
                assert_eq!(used, b.len() - 8, "bytes consumed");
                assert_eq!(snapshot(&by_io), snapshot(&by_blob), "seq {src} -> {dest}");
                n += 1;
            }
        }
        // A whole state into a fresh memory, and (the other rows zeroed) into used ones.
        let mut w = whole(&m);
        for (fresh, seed) in [(true, 1u64), (false, 2), (false, 3)] {
            let (by_blob, by_io) = if fresh {
                (new_mem(n_rs), new_mem(n_rs))
            } else {
                (populated(n_rs), populated(n_rs))
            };
            if !fresh {
                randomize(&by_blob, seed);
                randomize(&by_io, seed);
            }
            assert_eq!(
                llama_memory_state_set_data(by_blob.0, w.as_ptr(), w.len()),
                w.len()
            );
            let (rc, used) = io_read(&by_io, &w, -1);
            assert_eq!(rc, LLAMA_MEMORY_OK, "{}", last_error());
            assert_eq!(used, w.len());
            assert_eq!(snapshot(&by_io), snapshot(&by_blob), "whole state");
            n += 1;
            // a state of fewer cells next
            let fewer = populated(n_rs);
            assert!(llama_memory_seq_rm(fewer.0, 2, -1, -1));
            w = whole(&fewer);
        }
    }
    eprintln!("io_path_matches_the_blob_path: {n} restores compared");
}
