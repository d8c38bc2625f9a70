//! The driver of the stock-failure suites (`kv_stock_failure`, `recurrent_stock_failure`):
//! restore each input on ours (in stock-compatible mode) and on stock from the same starting
//! state, and require the same success and the same observable memory afterwards. Included with
//! `#[path = "common/failure.rs"] mod failure;`.

#![allow(dead_code)]

/// An input: the destination (-1: whole), the bytes, and where a valid blob was cut (`None`
/// for a corrupted one).
pub type Input = (i32, Vec<u8>, Option<usize>);

/// Ours and stock over the same memory.
pub trait Pair {
    /// What is compared after each attempt (cells, positions, state bytes...).
    type Seen: PartialEq + std::fmt::Debug;
    /// Both sides back to the starting state.
    fn reset(&mut self);
    /// Restores `input` into `dest` on ours; success.
    fn read_ours(&mut self, dest: i32, input: &[u8]) -> bool;
    /// Restores `input` into `dest` on stock; success.
    fn read_stock(&mut self, dest: i32, input: &[u8]) -> bool;
    /// What ours and stock hold now.
    fn seen(&self) -> (Self::Seen, Self::Seen);
    /// Where the two differ (for the failure message).
    fn explain(&self, _ours: &Self::Seen, _stock: &Self::Seen) -> String {
        String::new()
    }
    /// Whether ours differs from the starting state.
    fn changed(&self) -> bool;
}

/// What a run compared.
#[derive(Debug, Default)]
pub struct Tally {
    /// Inputs restored on both sides and compared.
    pub compared: usize,
    /// Of those, the failed restores.
    pub failures: usize,
    /// Of the failures, those that changed the memory (an erase).
    pub erased: usize,
    /// Inputs `skip` left out.
    pub skipped: usize,
}

/// Runs every input not skipped on both sides from the starting state; panics at the first
/// difference, naming `what` and the input.
pub fn compare<P: Pair>(
    pair: &mut P,
    inputs: &[Input],
    skip: impl Fn(&Input) -> bool,
    what: &str,
    tally: &mut Tally,
) {
    for input in inputs {
        if skip(input) {
            tally.skipped += 1;
            continue;
        }
        let (dest, bytes, cut) = input;
        pair.reset();
        let ok_ours = pair.read_ours(*dest, bytes);
        let ok_stock = pair.read_stock(*dest, bytes);
        let what = format!(
            "{what}, dest {dest}, {} bytes{}",
            bytes.len(),
            cut.map_or(" (corrupted)".into(), |c| format!(" (cut at {c})"))
        );
        assert_eq!(ok_ours, ok_stock, "{what}: success differs from stock");
        let (ours, stock) = pair.seen();
        assert!(
            ours == stock,
            "{what}: the memory differs from stock: {}",
            pair.explain(&ours, &stock)
        );
        tally.compared += 1;
        if !ok_ours {
            tally.failures += 1;
            if pair.changed() {
                tally.erased += 1;
            }
        }
    }
}

/// Every cut of `blob` into `dest`.
pub fn cuts(dest: i32, blob: &[u8]) -> impl Iterator<Item = Input> + '_ {
    (0..blob.len()).map(move |c| (dest, blob[..c].to_vec(), Some(c)))
}
