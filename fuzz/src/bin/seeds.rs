//! Writes real states of every configuration into corpus/<target>/ (run before fuzzing; the
//! corpus is not committed).

use std::path::Path;

use llama_memory::state::{self, Stash};
use llama_memory_fuzz::composite::{cmp_memory, N_CMP_CONFIGS};
use llama_memory_fuzz::recurrent::{rs_memory, N_RS_CONFIGS};
use llama_memory_fuzz::{memory, N_CONFIGS};

fn main() {
    let root = std::env::args().nth(1).unwrap_or_else(|| "corpus".into());
    let root = Path::new(&root);
    let mut n = 0;
    for cfg in 0..N_CONFIGS {
        let m = memory(cfg);
        for seq in [-1, 0, 1] {
            let size = state::seq_get_size(&m, seq, 0).expect("size");
            let mut blob = vec![0u8; size];
            state::seq_get_data(&m, &mut blob, seq, 0, &mut Stash::new()).expect("blob");
            for d in 0..8u8 {
                let mut s = vec![cfg, d];
                s.extend(&blob);
                write(root, "seq_set_data", &format!("c{cfg}s{seq}d{d}"), &s);
                // A file: header, 3 tokens, the state without the blob header.
                let mut f = vec![cfg, d, 8];
                f.extend(0x6767_7371u32.to_ne_bytes());
                f.extend(4u32.to_ne_bytes());
                f.extend(3u32.to_ne_bytes());
                for t in [7i32, 8, 9] {
                    f.extend(t.to_ne_bytes());
                }
                f.extend(&blob[8..]);
                write(root, "load_file", &format!("c{cfg}s{seq}d{d}"), &f);
                n += 2;
            }
        }
        let size = state::get_size(&m).expect("size");
        let mut whole = vec![0u8; size];
        state::get_data(&m, &mut whole).expect("state");
        let mut s = vec![cfg];
        s.extend(&whole);
        write(root, "set_data", &format!("c{cfg}"), &s);
        // The whole state, then one of each operation kind.
        let mut o = vec![cfg];
        o.extend((whole.len() as u16).to_le_bytes());
        o.extend(&whole);
        for k in 0..10u8 {
            o.extend([k, k % 3 + 1, 3, 5, 17]);
        }
        write(root, "ops_after_restore", &format!("c{cfg}"), &o);
        // ON_DEVICE: the metadata-only blob of a real ON_DEVICE save, each edit kind.
        for src in [0i32, 1] {
            let mut st = Stash::new();
            let n_dev = state::seq_get_size(&m, src, state::FLAG_ON_DEVICE).expect("size");
            let mut blob = vec![0u8; n_dev];
            state::seq_get_data(&m, &mut blob, src, state::FLAG_ON_DEVICE, &mut st).expect("blob");
            for edit in [3u8, 0, 1, 2, 0x83] {
                let mut d = vec![cfg, 2, src as u8, edit];
                d.extend(&blob);
                write(root, "on_device", &format!("c{cfg}s{src}e{edit}"), &d);
            }
        }
        n += 11;
    }
    // The C ABI target: a sequence blob and a whole state of the handle it builds, a ubatch,
    // and the llama.h functions.
    let mut c = vec![0u8, 255];
    c.extend(std::iter::repeat_n(0u8, 255 * 8));
    write(root, "c_abi", "zeros", &c);
    write(
        root,
        "c_abi",
        "ops",
        &[
            2, 5, 1, 1, 0, 0, 0, 3, 4, 1, 1, 1, 2, 0, 0, 0, 9, 0, 0, 0, 3,
        ],
    );
    n += 2;
    n += recurrent_seeds(root);
    n += composite_seeds(root);
    println!("wrote {n} seeds under {}", root.display());
}

fn write(root: &Path, target: &str, name: &str, bytes: &[u8]) {
    let dir = root.join(target);
    std::fs::create_dir_all(&dir).expect("corpus dir");
    std::fs::write(dir.join(name), bytes).expect("seed");
}

