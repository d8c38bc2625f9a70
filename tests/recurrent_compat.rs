//! Recurrent states against stock libllama, both ways, on generated models: sequence blobs,
//! sequence files and whole states written by a stock `llama_context` (through llama.h only)
//! load into this library's recurrent memory and re-serialize to the same bytes; blobs this
//! library writes load into stock and give bit-identical logits on the next decode.
//!
//! `mamba` is a recurrent-only model (its whole memory is one `llama_memory_recurrent`);
//! `lfm2` is a hybrid whose `PARTIAL_ONLY` sequence state is exactly its recurrent part.

use llama_memory::recurrent::RecurrentMemory;
use llama_memory::{state, Memory};
use llama_memory_reference as stock;

#[path = "common/rs_like.rs"]
mod rs_like;
use rs_like::ours_like;

const PARTIAL_ONLY: u32 = 1;

fn ours_blob(mem: &RecurrentMemory, seq: i32, flags: u32) -> Vec<u8> {
    let mut buf = vec![0u8; state::seq_get_size(mem, seq, flags).unwrap()];
    let n = state::seq_get_data(mem, &mut buf, seq, flags, &mut state::Stash::new()).unwrap();
    assert_eq!(n, buf.len());
    buf
}

fn load(mem: &mut RecurrentMemory, blob: &[u8], dest: i32) {
    let n = state::seq_set_data(mem, blob, dest, 0, &state::Stash::new())
        .unwrap_or_else(|e| panic!("stock blob refused: {e}"));
    assert_eq!(n, blob.len());
}

fn ctx_params(n_seq: u32, n_rs_seq: u32) -> stock::CtxParams {
    stock::CtxParams {
        n_seq_max: n_seq,
        n_rs_seq,
        ..Default::default()
    }
}

/// The memory part of a whole context state (after `u32 len, arch name`).
fn memory_part(ctx_state: &[u8]) -> &[u8] {
    let len = u32::from_ne_bytes(ctx_state[..4].try_into().unwrap()) as usize;
    &ctx_state[4 + len..]
}

#[test]
fn mamba_stock_states_load_and_reserialize_identically() {
    std::env::set_var("KVREF_QUIET", "1");
    let mut ctx = stock::RefCtx::mamba(&ctx_params(3, 0));
    assert_eq!(ctx.decode(&[1, 2, 3, 4, 5], 0, 0), 0);
    assert_eq!(ctx.decode(&[7, 8], 0, 1), 0);
    assert_eq!(ctx.decode(&[9], 5, 0), 0);
    let mut ours = ours_like(&stock::mamba_model_path(), 3, 0);
    for seq in [0, 1] {
        let blob = ctx.seq_state(seq, 0).unwrap();
        for dest in [seq, 2] {
            load(&mut ours, &blob, dest);
            let again = ours_blob(&ours, dest, 0);
            // the 8-byte header names the source sequence; the state itself must be identical
            assert_eq!(again[..4], blob[..4]);
            assert_eq!(again[8..], blob[8..], "seq {seq} restored into {dest}");
            assert_eq!(ours.seq_pos_max(dest).unwrap(), ctx.seq_pos_max(seq));
        }
    }
    // whole state
    let whole = ctx.state().unwrap();
    let mem = memory_part(&whole);
    let mut fresh = ours_like(&stock::mamba_model_path(), 3, 0);
    assert_eq!(state::set_data(&mut fresh, mem).unwrap(), mem.len());
    let mut again = vec![0u8; state::get_size(&fresh).unwrap()];
    state::get_data(&fresh, &mut again).unwrap();
    assert_eq!(again, mem);
    // sequence files
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let (theirs_path, ours_path) = (
        dir.join("rs-compat-stock.ggsq"),
        dir.join("rs-compat-ours.ggsq"),
    );
    let toks = [1, 2, 3, 4, 5, 9];
    assert!(ctx.seq_save_file(&theirs_path, 0, &toks) > 0);
    let mut from_file = ours_like(&stock::mamba_model_path(), 3, 0);
    let mut got = [0i32; 16];
    let l = state::seq_load_file(&mut from_file, &theirs_path, 1, Some(&mut got)).unwrap();
    assert_eq!(&got[..l.n_tokens], &toks);
    state::seq_save_file(&from_file, &ours_path, 1, &toks).unwrap();
    assert_eq!(
        std::fs::read(&ours_path).unwrap(),
        std::fs::read(&theirs_path).unwrap()
    );
}

