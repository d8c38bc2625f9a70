//! State compatibility with the pinned llama.cpp, both directions, on a tiny random-weight
//! `llama` model generated at test time:
//! - a sequence blob (and the memory part of the whole state) written by stock libllama after
//!   real decodes loads into this library and re-serializes to the same bytes;
//! - a blob written by this library, after restoring into other sequences and fragmented
//!   cells, loads into a fresh stock context and gives bit-identical logits on the next decode;
//! - round trips within this library keep cells and K/V bytes.

use llama_memory::state::{self, Stash};
use llama_memory::storage::{KvStorage, LayerSpec, StorageSpec};
use llama_memory::{KvCache, KvMemory, KvParams, Memory};
use llama_memory_reference::{model_path, model_path_ex, CtxParams, RefCtx};

const F32: i32 = 0;
const F16: i32 = 1;
const Q8_0: i32 = 8;

/// (n_layer, n_embd, n_head, n_head_kv) of a generated model.
type Shape = (u32, u32, u32, u32);
const TINY: Shape = (2, 64, 4, 2);
const WIDE: Shape = (3, 128, 4, 4);
/// Head size 64: a quantized cache turns on llama.cpp's attention rotation (`n_rot_k/v`).
const ROT: Shape = (2, 256, 4, 2);

fn model(shape: Shape) -> std::path::PathBuf {
    if shape == TINY {
        model_path()
    } else {
        model_path_ex(shape.0, shape.1, shape.2, shape.3)
    }
}

#[derive(Clone, Copy, Debug)]
struct Cfg {
    shape: Shape,
    n_seq_max: u32,
    unified: bool,
    flash_attn: bool,
    type_k: i32,
    type_v: i32,
}

impl Cfg {
    fn ctx_params(&self) -> CtxParams {
        CtxParams {
            n_ctx: 256 * if self.unified { 1 } else { self.n_seq_max },
            n_seq_max: self.n_seq_max,
            kv_unified: self.unified,
            flash_attn: self.flash_attn,
            type_k: self.type_k,
            type_v: self.type_v,
            ..CtxParams::default()
        }
    }

    fn stock(&self) -> RefCtx {
        RefCtx::new(&model(self.shape), &self.ctx_params()).expect("stock context")
    }

    /// Our memory with the same cells and tensors as the stock context's KV cache.
    fn ours(&self) -> KvMemory {
        let (n_layer, n_embd, n_head, n_head_kv) = self.shape;
        let head = n_embd / n_head;
        let gqa = head * n_head_kv;
        // llama.cpp's rule for the Hadamard rotation of quantized caches.
        let quant = |t: i32| t != F32 && t != F16;
        let mut n_rot_k = 0;
        if quant(self.type_k) && head % 64 == 0 {
            n_rot_k = 64;
            while head % (2 * n_rot_k) == 0 {
                n_rot_k *= 2;
            }
        }
        let n_rot_v = if quant(self.type_v) && head % 64 == 0 {
            64
        } else {
            0
        };
        let p = KvParams {
            size: 256,
            n_seq_max: self.n_seq_max,
            unified: self.unified,
            v_trans: !self.flash_attn,
            n_embd_v_gqa_max: gqa,
            ..KvParams::default()
        };
        let layers = LayerSpec::uniform(n_layer, gqa, gqa);
        let st = KvStorage::new(StorageSpec {
            type_k: self.type_k as u32,
            type_v: self.type_v as u32,
            v_trans: !self.flash_attn,
            is_mla: false,
            size: 256,
            n_stream: if self.unified { 1 } else { self.n_seq_max },
            n_rot_k,
            n_rot_v,
            layers,
        })
        .unwrap();
        KvMemory::new(KvCache::new(p).unwrap(), Some(st)).unwrap()
    }
}

fn configs() -> Vec<Cfg> {
    let base = Cfg {
        shape: TINY,
        n_seq_max: 2,
        unified: false,
        flash_attn: false,
        type_k: F16,
        type_v: F16,
    };
    vec![
        base,
        Cfg {
            unified: true,
            n_seq_max: 3,
            ..base
        },
        Cfg {
            flash_attn: true,
            ..base
        },
        Cfg {
            shape: WIDE,
            flash_attn: true,
            unified: true,
            n_seq_max: 3,
            type_k: Q8_0,
            type_v: Q8_0,
        },
        Cfg {
            type_k: F32,
            type_v: F32,
            unified: true,
            ..base
        },
        Cfg {
            shape: WIDE,
            flash_attn: true,
            type_k: Q8_0,
            ..base
        },
        Cfg {
            shape: ROT,
            flash_attn: true,
            unified: true,
            type_k: Q8_0,
            type_v: Q8_0,
            ..base
        },
    ]
}

