//! Drives the stock llama.cpp recurrent memory (`llama_memory_recurrent`) and stock contexts over
//! the tiny `mamba` and `lfm2` models through the shim, and checks values that follow from the
//! pinned source (`src/llama-memory-recurrent.cpp`). These tests check the shim and its wrapper,
//! not llama-memory.

use llama_memory_reference::{
    lfm2_model_path, mamba_model_path, sanity_decode, CtxParams, RefCtx, RefRs, RsCell, RsCtxInfo,
    RsParams, Ubatch,
};

const F32: usize = 4;

fn mamba(n_seq_max: u32) -> RefRs {
    RefRs::new(&mamba_model_path(), &RsParams::for_seqs(n_seq_max, 0)).expect("mamba memory")
}

fn lfm2(n_seq_max: u32, n_rs_seq: u32) -> RefRs {
    RefRs::new(&lfm2_model_path(), &RsParams::for_seqs(n_seq_max, n_rs_seq)).expect("lfm2 memory")
}

/// One sequence set of `n` tokens of `seq` from `p0` (an equal-split ubatch).
fn place(rs: &mut RefRs, sets: &[(i32, i32)], n: u32) -> bool {
    let ub = Ubatch::equal(sets, n);
    rs.find_slot(&ub.view())
}

fn cell(pos: i32, src: i32, src0: i32, tail: i32, seqs: &[i32]) -> RsCell {
    RsCell {
        pos,
        src,
        src0,
        tail,
        seqs: seqs.to_vec(),
    }
}

