//! Drives the stock llama.cpp composite memories (`llama_kv_cache_iswa`, `llama_memory_hybrid`,
//! `llama_memory_hybrid_iswa`) through the `cmpref` shim over the tiny `gemma3`, `jamba` and
//! SWA `lfm2` models, and checks values that follow from the pinned source. These tests check
//! the shim and its wrapper, not llama-memory.

use llama_memory_reference::{
    gemma3_model_path, jamba_model_path, lfm2_model_path, lfm2_swa_model_path, mamba_model_path,
    model_path, CmpParams, CompositeKind, MemoryStatus, RefComposite, Split, TokenBatch, Ubatch,
    GEMMA3_SWA, LFM2_SWA,
};

fn params(n_ctx: u32, n_seq_max: u32) -> CmpParams {
    CmpParams {
        n_ctx,
        n_seq_max,
        n_ubatch: 32,
        ..CmpParams::default()
    }
}

/// Used cells of KV part `which` (one stream).
fn kv_used(c: &RefComposite, which: u32) -> u32 {
    c.part_kv(which).expect("KV part").stream_info(0).used
}

/// The splits cover the batch exactly once.
fn check_cover(splits: &[Split], n: usize) {
    let mut all: Vec<i32> = splits.iter().flat_map(|s| s.batch_idxs.clone()).collect();
    assert_eq!(splits.iter().map(|s| s.n_tokens as usize).sum::<usize>(), n);
    all.sort_unstable();
    assert_eq!(all, (0..n as i32).collect::<Vec<_>>());
    for s in splits {
        assert_eq!(s.n_tokens, s.n_seq_tokens * s.n_seqs);
        assert_eq!(s.batch_idxs.len(), s.n_tokens as usize);
    }
}

/// Whole-memory state round trip into a fresh composite: same bytes, same positions, same
/// cells in every part.
fn check_round_trip(model: &std::path::Path, p: &CmpParams, c: &RefComposite, seqs: &[i32]) {
    let bytes = c.state_write(-1, 0);
    assert!(!bytes.is_empty());
    let mut d = RefComposite::new(model, p).expect("second composite");
    assert_eq!(d.state_read(-1, 0, &bytes), Some(bytes.len()));
    assert_eq!(d.state_write(-1, 0), bytes);
    for &s in seqs {
        assert_eq!(d.seq_pos_min(s), c.seq_pos_min(s));
        assert_eq!(d.seq_pos_max(s), c.seq_pos_max(s));
    }
    for which in 0..2 {
        match (c.part_kv(which), d.part_kv(which)) {
            (Some(a), Some(b)) => {
                // positions and sequences (the cell ext's token is not part of the state)
                let (x, y) = (a.cells(0), b.cells(0));
                assert!(x.pos == y.pos && x.seq == y.seq, "KV part {which} differs");
            }
            (None, None) => {}
            _ => panic!("part {which} exists in one copy only"),
        }
    }
    if let (Some(a), Some(b)) = (c.part_rs(), d.part_rs()) {
        // src0 is graph staging, not state
        let key = |r: &llama_memory_reference::RefRs| -> Vec<(i32, i32, Vec<i32>)> {
            r.cells()
                .into_iter()
                .map(|x| (x.pos, x.tail, x.seqs))
                .collect()
        };
        assert_eq!(key(&a), key(&b));
    }

    // one sequence into an empty composite
    let s = seqs[0];
    let one = c.state_write(s, 0);
    let mut e = RefComposite::new(model, p).expect("third composite");
    assert_eq!(e.state_read(s, 0, &one), Some(one.len()));
    assert_eq!(e.seq_pos_max(s), c.seq_pos_max(s));
}

#[test]
fn kinds_follow_create_memory() {
    let p = params(256, 1);
    let kind = |path: &std::path::Path| RefComposite::new(path, &p).map(|c| c.kind());
    assert_eq!(kind(&model_path()), Some(CompositeKind::Kv));
    assert_eq!(kind(&gemma3_model_path()), Some(CompositeKind::Iswa));
    assert_eq!(kind(&jamba_model_path()), Some(CompositeKind::Hybrid));
    assert_eq!(kind(&lfm2_model_path()), Some(CompositeKind::Hybrid));
    assert_eq!(
        kind(&lfm2_swa_model_path()),
        Some(CompositeKind::HybridIswa)
    );
    // recurrent-only: not a composite
    assert_eq!(kind(&mamba_model_path()), None);
}