fn prompt(n: usize, salt: i32) -> Vec<i32> {
    (0..n as i32).map(|i| (i * 7 + salt) % 32).collect()
}

fn get_seq(m: &dyn Memory, seq: i32) -> Vec<u8> {
    let n = state::seq_get_size(m, seq, 0).unwrap();
    let mut v = vec![0u8; n];
    let w = state::seq_get_data(m, &mut v, seq, 0, &mut Stash::new()).unwrap();
    assert_eq!(w, n, "get_size and get_data disagree");
    v
}

fn set_seq(m: &mut dyn Memory, blob: &[u8], dest: i32) -> usize {
    state::seq_set_data(m, blob, dest, 0, &Stash::new())
        .unwrap_or_else(|e| panic!("restore into {dest} failed: {e}"))
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn stock_blobs_load_and_reserialize_identically() {
    let mut checked = 0;
    for cfg in configs() {
        let mut a = cfg.stock();
        let p0 = prompt(9, 1);
        assert_eq!(a.decode(&p0, 0, 0), 0, "{cfg:?}");
        let p1 = prompt(5, 3);
        assert_eq!(a.decode(&p1, 0, 1), 0, "{cfg:?}");
        let p0b = prompt(4, 5);
        assert_eq!(a.decode(&p0b, 9, 0), 0, "{cfg:?}");

        let mut ours = cfg.ours();
        for seq in 0..2 {
            let blob = a.seq_state(seq, 0).expect("stock blob");
            assert!(blob.len() > 100, "{cfg:?}: the blob holds tensor data");
            assert_eq!(set_seq(&mut ours, &blob, seq), blob.len(), "{cfg:?}");
            assert_eq!(
                get_seq(&ours, seq),
                blob,
                "{cfg:?}: seq {seq} re-serialized differently"
            );
            checked += 1;
        }
        // The whole state: llama.cpp prefixes the architecture name to the memory's state.
        let whole = a.state().expect("stock state");
        let name_len = u32::from_ne_bytes(whole[..4].try_into().unwrap()) as usize;
        assert_eq!(&whole[4..4 + name_len], b"llama");
        let mem_part = &whole[4 + name_len..];
        let mut ours2 = cfg.ours();
        assert_eq!(
            state::set_data(&mut ours2, mem_part).unwrap(),
            mem_part.len()
        );
        let n = state::get_size(&ours2).unwrap();
        let mut again = vec![0u8; n];
        state::get_data(&ours2, &mut again).unwrap();
        assert_eq!(
            again, mem_part,
            "{cfg:?}: whole state re-serialized differently"
        );
        // And each sequence of the whole restore matches the stock per-sequence blob.
        for seq in 0..2 {
            assert_eq!(
                get_seq(&ours2, seq),
                a.seq_state(seq, 0).unwrap(),
                "{cfg:?}"
            );
        }
        checked += 1;
    }
    eprintln!("{checked} stock states reloaded and re-serialized byte for byte");
}

#[test]
fn our_blobs_give_stock_the_same_logits() {
    let mut checked = 0;
    for cfg in configs() {
        let mut a = cfg.stock();
        let p = prompt(11, 2);
        assert_eq!(a.decode(&p, 0, 0), 0);
        let blob = a.seq_state(0, 0).unwrap();
        let next = [17];
        assert_eq!(a.decode(&next, p.len() as i32, 0), 0);
        let want = a.logits().unwrap();

        let mut ours = cfg.ours();
        let last = cfg.n_seq_max as i32 - 1;
        if cfg.unified {
            // Fragment the cache: seq 0 takes the first cells, then every other one is freed
            // and the restored copy in the last sequence lands in the holes.
            set_seq(&mut ours, &blob, 0);
            for pos in (0..p.len() as i32).step_by(2) {
                ours.seq_rm(0, pos, pos + 1).unwrap();
            }
            set_seq(&mut ours, &blob, last);
            let cells = ours.cache.cells(0);
            let mut idx: Vec<u32> = cells.seq_pos_iter(last).map(|(_, c)| c).collect();
            idx.sort_unstable();
            assert!(
                idx.windows(2).any(|w| w[1] != w[0] + 1),
                "{cfg:?}: the restored sequence should be fragmented: {idx:?}"
            );
        } else {
            set_seq(&mut ours, &blob, last);
        }
        let ours_blob = get_seq(&ours, last);
        // Cell metadata names the saved sequence, so compare after moving it back to seq 0.
        let mut back = cfg.ours();
        set_seq(&mut back, &ours_blob, 0);
        assert_eq!(
            get_seq(&back, 0),
            blob,
            "{cfg:?}: the same cells and data give the same state"
        );
        // Into a fresh stock context, in sequence 0.
        let mut b = cfg.stock();
        assert_eq!(b.seq_set(0, 0, &ours_blob), ours_blob.len(), "{cfg:?}");
        assert_eq!(b.decode(&next, p.len() as i32, 0), 0);
        let got = b.logits().unwrap();
        assert_eq!(bits(&got), bits(&want), "{cfg:?}: logits differ");
        checked += 1;
    }
    eprintln!("{checked} of our blobs reproduced stock logits bit for bit");
}

#[test]
fn seq_files_interoperate() {
    let cfg = configs()[0];
    let dir = std::env::temp_dir().join(format!("llama-memory-files-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut a = cfg.stock();
    let p = prompt(6, 4);
    assert_eq!(a.decode(&p, 0, 0), 0);
    let stock_file = dir.join("stock.ggsq");
    let n = a.seq_save_file(&stock_file, 0, &p);
    assert!(n > 0);

    let mut ours = cfg.ours();
    let mut toks = vec![0; 16];
    let r = state::seq_load_file(&mut ours, &stock_file, 0, Some(&mut toks)).unwrap();
    assert_eq!((r.read, r.n_tokens), (n, p.len()));
    assert_eq!(&toks[..p.len()], &p[..]);
    let our_file = dir.join("ours.ggsq");
    let n2 = state::seq_save_file(&ours, &our_file, 0, &p).unwrap();
    assert_eq!(n2, n);
    assert_eq!(
        std::fs::read(&our_file).unwrap(),
        std::fs::read(&stock_file).unwrap(),
        "the same sequence gives the same file"
    );
    let mut b = cfg.stock();
    let (read, t) = b.seq_load_file(&our_file, 0, 16);
    assert_eq!((read, t), (n, p.clone()));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn round_trip_into_another_sequence_keeps_cells_and_bytes() {
    for cfg in configs() {
        let mut a = cfg.stock();
        assert_eq!(a.decode(&prompt(13, 6), 0, 0), 0);
        let blob = a.seq_state(0, 0).unwrap();
        let mut ours = cfg.ours();
        set_seq(&mut ours, &blob, 0);
        let saved = get_seq(&ours, 0);
        set_seq(&mut ours, &saved, 1);
        // Same positions, and for every position the same K/V bytes in every layer.
        let s0 = ours.cache.stream_of(0);
        let s1 = ours.cache.stream_of(1);
        let c0: Vec<(i32, u32)> = ours.cache.cells(s0).seq_pos_iter(0).collect();
        let c1: Vec<(i32, u32)> = ours.cache.cells(s1).seq_pos_iter(1).collect();
        assert_eq!(c0.len(), 13);
        assert_eq!(
            c0.iter().map(|x| x.0).collect::<Vec<_>>(),
            c1.iter().map(|x| x.0).collect::<Vec<_>>()
        );
        let st = ours.storage.as_ref().unwrap();
        for l in st.layers() {
            for t in [l.k, l.v] {
                let stride = st.stream_stride(t).unwrap();
                let cells_x_row = stride; // bytes per stream
                let row = cells_x_row / 256;
                let el = llama_memory::storage::type_size(cfg.type_v as u32).unwrap();
                for (&(_, a0), &(_, a1)) in c0.iter().zip(&c1) {
                    let (mut x, mut y) = (vec![0u8; row], vec![0u8; row]);
                    if t == l.v && !cfg.flash_attn {
                        // Transposed V: one element per channel.
                        for j in 0..l.n_embd_v_gqa as usize {
                            let mut e0 = vec![0u8; el];
                            let mut e1 = vec![0u8; el];
                            st.get(
                                t,
                                s0 as usize * stride + (j * 256 + a0 as usize) * el,
                                &mut e0,
                            )
                            .unwrap();
                            st.get(
                                t,
                                s1 as usize * stride + (j * 256 + a1 as usize) * el,
                                &mut e1,
                            )
                            .unwrap();
                            assert_eq!(e0, e1, "{cfg:?}");
                        }
                        continue;
                    }
                    st.get(t, s0 as usize * stride + a0 as usize * row, &mut x)
                        .unwrap();
                    st.get(t, s1 as usize * stride + a1 as usize * row, &mut y)
                        .unwrap();
                    assert_eq!(x, y, "{cfg:?} layer {}", l.il);
                    assert!(x.iter().any(|&b| b != 0), "real data, not zeros");
                }
            }
        }
        let mut back = cfg.ours();
        set_seq(&mut back, &get_seq(&ours, 1), 0);
        assert_eq!(get_seq(&back, 0), saved, "{cfg:?}");
    }
}
