//! What the composite memories (the sliding-window pair `crate::iswa`, the hybrids
//! `crate::hybrid`) share: their context, which holds one sub-context per part, and their
//! all-or-nothing restore.
//!
//! A composite's state is its parts' states one after the other. llama.cpp restores the first
//! part before it reads the second, so a damaged second part leaves the first restored over
//! a stale second part. Here a restore first reads and checks every part (a dry run, each
//! part's own `state_check_io`, with the finiteness check when it is on), and changes the
//! first part only when every part passed; in stock-compatible mode it is llama.cpp's order.

use std::any::Any;

use crate::error::{err, Result};
use crate::io::{IoRead, Reader, StateIn};
use crate::memory::{Memory, MemoryContext, Role, Status};
use crate::ubatch::Ubatch;

/// llama.cpp's `llama_memory_status_combine`: the first failure wins, else success when
/// either part has work.
pub fn combine(a: Status, b: Status) -> Status {
    match (a, b) {
        (Status::FailedPrepare | Status::FailedCompute, _) => a,
        (_, Status::FailedPrepare | Status::FailedCompute) => b,
        (Status::Success, _) | (_, Status::Success) => Status::Success,
        _ => Status::NoUpdate,
    }
}

/// Checks that no model layer has tensors in two parts (`find_for_layer` must find one part
/// for each layer): the layers below 4096 are asked.
pub(crate) fn check_disjoint(a: &dyn Memory, b: &dyn Memory) -> Result<()> {
    if let Some(il) = (0..4096).find(|&il| a.has_layer(il) && b.has_layer(il)) {
        return Err(err!(
            InvalidArgument,
            "layer {il} has tensors in both parts"
        ));
    }
    Ok(())
}

/// Whether a context failed.
pub(crate) fn failed(c: &dyn MemoryContext) -> bool {
    matches!(c.status(), Status::FailedPrepare | Status::FailedCompute)
}

/// The context of a composite memory: one sub-context per part, in the memory's part order.
#[derive(Default)]
pub struct CompositeContext {
    parts: Vec<(Role, Box<dyn MemoryContext>)>,
    status: Option<Status>,
}

impl std::fmt::Debug for CompositeContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompositeContext")
            .field(
                "parts",
                &self.parts.iter().map(|(r, _)| r).collect::<Vec<_>>(),
            )
            .field("status", &self.status())
            .finish()
    }
}

impl CompositeContext {
    /// A context over the parts' contexts (their statuses combined).
    pub fn boxed(parts: Vec<(Role, Box<dyn MemoryContext>)>) -> Box<dyn MemoryContext> {
        Box::new(CompositeContext {
            parts,
            status: None,
        })
    }

    /// A context that failed with `status` (no sub-contexts).
    pub fn boxed_failed(status: Status) -> Box<dyn MemoryContext> {
        Box::new(CompositeContext {
            parts: Vec::new(),
            status: Some(status),
        })
    }
}

/// The sub-contexts of a spare composite context, for the parts' `init_batch` (`n` entries).
pub(crate) fn spare_parts(
    spare: Option<Box<dyn MemoryContext>>,
    n: usize,
) -> Vec<Option<Box<dyn MemoryContext>>> {
    let mut out: Vec<Option<Box<dyn MemoryContext>>> = (0..n).map(|_| None).collect();
    if let Some(c) = spare.and_then(|b| b.into_any().downcast::<CompositeContext>().ok()) {
        for (k, (_, p)) in c.parts.into_iter().enumerate().take(n) {
            out[k] = Some(p);
        }
    }
    out
}

impl MemoryContext for CompositeContext {
    fn status(&self) -> Status {
        if let Some(s) = self.status {
            return s;
        }
        self.parts
            .iter()
            .map(|(_, p)| p.status())
            .reduce(combine)
            .unwrap_or(Status::NoUpdate)
    }

    fn next(&mut self) -> bool {
        let mut more = false;
        for (k, (_, p)) in self.parts.iter_mut().enumerate() {
            let m = p.next();
            if k == 0 {
                more = m;
            }
        }
        more
    }

    fn apply(&mut self, mem: &mut dyn Memory) -> Result<()> {
        if failed(self) {
            return Err(err!(
                InvalidArgument,
                "cannot apply a failed context (status {:?})",
                self.status()
            ));
        }
        if mem.n_parts() != self.parts.len() {
            return Err(err!(
                InvalidArgument,
                "the context has {} parts, the memory {}",
                self.parts.len(),
                mem.n_parts()
            ));
        }
        for (k, (_, p)) in self.parts.iter_mut().enumerate() {
            if p.status() != Status::Success {
                // a part without work (an update where only the other part shifts)
                continue;
            }
            let (_, part) = mem
                .part_mut(k)
                .ok_or_else(|| err!(InvalidArgument, "the memory has no part {k}"))?;
            p.apply(part)?;
        }
        Ok(())
    }

