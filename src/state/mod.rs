//! llama.cpp's state formats: the per-sequence blob of `llama_state_seq_get_data`, the
//! sequence-state file of `llama_state_seq_save_file`, and the memory part of the whole state.
//!
//! Layouts (all integers native-endian, as llama.cpp writes them):
//! - sequence blob: `u32 0xaf143cd8, i32 seq_id, MemoryState(seq)`;
//! - sequence file: `u32 'ggsq', u32 4, u32 n_tokens, i32 tokens[n_tokens], MemoryState(seq)`
//!   (no blob header);
//! - whole memory: `MemoryState(-1)` (llama.cpp's context state puts the architecture name
//!   before it; that belongs to the model, not to the memory).
//!
//! Every reader here checks lengths before use and parses a whole state before changing
//! anything, so a failed restore leaves the memory as it was.

#![forbid(unsafe_code)]

use std::path::Path;

use crate::error::{err, Result};
use crate::io::{Reader, Sink, StateIn, StateOut};
use crate::memory::Memory;

/// `LLAMA_STATE_SEQ_MAGIC` ('ggsq').
///
/// cbindgen:ignore
pub const STATE_SEQ_MAGIC: u32 = 0x6767_7371;
/// `LLAMA_STATE_SEQ_VERSION`.
///
/// cbindgen:ignore
pub const STATE_SEQ_VERSION: u32 = 4;
/// The first word of an in-memory sequence blob (llama-context.cpp's io magic).
///
/// cbindgen:ignore
pub const SEQ_BLOB_MAGIC: u32 = 0xaf14_3cd8;
pub use crate::io::{FLAG_ON_DEVICE, FLAG_PARTIAL_ONLY};

fn check_flags(flags: u32) -> Result<()> {
    if flags & !(FLAG_PARTIAL_ONLY | FLAG_ON_DEVICE) != 0 {
        return Err(err!(InvalidArgument, "unknown state flags {flags:#x}"));
    }
    Ok(())
}

/// Per-sequence stashes of tensor bytes for `ON_DEVICE` blobs (llama.cpp's `mem_storage`).
///
/// cbindgen:ignore
pub type Stash = std::collections::BTreeMap<i32, Vec<u8>>;

/// Size of the blob `seq_get_data` writes (without tensor bytes for `ON_DEVICE`).
pub fn seq_get_size(mem: &dyn Memory, seq: i32, flags: u32) -> Result<usize> {
    check_flags(flags)?;
    let mut sink = Sink::Count(8);
    let mut unused = Vec::new();
    mem.state_write(
        seq,
        flags,
        &mut StateOut {
            sink: &mut sink,
            stash: (flags & FLAG_ON_DEVICE != 0).then_some(&mut unused),
        },
    )?;
    Ok(sink.len())
}

/// Writes the blob of `seq` into `dst`; returns its length. With `ON_DEVICE` the tensor bytes
/// replace `stash[seq]` instead of going into `dst`.
pub fn seq_get_data(
    mem: &dyn Memory,
    dst: &mut [u8],
    seq: i32,
    flags: u32,
    stash: &mut Stash,
) -> Result<usize> {
    check_flags(flags)?;
    let mut sink = Sink::new(dst);
    sink.u32(SEQ_BLOB_MAGIC)?;
    sink.i32(seq)?;
    if flags & FLAG_ON_DEVICE != 0 {
        let mut tensors = Vec::new();
        mem.state_write(
            seq,
            flags,
            &mut StateOut {
                sink: &mut sink,
                stash: Some(&mut tensors),
            },
        )?;
        stash.insert(seq, tensors);
    } else {
        write_host(mem, seq, flags, &mut sink)?;
    }
    Ok(sink.len())
}

