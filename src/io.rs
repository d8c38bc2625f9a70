//! Byte sinks and bounds-checked readers for llama.cpp's state format (native-endian, packed,
//! as llama.cpp writes it on the little-endian machines it runs on).

#![forbid(unsafe_code)]

use crate::error::{err, Result};

/// `LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY` (a plain KV cache has no partial part and ignores it).
///
/// cbindgen:ignore
pub const FLAG_PARTIAL_ONLY: u32 = 1;
/// `LLAMA_STATE_SEQ_FLAGS_ON_DEVICE`: tensor bytes stay with the memory, not in the blob.
///
/// cbindgen:ignore
pub const FLAG_ON_DEVICE: u32 = 2;

/// Where a state goes: a byte count only, or a caller buffer that must be large enough.
#[derive(Debug)]
pub enum Sink<'a> {
    /// Counts bytes (`llama_io_write_dummy`).
    Count(usize),
    /// Writes into a buffer.
    Buf {
        /// The buffer.
        buf: &'a mut [u8],
        /// Bytes written so far.
        pos: usize,
    },
    /// Writes through a caller's callbacks (llama.cpp's `llama_io_write_i`).
    Io {
        /// The callbacks.
        io: &'a mut dyn IoWrite,
        /// Bytes passed to them so far.
        pos: usize,
    },
}

/// A caller's state writer, shaped as llama.cpp's `llama_io_write_i`: byte writes, and tensor
/// ranges the writer copies (or, for an `ON_DEVICE` state, keeps) itself.
pub trait IoWrite: std::fmt::Debug {
    /// Appends `b`.
    fn write(&mut self, b: &[u8]) -> Result<()>;
    /// Appends bytes `[offset, offset + n)` of `t`.
    fn write_tensor(
        &mut self,
        t: *mut ggml_sys::ggml_tensor,
        offset: usize,
        n: usize,
    ) -> Result<()>;
}

/// A caller's state reader, shaped as llama.cpp's `llama_io_read_i`: it cannot say how much
/// input is left, so a reader asks for each field in order.
pub trait IoRead {
    /// Fills `dst` with the next bytes.
    fn read(&mut self, dst: &mut [u8]) -> Result<()>;
    /// Reads the next `n` bytes into bytes `[offset, offset + n)` of `t` (now, or when the
    /// reader is done, as llama.cpp's readers do).
    fn read_tensor(&mut self, t: *mut ggml_sys::ggml_tensor, offset: usize, n: usize)
        -> Result<()>;
}

/// Sequential input of fixed-size fields, from a byte slice ([`Reader`]) or an [`IoRead`].
pub trait FieldSource {
    /// Fills `dst` with the next bytes; `what` names the field for the error.
    fn fill(&mut self, dst: &mut [u8], what: &str) -> Result<()>;

    /// Reads a `u32`.
    fn u32(&mut self, what: &str) -> Result<u32> {
        let mut a = [0u8; 4];
        self.fill(&mut a, what)?;
        Ok(u32::from_ne_bytes(a))
    }

    /// Reads an `i32`.
    fn i32(&mut self, what: &str) -> Result<i32> {
        let mut a = [0u8; 4];
        self.fill(&mut a, what)?;
        Ok(i32::from_ne_bytes(a))
    }

    /// Reads a `u64`.
    fn u64(&mut self, what: &str) -> Result<u64> {
        let mut a = [0u8; 8];
        self.fill(&mut a, what)?;
        Ok(u64::from_ne_bytes(a))
    }
}

impl FieldSource for Reader<'_> {
    fn fill(&mut self, dst: &mut [u8], what: &str) -> Result<()> {
        dst.copy_from_slice(self.take(dst.len(), what)?);
        Ok(())
    }
}

impl FieldSource for dyn IoRead + '_ {
    fn fill(&mut self, dst: &mut [u8], what: &str) -> Result<()> {
        self.read(dst)
            .map_err(|e| err!(InvalidState, "reading {what}: {}", e.message()))
    }
}

impl<'a> Sink<'a> {
    /// A sink writing into `buf`.
    pub fn new(buf: &'a mut [u8]) -> Self {
        Sink::Buf { buf, pos: 0 }
    }

    /// Bytes written (or counted) so far.
    pub fn len(&self) -> usize {
        match self {
            Sink::Count(n) => *n,
            Sink::Buf { pos, .. } | Sink::Io { pos, .. } => *pos,
        }
    }

    /// True when nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The next `n` bytes of the output to fill, `None` when only counting.
    pub fn reserve(&mut self, n: usize) -> Result<Option<&mut [u8]>> {
        match self {
            Sink::Count(c) => {
                *c = c
                    .checked_add(n)
                    .ok_or_else(|| err!(InvalidArgument, "state size overflows"))?;
                Ok(None)
            }
            Sink::Buf { buf, pos } => {
                let end = pos
                    .checked_add(n)
                    .filter(|&e| e <= buf.len())
                    .ok_or_else(|| {
                        err!(
                            BufferTooSmall,
                            "the buffer of {} bytes is too small for the state",
                            buf.len()
                        )
                    })?;
                let out = &mut buf[*pos..end];
                *pos = end;
                Ok(Some(out))
            }
            Sink::Io { .. } => Err(err!(
                Unsupported,
                "this state is written field by field; it cannot go through a writer"
            )),
        }
    }

