//! Composite states (a sliding-window pair, a hybrid, a hybrid with a pair; the hybrids with 0
//! and 1 rollback plane): arbitrary bytes into sequence blobs (flags 0 and PARTIAL_ONLY) and
//! whole-state reads. A composite restores all of its parts or none: a rejected state must
//! leave every part exactly as it was (a valid first part followed by a damaged second one
//! included, which llama.cpp half-restores); an accepted one must leave every part consistent
//! through later operations (placements, sequence operations, state round trips), checked
//! after each.
//!
//! Input: `[select, dest, len_lo, len_hi]`, `len` state bytes, then 5-byte operations.
//! `select % 5` is the configuration (`cmp_config`), `select / 5 % 3` the reader: 0 sequence
//! blob, 1 sequence blob with PARTIAL_ONLY, 2 whole state.
#![no_main]
use libfuzzer_sys::fuzz_target;
use llama_memory::state::{self, Stash, FLAG_PARTIAL_ONLY};
use llama_memory_fuzz::composite::{
    cmp_check_accepted, cmp_memory, cmp_run_ops, cmp_snapshot, N_CMP_CONFIGS,
};
use llama_memory_fuzz::recurrent::rs_dest;

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (sel, d) = (data[0], data[1]);
    let n_state = (u16::from_le_bytes([data[2], data[3]]) as usize).min(data.len() - 4);
    let (blob, ops) = data[4..].split_at(n_state);
    let cfg = sel % N_CMP_CONFIGS;
    let mut m = cmp_memory(cfg);
    let dest = rs_dest(d, m.n_seq_max());
    let before = cmp_snapshot(&*m);
    let r = match sel / N_CMP_CONFIGS % 3 {
        0 => state::seq_set_data(&mut *m, blob, dest, 0, &Stash::new()),
        1 => state::seq_set_data(&mut *m, blob, dest, FLAG_PARTIAL_ONLY, &Stash::new()),
        _ => state::set_data(&mut *m, blob),
    };
    match r {
        Err(_) => assert!(
            cmp_snapshot(&*m) == before,
            "a failed read changed the memory"
        ),
        Ok(n) => {
            assert!(n <= blob.len(), "read {n} of {} bytes", blob.len());
            cmp_check_accepted(cfg, &mut *m);
            cmp_run_ops(cfg, &mut *m, ops);
        }
    }
});
