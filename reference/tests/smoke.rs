//! Drives the stock llama.cpp KV cache through the shim and checks known stock behaviour.
//! These tests check the shim and its wrapper, not llama-memory.

use llama_memory_reference::{
    ggml_type, model_path, model_path_ex, non_causal_type, sanity_decode, swa_type, CtxParams,
    MemoryStatus, Params, RefCtx, RefKv, Slot, Ubatch,
};

const NEG_INF_F16: u16 = 0xfc00;

fn unified(kv_size: u32) -> RefKv {
    RefKv::tiny(&Params {
        kv_size,
        ..Params::default()
    })
}

fn non_unified(n_seq_max: u32) -> RefKv {
    RefKv::tiny(&Params {
        n_seq_max,
        unified: false,
        ..Params::default()
    })
}

/// find_slot + apply_ubatch, as one ubatch of a decode.
fn place(kv: &mut RefKv, ub: &Ubatch) -> Slot {
    let view = ub.view();
    let slot = kv.find_slot(&view, false).expect("a slot");
    kv.apply_ubatch(&slot, &view);
    slot
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((h >> 10) & 0x1f);
    let frac = f32::from(h & 0x3ff);
    match exp {
        0 => sign * frac * 2f32.powi(-24),
        31 => sign * if frac == 0.0 { f32::INFINITY } else { f32::NAN },
        _ => sign * (1.0 + frac / 1024.0) * 2f32.powi(exp - 15),
    }
}

#[test]
fn tiny_model_loads_and_decodes() {
    assert_eq!(sanity_decode(&model_path(), 7), 0);
}

#[test]
fn defaults_match_the_header() {
    let p = Params::default();
    assert_eq!(p.kv_size, 256);
    assert_eq!(p.n_seq_max, 1);
    assert!(p.unified && p.v_trans && !p.use_alibi && !p.mrope);
    assert_eq!((p.type_k, p.type_v), (ggml_type::F16, ggml_type::F16));
    assert_eq!(p.non_causal_type, -1);

    let kv = RefKv::tiny(&p);
    assert_eq!(kv.size(), 256);
    assert_eq!(kv.n_stream(), 1);
    // 2 KV heads of size 16
    assert_eq!(kv.n_embd_v_gqa_max(), 32);
    assert!(kv.can_shift());
    assert!(!kv.has_shift());
}

