//! `ON_DEVICE` sequence blobs: the metadata comes from the input and the tensor bytes from the
//! memory's stash, which a real `ON_DEVICE` save filled and the input may truncate or alter.
#![no_main]
use libfuzzer_sys::fuzz_target;
use llama_memory::state::{self, Stash, FLAG_ON_DEVICE, FLAG_PARTIAL_ONLY};
use llama_memory_fuzz::{check, dest, memory};

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let (cfg, d, src, edit) = (data[0], data[1], data[2], data[3]);
    let m0 = memory(cfg);
    let n_seq_max = m0.cache.n_seq_max();
    let src = (src as u32 % n_seq_max) as i32;
    let mut stash = Stash::new();
    let n = state::seq_get_size(&m0, src, FLAG_ON_DEVICE).expect("size");
    let mut real = vec![0u8; n];
    state::seq_get_data(&m0, &mut real, src, FLAG_ON_DEVICE, &mut stash).expect("save");
    // The stash: cut short, grown, or with one byte flipped; the blob: the input's bytes.
    if let Some(t) = stash.get_mut(&src) {
        match edit % 4 {
            0 => t.truncate(edit as usize * 7 % (t.len() + 1)),
            1 => t.extend_from_slice(&[edit; 3]),
            2 if !t.is_empty() => {
                let k = edit as usize * 13 % t.len();
                t[k] ^= 0x5a;
            }
            _ => {}
        }
    }
    let flags = FLAG_ON_DEVICE
        | if edit & 0x80 != 0 {
            FLAG_PARTIAL_ONLY
        } else {
            0
        };
    check(cfg, |m| {
        state::seq_set_data(m, &data[4..], dest(d, n_seq_max), flags, &stash)
    });
});
