//! The slot-level C API (`llama_memory_kv_prepare`, `llama_memory_kv_apply_ubatch`,
//! `llama_memory_kv_get_n_kv`, `llama_memory_kv_set_input_*`, `llama_memory_kv_state_clear`)
//! against stock llama.cpp's `llama_kv_cache` (through the reference shim): random
//! multi-sequence traces drive both with the same ubatches and slot infos, and after every step
//! the cells, the slot infos, `n_kv` and every byte of every input buffer are compared.
//!
//! Slot infos come from `prepare` (ours read back through `llama_memory_slots_get` and handed
//! to apply as they are) or are built by the trace, as llama.cpp's composites build theirs
//! (random cells, free or held by one sequence, which apply overwrites). Masks are also asked
//! for ubatches that were never placed, and `n_kv` for stream sets of one-cell slot infos (as
//! DSV4's compressed caches do).
//!
//! `SEED=<u64>` varies the traces; `DIFF_OPS=<n>` sets the operations per configuration.
//!
//! A second test feeds every entry point invalid input (NULLs, bad streams, cells outside the
//! cache, mismatched sizes, shared or repeated cells...) and checks the failure value, the last
//! error and that the memory did not change.

use std::collections::BTreeMap;
use std::ptr;

use ggml_sys as g;
use llama_memory::ffi::error::llama_memory_result::{self, *};
use llama_memory::ffi::error::{
    llama_memory_clear_last_error, llama_memory_last_error, llama_memory_last_error_code,
};
use llama_memory::ffi::llama_memory_ubatch;
use llama_memory::ffi::*;
use llama_memory_reference as stock;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

const N_REL_ATTN_BKTS: u32 = 32;
const N_LAYERS: u32 = 2;

/// Coverage counters; each must end above 0.
const COUNTERS: &[&str] = &[
    "prepare: slots compared",
    "prepare: 2+ ubatches",
    "prepare: no fit on both sides",
    "find_slot: compared (cont and not)",
    "apply: prepared slot",
    "apply: caller-built slot",
    "apply: caller slot overwrote a used cell",
    "apply: caller slot with 2+ groups in one stream",
    "inputs: kq mask f32 buffer",
    "inputs: kq mask f16 buffer",
    "inputs: kq mask tensor",
    "inputs: kq mask of an unplaced ubatch",
    "inputs: k/v idxs buffers",
    "inputs: k/v idxs tensors",
    "inputs: v_idxs transposed",
    "inputs: pos buckets",
    "n_kv: stream set of one-cell slots",
    "state_clear: seq",
    "state_clear: all",
    "state_clear: zeroed rows compared",
];

#[derive(Clone, Copy, Debug)]
struct Config {
    name: &'static str,
    size: u32,
    n_seq_max: u32,
    unified: bool,
    swa_type: i32,
    n_swa: u32,
    alibi: bool,
    mrope: bool,
    v_trans: bool,
    non_causal: i32,
    ops: u64,
}

const BASE: Config = Config {
    name: "",
    size: 256,
    n_seq_max: 4,
    unified: true,
    swa_type: stock::swa_type::NONE,
    n_swa: 0,
    alibi: false,
    mrope: false,
    v_trans: true,
    non_causal: stock::non_causal_type::ALL,
    ops: 1500,
};

const CONFIGS: &[Config] = &[
    Config {
        name: "unified",
        ..BASE
    },
    Config {
        name: "unified-fa",
        size: 512,
        n_seq_max: 6,
        v_trans: false,
        ..BASE
    },
    Config {
        name: "unified-swa-standard",
        swa_type: stock::swa_type::STANDARD,
        n_swa: 32,
        n_seq_max: 3,
        ..BASE
    },
    Config {
        name: "unified-swa-chunked-swafull",
        swa_type: stock::swa_type::CHUNKED,
        n_swa: 16,
        non_causal: stock::non_causal_type::SWA_FULL,
        ..BASE
    },
    Config {
        name: "unified-swa-symmetric-alibi",
        swa_type: stock::swa_type::SYMMETRIC,
        n_swa: 24,
        alibi: true,
        ..BASE
    },
    Config {
        name: "unified-mrope",
        mrope: true,
        ..BASE
    },
    Config {
        name: "streams",
        unified: false,
        ..BASE
    },
    Config {
        name: "streams-fa-swa",
        unified: false,
        v_trans: false,
        swa_type: stock::swa_type::STANDARD,
        n_swa: 20,
        n_seq_max: 3,
        ..BASE
    },
    Config {
        name: "streams-swa-chunked-swaonly",
        unified: false,
        swa_type: stock::swa_type::CHUNKED,
        n_swa: 64,
        non_causal: stock::non_causal_type::SWA_ONLY,
        ..BASE
    },
];

#[path = "common/host.rs"]
mod host;
use host::{c_ubatch, tensor_read, tensor_write, Host};

#[path = "common/diff.rs"]
mod diff;
#[path = "common/trace.rs"]
mod trace;

/// A slot info the caller owns, with the C view over it.
struct OwnedSlot {
    s0: u32,
    s1: u32,
    strm: Vec<i32>,
    idxs: Vec<Vec<u32>>,
    ptrs: Vec<*const u32>,
}

impl OwnedSlot {
    fn new(s0: u32, s1: u32, strm: Vec<i32>, idxs: Vec<Vec<u32>>) -> OwnedSlot {
        let ptrs = idxs.iter().map(|v| v.as_ptr()).collect();
        OwnedSlot {
            s0,
            s1,
            strm,
            idxs,
            ptrs,
        }
    }

    fn view(&self) -> llama_memory_slot_info {
        llama_memory_slot_info {
            s0: self.s0,
            s1: self.s1,
            n_stream: self.strm.len() as u32,
            size: self.idxs.first().map_or(0, Vec::len) as u32,
            strm: self.strm.as_ptr(),
            idxs: self.ptrs.as_ptr(),
        }
    }

    fn to_stock(&self) -> stock::Slot {
        stock::Slot {
            s0: self.s0,
            s1: self.s1,
            strm: self.strm.clone(),
            idxs: self.idxs.clone(),
        }
    }
}

/// The slot info behind a view from `llama_memory_slots_get`, copied out.
fn read_view(v: &llama_memory_slot_info) -> stock::Slot {
    let (ns, n) = (v.n_stream as usize, v.size as usize);
    // SAFETY: the view comes from llama_memory_slots_get on a live list not changed since:
    // strm and idxs hold n_stream entries, each idxs[k] `size` cells.
    unsafe {
        let strm = std::slice::from_raw_parts(v.strm, ns).to_vec();
        let idxs = std::slice::from_raw_parts(v.idxs, ns)
            .iter()
            .map(|&p| std::slice::from_raw_parts(p, n).to_vec())
            .collect();
        stock::Slot {
            s0: v.s0,
            s1: v.s1,
            strm,
            idxs,
        }
    }
}

