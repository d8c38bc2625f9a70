//! What a KV storage's creation options do (`KvStorage::with_options`, the C ABI's
//! `llama_memory_kv_storage_params.name_tag` / `.no_alloc` and the cache's `n_embd_v_gqa_max`),
//! against the shapes, names and sizes llama.cpp's `llama_kv_cache` constructor gives
//! (src/llama-kv-cache.cpp of the pinned tree): `cache_<tag>k_l<il>`, a transposed V padded to
//! the model's widest V row, and for a `no_alloc` model tensors in a zero-size buffer whose
//! breakdown is what an allocation would take. The drop-in's `dropin_fit_*` tests compare the
//! `no_alloc` path with stock end to end.

use ggml_sys as g;
use llama_memory::storage::{KvStorage, LayerSpec, StorageOptions, StorageSpec};
use llama_memory::ErrorKind;
use std::ffi::CStr;

fn spec(v_trans: bool) -> StorageSpec {
    let mut layers = LayerSpec::uniform(3, 32, 32);
    // a narrower middle layer: a transposed V is as wide as the widest one
    layers[1].n_embd_v_gqa = 16;
    StorageSpec {
        type_k: g::GGML_TYPE_F16,
        type_v: g::GGML_TYPE_F16,
        v_trans,
        is_mla: false,
        size: 64,
        n_stream: 2,
        n_rot_k: 0,
        n_rot_v: 0,
        layers,
    }
}

fn name(t: *mut g::ggml_tensor) -> String {
    // SAFETY: t is a live tensor of a storage the caller holds; ggml names are NUL-terminated.
    unsafe { CStr::from_ptr(g::ggml_get_name(t)) }
        .to_string_lossy()
        .into_owned()
}

fn ne0(t: *mut g::ggml_tensor) -> i64 {
    // SAFETY: as in `name`.
    unsafe { (*t).ne[0] }
}

#[test]
fn name_tag_goes_between_cache_and_the_tensor_letter() {
    let plain = KvStorage::new(spec(false)).unwrap();
    assert_eq!(name(plain.layer(2).unwrap().k), "cache_k_l2");
    assert_eq!(name(plain.layer(2).unwrap().v), "cache_v_l2");
    let tagged = KvStorage::with_options(
        spec(false),
        StorageOptions {
            name_tag: "idx_".into(),
            ..StorageOptions::default()
        },
    )
    .unwrap();
    for il in 0..3 {
        let l = tagged.layer(il).unwrap();
        assert_eq!(name(l.k), format!("cache_idx_k_l{il}"));
        assert_eq!(name(l.v), format!("cache_idx_v_l{il}"));
    }
}

#[test]
fn transposed_v_is_padded_to_the_given_width() {
    // not transposed: each layer its own width
    let st = KvStorage::new(spec(false)).unwrap();
    assert_eq!(ne0(st.layer(1).unwrap().v), 16);
    // transposed, no width given: the widest of this storage's layers
    let st = KvStorage::new(spec(true)).unwrap();
    assert_eq!(ne0(st.layer(1).unwrap().v), 32);
    assert_eq!(st.n_embd_v_gqa_max(), 32);
    // transposed, the model's widest given (a filtered-out layer was wider): every V that wide
    let wide = StorageOptions {
        n_embd_v_gqa_max: 48,
        ..StorageOptions::default()
    };
    let st = KvStorage::with_options(spec(true), wide).unwrap();
    for il in 0..3 {
        assert_eq!(ne0(st.layer(il).unwrap().v), 48);
        assert_eq!(ne0(st.layer(il).unwrap().k), 32);
    }
    assert_eq!(st.n_embd_v_gqa_max(), 48);
    // narrower than a layer: refused
    let narrow = StorageOptions {
        n_embd_v_gqa_max: 24,
        ..StorageOptions::default()
    };
    let e = KvStorage::with_options(spec(true), narrow).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
}

#[test]
fn no_alloc_reports_the_allocation_without_making_it() {
    let real = KvStorage::new(spec(true)).unwrap();
    let measured = KvStorage::with_options(
        spec(true),
        StorageOptions {
            no_alloc: true,
            ..StorageOptions::default()
        },
    )
    .unwrap();
    let bytes = |s: &KvStorage| s.memory_breakdown().iter().map(|(_, n)| n).sum::<usize>();
    assert!(bytes(&real) >= 3 * 2 * 2 * 64 * 32 * 2);
    assert_eq!(bytes(&measured), bytes(&real));
    let t = measured.layer(0).unwrap().k;
    // SAFETY: t is a live tensor of `measured`.
    let (data, buffer) = unsafe { ((*t).data, (*t).buffer) };
    assert!(data.is_null(), "a no_alloc tensor has no data");
    assert!(
        !buffer.is_null(),
        "a no_alloc tensor points at the placeholder buffer"
    );
    // SAFETY: buffer is the storage's live placeholder.
    assert_eq!(unsafe { g::ggml_backend_buffer_get_size(buffer) }, 0);

    let mut measured = measured;
    let mut buf = [0u8; 8];
    let e = measured.get(t, 0, &mut buf).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(measured.set(t, 0, &buf).is_err());
    assert!(
        measured.host_bytes(t).unwrap().is_none(),
        "no host bytes to lend"
    );
    assert!(measured.copy_stream(0, 1).is_err());
    // clearing a placeholder is a no-op, as for llama.cpp's
    measured.clear();
}
