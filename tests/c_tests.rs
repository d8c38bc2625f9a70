//! Compiles every `tests/c/*.c` with the system C compiler (through the `cc` crate) against
//! the generated header and the shared library cargo just built, runs it, and checks that it
//! passes. Also compiles the header on its own, included twice, as C11 and as C++17, and
//! together with the pinned llama.h.

use std::io::Write;
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
        .arg(root().join("tests/c"));
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

/// The `tests/c/*.c` sources, sorted.
fn c_test_sources() -> Vec<PathBuf> {
    let mut sources: Vec<_> = std::fs::read_dir(root().join("tests/c"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "c"))
        .collect();
    sources.sort();
    assert!(
        sources.len() >= 3,
        "expected the C tests in tests/c/, found {}",
        sources.len()
    );
    sources
}

/// A C compiler command for `src` -> `exe`, strict warnings, linked against the shared library.
fn c_program(src: &Path, exe: &Path, extra: &[&str]) -> Command {
    let lib = lib_dir();
    assert!(
        lib.join("libllama_memory.so").exists(),
        "libllama_memory.so not found in {}",
        lib.display()
    );
    let mut cc = compiler(false);
    strict_flags(&mut cc, false);
    cc.args(extra)
        .arg(src)
        .arg("-o")
        .arg(exe)
        .arg("-L")
        .arg(&lib)
        .arg("-lllama_memory")
        .arg("-lm")
        // DT_RPATH, not DT_RUNPATH: under `cargo test` LD_LIBRARY_PATH lists target/*/deps,
        // where an older libllama_memory.so of a plain `cargo build` may sit, and a RUNPATH
        // would lose to it, so the C tests would silently run a stale library.
        .arg("-Wl,--disable-new-dtags")
        .arg(format!("-Wl,-rpath,{}", lib.display()));
    cc
}

/// Compiles every C test into `scratch()/<variant>/` with `extra` flags; (name, executable).
fn build_c_tests(variant: &str, extra: &[&str]) -> Vec<(String, PathBuf)> {
    let dir = scratch().join(variant);
    std::fs::create_dir_all(&dir).unwrap();
    c_test_sources()
        .into_iter()
        .map(|src| {
            let name = src.file_stem().unwrap().to_string_lossy().to_string();
            let exe = dir.join(&name);
            run(
                c_program(&src, &exe, extra),
                &format!("compiling {name} ({variant})"),
            );
            (name, exe)
        })
        .collect()
}

#[test]
fn c_tests_pass() {
    for (name, exe) in build_c_tests("plain", &[]) {
        run(Command::new(&exe), &name);
    }
}

/// Set (to 1) by CI: a sanitizer or valgrind that is unavailable fails the test instead of
/// skipping it, so CI always runs these checks.
const REQUIRE_ENV: &str = "LLAMA_MEMORY_REQUIRE_SANITIZERS";

/// Whether a missing tool is a skip (printed) or, with [`REQUIRE_ENV`] set, a failure.
fn unavailable(what: &str, why: &str) {
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        panic!("{what} is unavailable but {REQUIRE_ENV}=1:\n{why}");
    }
    // Straight to stderr, past the test harness's capture, so a plain `cargo test` shows it.
    let _ = writeln!(
        std::io::stderr(),
        "\nSKIPPED: {what} is unavailable on this machine, so this check did not run \
         ({REQUIRE_ENV}=1 makes that a failure; .ci/run installs it). Reason:\n{why}"
    );
}

/// Deliberate bugs, one per argument, that the sanitizer and valgrind runs must catch: the
/// proof that the setup works (compiled in, reports fail the run, allocations made by the
/// Rust library go through the intercepted malloc).
const CANARY: &str = r#"#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include "llama-memory.h"
/* Handles allocated by the Rust library and never freed. Several, and the stack where their
 * calls ran is overwritten afterwards (scrub): a leak checker that scans the stack
 * conservatively must not find stale copies of the pointers there. */
