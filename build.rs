//! Passes the pinned llama.cpp tree (located by ggml-sys) to the tests, which compile the
//! generated header together with the pinned llama.h.
//!
//! Also sets up how the shared library (cdylib) is found and finds its ggml at run time:
//! a soname (install name on macOS), and, when ggml is linked from `GGML_SYS_LINK_DIR` as
//! shared libraries (the CMake build), a RUNPATH of `$ORIGIN` (installed next to ggml) plus
//! that directory (the build tree; CMake's install rewrites it to `$ORIGIN` alone).

fn main() {
    if let Ok(dir) = std::env::var("DEP_GGML_LLAMA_CPP_DIR") {
        println!("cargo:rustc-env=LLAMA_MEMORY_PINNED_LLAMA_CPP_DIR={dir}");
    }
    // The C tests compile with the same target triple as the library.
    println!(
        "cargo:rustc-env=LLAMA_MEMORY_TARGET={}",
        std::env::var("TARGET").unwrap()
    );
    println!("cargo:rerun-if-env-changed=DEP_GGML_LLAMA_CPP_DIR");

    cdylib_link_args();
}

fn cdylib_link_args() {
    println!("cargo:rerun-if-env-changed=GGML_SYS_LINK_DIR");
    println!("cargo:rerun-if-env-changed=GGML_SYS_LINK_KIND");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let elf = matches!(
        os.as_str(),
        "linux"
            | "android"
            | "freebsd"
            | "netbsd"
            | "openbsd"
            | "dragonfly"
            | "illumos"
            | "solaris"
    );
    let apple = matches!(os.as_str(), "macos" | "ios");
    if !elf && !apple {
        return;
    }
    // Linked by name (-lllama_memory or CMake's imported target), the library is recorded by
    // this name in what links it, wherever it was linked from.
    // The CMake build gives the versioned soname (libllama_memory.so.0.6) and installs the
    // links; a plain cargo build has no such links to point at.
    println!("cargo:rerun-if-env-changed=LLAMA_MEMORY_SONAME");
    let soname = std::env::var("LLAMA_MEMORY_SONAME").unwrap_or_default();
    let soname = if soname.is_empty() {
        if elf {
            "libllama_memory.so".to_owned()
        } else {
            "libllama_memory.dylib".to_owned()
        }
    } else {
        soname
    };
    if elf {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,{soname}");
    } else {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-install_name,@rpath/{soname}");
    }

    let link_dir = std::env::var("GGML_SYS_LINK_DIR").unwrap_or_default();
    let kind = std::env::var("GGML_SYS_LINK_KIND").unwrap_or_else(|_| "dylib".to_owned());
    if link_dir.is_empty() || kind != "dylib" {
        // ggml is inside this library (compiled by ggml-sys, or a static GGML_SYS_LINK_DIR).
        return;
    }
    if elf {
        // RUNPATH (not RPATH), so LD_LIBRARY_PATH can still override it.
        println!("cargo:rustc-cdylib-link-arg=-Wl,--enable-new-dtags");
        println!("cargo:rustc-cdylib-link-arg=-Wl,-rpath,$ORIGIN:{link_dir}");
    } else {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-rpath,@loader_path");
        println!("cargo:rustc-cdylib-link-arg=-Wl,-rpath,{link_dir}");
    }
}
