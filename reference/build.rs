//! Builds `libkvref.so` (the pinned llama.cpp, static, plus `shim/kvref.cpp`) with CMake and
//! hands its path to the crate as `KVREF_LIB`.
//!
//! * The llama.cpp tree: `$LLAMA_CPP_DIR`, else `DEP_GGML_LLAMA_CPP_DIR` from `ggml-sys`.
//! * CMake: `$CMAKE`, else `cmake` on `PATH`, else the `cmake` package from PyPI installed with
//!   pip into `<target>/tools/cmake` (also forced by `KVREF_FORCE_PIP_CMAKE=1`), so a machine
//!   with only a Rust toolchain, a C++ compiler and python3 can build it. Without `make` the
//!   build uses Ninja, found or pip-installed the same way.
//! * The CMake build directory lives in `<target>/reference-build/<key>`, outside `OUT_DIR`, so
//!   that `cargo clean -p`, profile changes and fingerprint changes of this crate do not rebuild
//!   llama.cpp (several minutes); CMake's own dependency tracking decides what to recompile.

use std::env;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

/// Bump when the configure arguments change meaning, to start from a fresh build directory.
const BUILD_LAYOUT: u32 = 1;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=CMakeLists.txt");
    println!("cargo:rerun-if-changed=defrag/CMakeLists.txt");
    println!("cargo:rerun-if-changed=shim");
    for var in [
        "LLAMA_CPP_DIR",
        "DEP_GGML_LLAMA_CPP_DIR",
        "DEFRAG_LLAMA_CPP_DIR",
        "CMAKE",
        "KVREF_FORCE_PIP_CMAKE",
        "KVREF_FORCE_PIP_NINJA",
        "CC",
        "CXX",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));

    let tree = locate_tree();
    let root = target_root(&out_dir);
    let tools = root.join("tools");
    let builds = root.join("reference-build");
    fs::create_dir_all(&builds)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", builds.display()));

    // Concurrent cargo invocations (test + clippy, two profiles) share the build directory and
    // the pip-installed tools; CMake and pip are not safe to run twice on the same folders.
    let _lock = DirLock::acquire(&builds.join(".lock"));

    let cmake = find_cmake(&tools);
    let generator = choose_generator(&tools);

    let kvref = cmake_build(
        &cmake,
        &generator,
        &builds,
        &Project {
            name: "kvref",
            source: manifest_dir.clone(),
            tree_var: "LLAMA_CPP_DIR",
            tree: tree.clone(),
        },
    );
    println!("cargo:rustc-env=KVREF_LIB={}", kvref.display());

    // The second reference: the last llama.cpp that defragmented (see defrag/CMakeLists.txt).
    let defrag_tree = defrag_tree(&out_dir);
    let dfref = cmake_build(
        &cmake,
        &generator,
        &builds,
        &Project {
            name: "dfref",
            source: manifest_dir.join("defrag"),
            tree_var: "DEFRAG_LLAMA_CPP_DIR",
            tree: defrag_tree,
        },
    );
    println!("cargo:rustc-env=DFREF_LIB={}", dfref.display());
}

/// One CMake project of this crate and the llama.cpp tree it builds against.
struct Project {
    /// The shared library's name (`lib<name>.so`) and its CMake target.
    name: &'static str,
    source: PathBuf,
    /// The CMake variable naming the tree.
    tree_var: &'static str,
    tree: PathBuf,
}

