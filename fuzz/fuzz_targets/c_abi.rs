//! Untrusted input through the C ABI itself: state blobs and whole states, ubatch descriptions
//! with arbitrary counts and ids (in arrays as large as they claim), and the llama.h functions
//! with arbitrary arguments, on a handle with tensors. A failed state read must leave the
//! memory's state unchanged; nothing may crash.
#![no_main]
use libfuzzer_sys::fuzz_target;
use llama_memory::ffi::*;

struct Bytes<'a>(&'a [u8]);
impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }
    fn i32(&mut self) -> i32 {
        i32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
}

fn whole_state(mem: llama_memory_t) -> Vec<u8> {
    let n = llama_memory_state_get_size(mem);
    let mut v = vec![0u8; n];
    let w = llama_memory_state_get_data(mem, v.as_mut_ptr(), n);
    v.truncate(w);
    v
}

fn memory() -> llama_memory_t {
    let mut p = llama_memory_kv_default_params();
    p.size = 64;
    p.n_seq_max = 3;
    let layers = [
        llama_memory_kv_layer {
            il: 0,
            n_embd_k_gqa: 32,
            n_embd_v_gqa: 32,
            reuse: -1,
            buft: std::ptr::null_mut(),
        },
        llama_memory_kv_layer {
            il: 1,
            n_embd_k_gqa: 32,
            n_embd_v_gqa: 32,
            reuse: -1,
            buft: std::ptr::null_mut(),
        },
    ];
    let mut sp = llama_memory_kv_storage_default_params();
    sp.layers = layers.as_ptr();
    sp.n_layers = layers.len();
    llama_memory_kv_init_with_storage(p, &sp)
}

fn ubatch(mem: llama_memory_t, b: &mut Bytes<'_>) {
    let n = (b.u8() % 16 + 1) as usize;
    let n_pos = (b.u8() % 6) as u32;
    let n_unq = (b.u8() % 5) as usize;
    let pos: Vec<i32> = (0..n * 4).map(|_| b.i32() % 300).collect();
    let n_seq_id: Vec<i32> = (0..n).map(|_| (b.u8() % 4) as i32).collect();
    let ids: Vec<Vec<i32>> = (0..n)
        .map(|_| (0..3).map(|_| (b.u8() % 6) as i32 - 1).collect())
        .collect();
    let ptrs: Vec<*const i32> = ids.iter().map(|v| v.as_ptr()).collect();
    let mut unq: Vec<i32> = (0..n_unq.max(1)).map(|_| (b.u8() % 6) as i32 - 1).collect();
    if b.u8() & 1 == 0 {
        unq.sort_unstable();
        unq.dedup();
    }
    let seq_idx: Vec<i32> = (0..256)
        .map(|s| unq.iter().position(|&u| u == s).map_or(-1, |k| k as i32))
        .collect();
    let toks: Vec<i32> = (0..n as i32).collect();
    let (n_seqs, n_seq_tokens) = if b.u8() & 1 == 0 {
        (n as u32, 1)
    } else {
        (1, n as u32)
    };
    let ub = llama_memory_ubatch {
        n_tokens: n as u32,
        n_seq_tokens,
        n_seqs,
        n_seqs_unq: unq.len().min(n_unq.max(1)) as u32,
        n_pos,
        equal_seqs: 0,
        token: toks.as_ptr(),
        pos: pos.as_ptr(),
        n_seq_id: n_seq_id.as_ptr(),
        seq_id: ptrs.as_ptr(),
        seq_id_unq: unq.as_ptr(),
        seq_idx: if b.u8() & 1 == 0 {
            seq_idx.as_ptr()
        } else {
            std::ptr::null()
        },
        output: std::ptr::null(),
        type_: std::ptr::null(),
    };
    let ctx = llama_memory_init_batch(mem, &ub, 1);
    if ctx.is_null() {
        return;
    }
    if llama_memory_ctx_get_status(ctx) == LLAMA_MEMORY_CTX_SUCCESS
        && llama_memory_ctx_apply(ctx) as u32 == 0
    {
        let n_kv = llama_memory_ctx_get_n_kv(ctx);
        let mut mask = vec![0f32; n_kv as usize * n];
        llama_memory_ctx_set_input_kq_mask(
            ctx,
            b.u8() & 1 == 0,
            n_kv,
            1,
            false,
            mask.as_mut_ptr().cast(),
            mask.len(),
        );
        let mut idx = vec![0i64; n * 64];
        llama_memory_ctx_set_input_k_idxs(ctx, idx.as_mut_ptr(), idx.len());
        llama_memory_ctx_set_input_v_idxs(ctx, idx.as_mut_ptr(), idx.len());
    }
    llama_memory_ctx_free(ctx);
}

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes(data);
    let mem = memory();
    for _ in 0..8 {
        if b.0.is_empty() {
            break;
        }
        match b.u8() % 5 {
            k @ (0 | 1) => {
                let len = (b.u8() as usize * 8).min(b.0.len());
                let (blob, rest) = b.0.split_at(len);
                b.0 = rest;
                let before = whole_state(mem);
                let read = if k == 0 {
                    let dest = (b.u8() % 6) as i32 - 1;
                    llama_memory_state_seq_set_data_ext(
                        mem,
                        blob.as_ptr(),
                        blob.len(),
                        dest,
                        (b.u8() % 4) as u32,
                    )
                } else {
                    llama_memory_state_set_data(mem, blob.as_ptr(), blob.len())
                };
                if read == 0 {
                    assert!(
                        whole_state(mem) == before,
                        "a failed read changed the memory"
                    );
                }
            }
            2 | 3 => ubatch(mem, &mut b),
            _ => {
                let (s, d) = ((b.u8() % 6) as i32 - 1, (b.u8() % 6) as i32 - 1);
                let (p0, p1) = (b.i32(), b.i32());
                match b.u8() % 8 {
                    0 => drop(llama_memory_seq_rm(mem, s, p0, p1)),
                    1 => llama_memory_seq_cp(mem, s, d, p0, p1),
                    2 => llama_memory_seq_keep(mem, s),
                    3 => llama_memory_seq_add(mem, s, p0, p1, b.i32() % 1000),
                    4 => llama_memory_seq_div(mem, s, p0, p1, (b.u8() % 4) as i32),
                    5 => drop(llama_memory_seq_pos_min(mem, s) + llama_memory_seq_pos_max(mem, s)),
                    6 => {
                        let u = llama_memory_init_update(mem, false);
                        llama_memory_ctx_apply(u);
                        llama_memory_ctx_free(u);
                    }
                    _ => llama_memory_clear(mem, b.u8() & 1 == 0),
                }
            }
        }
    }
    llama_memory_free(mem);
});