#[test]
fn place_copy_remove_shift_update() {
    let mut kv = unified(256);

    let ub = Ubatch::for_seq(0, 0, 5);
    let slot = place(&mut kv, &ub);
    assert_eq!(
        slot,
        Slot {
            s0: 0,
            s1: 0,
            strm: vec![0],
            idxs: vec![vec![0, 1, 2, 3, 4]]
        }
    );
    assert_eq!((kv.seq_pos_min(0), kv.seq_pos_max(0)), (0, 4));
    let info = kv.stream_info(0);
    assert_eq!(
        (info.head, info.used, info.used_min, info.used_max_p1),
        (5, 5, 0, 5)
    );
    assert_eq!(kv.get_n_kv(&slot), 256);

    // k/v indices of the placed ubatch: V transposed → one index per scalar
    let view = ub.view();
    assert_eq!(kv.k_idxs(&view, &slot), vec![0, 1, 2, 3, 4]);
    let v = kv.v_idxs(&view, &slot);
    assert_eq!(v.len(), 5 * 32);
    // token i, channel j → j*size + cell
    assert_eq!(&v[..3], &[0, 256, 512]);
    assert_eq!(v[32 + 1], 256 + 1);

    let cells = kv.cells(0);
    assert_eq!(&cells.pos[..6], &[0, 1, 2, 3, 4, -1]);
    // token ids are recorded in the cell ext (x, y stay 0 without M-RoPE)
    assert_eq!(cells.ext[3], [0, 0, 3]);

    kv.seq_cp(0, 1, -1, -1);
    assert!(kv.seq_rm(0, 2, -1));
    assert_eq!((kv.seq_pos_min(1), kv.seq_pos_max(1)), (0, 4));
    assert_eq!((kv.seq_pos_min(0), kv.seq_pos_max(0)), (0, 1));
    let cells = kv.cells(0);
    assert_eq!(cells.seqs(0), vec![0, 1]);
    assert_eq!(cells.seqs(1), vec![0, 1]);
    assert_eq!(cells.seqs(2), vec![1]);
    assert_eq!(cells.seqs(5), Vec::<i32>::new());

    // the shift moves whole cells, so seq 0's two shared cells move too
    kv.seq_add(1, 0, -1, 3);
    assert!(kv.has_shift());
    let cells = kv.cells(0);
    assert_eq!(&cells.pos[..6], &[3, 4, 5, 6, 7, -1]);
    assert_eq!(&cells.shift[..6], &[3, 3, 3, 3, 3, 0]);
    assert_eq!((kv.seq_pos_min(0), kv.seq_pos_max(0)), (3, 4));
    assert_eq!((kv.seq_pos_min(1), kv.seq_pos_max(1)), (3, 7));
    // seq_add resets the search head when it frees nothing
    assert_eq!(kv.stream_info(0).head, 0);
    let k_shift = kv.k_shift();
    assert_eq!(k_shift.len(), 256);
    assert_eq!(&k_shift[..6], &[3, 3, 3, 3, 3, 0]);

    assert_eq!(kv.update(), MemoryStatus::Success);
    assert!(!kv.has_shift());
    let cells = kv.cells(0);
    assert_eq!(&cells.pos[..6], &[3, 4, 5, 6, 7, -1]);
    assert!(cells.shift.iter().all(|&s| s == 0));
    assert_eq!(kv.update(), MemoryStatus::NoUpdate);

    // a query of seq 1 at position 5: cells at positions 3..5 visible, 6 and 7 in the future
    let q = Ubatch::for_seq(1, 5, 1);
    let mask = kv.kq_mask_f32(&q.view(), true, 256, 1);
    assert_eq!(mask.len(), 256);
    assert_eq!(&mask[..3], &[0.0, 0.0, 0.0]);
    assert!(mask[3..].iter().all(|&m| m == f32::NEG_INFINITY));
    // without causality the whole sequence is visible
    let mask = kv.kq_mask_f32(&q.view(), false, 256, 1);
    assert_eq!(&mask[..5], &[0.0; 5]);
    assert!(mask[5..].iter().all(|&m| m == f32::NEG_INFINITY));
    // seq 0 only sees its own two cells
    let q0 = Ubatch::for_seq(0, 5, 1);
    let mask = kv.kq_mask_f16(&q0.view(), true, 256, 1);
    assert_eq!(&mask[..3], &[0, 0, NEG_INF_F16]);
    assert!(mask[2..].iter().all(|&m| m == NEG_INF_F16));
}

#[test]
fn decode_step_mask_and_n_kv() {
    let mut kv = unified(512);
    place(&mut kv, &Ubatch::for_seq(0, 0, 300));
    let ub = Ubatch::for_seq(0, 300, 2);
    let slot = place(&mut kv, &ub);
    assert_eq!(slot.idxs, vec![vec![300, 301]]);
    // n_kv pads the used range to 256
    assert_eq!(kv.get_n_kv(&slot), 512);

    let mask = kv.kq_mask_f32(&ub.view(), true, 512, 1);
    // row 0 (pos 300) sees cells 0..=300, row 1 (pos 301) sees 0..=301
    assert!(mask[..301].iter().all(|&m| m == 0.0));
    assert!(mask[301..512].iter().all(|&m| m == f32::NEG_INFINITY));
    assert!(mask[512..512 + 302].iter().all(|&m| m == 0.0));
    assert!(mask[512 + 302..].iter().all(|&m| m == f32::NEG_INFINITY));
}

