//! `llama_state_seq_set_data` blobs (magic, seq id, KV state) into any destination.
#![no_main]
use libfuzzer_sys::fuzz_target;
use llama_memory::state;
use llama_memory_fuzz::{check, dest, memory, no_stash};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (cfg, d) = (data[0], data[1]);
    let n_seq_max = memory(cfg).cache.n_seq_max();
    check(cfg, |m| {
        state::seq_set_data(m, &data[2..], dest(d, n_seq_max), 0, &no_stash())
    });
});
