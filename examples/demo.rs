//! A multi-sequence serving workload on a small KV cache, printing what happens to the cells:
//! a shared system prompt copied to four sequences, parallel decoding steps, a context shift,
//! a finished sequence removed, and the K-shift applied.
//!
//! Run: `cargo run --example demo`

use llama_memory::{KvCache, KvParams, MemoryContext, UbatchBuf};

const N_SEQ: i32 = 4;

fn main() -> Result<(), llama_memory::Error> {
    let mut kv = KvCache::new(KvParams {
        size: 64,
        n_seq_max: N_SEQ as u32,
        ..KvParams::default()
    })?;
    println!(
        "unified KV cache: {} cells, {} sequences",
        kv.size(),
        kv.n_seq_max()
    );
    println!("legend: '.' empty, 0-9 one sequence, '*' shared by several\n");

    // 1. The shared system prompt: 12 tokens of sequence 0.
    let prompt: Vec<i32> = (0..12).collect();
    decode(&mut kv, &[(0, &prompt)])?;
    show(&kv, "prompt: 12 tokens of seq 0");

    // 2. Every other sequence starts from the same prefix: metadata only, no new cells.
    for s in 1..N_SEQ {
        kv.seq_cp(0, s, -1, -1)?;
    }
    show(&kv, "seq_cp 0 -> 1, 2, 3 (shared prefix)");

    // 3. Parallel decoding: one token per sequence per step.
    for _ in 0..6 {
        let next: Vec<(i32, i32)> = (0..N_SEQ)
            .map(|s| (s, kv.seq_pos_max(s).unwrap() + 1))
            .collect();
        let ub = UbatchBuf::new(
            &next.iter().map(|&(s, _)| 1000 + s).collect::<Vec<_>>(),
            &next.iter().map(|&(_, p)| p).collect::<Vec<_>>(),
            &next
                .iter()
                .map(|(s, _)| std::slice::from_ref(s))
                .collect::<Vec<_>>(),
        );
        run_batch(&mut kv, vec![ub])?;
    }
    show(&kv, "6 decoding steps, 4 sequences each");

    // 4. Context shift on sequence 1 (as llama.cpp's examples do when the context fills):
    //    keep the prompt (n_keep = 12), drop the next 3 positions, slide the rest back by 3.
    //    A shift moves whole cells, so the shared prompt must be kept: shifting a shared cell
    //    would move it for every sequence that shares it (llama.cpp's semantics).
    let (n_keep, n_discard) = (12, 3);
    let n_past = kv.seq_pos_max(1)? + 1;
    kv.seq_rm(1, n_keep, n_keep + n_discard)?;
    kv.seq_add(1, n_keep + n_discard, n_past, -n_discard)?;
    show(
        &kv,
        "context shift of seq 1: rm [12, 15), add -3 to [15, 18)",
    );

    // 5. Sequence 2 finished: its cells that nobody else uses become free.
    kv.seq_rm(2, -1, -1)?;
    show(&kv, "seq 2 removed");

    // 6. The next decode first applies the pending K-shift.
    let mut update = kv.init_update()?;
    println!("update status: {:?}", update.status());
    update.apply_to(&mut kv, None)?;
    show(&kv, "K-shift applied");

    // 7. A new request on the freed cells.
    let ub = UbatchBuf::new(&[7, 8, 9], &[0, 1, 2], &[&[2], &[2], &[2]]);
    run_batch(&mut kv, vec![ub])?;
    show(&kv, "new request in seq 2: 3 tokens reuse the freed cells");
    Ok(())
}

/// Places one prompt per (sequence, tokens) pair, starting after the sequence's last position.
fn decode(kv: &mut KvCache, reqs: &[(i32, &[i32])]) -> Result<(), llama_memory::Error> {
    let mut ubs = Vec::new();
    for &(s, toks) in reqs {
        let p0 = kv.seq_pos_max(s)? + 1;
        let pos: Vec<i32> = (p0..p0 + toks.len() as i32).collect();
        let seqs: Vec<&[i32]> = toks.iter().map(|_| std::slice::from_ref(&s)).collect();
        ubs.push(UbatchBuf::new(toks, &pos, &seqs));
    }
    run_batch(kv, ubs)
}

/// Plans the ubatches, then applies them one by one, as llama.cpp's decode loop does.
fn run_batch(kv: &mut KvCache, ubs: Vec<UbatchBuf>) -> Result<(), llama_memory::Error> {
    let views: Vec<_> = ubs.iter().map(UbatchBuf::view).collect();
    let mut ctx = kv.init_batch(&views, None)?;
    if ctx.status() != llama_memory::Status::Success {
        println!("batch does not fit: {:?}", ctx.status());
        return Ok(());
    }
    loop {
        ctx.apply_to(kv, None)?;
        if !ctx.next() {
            return Ok(());
        }
    }
}

fn show(kv: &KvCache, what: &str) {
    let cells = kv.cells(0);
    let map: String = (0..kv.size())
        .map(|i| match cells.seq_count(i) {
            _ if cells.is_empty(i) => '.',
            1 => char::from_digit(cells.seq_get(i) as u32, 10).unwrap_or('?'),
            _ => '*',
        })
        .collect();
    println!("== {what}");
    println!("   cells [{map}]  used {}", cells.get_used());
    for s in 0..N_SEQ {
        let (lo, hi) = (kv.seq_pos_min(s).unwrap(), kv.seq_pos_max(s).unwrap());
        if hi >= 0 {
            let shifted = (0..kv.size())
                .filter(|&i| !cells.is_empty(i) && cells.seq_has(i, s) && cells.get_shift(i) != 0)
                .count();
            println!(
                "   seq {s}: positions {lo}..={hi}, {} cells, {shifted} with a pending shift",
                cells.seq_len(s)
            );
        } else {
            println!("   seq {s}: empty");
        }
    }
    println!();
}