/// Our memory through the C ABI: a KV cache with the tiny model's tensors (2 layers).
fn our_memory(cfg: &Config, gqa: u32) -> llama_memory_t {
    let mut p = llama_memory_kv_default_params();
    p.size = cfg.size;
    p.n_seq_max = cfg.n_seq_max;
    p.unified = cfg.unified;
    p.n_swa = cfg.n_swa;
    p.swa_type = cfg.swa_type;
    p.n_pos_per_embd = if cfg.mrope { 4 } else { 1 };
    p.use_alibi = cfg.alibi;
    p.non_causal_type = cfg.non_causal;
    p.v_trans = cfg.v_trans;
    p.n_embd_v_gqa_max = gqa;
    p.n_rel_attn_bkts = N_REL_ATTN_BKTS;
    let layers: Vec<llama_memory_kv_layer> = (0..N_LAYERS)
        .map(|il| llama_memory_kv_layer {
            il,
            n_embd_k_gqa: gqa,
            n_embd_v_gqa: gqa,
            reuse: -1,
            buft: ptr::null_mut(),
        })
        .collect();
    let mut sp = llama_memory_kv_storage_default_params();
    sp.layers = layers.as_ptr();
    sp.n_layers = layers.len();
    let mem = llama_memory_kv_init_with_storage(p, &sp);
    assert!(!mem.is_null(), "init: {}", last_error());
    mem
}

fn stock_params(cfg: &Config) -> stock::Params {
    stock::Params {
        kv_size: cfg.size,
        n_seq_max: cfg.n_seq_max,
        unified: cfg.unified,
        n_swa: cfg.n_swa,
        swa_type: cfg.swa_type,
        v_trans: cfg.v_trans,
        use_alibi: cfg.alibi,
        mrope: cfg.mrope,
        n_rel_attn_bkts: N_REL_ATTN_BKTS,
        non_causal_type: cfg.non_causal,
        ..stock::Params::default()
    }
}

fn last_error() -> String {
    let p = llama_memory_last_error();
    if p.is_null() {
        return "(none)".into();
    }
    // SAFETY: a non-NULL last error is a NUL-terminated string valid until the next failure.
    unsafe { std::ffi::CStr::from_ptr(p) }
        .to_string_lossy()
        .into_owned()
}

/// Every cell of every stream (position, pending shift, sequence bits), through the C ABI.
fn our_cells(mem: llama_memory_t) -> Vec<(i32, i32, [u64; 4])> {
    let (ns, size) = (llama_memory_kv_n_stream(mem), llama_memory_kv_size(mem));
    let mut out = Vec::with_capacity((ns * size) as usize);
    for s in 0..ns {
        for i in 0..size {
            let (mut pos, mut shift, mut bits) = (0, 0, [0u64; 4]);
            let r = llama_memory_kv_get_cell(mem, s, i, &mut pos, &mut shift, bits.as_mut_ptr());
            assert_eq!(r, LLAMA_MEMORY_OK);
            out.push((pos, shift, bits));
        }
    }
    out
}

/// Everything observable of our memory: cells, per-sequence ranges, used counts, K/V bytes.
/// Cells, per-sequence (min, max) positions, K/V tensor bytes.
type Snapshot = (Vec<(i32, i32, [u64; 4])>, Vec<(i32, i32)>, Vec<Vec<u8>>);

fn snapshot(mem: llama_memory_t) -> Snapshot {
    let seqs = (0..llama_memory_n_seq_max(mem) as i32)
        .map(|s| {
            (
                llama_memory_seq_pos_min(mem, s),
                llama_memory_seq_pos_max(mem, s),
            )
        })
        .collect();
    let mut data = Vec::new();
    for il in 0..N_LAYERS {
        for t in [
            llama_memory_kv_get_k_tensor(mem, il),
            llama_memory_kv_get_v_tensor(mem, il),
        ] {
            data.push(tensor_read::<u8>(t));
        }
    }
    (our_cells(mem), seqs, data)
}

struct Pair {
    cfg: Config,
    mem: llama_memory_t,
    slots: llama_memory_slots_t,
    theirs: stock::RefKv,
    rng: StdRng,
    step: u64,
    last_op: String,
    cov: BTreeMap<&'static str, u64>,
}

impl Drop for Pair {
    fn drop(&mut self) {
        llama_memory_slots_free(self.slots);
        llama_memory_free(self.mem);
    }
}

impl Pair {
    fn new(cfg: Config, seed: u64) -> Pair {
        let theirs = stock::RefKv::tiny(&stock_params(&cfg));
        let mem = our_memory(&cfg, theirs.n_embd_v_gqa_max());
        assert_eq!(llama_memory_kv_n_stream(mem), theirs.n_stream());
        assert_eq!(llama_memory_kv_size(mem), theirs.size());
        let slots = llama_memory_slots_init();
        assert!(!slots.is_null());
        let rng = diff::rng(seed, cfg.name);
        let mut p = Pair {
            cfg,
            mem,
            slots,
            theirs,
            rng,
            step: 0,
            last_op: String::new(),
            cov: COUNTERS.iter().map(|&c| (c, 0)).collect(),
        };
        p.fill_tensors();
        p
    }

    fn count(&mut self, what: &'static str) {
        *self.cov.get_mut(what).expect("a listed counter") += 1;
    }

    fn fail(&self, what: String) -> ! {
        panic!(
            "divergence in config {} at step {} after `{}`: {what}",
            self.cfg.name, self.step, self.last_op
        );
    }

    fn n_stream(&self) -> u32 {
        self.theirs.n_stream()
    }

    fn seq(&mut self) -> i32 {
        self.rng.gen_range(0..self.cfg.n_seq_max as i32)
    }

    /// The same random bytes in every K/V tensor on both sides (small values, so that any
    /// f16 pattern is fine), for state_clear to zero.
    fn fill_tensors(&mut self) {
        for il in 0..N_LAYERS {
            for v in [false, true] {
                let t = if v {
                    llama_memory_kv_get_v_tensor(self.mem, il)
                } else {
                    llama_memory_kv_get_k_tensor(self.mem, il)
                };
                // SAFETY: t is a live tensor of our memory.
                let n = unsafe { g::ggml_nbytes(t) };
                let data: Vec<u8> = (0..n).map(|_| self.rng.gen_range(1..=0x3b)).collect();
                assert!(
                    self.theirs.set_tensor_bytes(v, il as i32, &data),
                    "stock layer {il} tensor has another size than ours ({n} bytes)"
                );
                tensor_write(t, &data);
            }
        }
    }

