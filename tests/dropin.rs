//! The drop-in libllama through CMake (`-DLLAMA_MEMORY_DROPIN=ON`, cmake/LlamaMemoryDropin.cmake):
//! configures and builds the project in `<target>/dropin-build` with the drop-in libllama
//! (`llama`) and a stock one (`llama_stock`) from the same llama.cpp tree and ggml, then runs
//! the ctest tests labelled `dropin`: the exported C symbol sets are equal
//! (tests/dropin/check_symbols.sh), and tests/dropin/equivalence.c gives byte-identical
//! outputs (logits, state blobs, sequence and session files) against both libraries on tiny
//! generated models (tests/dropin/compare.cmake).
//!
//! Part of `cargo test --workspace`; both libraries take a few minutes each to compile on two
//! cores the first time (seconds afterwards), so `LLAMA_MEMORY_DROPIN_TESTS=0` skips it for a
//! quick run. On its own: `cargo test --test dropin -- --nocapture`. CMake:
//! `$CMAKE`, else `cmake` on `PATH` (3.21 or newer), else the one the reference crate's build
//! installed with pip into `<target>/tools/cmake`, else `cmake` from PyPI installed here into
//! `<target>/tools/cmake-dropin`. `CMAKE_BUILD_PARALLEL_LEVEL` (default 2) sets the build jobs.
//!
//! `write_models` is also what the `dropin_models` ctest fixture runs (with
//! `LLAMA_MEMORY_DROPIN_WRITE_MODELS=<dir>`) when ctest is run on its own.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// The models the equivalence configurations use (names as in cmake/LlamaMemoryDropin.cmake).
fn write_models_into(dir: &Path) {
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    type Writer = fn(&Path) -> bool;
    let models: [(&str, Writer); 18] = [
        ("llama", llama_memory_reference::write_model),
        // head size 64: quantized K gets the Hadamard rotation (k_rot)
        ("llama_h64", |p| {
            llama_memory_reference::write_model_ex(p, 2, 128, 2, 1)
        }),
        ("mamba", |p| {
            llama_memory_reference::write_mamba_model(p, 2, 64)
        }),
        ("lfm2", |p| {
            llama_memory_reference::write_lfm2_model(
                p,
                64,
                &llama_memory_reference::LFM2_HEAD_KV,
                3,
            )
        }),
        // lfm2 with a 16-token sliding window on its attention layers: llama_memory_hybrid_iswa
        ("lfm2_swa", |p| {
            llama_memory_reference::write_lfm2_model_ex(
                p,
                64,
                &llama_memory_reference::LFM2_HEAD_KV,
                3,
                llama_memory_reference::LFM2_SWA,
            )
        }),
        // mamba + attention layers: llama_memory_hybrid
        ("jamba", |p| {
            llama_memory_reference::write_jamba_model(p, 64, &llama_memory_reference::JAMBA_HEAD_KV)
        }),
        // two 16-token sliding-window layers and a full one: llama_kv_cache_iswa
        ("gemma3", |p| {
            let (n_layer, n_swa, pattern) = llama_memory_reference::GEMMA3_SWA;
            llama_memory_reference::write_gemma3_model(p, n_layer, 64, n_swa, pattern)
        }),
        // layer KV reuse (shared_kv_layers 2): llama_kv_cache_iswa whose caches list reused layers
        ("gemma4", |p| {
            llama_memory_reference::write_gemma4_model(p, 2)
        }),
        // gemma4's draft model, over a gemma4 context's cells (tests/dropin/assistant.cpp)
        (
            "gemma4_assistant",
            llama_memory_reference::write_gemma4_assistant_model,
        ),
        // a NextN (MTP) block: LLAMA_CONTEXT_TYPE_MTP contexts (tests/dropin/mtp.cpp)
        ("hy_v3", llama_memory_reference::write_hy_v3_model),
        // MLA and a lightning indexer: llama_kv_cache_dsa
        ("deepseek32", llama_memory_reference::write_deepseek32_model),
        // MLA, a lightning indexer on the full layer, a window on the other: llama_kv_cache_dsa_iswa
        ("dots3note", llama_memory_reference::write_dots3note_model),
        // sparse attention with an indexer on its MoE layer: llama_kv_cache_msa
        ("minimax_m3", llama_memory_reference::write_minimax_m3_model),
        // Kimi delta attention beside nope MLA with a k-pool indexer: llama_memory_hybrid_idx
        ("glm5_next", llama_memory_reference::write_glm5_next_model),
        // a raw window, CSA (with an indexer) and HCA layers: llama_kv_cache_dsv4
        ("deepseek4", llama_memory_reference::write_deepseek4_model),
        // a gated delta net with PLE n-gram embeddings beside QSA attention:
        // llama_memory_hybrid_idx, whose cells' tokens get_prev_tokens reads
        ("qwen4exp", |p| {
            llama_memory_reference::write_qwen4exp_model(p, true)
        }),
        // without the n-gram embedding: no token ids in the cells, no cell ext in the indexer
        // cache's state (it still keeps the 2-D positions its pooled keys rotate to)
        ("qwen4exp_nople", |p| {
            llama_memory_reference::write_qwen4exp_model(p, false)
        }),
        // M-RoPE (4 positions per token): no K-shift
        ("qwen2vl", |p| {
            llama_memory_reference::write_qwen2vl_model(
                p,
                2,
                64,
                &llama_memory_reference::QWEN2VL_SECTIONS,
            )
        }),
    ];
    for (name, write) in models {
        let path = dir.join(format!("{name}.gguf"));
        // Written under a private name and renamed, so a concurrent reader never sees a part.
        let tmp = dir.join(format!("{name}.gguf.{}", std::process::id()));
        assert!(
            write(&tmp),
            "cannot write the {name} model to {}",
            tmp.display()
        );
        fs::rename(&tmp, &path).unwrap_or_else(|e| panic!("cannot move {}: {e}", tmp.display()));
        println!("wrote {}", path.display());
    }
}

