//! The committed C header must be exactly what cbindgen generates from the sources.
//! `UPDATE_HEADER=1 cargo test --test header` rewrites it.

use std::path::Path;

#[test]
fn committed_header_matches_the_sources() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen failed to parse the crate");
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let path = dir.join("include/llama-memory.h");
    if std::env::var_os("UPDATE_HEADER").is_some() {
        std::fs::write(&path, &generated).expect("write header");
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "include/llama-memory.h is stale or edited by hand; regenerate it with \
         `UPDATE_HEADER=1 cargo test --test header` and commit the result"
    );
}

#[test]
fn header_version_matches_cargo_toml() {
    let header = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("include/llama-memory.h"),
    )
    .unwrap();
    let want = format!(
        "#define LLAMA_MEMORY_VERSION \"{}\"",
        env!("CARGO_PKG_VERSION")
    );
    assert!(header.contains(&want), "header lacks `{want}`");
    use llama_memory::ffi::*;
    let parts = [
        LLAMA_MEMORY_VERSION_MAJOR,
        LLAMA_MEMORY_VERSION_MINOR,
        LLAMA_MEMORY_VERSION_PATCH,
    ];
    assert_eq!(
        parts.map(|p| p.to_string()).join("."),
        env!("CARGO_PKG_VERSION")
    );
    // SAFETY: llama_memory_version returns a static NUL-terminated string.
    let v = unsafe { std::ffi::CStr::from_ptr(llama_memory_version()) };
    assert_eq!(v.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
}

/// Every function that returns a handle says, in the comment above it in the header, which
/// function frees that handle (the rustls-ffi / hyper rule: a caller reading one declaration
/// knows what it owns).
#[test]
fn every_handle_returning_function_names_its_free_function() {
    let header = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("include/llama-memory.h"),
    )
    .unwrap();
    let handles = [
        ("llama_memory_t", "llama_memory_free"),
        ("llama_memory_ctx_t", "llama_memory_ctx_free"),
        ("llama_memory_slots_t", "llama_memory_slots_free"),
    ];
    let lines: Vec<&str> = header.lines().collect();
    let mut checked = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        for (handle, free) in handles {
            let Some(rest) = line.strip_prefix(handle).and_then(|r| r.strip_prefix(' ')) else {
                continue;
            };
            let Some(name) = rest.split('(').next().filter(|n| n.starts_with("llama_")) else {
                continue;
            };
            assert!(
                header.contains(&format!("void {free}({handle} ")),
                "{free} is not declared for {handle}"
            );
            let doc: Vec<&str> = lines[..i]
                .iter()
                .rev()
                .take_while(|l| l.starts_with("//"))
                .copied()
                .collect();
            assert!(
                doc.iter().any(|l| l.contains(free)),
                "{name} returns a {handle} but its documentation does not name {free}"
            );
            checked.push(name.to_string());
        }
    }
    // the constructors, the contexts and the slot list
    for must in [
        "llama_memory_kv_init",
        "llama_memory_kv_init_with_storage",
        "llama_memory_rs_init",
        "llama_memory_init_batch",
        "llama_memory_init_full",
        "llama_memory_init_update",
        "llama_memory_slots_init",
    ] {
        assert!(checked.iter().any(|c| c == must), "{must} was not found");
    }
}
