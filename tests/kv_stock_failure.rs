//! llama.cpp's effect of a failed KV restore, which this library reproduces in stock-compatible
//! mode (`Memory::set_stock_compat`, what the drop-in libllama turns on), against stock
//! `llama_kv_cache::state_read` on the tiny model: the same blobs, cut at every byte and with a
//! wrong stream count or cell count, restored into a sequence and as a whole, on a unified and
//! on a two-stream cache. After each attempt both caches must agree on success, on every cell
//! (position and sequences) and on the whole state's bytes (which hold the K/V rows of every
//! used cell). Off stock-compatible mode, the same failures change nothing.
//!
//! Where llama.cpp fails after restoring part of the input (a cut inside a later stream's cell
//! count), this library restores nothing: those inputs are not compared (see
//! `half_restored_by_stock`).

use llama_memory::io::StateIn;
use llama_memory::{KvMemory, Memory};
use llama_memory_reference::{Params, RefKv};

#[path = "common/failure.rs"]
mod failure;
#[path = "common/tiny_kv.rs"]
mod tiny_kv;
use tiny_kv::{ours, place, randomize, state_bytes as write, SIZE};

fn read(m: &mut KvMemory, seq: i32, blob: &[u8]) -> bool {
    m.state_read(seq, &mut StateIn::new(blob)).is_ok()
}

/// Every cell of every stream (position and sequence set) and the whole state's bytes.
type Seen = (Vec<(i32, [u64; 4])>, Vec<u8>);

struct KvPair {
    m: KvMemory,
    r: RefKv,
    base: Vec<u8>,
}

impl failure::Pair for KvPair {
    type Seen = Seen;
    fn reset(&mut self) {
        assert!(read(&mut self.m, -1, &self.base));
        assert!(self.r.state_read(-1, 0, &self.base).is_some());
    }
    fn read_ours(&mut self, dest: i32, input: &[u8]) -> bool {
        read(&mut self.m, dest, input)
    }
    fn read_stock(&mut self, dest: i32, input: &[u8]) -> bool {
        self.r.state_read(dest, 0, input).is_some()
    }
    fn seen(&self) -> (Seen, Seen) {
        let mut ours = Vec::new();
        for s in 0..self.m.cache.n_stream() {
            let c = self.m.cache.cells(s);
            for i in 0..SIZE {
                let mut w = [0u64; 4];
                w.copy_from_slice(c.seq_get_all(i).as_raw_slice());
                ours.push((c.pos_get(i), w));
            }
        }
        let mut stock = Vec::new();
        for s in 0..self.r.n_stream() {
            let c = self.r.cells(s);
            for i in 0..SIZE as usize {
                let pos = if c.seq[i] == [0; 4] { -1 } else { c.pos[i] };
                stock.push((pos, c.seq[i]));
            }
        }
        (
            (ours, write(&self.m, -1)),
            (stock, self.r.state_write(-1, 0)),
        )
    }
    fn changed(&self) -> bool {
        write(&self.m, -1) != self.base
    }
}

/// Inputs stock restores in part before it fails: a whole state cut inside a stream's cells
/// (the cells read so far stay, some without their sequences) or, on a two-stream cache,
/// inside stream 1's cell count (stream 0 stays restored); a sequence state cut inside its
/// trailing empty stream's count (the sequence stays restored, and the call fails).
/// `s1_at`: where stream 1's count starts in a whole blob (`usize::MAX` for one stream).
fn half_restored_by_stock(dest: i32, cut: usize, blob: &[u8], s1_at: usize) -> bool {
    let u32_at = |at: usize| u32::from_le_bytes(blob[at..at + 4].try_into().unwrap()) as usize;
    if dest != -1 {
        return s1_at != usize::MAX && cut + 4 >= blob.len();
    }
    // every cell here has one sequence: pos, n_seq_id, seq_id
    let mut metas = vec![(8, 8 + 12 * u32_at(4))];
    if s1_at != usize::MAX {
        metas.push((s1_at + 4, s1_at + 4 + 12 * u32_at(s1_at)));
    }
    for &(a, e) in &metas {
        for c in (a..e).step_by(12) {
            assert_eq!(u32_at(c + 4), 1, "a cell with more than one sequence");
        }
    }
    (s1_at != usize::MAX && cut >= s1_at && cut < s1_at + 4)
        || metas.iter().any(|&(a, e)| cut >= a && cut < e)
}