#[test]
fn alibi_mask_holds_distances() {
    let mut kv = RefKv::tiny(&Params {
        use_alibi: true,
        ..Params::default()
    });
    place(&mut kv, &Ubatch::for_seq(0, 0, 4));
    let q = Ubatch::for_seq(0, 4, 1);
    let mask = kv.kq_mask_f32(&q.view(), true, 256, 1);
    assert_eq!(&mask[..4], &[-4.0, -3.0, -2.0, -1.0]);
    assert_eq!(mask[4], f32::NEG_INFINITY);
}

#[test]
fn swa_mask_and_cell_reuse() {
    let mut kv = RefKv::tiny(&Params {
        n_swa: 4,
        swa_type: swa_type::STANDARD,
        ..Params::default()
    });
    place(&mut kv, &Ubatch::for_seq(0, 0, 6));
    let q = Ubatch::for_seq(0, 6, 1);
    let mask = kv.kq_mask_f32(&q.view(), true, 256, 1);
    // standard SWA: p1 - p0 >= 4 is masked → positions 3..5 visible
    assert_eq!(&mask[..3], &[f32::NEG_INFINITY; 3]);
    assert_eq!(&mask[3..6], &[0.0; 3]);
}

#[test]
fn prepare_rolls_back() {
    let mut kv = unified(256);
    let a = Ubatch::for_seq(0, 0, 3);
    let b = Ubatch::for_seq(0, 3, 2);
    let slots = kv.prepare(&[a.view(), b.view()]).expect("fits");
    assert_eq!(slots[0].idxs, vec![vec![0, 1, 2]]);
    assert_eq!(slots[1].idxs, vec![vec![3, 4]]);
    assert_eq!(kv.seq_pos_max(0), -1);
    assert_eq!(kv.stream_info(0).used, 0);

    let big = Ubatch::for_seq(0, 0, 257);
    assert!(kv.find_slot(&big.view(), false).is_none());
    assert!(kv.prepare(&[big.view()]).is_none());
}

#[test]
fn non_unified_streams_are_independent() {
    let mut kv = non_unified(2);
    assert_eq!(kv.n_stream(), 2);
    let s0 = place(&mut kv, &Ubatch::equal(&[(0, 0)], 5));
    assert_eq!((s0.s0, s0.s1, s0.strm.clone()), (0, 0, vec![0]));
    // both sequences in one equal-split ubatch: one slot stream each
    let both = Ubatch::equal(&[(0, 5), (1, 0)], 2);
    let slot = place(&mut kv, &both);
    assert_eq!((slot.s0, slot.s1), (0, 1));
    assert_eq!(slot.strm, vec![0, 1]);
    assert_eq!(slot.idxs, vec![vec![5, 6], vec![0, 1]]);
    // global rows: stream * size + cell
    assert_eq!(kv.k_idxs(&both.view(), &slot), vec![5, 6, 256, 257]);

    // one mask stream per sequence
    let q = Ubatch::equal(&[(0, 7), (1, 2)], 1);
    let mask = kv.kq_mask_f32(&q.view(), true, 256, 2);
    assert_eq!(&mask[..7], &[0.0; 7]);
    assert_eq!(mask[7], f32::NEG_INFINITY);
    assert_eq!(&mask[256..259], &[0.0, 0.0, f32::NEG_INFINITY]);

    kv.seq_keep(0);
    assert_eq!(
        kv.seq_pos_max(1),
        1,
        "non-unified seq_keep only touches its own stream"
    );
    assert_eq!(kv.seq_pos_max(0), 6);

    let mut uni = RefKv::tiny(&Params {
        n_seq_max: 2,
        ..Params::default()
    });
    place(&mut uni, &Ubatch::for_seq(0, 0, 3));
    place(&mut uni, &Ubatch::for_seq(1, 0, 2));
    uni.seq_keep(0);
    assert_eq!(
        uni.seq_pos_max(1),
        -1,
        "unified seq_keep drops every other sequence"
    );
    assert_eq!(uni.seq_pos_max(0), 2);
}