__attribute__((noinline)) static int leak(void) {
    int i, ok = 1;
    for (i = 0; i < 8; ++i) {
        ok &= llama_memory_kv_init(llama_memory_kv_default_params()) != NULL;
    }
    return !ok;
}
__attribute__((noinline)) static void scrub(void) {
    volatile char buf[1 << 16];
    size_t i;
    for (i = 0; i < sizeof buf; ++i) {
        buf[i] = 0;
    }
}
int main(int argc, char **argv) {
    volatile int n = argc + 6; /* 8: not known to the compiler */
    if (argc < 2) { return 0; }
    if (strcmp(argv[1], "heap-overflow") == 0) {
        volatile char *p = malloc((size_t) n); /* volatile: the store is not optimized out */
        p[n] = 1;                              /* one past the end */
        free((void *) p);
    } else if (strcmp(argv[1], "signed-overflow") == 0) {
        volatile int x = INT_MAX;
        x = x + n;
        return x == 0;
    } else if (strcmp(argv[1], "rust-leak") == 0) {
        int r = leak();
        scrub();
        return r;
    } else if (strcmp(argv[1], "uninit") == 0) {
        int *volatile p = malloc(sizeof(int)); /* volatile: hides it from -Wmaybe-uninitialized */
        int r = *p > 0 ? 3 : 4; /* branch on an uninitialized value */
        free(p);
        return r - 3;
    }
    return 0;
}
"#;

/// The canary's source, written once per variant directory.
fn canary_source(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let src = dir.join("canary.c");
    std::fs::write(&src, CANARY).unwrap();
    src
}

/// Runs `cmd`; `Err` with its output if it failed or printed any of `markers` on stderr.
fn run_checked(mut cmd: Command, markers: &[&str]) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("cannot run: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let text = format!(
        "({})\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        stderr
    );
    if !out.status.success() || markers.iter().any(|m| stderr.contains(m)) {
        Err(text)
    } else {
        Ok(())
    }
}

/// Flags of the sanitized build. The Rust library and ggml are not instrumented; the sanitizer
/// runtime (first in the executable's link map) interposes malloc/free for the whole process,
/// so their heap blocks are still checked for bounds at C accesses, double frees and leaks.
const SANITIZE_FLAGS: &[&str] = &[
    "-fsanitize=address,undefined",
    "-fno-omit-frame-pointer",
    "-fno-sanitize-recover=all",
    "-g",
];
/// Any report fails the run (exit code 1, and the markers below on stderr). LeakSanitizer is
/// on: the tests free what they allocate, and the library's one thread-local (the last-error
/// string, src/ffi/error.rs) is freed by its destructor at exit or still reachable from TLS,
/// which LSan does not report. No report needed a suppression, so there is no suppression file.
const ASAN_OPTIONS: &str = "halt_on_error=1:abort_on_error=0:exitcode=1:detect_leaks=1:\
    check_initialization_order=1:strict_init_order=1:detect_stack_use_after_return=1:\
    strict_string_checks=1:allocator_may_return_null=1:print_summary=1";
const UBSAN_OPTIONS: &str = "halt_on_error=1:abort_on_error=0:exitcode=1:print_stacktrace=1";
const SANITIZER_MARKERS: &[&str] = &[
    "ERROR: AddressSanitizer",
    "ERROR: LeakSanitizer",
    "runtime error:",
];

fn sanitized(exe: &Path) -> Command {
    let mut cmd = Command::new(exe);
    cmd.env("ASAN_OPTIONS", ASAN_OPTIONS)
        .env("UBSAN_OPTIONS", UBSAN_OPTIONS)
        .env("LSAN_OPTIONS", "exitcode=1")
        .env(QUICK, "1");
    cmd
}

/// Set for the sanitizer and valgrind runs: the C tests with long random traces run a short
/// one there (the plain run covers the full trace; these runs look for memory errors, which
/// the first steps of every operation reach).
const QUICK: &str = "LLAMA_MEMORY_C_TEST_QUICK";

