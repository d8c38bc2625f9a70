//! Build script of `ggml-sys`.
//!
//! 1. Locates the pinned upstream: llama.cpp as shipped in the crates.io package
//!    `llama-cpp-sys-2` at exactly [`PINNED_VERSION`] (or `$LLAMA_CPP_DIR`).
//! 2. Either compiles ggml (base library, CPU backend, backend registry) from it
//!    with `cc`, or links an existing build (`$GGML_SYS_LINK_DIR`).
//! 3. With the `bindgen` feature, generates the bindings from `bindgen.flags`.
//!
//! It tells dependents (through `links = "ggml"`) where the sources are:
//! `DEP_GGML_LLAMA_CPP_DIR` (the `llama.cpp` directory) and `DEP_GGML_INCLUDE`
//! (`<llama.cpp>/ggml/include`).

use std::env;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The crates.io package whose `llama.cpp/` folder is our upstream.
const PINNED_CRATE: &str = "llama-cpp-sys-2";
/// Its exact version. `scripts/regen-ggml-bindings.sh` reads this line, so keep
/// it a plain `const ... = "x.y.z";` on one line.
const PINNED_VERSION: &str = "0.1.161";

/// ggml's build-time value of `GGML_SCHED_MAX_COPIES` (ggml/CMakeLists.txt's
/// default). It changes the size of `ggml_backend_sched` internals, so a build
/// that links an existing ggml must have used the same value.
const SCHED_MAX_COPIES: &str = "4";

/// x86_64 features compiled in by default, with the `GGML_*` define ggml's
/// CMake adds for each. This is exactly the set CMake enables when
/// `GGML_NATIVE=OFF` (SSE4.2, AVX, AVX2, BMI2, FMA, F16C: x86-64-v3, "haswell"),
/// so the library runs on any x86_64 CPU from about 2013 on (Intel Haswell,
/// AMD Excavator/Zen) and does not depend on which machine built it.
/// `GGML_SYS_NATIVE=1` uses `-march=native` instead.
const X86_64_FEATURES: &[(&str, &str)] = &[
    ("-msse4.2", "GGML_SSE42"),
    ("-mf16c", "GGML_F16C"),
    ("-mfma", "GGML_FMA"),
    ("-mbmi2", "GGML_BMI2"),
    ("-mavx", "GGML_AVX"),
    ("-mavx2", "GGML_AVX2"),
];

/// C sources of ggml, relative to `ggml/src`: the `ggml-base` and `ggml-cpu`
/// targets of ggml's CMake (the architecture-specific ones are added later).
const C_SOURCES: &[&str] = &[
    // Largest first: `cc` starts jobs in order, so the long ones do not end up
    // compiling alone at the end.
    "ggml.c",
    "ggml-quants.c",
    "ggml-cpu/ggml-cpu.c",
    "ggml-cpu/quants.c",
    "ggml-alloc.c",
];