    fn compare_state(&mut self) {
        let ours = our_cells(self.mem);
        let size = self.theirs.size() as usize;
        for s in 0..self.n_stream() {
            let tc = self.theirs.cells(s);
            for i in 0..size {
                let (pos, shift, bits) = ours[s as usize * size + i];
                if pos != tc.pos[i] || shift != tc.shift[i] || bits != tc.seq[i] {
                    self.fail(format!(
                        "stream {s} cell {i}: (pos, shift, seqs) ({pos}, {shift}, {bits:x?}) vs \
                         stock ({}, {}, {:x?})",
                        tc.pos[i], tc.shift[i], tc.seq[i]
                    ));
                }
            }
            let used = llama_memory_kv_n_used(self.mem, s);
            if used != self.theirs.stream_info(s).used {
                self.fail(format!(
                    "stream {s}: {used} used cells vs stock {}",
                    self.theirs.stream_info(s).used
                ));
            }
        }
        for seq in 0..self.cfg.n_seq_max as i32 {
            let a = (
                llama_memory_seq_pos_min(self.mem, seq),
                llama_memory_seq_pos_max(self.mem, seq),
            );
            let b = (self.theirs.seq_pos_min(seq), self.theirs.seq_pos_max(seq));
            if a != b {
                self.fail(format!("seq {seq}: (min, max) {a:?} vs stock {b:?}"));
            }
        }
    }

    fn compare_tensors(&mut self) {
        for il in 0..N_LAYERS {
            for v in [false, true] {
                let t = if v {
                    llama_memory_kv_get_v_tensor(self.mem, il)
                } else {
                    llama_memory_kv_get_k_tensor(self.mem, il)
                };
                let ours = tensor_read::<u8>(t);
                let theirs = self.theirs.tensor_bytes(v, il as i32).unwrap();
                if let Some(i) = (0..ours.len()).find(|&i| ours[i] != theirs[i]) {
                    self.fail(format!(
                        "layer {il} {} byte {i}: {} vs stock {}",
                        if v { "V" } else { "K" },
                        ours[i],
                        theirs[i]
                    ));
                }
            }
        }
    }

    /// What this configuration's traces look like.
    fn trace_shape(&self) -> trace::Shape {
        trace::Shape {
            n_seq_max: self.cfg.n_seq_max,
            unified: self.cfg.unified,
            mrope: self.cfg.mrope,
            near_max: false,
            few_tokens: false,
            ub_seqs: 3,
            few_seqs: trace::FewSeqs::Distinct,
            shared: trace::Shared::One { p: 0.05 },
            large: 32..=160,
            medium: 8..32,
        }
    }

    /// A ubatch shaped as llama.cpp's split for this cache shapes it.
    fn gen_ubatch(&mut self, cursor: &mut [i32]) -> stock::Ubatch {
        let shape = self.trace_shape();
        let mem = self.mem;
        trace::gen_ubatch(&mut self.rng, &shape, cursor, |s| {
            llama_memory_seq_pos_max(mem, s)
        })
    }

    fn n_stream_m(&self, ub: &stock::Ubatch) -> u32 {
        if self.cfg.unified {
            1
        } else {
            ub.seq_id_unq.len() as u32
        }
    }

    /// `prepare` on both sides, then each ubatch applied into its prepared slot (ours read
    /// back from the slots list and handed to apply as they are), with every input compared.
    fn op_prepare(&mut self) {
        let mut cursor = vec![i32::MIN; self.cfg.n_seq_max as usize];
        let n_ub = if self.rng.gen_bool(0.25) {
            self.rng.gen_range(2..=3)
        } else {
            1
        };
        let ubs: Vec<stock::Ubatch> = (0..n_ub).map(|_| self.gen_ubatch(&mut cursor)).collect();
        self.last_op = format!(
            "prepare {n_ub} ubatch(es) of {:?} tokens",
            ubs.iter().map(|u| u.n_tokens()).collect::<Vec<_>>()
        );
        let views: Vec<_> = ubs.iter().map(stock::Ubatch::view).collect();
        let cubs: Vec<llama_memory_ubatch> = views.iter().map(|v| c_ubatch(v.raw())).collect();
        if self.rng.gen_bool(0.15) {
            self.compare_find_slot(&views[0], &cubs[0]);
        }
        let theirs = self.theirs.prepare(&views);
        let r = llama_memory_kv_prepare(self.mem, cubs.as_ptr(), cubs.len(), self.slots);
        self.step += 1;
        self.compare_state();
        let n_slots = llama_memory_slots_count(self.slots);
        let theirs = match (r, theirs) {
            (LLAMA_MEMORY_ERR_NO_SLOT, None) => {
                if n_slots != 0 {
                    self.fail(format!("failed prepare left {n_slots} slot infos"));
                }
                self.count("prepare: no fit on both sides");
                return;
            }
            (LLAMA_MEMORY_OK, Some(t)) => t,
            (r, t) => self.fail(format!("prepare {r:?} ({}) vs stock {t:?}", last_error())),
        };
        if n_slots != n_ub {
            self.fail(format!("{n_slots} slot infos for {n_ub} ubatches"));
        }
        // Read every view first: they stay valid until the next prepare.
        let mut infos = Vec::new();
        for (k, want) in theirs.iter().enumerate() {
            let mut info: llama_memory_slot_info = llama_memory_slot_info {
                s0: 0,
                s1: 0,
                n_stream: 0,
                size: 0,
                strm: ptr::null(),
                idxs: ptr::null(),
            };
            assert_eq!(
                llama_memory_slots_get(self.slots, k, &mut info),
                LLAMA_MEMORY_OK
            );
            let ours = read_view(&info);
            if ours != *want {
                self.fail(format!("slot {k}: {ours:?} vs stock {want:?}"));
            }
            self.count("prepare: slots compared");
            infos.push(info);
        }
        if n_ub > 1 {
            self.count("prepare: 2+ ubatches");
        }
        for k in 0..n_ub {
            self.last_op = format!("apply prepared slot {k} of {} tokens", ubs[k].n_tokens());
            self.theirs.apply_ubatch(&theirs[k], &views[k]);
            let r = llama_memory_kv_apply_ubatch(self.mem, &infos[k], &cubs[k]);
            if r != LLAMA_MEMORY_OK {
                self.fail(format!("apply {r:?}: {}", last_error()));
            }
            self.step += 1;
            self.count("apply: prepared slot");
            self.compare_state();
            self.compare_inputs(&ubs[k], &infos[k], &theirs[k]);
        }
    }