#[test]
fn c_tests_pass_under_asan_and_ubsan() {
    let dir = scratch().join("asan");
    let canary = dir.join("canary");
    // Availability: the runtime (libasan/libubsan) must link and run.
    let probe = c_program(&canary_source(&dir), &canary, SANITIZE_FLAGS)
        .output()
        .map_err(|e| e.to_string())
        .and_then(|o| {
            if o.status.success() {
                run_checked(sanitized(&canary), SANITIZER_MARKERS)
            } else {
                Err(String::from_utf8_lossy(&o.stderr).into_owned())
            }
        });
    if let Err(why) = probe {
        return unavailable(
            "AddressSanitizer/UndefinedBehaviorSanitizer (libasan, libubsan)",
            &why,
        );
    }
    // The setup catches each kind of bug.
    for (bug, report) in [
        (
            "heap-overflow",
            "ERROR: AddressSanitizer: heap-buffer-overflow",
        ),
        ("signed-overflow", "runtime error: signed integer overflow"),
        ("rust-leak", "ERROR: LeakSanitizer: detected memory leaks"),
    ] {
        let mut cmd = sanitized(&canary);
        cmd.arg(bug);
        match run_checked(cmd, SANITIZER_MARKERS) {
            Ok(()) => panic!("the sanitized canary did not fail on a deliberate {bug}"),
            Err(out) => assert!(
                out.contains(report),
                "the {bug} canary failed without the expected report '{report}':\n{out}"
            ),
        }
    }
    for (name, exe) in build_c_tests("asan", SANITIZE_FLAGS) {
        if let Err(out) = run_checked(sanitized(&exe), SANITIZER_MARKERS) {
            panic!("{name} under ASan+UBSan failed {out}");
        }
    }
}

/// Valgrind (memcheck) on the tests built without sanitizers: it also checks the accesses of
/// the uninstrumented Rust library and ggml, which ASan does not. Any error or leak (definite,
/// indirect or possible) fails the run; no suppressions.
fn valgrind(exe: &Path) -> Command {
    let mut cmd = Command::new("valgrind");
    cmd.args([
        "-q",
        "--error-exitcode=1",
        "--leak-check=full",
        "--show-leak-kinds=definite,indirect,possible",
        "--errors-for-leak-kinds=definite,indirect,possible",
        "--track-origins=yes",
    ])
    .arg(exe)
    .env(QUICK, "1");
    cmd
}

#[test]
fn c_tests_pass_under_valgrind() {
    match Command::new("valgrind").arg("--version").output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => return unavailable("valgrind", &String::from_utf8_lossy(&o.stderr)),
        Err(e) => return unavailable("valgrind", &format!("cannot run valgrind: {e}")),
    }
    let dir = scratch().join("valgrind");
    let canary = dir.join("canary");
    run(
        c_program(&canary_source(&dir), &canary, &["-g"]),
        "compiling the valgrind canary",
    );
    let markers = &[
        "Invalid read",
        "Invalid write",
        "uninitialised",
        "definitely lost",
    ];
    for (bug, report) in [
        ("heap-overflow", "Invalid write of size 1"),
        // A conditional jump, or the exit status, depending on it (whichever -O1 makes of it).
        ("uninit", "uninitialised"),
        ("rust-leak", "definitely lost"),
    ] {
        let mut cmd = valgrind(&canary);
        cmd.arg(bug);
        match run_checked(cmd, markers) {
            Ok(()) => panic!("valgrind did not fail the canary on a deliberate {bug}"),
            Err(out) => assert!(
                out.contains(report),
                "the {bug} canary failed under valgrind without '{report}':\n{out}"
            ),
        }
    }
    for (name, exe) in build_c_tests("valgrind", &["-g"]) {
        if let Err(out) = run_checked(valgrind(&exe), markers) {
            panic!("{name} under valgrind failed {out}");
        }
    }
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
