//! The memory interface: llama.cpp's `llama_memory_i` and `llama_memory_context_i` as Rust
//! traits, so every memory kind (the KV cache and the recurrent memory; the composites,
//! sliding-window pairs and hybrids, once they are written in Rust) sits behind the same C
//! handle.
//!
//! A composite memory is described by its parts ([`Memory::part`]): each part is a memory
//! itself, with a [`Role`] and the model layers it owns. Code that needs one kind (the KV
//! functions of the C ABI, the graph builders) finds it with [`find`]/[`find_mut`] or
//! [`find_for_layer`] instead of asking the memory to cast itself, so adding a kind adds no
//! hook here.
//!
//! This module sits above the cell tables, the ubatch and the state byte I/O (`crate::io`),
//! and below every memory kind: the kinds implement these traits, nothing here names a kind.
//!
//! # Adding a memory kind
//! - The kind's own folder (e.g. `src/recurrent/`) holds its memory type and its context type,
//!   implementing [`Memory`] and [`MemoryContext`]; its tensors go in `src/storage/`.
//! - A composite (iSWA, hybrid) holds its parts as memories and reports them through
//!   [`Memory::part`]/[`Memory::n_parts`] with their [`Role`]; its context reports the parts'
//!   contexts through [`MemoryContext::part`], and its `apply` hands each sub-context its part.
//!   The KV functions of the C ABI then work on the part that owns the layer they are given
//!   ([`find_for_layer`]), or on the only KV part ([`find`]), without a change.
//! - The kind's state layout goes in its own `state.rs` beside its memory (`kv/state.rs`,
//!   `recurrent/state.rs`), with llama.cpp's failure effect for stock-compatible mode
//!   ([`Memory::set_stock_compat`], [`ReadStage`]).
//! - A leaf kind writes its `impl Memory` with `leaf_memory_ops!` for the forwards every leaf
//!   shares.
//! - `src/ffi/` gets one module (or folder) for the kind's family: its constructor, its
//!   parameter struct and its own inputs (`ffi/recurrent.rs`; `ffi/kv/` for the KV cache); the
//!   llama.h functions, the context functions, the breakdown and the state functions are
//!   already generic over `Memory`.

#![forbid(unsafe_code)]

use std::any::Any;

use crate::error::{err, Result};
use crate::io::{IoRead, StateIn, StateOut};
use crate::ubatch::Ubatch;

/// A ggml buffer type, as [`Memory::memory_breakdown`] reports it (never dereferenced here).
pub type BufferType = ggml_sys::ggml_backend_buffer_type_t;

/// Status of a memory context (`llama_memory_status`); the values are llama.cpp's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum Status {
    /// There is work to apply.
    Success = 0,
    /// Nothing to do.
    NoUpdate = 1,
    /// The ubatches do not fit.
    FailedPrepare = 2,
    /// Computing failed.
    FailedCompute = 3,
}

/// How far a restore got, which decides llama.cpp's effect of a failure (what a memory in
/// stock-compatible mode reproduces, [`Memory::set_stock_compat`]) and the error llama.cpp
/// reports. The values are the C ABI's `LLAMA_MEMORY_READ_*`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(i32)]
pub enum ReadStage {
    /// Before the input's first count was read and checked: llama.cpp changes nothing.
    #[default]
    Header = 0,
    /// Reading a KV stream's cell count: llama.cpp's reader throws before that stream's
    /// restore begins.
    Count = 1,
    /// Inside a stream's cells (`state_read_meta`): llama.cpp erases the destination; an
    /// input that ends here fails with the reader's own error.
    Meta = 2,
    /// Inside a stream's tensor data (`state_read_data`): llama.cpp erases the destination and
    /// reports every failure as "failed to restore kv cache".
    Data = 3,
}

/// A log line's level (ggml's `ggml_log_level` values).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum LogLevel {
    /// `GGML_LOG_LEVEL_DEBUG`.
    Debug = 1,
    /// `GGML_LOG_LEVEL_INFO`.
    Info = 2,
    /// `GGML_LOG_LEVEL_WARN`.
    Warn = 3,
    /// `GGML_LOG_LEVEL_ERROR`.
    Error = 4,
}