/// Offsets in a whole-cache blob of one stream with `n` cells (no ext): the K rows of layer 0.
fn k0_offset(n: usize) -> usize {
    4 + 4 + n * 12 + 16 + 4 + 8
}

#[test]
fn state_layout_matches_the_spec() {
    let mut kv = non_unified(2);
    place(&mut kv, &Ubatch::equal(&[(0, 0)], 5));
    // §15: 1424 bytes from llama_state_seq_get_size, of which 8 are the context's header
    assert_eq!(kv.state_size(0, 0), 1416);
    let blob = kv.state_write(0, 0);
    assert_eq!(blob.len(), 1416);
    let u32_at = |o: usize| u32::from_le_bytes(blob[o..o + 4].try_into().unwrap());
    assert_eq!(u32_at(0), 2, "n_stream");
    assert_eq!(u32_at(4), 5, "cell_count");
    assert_eq!(
        (u32_at(8), u32_at(12), u32_at(16)),
        (0, 1, 0),
        "pos 0, one seq id, seq 0"
    );
    assert_eq!(
        (u32_at(68), u32_at(72), u32_at(76), u32_at(80)),
        (1, 2, 0, 0),
        "v_trans, n_layer, n_rot_k, n_rot_v"
    );
    assert_eq!(u32_at(1412), 0, "stream 1 has no cells");

    // restore into a fresh cache and write again: same bytes
    let mut other = non_unified(2);
    assert_eq!(other.state_read(0, 0, &blob), Some(1416));
    assert_eq!((other.seq_pos_min(0), other.seq_pos_max(0)), (0, 4));
    assert_eq!(other.state_write(0, 0), blob);

    // a corrupted K type makes the stock restore throw: 0 bytes, destination emptied
    let mut bad = blob.clone();
    bad[84] = 0x7f;
    assert_eq!(other.state_read(0, 0, &bad), None);
    assert_eq!(other.seq_pos_max(0), -1);
    // truncated buffer
    assert_eq!(other.state_read(0, 0, &blob[..100]), None);
}

#[test]
fn k_shift_rotates_the_cache_tensors() {
    let mut kv = unified(256);
    place(&mut kv, &Ubatch::for_seq(0, 0, 5));

    // put 1.0 in every K element of layer 0 through a whole-cache restore
    let mut blob = kv.state_write(-1, 0);
    let k0 = k0_offset(5);
    for h in blob[k0..k0 + 5 * 64].chunks_mut(2) {
        h.copy_from_slice(&0x3c00u16.to_le_bytes());
    }
    assert_eq!(kv.state_read(-1, 0, &blob), Some(blob.len()));
    assert_eq!(kv.state_write(-1, 0), blob);

    kv.seq_add(0, 0, -1, 3);
    assert_eq!(kv.update(), MemoryStatus::Success);
    assert!(!kv.has_shift());

    let after = kv.state_write(-1, 0);
    let k = |o: usize| {
        f16_to_f32(u16::from_le_bytes([
            after[k0 + 2 * o],
            after[k0 + 2 * o + 1],
        ]))
    };
    // NORM RoPE on the first pair of each head by θ = 3: (cos3 - sin3, sin3 + cos3)
    let (c, s) = (3f32.cos(), 3f32.sin());
    for cell in 0..5 {
        for head in 0..2 {
            let o = cell * 32 + head * 16;
            assert!(
                (k(o) - (c - s)).abs() < 2e-3,
                "cell {cell} head {head}: {}",
                k(o)
            );
            assert!(
                (k(o + 1) - (s + c)).abs() < 2e-3,
                "cell {cell} head {head}: {}",
                k(o + 1)
            );
        }
    }
    // the metadata moved by 3; the other layer's zeros stay zero (rotated: some become -0.0)
    assert_eq!(&kv.cells(0).pos[..5], &[3, 4, 5, 6, 7]);
    let k1 = k0 + 5 * 64 + 12;
    assert!(after[k1..k1 + 5 * 64]
        .chunks(2)
        .all(|h| f16_to_f32(u16::from_le_bytes([h[0], h[1]])) == 0.0));
}