/// Restores a blob into `dest` (-1: the whole memory); returns the bytes read (trailing bytes
/// are ignored, as llama.cpp). The stored sequence id is ignored except that `ON_DEVICE` blobs
/// take their tensor bytes from `stash[stored id]`.
pub fn seq_set_data(
    mem: &mut dyn Memory,
    src: &[u8],
    dest: i32,
    flags: u32,
    stash: &Stash,
) -> Result<usize> {
    check_flags(flags)?;
    let mut r = Reader::new(src);
    let magic = r.u32("blob magic")?;
    if magic != SEQ_BLOB_MAGIC {
        return Err(err!(
            InvalidState,
            "not a sequence state: magic {magic:#010x}, expected {SEQ_BLOB_MAGIC:#010x}"
        ));
    }
    let stored = r.i32("blob seq_id")?;
    let body = &src[r.pos()..];
    let mut inp = StateIn::new(body);
    if flags & FLAG_ON_DEVICE != 0 {
        let data = stash.get(&stored).ok_or_else(|| {
            err!(
                InvalidState,
                "no tensor data kept for sequence {stored} (save it with ON_DEVICE first)"
            )
        })?;
        inp.stash = Some(Reader::new(data));
    }
    mem.state_read(dest, flags, &mut inp)?;
    Ok(8 + inp.meta.pos())
}

/// Writes the state of `seq` (-1: all), tensor bytes included, into `sink`.
fn write_host(mem: &dyn Memory, seq: i32, flags: u32, sink: &mut Sink<'_>) -> Result<()> {
    mem.state_write(seq, flags, &mut StateOut { sink, stash: None })
}

/// Size of the whole memory's state.
pub fn get_size(mem: &dyn Memory) -> Result<usize> {
    let mut sink = Sink::Count(0);
    write_host(mem, -1, 0, &mut sink)?;
    Ok(sink.len())
}

/// Writes the whole memory's state into `dst`; returns its length.
pub fn get_data(mem: &dyn Memory, dst: &mut [u8]) -> Result<usize> {
    let mut sink = Sink::new(dst);
    write_host(mem, -1, 0, &mut sink)?;
    Ok(sink.len())
}

/// Replaces the whole memory with a state; returns the bytes read.
pub fn set_data(mem: &mut dyn Memory, src: &[u8]) -> Result<usize> {
    let mut inp = StateIn::new(src);
    mem.state_read(-1, 0, &mut inp)?;
    Ok(inp.meta.pos())
}

/// Writes a sequence-state file (`llama_state_seq_save_file`); returns its size.
pub fn seq_save_file(mem: &dyn Memory, path: &Path, seq: i32, tokens: &[i32]) -> Result<usize> {
    let n_tok = u32::try_from(tokens.len())
        .map_err(|_| err!(InvalidArgument, "{} tokens do not fit a u32", tokens.len()))?;
    let mut sink = Sink::Count(0);
    write_host(mem, seq, 0, &mut sink)?;
    let total = 12usize
        .checked_add(tokens.len() * 4)
        .and_then(|v| v.checked_add(sink.len()))
        .ok_or_else(|| err!(InvalidArgument, "file size overflows"))?;
    let mut buf = vec![0u8; total];
    let mut sink = Sink::new(&mut buf);
    sink.u32(STATE_SEQ_MAGIC)?;
    sink.u32(STATE_SEQ_VERSION)?;
    sink.u32(n_tok)?;
    for &t in tokens {
        sink.i32(t)?;
    }
    write_host(mem, seq, 0, &mut sink)?;
    let n = sink.len();
    std::fs::write(path, &buf[..n])
        .map_err(|e| err!(Io, "cannot write {}: {e}", path.display()))?;
    Ok(n)
}

/// Result of [`seq_load_file`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loaded {
    /// File offset after what was read (llama.cpp's return value).
    pub read: usize,
    /// Number of tokens the file holds.
    pub n_tokens: usize,
}

