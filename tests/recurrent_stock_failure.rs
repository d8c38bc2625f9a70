//! llama.cpp's effect of a failed recurrent restore, which this library reproduces in
//! stock-compatible mode (`Memory::set_stock_compat`, what the drop-in libllama turns on),
//! against stock `llama_memory_recurrent::state_read` on the generated mamba model: sequence and
//! whole blobs cut at every byte and with a cell count above the size, restored into a sequence
//! and as a whole. After each attempt both memories must agree on success, on every sequence's
//! positions and on the whole state's bytes. Off stock-compatible mode the same failures
//! change nothing.
//!
//! A whole restore cut inside its cells leaves stock with the cells read so far (llama.cpp
//! cleared the memory, then its reader threw); this library clears the memory instead. Those
//! inputs are not compared.

use llama_memory::io::{Sink, StateIn, StateOut};
use llama_memory::recurrent::{RecurrentMemory, RsCache, RsParams};
use llama_memory::storage::recurrent::{RsLayerSpec, RsStorage, RsStorageSpec};
use llama_memory::{Memory, UbatchBuf};
use llama_memory_reference as stock;
use rand::{Rng, SeedableRng};

const N_SEQ: u32 = 3;

fn pair() -> (RecurrentMemory, stock::RefRs) {
    let r = stock::RefRs::new(
        &stock::mamba_model_path(),
        &stock::RsParams::for_seqs(N_SEQ, 0),
    )
    .expect("stock llama_memory_recurrent");
    let layers: Vec<RsLayerSpec> = (0..r.n_layer())
        .filter(|&il| r.has_r(il))
        .map(|il| RsLayerSpec {
            il,
            n_embd_r: r.n_embd_r(),
            n_embd_s: r.n_embd_s(),
            n_embd_p: 0,
            buft: llama_memory::storage::Buft::CPU,
        })
        .collect();
    let p = RsParams {
        size: r.size(),
        n_seq_max: N_SEQ,
        n_rs_seq: 0,
    };
    let st = RsStorage::new(RsStorageSpec {
        type_r: ggml_sys::GGML_TYPE_F32,
        type_s: ggml_sys::GGML_TYPE_F32,
        size: r.size(),
        n_rs_seq: 0,
        layers,
    })
    .unwrap();
    let n_layer = r.n_layer();
    let m = RecurrentMemory::new(RsCache::new(p, true).unwrap(), Some(st), n_layer).unwrap();
    (m, r)
}

/// One token of `seq` at `pos`, placed as llama.cpp's context places it.
fn place(m: &mut RecurrentMemory, seq: i32, pos: i32) {
    let seqs: [&[i32]; 1] = [std::slice::from_ref(&seq)];
    let mut b = UbatchBuf::new(&[1], &[pos], &seqs);
    b.equal_seqs = true;
    let mut ctx = m.init_batch(&[b.view()], None).unwrap();
    ctx.apply(m).unwrap();
}

fn write(m: &RecurrentMemory, seq: i32) -> Vec<u8> {
    let mut sink = Sink::Count(0);
    let mut out = StateOut {
        sink: &mut sink,
        stash: None,
    };
    Memory::state_write(m, seq, 0, &mut out).unwrap();
    let mut buf = vec![0u8; sink.len()];
    let mut sink = Sink::new(&mut buf);
    let mut out = StateOut {
        sink: &mut sink,
        stash: None,
    };
    Memory::state_write(m, seq, 0, &mut out).unwrap();
    buf
}

fn read(m: &mut RecurrentMemory, seq: i32, blob: &[u8]) -> bool {
    m.state_read(seq, &mut StateIn::new(blob)).is_ok()
}

/// The whole state's bytes and every sequence's positions.
fn observe_ours(m: &RecurrentMemory) -> (Vec<u8>, Vec<(i32, i32)>) {
    let pos = (0..N_SEQ as i32)
        .map(|s| (m.seq_pos_min(s).unwrap(), m.seq_pos_max(s).unwrap()))
        .collect();
    (write(m, -1), pos)
}

fn observe_stock(r: &stock::RefRs) -> (Vec<u8>, Vec<(i32, i32)>) {
    let pos = (0..N_SEQ as i32)
        .map(|s| (r.seq_pos_min(s), r.seq_pos_max(s)))
        .collect();
    (r.state_write(-1, 0), pos)
}