#[test]
fn mamba_blob_written_here_decodes_bit_identically_in_stock() {
    std::env::set_var("KVREF_QUIET", "1");
    let mut a = stock::RefCtx::mamba(&ctx_params(3, 0));
    assert_eq!(a.decode(&[3, 1, 4, 1, 5, 9], 0, 0), 0);
    let blob = a.seq_state(0, 0).unwrap();
    // move it around in ours so that it is written from another cell and sequence
    let mut ours = ours_like(&stock::mamba_model_path(), 3, 0);
    load(&mut ours, &blob, 1);
    load(&mut ours, &blob, 2);
    assert!(ours.seq_rm(1, -1, -1).unwrap());
    let mine = ours_blob(&ours, 2, 0);
    // a fresh stock context with another sequence already there
    let mut b = stock::RefCtx::mamba(&ctx_params(3, 0));
    assert_eq!(b.decode(&[2, 7, 1], 0, 1), 0);
    assert_eq!(b.seq_set(0, 0, &mine), mine.len());
    assert_eq!(a.decode(&[2], 6, 0), 0);
    assert_eq!(b.decode(&[2], 6, 0), 0);
    let (la, lb) = (a.logits().unwrap(), b.logits().unwrap());
    assert!(
        la.iter().zip(&lb).all(|(x, y)| x.to_bits() == y.to_bits()),
        "logits after our blob differ from stock's own"
    );
    // and a sequence that never decoded that prompt gives other logits (the check can fail)
    let mut c = stock::RefCtx::mamba(&ctx_params(3, 0));
    assert_eq!(c.decode(&[2], 6, 0), 0);
    assert_ne!(c.logits().unwrap(), la);
}

#[test]
fn lfm2_recurrent_part_round_trips_both_ways() {
    std::env::set_var("KVREF_QUIET", "1");
    for n_rs_seq in [0, 2] {
        let mut a = stock::RefCtx::lfm2(&ctx_params(2, n_rs_seq));
        assert_eq!(a.decode(&[5, 6, 7, 8, 9, 10], 0, 0), 0);
        if n_rs_seq > 0 {
            // a rollback: the state written now comes from a rollback plane
            assert!(a.seq_rm(0, 5, -1));
        }
        let full = a.seq_state(0, 0).unwrap();
        let partial = a.seq_state(0, PARTIAL_ONLY).unwrap();
        let mut ours = ours_like(&stock::lfm2_model_path(), 2, n_rs_seq);
        load(&mut ours, &partial, 1);
        let mine = ours_blob(&ours, 1, 0);
        assert_eq!(mine[8..], partial[8..], "n_rs_seq {n_rs_seq}");

        // stock B: A's full state, then a wrong recurrent part, then ours: decodes as A
        let mut other = stock::RefCtx::lfm2(&ctx_params(2, n_rs_seq));
        // same positions as A (the batch must continue the hybrid's positions), other tokens
        assert_eq!(other.decode(&[11, 12, 13, 14, 15, 16], 0, 0), 0);
        if n_rs_seq > 0 {
            assert!(other.seq_rm(0, 5, -1));
        }
        let wrong = other.seq_state(0, PARTIAL_ONLY).unwrap();
        let mut b = stock::RefCtx::lfm2(&ctx_params(2, n_rs_seq));
        assert_eq!(b.seq_set(0, 0, &full), full.len());
        assert_eq!(b.seq_set(0, PARTIAL_ONLY, &wrong), wrong.len());
        let next = a.seq_pos_max(0) + 1;
        let mut probe = stock::RefCtx::lfm2(&ctx_params(2, n_rs_seq));
        assert_eq!(probe.seq_set(0, 0, &full), full.len());
        assert_eq!(probe.seq_set(0, PARTIAL_ONLY, &wrong), wrong.len());
        assert_eq!(probe.decode(&[3], next, 0), 0);
        assert_eq!(b.seq_set(0, PARTIAL_ONLY, &mine), mine.len());
        assert_eq!(a.decode(&[3], next, 0), 0);
        assert_eq!(b.decode(&[3], next, 0), 0);
        let (la, lb) = (a.logits().unwrap(), b.logits().unwrap());
        assert!(
            la.iter().zip(&lb).all(|(x, y)| x.to_bits() == y.to_bits()),
            "n_rs_seq {n_rs_seq}: logits after our recurrent part differ"
        );
        assert_ne!(probe.logits().unwrap(), la, "the wrong state must matter");
    }
}
