use super::*;
use crate::ubatch::UbatchBuf;

fn tokens(seq: i32, p0: i32, n: i32) -> UbatchBuf {
    let pos: Vec<i32> = (p0..p0 + n).collect();
    let seqs: Vec<&[i32]> = (0..n).map(|_| std::slice::from_ref(&seq)).collect();
    UbatchBuf::new(&pos, &pos, &seqs)
}

fn place(kv: &mut KvCache, ub: &UbatchBuf) -> SlotInfo {
    let v = ub.view();
    kv.validate_ubatch(&v).unwrap();
    let slot = kv.find_slot(&v, false).expect("slot");
    kv.apply_ubatch(&slot, &v);
    kv.check_invariants().unwrap();
    slot
}

#[test]
fn bad_input_is_rejected_and_changes_nothing() {
    let mut kv = KvCache::new(KvParams {
        n_seq_max: 2,
        ..Default::default()
    })
    .unwrap();
    place(&mut kv, &tokens(0, 0, 5));
    let before = format!("{:?}", kv.cells(0).pos_all());
    assert_eq!(
        kv.seq_rm(2, 0, -1).unwrap_err().kind(),
        crate::error::ErrorKind::InvalidSeqId
    );
    assert_eq!(
        kv.seq_rm(-2, 0, -1).unwrap_err().kind(),
        crate::error::ErrorKind::InvalidSeqId
    );
    assert_eq!(
        kv.seq_div(0, 0, -1, 0).unwrap_err().kind(),
        crate::error::ErrorKind::InvalidArgument
    );
    assert_eq!(
        kv.seq_div(0, 0, -1, -3).unwrap_err().kind(),
        crate::error::ErrorKind::InvalidArgument
    );
    assert!(kv.seq_cp(0, 5, 0, -1).is_err());
    assert!(kv.seq_pos_max(300).is_err());
    assert_eq!(before, format!("{:?}", kv.cells(0).pos_all()));
    assert!(!kv.has_shift());
}

#[test]
fn oversized_ubatch_gets_no_slot() {
    let kv = KvCache::new(KvParams {
        size: 8,
        n_pad: 1,
        ..Default::default()
    })
    .unwrap();
    let ub = tokens(0, 0, 9);
    assert!(kv.find_slot(&ub.view(), false).is_none());
}

#[test]
fn partial_cross_stream_copy_is_refused() {
    let mut kv = KvCache::new(KvParams {
        n_seq_max: 2,
        unified: false,
        ..Default::default()
    })
    .unwrap();
    place(&mut kv, &tokens(0, 0, 4));
    assert_eq!(
        kv.seq_cp(0, 1, 2, -1).unwrap_err().kind(),
        crate::error::ErrorKind::InvalidRange
    );
    assert_eq!(kv.pending_copies().len(), 0);
    kv.seq_cp(0, 1, -1, -1).unwrap();
    assert_eq!(kv.seq_pos_max(1).unwrap(), 3);
    assert_eq!(kv.pending_copies(), &[(0, 1)]);
}
