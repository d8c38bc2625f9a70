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
use llama_memory::recurrent::RecurrentMemory;
use llama_memory::{Memory, UbatchBuf};
use llama_memory_reference as stock;
use rand::{Rng, SeedableRng};

#[path = "common/failure.rs"]
mod failure;
#[path = "common/rs_like.rs"]
mod rs_like;

const N_SEQ: u32 = 3;

fn pair() -> (RecurrentMemory, stock::RefRs) {
    let model = stock::mamba_model_path();
    let r = stock::RefRs::new(&model, &stock::RsParams::for_seqs(N_SEQ, 0))
        .expect("stock llama_memory_recurrent");
    (rs_like::ours_like(&model, N_SEQ, 0), r)
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

/// The whole state's bytes, every sequence's positions, and every R and S tensor's bytes (the
/// rows of free cells included: llama.cpp zeroes the rows a failed restore had placed).
type Seen = (Vec<u8>, Vec<(i32, i32)>, Vec<u8>);

fn tensors_ours(m: &RecurrentMemory) -> Vec<u8> {
    let st = m.storage.as_ref().unwrap();
    let mut out = Vec::new();
    for l in st.layers() {
        for t in [l.r, l.s] {
            // SAFETY: our own live tensor.
            let mut b = vec![0u8; unsafe { ggml_sys::ggml_nbytes(t) }];
            st.get(t, 0, &mut b).unwrap();
            out.extend(b);
        }
    }
    out
}

fn tensors_stock(r: &stock::RefRs, m: &RecurrentMemory) -> Vec<u8> {
    let mut out = Vec::new();
    for l in m.storage.as_ref().unwrap().layers() {
        out.extend(r.r_bytes(l.il));
        out.extend(r.s_bytes(l.il));
    }
    out
}

struct RsPair {
    m: RecurrentMemory,
    r: stock::RefRs,
    base: Vec<u8>,
}

impl failure::Pair for RsPair {
    type Seen = Seen;
    fn reset(&mut self) {
        assert!(read(&mut self.m, -1, &self.base));
        assert!(self.r.state_read(-1, 0, &self.base));
    }
    fn read_ours(&mut self, dest: i32, input: &[u8]) -> bool {
        read(&mut self.m, dest, input)
    }
    fn read_stock(&mut self, dest: i32, input: &[u8]) -> bool {
        self.r.state_read(dest, 0, input)
    }
    fn seen(&self) -> (Seen, Seen) {
        let (m, r) = (&self.m, &self.r);
        let ours = (0..N_SEQ as i32)
            .map(|s| (m.seq_pos_min(s).unwrap(), m.seq_pos_max(s).unwrap()))
            .collect();
        let stock = (0..N_SEQ as i32)
            .map(|s| (r.seq_pos_min(s), r.seq_pos_max(s)))
            .collect();
        (
            (write(m, -1), ours, tensors_ours(m)),
            (r.state_write(-1, 0), stock, tensors_stock(r, m)),
        )
    }
    fn changed(&self) -> bool {
        write(&self.m, -1) != self.base
    }
    fn explain(&self, ours: &Seen, stock: &Seen) -> String {
        let first = |a: &[u8], b: &[u8]| a.iter().zip(b).position(|(x, y)| x != y);
        let row = self.m.storage.as_ref().unwrap().layers()[0].row_r;
        format!(
            "state bytes equal: {}, positions {:?} vs {:?}, tensor bytes: first difference at {:?} of {} (R rows of {row} bytes)",
            ours.0 == stock.0,
            ours.1,
            stock.1,
            first(&ours.2, &stock.2),
            ours.2.len()
        )
    }
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
    let mut inputs: Vec<failure::Input> = Vec::new();
    for (dest, blob) in [(1, &seq_blob), (2, &seq_blob), (-1, &base)] {
        inputs.extend(failure::cuts(dest, blob));
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
    let skip = |(dest, _, cut): &failure::Input| {
        *dest == -1 && cut.is_some_and(|c| c > 4 && c < cells_end)
    };
    let mut tally = failure::Tally::default();
    let mut pair = RsPair { m, r, base };
    failure::compare(&mut pair, &inputs, skip, "mamba", &mut tally);
    eprintln!("stock-compatible recurrent restores: {tally:?}");
    assert!(
        tally.erased > 100 && tally.failures > tally.erased,
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