#[test]
fn stream_copy_applies_on_update() {
    let mut kv = non_unified(2);
    place(&mut kv, &Ubatch::equal(&[(0, 0)], 3));
    // seq 0's blob: its cells are in stream 0, so the layout is that of a one-stream blob
    let k0 = k0_offset(3);
    let mut blob = kv.state_write(0, 0);
    blob[k0..k0 + 3 * 64].fill(0x11);
    assert_eq!(kv.state_read(0, 0, &blob), Some(blob.len()));

    kv.seq_cp(0, 1, -1, -1);
    assert_eq!(kv.pending_copies(), 1);
    assert_eq!((kv.seq_pos_min(1), kv.seq_pos_max(1)), (0, 2));
    assert_eq!(kv.update(), MemoryStatus::Success);
    assert_eq!(kv.pending_copies(), 0);

    // seq 1's blob has an empty stream 0 first (4 more bytes) and then the copied rows
    let s1 = kv.state_write(1, 0);
    assert_eq!(&s1[k0 + 4..k0 + 4 + 3 * 64], &blob[k0..k0 + 3 * 64]);
}

#[test]
fn seq_div_accumulates_old_minus_new() {
    let mut kv = unified(256);
    place(&mut kv, &Ubatch::for_seq(0, 0, 6));
    kv.seq_div(0, 0, -1, 2);
    assert!(kv.has_shift());
    let cells = kv.cells(0);
    assert_eq!(&cells.pos[..6], &[0, 0, 1, 1, 2, 2]);
    assert_eq!(&cells.shift[..6], &[0, 1, 1, 2, 2, 3]);
    assert_eq!(&kv.k_shift()[..7], &[0, 1, 1, 2, 2, 3, 0]);
}

#[test]
fn mrope_keeps_2d_positions() {
    let mut kv = RefKv::tiny(&Params {
        mrope: true,
        ..Params::default()
    });
    assert!(!kv.can_shift());
    // three image embeddings at position 5: (y, x) = (0, 0), (0, 1), (1, 0)
    let img = Ubatch::simple(
        vec![],
        vec![5, 5, 5, 0, 0, 1, 0, 1, 0, 0, 0, 0],
        vec![vec![0]; 3],
    );
    assert_eq!(img.n_pos, 4);
    place(&mut kv, &img);
    let cells = kv.cells(0);
    assert_eq!(&cells.ext[..3], &[[0, 0, -1], [1, 0, -1], [0, 1, -1]]);

    // a query at position 5, (y, x) = (0, 1): the cell at (1, 0) comes later in the image
    let q = Ubatch::simple(vec![], vec![5, 0, 1, 0], vec![vec![0]]);
    let mask = kv.kq_mask_f32(&q.view(), true, 256, 1);
    assert_eq!(&mask[..3], &[0.0, 0.0, f32::NEG_INFINITY]);

    // the cell ext is serialized: 12 more bytes per cell than without M-RoPE
    let blob = kv.state_write(-1, 0);
    assert_eq!(blob.len(), 912);
    let mut other = RefKv::tiny(&Params {
        mrope: true,
        ..Params::default()
    });
    assert_eq!(other.state_read(-1, 0, &blob), Some(912));
    assert_eq!(other.cells(0).ext[..3], cells.ext[..3]);
    assert_eq!(other.state_write(-1, 0), blob);
}