/// The function a log line goes to.
pub type LogFn = dyn Fn(LogLevel, &str) + Send + Sync;

/// Where a memory's log lines go: nowhere by default, or a caller's function (the drop-in
/// hands them to llama.cpp's logger, so they read as stock's). The lines are llama.cpp's own,
/// with its function names, text and levels, each ending in a newline.
#[derive(Clone, Default)]
pub struct Log(Option<std::sync::Arc<LogFn>>);

impl Log {
    /// Lines go to `f`.
    pub fn to(f: std::sync::Arc<LogFn>) -> Log {
        Log(Some(f))
    }

    /// Whether someone listens.
    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }

    /// Emits the line `line()` builds, which is only built when someone listens (held back
    /// instead while the thread runs [`hold_log`]).
    pub fn emit(&self, level: LogLevel, line: impl FnOnce() -> String) {
        if let Some(f) = &self.0 {
            let text = line();
            let held = HELD.with(|h| match h.borrow_mut().as_mut() {
                Some(v) => {
                    v.push((level, text.clone(), f.clone()));
                    true
                }
                None => false,
            });
            if !held {
                f(level, &text);
            }
        }
    }
}

/// A held-back log line: its level, its text and where it goes.
type HeldLine = (LogLevel, String, std::sync::Arc<LogFn>);