    /// `find_slot(ubatch, cont)` on both sides (nothing changes).
    fn compare_find_slot(&mut self, v: &stock::UbatchRef<'_>, cu: &llama_memory_ubatch) {
        let cont = self.rng.gen_bool(0.5);
        let theirs = self.theirs.find_slot(v, cont);
        let r = llama_memory_kv_find_slot(self.mem, cu, cont, self.slots);
        let ours = match r {
            LLAMA_MEMORY_OK => {
                assert_eq!(llama_memory_slots_count(self.slots), 1);
                let mut info = OwnedSlot::new(0, 0, vec![0], vec![vec![0]]).view();
                assert_eq!(
                    llama_memory_slots_get(self.slots, 0, &mut info),
                    LLAMA_MEMORY_OK
                );
                Some(read_view(&info))
            }
            LLAMA_MEMORY_ERR_NO_SLOT => {
                assert_eq!(llama_memory_slots_count(self.slots), 0);
                None
            }
            r => self.fail(format!("find_slot {r:?}: {}", last_error())),
        };
        if ours != theirs {
            self.fail(format!(
                "find_slot(cont {cont}) {ours:?} vs stock {theirs:?}"
            ));
        }
        self.step += 1;
        self.count("find_slot: compared (cont and not)");
        self.compare_state();
    }

    /// A slot the caller builds (as llama.cpp's composites do): random cells of the right
    /// streams, free or held by a single sequence (apply overwrites those).
    fn op_caller_slot(&mut self) {
        let mut cursor = vec![i32::MIN; self.cfg.n_seq_max as usize];
        let ub = self.gen_ubatch(&mut cursor);
        let n = ub.n_tokens() as usize;
        let (groups, strm): (usize, Vec<i32>) = if self.cfg.unified {
            let g = if n % 2 == 0 && self.rng.gen_bool(0.3) {
                2
            } else {
                1
            };
            (g, vec![0; g])
        } else {
            (ub.seq_id_unq.len(), ub.seq_id_unq.clone())
        };
        let per = n / groups;
        let p_used = self.rng.gen_range(0.0..0.5);
        let mut idxs = Vec::new();
        let mut overwrote = false;
        for (k, &s) in strm.iter().enumerate() {
            let cells = self.theirs.cells(s as u32);
            let mut free: Vec<u32> = Vec::new();
            let mut single: Vec<u32> = Vec::new();
            for i in 0..cells.pos.len() {
                // the earlier groups of the same stream already took their cells
                if idxs.iter().any(|g: &Vec<u32>| g.contains(&(i as u32))) && strm[..k].contains(&s)
                {
                    continue;
                }
                match cells.seqs(i).len() {
                    0 => free.push(i as u32),
                    1 => single.push(i as u32),
                    _ => {}
                }
            }
            free.shuffle(&mut self.rng);
            single.shuffle(&mut self.rng);
            let mut pick = Vec::with_capacity(per);
            while pick.len() < per {
                let from_single =
                    !single.is_empty() && (free.is_empty() || self.rng.gen_bool(p_used));
                match if from_single {
                    single.pop()
                } else {
                    free.pop()
                } {
                    Some(i) => {
                        overwrote |= from_single;
                        pick.push(i)
                    }
                    None => return, // the stream is full of shared cells: nothing to build
                }
            }
            idxs.push(pick);
        }
        let (mut s0, mut s1) = (
            *strm.iter().min().unwrap() as u32,
            *strm.iter().max().unwrap() as u32,
        );
        // A wider [s0, s1] than the streams used is accepted (apply does not read it).
        if self.rng.gen_bool(0.1) {
            s0 = self.rng.gen_range(0..=s0);
            s1 = self.rng.gen_range(s1..self.n_stream());
        }
        let slot = OwnedSlot::new(s0, s1, strm, idxs);
        let their_slot = slot.to_stock();
        let v = ub.view();
        let cu = c_ubatch(v.raw());
        self.last_op = format!(
            "apply caller slot of {n} tokens in {groups} group(s), overwriting: {overwrote}"
        );
        self.theirs.apply_ubatch(&their_slot, &v);
        let info = slot.view();
        let r = llama_memory_kv_apply_ubatch(self.mem, &info, &cu);
        if r != LLAMA_MEMORY_OK {
            self.fail(format!("apply {r:?}: {}", last_error()));
        }
        self.step += 1;
        self.count("apply: caller-built slot");
        if overwrote {
            self.count("apply: caller slot overwrote a used cell");
        }
        if self.cfg.unified && groups > 1 {
            self.count("apply: caller slot with 2+ groups in one stream");
        }
        self.compare_state();
        self.compare_inputs(&ub, &info, &their_slot);
    }

    fn compare_inputs(
        &mut self,
        ub: &stock::Ubatch,
        info: &llama_memory_slot_info,
        theirs: &stock::Slot,
    ) {
        let n_kv = llama_memory_kv_get_n_kv(self.mem, info);
        let want = self.theirs.get_n_kv(theirs);
        if n_kv != want {
            self.fail(format!("n_kv {n_kv} ({}) vs stock {want}", last_error()));
        }
        self.step += 1;
        self.compare_mask(ub, n_kv);
        let v = ub.view();
        let cu = c_ubatch(v.raw());
        let nt = ub.n_tokens() as usize;
        let k_want = self.theirs.k_idxs(&v, theirs);
        let v_want = self.theirs.v_idxs(&v, theirs);
        let (k_got, v_got) = if self.rng.gen_bool(0.5) {
            let mut k = vec![-7i64; nt];
            let mut vv = vec![-7i64; v_want.len()];
            let rk = llama_memory_kv_set_input_k_idxs(self.mem, &cu, info, k.as_mut_ptr(), k.len());
            let rv =
                llama_memory_kv_set_input_v_idxs(self.mem, &cu, info, vv.as_mut_ptr(), vv.len());
            if (rk, rv) != (LLAMA_MEMORY_OK, LLAMA_MEMORY_OK) {
                self.fail(format!("k/v idxs {rk:?} {rv:?}: {}", last_error()));
            }
            self.count("inputs: k/v idxs buffers");
            (k, vv)
        } else {
            let (_host, t) = Host::new(&[
                (g::GGML_TYPE_I64, [nt as i64, 1, 1, 1]),
                (g::GGML_TYPE_I64, [v_want.len() as i64, 1, 1, 1]),
            ]);
            let rk = llama_memory_kv_set_input_k_idxs_tensor(self.mem, t[0], &cu, info);
            let rv = llama_memory_kv_set_input_v_idxs_tensor(self.mem, t[1], &cu, info);
            if (rk, rv) != (LLAMA_MEMORY_OK, LLAMA_MEMORY_OK) {
                self.fail(format!("k/v idxs tensors {rk:?} {rv:?}: {}", last_error()));
            }
            self.count("inputs: k/v idxs tensors");
            (tensor_read::<i64>(t[0]), tensor_read::<i64>(t[1]))
        };
        if k_got != k_want {
            self.fail(format!("k_idxs {k_got:?} vs stock {k_want:?}"));
        }
        if v_got != v_want {
            self.fail("v_idxs differ".into());
        }
        if self.cfg.v_trans {
            self.count("inputs: v_idxs transposed");
        }
        if self.cfg.unified && !ub.equal_seqs && self.rng.gen_bool(0.3) {
            let want = self.theirs.pos_bucket(&v, n_kv);
            let mut got = vec![-7i32; want.len()];
            let r = llama_memory_kv_set_input_pos_bucket(
                self.mem,
                &cu,
                n_kv,
                got.as_mut_ptr(),
                got.len(),
            );
            if r != LLAMA_MEMORY_OK || got != want {
                self.fail(format!("pos buckets ({r:?}, {})", last_error()));
            }
            let (_host, t) = Host::new(&[(g::GGML_TYPE_I32, [n_kv as i64, nt as i64, 1, 1])]);
            let r = llama_memory_kv_set_input_pos_bucket_tensor(self.mem, t[0], &cu);
            if r != LLAMA_MEMORY_OK || tensor_read::<i32>(t[0]) != want {
                self.fail(format!("pos bucket tensor ({r:?}, {})", last_error()));
            }
            self.count("inputs: pos buckets");
        }
        self.step += 1;
    }