/// C++ sources: `ggml-base`, `ggml-cpu` and the `ggml` backend registry.
const CXX_SOURCES: &[&str] = &[
    "ggml-cpu/ops.cpp",
    "ggml-cpu/repack.cpp",
    "ggml-cpu/vec.cpp",
    "ggml-backend.cpp",
    "gguf.cpp",
    "ggml-cpu/binary-ops.cpp",
    "ggml-cpu/unary-ops.cpp",
    "ggml-cpu/ggml-cpu.cpp",
    "ggml-opt.cpp",
    "ggml-backend-meta.cpp",
    "ggml.cpp",
    "ggml-threading.cpp",
    "ggml-cpu/traits.cpp",
    "ggml-cpu/hbm.cpp",
    "ggml-cpu/amx/amx.cpp",
    "ggml-cpu/amx/mmq.cpp",
    "ggml-cpu/tiled/tiled.cpp",
    "ggml-cpu/tiled/tiled-kernel.cpp",
    // The registry (CMake target `ggml`), built with only GGML_USE_CPU.
    "ggml-backend-reg.cpp",
    "ggml-backend-dl.cpp",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rerun-if-changed=bindgen.flags");
    for var in [
        "LLAMA_CPP_DIR",
        "GGML_SYS_LINK_DIR",
        "GGML_SYS_LINK_KIND",
        "GGML_SYS_NATIVE",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let llama_cpp = locate_llama_cpp(&out_dir);
    let ggml = llama_cpp.join("ggml");
    for required in ["include/ggml.h", "src/ggml.c", "CMakeLists.txt"] {
        if !ggml.join(required).is_file() {
            panic!(
                "ggml-sys: {} does not look like llama.cpp (no ggml/{required}); \
                 LLAMA_CPP_DIR must point at the `llama.cpp` directory of \
                 {PINNED_CRATE} {PINNED_VERSION} or a checkout of the same version",
                llama_cpp.display()
            );
        }
    }
    println!("cargo:llama_cpp_dir={}", llama_cpp.display());
    println!("cargo:include={}", ggml.join("include").display());

    match env::var_os("GGML_SYS_LINK_DIR") {
        Some(dir) if !dir.is_empty() => link_existing(dir),
        _ => build_ggml(&ggml, &out_dir),
    }

    #[cfg(feature = "bindgen")]
    generate_bindings(&ggml.join("include"), &out_dir);
}

/// Finds the `llama.cpp` directory: `$LLAMA_CPP_DIR`, else the pinned package.
fn locate_llama_cpp(out_dir: &Path) -> PathBuf {
    if let Some(dir) = env::var_os("LLAMA_CPP_DIR").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        // Relative to what? Cargo runs build scripts in the package directory,
        // not where the user typed the command, and dependents get this path
        // back as DEP_GGML_LLAMA_CPP_DIR, so only an absolute path is unambiguous.
        if !dir.is_absolute() {
            panic!(
                "ggml-sys: LLAMA_CPP_DIR must be an absolute path, got {}",
                dir.display()
            );
        }
        // A user's checkout can change under us (the registry copy cannot).
        println!("cargo:rerun-if-changed={}", dir.join("ggml/src").display());
        println!(
            "cargo:rerun-if-changed={}",
            dir.join("ggml/include").display()
        );
        return dir;
    }
    pinned_llama_cpp(out_dir)
}

/// Resolves the pinned package through cargo itself, which downloads it into
/// the local registry when it is absent and honours the user's cargo config
/// (registry mirrors, proxies), and returns its `llama.cpp` directory.
fn pinned_llama_cpp(out_dir: &Path) -> PathBuf {
    let pin = out_dir.join("pin");
    fs::create_dir_all(pin.join("src")).expect("ggml-sys: cannot create OUT_DIR/pin");
    // The empty [workspace] keeps cargo from attaching this manifest to a
    // workspace above OUT_DIR. cfg(any()) is never true: the dependency is
    // resolved and downloaded by `cargo metadata`, but never built.
    let manifest = format!(
        "[package]\n\
         name = \"pin\"\n\
         version = \"0.0.0\"\n\
         edition = \"2021\"\n\
         publish = false\n\
         \n\
         [workspace]\n\
         \n\
         [target.'cfg(any())'.dependencies]\n\
         {PINNED_CRATE} = \"={PINNED_VERSION}\"\n"
    );
    write_if_changed(&pin.join("Cargo.toml"), &manifest);
    write_if_changed(&pin.join("src/lib.rs"), "");

    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut errors = String::new();
    // Offline first: once the package is in the local registry (the usual case
    // after the first build) this needs no network at all, so `--offline`
    // builds and machines without a registry keep working.
    for offline in [true, false] {
        let mut cmd = Command::new(&cargo);
        cmd.args(["metadata", "--format-version", "1", "--manifest-path"])
            .arg(pin.join("Cargo.toml"))
            .current_dir(&pin);
        if offline {
            cmd.arg("--offline");
        }
        let output = match cmd.output() {
            Ok(output) => output,
            Err(e) => panic!("ggml-sys: cannot run {cargo:?} metadata: {e}"),
        };
        if output.status.success() {
            return find_pinned_package(&output.stdout);
        }
        errors.push_str(&String::from_utf8_lossy(&output.stderr));
    }
    panic!(
        "ggml-sys: `cargo metadata` could not fetch {PINNED_CRATE} {PINNED_VERSION} \
         (manifest {}); set LLAMA_CPP_DIR to a llama.cpp checkout of that version \
         instead. cargo said:\n{errors}",
        pin.join("Cargo.toml").display()
    );
}

