//! Unit checks of the recurrent cells on cases worked out from llama.cpp's
//! `llama_memory_recurrent` (the differential suite compares random traces with it).

use super::*;
use crate::ubatch::UbatchBuf;

fn cache(n_seq: u32, n_rs_seq: u32) -> RsCache {
    RsCache::new(
        RsParams {
            size: n_seq,
            n_seq_max: n_seq,
            n_rs_seq,
        },
        true,
    )
    .unwrap()
}

/// One set per sequence, `n` tokens each, positions `p0[k] ..`.
fn ub(sets: &[(i32, i32)], n: u32) -> UbatchBuf {
    let mut pos = Vec::new();
    let mut seqs: Vec<Vec<i32>> = Vec::new();
    for &(s, p0) in sets {
        for k in 0..n as i32 {
            pos.push(p0 + k);
            seqs.push(vec![s]);
        }
    }
    let refs: Vec<&[i32]> = seqs.iter().map(|v| v.as_slice()).collect();
    let toks = vec![0; pos.len()];
    let mut u = UbatchBuf::new(&toks, &pos, &refs);
    u.n_seq_tokens = n;
    u.n_seqs = sets.len() as u32;
    u.equal_seqs = true;
    u
}

#[test]
fn placement_takes_one_cell_per_sequence_and_records_the_last_position() {
    let mut c = cache(4, 0);
    let u = ub(&[(2, 0), (0, 0)], 3);
    c.find_slot(&u.view()).unwrap();
    // seq 2 takes cell 0, seq 0 cell 1; gathered in ubatch order from head 0
    assert_eq!((c.head(), c.n(), c.used()), (0, 2, 2));
    assert_eq!(c.cells()[0].pos, 2);
    assert!(c.cells()[0].has(2));
    assert_eq!(c.cells()[2].tail, 0);
    assert_eq!(c.cells()[0].tail, 1);
    // both are new: they read the zero state, the first row no cell referenced
    assert_eq!(c.rs_z(), 0);
    assert_eq!((c.cells()[0].src0, c.cells()[1].src0), (0, 0));
    assert_eq!((c.cells()[0].src, c.cells()[1].src), (0, 1));
    c.check_invariants().unwrap();
}

#[test]
fn partial_removal_keeps_the_state_unless_it_ends_the_sequence() {
    let mut c = cache(2, 0);
    c.find_slot(&ub(&[(0, 0)], 5).view()).unwrap();
    let before = c.clone();
    // a prefix or middle: true, nothing changes
    assert!(c.seq_rm(0, 0, 3).unwrap());
    assert_eq!(c.cells(), before.cells());
    // a suffix without rollback planes: false
    assert!(!c.seq_rm(0, 2, -1).unwrap());
    assert_eq!(c.seq_pos_max(0).unwrap(), 4);
    // everything: freed
    assert!(c.seq_rm(0, -1, -1).unwrap());
    assert_eq!((c.seq_pos_max(0).unwrap(), c.used()), (-1, 0));
}

#[test]
fn rollback_plane_is_single_use_and_read_by_s_copy() {
    let mut c = cache(2, 3);
    c.find_slot(&ub(&[(1, 0)], 6).view()).unwrap();
    assert!(!c.seq_rm(1, 1, -1).unwrap()); // 5 -> 0 needs plane 5 > n_rs_seq
    assert!(c.seq_rm(1, 4, -1).unwrap()); // 5 -> 3: two tokens back
    assert_eq!(c.rs_idx()[1], 2);
    assert_eq!(c.seq_pos_max(1).unwrap(), 3);
    assert!(!c.seq_rm(1, 3, -1).unwrap()); // one pending already
    let mut out = [0; 1];
    c.s_copy_into(&mut out).unwrap();
    assert_eq!(out[0], 2 * 2); // plane 2 of a 2-cell memory, row of cell 0 (src0 = rs_z = 0)
    assert_eq!(c.rs_idx()[1], 0);
}

#[test]
fn copy_shares_the_state_and_the_next_placement_moves_it_out() {
    let mut c = cache(3, 0);
    c.find_slot(&ub(&[(0, 0)], 2).view()).unwrap();
    c.seq_cp(0, 1, 0, -1).unwrap();
    assert_eq!(c.cells()[1].tail, 0);
    assert!(c.cells()[0].has(1));
    assert_eq!(c.used(), 1);
    c.find_slot(&ub(&[(1, 2)], 1).view()).unwrap();
    // seq 1 no longer owns a cell alone: it gets a free one with a copy of pos and src
    let t = c.cells()[1].tail;
    assert_ne!(t, 0);
    assert_eq!(c.cells()[t as usize].pos, 2);
    assert_eq!(c.cells()[t as usize].src0, 0); // reads seq 0's row
    assert_eq!(c.used(), 2);
    c.check_invariants().unwrap();
}

#[test]
fn failed_operations_change_nothing() {
    let mut c = cache(2, 0);
    c.find_slot(&ub(&[(0, 0)], 2).view()).unwrap();
    let before = c.clone();
    assert!(c.seq_rm(-1, -1, -1).is_err());
    assert!(c.seq_rm(2, -1, -1).is_err());
    assert!(c.seq_keep(5).is_err());
    assert!(c.seq_div(0, 0, -1, 0).is_err());
    assert!(c.seq_cp(0, 7, 0, -1).is_err());
    let mut bad = ub(&[(0, 2), (0, 5)], 1); // one sequence in two sets
    bad.equal_seqs = true;
    assert!(c.check_ubatch(&bad.view()).is_err());
    assert_eq!(c.cells(), before.cells());
}