    /// The KQ mask of `ub` over `n_kv` cells, f32 or f16, into a buffer or a tensor.
    fn compare_mask(&mut self, ub: &stock::Ubatch, n_kv: u32) {
        let v = ub.view();
        let cu = c_ubatch(v.raw());
        let nsm = self.n_stream_m(ub);
        let causal = self.rng.gen_bool(0.7);
        let len = n_kv as usize * ub.n_tokens() as usize;
        let f16 = self.rng.gen_bool(0.4);
        let want: Vec<u32> = if f16 {
            let w = self.theirs.kq_mask_f16(&v, causal, n_kv, nsm);
            w.into_iter().map(u32::from).collect()
        } else {
            let w = self.theirs.kq_mask_f32(&v, causal, n_kv, nsm);
            w.into_iter().map(f32::to_bits).collect()
        };
        let got: Vec<u32> = if self.rng.gen_bool(0.3) {
            let ty = if f16 {
                g::GGML_TYPE_F16
            } else {
                g::GGML_TYPE_F32
            };
            let nt = ub.n_tokens() as i64;
            let (_host, t) = Host::new(&[(ty, [n_kv as i64, nt / nsm as i64, 1, nsm as i64])]);
            let r = llama_memory_kv_set_input_kq_mask_tensor(self.mem, t[0], &cu, causal);
            if r != LLAMA_MEMORY_OK {
                self.fail(format!("mask tensor {r:?}: {}", last_error()));
            }
            self.count("inputs: kq mask tensor");
            if f16 {
                tensor_read::<u16>(t[0])
                    .into_iter()
                    .map(u32::from)
                    .collect()
            } else {
                tensor_read::<f32>(t[0])
                    .into_iter()
                    .map(f32::to_bits)
                    .collect()
            }
        } else if f16 {
            let mut o = vec![0x3C00u16; len];
            let r = llama_memory_kv_set_input_kq_mask(
                self.mem,
                &cu,
                causal,
                n_kv,
                nsm,
                true,
                o.as_mut_ptr().cast(),
                len,
            );
            if r != LLAMA_MEMORY_OK {
                self.fail(format!("mask f16 {r:?}: {}", last_error()));
            }
            self.count("inputs: kq mask f16 buffer");
            o.into_iter().map(u32::from).collect()
        } else {
            let mut o = vec![1.0f32; len];
            let r = llama_memory_kv_set_input_kq_mask(
                self.mem,
                &cu,
                causal,
                n_kv,
                nsm,
                false,
                o.as_mut_ptr().cast(),
                len,
            );
            if r != LLAMA_MEMORY_OK {
                self.fail(format!("mask f32 {r:?}: {}", last_error()));
            }
            self.count("inputs: kq mask f32 buffer");
            o.into_iter().map(f32::to_bits).collect()
        };
        if let Some(i) = (0..len).find(|&i| got[i] != want[i]) {
            self.fail(format!(
                "kq mask (causal {causal}, f16 {f16}) entry {i} (row {}, cell {}): {:#x} vs stock {:#x}",
                i / n_kv as usize,
                i % n_kv as usize,
                got[i],
                want[i]
            ));
        }
    }

    /// The mask of a ubatch that is not placed (a composite asks for masks of its own
    /// ubatches), over a random `n_kv`.
    fn op_unplaced_mask(&mut self) {
        let mut cursor = vec![i32::MIN; self.cfg.n_seq_max as usize];
        let ub = self.gen_ubatch(&mut cursor);
        let n_kv = self.rng.gen_range(1..=self.cfg.size);
        self.last_op = format!("mask of an unplaced ubatch of {} tokens", ub.n_tokens());
        self.compare_mask(&ub, n_kv);
        self.step += 1;
        self.count("inputs: kq mask of an unplaced ubatch");
    }

    /// `get_n_kv` of one-cell slot infos over a set of streams (DSV4's compressed slots).
    fn op_stream_set_n_kv(&mut self) {
        let ns = self.n_stream();
        let s0 = self.rng.gen_range(0..ns);
        let s1 = self.rng.gen_range(s0..ns);
        let strm: Vec<i32> = (s0 as i32..=s1 as i32).collect();
        let slot = OwnedSlot::new(s0, s1, strm.clone(), vec![vec![0]; strm.len()]);
        self.last_op = format!("get_n_kv of streams {s0}..={s1}");
        let got = llama_memory_kv_get_n_kv(self.mem, &slot.view());
        let want = self.theirs.get_n_kv(&slot.to_stock());
        if got != want {
            self.fail(format!("n_kv {got} ({}) vs stock {want}", last_error()));
        }
        self.step += 1;
        self.count("n_kv: stream set of one-cell slots");
    }

    fn op_seq(&mut self) {
        let size = self.cfg.size as i32;
        let bound = |rng: &mut StdRng| match rng.gen_range(0..5) {
            0 => -1,
            _ => rng.gen_range(0..size + 40),
        };
        let (p0, p1) = (bound(&mut self.rng), bound(&mut self.rng));
        match self.rng.gen_range(0..6) {
            0..=2 => {
                let s = self.seq();
                self.last_op = format!("seq_rm({s}, {p0}, {p1})");
                let a = llama_memory_seq_rm(self.mem, s, p0, p1);
                if a != self.theirs.seq_rm(s, p0, p1) {
                    self.fail("seq_rm result".into());
                }
            }
            3 => {
                let (src, dst) = (self.seq(), self.seq());
                let (p0, p1) = if self.cfg.unified || src == dst {
                    (p0, p1)
                } else {
                    (-1, -1)
                };
                self.last_op = format!("seq_cp({src}, {dst}, {p0}, {p1})");
                llama_memory_seq_cp(self.mem, src, dst, p0, p1);
                self.theirs.seq_cp(src, dst, p0, p1);
            }
            4 => {
                let s = self.seq();
                self.last_op = format!("seq_keep({s})");
                llama_memory_seq_keep(self.mem, s);
                self.theirs.seq_keep(s);
            }
            _ if !self.cfg.mrope => {
                let s = self.seq();
                let d = self.rng.gen_range(-30..30);
                self.last_op = format!("seq_add({s}, {p0}, {p1}, {d})");
                llama_memory_seq_add(self.mem, s, p0, p1, d);
                self.theirs.seq_add(s, p0, p1, d);
            }
            _ => return,
        }
        self.step += 1;
        self.compare_state();
    }