#[test]
fn pos_bucket_of_a_causal_decoder() {
    let mut kv = RefKv::tiny(&Params {
        n_rel_attn_bkts: 32,
        ..Params::default()
    });
    place(&mut kv, &Ubatch::for_seq(0, 0, 3));
    let q = Ubatch::for_seq(0, 3, 1);
    let buckets = kv.pos_bucket(&q.view(), 256);
    assert_eq!(buckets.len(), 256);
    // distance 3, 2, 1 to the cells; empty cells count as position -1 (distance 4)
    assert_eq!(&buckets[..4], &[3, 2, 1, 4]);
    assert!(buckets[3..].iter().all(|&b| b == 4));
}

#[test]
fn non_causal_override_reaches_the_mask() {
    let mut kv = RefKv::tiny(&Params {
        non_causal_type: non_causal_type::SWA_ONLY,
        ..Params::default()
    });
    place(&mut kv, &Ubatch::for_seq(0, 0, 4));
    let q = Ubatch::for_seq(0, 1, 1);
    // SWA_ONLY keeps a cache without SWA causal even when asked for a non-causal mask
    let mask = kv.kq_mask_f32(&q.view(), false, 256, 1);
    assert_eq!(
        &mask[..4],
        &[0.0, 0.0, f32::NEG_INFINITY, f32::NEG_INFINITY]
    );

    let mut all = unified(256);
    place(&mut all, &Ubatch::for_seq(0, 0, 4));
    let mask = all.kq_mask_f32(&q.view(), false, 256, 1);
    assert_eq!(&mask[..4], &[0.0; 4]);
}

#[test]
fn coexists_with_the_process_ggml() {
    // the process's own ggml (ggml-sys, linked into this test binary) and the shim's copy
    // each keep their globals; using one must not disturb the other
    let params = ggml_sys::ggml_init_params {
        mem_size: 1 << 20,
        mem_buffer: std::ptr::null_mut(),
        no_alloc: false,
    };
    // SAFETY: plain ggml usage on a context owned by this test
    unsafe {
        let ctx = ggml_sys::ggml_init(params);
        assert!(!ctx.is_null());
        let t = ggml_sys::ggml_new_tensor_1d(ctx, ggml_sys::GGML_TYPE_F32, 16);
        assert!(!t.is_null());
        ggml_sys::ggml_free(ctx);
    }

    let mut kv = unified(256);
    place(&mut kv, &Ubatch::for_seq(0, 0, 4));
    kv.seq_add(0, 0, -1, 1);
    assert_eq!(kv.update(), MemoryStatus::Success);
    assert_eq!(sanity_decode(&model_path(), 3), 0);
}

/// `n_seq_max` sequences, one stream each, transposed V unless `flash_attn`.
fn ctx_non_unified(n_seq_max: u32, flash_attn: bool) -> RefCtx {
    RefCtx::tiny(&CtxParams {
        n_seq_max,
        kv_unified: false,
        flash_attn,
        ..CtxParams::default()
    })
}

const PROMPT: [i32; 5] = [3, 1, 4, 1, 5];

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// A path in the temp directory private to this process and test.
fn temp_file(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("kvref-{name}.{}", std::process::id()))
}

#[test]
fn ctx_defaults_match_the_header() {
    let p = CtxParams::default();
    assert_eq!((p.n_ctx, p.n_batch, p.n_seq_max), (256, 0, 1));
    assert!(p.kv_unified && !p.flash_attn);
    assert_eq!((p.type_k, p.type_v), (ggml_type::F16, ggml_type::F16));

    let mut ctx = RefCtx::tiny(&p);
    assert_eq!(ctx.n_vocab(), 32);
    assert_eq!(ctx.logits(), None, "no logits before the first decode");
    assert_eq!(ctx.seq_pos_max(0), -1);
    assert_eq!(ctx.decode(&PROMPT, 0, 0), 0);
    assert_eq!((ctx.seq_pos_min(0), ctx.seq_pos_max(0)), (0, 4));
    let logits = ctx.logits().expect("logits of the last token");
    assert_eq!(logits.len(), 32);
    assert!(logits.iter().all(|x| x.is_finite()));

    // a position gap is refused by llama_decode's batch validation: no logits afterwards
    assert!(ctx.decode(&[0], 9, 0) < 0);
    assert_eq!(ctx.logits(), None);

    assert!(ctx.seq_rm(0, 3, -1));
    assert_eq!((ctx.seq_pos_min(0), ctx.seq_pos_max(0)), (0, 2));
    ctx.memory_clear(true);
    assert_eq!(ctx.seq_pos_max(0), -1);
}