/// Configures (when needed) and builds one project; returns the shared library's path.
fn cmake_build(cmake: &Cmake, generator: &Generator, builds: &Path, project: &Project) -> PathBuf {
    let Project {
        name,
        source,
        tree_var,
        tree,
    } = project;
    let key = format!(
        "{:016x}",
        // the two projects build different trees, so the tree alone tells them apart
        fnv1a(format!("{BUILD_LAYOUT}|{}|{}", tree.display(), generator.name).as_bytes())
    );
    let build_dir = builds.join(key);
    fs::create_dir_all(&build_dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", build_dir.display()));
    let log_path = build_dir.join(format!("{name}-build.log"));
    // every run appends (a no-op build adds a few lines); start over once it gets large
    if fs::metadata(&log_path).is_ok_and(|m| m.len() > 4 << 20) {
        let _ = fs::remove_file(&log_path);
    }
    let mut log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", log_path.display()));

    let mut configure: Vec<OsString> = vec![
        "-S".into(),
        source.clone().into(),
        "-B".into(),
        build_dir.clone().into(),
        "-G".into(),
        generator.name.into(),
        format!("-D{tree_var}={}", tree.display()).into(),
        "-DCMAKE_BUILD_TYPE=Release".into(),
    ];
    if let Some(program) = &generator.program {
        configure.push(format!("-DCMAKE_MAKE_PROGRAM={}", program.display()).into());
    }

    // Reconfigure only when CMake or its arguments differ from the last successful configure:
    // the build step re-runs CMake by itself when a CMakeLists.txt changes.
    let stamp = build_dir.join(format!("{name}-configure.args"));
    let args_text = std::iter::once(format!("{:?} {:?}", cmake.program, cmake.python_path))
        .chain(configure.iter().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join("\n");
    let configured = build_dir.join("CMakeCache.txt").exists()
        && fs::read_to_string(&stamp)
            .map(|s| s == args_text)
            .unwrap_or(false);
    if !configured {
        let _ = fs::remove_file(&stamp);
        // the generated build files name the CMake that wrote them: another CMake (or one that
        // went away) configures afresh, and unchanged compile flags keep the objects valid
        let _ = fs::remove_file(build_dir.join("CMakeCache.txt"));
        run_logged(
            cmake.command().args(&configure),
            &mut log,
            &log_path,
            "configure",
        );
        fs::write(&stamp, &args_text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", stamp.display()));
    }

    let jobs = env::var("NUM_JOBS")
        .ok()
        .filter(|j| j.parse::<u32>().is_ok())
        .unwrap_or_else(|| "2".into());
    run_logged(
        cmake.command().arg("--build").arg(&build_dir).args([
            "--target",
            name,
            "--parallel",
            &jobs,
        ]),
        &mut log,
        &log_path,
        "build",
    );

    let lib = build_dir.join(format!("lib{name}.so"));
    assert!(
        lib.exists(),
        "the CMake build did not produce {} (log: {})",
        lib.display(),
        log_path.display()
    );
    lib
}

/// `$LLAMA_CPP_DIR` wins so that a checkout can be tested without touching ggml-sys.
fn locate_tree() -> PathBuf {
    let dir = ["LLAMA_CPP_DIR", "DEP_GGML_LLAMA_CPP_DIR"]
        .iter()
        .find_map(|v| env::var_os(v).filter(|d| !d.is_empty()))
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!(
                "llama-memory-reference: no llama.cpp tree: set LLAMA_CPP_DIR, or build through \
                 ggml-sys, which exports DEP_GGML_LLAMA_CPP_DIR"
            )
        });
    let dir = dir
        .canonicalize()
        .unwrap_or_else(|e| panic!("llama.cpp tree {}: {e}", dir.display()));
    for needed in [
        "CMakeLists.txt",
        "include/llama.h",
        "src/llama-kv-cache.h",
        "ggml/CMakeLists.txt",
    ] {
        assert!(
            dir.join(needed).exists(),
            "{} does not look like a llama.cpp tree (no {needed})",
            dir.display()
        );
    }
    dir
}

/// The crate whose llama.cpp tree is the defragmentation reference: the newest release of
/// `llama-cpp-sys-2` whose tree still has `llama_kv_cache_unified::defrag_prepare` (0.1.122
/// is the first without it).
const DEFRAG_CRATE: &str = "llama-cpp-sys-2";
const DEFRAG_VERSION: &str = "0.1.121";

/// `$DEFRAG_LLAMA_CPP_DIR`, else the `llama.cpp` directory of [`DEFRAG_CRATE`]
/// [`DEFRAG_VERSION`], which `cargo metadata` fetches into the local registry (offline first,
/// as ggml-sys does for the pinned tree).
fn defrag_tree(out_dir: &Path) -> PathBuf {
    if let Some(dir) = env::var_os("DEFRAG_LLAMA_CPP_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let pin = out_dir.join("defrag-pin");
    fs::create_dir_all(pin.join("src")).expect("cannot create OUT_DIR/defrag-pin");
    // cfg(any()) is never true: cargo resolves and downloads the package, never builds it.
    let manifest = format!(
        "[package]\nname = \"defrag-pin\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\
         publish = false\n\n[workspace]\n\n[target.'cfg(any())'.dependencies]\n\
         {DEFRAG_CRATE} = \"={DEFRAG_VERSION}\"\n"
    );
    if fs::read_to_string(pin.join("Cargo.toml")).ok().as_deref() != Some(manifest.as_str()) {
        fs::write(pin.join("Cargo.toml"), &manifest).expect("write defrag-pin/Cargo.toml");
    }
    if !pin.join("src/lib.rs").exists() {
        fs::write(pin.join("src/lib.rs"), "").expect("write defrag-pin/src/lib.rs");
    }
    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut errors = String::new();
    for offline in [true, false] {
        let mut cmd = Command::new(&cargo);
        cmd.args(["metadata", "--format-version", "1", "--manifest-path"])
            .arg(pin.join("Cargo.toml"))
            .current_dir(&pin);
        if offline {
            cmd.arg("--offline");
        }
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cargo:?} metadata: {e}"));
        if out.status.success() {
            let meta: serde_json::Value =
                serde_json::from_slice(&out.stdout).expect("cargo metadata printed invalid JSON");
            let manifest = meta["packages"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["name"] == DEFRAG_CRATE && p["version"] == DEFRAG_VERSION)
                .and_then(|p| p["manifest_path"].as_str())
                .unwrap_or_else(|| {
                    panic!("cargo metadata does not list {DEFRAG_CRATE} {DEFRAG_VERSION}")
                });
            let dir = Path::new(manifest)
                .parent()
                .expect("manifest_path has a parent");
            let tree = PathBuf::from(dir).join("llama.cpp");
            assert!(
                tree.join("src/llama-kv-cache-unified.h").exists(),
                "{} is not the defragmenting llama.cpp tree",
                tree.display()
            );
            return tree;
        }
        errors.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    panic!(
        "cargo metadata could not fetch {DEFRAG_CRATE} {DEFRAG_VERSION} (the defragmentation \
         reference); set DEFRAG_LLAMA_CPP_DIR to its llama.cpp tree instead. cargo said:\n{errors}"
    );
}

/// `<target>/<profile>/build/<pkg>-<hash>/out` → `<target>` (or `<target>/<triple>`), shared
/// by all profiles and by fingerprint changes of this crate.
fn target_root(out_dir: &Path) -> PathBuf {
    let build = out_dir.ancestors().nth(2);
    match (build, out_dir.ancestors().nth(4)) {
        (Some(b), Some(root)) if b.file_name().is_some_and(|n| n == "build") => root.to_path_buf(),
        // an unusual layout: keep everything inside OUT_DIR, correct but rebuilt more often
        _ => out_dir.to_path_buf(),
    }
}

struct Cmake {
    program: PathBuf,
    /// Set when cmake has to run as `python3 -m cmake` with this `PYTHONPATH`.
    python_path: Option<PathBuf>,
}

impl Cmake {
    fn command(&self) -> Command {
        match &self.python_path {
            None => Command::new(&self.program),
            Some(pp) => {
                let mut c = Command::new(&self.program);
                c.args(["-m", "cmake"]).env("PYTHONPATH", pp);
                c
            }
        }
    }
}

fn find_cmake(tools: &Path) -> Cmake {
    let forced = env::var("KVREF_FORCE_PIP_CMAKE").is_ok_and(|v| !v.is_empty() && v != "0");
    if !forced {
        if let Some(c) = env::var_os("CMAKE").filter(|c| !c.is_empty()) {
            return Cmake {
                program: c.into(),
                python_path: None,
            };
        }
        if let Some(c) = which("cmake").filter(|c| cmake_usable(c)) {
            return Cmake {
                program: c,
                python_path: None,
            };
        }
    }

    let dir = tools.join("cmake");
    pip_install(&dir, "cmake>=3.18");
    if let Some(bin) = pip_binary(&dir, "cmake") {
        return Cmake {
            program: bin,
            python_path: None,
        };
    }
    // an unknown wheel layout: the package's module entry point still runs its binary
    Cmake {
        program: python(),
        python_path: Some(dir),
    }
}

/// The executable a pip package installed with `--target dir` ships: the wheels of `cmake`
/// and `ninja` keep it in `<pkg>/data/bin` or (newer ninja) directly in `bin`, where older
/// ones put a Python launcher instead, so a candidate counts only if it runs.
fn pip_binary(dir: &Path, name: &str) -> Option<PathBuf> {
    [
        dir.join(name).join("data").join("bin").join(name),
        dir.join("bin").join(name),
    ]
    .into_iter()
    .find(|p| {
        p.is_file()
            && Command::new(p)
                .arg("--version")
                .stdin(Stdio::null())
                .output()
                .is_ok_and(|o| o.status.success())
    })
}

fn cmake_usable(cmake: &Path) -> bool {
    let Ok(out) = Command::new(cmake).arg("--version").output() else {
        return false;
    };
    // "cmake version 3.25.1": the llama.cpp tree needs 3.14, the shim's CMakeLists 3.14
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.split_whitespace().nth(2).unwrap_or("");
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    out.status.success() && (major, minor) >= (3, 14)
}

struct Generator {
    name: &'static str,
    program: Option<PathBuf>,
}

fn choose_generator(tools: &Path) -> Generator {
    let forced = env::var("KVREF_FORCE_PIP_NINJA").is_ok_and(|v| !v.is_empty() && v != "0");
    if !forced {
        if which("make").is_some() {
            return Generator {
                name: "Unix Makefiles",
                program: None,
            };
        }
        if let Some(ninja) = which("ninja") {
            return Generator {
                name: "Ninja",
                program: Some(ninja),
            };
        }
    }
    let dir = tools.join("ninja");
    pip_install(&dir, "ninja");
    let bin = pip_binary(&dir, "ninja").unwrap_or_else(|| {
        panic!(
            "pip installed ninja into {} but no runnable ninja binary is in it",
            dir.display()
        )
    });
    Generator {
        name: "Ninja",
        program: Some(bin),
    }
}

/// `python3 -m pip install --target <dir> <requirement>`, once: `<dir>` only appears after a
/// complete install, so an interrupted one is retried rather than half used.
fn pip_install(dir: &Path, requirement: &str) {
    if dir.join(".complete").exists() {
        return;
    }
    let staging = dir.with_extension("partial");
    let _ = fs::remove_dir_all(&staging);
    let _ = fs::remove_dir_all(dir);
    let out = Command::new(python())
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "--target",
        ])
        .arg(&staging)
        .arg(requirement)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 -m pip to obtain {requirement}: {e}"));
    if !out.status.success() {
        panic!(
            "`python3 -m pip install --target {} {requirement}` failed:\n{}\n{}",
            staging.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    fs::write(staging.join(".complete"), requirement).expect("write pip stamp");
    fs::rename(&staging, dir).unwrap_or_else(|e| {
        panic!(
            "cannot move {} to {}: {e}",
            staging.display(),
            dir.display()
        )
    });
}

fn python() -> PathBuf {
    if let Some(p) = env::var_os("PYTHON").filter(|p| !p.is_empty()) {
        return p.into();
    }
    which("python3").or_else(|| which("python")).unwrap_or_else(|| {
        panic!("llama-memory-reference: CMake is not installed and python3 (to install it with pip) is not on PATH")
    })
}

fn which(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file() && is_executable(p))
}

#[cfg(unix)]
fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p)
        .map(|m| m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(not(unix))]