    /// Appends raw bytes.
    pub fn put(&mut self, b: &[u8]) -> Result<()> {
        if let Sink::Io { io, pos } = self {
            io.write(b)?;
            *pos += b.len();
            return Ok(());
        }
        if let Some(out) = self.reserve(b.len())? {
            out.copy_from_slice(b);
        }
        Ok(())
    }

    /// Appends a `u32`.
    pub fn u32(&mut self, v: u32) -> Result<()> {
        self.put(&v.to_ne_bytes())
    }

    /// Appends an `i32`.
    pub fn i32(&mut self, v: i32) -> Result<()> {
        self.put(&v.to_ne_bytes())
    }

    /// Appends a `u64`.
    pub fn u64(&mut self, v: u64) -> Result<()> {
        self.put(&v.to_ne_bytes())
    }
}

/// Where a state's tensor bytes go: into the main sink, or (`ON_DEVICE`) into a stash the
/// memory handle keeps, leaving only the metadata in the caller's buffer.
#[derive(Debug)]
pub struct StateOut<'a, 'b> {
    /// Metadata (and tensor bytes unless stashed).
    pub sink: &'b mut Sink<'a>,
    /// Tensor bytes, when they are kept out of the blob.
    pub stash: Option<&'b mut Vec<u8>>,
}

impl StateOut<'_, '_> {
    /// Appends bytes `[offset, offset + n)` of `t`: through the writer's `write_tensor`, or
    /// by `get` filling the next `n` bytes of the blob (or stash).
    pub fn tensor(
        &mut self,
        t: *mut ggml_sys::ggml_tensor,
        offset: usize,
        n: usize,
        get: impl FnOnce(&mut [u8]) -> Result<()>,
    ) -> Result<()> {
        if let Sink::Io { io, pos } = &mut *self.sink {
            io.write_tensor(t, offset, n)?;
            *pos += n;
            return Ok(());
        }
        match self.data(n)? {
            Some(dst) => get(dst),
            None => Ok(()),
        }
    }

    /// The next `n` tensor bytes to fill, `None` when only counting.
    pub fn data(&mut self, n: usize) -> Result<Option<&mut [u8]>> {
        match &mut self.stash {
            // Counting an ON_DEVICE state: its tensor bytes are not part of the blob.
            Some(_) if matches!(self.sink, Sink::Count(_)) => Ok(None),
            Some(v) => {
                let start = v.len();
                v.resize(start + n, 0);
                Ok(Some(&mut v[start..]))
            }
            None => self.sink.reserve(n),
        }
    }
}

/// A bounds-checked cursor over untrusted bytes. Every read names the field it reads, so a
/// truncated blob says where it ends.
#[derive(Clone, Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// A reader at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Bytes consumed so far.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(err!(
                InvalidState,
                "truncated state: {what} needs {n} bytes at offset {}, {} left",
                self.pos,
                self.remaining()
            ));
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    /// The next `n * m` bytes, with the product checked.
    pub fn take_n(&mut self, n: usize, m: usize, what: &str) -> Result<&'a [u8]> {
        let len = n
            .checked_mul(m)
            .ok_or_else(|| err!(InvalidState, "{what}: size {n} x {m} overflows"))?;
        self.take(len, what)
    }

    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    /// Reads a `u32`.
    pub fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_ne_bytes(self.arr(what)?))
    }

    /// Reads an `i32`.
    pub fn i32(&mut self, what: &str) -> Result<i32> {
        Ok(i32::from_ne_bytes(self.arr(what)?))
    }

    /// Reads a `u64`.
    pub fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_ne_bytes(self.arr(what)?))
    }
}

/// Where a state's tensor bytes come from: the blob itself, or (`ON_DEVICE`) a stash.
#[derive(Clone, Debug)]
pub struct StateIn<'a> {
    /// Metadata (and tensor bytes unless stashed).
    pub meta: Reader<'a>,
    /// Tensor bytes kept out of the blob.
    pub stash: Option<Reader<'a>>,
}

impl<'a> StateIn<'a> {
    /// Reads a blob that carries its own tensor bytes.
    pub fn new(buf: &'a [u8]) -> Self {
        StateIn {
            meta: Reader::new(buf),
            stash: None,
        }
    }

    /// The next `n * m` tensor bytes.
    pub fn data(&mut self, n: usize, m: usize, what: &str) -> Result<&'a [u8]> {
        match &mut self.stash {
            Some(r) => r.take_n(n, m, what),
            None => self.meta.take_n(n, m, what),
        }
    }

    /// Fails when an `ON_DEVICE` stash holds more bytes than the state described: it holds
    /// exactly the rows of its state, so more is another state's.
    pub fn check_stash_consumed(&self) -> Result<()> {
        match &self.stash {
            Some(st) if st.remaining() != 0 => Err(err!(
                InvalidState,
                "the stashed tensor data has {} bytes more than the state describes",
                st.remaining()
            )),
            _ => Ok(()),
        }
    }
}