#[test]
fn ctx_seq_state_size_matches_the_spec() {
    let mut ctx = ctx_non_unified(2, false);
    assert_eq!(ctx.decode(&PROMPT, 0, 0), 0);
    // §15: an 8-byte header (magic, source seq id) + the memory part (1416 bytes, see
    // state_layout_matches_the_spec)
    assert_eq!(ctx.seq_state_size(0, 0), 1424);
    let blob = ctx.seq_state(0, 0).expect("a blob");
    assert_eq!(blob.len(), 1424);
    let u32_at = |o: usize| u32::from_le_bytes(blob[o..o + 4].try_into().unwrap());
    assert_eq!(u32_at(0), 0xaf14_3cd8, "io magic");
    assert_eq!(u32_at(4), 0, "source seq id");

    // the memory part's metadata is what the standalone stock cache writes for the same cells
    let mut kv = non_unified(2);
    place(&mut kv, &Ubatch::equal(&[(0, 0)], 5));
    let mem = kv.state_write(0, 0);
    assert_eq!(
        &blob[8..8 + 88],
        &mem[..88],
        "streams, cells, layout, K type"
    );
    assert_eq!(u32_at(8 + 1412), 0, "stream 1 has no cells");

    // an empty sequence: header, n_stream and two empty streams
    assert_eq!(ctx.seq_state_size(1, 0), 8 + 4 + 2 * 4);
    // too small a buffer: 0
    let mut small = vec![0u8; 100];
    assert_eq!(ctx.seq_state_into(0, 0, &mut small), 0);
}

#[test]
fn ctx_seq_restore_gives_bit_identical_logits() {
    for flash_attn in [false, true] {
        let mut a = ctx_non_unified(2, flash_attn);
        assert_eq!(a.decode(&PROMPT, 0, 0), 0);
        let blob = a.seq_state(0, 0).expect("a blob");

        let mut b = ctx_non_unified(2, flash_attn);
        assert_eq!(
            b.seq_set(0, 0, &blob),
            blob.len(),
            "flash_attn {flash_attn}"
        );
        assert_eq!((b.seq_pos_min(0), b.seq_pos_max(0)), (0, 4));
        assert_eq!(b.seq_state(0, 0).as_deref(), Some(&blob[..]));

        assert_eq!(a.decode(&[7], 5, 0), 0);
        assert_eq!(b.decode(&[7], 5, 0), 0);
        let (la, lb) = (a.logits().unwrap(), b.logits().unwrap());
        assert_eq!(bits(&la), bits(&lb), "flash_attn {flash_attn}");
    }
}

#[test]
fn ctx_seq_restore_rejects_a_corrupted_blob() {
    let mut a = ctx_non_unified(2, false);
    assert_eq!(a.decode(&PROMPT, 0, 0), 0);
    let blob = a.seq_state(0, 0).expect("a blob");

    let mut b = ctx_non_unified(2, false);
    // K type of layer 0: byte 84 of the memory part
    let mut bad = blob.clone();
    bad[8 + 84] = 0x7f;
    assert_eq!(b.seq_set(0, 0, &bad), 0);
    assert_eq!(
        b.seq_pos_max(0),
        -1,
        "a failed restore leaves the sequence empty"
    );
    // a wrong magic, and a truncated blob
    let mut bad = blob.clone();
    bad[0] ^= 1;
    assert_eq!(b.seq_set(0, 0, &bad), 0);
    assert_eq!(b.seq_set(0, 0, &blob[..100]), 0);
    // the intact blob still restores afterwards
    assert_eq!(b.seq_set(0, 0, &blob), blob.len());
    assert_eq!(b.seq_pos_max(0), 4);
}