/// Picks the pinned package out of `cargo metadata` output.
fn find_pinned_package(metadata: &[u8]) -> PathBuf {
    let metadata: serde_json::Value =
        serde_json::from_slice(metadata).expect("ggml-sys: cargo metadata printed invalid JSON");
    let packages = metadata["packages"]
        .as_array()
        .expect("ggml-sys: cargo metadata has no `packages` array");
    let manifest = packages
        .iter()
        .find(|p| p["name"] == PINNED_CRATE && p["version"] == PINNED_VERSION)
        .and_then(|p| p["manifest_path"].as_str())
        .unwrap_or_else(|| {
            panic!("ggml-sys: cargo metadata does not list {PINNED_CRATE} {PINNED_VERSION}")
        });
    let dir = Path::new(manifest)
        .parent()
        .expect("ggml-sys: manifest_path has no parent directory")
        .join("llama.cpp");
    if !dir.is_dir() {
        panic!(
            "ggml-sys: {PINNED_CRATE} {PINNED_VERSION} has no llama.cpp directory at {}",
            dir.display()
        );
    }
    dir
}

/// Links a ggml built elsewhere (by CMake), so that this crate and libllama use
/// one and the same ggml.
fn link_existing(dir: OsString) {
    let dir = PathBuf::from(dir);
    let kind = env::var("GGML_SYS_LINK_KIND").unwrap_or_else(|_| "dylib".to_owned());
    println!("cargo:rustc-link-search=native={}", dir.display());
    // Dependents before their dependencies, which is what a static link needs:
    // the registry (ggml) calls into the CPU backend, both call into ggml-base.
    let libs = ["ggml", "ggml-cpu", "ggml-base"];
    match kind.as_str() {
        "dylib" => {
            for lib in libs {
                println!("cargo:rustc-link-lib=dylib={lib}");
            }
            // Lets this crate's own tests find the libraries at run time;
            // cargo passes it to nothing outside this package.
            if env::var("CARGO_CFG_TARGET_FAMILY").as_deref() == Ok("unix") {
                println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
            }
        }
        "static" => {
            // -bundle: the archives are not copied into this rlib but handed
            // to the final link (or listed for the C side of a staticlib), so
            // the program still contains exactly one ggml, the CMake one.
            for lib in libs {
                println!("cargo:rustc-link-lib=static:-bundle={lib}");
            }
            link_system_libs();
        }
        other => panic!("ggml-sys: GGML_SYS_LINK_KIND must be `dylib` or `static`, got `{other}`"),
    }
}

/// The system libraries a static ggml needs (ggml's CMake: Threads, m, dl, and
/// the C++ runtime).
fn link_system_libs() {
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let cxx = match os.as_str() {
        "macos" | "ios" | "freebsd" | "openbsd" => "c++",
        _ => "stdc++",
    };
    println!("cargo:rustc-link-lib={cxx}");
    if os != "windows" {
        println!("cargo:rustc-link-lib=pthread");
        println!("cargo:rustc-link-lib=m");
    }
    if os == "linux" || os == "android" {
        println!("cargo:rustc-link-lib=dl");
    }
}