/// Seeds of `recurrent_state`: `[select, dest, edit, len_lo, len_hi]`, a real state of the
/// configuration, then one operation of each kind.
fn recurrent_seeds(root: &Path) -> usize {
    let mut n = 0;
    let ops: Vec<u8> = (0..13u8)
        .flat_map(|k| [k, k % 3 + 1, 3, 5, 17 + k])
        .collect();
    let seed = |sel: u8, dest: u8, edit: u8, state: &[u8]| {
        let mut s = vec![sel, dest, edit];
        s.extend((state.len() as u16).to_le_bytes());
        s.extend(state);
        s.extend(&ops);
        s
    };
    for cfg in 0..N_RS_CONFIGS {
        let m = rs_memory(cfg);
        let n_seq = m.cache.n_seq_max() as i32;
        let size = state::get_size(&m).expect("size");
        let mut whole = vec![0u8; size];
        state::get_data(&m, &mut whole).expect("state");
        write(
            root,
            "recurrent_state",
            &format!("c{cfg}whole"),
            &seed(4 + cfg, 0, 0, &whole),
        );
        n += 1;
        for src in -1..n_seq {
            let size = state::seq_get_size(&m, src, 0).expect("size");
            let mut blob = vec![0u8; size];
            state::seq_get_data(&m, &mut blob, src, 0, &mut Stash::new()).expect("blob");
            // dest selectors: -1, sequences 0..=4 (mod n_seq_max), n_seq_max, invalid
            for d in 0..8u8 {
                write(
                    root,
                    "recurrent_state",
                    &format!("c{cfg}s{src}d{d}"),
                    &seed(cfg, d, 0, &blob),
                );
                n += 1;
            }
            write(
                root,
                "recurrent_state",
                &format!("c{cfg}s{src}p"),
                &seed(12 + cfg, 2, 0, &blob),
            );
            n += 1;
            if src < 0 {
                continue;
            }
            let mut st = Stash::new();
            let size = state::seq_get_size(&m, src, state::FLAG_ON_DEVICE).expect("size");
            let mut dev = vec![0u8; size];
            state::seq_get_data(&m, &mut dev, src, state::FLAG_ON_DEVICE, &mut st).expect("blob");
            for e in 0..4u8 {
                write(
                    root,
                    "recurrent_state",
                    &format!("c{cfg}s{src}e{e}"),
                    &seed(8 + cfg, 3, src as u8 + 16 * e, &dev),
                );
                n += 1;
            }
        }
    }
    n
}

/// Seeds of `composite_state`: `[select, dest, len_lo, len_hi]`, a real state of the
/// configuration (sequence blobs with flags 0 and PARTIAL_ONLY, the whole state), then one
/// operation of each kind.
fn composite_seeds(root: &Path) -> usize {
    let mut n = 0;
    let ops: Vec<u8> = (0..12u8)
        .flat_map(|k| [k, k % 3 + 1, 3, 5, 17 + k])
        .collect();
    let seed = |sel: u8, dest: u8, state: &[u8]| {
        let mut s = vec![sel, dest];
        s.extend((state.len() as u16).to_le_bytes());
        s.extend(state);
        s.extend(&ops);
        s
    };
    for cfg in 0..N_CMP_CONFIGS {
        let m = cmp_memory(cfg);
        let size = state::get_size(&*m).expect("size");
        let mut whole = vec![0u8; size];
        state::get_data(&*m, &mut whole).expect("state");
        let sel = |reader: u8| cfg + N_CMP_CONFIGS * reader;
        write(
            root,
            "composite_state",
            &format!("c{cfg}whole"),
            &seed(sel(2), 0, &whole),
        );
        n += 1;
        for (reader, flags) in [(0u8, 0u32), (1, state::FLAG_PARTIAL_ONLY)] {
            for src in -1..m.n_seq_max() as i32 {
                let size = state::seq_get_size(&*m, src, flags).expect("size");
                let mut blob = vec![0u8; size];
                state::seq_get_data(&*m, &mut blob, src, flags, &mut Stash::new()).expect("blob");
                // dest selectors: -1, sequences 0..=4 (mod n_seq_max), n_seq_max, invalid
                for d in [0u8, 1, 2, 4, 6, 7] {
                    write(
                        root,
                        "composite_state",
                        &format!("c{cfg}r{reader}s{src}d{d}"),
                        &seed(sel(reader), d, &blob),
                    );
                    n += 1;
                }
            }
        }
    }
    n
}