/// Reads a sequence-state file into `dest` (`llama_state_seq_load_file`). With `tokens_out`
/// `None` only the header is checked and the token count returned, as llama.cpp; otherwise
/// the tokens are copied out (at most `tokens_out.len()`, else an error) and the state is
/// restored. A failure leaves the memory unchanged.
pub fn seq_load_file(
    mem: &mut dyn Memory,
    path: &Path,
    dest: i32,
    tokens_out: Option<&mut [i32]>,
) -> Result<Loaded> {
    use std::io::Read;
    let io = |e: std::io::Error| err!(Io, "cannot read {}: {e}", path.display());
    let not_regular = || err!(Io, "{} is not a regular file", path.display());
    // A FIFO would block (already in open) until a writer comes, and a device like /dev/zero
    // never ends: only a regular file has a length to bound the reads by. Checked before the
    // open, and again on the opened file in case the path changed in between.
    if !std::fs::metadata(path).map_err(io)?.is_file() {
        return Err(not_regular());
    }
    let file = open_nonblocking(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(not_regular());
    }
    let mut file = file.take(meta.len());
    let mut header = [0u8; 12];
    file.read_exact(&mut header).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => err!(
            InvalidState,
            "{} is too short for a sequence-state header",
            path.display()
        ),
        _ => io(e),
    })?;
    // The header alone decides whether the rest is worth reading.
    let mut r = Reader::new(&header);
    check_file_header(&mut r)?;
    let n = r.u32("token count")? as usize;
    let rest = meta.len() - 12;
    match &tokens_out {
        None if (n as u64) * 4 > rest => {
            return Err(err!(
                InvalidState,
                "the file claims {n} tokens but has {rest} bytes left"
            ))
        }
        None => {
            return Ok(Loaded {
                read: 12,
                n_tokens: n,
            })
        }
        Some(out) if n > out.len() => {
            return Err(err!(
                BufferTooSmall,
                "the file holds {n} tokens, the buffer {}",
                out.len()
            ));
        }
        Some(_) => {}
    }
    let rest =
        usize::try_from(rest).map_err(|_| err!(Io, "{} is too large to buffer", path.display()))?;
    let mut data = Vec::new();
    data.try_reserve_exact(12 + rest)
        .map_err(|e| err!(Io, "cannot buffer {}: {e}", path.display()))?;
    data.extend_from_slice(&header);
    file.read_to_end(&mut data).map_err(io)?;
    seq_load_bytes(mem, &data, dest, tokens_out)
}

/// Opens `path` for reading without blocking on a FIFO (a regular file ignores the flag).
#[cfg(unix)]
fn open_nonblocking(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

#[cfg(not(unix))]
fn open_nonblocking(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::File::open(path)
}

/// Checks the magic and version of a sequence-state file.
fn check_file_header(r: &mut Reader<'_>) -> Result<()> {
    let magic = r.u32("file magic")?;
    let version = r.u32("file version")?;
    if magic != STATE_SEQ_MAGIC || version != STATE_SEQ_VERSION {
        return Err(err!(
            InvalidState,
            "not a sequence-state file of version {STATE_SEQ_VERSION}: magic {magic:#010x}, version {version}"
        ));
    }
    Ok(())
}

/// [`seq_load_file`] on the bytes of a file already in memory.
pub fn seq_load_bytes(
    mem: &mut dyn Memory,
    data: &[u8],
    dest: i32,
    tokens_out: Option<&mut [i32]>,
) -> Result<Loaded> {
    let mut r = Reader::new(data);
    check_file_header(&mut r)?;
    let n = r.u32("token count")? as usize;
    let Some(out) = tokens_out else {
        if n.checked_mul(4).is_none_or(|b| b > r.remaining()) {
            return Err(err!(
                InvalidState,
                "the file claims {n} tokens but has {} bytes left",
                r.remaining()
            ));
        }
        return Ok(Loaded {
            read: r.pos(),
            n_tokens: n,
        });
    };
    if n > out.len() {
        return Err(err!(
            BufferTooSmall,
            "the file holds {n} tokens, the buffer {}",
            out.len()
        ));
    }
    let toks = r.take_n(n, 4, "tokens")?;
    let body_start = r.pos();
    let mut inp = StateIn::new(&data[body_start..]);
    mem.state_read(dest, 0, &mut inp)?;
    for (o, c) in out.iter_mut().zip(toks.chunks_exact(4)) {
        *o = i32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
    }
    Ok(Loaded {
        read: body_start + inp.meta.pos(),
        n_tokens: n,
    })
}
