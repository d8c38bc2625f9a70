//! Writes real states of every configuration into corpus/<target>/ (run before fuzzing; the
//! corpus is not committed).

use std::path::Path;

use llama_memory::state::{self, Stash};
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
    println!("wrote {n} seeds under {}", root.display());
}

fn write(root: &Path, target: &str, name: &str, bytes: &[u8]) {
    let dir = root.join(target);
    std::fs::create_dir_all(&dir).expect("corpus dir");
    std::fs::write(dir.join(name), bytes).expect("seed");
}