    fn ubatch(&self) -> Option<Ubatch<'_>> {
        self.parts.first().and_then(|(_, p)| p.ubatch())
    }

    fn part(&self, i: usize) -> Option<(Role, &dyn MemoryContext)> {
        self.parts.get(i).map(|(r, p)| (*r, &**p))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// A reader over a blob for a dry run: fields come from the blob's metadata, tensor bytes from
/// its data (or stash), checked for finiteness when asked, and written nowhere.
struct Probe<'s, 'a> {
    inp: &'s mut StateIn<'a>,
    check_finite: bool,
}

impl IoRead for Probe<'_, '_> {
    fn read(&mut self, dst: &mut [u8]) -> Result<()> {
        dst.copy_from_slice(self.inp.meta.take(dst.len(), "state field")?);
        Ok(())
    }
    fn read_tensor(
        &mut self,
        t: *mut ggml_sys::ggml_tensor,
        _offset: usize,
        n: usize,
    ) -> Result<()> {
        let bytes = self.inp.data(n, 1, "tensor data")?;
        if self.check_finite {
            if let Some(ty) = crate::storage::tensor_type(t) {
                if let Some(i) = crate::finite::first_non_finite(ty, bytes) {
                    return Err(err!(
                        InvalidState,
                        "tensor data element {i} is not finite (NaN or infinity; the non-finite check is on)"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Restores `parts` (in state order) from a blob: all or nothing, or llama.cpp's order with
/// `stock`. Each part's data is checked for finiteness in the dry run as its own restore
/// checks it ([`Memory::check_finite`]).
pub(crate) fn read_parts(
    parts: &mut [&mut dyn Memory],
    seq: i32,
    flags: u32,
    inp: &mut StateIn<'_>,
    stock: bool,
    last: &mut usize,
) -> Result<()> {
    *last = 0;
    // The dry run: every part reads its fields and data as the restore will, and says where
    // its stashed bytes end (each part's restore then gets exactly its own, in both modes: a
    // part's reader refuses a stash with bytes left over). Its log lines are the restore's:
    // held back, and let out only when it fails and the restore is not run.
    let mut probe_in = inp.clone();
    let mut stash_ends = Vec::with_capacity(parts.len());
    let (checked, lines) = crate::memory::hold_log(|| -> Result<()> {
        for p in parts.iter_mut() {
            let check_finite = p.check_finite();
            let mut probe = Probe {
                inp: &mut probe_in,
                check_finite,
            };
            p.state_check_io(seq, flags, &mut probe)?;
            stash_ends.push(probe_in.stash.as_ref().map_or(0, Reader::pos));
        }
        Ok(())
    });
    if !stock {
        *last = stash_ends.len().min(parts.len().saturating_sub(1));
        if checked.is_err() {
            crate::memory::release_log(lines);
        }
        checked?;
        probe_in.check_stash_consumed()?;
    }
    // The restore: llama.cpp's order in stock mode (each part's failure with its own effect;
    // a part the dry run refused gets the rest of the stash), after a passed dry run else.
    let mut at = 0;
    for (k, p) in parts.iter_mut().enumerate() {
        *last = k;
        let stash = match &mut inp.stash {
            Some(r) => {
                let n = stash_ends.get(k).map_or(r.remaining(), |&end| end - at);
                Some(Reader::new(r.take(n, "stashed tensor data")?))
            }
            None => None,
        };
        at += stash.as_ref().map_or(0, Reader::remaining);
        let mut part_in = StateIn {
            meta: inp.meta.clone(),
            stash,
        };
        // Out of stock mode the dry run passed on the same bytes and the other parts do not
        // change this one: a failure here is a bug, reported as an error.
        p.state_read(seq, flags, &mut part_in)?;
        inp.meta = part_in.meta;
    }
    Ok(())
}

/// A caller's reader that keeps every byte it hands out, so that a restore can read the input
/// once for the dry run and restore from the copy.
struct Recorder<'r> {
    io: &'r mut dyn IoRead,
    bytes: Vec<u8>,
}

impl IoRead for Recorder<'_> {
    fn read(&mut self, dst: &mut [u8]) -> Result<()> {
        self.io.read(dst)?;
        self.bytes.extend_from_slice(dst);
        Ok(())
    }
    fn read_tensor(
        &mut self,
        _t: *mut ggml_sys::ggml_tensor,
        _offset: usize,
        n: usize,
    ) -> Result<()> {
        let at = self.bytes.len();
        self.bytes.resize(at + n, 0);
        self.io.read(&mut self.bytes[at..])
    }
}

/// [`read_parts`] from a caller's reader: the input is read once, through every part's dry
/// run, and then restored from the bytes read (all or nothing). With `stock`, or for an
/// `ON_DEVICE` state (whose tensor bytes only the reader's `read_tensor` reaches), each part
/// reads from the reader in turn, as llama.cpp.
pub(crate) fn read_parts_io(
    parts: &mut [&mut dyn Memory],
    seq: i32,
    flags: u32,
    io: &mut dyn IoRead,
    stock: bool,
    last: &mut usize,
) -> Result<()> {
    *last = 0;
    if stock || flags & crate::io::FLAG_ON_DEVICE != 0 {
        for (k, p) in parts.iter_mut().enumerate() {
            *last = k;
            p.state_read_io(seq, flags, io)?;
        }
        return Ok(());
    }
    let mut rec = Recorder {
        io,
        bytes: Vec::new(),
    };
    // (its lines held back as in read_parts: the restore from the copy logs them)
    let (checked, lines) = crate::memory::hold_log(|| -> Result<()> {
        for (k, p) in parts.iter_mut().enumerate() {
            *last = k;
            p.state_check_io(seq, flags, &mut rec)?;
        }
        Ok(())
    });
    if checked.is_err() {
        crate::memory::release_log(lines);
    }
    checked?;
    let bytes = rec.bytes;
    read_parts(parts, seq, flags, &mut StateIn::new(&bytes), false, last)
}