thread_local! {
    static HELD: std::cell::RefCell<Option<Vec<HeldLine>>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` with the thread's log lines held back, and returns them with its result: a
/// composite's dry run logs what its parts' restores would log, and those lines go out only
/// once (the restore logs them again, or, when the dry run fails, [`release_log`] lets them out).
pub(crate) fn hold_log<R>(f: impl FnOnce() -> R) -> (R, Vec<HeldLine>) {
    /// Puts the enclosing hold back, also when `f` panics (the C boundary catches panics:
    /// the thread's later lines must not stay held).
    struct Restore(Option<Option<Vec<HeldLine>>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(outer) = self.0.take() {
                HELD.with(|h| *h.borrow_mut() = outer);
            }
        }
    }
    let mut guard = Restore(Some(HELD.with(|h| h.borrow_mut().replace(Vec::new()))));
    let r = f();
    let outer = guard.0.take().unwrap_or_default();
    let lines = HELD.with(|h| std::mem::replace(&mut *h.borrow_mut(), outer));
    (r, lines.unwrap_or_default())
}

/// Lets held-back lines out (into an enclosing hold, if any).
pub(crate) fn release_log(lines: Vec<HeldLine>) {
    for (level, text, f) in lines {
        Log(Some(f)).emit(level, || text);
    }
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Log(on)"
        } else {
            "Log(off)"
        })
    }
}

/// What a part plays in its composite memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The full-attention cache of a sliding-window pair.
    Base,
    /// The sliding-window cache of a pair.
    Swa,
    /// The attention memory of a hybrid.
    Attention,
    /// The recurrent memory of a hybrid.
    Recurrent,
}

/// Operations every memory offers (`llama_memory_i`). Sequence ids are checked against
/// `[0, n_seq_max)`; a failed call changes nothing.
pub trait Memory: Any + Send {
    /// Removes all cells; `data` also zeroes the tensor buffers.
    fn clear(&mut self, data: bool);
    /// `llama_memory_seq_rm`: `seq_id == -1` matches every sequence.
    fn seq_rm(&mut self, seq_id: i32, p0: i32, p1: i32) -> Result<bool>;
    /// What `seq_rm(seq_id, p0, p1)` would return now, changing nothing (the same error for
    /// the ids it refuses): a server chooses with it between trimming a sequence and
    /// processing it again.
    fn can_seq_rm(&self, seq_id: i32, p0: i32, p1: i32) -> Result<bool>;
    /// `llama_memory_seq_cp`.
    fn seq_cp(&mut self, src: i32, dst: i32, p0: i32, p1: i32) -> Result<()>;
    /// `llama_memory_seq_keep`.
    fn seq_keep(&mut self, seq_id: i32) -> Result<()>;
    /// `llama_memory_seq_add`. A memory that cannot shift refuses it.
    fn seq_add(&mut self, seq_id: i32, p0: i32, p1: i32, delta: i32) -> Result<()>;
    /// `llama_memory_seq_div`. A memory that cannot shift refuses it.
    fn seq_div(&mut self, seq_id: i32, p0: i32, p1: i32, d: i32) -> Result<()>;
    /// `llama_memory_seq_pos_min`.
    fn seq_pos_min(&self, seq_id: i32) -> Result<i32>;
    /// `llama_memory_seq_pos_max`.
    fn seq_pos_max(&self, seq_id: i32) -> Result<i32>;
    /// `llama_memory_can_shift`.
    fn can_shift(&self) -> bool;
    /// Number of sequences the memory holds.
    fn n_seq_max(&self) -> u32;

    /// How llama.cpp's `init_batch` of this memory splits a whole batch
    /// ([`crate::batch::init_batch_whole`]).
    fn split_rule(&self) -> crate::batch::SplitRule;

    /// Plans a batch already split into ubatches (`init_batch`). Invalid ubatches are an
    /// error; ubatches that do not fit give a context whose status is `FailedPrepare`.
    /// `spare` is a context of this memory that is no longer used: its buffers may be reused,
    /// so that a steady decode loop does not allocate.
    fn init_batch(
        &mut self,
        ubatches: &[Ubatch<'_>],
        spare: Option<Box<dyn MemoryContext>>,
    ) -> Result<Box<dyn MemoryContext>>;
    /// A context over the whole memory (`init_full`), for worst-case graph reservation.
    fn init_full(&mut self) -> Result<Box<dyn MemoryContext>>;
    /// Takes the pending work (shifts, stream copies) into an update context (`init_update`).
    fn init_update(&mut self, optimize: bool) -> Result<Box<dyn MemoryContext>>;

    /// Writes the state of `seq_id` (-1: all) in llama.cpp's layout. `flags` are
    /// `llama_state_seq_flags`; a memory without partial parts ignores `PARTIAL_ONLY`.
    fn state_write(&self, seq_id: i32, flags: u32, out: &mut StateOut<'_, '_>) -> Result<()>;
    /// Restores a state into `seq_id` (-1: replace everything). On error nothing changed.
    fn state_read(&mut self, seq_id: i32, flags: u32, inp: &mut StateIn<'_>) -> Result<()>;
    /// Restores a state read field by field from a caller's reader (llama.cpp's
    /// `llama_io_read_i`); see the kind's own documentation for what a failure leaves.
    fn state_read_io(&mut self, _seq_id: i32, _flags: u32, _io: &mut dyn IoRead) -> Result<()> {
        Err(err!(
            Unsupported,
            "this memory cannot restore a state from a reader yet"
        ))
    }

    /// Reads and validates a state from a caller's reader as [`Memory::state_read_io`] would
    /// restore it, and changes nothing (a dry run: the drop-in checks every part of a
    /// composite's state before it restores the first).
    fn state_check_io(&mut self, _seq_id: i32, _flags: u32, _io: &mut dyn IoRead) -> Result<()> {
        Err(err!(
            Unsupported,
            "this memory cannot check a state from a reader yet"
        ))
    }

    /// llama.cpp compatibility for a caller that must behave exactly as stock llama.cpp (the
    /// drop-in libllama): with `on`, the memory accepts what llama.cpp accepts where this
    /// library is stricter (a unified KV cache takes sequence ids in `[n_seq_max, 256)`), and
    /// a failed restore has llama.cpp's effect on the memory instead of none (see the kind's
    /// `state_read`). Off by default. A composite passes it to its parts.
    fn set_stock_compat(&mut self, on: bool) {
        for i in 0..self.n_parts() {
            if let Some((_, part)) = self.part_mut(i) {
                part.set_stock_compat(on);
            }
        }
    }
    /// Opt-in: a restore from a blob or file refuses tensor data holding a NaN or an infinity
    /// (F32, F16 and BF16 data; quantized data is not read), as invalid input (nothing
    /// changed). Off by default: a valid f16 cache can hold an infinity after an overflow. A
    /// restore through a caller's reader (`state_read_io`) leaves the bytes to that reader. A
    /// composite passes it to its parts.
    fn set_check_finite(&mut self, on: bool) {
        for i in 0..self.n_parts() {
            if let Some((_, part)) = self.part_mut(i) {
                part.set_check_finite(on);
            }
        }
    }
    /// Whether a restore refuses non-finite tensor data ([`Memory::set_check_finite`]); a
    /// composite's dry run checks each part's data as that part's restore will.
    fn check_finite(&self) -> bool {
        false
    }
    /// Where the memory's log lines go (llama.cpp's, where it logs); a composite passes it to
    /// its parts.
    fn set_log(&mut self, log: Log) {
        for i in 0..self.n_parts() {
            if let Some((_, part)) = self.part_mut(i) {
                part.set_log(log.clone());
            }
        }
    }
    /// How far the last restore got before it failed or finished.
    fn read_stage(&self) -> ReadStage {
        ReadStage::Header
    }
    /// Whether model layer `il` keeps its tensors in this memory (or in one of its parts).
    fn has_layer(&self, il: u32) -> bool;
    /// Bytes of tensor buffers per buffer type (`llama_memory_i::memory_breakdown`), each
    /// buffer type once; a composite adds up its parts'. Empty for a memory without tensors.
    fn memory_breakdown(&self) -> Vec<(BufferType, usize)> {
        let mut out: Vec<(BufferType, usize)> = Vec::new();
        for (_, part) in (0..self.n_parts()).filter_map(|i| self.part(i)) {
            for (bt, n) in part.memory_breakdown() {
                match out.iter_mut().find(|(b, _)| *b == bt) {
                    Some((_, v)) => *v += n,
                    None => out.push((bt, n)),
                }
            }
        }
        out
    }
    /// Number of parts of a composite memory; 0 for a leaf.
    fn n_parts(&self) -> usize {
        0
    }
    /// Part `i` of a composite memory, with its role.
    fn part(&self, _i: usize) -> Option<(Role, &dyn Memory)> {
        None
    }
    /// Part `i` of a composite memory, with its role.
    fn part_mut(&mut self, _i: usize) -> Option<(Role, &mut dyn Memory)> {
        None
    }

    /// The concrete memory, for [`find`].
    fn as_any(&self) -> &dyn Any;
    /// The concrete memory, for [`find_mut`].
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// The operations of a leaf memory (a cell table `cache` with `Result`-returning sequence
/// operations, and optional tensors `storage` with `clear()`, `layer(il)` and
/// `memory_breakdown()`), written once for the leaf kinds inside their `impl Memory` blocks:
/// `clear` (the tensors too when asked), llama.h's sequence operations and `seq_pos_min/max`
/// forwarded to the cell table, `has_layer` and `memory_breakdown` from the tensors, and the
/// `Any` casts.
macro_rules! leaf_memory_ops {
    () => {
        fn clear(&mut self, data: bool) {
            self.cache.clear();
            if data {
                if let Some(st) = &mut self.storage {
                    st.clear();
                }
            }
        }
        fn seq_rm(&mut self, seq_id: i32, p0: i32, p1: i32) -> $crate::error::Result<bool> {
            self.cache.seq_rm(seq_id, p0, p1)
        }
        fn can_seq_rm(&self, seq_id: i32, p0: i32, p1: i32) -> $crate::error::Result<bool> {
            self.cache.can_seq_rm(seq_id, p0, p1)
        }
        fn seq_cp(&mut self, src: i32, dst: i32, p0: i32, p1: i32) -> $crate::error::Result<()> {
            self.cache.seq_cp(src, dst, p0, p1)
        }
        fn seq_keep(&mut self, seq_id: i32) -> $crate::error::Result<()> {
            self.cache.seq_keep(seq_id)
        }
        fn seq_add(
            &mut self,
            seq_id: i32,
            p0: i32,
            p1: i32,
            delta: i32,
        ) -> $crate::error::Result<()> {
            self.cache.seq_add(seq_id, p0, p1, delta)
        }
        fn seq_div(&mut self, seq_id: i32, p0: i32, p1: i32, d: i32) -> $crate::error::Result<()> {
            self.cache.seq_div(seq_id, p0, p1, d)
        }
        fn seq_pos_min(&self, seq_id: i32) -> $crate::error::Result<i32> {
            self.cache.seq_pos_min(seq_id)
        }
        fn seq_pos_max(&self, seq_id: i32) -> $crate::error::Result<i32> {
            self.cache.seq_pos_max(seq_id)
        }
        fn has_layer(&self, il: u32) -> bool {
            self.storage.as_ref().is_some_and(|s| s.layer(il).is_some())
        }
        fn memory_breakdown(&self) -> Vec<($crate::memory::BufferType, usize)> {
            self.storage
                .as_ref()
                .map_or_else(Vec::new, |s| s.memory_breakdown())
        }
        fn as_any(&self) -> &dyn ::std::any::Any {
            self
        }
        fn as_any_mut(&mut self) -> &mut dyn ::std::any::Any {
            self
        }
    };
}
pub(crate) use leaf_memory_ops;

/// The spare context a memory's `init_batch` is handed, as its own kind (a fresh one when
/// there is none or it is of another kind), so the next context reuses its box and buffers.
pub(crate) fn spare_of<T: MemoryContext + Default>(
    spare: Option<Box<dyn MemoryContext>>,
) -> Box<T> {
    spare
        .and_then(|b| b.into_any().downcast::<T>().ok())
        .unwrap_or_default()
}

/// A restore's destination: -1 (everything) or a sequence id below `limit`.
pub(crate) fn check_dest(seq: i32, limit: u32) -> Result<()> {
    if seq != -1 && (seq < 0 || seq as u32 >= limit) {
        return Err(err!(InvalidSeqId, "seq_id {seq} outside [-1, {limit})"));
    }
    Ok(())
}

/// `seq_div`'s divisor rule, shared by the kinds: `d <= 0` (undefined in llama.cpp) is refused;
/// `Ok(false)` for `d == 1`, which changes nothing.
pub(crate) fn seq_div_changes(d: i32) -> Result<bool> {
    if d <= 0 {
        return Err(err!(
            InvalidArgument,
            "seq_div divisor must be > 0, got {d}"
        ));
    }
    Ok(d != 1)
}

/// The memory of kind `T` in `mem`: `mem` itself, or its only part (at any depth) of that
/// kind. An error when there is none, or more than one (ask for a layer's part then).
pub fn find<T: Memory>(mem: &dyn Memory) -> Result<&T> {
    fn walk<'a, T: Memory>(mem: &'a dyn Memory, n: &mut usize, first: &mut Option<&'a T>) {
        if let Some(t) = mem.as_any().downcast_ref::<T>() {
            *n += 1;
            first.get_or_insert(t);
        }
        for i in 0..mem.n_parts() {
            if let Some((_, p)) = mem.part(i) {
                walk(p, n, first);
            }
        }
    }
    let (mut n, mut first) = (0, None);
    walk(mem, &mut n, &mut first);
    match first {
        Some(t) if n == 1 => Ok(t),
        _ => Err(kind_error::<T>(n)),
    }
}

/// Mutable variant of [`find`].
pub fn find_mut<T: Memory>(mem: &mut dyn Memory) -> Result<&mut T> {
    let n = visit(mem, &mut |m| m.as_any().is::<T>());
    if n != 1 {
        return Err(kind_error::<T>(n));
    }
    first_mut::<T>(mem).ok_or_else(|| kind_error::<T>(0))
}

/// The memory of kind `T` in `mem` that owns model layer `il`.
pub fn find_for_layer<T: Memory>(mem: &dyn Memory, il: u32) -> Result<&T> {
    if let Some(t) = mem.as_any().downcast_ref::<T>() {
        return if t.has_layer(il) {
            Ok(t)
        } else {
            Err(err!(InvalidArgument, "layer {il} is not in this memory"))
        };
    }
    for i in 0..mem.n_parts() {
        if let Some((_, p)) = mem.part(i) {
            if p.has_layer(il) {
                return find_for_layer(p, il);
            }
        }
    }
    Err(err!(InvalidArgument, "layer {il} is not in this memory"))
}

/// Calls `f` on `mem` and every part below it; returns how many calls returned true.
fn visit(mem: &dyn Memory, f: &mut dyn FnMut(&dyn Memory) -> bool) -> usize {
    let mut n = usize::from(f(mem));
    for i in 0..mem.n_parts() {
        if let Some((_, p)) = mem.part(i) {
            n += visit(p, f);
        }
    }
    n
}

fn first_mut<T: Memory>(mem: &mut dyn Memory) -> Option<&mut T> {
    if mem.as_any().is::<T>() {
        return mem.as_any_mut().downcast_mut::<T>();
    }
    for i in 0..mem.n_parts() {
        let has = mem
            .part(i)
            .is_some_and(|(_, p)| visit(p, &mut |m| m.as_any().is::<T>()) > 0);
        if has {
            return mem.part_mut(i).and_then(|(_, p)| first_mut::<T>(p));
        }
    }
    None
}

/// "No part of kind `T`", or "`n` of them" (the caller must name one).
fn kind_error<T>(n: usize) -> crate::error::Error {
    let kind = std::any::type_name::<T>()
        .rsplit("::")
        .next()
        .unwrap_or("memory");
    if n == 0 {
        err!(Unsupported, "this memory has no {kind}")
    } else {
        err!(
            Unsupported,
            "this memory has {n} parts of kind {kind}; address one of them"
        )
    }
}

/// A planned piece of work on a memory (`llama_memory_context_i`): a batch of ubatches, a
/// full-memory reservation, or an update. It holds no reference to its memory; `apply` is
/// given the memory it was made from.
pub trait MemoryContext: Any {
    /// Status of the plan.
    fn status(&self) -> Status;
    /// Moves to the next ubatch; false when there is none.
    fn next(&mut self) -> bool;
    /// Applies the current step to `mem`, the memory the context was made from (the only
    /// mutation of memory while decoding).
    fn apply(&mut self, mem: &mut dyn Memory) -> Result<()>;
    /// The current ubatch of a batch context.
    fn ubatch(&self) -> Option<Ubatch<'_>>;
    /// Sub-context `i` of a composite's context (one per part of the memory).
    fn part(&self, _i: usize) -> Option<(Role, &dyn MemoryContext)> {
        None
    }
    /// The concrete context.
    fn as_any(&self) -> &dyn Any;
    /// The concrete context, owned (to reuse its buffers).
    fn into_any(self: Box<Self>) -> Box<dyn Any>;
}

/// The context of kind `T` in `ctx`: `ctx` itself or its only sub-context of that kind.
pub fn find_ctx<T: MemoryContext>(ctx: &dyn MemoryContext) -> Result<&T> {
    if let Some(t) = ctx.as_any().downcast_ref::<T>() {
        return Ok(t);
    }
    let mut found = None;
    let mut n = 0;
    let mut i = 0;
    while let Some((_, p)) = ctx.part(i) {
        if let Ok(t) = find_ctx::<T>(p) {
            n += 1;
            found.get_or_insert(t);
        }
        i += 1;
    }
    match found {
        Some(t) if n == 1 => Ok(t),
        _ => Err(kind_error::<T>(n)),
    }
}