    fn op_state_clear(&mut self) {
        if self.rng.gen_bool(0.5) {
            self.fill_tensors();
        }
        let seq = if self.rng.gen_bool(0.1) {
            -1
        } else {
            self.seq()
        };
        self.last_op = format!("state_clear({seq})");
        let before = our_cells(self.mem);
        let r = llama_memory_kv_state_clear(self.mem, seq);
        if r != LLAMA_MEMORY_OK {
            self.fail(format!("state_clear {r:?}: {}", last_error()));
        }
        self.theirs.state_clear(seq);
        self.step += 1;
        self.compare_state();
        self.compare_tensors();
        let zeroed = before
            .iter()
            .zip(our_cells(self.mem))
            .any(|(b, a)| b.0 != -1 && a.0 == -1);
        self.count(if seq == -1 {
            "state_clear: all"
        } else {
            "state_clear: seq"
        });
        if zeroed {
            self.count("state_clear: zeroed rows compared");
        }
    }

    fn run(&mut self, ops: u64) -> u64 {
        self.compare_tensors();
        let start = self.step;
        for _ in 0..ops {
            let r: f64 = self.rng.gen();
            if r < 0.40 {
                self.op_prepare();
            } else if r < 0.58 {
                self.op_caller_slot();
            } else if r < 0.63 {
                self.op_unplaced_mask();
            } else if r < 0.67 {
                self.op_stream_set_n_kv();
            } else if r < 0.70 {
                self.op_state_clear();
            } else {
                self.op_seq();
            }
        }
        self.compare_tensors();
        self.step - start
    }
}

#[test]
fn slot_api_matches_stock_llama_cpp() {
    std::env::set_var("KVREF_QUIET", "1");
    let seed = diff::seed(0x5107_5eed);
    let scale = diff::ops_scale(BASE.ops);
    let mut total = 0;
    let mut cov: BTreeMap<&'static str, u64> = COUNTERS.iter().map(|&c| (c, 0)).collect();
    let mut report = String::new();
    for cfg in CONFIGS {
        let t0 = std::time::Instant::now();
        let mut pair = Pair::new(*cfg, seed);
        let n = pair.run(((cfg.ops as f64) * scale).max(1.0) as u64);
        report += &format!(
            "slot differential: config {:<30} {n:>6} compared steps, 0 divergences ({:.1} s)\n",
            cfg.name,
            t0.elapsed().as_secs_f64()
        );
        total += n;
        diff::add_coverage(&mut cov, &pair.cov);
    }
    diff::report_coverage(&mut report, "slot differential", &cov, 48, 7);
    report += &format!(
        "slot differential: seed {seed:#x}: {total} compared steps over {} configurations\n",
        CONFIGS.len()
    );
    diff::write_summary("slot-differential-summary.txt", &report);
    let missing = diff::never_reached(&cov);
    assert!(missing.is_empty(), "the traces never produced: {missing:?}");
}