/// Seqs 0 and 1 hold a state each (random values), seq 2 is empty; returns the whole blob.
fn setup(m: &mut RecurrentMemory, r: &mut stock::RefRs, seed: u64) -> Vec<u8> {
    place(m, 0, 0);
    place(m, 0, 1);
    place(m, 1, 0);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let st = m.storage.as_mut().unwrap();
    for l in st.layers().to_vec() {
        for t in [l.r, l.s] {
            // SAFETY: our own live tensor.
            let n = unsafe { ggml_sys::ggml_nbytes(t) } / 4;
            let bytes: Vec<u8> = (0..n)
                .flat_map(|_| rng.gen_range(-2.0f32..2.0).to_le_bytes())
                .collect();
            st.set(t, 0, &bytes).unwrap();
        }
    }
    let whole = write(m, -1);
    assert!(r.state_read(-1, 0, &whole), "stock refused our whole state");
    assert!(write(m, -1) == r.state_write(-1, 0));
    whole
}

#[test]
fn a_failed_restore_has_stocks_effect_in_stock_compatible_mode() {
    let (mut m, mut r) = pair();
    m.set_stock_compat(true);
    let base = setup(&mut m, &mut r, 3);
    let seq_blob = write(&m, 0);
    assert_eq!(seq_blob, r.state_write(0, 0), "the stock blob differs");
    let (mut compared, mut failures, mut erased, mut skipped) = (0, 0, 0, 0);
    let mut inputs: Vec<(i32, Vec<u8>, Option<usize>)> = Vec::new();
    for (dest, blob) in [(1, &seq_blob), (2, &seq_blob), (-1, &base)] {
        for cut in 0..blob.len() {
            inputs.push((dest, blob[..cut].to_vec(), Some(cut)));
        }
        let mut too_many = blob.clone();
        too_many[..4].copy_from_slice(&(r.size() + 1).to_le_bytes());
        inputs.push((dest, too_many, None));
    }
    let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    // where the whole blob's cells end: per cell pos, n_seq_id, the ids
    let mut cells_end = 4;
    for _ in 0..u32_at(&base, 0) {
        cells_end += 8 + 4 * u32_at(&base, cells_end + 4) as usize;
    }
    for (dest, input, cut) in &inputs {
        if *dest == -1 && cut.is_some_and(|c| c > 4 && c < cells_end) {
            skipped += 1;
            continue;
        }
        assert!(read(&mut m, -1, &base));
        assert!(r.state_read(-1, 0, &base));
        let ok_ours = read(&mut m, *dest, input);
        let ok_stock = r.state_read(*dest, 0, input);
        let what = format!(
            "dest {dest}, {} bytes{}",
            input.len(),
            cut.map_or(" (corrupted)".into(), |c| format!(" (cut at {c})"))
        );
        assert_eq!(ok_ours, ok_stock, "{what}: success differs");
        let (ours_now, stock_now) = (observe_ours(&m), observe_stock(&r));
        assert_eq!(
            ours_now.1, stock_now.1,
            "{what}: positions differ from stock"
        );
        assert!(
            ours_now.0 == stock_now.0,
            "{what}: state bytes differ from stock"
        );
        compared += 1;
        if !ok_ours {
            failures += 1;
            if ours_now.0 != base {
                erased += 1;
            }
        }
    }
    eprintln!(
        "{compared} restores compared with stock: {failures} failed, {erased} of them erased; \
         {skipped} inputs that stock restores in part not compared"
    );
    assert!(
        erased > 100 && failures > erased,
        "both effects (erase, nothing) exercised"
    );
}

#[test]
fn without_stock_compatible_mode_a_failed_restore_changes_nothing() {
    let (mut m, mut r) = pair();
    let base = setup(&mut m, &mut r, 5);
    let blob = write(&m, 0);
    for dest in [1, -1] {
        for cut in 0..blob.len() {
            assert!(!read(&mut m, dest, &blob[..cut]));
            assert!(
                write(&m, -1) == base,
                "cut at {cut} into {dest} changed the memory"
            );
        }
    }
}
