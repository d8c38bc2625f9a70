//! The random-trace generator of the KV differential suites (`tests/kv_differential.rs`,
//! `tests/kv_slot_differential.rs`): ubatches shaped as llama.cpp's split shapes them for a
//! cache, with positions that usually continue each sequence, drawn from the suite's seeded
//! RNG. Each suite keeps its own operations and comparisons; a [`Shape`] holds what differs
//! between their traces.

use std::ops::{Range, RangeInclusive};

use llama_memory_reference as stock;
use rand::rngs::StdRng;
use rand::seq::index::sample;
use rand::Rng;

/// How a unified ubatch of at most 3 sequences picks them (more are always distinct, sorted,
/// and each gets at least one token).
#[allow(dead_code)] // each suite builds one of them
pub enum FewSeqs {
    /// Each drawn on its own, so one may come twice.
    Drawn,
    /// Distinct, in the order drawn.
    Distinct,
}

/// How a token of a unified ubatch comes to belong to more than one sequence (a common prefix
/// decoded once).
#[allow(dead_code)] // each suite builds one of them
pub enum Shared {
    /// With probability `p`, one more sequence.
    One { p: f64 },
    /// With probability `p`, 1 to `seqs - 1` more (at most `n_seq_max - 1`).
    UpTo { p: f64, seqs: u32 },
}

/// What one configuration's traces look like.
pub struct Shape {
    pub n_seq_max: u32,
    /// One stream: a ubatch mixes sequences token by token (the simple split); else each is an
    /// equal split over consecutive sequences.
    pub unified: bool,
    /// M-RoPE: four positions a token, and a position sometimes repeated (images).
    pub mrope: bool,
    /// Sequences often start near `i32::MAX`.
    pub near_max: bool,
    /// Token counts are usually 1 to 5 (sparse large caches).
    pub few_tokens: bool,
    /// Most sequences in a unified ubatch.
    pub ub_seqs: u32,
    pub few_seqs: FewSeqs,
    pub shared: Shared,
    /// Token counts of a large (1 in 10) and a medium (2 in 10) ubatch; the others have 1 to 7.
    pub large: RangeInclusive<usize>,
    pub medium: Range<usize>,
}

/// A ubatch shaped as llama.cpp's split for this cache shapes it. `cursor` holds each
/// sequence's next position (`i32::MIN`: not started in this batch); `pos_max` gives a
/// sequence's highest position in the cache (negative when it has none).
pub fn gen_ubatch(
    rng: &mut StdRng,
    shape: &Shape,
    cursor: &mut [i32],
    pos_max: impl Fn(i32) -> i32,
) -> stock::Ubatch {
    let n_seq = shape.n_seq_max as i32;
    let mut ub = if shape.unified {
        let k = rng.gen_range(1..=n_seq.min(shape.ub_seqs as i32)) as usize;
        let seqs: Vec<i32> = match shape.few_seqs {
            _ if k > 3 => {
                let mut v: Vec<i32> = sample(rng, n_seq as usize, k)
                    .into_iter()
                    .map(|s| s as i32)
                    .collect();
                v.sort_unstable();
                v
            }
            FewSeqs::Drawn => (0..k).map(|_| rng.gen_range(0..n_seq)).collect(),
            FewSeqs::Distinct => sample(rng, n_seq as usize, k)
                .into_iter()
                .map(|s| s as i32)
                .collect(),
        };
        // With many sequences every one of them gets at least one token.
        let n = if k > 3 {
            token_count(rng, shape).max(k)
        } else {
            token_count(rng, shape)
        };
        let mut seq_ids = Vec::with_capacity(n);
        let mut pos = Vec::with_capacity(n);
        for i in 0..n {
            let s = if k > 3 && i < k {
                seqs[i]
            } else {
                seqs[rng.gen_range(0..seqs.len())]
            };
            let mut ids = vec![s];
            match shape.shared {
                Shared::One { p } => {
                    if n_seq > 1 && rng.gen_bool(p) {
                        let other = (s + 1 + rng.gen_range(0..n_seq - 1)) % n_seq;
                        ids.push(other);
                    }
                }
                Shared::UpTo { p, seqs } => {
                    if n_seq > 1 && rng.gen_bool(p) {
                        let most = (seqs as i32).min(n_seq) - 1;
                        let extra = rng.gen_range(1..=most);
                        for _ in 0..extra {
                            let other = (s + 1 + rng.gen_range(0..n_seq - 1)) % n_seq;
                            if !ids.contains(&other) {
                                ids.push(other);
                            }
                        }
                    }
                }
            }
            pos.push(next_positions(rng, shape, s, 1, cursor, &pos_max)[0]);
            seq_ids.push(ids);
        }
        let tokens = (0..n).map(|_| rng.gen_range(0..32)).collect();
        stock::Ubatch::simple(tokens, pos, seq_ids)
    } else {
        let k = rng.gen_range(1..=n_seq);
        let first = rng.gen_range(0..=n_seq - k);
        let per = (token_count(rng, shape) / k as usize).max(1) as u32;
        let mut sets = Vec::new();
        let mut pos = Vec::new();
        for s in first..first + k {
            let p = next_positions(rng, shape, s, per as usize, cursor, &pos_max);
            sets.push((s, p[0]));
            pos.extend(p);
        }
        let mut ub = stock::Ubatch::equal(&sets, per);
        ub.pos = pos;
        ub.tokens = (0..ub.n_tokens()).map(|_| rng.gen_range(0..32)).collect();
        ub
    };
    if shape.mrope {
        // Sections: y then x then an unused one (llama.cpp's M-RoPE layout).
        let n = ub.n_tokens() as usize;
        let mut pos = ub.pos.clone();
        pos.extend((0..n).map(|_| rng.gen_range(0..4)));
        pos.extend((0..n).map(|_| rng.gen_range(0..4)));
        pos.extend(std::iter::repeat_n(0, n));
        ub.pos = pos;
        ub.n_pos = 4;
    }
    if rng.gen_bool(0.1) {
        ub.tokens.clear(); // embeddings: no token ids, ext untouched unless 2-D
    }
    ub
}

/// Positions for `n` new tokens of `seq`: usually continuing the sequence, sometimes
/// anywhere (gaps, repeats), as restored or multimodal inputs produce.
fn next_positions(
    rng: &mut StdRng,
    shape: &Shape,
    seq: i32,
    n: usize,
    cursor: &mut [i32],
    pos_max: &impl Fn(i32) -> i32,
) -> Vec<i32> {
    if cursor[seq as usize] == i32::MIN {
        let max = pos_max(seq);
        cursor[seq as usize] = if max >= 0 && rng.gen_bool(0.9) {
            max.saturating_add(1)
        } else if shape.near_max && rng.gen_bool(0.6) {
            i32::MAX - rng.gen_range(0..600)
        } else {
            rng.gen_range(0..300)
        };
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(cursor[seq as usize]);
        // Images in M-RoPE models repeat a position over several tokens; a sequence that
        // reached i32::MAX stays there.
        if !(shape.mrope && rng.gen_bool(0.3)) {
            cursor[seq as usize] = cursor[seq as usize].saturating_add(1);
        }
    }
    out
}

fn token_count(rng: &mut StdRng, shape: &Shape) -> usize {
    if shape.few_tokens && rng.gen_bool(0.8) {
        return rng.gen_range(1..6);
    }
    match rng.gen_range(0..10) {
        0 => rng.gen_range(shape.large.clone()),
        1 | 2 => rng.gen_range(shape.medium.clone()),
        _ => rng.gen_range(1..8),
    }
}