/// Compiles ggml-base, the CPU backend and the backend registry with `cc`.
///
/// ggml's CMake makes three libraries with slightly different settings; here
/// all sources share one configuration (two `cc::Build`s only because `cc`
/// uses one compiler per build), which is equivalent: the CPU-backend defines
/// are not read by the base/registry sources, `GGML_USE_CPU` is only read by
/// the registry, and the base sources only gain vectorised paths from the
/// architecture flags, which the CPU backend requires anyway.
fn build_ggml(ggml: &Path, out_dir: &Path) {
    let src = ggml.join("src");
    let generated = out_dir.join("generated");
    fs::create_dir_all(&generated).expect("ggml-sys: cannot create OUT_DIR/generated");
    let version_defines = version_header(ggml, &generated);

    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let native = env::var("GGML_SYS_NATIVE").is_ok_and(|v| !v.is_empty() && v != "0");

    let mut c_sources: Vec<&str> = C_SOURCES.to_vec();
    let mut cxx_sources: Vec<&str> = CXX_SOURCES.to_vec();
    let mut flags: Vec<&str> = Vec::new();
    let mut defines: Vec<(&str, Option<&str>)> = Vec::new();
    match arch.as_str() {
        "x86_64" | "x86" => {
            c_sources.insert(1, "ggml-cpu/arch/x86/quants.c");
            cxx_sources.insert(1, "ggml-cpu/arch/x86/repack.cpp");
            if native {
                // As CMake's GGML_NATIVE: the compiler's view of the build
                // machine, no GGML_<feature> defines.
                flags.push("-march=native");
            } else {
                for (flag, define) in X86_64_FEATURES {
                    flags.push(flag);
                    defines.push((define, None));
                }
            }
        }
        "aarch64" => {
            // NEON is part of the aarch64 baseline; dot-product, i8mm, SVE, ...
            // are only used with GGML_SYS_NATIVE=1.
            c_sources.insert(1, "ggml-cpu/arch/arm/quants.c");
            cxx_sources.insert(1, "ggml-cpu/arch/arm/repack.cpp");
            if native {
                flags.push("-mcpu=native");
            }
        }
        // Portable scalar kernels, as ggml's CMake does for unknown CPUs.
        _ => defines.push(("GGML_CPU_GENERIC", None)),
    }

    // llama.cpp's top-level CMake turns GGML_LLAMAFILE on by default, so a
    // CMake build of this upstream uses llamafile's sgemm for F32/F16/Q8_0
    // matrix products; do the same so both builds compute the same way.
    cxx_sources.insert(2, "ggml-cpu/llamafile/sgemm.cpp");
    defines.push(("GGML_USE_LLAMAFILE", None));

    // Defines of ggml's CMake (ggml/src/CMakeLists.txt and ggml-cpu's), with
    // GGML_USE_OPENMP deliberately absent: ggml's own thread pool is used, so
    // there is no libgomp dependency.
    defines.push(("GGML_SCHED_MAX_COPIES", Some(SCHED_MAX_COPIES)));
    defines.push(("GGML_USE_CPU", None));
    defines.push(("GGML_USE_CPU_REPACK", None));
    match os.as_str() {
        "openbsd" => defines.push(("_XOPEN_SOURCE", Some("700"))),
        _ => defines.push(("_XOPEN_SOURCE", Some("600"))),
    }
    match os.as_str() {
        "linux" | "android" => defines.push(("_GNU_SOURCE", None)),
        "macos" | "ios" => defines.push(("_DARWIN_C_SOURCE", None)),
        "freebsd" => defines.push(("__BSD_VISIBLE", None)),
        "netbsd" => defines.push(("_NETBSD_SOURCE", None)),
        _ => {}
    }
    // CMake's Release configuration; debug builds keep ggml's assert()s.
    if env::var("PROFILE").as_deref() == Ok("release") {
        defines.push(("NDEBUG", None));
    }

    let configure = |cxx: bool, sources: &[&str]| {
        let mut build = cc::Build::new();
        build
            .cpp(cxx)
            // GNU dialects, as CMake builds ggml (C_EXTENSIONS on by default).
            .std(if cxx { "gnu++17" } else { "gnu11" })
            // Upstream code: its warnings are not ours to fix and would only
            // bury this crate's own messages.
            .warnings(false)
            .extra_warnings(false)
            .cargo_warnings(false)
            .include(&generated)
            .include(&src)
            .include(src.join("ggml-cpu"))
            .include(ggml.join("include"));
        for (name, value) in &defines {
            build.define(name, *value);
        }
        for (name, value) in &version_defines {
            build.define(name, value.as_str());
        }
        for flag in &flags {
            build.flag(flag);
        }
        // ggml uses threads everywhere (CMake links Threads::Threads).
        build.flag_if_supported("-pthread");
        for source in sources {
            let path = src.join(source);
            if !path.is_file() {
                panic!(
                    "ggml-sys: missing {}; is this llama.cpp the one of {PINNED_CRATE} {PINNED_VERSION}?",
                    path.display()
                );
            }
            build.file(path);
        }
        build
    };
    let c_build = configure(false, &c_sources);
    let cxx_build = configure(true, &cxx_sources);

    // Both builds at once: each one's last files would otherwise compile alone
    // on an otherwise idle core. cc shares cargo's jobserver between them.
    std::thread::scope(|scope| {
        let cxx = scope.spawn(|| cxx_build.compile("ggml_sys_cxx"));
        c_build.compile("ggml_sys_c");
        cxx.join()
            .expect("ggml-sys: compiling the C++ sources failed");
    });
    // Both archives end up inside this crate's rlib, so their mutual
    // references (C calls C++ and back) resolve regardless of order. cc has
    // already asked for the C++ runtime; threads, libm and libdl remain.
    link_system_libs();
}

