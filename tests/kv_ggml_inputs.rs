//! Graph inputs written into host ggml tensors through the C ABI, compared with what stock
//! llama.cpp's `set_input_*` write for the same cache state; and the tensor checks (type,
//! shape, NULL) that guard those entry points.

use std::ptr;

use ggml_sys as g;
use llama_memory::ffi::error::llama_memory_clear_last_error;
use llama_memory::ffi::error::llama_memory_result::{self, *};
use llama_memory::ffi::*;
use llama_memory_reference as stock;

#[path = "common/host.rs"]
mod host;
use host::{c_ubatch, tensor_read, Host};

/// Places `ub` on both sides (ours through the C ABI); returns our applied context and
/// stock's slot.
fn place(
    mem: llama_memory_t,
    theirs: &mut stock::RefKv,
    ub: &stock::Ubatch,
) -> (llama_memory_ctx_t, stock::Slot) {
    let v = ub.view();
    let slot = theirs.prepare(&[ub.view()]).expect("stock slot")[0].clone();
    theirs.apply_ubatch(&slot, &v);
    let cu = c_ubatch(v.raw());
    let ctx = llama_memory_init_batch(mem, &cu, 1);
    assert!(!ctx.is_null());
    assert_eq!(llama_memory_ctx_get_status(ctx), LLAMA_MEMORY_CTX_SUCCESS);
    assert_eq!(llama_memory_ctx_apply(ctx), LLAMA_MEMORY_OK);
    (ctx, slot)
}

#[test]
fn tensor_inputs_match_stock() {
    std::env::set_var("KVREF_QUIET", "1");
    let sp = stock::Params {
        kv_size: 256,
        n_seq_max: 2,
        unified: true,
        v_trans: true,
        n_rel_attn_bkts: 32,
        ..stock::Params::default()
    };
    let mut theirs = stock::RefKv::tiny(&sp);
    let mut p = llama_memory_kv_default_params();
    p.n_seq_max = 2;
    p.n_embd_v_gqa_max = theirs.n_embd_v_gqa_max();
    p.n_rel_attn_bkts = 32;
    let mem = llama_memory_kv_init(p);
    assert!(!mem.is_null());

    let (c0, _) = place(mem, &mut theirs, &stock::Ubatch::for_seq(0, 0, 10));
    llama_memory_ctx_free(c0);
    llama_memory_seq_add(mem, 0, 4, -1, 3);
    theirs.seq_add(0, 4, -1, 3);
    let ub = stock::Ubatch::simple(
        vec![5, 6, 7],
        vec![0, 1, 13],
        vec![vec![1], vec![1], vec![0]],
    );
    let (ctx, slot) = place(mem, &mut theirs, &ub);
    let n_kv = llama_memory_ctx_get_n_kv(ctx);
    let nt = ub.n_tokens() as i64;
    let e = theirs.n_embd_v_gqa_max() as i64;
    let (_host, t) = Host::new(&[
        (g::GGML_TYPE_F32, [n_kv as i64, nt, 1, 1]),
        (g::GGML_TYPE_F16, [n_kv as i64, nt, 1, 1]),
        (g::GGML_TYPE_I64, [nt, 1, 1, 1]),
        (g::GGML_TYPE_I64, [nt * e, 1, 1, 1]),
        (g::GGML_TYPE_I32, [n_kv as i64, nt, 1, 1]),
        (g::GGML_TYPE_I32, [256, 1, 1, 1]),
    ]);
    let v = ub.view();
    assert_eq!(
        llama_memory_ctx_set_input_kq_mask_tensor(ctx, t[0], true),
        LLAMA_MEMORY_OK
    );
    let got: Vec<u32> = tensor_read::<f32>(t[0])
        .iter()
        .map(|x| x.to_bits())
        .collect();
    let want: Vec<u32> = theirs
        .kq_mask_f32(&v, true, n_kv, 1)
        .iter()
        .map(|x| x.to_bits())
        .collect();
    assert_eq!(got, want, "f32 mask");
    assert_eq!(
        llama_memory_ctx_set_input_kq_mask_tensor(ctx, t[1], false),
        LLAMA_MEMORY_OK
    );
    assert_eq!(
        tensor_read::<u16>(t[1]),
        theirs.kq_mask_f16(&v, false, n_kv, 1),
        "f16 mask"
    );
    assert_eq!(
        llama_memory_ctx_set_input_k_idxs_tensor(ctx, t[2]),
        LLAMA_MEMORY_OK
    );
    assert_eq!(tensor_read::<i64>(t[2]), theirs.k_idxs(&v, &slot), "k_idxs");
    assert_eq!(
        llama_memory_ctx_set_input_v_idxs_tensor(ctx, t[3]),
        LLAMA_MEMORY_OK
    );
    assert_eq!(
        tensor_read::<i64>(t[3]),
        theirs.v_idxs(&v, &slot),
        "v_idxs (transposed)"
    );
    assert_eq!(
        llama_memory_ctx_set_input_pos_bucket_tensor(ctx, t[4]),
        LLAMA_MEMORY_OK
    );
    assert_eq!(
        tensor_read::<i32>(t[4]),
        theirs.pos_bucket(&v, n_kv),
        "pos buckets"
    );
    assert_eq!(
        llama_memory_kv_set_input_k_shift_tensor(mem, t[5]),
        LLAMA_MEMORY_OK
    );
    let ks = tensor_read::<i32>(t[5]);
    assert_eq!(ks, theirs.k_shift(), "k_shift");
    assert!(ks.contains(&3), "the trace leaves pending shifts");

    // Wrong type, wrong shape and NULL are refused before anything is written.
    let expect = |r: llama_memory_result, code| {
        assert_eq!(r, code);
        llama_memory_clear_last_error();
    };
    expect(
        llama_memory_ctx_set_input_kq_mask_tensor(ctx, t[4], true),
        LLAMA_MEMORY_ERR_INVALID_ARGUMENT,
    );
    expect(
        llama_memory_ctx_set_input_k_idxs_tensor(ctx, t[5]),
        LLAMA_MEMORY_ERR_INVALID_ARGUMENT,
    );
    expect(
        llama_memory_ctx_set_input_pos_bucket_tensor(ctx, t[5]),
        LLAMA_MEMORY_ERR_INVALID_ARGUMENT,
    );
    expect(
        llama_memory_ctx_set_input_k_idxs_tensor(ctx, ptr::null_mut()),
        LLAMA_MEMORY_ERR_NULL_ARGUMENT,
    );
    let (_h2, small) = Host::new(&[
        (g::GGML_TYPE_F32, [n_kv as i64, nt - 1, 1, 1]),
        (g::GGML_TYPE_I64, [nt - 1, 1, 1, 1]),
    ]);
    expect(
        llama_memory_ctx_set_input_kq_mask_tensor(ctx, small[0], true),
        LLAMA_MEMORY_ERR_INVALID_ARGUMENT,
    );
    expect(
        llama_memory_ctx_set_input_k_idxs_tensor(ctx, small[1]),
        LLAMA_MEMORY_ERR_BUFFER_TOO_SMALL,
    );

    llama_memory_ctx_free(ctx);
    llama_memory_free(mem);
}
