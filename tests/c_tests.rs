//! Compiles every `c_tests/*.c` with the system C compiler (through the `cc` crate) against
//! the generated header and the shared library cargo just built, runs it, and checks that it
//! passes. Also compiles the header on its own, included twice, as C11 and as C++17, and
//! together with the pinned llama.h.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A directory holding a `libllama_memory.so` built from the current sources.
///
/// `cargo test` builds the library only as an rlib for integration tests, and a `.so` left by
/// an earlier `cargo build` may be stale, so this builds the shared library once per run, into
/// its own target directory (the outer cargo holds the lock on the main one).
fn lib_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("c-tests-lib");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(cargo)
            .args(["build", "--lib", "-p", "llama-memory", "--manifest-path"])
            .arg(root().join("Cargo.toml"))
            .arg("--target-dir")
            .arg(&target)
            .output()
            .expect("cannot run cargo");
        assert!(
            out.status.success(),
            "building libllama_memory.so failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        target.join("debug")
    })
    .clone()
}

fn compiler(cpp: bool) -> Command {
    let target =
        std::env::var("TARGET").unwrap_or_else(|_| env!("LLAMA_MEMORY_TARGET").to_string());
    cc::Build::new()
        .cpp(cpp)
        .target(&target)
        .host(&target)
        .opt_level(1)
        .cargo_metadata(false)
        .get_compiler()
        .to_command()
}

fn strict_flags(cmd: &mut Command, cpp: bool) {
    cmd.args(["-Wall", "-Wextra", "-Wpedantic", "-Werror"])
        .arg(if cpp { "-std=c++17" } else { "-std=c11" })
        .arg("-I")
        .arg(root().join("include"))
        .arg("-I")
        .arg(root().join("c_tests"));
}

fn run(mut cmd: Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn scratch() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("c_tests");
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn c_tests_pass() {
    let lib = lib_dir();
    assert!(
        lib.join("libllama_memory.so").exists(),
        "libllama_memory.so not found in {}",
        lib.display()
    );
    let mut n = 0;
    let mut sources: Vec<_> = std::fs::read_dir(root().join("c_tests"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "c"))
        .collect();
    sources.sort();
    for src in sources {
        let name = src.file_stem().unwrap().to_string_lossy().to_string();
        let exe = scratch().join(&name);
        let mut cc = compiler(false);
        strict_flags(&mut cc, false);
        cc.arg(&src)
            .arg("-o")
            .arg(&exe)
            .arg("-L")
            .arg(&lib)
            .arg("-lllama_memory")
            .arg("-lm")
            .arg(format!("-Wl,-rpath,{}", lib.display()));
        run(cc, &format!("compiling {name}"));
        run(Command::new(&exe), &name);
        n += 1;
    }
    assert!(n >= 3, "expected the C tests in c_tests/, found {n}");
}

fn compile_only(code: &str, cpp: bool, extra_includes: &[PathBuf], name: &str) {
    let src = scratch().join(format!("{name}.{}", if cpp { "cpp" } else { "c" }));
    std::fs::write(&src, code).unwrap();
    let mut cc = compiler(cpp);
    strict_flags(&mut cc, cpp);
    for inc in extra_includes {
        cc.arg("-I").arg(inc);
    }
    cc.arg("-fsyntax-only").arg(&src);
    run(cc, name);
}

#[test]
fn header_is_self_contained_and_idempotent() {
    let code = "#include \"llama-memory.h\"\n#include \"llama-memory.h\"\n\
                int main(void) { llama_memory_t m = llama_memory_kv_init(llama_memory_kv_default_params());\n\
                llama_memory_free(m); return 0; }\n";
    compile_only(code, false, &[], "header_c11");
    compile_only(code, true, &[], "header_cpp17");
}

#[test]
fn header_compiles_with_the_pinned_llama_h() {
    let Some(dir) = option_env!("LLAMA_MEMORY_PINNED_LLAMA_CPP_DIR") else {
        panic!("the pinned llama.cpp tree was not located by the build");
    };
    let dir = PathBuf::from(dir);
    let incs = [dir.join("include"), dir.join("ggml/include")];
    // Both orders: each header's declarations of the shared types must agree with the other's.
    let a = "#include \"llama.h\"\n#include \"llama-memory.h\"\n\
             int main(void) { llama_memory_t m = NULL; llama_memory_seq_rm(m, 0, 0, -1); return 0; }\n";
    let b = "#include \"llama-memory.h\"\n#include \"llama.h\"\n\
             int main(void) { llama_memory_t m = NULL; return (int) llama_memory_seq_pos_max(m, 0); }\n";
    compile_only(a, false, &incs, "with_llama_h_c");
    compile_only(a, true, &incs, "with_llama_h_cpp");
    compile_only(b, false, &incs, "with_llama_h_c_rev");
    compile_only(b, true, &incs, "with_llama_h_cpp_rev");
}