#[test]
fn iswa_gemma3() {
    let model = gemma3_model_path();
    let p = params(256, 2);
    let mut c = RefComposite::new(&model, &p).expect("gemma3 iSWA");
    assert_eq!(c.kind(), CompositeKind::Iswa);
    assert!(c.part_kv(2).is_none());
    assert!(c.part_rs().is_none());
    {
        let base = c.part_kv(0).unwrap();
        let swa = c.part_kv(1).unwrap();
        assert_eq!(base.size(), 256);
        // pad(min(256, n_swa * n_seq_max + n_ubatch), 256)
        assert_eq!(swa.size(), 256);
        assert_eq!(base.params().n_swa, 0);
        assert_eq!(swa.params().n_swa, GEMMA3_SWA.1);
        assert_eq!(swa.params().swa_type, 1);
        assert!(base.params().v_trans);
        // layer 2 is full attention, 0 and 1 slide
        assert!(base.tensor_bytes(false, 2).is_some() && base.tensor_bytes(false, 0).is_none());
        assert!(swa.tensor_bytes(false, 0).is_some() && swa.tensor_bytes(false, 2).is_none());
    }

    // caller-given ubatches
    let a = Ubatch::for_seq(0, 0, 8);
    let b = Ubatch::for_seq(1, 0, 4);
    c.apply_ubatches(&[a.view(), b.view()]).expect("apply");
    assert_eq!(c.seq_pos_max(0), 7);
    assert_eq!(c.seq_pos_max(1), 3);
    assert_eq!(c.seq_pos_min(1), 0);
    assert_eq!(kv_used(&c, 0), 12);
    assert_eq!(kv_used(&c, 1), 12);
    assert_eq!(c.n_slots(), 2);

    // masks and indices of the last ubatch through the views
    for which in 0..2 {
        let slot = c.last_slot(which).expect("slot");
        let part = c.part_kv(which).unwrap();
        assert_eq!(slot.idxs[0].len(), 4);
        let k = part.k_idxs(&b.view(), &slot);
        assert_eq!(
            k,
            slot.idxs[0].iter().map(|&i| i as i64).collect::<Vec<_>>()
        );
        let n_kv = part.get_n_kv(&slot);
        let mask = part.kq_mask_f32(&b.view(), true, n_kv, 1);
        for i in 0..4usize {
            let row = &mask[i * n_kv as usize..(i + 1) * n_kv as usize];
            let open = row.iter().filter(|v| v.is_finite()).count();
            assert_eq!(open, i + 1, "part {which}, token {i}");
        }
    }

    // the stock batch path: unified -> split_simple
    let batch = TokenBatch::for_seq(0, 8, 12);
    let splits = c.init_batch(&batch, 5, false, false).expect("init_batch");
    assert_eq!(
        splits.iter().map(|s| s.n_tokens).collect::<Vec<_>>(),
        vec![5, 5, 2]
    );
    assert!(splits.iter().all(|s| !s.equal_seqs && s.n_seqs_unq == 1));
    assert_eq!(splits.iter().map(|s| s.n_outputs).sum::<u32>(), 1);
    check_cover(&splits, 12);
    assert_eq!(c.seq_pos_max(0), 19);
    assert_eq!(c.n_slots(), 3);
    // the last split's slot and mask, from the rebuilt ubatch
    let last = splits[2].ubatch(&batch, 1);
    let slot = c.last_slot(1).unwrap();
    assert_eq!(slot.idxs[0].len(), 2);
    let swa = c.part_kv(1).unwrap();
    let n_kv = swa.get_n_kv(&slot);
    let mask = swa.kq_mask_f32(&last.view(), true, n_kv, 1);
    // token at pos 19 sees positions 4..=19 of seq 0 through the 16-token window
    let row = &mask[n_kv as usize..2 * n_kv as usize];
    assert_eq!(row.iter().filter(|v| v.is_finite()).count(), 16);
    drop(swa);

    // interleaved sequences, planned only: nothing changes
    let mut mixed = TokenBatch::default();
    for k in 0..6 {
        mixed.push(k, 20 + k, &[0]);
        mixed.push(k, 4 + k, &[1]);
    }
    let before = c.state_write(-1, 0);
    let plan = c.init_batch(&mixed, 4, false, true).expect("plan");
    check_cover(&plan, 12);
    assert_eq!(c.state_write(-1, 0), before);
    assert_eq!(c.seq_pos_max(1), 3);
    // an inconsistent position is rejected by the stock batch allocator
    let bad = TokenBatch::for_seq(1, 7, 2);
    assert_eq!(c.init_batch(&bad, 4, false, false), Err(-1));

    check_round_trip(&model, &p, &c, &[0, 1]);

    // K-shift through the composite's update
    assert!(c.can_shift());
    c.seq_add(1, 0, -1, 2);
    assert_eq!(c.seq_pos_max(1), 5);
    assert!(c.part_kv(0).unwrap().has_shift());
    assert_eq!(c.update(), MemoryStatus::Success);
    assert!(!c.part_kv(0).unwrap().has_shift());
    assert!(!c.part_kv(1).unwrap().has_shift());
    assert_eq!(c.update(), MemoryStatus::NoUpdate);

    assert!(c.seq_rm(1, -1, -1));
    assert_eq!(c.seq_pos_max(1), -1);
    c.clear(true);
    assert_eq!(c.seq_pos_max(0), -1);
    assert_eq!(kv_used(&c, 0), 0);
}