/// Writes `ggml-version.h` from ggml's template, as CMake's `configure_file`
/// does, into `dir`. Returns defines to pass instead for an upstream that
/// has no template (older ggml passed the strings with -D).
fn version_header(ggml: &Path, dir: &Path) -> Vec<(&'static str, String)> {
    let cmake = fs::read_to_string(ggml.join("CMakeLists.txt")).unwrap_or_default();
    let part = |name: &str| {
        let prefix = format!("set({name} ");
        cmake
            .lines()
            .find_map(|l| l.trim().strip_prefix(&prefix)?.strip_suffix(')'))
            .map(str::trim)
            .unwrap_or("0")
            .to_owned()
    };
    let version = format!(
        "{}.{}.{}",
        part("GGML_VERSION_MAJOR"),
        part("GGML_VERSION_MINOR"),
        part("GGML_VERSION_PATCH")
    );
    let commit = build_commit();

    let template = ggml.join("src/ggml-version.h.in");
    match fs::read_to_string(&template) {
        Ok(text) => {
            let header = text
                .replace("@GGML_VERSION@", &version)
                .replace("@GGML_BUILD_COMMIT@", &commit);
            write_if_changed(&dir.join("ggml-version.h"), &header);
            Vec::new()
        }
        Err(_) => vec![
            ("GGML_VERSION", format!("\"{version}\"")),
            ("GGML_COMMIT", format!("\"{commit}\"")),
        ],
    }
}

/// What ggml's CMake would report as the commit: the short git hash of a
/// user's checkout, "unknown" for the registry copy (which has no .git; asking
/// git there could find some unrelated enclosing repository).
fn build_commit() -> String {
    let Some(dir) = env::var_os("LLAMA_CPP_DIR").filter(|d| !d.is_empty()) else {
        return "unknown".to_owned();
    };
    Command::new("git")
        .arg("-C")
        .arg(Path::new(&dir).join("ggml"))
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Writes only on change, so reruns do not touch mtimes needlessly.
fn write_if_changed(path: &Path, contents: &str) {
    if fs::read_to_string(path).is_ok_and(|old| old == contents) {
        return;
    }
    fs::write(path, contents)
        .unwrap_or_else(|e| panic!("ggml-sys: cannot write {}: {e}", path.display()));
}

/// Generates `OUT_DIR/bindings.rs` with the bindgen library, from the same
/// `bindgen.flags` that `scripts/regen-ggml-bindings.sh` feeds to bindgen-cli.
#[cfg(feature = "bindgen")]
fn generate_bindings(include: &Path, out_dir: &Path) {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let flags = fs::read_to_string(manifest_dir.join("bindgen.flags"))
        .expect("ggml-sys: cannot read bindgen.flags");
    let mut builder = bindgen::Builder::default()
        .header(manifest_dir.join("wrapper.h").to_string_lossy())
        .clang_arg(format!("-I{}", include.display()));
    for line in flags.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (flag, value) = match line.split_once('=') {
            Some((flag, value)) => (flag, Some(value)),
            None => (line, None),
        };
        builder = apply_bindgen_flag(builder, flag, value);
    }
    builder
        .generate()
        .expect("ggml-sys: bindgen failed")
        .write_to_file(out_dir.join("bindings.rs"))
        .expect("ggml-sys: cannot write OUT_DIR/bindings.rs");
}

/// The bindgen-cli flags `bindgen.flags` may use, as Builder calls. Anything
/// else is rejected rather than ignored, so the two generators cannot diverge
/// silently (and the `bindgen`-feature unit test compares their outputs).
#[cfg(feature = "bindgen")]
fn apply_bindgen_flag(b: bindgen::Builder, flag: &str, value: Option<&str>) -> bindgen::Builder {
    let value = || value.unwrap_or_else(|| panic!("ggml-sys: bindgen.flags: {flag} needs =VALUE"));
    match flag {
        "--rust-target" => b.rust_target(value().parse().expect("bad --rust-target")),
        "--rust-edition" => b.rust_edition(value().parse().expect("bad --rust-edition")),
        "--use-core" => b.use_core(),
        "--formatter" => b.formatter(value().parse().expect("bad --formatter")),
        "--merge-extern-blocks" => b.merge_extern_blocks(true),
        "--default-enum-style" => {
            b.default_enum_style(value().parse().expect("bad --default-enum-style"))
        }
        "--no-prepend-enum-name" => b.prepend_enum_name(false),
        "--no-layout-tests" => b.layout_tests(false),
        "--no-doc-comments" => b.generate_comments(false),
        "--allowlist-function" => b.allowlist_function(value()),
        "--allowlist-type" => b.allowlist_type(value()),
        "--allowlist-var" => b.allowlist_var(value()),
        "--blocklist-function" => b.blocklist_function(value()),
        "--blocklist-type" => b.blocklist_type(value()),
        other => panic!("ggml-sys: bindgen.flags: {other} is not mapped in build.rs; add it there"),
    }
}
