//! A whole state the reader accepted, then operations on it (sequence ops, placement and its
//! graph inputs, updates, state round trips): accepted hostile states must not poison later
//! calls.
#![no_main]
use libfuzzer_sys::fuzz_target;
use llama_memory::state;
use llama_memory_fuzz::{memory, run_ops};

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let cfg = data[0];
    let n_state = (u16::from_le_bytes([data[1], data[2]]) as usize).min(data.len() - 3);
    let (blob, ops) = data[3..].split_at(n_state);
    let mut m = memory(cfg);
    if state::set_data(&mut m, blob).is_err() {
        return;
    }
    run_ops(&mut m, ops);
});