#[test]
fn a_failed_restore_has_stocks_effect_in_stock_compatible_mode() {
    let mut tally = failure::Tally::default();
    for unified in [true, false] {
        for v_trans in [false, true] {
            let mut m = ours(unified, v_trans);
            m.set_stock_compat(true);
            let mut r = RefKv::tiny(&Params {
                kv_size: SIZE,
                n_seq_max: 2,
                unified,
                v_trans,
                ..Params::default()
            });
            // seq 0 in cells 0..5, seq 1 in 5..8 (or its own stream), then a longer seq 0
            // state written and seq 0 moved on so the restores have something to replace.
            place(&mut m, &mut r, 0, 0, 5);
            place(&mut m, &mut r, 1, 0, 3);
            randomize(&mut m, 7, Some(&mut r));
            let seq_blob = write(&m, 0);
            assert_eq!(seq_blob, r.state_write(0, 0), "the stock blob differs");
            let whole_blob = write(&m, -1);
            place(&mut m, &mut r, 0, 5, 2);
            place(&mut m, &mut r, 1, 3, 4);
            let base = write(&m, -1);
            assert_eq!(base, r.state_write(-1, 0));
            // where stream 1's cell count starts in the whole blob (two streams): n_stream,
            // then stream 0 = seq 0's blob after its n_stream, without its empty stream 1
            let s1_at = if unified {
                usize::MAX
            } else {
                4 + (seq_blob.len() - 8)
            };
            let mut inputs: Vec<failure::Input> = Vec::new();
            for (dest, blob) in [(1, &seq_blob), (-1, &whole_blob)] {
                inputs.extend(failure::cuts(dest, blob));
                let mut bad_streams = blob.clone();
                bad_streams[0] = 3;
                inputs.push((dest, bad_streams, None));
                let mut too_many = blob.clone();
                too_many[4..8].copy_from_slice(&(SIZE + 1).to_le_bytes());
                inputs.push((dest, too_many, None));
            }
            let skip = |(dest, _, cut): &failure::Input| {
                let full = if *dest == -1 { &whole_blob } else { &seq_blob };
                cut.is_some_and(|c| half_restored_by_stock(*dest, c, full, s1_at))
            };
            let what = format!("unified {unified}, v_trans {v_trans}");
            failure::compare(&mut KvPair { m, r, base }, &inputs, skip, &what, &mut tally);
        }
    }
    eprintln!("stock-compatible KV restores: {tally:?}");
    assert!(
        tally.erased > 1000 && tally.failures > tally.erased,
        "both effects (erase, nothing) exercised"
    );
}

#[test]
fn without_stock_compatible_mode_a_failed_restore_changes_nothing() {
    for unified in [true, false] {
        let mut m = ours(unified, true);
        let mut r = RefKv::tiny(&Params {
            kv_size: SIZE,
            n_seq_max: 2,
            unified,
            v_trans: true,
            ..Params::default()
        });
        place(&mut m, &mut r, 0, 0, 5);
        place(&mut m, &mut r, 1, 0, 3);
        randomize(&mut m, 9, Some(&mut r));
        let blob = write(&m, 0);
        let base = write(&m, -1);
        for dest in [1, -1] {
            for cut in 0..blob.len() {
                assert!(!read(&mut m, dest, &blob[..cut]));
                assert!(
                    write(&m, -1) == base,
                    "cut at {cut} into {dest} changed the cache"
                );
            }
        }
    }
}
