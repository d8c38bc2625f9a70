//! Sequence-state files ('ggsq' v4: header, tokens, state), with and without a token buffer.
#![no_main]
use libfuzzer_sys::fuzz_target;
use llama_memory::state;
use llama_memory_fuzz::{check, dest, memory};

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let (cfg, d, cap) = (data[0], data[1], data[2] as usize % 40);
    let n_seq_max = memory(cfg).cache.n_seq_max();
    check(cfg, |m| {
        let mut toks = vec![0i32; cap];
        let out = if data[2] == 255 {
            None
        } else {
            Some(&mut toks[..])
        };
        state::seq_load_bytes(m, &data[3..], dest(d, n_seq_max), out).map(|r| r.read)
    });
});