#[test]
fn write_models() {
    match env::var_os("LLAMA_MEMORY_DROPIN_WRITE_MODELS").filter(|d| !d.is_empty()) {
        Some(dir) => write_models_into(Path::new(&dir)),
        None => eprintln!("LLAMA_MEMORY_DROPIN_WRITE_MODELS not set: nothing to write"),
    }
}

/// The end-to-end benchmark's models (scripts/bench-dropin.sh, tests/dropin/bench.c), written
/// into `LLAMA_MEMORY_BENCH_MODELS=<dir>`: `llama.gguf` (2 layers, width 64, 4 heads, 2 KV
/// heads: the equivalence tests' model) and `tiny1.gguf` (1 layer, width 32, 1 head), where
/// the graph's compute is smallest next to the memory's part of a decode step.
#[test]
#[ignore = "run by scripts/bench-dropin.sh"]
fn write_bench_models() {
    let Some(dir) = env::var_os("LLAMA_MEMORY_BENCH_MODELS").filter(|d| !d.is_empty()) else {
        eprintln!("LLAMA_MEMORY_BENCH_MODELS not set: nothing to write");
        return;
    };
    let dir = Path::new(&dir);
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    for (name, shape) in [("llama", (2, 64, 4, 2)), ("tiny1", (1, 32, 1, 1))] {
        let (n_layer, n_embd, n_head, n_head_kv) = shape;
        let path = dir.join(format!("{name}.gguf"));
        let tmp = dir.join(format!("{name}.gguf.{}", std::process::id()));
        assert!(
            llama_memory_reference::write_model_ex(&tmp, n_layer, n_embd, n_head, n_head_kv),
            "cannot write the {name} model to {}",
            tmp.display()
        );
        fs::rename(&tmp, &path).unwrap_or_else(|e| panic!("cannot move {}: {e}", tmp.display()));
        println!("wrote {}", path.display());
    }
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn target_dir() -> PathBuf {
    // CARGO_TARGET_TMPDIR is <target>/tmp.
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    tmp.parent().map(Path::to_path_buf).unwrap_or(tmp)
}

/// `(major, minor)` of a cmake executable, when it runs.
fn cmake_version(cmake: &Path) -> Option<(u32, u32)> {
    let out = Command::new(cmake)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.split_whitespace().nth(2)?;
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    Some((parts.next()?, parts.next().unwrap_or(0)))
}

fn usable(cmake: &Path) -> bool {
    cmake_version(cmake).is_some_and(|v| v >= (3, 21))
}

fn on_path(name: &str) -> Option<PathBuf> {
    env::split_paths(&env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn pip_cmake(dir: &Path) -> Option<PathBuf> {
    [dir.join("cmake/data/bin/cmake"), dir.join("bin/cmake")]
        .into_iter()
        .find(|p| p.is_file() && usable(p))
}

fn find_cmake(target: &Path) -> PathBuf {
    if let Some(c) = env::var_os("CMAKE").filter(|c| !c.is_empty()) {
        return c.into();
    }
    if let Some(c) = on_path("cmake").filter(|c| usable(c)) {
        return c;
    }
    if let Some(c) = pip_cmake(&target.join("tools/cmake")) {
        return c;
    }
    let dir = target.join("tools/cmake-dropin");
    if let Some(c) = pip_cmake(&dir) {
        return c;
    }
    let python = env::var_os("PYTHON").unwrap_or_else(|| "python3".into());
    let status = Command::new(python)
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "--target",
        ])
        .arg(&dir)
        .arg("cmake>=3.21")
        .stdin(Stdio::null())
        .status()
        .expect("cannot run python3 -m pip to install cmake");
    assert!(
        status.success(),
        "pip install cmake>=3.21 into {} failed",
        dir.display()
    );
    pip_cmake(&dir).unwrap_or_else(|| panic!("no usable cmake in {}", dir.display()))
}

fn run(what: &str, cmd: &mut Command) {
    println!("==> {what}: {cmd:?}");
    let t0 = Instant::now();
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    println!("<== {what}: {:.1} s", t0.elapsed().as_secs_f64());
    assert!(status.success(), "{what} failed: {status}");
}

#[test]
fn dropin_libllama_symbols_and_equivalence() {
    if env::var("LLAMA_MEMORY_DROPIN_TESTS").as_deref() == Ok("0") {
        eprintln!(
            "skipped (LLAMA_MEMORY_DROPIN_TESTS=0): the drop-in libllama is not built or tested"
        );
        return;
    }
    let repo = repo();
    let target = target_dir();
    let build = target.join("dropin-build");
    let models = build.join("dropin-models");
    write_models_into(&models);

    let cmake = find_cmake(&target);
    let jobs = env::var("CMAKE_BUILD_PARALLEL_LEVEL").unwrap_or_else(|_| "2".into());
    let mut configure = Command::new(&cmake);
    configure
        .arg("-S")
        .arg(&repo)
        .arg("-B")
        .arg(&build)
        .args([
            "-DLLAMA_MEMORY_DROPIN=ON",
            "-DLLAMA_MEMORY_BUILD_TESTS=ON",
            "-DLLAMA_MEMORY_CARGO_TEST=OFF",
        ])
        .arg(format!(
            "-DLLAMA_MEMORY_DROPIN_MODELS_DIR={}",
            models.display()
        ));
    if on_path("make").is_none()
        && on_path("ninja").is_some()
        && !build.join("CMakeCache.txt").exists()
    {
        configure.args(["-G", "Ninja"]);
    }
    run("configure", &mut configure);
    // Only what the dropin tests need (not the Rust library nor the C tests).
    for targets in [
        &["ggml", "ggml-base", "ggml-cpu"][..],
        &["llama"][..],
        &["llama_stock"][..],
        &[
            "dropin_equivalence_dropin",
            "dropin_equivalence_stock",
            "dropin_defrag_dropin",
            "dropin_defrag_stock",
            "dropin_hostile_dropin",
            "dropin_hostile_stock",
            "dropin_kshift",
            "dropin_nonfinite",
            "dropin_fit_dropin",
            "dropin_fit_stock",
            "dropin_assistant_dropin",
            "dropin_assistant_stock",
            "dropin_mtp_dropin",
            "dropin_mtp_stock",
        ][..],
    ] {
        let mut build_cmd = Command::new(&cmake);
        build_cmd
            .arg("--build")
            .arg(&build)
            .args(["--parallel", &jobs, "--target"])
            .args(targets);
        run(&format!("build {}", targets.join(" ")), &mut build_cmd);
    }
    let ctest = cmake.with_file_name("ctest");
    let ctest = if ctest.is_file() {
        ctest
    } else {
        PathBuf::from("ctest")
    };
    run(
        "ctest -L dropin",
        Command::new(ctest).arg("--test-dir").arg(&build).args([
            // exactly the label: dropin_slow (the real-model tier) is .ci/run's own step
            "-L",
            "^dropin$",
            "--output-on-failure",
            "-V",
        ]),
    );
}