#[test]
fn hybrid_jamba() {
    let model = jamba_model_path();
    let p = params(64, 2);
    let mut c = RefComposite::new(&model, &p).expect("jamba hybrid");
    assert_eq!(c.kind(), CompositeKind::Hybrid);
    assert!(c.part_kv(1).is_none());
    assert_eq!(c.part_rs().unwrap().size(), 2);
    assert_eq!(c.part_kv(0).unwrap().size(), 64);

    // the recurrent part asserts equal splits: refused before stock sees it
    let simple = Ubatch::for_seq(0, 0, 3);
    assert_eq!(c.apply_ubatches(&[simple.view()]), Err(-1));

    let a = Ubatch::equal(&[(0, 0)], 6);
    let b = Ubatch::equal(&[(0, 6), (1, 0)], 3);
    c.apply_ubatches(&[a.view(), b.view()]).expect("apply");
    assert_eq!(c.seq_pos_max(0), 8);
    assert_eq!(c.seq_pos_max(1), 2);
    assert_eq!(kv_used(&c, 0), 12);
    {
        let rs = c.part_rs().unwrap();
        let cells = rs.cells();
        let of = |s: i32| cells.iter().find(|x| x.seqs == vec![s]).expect("cell").pos;
        assert_eq!((of(0), of(1)), (8, 2));
        assert_eq!(rs.used(), 2);
    }
    let slot = c.last_slot(0).unwrap();
    assert_eq!(slot.idxs[0].len(), 6);

    // the stock batch path: split_equal over two sequences
    let mut batch = TokenBatch::default();
    for k in 0..6 {
        batch.push(k, 9 + k, &[0]);
        batch.push(k, 3 + k, &[1]);
    }
    let splits = c.init_batch(&batch, 4, false, false).expect("init_batch");
    check_cover(&splits, 12);
    assert!(splits.iter().all(|s| s.equal_seqs));
    assert_eq!(c.seq_pos_max(0), 14);
    assert_eq!(c.seq_pos_max(1), 8);
    assert_eq!(kv_used(&c, 0), 24);

    // embeddings: split by sequence set, every token an output; planned only
    let more = TokenBatch::for_seq(0, 15, 3);
    let plan = c.init_batch(&more, 8, true, true).expect("plan");
    check_cover(&plan, 3);
    assert!(plan
        .iter()
        .all(|s| s.n_seqs == 1 && s.n_outputs == s.n_tokens));
    assert_eq!(c.seq_pos_max(0), 14);

    check_round_trip(&model, &p, &c, &[0, 1]);

    // removing the tail of a state the recurrent memory cannot undo fails (recurrent first)
    assert!(!c.seq_rm(0, 10, -1));
    assert_eq!(c.seq_pos_max(0), 14);
    assert!(c.seq_rm(1, -1, -1));
    assert_eq!(c.seq_pos_max(1), -1);
    assert_eq!(c.part_rs().unwrap().used(), 1);
}

#[test]
fn hybrid_iswa_lfm2() {
    let model = lfm2_swa_model_path();
    let p = params(64, 1);
    let mut c = RefComposite::new(&model, &p).expect("lfm2 hybrid-iSWA");
    assert_eq!(c.kind(), CompositeKind::HybridIswa);
    assert!(c.part_rs().is_some());
    {
        // every attention layer slides: the base cache has no layer, the SWA cache layers 1, 3
        let base = c.part_kv(0).unwrap();
        let swa = c.part_kv(1).unwrap();
        assert!(base.tensor_bytes(false, 1).is_none());
        assert!(swa.tensor_bytes(false, 1).is_some() && swa.tensor_bytes(false, 3).is_some());
        assert_eq!(swa.params().n_swa, LFM2_SWA);
    }

    let a = Ubatch::equal(&[(0, 0)], 20);
    c.apply_ubatches(&[a.view()]).expect("apply");
    assert_eq!(c.seq_pos_max(0), 19);
    assert_eq!(kv_used(&c, 0), 20);
    assert_eq!(kv_used(&c, 1), 20);
    assert_eq!(
        c.part_rs()
            .unwrap()
            .cells()
            .iter()
            .filter(|x| x.pos == 19)
            .count(),
        1
    );

    let batch = TokenBatch::for_seq(0, 20, 10);
    let splits = c.init_batch(&batch, 4, false, false).expect("init_batch");
    assert_eq!(
        splits.iter().map(|s| s.n_tokens).collect::<Vec<_>>(),
        vec![4, 4, 2]
    );
    check_cover(&splits, 10);
    assert_eq!(c.seq_pos_max(0), 29);
    // the base cache keeps every position
    assert_eq!(kv_used(&c, 0), 30);
    assert!(kv_used(&c, 1) <= 30);
    let last = splits[2].ubatch(&batch, 1);
    let slot = c.last_slot(1).unwrap();
    let swa = c.part_kv(1).unwrap();
    let n_kv = swa.get_n_kv(&slot);
    let mask = swa.kq_mask_f32(&last.view(), true, n_kv, 1);
    let row = &mask[n_kv as usize..2 * n_kv as usize];
    assert_eq!(
        row.iter().filter(|v| v.is_finite()).count(),
        LFM2_SWA as usize
    );
    drop(swa);

    check_round_trip(&model, &p, &c, &[0]);
}