/// Deterministic bytes of random-looking f32 values in [-1, 1).
fn random_f32_bytes(n_bytes: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    let mut out = Vec::with_capacity(n_bytes);
    while out.len() < n_bytes {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let v = ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.truncate(n_bytes);
    out
}

fn fill_random(rs: &mut RefRs, seed: u64) {
    for il in 0..rs.n_layer() {
        if rs.has_r(il) {
            let n = rs.r_bytes(il).len();
            rs.set_r_bytes(il, &random_f32_bytes(n, seed + u64::from(il)));
        }
        if rs.has_s(il) {
            let n = rs.s_bytes(il).len();
            rs.set_s_bytes(il, &random_f32_bytes(n, seed + 100 + u64::from(il)));
        }
    }
}

#[test]
fn models_load_and_decode() {
    assert_eq!(sanity_decode(&mamba_model_path(), 8), 0);
    assert_eq!(sanity_decode(&lfm2_model_path(), 8), 0);
}

#[test]
fn mamba_shapes() {
    let rs = mamba(4);
    assert_eq!(rs.n_layer(), 2);
    // n_embd_r = (d_conv - 1) * d_inner (n_group 0), n_embd_s = d_state * d_inner, d_inner = 128
    assert_eq!(rs.n_embd_r(), 3 * 128);
    assert_eq!(rs.n_embd_s(), 16 * 128);
    assert_eq!((rs.size(), rs.n_seq_max(), rs.n_rs_seq()), (4, 4, 0));
    for il in 0..2 {
        assert!(rs.has_r(il) && rs.has_s(il) && !rs.has_p(il));
        assert_eq!(rs.r_bytes(il).len(), 4 * 384 * F32);
        assert_eq!(rs.s_bytes(il).len(), 4 * 2048 * F32);
        // buffers are cleared at construction
        assert!(rs.r_bytes(il).iter().all(|&b| b == 0));
    }
    assert!(!rs.has_r(2));
    assert!(rs.can_shift());
    assert_eq!((rs.head(), rs.used(), rs.n(), rs.rs_z()), (0, 0, 0, -1));
    assert_eq!(rs.rs_idx(), vec![0; 4]);
    assert!(rs.cells().iter().all(|c| *c == cell(-1, -1, -1, -1, &[])));
}

#[test]
fn lfm2_shapes_and_filters() {
    let rs = lfm2(2, 2);
    assert_eq!(rs.n_layer(), 4);
    // LFM2: n_embd_r = n_embd * (l_cache - 1), n_embd_s = d_state * d_inner = 0
    assert_eq!((rs.n_embd_r(), rs.n_embd_s()), (128, 0));
    assert_eq!(rs.n_rs_seq(), 2);
    // the hybrid default filter: is_recr(il) = n_head_kv(il) == 0, layers 0 and 2
    let with_r: Vec<bool> = (0..4).map(|il| rs.has_r(il)).collect();
    assert_eq!(with_r, [true, false, true, false]);
    assert!(rs.has_s(0) && rs.s_bytes(0).is_empty());
    // 1 + n_rs_seq planes of mem_size rows
    assert_eq!(rs.r_bytes(0).len(), 2 * 3 * 128 * F32);
    assert!(rs.r_bytes(1).is_empty());

    // an explicit filter
    let only_2 = RefRs::new(
        &lfm2_model_path(),
        &RsParams {
            filter: Some(vec![false, false, true]),
            ..RsParams::for_seqs(2, 1)
        },
    )
    .unwrap();
    let with_r: Vec<bool> = (0..4).map(|il| only_2.has_r(il)).collect();
    assert_eq!(with_r, [false, false, true, false]);

    // no layer: the constructor means to force n_rs_seq to 0, but its `n_rs_seq = 0` assigns
    // the constructor parameter that shadows the member, so the member keeps 2
    let empty = RefRs::new(
        &lfm2_model_path(),
        &RsParams {
            filter: Some(vec![]),
            ..RsParams::for_seqs(2, 2)
        },
    )
    .unwrap();
    assert_eq!(empty.n_rs_seq(), 2);
    assert!((0..4).all(|il| !empty.has_r(il)));

    // mamba with an explicit filter, and n_rs_seq accepted by the standalone memory
    let m = RefRs::new(
        &mamba_model_path(),
        &RsParams {
            filter: Some(vec![false, true]),
            ..RsParams::for_seqs(1, 1)
        },
    )
    .unwrap();
    assert!(!m.has_r(0) && m.has_r(1));
    assert_eq!(m.r_bytes(1).len(), 2 * 384 * F32);
}

#[test]
fn find_slot_and_sequence_operations() {
    let mut rs = mamba(4);

    // seq 0 with 3 tokens at 0..2 on an empty memory: cell 0, its src staged as src0 = rs_z = 0
    assert!(place(&mut rs, &[(0, 0)], 3));
    assert_eq!((rs.head(), rs.used(), rs.n(), rs.rs_z()), (0, 1, 1, 0));
    assert_eq!(rs.cells()[0], cell(2, 0, 0, 0, &[0]));
    assert_eq!((rs.seq_pos_min(0), rs.seq_pos_max(0)), (2, 2));
    assert_eq!(
        rs.ctx_info(false),
        RsCtxInfo {
            n_rs: 1,
            head: 0,
            rs_z: 0
        }
    );
    assert_eq!(
        rs.ctx_info(true),
        RsCtxInfo {
            n_rs: 4,
            head: 0,
            rs_z: 0
        }
    );
    assert_eq!(rs.s_copy_all(), vec![0]);

    // a prefix removal that does not contain the tail position: true, nothing changes
    let before = rs.cells();
    assert!(rs.seq_rm(0, 0, 1));
    assert_eq!(rs.cells(), before);
    // a suffix removal without rollback snapshots: false, nothing changes
    assert!(!rs.seq_rm(0, 1, -1));
    assert_eq!(rs.cells(), before);
    // negative seq ids always fail on the recurrent memory
    assert!(!rs.seq_rm(-1, -1, -1));

    // seq 0 continues, seq 1 starts: seq 1 gets the first empty cell after head
    assert!(place(&mut rs, &[(0, 3), (1, 0)], 2));
    assert_eq!((rs.head(), rs.used(), rs.n(), rs.rs_z()), (0, 2, 2, 1));
    let c = rs.cells();
    assert_eq!(c[0], cell(4, 0, 0, 0, &[0]));
    assert_eq!(c[1], cell(1, 1, 1, 1, &[1]));
    assert_eq!(rs.s_copy_all(), vec![0, 1]);

    // seq_cp shares the cell (range ignored)
    rs.seq_cp(0, 2, 100, 200);
    let c = rs.cells();
    assert_eq!(c[0].seqs, vec![0, 2]);
    assert_eq!(c[2].tail, 0);
    assert_eq!((rs.used(), rs.seq_pos_max(2)), (2, 4));

    // seq 2 alone: it does not own its cell, so it moves to the next empty cell (2), copying
    // pos and src (0) from the shared one; src0 = 0 (copy the state of cell 0)
    assert!(place(&mut rs, &[(2, 5)], 1));
    assert_eq!((rs.head(), rs.used(), rs.n(), rs.rs_z()), (2, 3, 1, 2));
    let c = rs.cells();
    assert_eq!(c[0], cell(4, 0, 0, 0, &[0]));
    assert_eq!(c[2], cell(5, 2, 0, 2, &[2]));
    assert_eq!(rs.s_copy(0), 0);
    assert_eq!(
        rs.ctx_info(false),
        RsCtxInfo {
            n_rs: 1,
            head: 2,
            rs_z: 2
        }
    );
    // full context: size, head 0, rs_z 0 whatever the state
    assert_eq!(
        rs.ctx_info(true),
        RsCtxInfo {
            n_rs: 4,
            head: 0,
            rs_z: 0
        }
    );

    // seq_add / seq_div move only the tail cell's pos
    rs.seq_add(0, 0, -1, 10);
    assert_eq!(rs.seq_pos_max(0), 14);
    rs.seq_add(0, 0, 5, 10); // pos 14 outside [0, 5)
    assert_eq!(rs.seq_pos_max(0), 14);
    rs.seq_div(0, 0, -1, 2);
    assert_eq!(rs.seq_pos_max(0), 7);

    // seq_keep(1): every other cell cleared, tails except cells[1].tail reset, head lowered
    rs.seq_keep(1);
    assert_eq!((rs.head(), rs.used()), (0, 1));
    let c = rs.cells();
    assert_eq!(c[1], cell(1, 1, 1, 1, &[1]));
    assert_eq!(c[0], cell(-1, -1, 0, -1, &[]));
    assert_eq!(c[2], cell(-1, -1, 0, -1, &[]));
    assert_eq!(rs.seq_pos_max(0), -1);

    // full removal
    assert!(rs.seq_rm(1, -1, -1));
    assert_eq!(rs.used(), 0);
    assert_eq!(rs.cells()[1], cell(-1, -1, 1, -1, &[]));

    // clear keeps src0
    assert!(place(&mut rs, &[(3, 0)], 1));
    rs.clear(true);
    assert_eq!((rs.head(), rs.used()), (0, 0));
    assert!(rs
        .cells()
        .iter()
        .all(|c| c.pos == -1 && c.tail == -1 && c.seqs.is_empty()));
}

#[test]
fn find_slot_guards_and_prepare() {
    let mut rs = mamba(2);

    // not from an equal split: refused instead of the stock assertion
    let simple = Ubatch::for_seq(0, 0, 2);
    assert!(!rs.find_slot(&simple.view()));
    assert!(!rs.prepare(&[simple.view()]));
    assert_eq!(rs.used(), 0);

    // a seq id >= size: stock find_slot returns false
    assert!(!place(&mut rs, &[(2, 0)], 1));

    // prepare restores cells, used and head but keeps n / rs_z of the last find_slot
    let a = Ubatch::equal(&[(0, 0)], 2);
    let b = Ubatch::equal(&[(0, 2), (1, 0)], 1);
    assert!(rs.prepare(&[a.view(), b.view()]));
    assert_eq!((rs.head(), rs.used()), (0, 0));
    assert!(rs.cells().iter().all(|c| c.pos == -1 && c.seqs.is_empty()));
    assert_eq!((rs.n(), rs.rs_z()), (2, 1));
    // a failing ubatch fails the whole prepare
    let bad = Ubatch::equal(&[(5, 0)], 1);
    assert!(!rs.prepare(&[a.view(), bad.view()]));
}

#[test]
fn rollback_with_snapshots() {
    let mut rs = lfm2(2, 2);

    assert!(place(&mut rs, &[(0, 0)], 3));
    // suffix [1, inf) removes 2 positions: rollback 2 <= n_rs_seq, rs_idx[0] = 2, pos = 0
    assert!(rs.seq_rm(0, 1, -1));
    assert_eq!(rs.rs_idx(), vec![2, 0]);
    assert_eq!(rs.cells()[0].pos, 0);
    assert_eq!(rs.seq_pos_max(0), 0);

    // continue at pos 1: the cell's src is itself, so no zero row (rs_z -1)
    assert!(place(&mut rs, &[(0, 1)], 1));
    assert_eq!((rs.head(), rs.n(), rs.rs_z()), (0, 1, -1));
    assert_eq!(rs.cells()[0], cell(1, 0, 0, 0, &[0]));
    // a rollback is still pending: a second partial removal fails and changes nothing
    assert!(!rs.seq_rm(0, 1, -1));
    assert_eq!(rs.cells()[0].pos, 1);
    // s_copy reads plane rs_idx[0] = 2: row 2 * size + src0, and resets rs_idx[0]
    assert_eq!(rs.s_copy(0), 2 * 2);
    assert_eq!(rs.rs_idx(), vec![0, 0]);
    assert_eq!(rs.s_copy(0), 0);

    // now it can roll back again
    assert!(rs.seq_rm(0, 1, -1));
    assert_eq!(rs.rs_idx(), vec![1, 0]);
    // full removal resets rs_idx
    assert!(rs.seq_rm(0, -1, -1));
    assert_eq!(rs.rs_idx(), vec![0, 0]);
    assert_eq!(rs.used(), 0);

    // a rollback deeper than n_rs_seq fails
    assert!(place(&mut rs, &[(1, 0)], 4));
    assert!(!rs.seq_rm(1, 1, -1)); // rollback 3 > 2
    assert!(rs.seq_rm(1, 2, -1)); // rollback 2
    assert_eq!(rs.rs_idx(), vec![0, 2]);
    // clear resets every rs_idx
    rs.clear(false);
    assert_eq!(rs.rs_idx(), vec![0, 0]);

    // with no layer kept, a partial removal only moves the position back
    let mut empty = RefRs::new(
        &lfm2_model_path(),
        &RsParams {
            filter: Some(vec![]),
            ..RsParams::for_seqs(1, 2)
        },
    )
    .unwrap();
    assert!(place(&mut empty, &[(0, 0)], 8));
    assert!(empty.seq_rm(0, 3, -1));
    assert_eq!(empty.seq_pos_max(0), 2);
    assert_eq!(empty.rs_idx(), vec![0]);
}

fn header_len(n_cells: usize, n_seq_ids: usize) -> usize {
    4 + n_cells * 8 + n_seq_ids * 4 + 8
}

#[test]
fn state_write_read_mamba() {
    let mut a = mamba(4);
    assert!(place(&mut a, &[(0, 0), (1, 0)], 3));
    fill_random(&mut a, 7);
    let row_r = 384 * F32;
    let row_s = 2048 * F32;

    // per seq: 1 cell, n_seq_id 0, then per layer r_type, r_row_size, rows; then s likewise
    let blob = a.state_write(1, 0);
    let layer_r = 4 + 8 + row_r;
    let layer_s = 4 + 8 + row_s;
    assert_eq!(blob.len(), header_len(1, 0) + 2 * layer_r + 2 * layer_s);
    assert_eq!(&blob[0..4], &1u32.to_le_bytes());
    assert_eq!(&blob[4..8], &2i32.to_le_bytes()); // pos
    assert_eq!(&blob[8..12], &0u32.to_le_bytes()); // n_seq_id always 0 per seq
    assert_eq!(&blob[12..16], &0u32.to_le_bytes()); // s_trans
    assert_eq!(&blob[16..20], &2u32.to_le_bytes()); // n_layer
                                                    // seq 1 is in cell 1: its row 1 of layer 0's r
    let r0 = a.r_bytes(0);
    let off = header_len(1, 0) + 12;
    assert_eq!(&blob[off..off + row_r], &r0[row_r..2 * row_r]);
    let s1 = a.s_bytes(1);
    let off = header_len(1, 0) + 2 * layer_r + layer_s + 12;
    assert_eq!(&blob[off..off + row_s], &s1[row_s..2 * row_s]);
    assert_eq!(a.state_size(1, 0), blob.len());

    // into seq 3 of a fresh memory: first empty cell (0), pos 2, the row read at head
    let mut b = mamba(4);
    assert_eq!(b.state_read_n(3, 0, &blob), (true, blob.len()));
    assert_eq!(b.seq_pos_max(3), 2);
    assert_eq!(b.cells()[0], cell(2, 0, 0, -1, &[3]));
    assert_eq!(b.cells()[3].tail, 0);
    assert_eq!(&b.r_bytes(0)[..row_r], &r0[row_r..2 * row_r]);
    assert_eq!(&b.s_bytes(1)[..row_s], &s1[row_s..2 * row_s]);
    // and it writes back the same bytes
    assert_eq!(b.state_write(3, 0), blob);

    // whole memory: seq ids listed
    let whole = a.state_write(-1, 0);
    assert_eq!(
        whole.len(),
        header_len(2, 2) + 2 * (12 + 2 * row_r) + 2 * (12 + 2 * row_s)
    );
    let mut c = mamba(4);
    assert!(c.state_read(-1, 0, &whole));
    assert_eq!(c.cells()[0], cell(2, 0, -1, 0, &[0]));
    assert_eq!(c.cells()[1], cell(2, 1, -1, 1, &[1]));
    assert_eq!((c.head(), c.used()), (0, 2));
    assert_eq!(c.state_write(-1, 0), whole);

    // empty selection: the data header is still written
    assert_eq!(a.state_write(2, 0).len(), 4 + 8 + 2 * 12 + 2 * 12);
}

#[test]
fn state_read_failures() {
    let mut a = mamba(2);
    assert!(place(&mut a, &[(0, 0)], 3));
    fill_random(&mut a, 11);
    let blob = a.state_write(0, 0);

    // truncated in the data: the stock code throws after clearing the seq and zeroing its rows
    let mut b = mamba(2);
    fill_random(&mut b, 12);
    let (ok, consumed) = b.state_read_n(1, 0, &blob[..100]);
    assert!(!ok);
    assert_eq!(consumed, header_len(1, 0) + 12);
    assert_eq!(b.seq_pos_max(1), -1);
    assert!(b.r_bytes(0)[..384 * F32].iter().all(|&x| x == 0));

    // a per-seq cell with seq ids: the metadata check fails
    let mut bad = blob.clone();
    bad[8..12].copy_from_slice(&1u32.to_le_bytes());
    let (ok, consumed) = b.state_read_n(1, 0, &bad);
    assert!(!ok);
    assert_eq!(consumed, 12);

    // two cells for one seq: stock asserts, the shim refuses before calling it
    let mut two = vec![];
    two.extend_from_slice(&2u32.to_le_bytes());
    for p in [0i32, 1] {
        two.extend_from_slice(&p.to_le_bytes());
        two.extend_from_slice(&0u32.to_le_bytes());
    }
    two.extend_from_slice(&blob[12..]);
    assert_eq!(b.state_read_n(1, 0, &two), (false, 0));

    // wrong layer count
    let mut wrong = blob.clone();
    wrong[16..20].copy_from_slice(&3u32.to_le_bytes());
    assert!(!b.state_read(1, 0, &wrong));
    assert_eq!(b.seq_pos_max(1), -1);

    // the intact blob still reads
    assert!(b.state_read(1, 0, &blob));
    assert_eq!(b.seq_pos_max(1), 2);
}

#[test]
fn state_with_pending_rollback_reads_the_snapshot_plane() {
    let mut a = lfm2(2, 2);
    assert!(place(&mut a, &[(0, 0)], 3));
    fill_random(&mut a, 5);
    assert!(a.seq_rm(0, 2, -1)); // rollback 1: rs_idx[0] = 1
    let blob = a.state_write(0, 0);
    let row = 128 * F32;
    // layers 0 and 2: r rows from plane 1 (row 1 * size + src 0); s sections of row size 0
    assert_eq!(blob.len(), header_len(1, 0) + 2 * (12 + row) + 2 * 12);
    let r0 = a.r_bytes(0);
    let off = header_len(1, 0) + 12;
    assert_eq!(&blob[off..off + row], &r0[2 * row..3 * row]);
    assert_eq!(&blob[4..8], &1i32.to_le_bytes()); // pos after rollback
                                                  // a successful read resets rs_idx
    let mut b = lfm2(2, 2);
    assert!(b.seq_rm(1, -1, -1));
    assert!(b.state_read(1, 0, &blob));
    assert_eq!(b.rs_idx(), vec![0, 0]);
    assert_eq!(&b.r_bytes(0)[..row], &r0[2 * row..3 * row]);
}

fn finite(v: &[f32]) -> bool {
    v.iter().all(|x| x.is_finite())
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn ctx_params(n_seq_max: u32, n_rs_seq: u32) -> CtxParams {
    CtxParams {
        n_seq_max,
        n_rs_seq,
        ..CtxParams::default()
    }
}

/// Two sequences in one batch, then the state of one copied onto the other through a blob.
fn multi_sequence_decode(mut ctx: RefCtx, mut single: RefCtx) {
    let tokens = [1, 2, 3, 4, 5, 6];
    let pos = [0, 1, 2, 0, 1, 2];
    let seqs = [vec![0], vec![0], vec![0], vec![1], vec![1], vec![1]];
    let out = [false, false, true, false, false, true];
    assert_eq!(ctx.decode_batch(&tokens, &pos, &seqs, Some(&out)), 0);
    let l0 = ctx.logits_ith(2).expect("logits of seq 0");
    let l1 = ctx.logits_ith(5).expect("logits of seq 1");
    assert!(finite(&l0) && finite(&l1));
    assert!(ctx.logits_ith(1).is_none());
    assert_eq!((ctx.seq_pos_max(0), ctx.seq_pos_max(1)), (2, 2));

    // the same tokens alone in another context give the same logits
    assert_eq!(single.decode(&[4, 5, 6], 0, 0), 0);
    let alone = single.logits().unwrap();
    assert!(max_diff(&alone, &l1) < 1e-4, "{}", max_diff(&alone, &l1));

    // seq 0's state onto seq 1: the next token gives the same logits on both
    let blob = ctx.seq_state(0, 0).expect("seq state");
    assert_eq!(ctx.seq_set(1, 0, &blob), blob.len());
    assert_eq!(ctx.seq_pos_max(1), 2);
    let tokens = [7, 7];
    let pos = [3, 3];
    let seqs = [vec![0], vec![1]];
    assert_eq!(
        ctx.decode_batch(&tokens, &pos, &seqs, Some(&[true, true])),
        0
    );
    let a = ctx.logits_ith(0).unwrap();
    let b = ctx.logits_ith(1).unwrap();
    assert!(finite(&a));
    assert!(max_diff(&a, &b) < 1e-5);

    // whole state round trip
    let state = ctx.state().expect("state");
    ctx.memory_clear(true);
    assert_eq!(ctx.seq_pos_max(0), -1);
    assert_eq!(ctx.state_set(&state), state.len());
    assert_eq!((ctx.seq_pos_max(0), ctx.seq_pos_max(1)), (3, 3));
}

#[test]
fn mamba_context() {
    multi_sequence_decode(
        RefCtx::mamba(&ctx_params(2, 0)),
        RefCtx::mamba(&ctx_params(1, 0)),
    );
}

#[test]
fn lfm2_context() {
    multi_sequence_decode(
        RefCtx::lfm2(&ctx_params(2, 0)),
        RefCtx::lfm2(&ctx_params(1, 0)),
    );
}

#[test]
fn lfm2_context_rollback() {
    let mut ctx = RefCtx::lfm2(&ctx_params(1, 2));
    assert_eq!(ctx.decode(&[1, 2, 3, 4], 0, 0), 0);
    let last = ctx.logits().unwrap();
    // drop the last token (rollback 1) and decode it again: same logits
    assert!(ctx.seq_rm(0, 3, -1));
    assert_eq!(ctx.seq_pos_max(0), 2);
    assert_eq!(ctx.decode(&[4], 3, 0), 0);
    let again = ctx.logits().unwrap();
    assert!(
        max_diff(&last, &again) < 1e-4,
        "{}",
        max_diff(&last, &again)
    );
    // a rollback deeper than n_rs_seq fails
    assert!(!ctx.seq_rm(0, 1, -1));

    // mamba has no rollback support: llama.cpp clamps n_rs_seq to 0
    let mut m = RefCtx::mamba(&ctx_params(1, 2));
    assert_eq!(m.decode(&[1, 2, 3], 0, 0), 0);
    assert!(!m.seq_rm(0, 2, -1));
}

#[test]
fn state_write_guards() {
    // a shared cell whose sequences have different rollback indices: the stock whole write
    // aborts, the shim returns nothing; per-sequence writes use each sequence's own index
    let mut rs = lfm2(2, 2);
    assert!(place(&mut rs, &[(0, 0)], 3));
    rs.seq_cp(0, 1, -1, -1);
    assert!(rs.seq_rm(0, 2, -1));
    assert_eq!(rs.rs_idx(), vec![1, 0]);
    assert!(rs.state_write(-1, 0).is_empty());
    assert!(!rs.state_write(0, 0).is_empty());
    assert!(!rs.state_write(1, 0).is_empty());

    // ON_DEVICE with two cell ranges aborts in stock: refused; one range is fine
    const ON_DEVICE: u32 = 2;
    let mut m = mamba(4);
    assert!(place(&mut m, &[(0, 0), (1, 0), (2, 0)], 1));
    assert!(m.seq_rm(1, -1, -1));
    assert!(m.state_write(-1, ON_DEVICE).is_empty());
    assert!(!m.state_write(-1, 0).is_empty());
    assert_eq!(m.state_write(2, ON_DEVICE), m.state_write(2, 0));
}

#[test]
fn construction_failures() {
    assert!(RefRs::new(
        std::path::Path::new("/nonexistent/model.gguf"),
        &RsParams::default()
    )
    .is_none());
}