#[test]
fn ctx_seq_file_round_trip() {
    let mut a = ctx_non_unified(2, false);
    assert_eq!(a.decode(&PROMPT, 0, 0), 0);
    let blob = a.seq_state(0, 0).expect("a blob");

    let path = temp_file("seq-file-round-trip");
    // magic, version, token count, the tokens, then the memory part (no 8-byte header)
    let size = 12 + 4 * PROMPT.len() + (blob.len() - 8);
    assert_eq!(a.seq_save_file(&path, 0, &PROMPT), size);
    assert_eq!(std::fs::metadata(&path).unwrap().len() as usize, size);

    let mut b = ctx_non_unified(2, false);
    // too little room for the tokens: nothing loaded
    assert_eq!(b.seq_load_file(&path, 1, 2), (0, vec![]));
    assert_eq!(b.seq_pos_max(1), -1);
    // into another sequence (stream 1)
    assert_eq!(b.seq_load_file(&path, 1, 16), (size, PROMPT.to_vec()));
    assert_eq!((b.seq_pos_min(1), b.seq_pos_max(1)), (0, 4));
    assert_eq!(b.seq_pos_max(0), -1);

    // continuing both sequences gives the same logits
    assert_eq!(a.decode(&[9], 5, 0), 0);
    assert_eq!(b.decode(&[9], 5, 1), 0);
    assert_eq!(bits(&a.logits().unwrap()), bits(&b.logits().unwrap()));
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn ctx_whole_state_round_trip() {
    let mut a = RefCtx::tiny(&CtxParams {
        n_seq_max: 2,
        ..CtxParams::default()
    });
    assert_eq!(a.decode(&PROMPT, 0, 0), 0);
    assert_eq!(a.decode(&[2, 7], 0, 1), 0);
    let state = a.state().expect("a state");
    assert_eq!(a.state_size(), state.len());

    let mut b = RefCtx::tiny(&CtxParams {
        n_seq_max: 2,
        ..CtxParams::default()
    });
    assert_eq!(b.state_set(&state), state.len());
    assert_eq!((b.seq_pos_max(0), b.seq_pos_max(1)), (4, 1));
    assert_eq!(b.state().as_deref(), Some(&state[..]));
    assert_eq!(b.state_set(&state[..state.len() / 2]), 0);
}

#[test]
fn ctx_over_a_model_of_another_shape() {
    let path = model_path_ex(2, 128, 4, 4);
    assert_eq!(model_path_ex(2, 128, 4, 4), path, "cached per shape");
    assert_eq!(model_path_ex(2, 64, 4, 2), model_path());
    assert_eq!(sanity_decode(&path, 7), 0);

    let mut ctx = RefCtx::new(&path, &CtxParams::default()).expect("a context");
    assert_eq!(ctx.decode(&PROMPT, 0, 0), 0);
    assert!(ctx.logits().unwrap().iter().all(|x| x.is_finite()));
    // 4 KV heads of size 32: K and V rows of 128 halves per cell and layer
    let per_layer = 4 + 8 + 5 * 256;
    let per_layer_v = 4 + 4 + 4 + 5 * 256;
    assert_eq!(
        ctx.seq_state_size(0, 0),
        8 + 4 + 4 + 5 * 12 + 16 + 2 * per_layer + 2 * per_layer_v
    );

    assert!(!llama_memory_reference::write_model_ex(
        &std::env::temp_dir().join("kvref-invalid-shape.gguf"),
        2,
        100,
        3,
        1
    ));
}
