//! Recurrent states (llama.cpp's `RSState`): arbitrary bytes into sequence blobs (host,
//! ON_DEVICE with a real or altered stash, PARTIAL_ONLY) and whole-state reads of recurrent
//! memories with and without tensors. A rejected state must leave the memory exactly as it was
//! (cells, head/used/n/rs_z, rs_idx, every tensor byte); an accepted one must leave it
//! consistent through every later operation (placements of equal-split ubatches and their
//! s_copy, sequence operations, state round trips), checked after each.
//!
//! Input: `[select, dest, edit, len_lo, len_hi]`, `len` state bytes, then 5-byte operations.
//! `select % 4` is the configuration, `select / 4 % 4` the reader: 0 host sequence blob,
//! 1 whole state, 2 ON_DEVICE sequence blob (the stash is a real ON_DEVICE save of sequence
//! `edit % n_seq_max`, cut, grown or flipped by `edit / 16 % 4`), 3 host blob with
//! PARTIAL_ONLY.
#![no_main]
use libfuzzer_sys::fuzz_target;
use llama_memory::state::{self, Stash, FLAG_ON_DEVICE, FLAG_PARTIAL_ONLY};
use llama_memory_fuzz::recurrent::{
    rs_check_accepted, rs_dest, rs_memory, rs_run_ops, rs_snapshot,
};

fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let (sel, d, edit) = (data[0], data[1], data[2]);
    let n_state = (u16::from_le_bytes([data[3], data[4]]) as usize).min(data.len() - 5);
    let (blob, ops) = data[5..].split_at(n_state);
    let cfg = sel % 4;
    let mut m = rs_memory(cfg);
    let n_seq_max = m.cache.n_seq_max();
    let dest = rs_dest(d, n_seq_max);
    let mut stash = Stash::new();
    let kind = sel / 4 % 4;
    if kind == 2 {
        let src = (edit as u32 % n_seq_max) as i32;
        let n = state::seq_get_size(&m, src, FLAG_ON_DEVICE).expect("size");
        let mut real = vec![0u8; n];
        state::seq_get_data(&m, &mut real, src, FLAG_ON_DEVICE, &mut stash).expect("save");
        if let Some(t) = stash.get_mut(&src) {
            match edit / 16 % 4 {
                1 => t.truncate(edit as usize * 7 % (t.len() + 1)),
                2 => t.extend_from_slice(&[edit; 5]),
                3 if !t.is_empty() => {
                    let k = edit as usize * 13 % t.len();
                    t[k] ^= 0x5a;
                }
                _ => {}
            }
        }
    }
    let before = rs_snapshot(&m);
    let r = match kind {
        0 => state::seq_set_data(&mut m, blob, dest, 0, &stash),
        1 => state::set_data(&mut m, blob),
        2 => state::seq_set_data(&mut m, blob, dest, FLAG_ON_DEVICE, &stash),
        _ => state::seq_set_data(&mut m, blob, dest, FLAG_PARTIAL_ONLY, &stash),
    };
    match r {
        Err(_) => assert!(
            rs_snapshot(&m) == before,
            "a failed read changed the memory"
        ),
        Ok(n) => {
            assert!(n <= blob.len(), "read {n} of {} bytes", blob.len());
            rs_check_accepted(cfg, &m);
            rs_run_ops(cfg, &mut m, ops);
        }
    }
});