fn is_executable(_: &Path) -> bool {
    true
}

/// Runs a CMake step with its output appended to the log; on failure panics with the tail.
fn run_logged(cmd: &mut Command, log: &mut fs::File, log_path: &Path, what: &str) {
    let start = log.seek(SeekFrom::End(0)).unwrap_or(0);
    let _ = writeln!(log, "\n==== {what}: {cmd:?}");
    let t0 = Instant::now();
    let stdout = log.try_clone().expect("clone log handle");
    let stderr = log.try_clone().expect("clone log handle");
    let status = cmd
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let _ = writeln!(
        log,
        "==== {what}: {status} after {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    if !status.success() {
        panic!(
            "llama-memory-reference: CMake {what} failed ({status}); full log: {}\n--- last lines ---\n{}",
            log_path.display(),
            tail(log_path, start, 60)
        );
    }
}

fn tail(path: &Path, from: u64, lines: usize) -> String {
    let mut text = String::new();
    if let Ok(mut f) = fs::File::open(path) {
        let _ = f.seek(SeekFrom::Start(from));
        let _ = f.read_to_string(&mut text);
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A lock directory holding the owner's pid; a lock whose owner is gone (killed build) is
/// taken over. `std::fs::File::lock` would do, but is newer than the workspace's MSRV.
struct DirLock(PathBuf);

impl DirLock {
    fn acquire(path: &Path) -> DirLock {
        let mut warned = false;
        loop {
            match fs::create_dir(path) {
                Ok(()) => {
                    let _ = fs::write(path.join("pid"), std::process::id().to_string());
                    return DirLock(path.to_path_buf());
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    if Self::stale(path) {
                        let _ = fs::remove_dir_all(path);
                        continue;
                    }
                    if !warned {
                        println!("cargo:warning=waiting for another build of the llama.cpp reference ({})", path.display());
                        warned = true;
                    }
                    thread::sleep(Duration::from_millis(500));
                }
                Err(e) => panic!("cannot create lock {}: {e}", path.display()),
            }
        }
    }

    fn stale(path: &Path) -> bool {
        let pid = fs::read_to_string(path.join("pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok());
        let proc_fs = Path::new("/proc/self").exists();
        match pid {
            Some(pid) if proc_fs => !Path::new(&format!("/proc/{pid}")).exists(),
            // no pid yet (just created) or no /proc: only give up on it after a long time
            _ => fs::metadata(path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age > Duration::from_secs(3600)),
        }
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