/// Every slot-level entry point given invalid input: the failure value, a last error, and
/// the memory (cells, sequence ranges, tensor bytes) exactly as before.
#[test]
fn slot_api_rejects_bad_input_and_changes_nothing() {
    std::env::set_var("KVREF_QUIET", "1");
    for unified in [true, false] {
        let cfg = Config {
            name: "bad-input",
            size: 64,
            n_seq_max: 3,
            unified,
            swa_type: stock::swa_type::STANDARD,
            n_swa: 8,
            ..BASE
        };
        let mut pair = Pair::new(cfg, 7);
        let mem = pair.mem;
        // Some content: seq 0 and 1 at 0..6 (unified: cells 0..6 hold seq 0, 6..12 seq 1),
        // plus a cell shared by 0 and 2 in the unified cache.
        for s in 0..2 {
            let ub = stock::Ubatch::for_seq(s, 0, 6);
            let v = ub.view();
            let cu = c_ubatch(v.raw());
            assert_eq!(
                llama_memory_kv_prepare(mem, &cu, 1, pair.slots),
                LLAMA_MEMORY_OK
            );
            let mut info = OwnedSlot::new(0, 0, vec![0], vec![vec![0]]).view();
            assert_eq!(
                llama_memory_slots_get(pair.slots, 0, &mut info),
                LLAMA_MEMORY_OK
            );
            let theirs = read_view(&info);
            assert_eq!(
                llama_memory_kv_apply_ubatch(mem, &info, &cu),
                LLAMA_MEMORY_OK
            );
            pair.theirs.apply_ubatch(&theirs, &v);
        }
        if unified {
            llama_memory_seq_cp(mem, 0, 2, 0, 1);
            pair.theirs.seq_cp(0, 2, 0, 1);
        }
        pair.compare_state();
        let before = snapshot(mem);

        let ub = stock::Ubatch::for_seq(if unified { 1 } else { 2 }, 6, 4);
        let v = ub.view();
        let cu = c_ubatch(v.raw());
        let strm = if unified { 0 } else { 2 };
        let good = || {
            OwnedSlot::new(
                strm as u32,
                strm as u32,
                vec![strm],
                vec![vec![20, 21, 22, 23]],
            )
        };
        let mut checks = 0;
        let mut expect = |what: &str, got: llama_memory_result, want: llama_memory_result| {
            assert_eq!(got, want, "{what} (unified {unified}): {}", last_error());
            assert_ne!(last_error(), "(none)", "{what}: no last error");
            llama_memory_clear_last_error();
            assert_eq!(snapshot(mem), before, "{what}: the memory changed");
            checks += 1;
        };

        // Slot infos that do not describe this cache.
        let mut bad: Vec<(&str, OwnedSlot)> = vec![
            ("bad stream", {
                let n = llama_memory_kv_n_stream(mem) as i32;
                OwnedSlot::new(0, n as u32, vec![n], vec![vec![20, 21, 22, 23]])
            }),
            (
                "negative stream",
                OwnedSlot::new(0, 0, vec![-1], vec![vec![20, 21, 22, 23]]),
            ),
            (
                "idx >= size",
                OwnedSlot::new(
                    strm as u32,
                    strm as u32,
                    vec![strm],
                    vec![vec![20, 21, 22, 64]],
                ),
            ),
            ("s0 > s1", {
                let mut s = good();
                s.s0 = 1;
                s.s1 = 0;
                s
            }),
            ("stream outside [s0, s1]", {
                let mut s = good();
                s.s0 = strm as u32 + 1;
                s.s1 = strm as u32 + 1;
                s
            }),
            (
                "too few cells for the ubatch",
                OwnedSlot::new(strm as u32, strm as u32, vec![strm], vec![vec![20, 21, 22]]),
            ),
            (
                "cell listed twice",
                OwnedSlot::new(
                    strm as u32,
                    strm as u32,
                    vec![strm],
                    vec![vec![20, 21, 21, 23]],
                ),
            ),
            ("two groups of different sizes", {
                let mut s = OwnedSlot::new(
                    strm as u32,
                    strm as u32,
                    vec![strm, strm],
                    vec![vec![20, 21, 22], vec![23]],
                );
                s.ptrs = s.idxs.iter().map(|v| v.as_ptr()).collect();
                s
            }),
        ];
        if unified {
            // cell 0 holds seq 0 and seq 2
            bad.push((
                "cell shared by two sequences",
                OwnedSlot::new(0, 0, vec![0], vec![vec![0, 21, 22, 23]]),
            ));
        } else {
            // the tokens of seq 2 placed in stream 1
            bad.push((
                "stream not holding the sequence",
                OwnedSlot::new(1, 1, vec![1], vec![vec![20, 21, 22, 23]]),
            ));
        }
        for (what, s) in &bad {
            let info = s.view();
            expect(
                what,
                llama_memory_kv_apply_ubatch(mem, &info, &cu),
                LLAMA_MEMORY_ERR_INVALID_ARGUMENT,
            );
        }
        // Views that lie about their arrays.
        let g = good();
        let mut info = g.view();
        info.n_stream = 0;
        expect(
            "n_stream 0",
            llama_memory_kv_apply_ubatch(mem, &info, &cu),
            LLAMA_MEMORY_ERR_INVALID_ARGUMENT,
        );
        info.n_stream = 257;
        expect(
            "n_stream 257",
            llama_memory_kv_apply_ubatch(mem, &info, &cu),
            LLAMA_MEMORY_ERR_INVALID_ARGUMENT,
        );
        let mut info = g.view();
        info.size = 0;
        expect(
            "size 0",
            llama_memory_kv_apply_ubatch(mem, &info, &cu),
            LLAMA_MEMORY_ERR_INVALID_ARGUMENT,
        );
        info.size = 65;
        expect(
            "size > cache",
            llama_memory_kv_apply_ubatch(mem, &info, &cu),
            LLAMA_MEMORY_ERR_INVALID_ARGUMENT,
        );
        let mut info = g.view();
        info.idxs = ptr::null();
        expect(
            "idxs NULL",
            llama_memory_kv_apply_ubatch(mem, &info, &cu),
            LLAMA_MEMORY_ERR_NULL_ARGUMENT,
        );
        let nulls = [ptr::null::<u32>()];
        info.idxs = nulls.as_ptr();
        expect(
            "idxs[0] NULL",
            llama_memory_kv_apply_ubatch(mem, &info, &cu),
            LLAMA_MEMORY_ERR_NULL_ARGUMENT,
        );
        let mut info = g.view();
        info.strm = ptr::null();
        expect(
            "strm NULL",
            llama_memory_kv_apply_ubatch(mem, &info, &cu),
            LLAMA_MEMORY_ERR_NULL_ARGUMENT,
        );
        let info = g.view();
        expect(
            "sinfo NULL",
            llama_memory_kv_apply_ubatch(mem, ptr::null(), &cu),
            LLAMA_MEMORY_ERR_NULL_ARGUMENT,
        );
        expect(
            "ubatch NULL",
            llama_memory_kv_apply_ubatch(mem, &info, ptr::null()),
            LLAMA_MEMORY_ERR_NULL_ARGUMENT,
        );
        expect(
            "mem NULL",
            llama_memory_kv_apply_ubatch(ptr::null_mut(), &info, &cu),
            LLAMA_MEMORY_ERR_NULL_ARGUMENT,
        );
        // A ubatch the cache refuses.
        let bad_ub = stock::Ubatch::for_seq(3, 6, 4);
        let bv = bad_ub.view();
        let bcu = c_ubatch(bv.raw());
        expect(
            "seq id >= n_seq_max",
            llama_memory_kv_apply_ubatch(mem, &info, &bcu),
            LLAMA_MEMORY_ERR_INVALID_SEQ_ID,
        );

        // get_n_kv: 0 and a last error.
        let bad_info = bad[0].1.view();
        assert_eq!(llama_memory_kv_get_n_kv(mem, &bad_info), 0);
        expect(
            "get_n_kv bad stream",
            llama_memory_last_error_code(),
            LLAMA_MEMORY_ERR_INVALID_ARGUMENT,
        );
        assert_eq!(llama_memory_kv_get_n_kv(mem, ptr::null()), 0);
        expect(
            "get_n_kv NULL",
            llama_memory_last_error_code(),
            LLAMA_MEMORY_ERR_NULL_ARGUMENT,
        );

        // Inputs: mismatched sizes, short buffers, wrong tensors.
        let mut k = vec![0i64; 8];
        let short = OwnedSlot::new(strm as u32, strm as u32, vec![strm], vec![vec![20, 21, 22]]);
        expect(
            "k_idxs slot/ubatch mismatch",
            llama_memory_kv_set_input_k_idxs(mem, &cu, &short.view(), k.as_mut_ptr(), k.len()),
            LLAMA_MEMORY_ERR_INVALID_ARGUMENT,
        );
        expect(
            "k_idxs buffer too small",
            llama_memory_kv_set_input_k_idxs(mem, &cu, &info, k.as_mut_ptr(), 3),
            LLAMA_MEMORY_ERR_BUFFER_TOO_SMALL,
        );
        expect(
            "v_idxs buffer too small",
            llama_memory_kv_set_input_v_idxs(mem, &cu, &info, k.as_mut_ptr(), 8),
            LLAMA_MEMORY_ERR_BUFFER_TOO_SMALL,
        );
        expect(
            "v_idxs bad stream",
            llama_memory_kv_set_input_v_idxs(mem, &cu, &bad_info, k.as_mut_ptr(), 8),
            LLAMA_MEMORY_ERR_INVALID_ARGUMENT,
        );
        let (_host, t) = Host::new(&[
            (g::GGML_TYPE_I32, [4, 1, 1, 1]),
            (g::GGML_TYPE_F32, [64, 3, 1, 1]),
            (g::GGML_TYPE_F32, [65, 4, 1, 1]),
        ]);
        expect(
            "k_idxs tensor of the wrong type",
            llama_memory_kv_set_input_k_idxs_tensor(mem, t[0], &cu, &info),
            LLAMA_MEMORY_ERR_INVALID_ARGUMENT,
        );
        expect(
            "mask tensor of the wrong shape",
            llama_memory_kv_set_input_kq_mask_tensor(mem, t[1], &cu, true),
            LLAMA_MEMORY_ERR_INVALID_ARGUMENT,
        );
        expect(
            "mask tensor wider than the cache",
            llama_memory_kv_set_input_kq_mask_tensor(mem, t[2], &cu, true),
            LLAMA_MEMORY_ERR_INVALID_ARGUMENT,
        );
        let mut m = vec![0f32; 65 * 4];
        expect(
            "mask n_kv > size",
            llama_memory_kv_set_input_kq_mask(
                mem,
                &cu,
                true,
                65,
                1,
                false,
                m.as_mut_ptr().cast(),
                m.len(),
            ),
            LLAMA_MEMORY_ERR_INVALID_ARGUMENT,
        );
        expect(
            "mask n_stream not dividing the tokens",
            llama_memory_kv_set_input_kq_mask(
                mem,
                &cu,
                true,
                64,
                3,
                false,
                m.as_mut_ptr().cast(),
                m.len(),
            ),
            LLAMA_MEMORY_ERR_INVALID_ARGUMENT,
        );
        expect(
            "mask buffer too small",
            llama_memory_kv_set_input_kq_mask(
                mem,
                &cu,
                true,
                64,
                1,
                false,
                m.as_mut_ptr().cast(),
                64 * 4 - 1,
            ),
            LLAMA_MEMORY_ERR_BUFFER_TOO_SMALL,
        );
        expect(
            "mask ubatch NULL",
            llama_memory_kv_set_input_kq_mask(
                mem,
                ptr::null(),
                true,
                64,
                1,
                false,
                m.as_mut_ptr().cast(),
                m.len(),
            ),
            LLAMA_MEMORY_ERR_NULL_ARGUMENT,
        );
        let mut pb = vec![0i32; 64 * 4];
        expect(
            "pos bucket n_kv > size",
            llama_memory_kv_set_input_pos_bucket(mem, &cu, 65, pb.as_mut_ptr(), pb.len()),
            if unified {
                LLAMA_MEMORY_ERR_INVALID_ARGUMENT
            } else {
                LLAMA_MEMORY_ERR_UNSUPPORTED
            },
        );

        // prepare: no ubatches, NULL list, an invalid ubatch (the list is emptied), no fit.
        assert_eq!(
            llama_memory_kv_prepare(mem, &cu, 1, pair.slots),
            LLAMA_MEMORY_OK
        );
        assert_eq!(llama_memory_slots_count(pair.slots), 1);
        assert_eq!(snapshot(mem), before, "prepare rolls everything back");
        expect(
            "prepare 0 ubatches",
            llama_memory_kv_prepare(mem, &cu, 0, pair.slots),
            LLAMA_MEMORY_ERR_INVALID_ARGUMENT,
        );
        assert_eq!(llama_memory_slots_count(pair.slots), 0);
        expect(
            "prepare ubatches NULL",
            llama_memory_kv_prepare(mem, ptr::null(), 1, pair.slots),
            LLAMA_MEMORY_ERR_NULL_ARGUMENT,
        );
        expect(
            "prepare out NULL",
            llama_memory_kv_prepare(mem, &cu, 1, ptr::null_mut()),
            LLAMA_MEMORY_ERR_NULL_ARGUMENT,
        );
        let two = [cu, bcu];
        expect(
            "prepare invalid second ubatch",
            llama_memory_kv_prepare(mem, two.as_ptr(), 2, pair.slots),
            LLAMA_MEMORY_ERR_INVALID_SEQ_ID,
        );
        assert_eq!(llama_memory_slots_count(pair.slots), 0);
        let big = stock::Ubatch::for_seq(0, 100, 65);
        let bigv = big.view();
        let bigc = c_ubatch(bigv.raw());
        expect(
            "prepare no fit",
            llama_memory_kv_prepare(mem, &bigc, 1, pair.slots),
            LLAMA_MEMORY_ERR_NO_SLOT,
        );
        assert!(pair.theirs.prepare(&[big.view()]).is_none());
        assert_eq!(llama_memory_slots_count(pair.slots), 0);

        // find_slot: the same refusals, and the list is emptied.
        assert_eq!(
            llama_memory_kv_find_slot(mem, &cu, true, pair.slots),
            LLAMA_MEMORY_OK
        );
        assert_eq!(llama_memory_slots_count(pair.slots), 1);
        expect(
            "find_slot invalid ubatch",
            llama_memory_kv_find_slot(mem, &bcu, false, pair.slots),
            LLAMA_MEMORY_ERR_INVALID_SEQ_ID,
        );
        assert_eq!(llama_memory_slots_count(pair.slots), 0);
        expect(
            "find_slot no fit",
            llama_memory_kv_find_slot(mem, &bigc, false, pair.slots),
            LLAMA_MEMORY_ERR_NO_SLOT,
        );
        expect(
            "find_slot out NULL",
            llama_memory_kv_find_slot(mem, &cu, false, ptr::null_mut()),
            LLAMA_MEMORY_ERR_NULL_ARGUMENT,
        );
        expect(
            "find_slot ubatch NULL",
            llama_memory_kv_find_slot(mem, ptr::null(), false, pair.slots),
            LLAMA_MEMORY_ERR_NULL_ARGUMENT,
        );

        // The slots list itself.
        let mut out = info;
        expect(
            "slots_get past the end",
            llama_memory_slots_get(pair.slots, 0, &mut out),
            LLAMA_MEMORY_ERR_INVALID_ARGUMENT,
        );
        expect(
            "slots_get NULL out",
            llama_memory_slots_get(pair.slots, 0, ptr::null_mut()),
            LLAMA_MEMORY_ERR_NULL_ARGUMENT,
        );
        expect(
            "slots_get NULL list",
            llama_memory_slots_get(ptr::null_mut(), 0, &mut out),
            LLAMA_MEMORY_ERR_NULL_ARGUMENT,
        );
        assert_eq!(llama_memory_slots_count(ptr::null_mut()), 0);
        llama_memory_clear_last_error();
        llama_memory_slots_free(ptr::null_mut());

        // state_clear of an id outside the cache.
        expect(
            "state_clear seq 3",
            llama_memory_kv_state_clear(mem, 3),
            LLAMA_MEMORY_ERR_INVALID_SEQ_ID,
        );
        expect(
            "state_clear seq -2",
            llama_memory_kv_state_clear(mem, -2),
            LLAMA_MEMORY_ERR_INVALID_SEQ_ID,
        );
        expect(
            "state_clear NULL",
            llama_memory_kv_state_clear(ptr::null_mut(), 0),
            LLAMA_MEMORY_ERR_NULL_ARGUMENT,
        );

        // After all that, the good slot still applies, as on the stock cache.
        assert_eq!(
            llama_memory_kv_apply_ubatch(mem, &info, &cu),
            LLAMA_MEMORY_OK
        );
        pair.theirs.apply_ubatch(&g.to_stock(), &v);
        pair.compare_state();
        println!("bad input (unified {unified}): {checks} refused calls, memory unchanged");
    }
}
