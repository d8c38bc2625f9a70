//! Panic boundary, failure values and pointer checks shared by every entry point.
//!
//! Each C return type has a failure value ([`Fallible`]): what a function returns when an
//! argument is NULL, a call fails, or a panic is caught. Functions whose llama.h counterpart
//! documents another value (`llama_memory_seq_rm` returns true for a NULL memory) pass it
//! explicitly to the macros.

use super::error::llama_memory_result;
use crate::error::Error;

/// The value a C entry point returns on failure.
pub(crate) trait Fallible: Sized {
    /// On an error (the last error is already set).
    fn on_error(e: &Error) -> Self;
    /// On a caught panic.
    fn on_panic() -> Self;
}

macro_rules! fallible_as {
    ($($t:ty => $v:expr),* $(,)?) => {$(
        impl Fallible for $t {
            fn on_error(_: &Error) -> Self { $v }
            fn on_panic() -> Self { $v }
        }
    )*};
}

fallible_as! {
    () => (),
    bool => false,
    u32 => 0,
    usize => 0,
    // llama_pos: -1 is "no position", llama.h's failure value.
    i32 => -1,
    // a fragmentation figure is in [0, 1]
    f32 => -1.0,
}

impl<T> Fallible for *mut T {
    fn on_error(_: &Error) -> Self {
        std::ptr::null_mut()
    }
    fn on_panic() -> Self {
        std::ptr::null_mut()
    }
}

impl<T> Fallible for *const T {
    fn on_error(_: &Error) -> Self {
        std::ptr::null()
    }
    fn on_panic() -> Self {
        std::ptr::null()
    }
}

impl Fallible for llama_memory_result {
    fn on_error(e: &Error) -> Self {
        e.kind().into()
    }
    fn on_panic() -> Self {
        llama_memory_result::LLAMA_MEMORY_ERR_INTERNAL
    }
}

/// Runs `$body` (which evaluates to the return value) with panics caught: a caught panic sets
/// the last error and yields the return type's failure value (or `$fail`).
macro_rules! ffi_boundary {
    ($body:block) => {
        ffi_boundary!($crate::ffi::boundary::Fallible::on_panic(), $body)
    };
    ($fail:expr, $body:block) => {{
        match ::std::panic::catch_unwind(::std::panic::AssertUnwindSafe(|| $body)) {
            Ok(v) => v,
            Err(payload) => {
                $crate::ffi::error::set_panic(payload);
                $fail
            }
        }
    }};
}

/// Converts a `Result<T>` into `T`, or records the error and returns the function's failure
/// value (or `$fail`).
macro_rules! try_or {
    ($res:expr) => {
        match $res {
            Ok(v) => v,
            Err(e) => {
                $crate::ffi::error::set_error(&e);
                return $crate::ffi::boundary::Fallible::on_error(&e);
            }
        }
    };
    ($fail:expr, $res:expr) => {
        match $res {
            Ok(v) => v,
            Err(e) => {
                $crate::ffi::error::set_error(&e);
                return $fail;
            }
        }
    };
}

/// Records `$e` and returns the function's failure value.
macro_rules! bail {
    ($e:expr) => {{
        let e = $e;
        $crate::ffi::error::set_error(&e);
        return $crate::ffi::boundary::Fallible::on_error(&e);
    }};
}

/// A NULL-argument error naming `what`.
pub(crate) fn null_arg(what: &str) -> Error {
    Error::new(
        crate::error::ErrorKind::NullArgument,
        format!("{what} is NULL"),
    )
}

/// The value behind a handle pointer, or a NULL-argument failure (the function's failure
/// value, or `$fail`). The pointer's type decides the Rust type ([`super::handle::Castable`]).
macro_rules! try_ref {
    ($ptr:expr, $name:literal) => {
        try_or!(try_handle!($ptr, $name, try_from))
    };
    ($fail:expr, $ptr:expr, $name:literal) => {
        try_or!($fail, try_handle!($ptr, $name, try_from))
    };
}

/// Mutable variant of [`try_ref!`].
macro_rules! try_mut {
    ($ptr:expr, $name:literal) => {
        try_or!(try_handle!($ptr, $name, try_from_mut))
    };
    ($fail:expr, $ptr:expr, $name:literal) => {
        try_or!($fail, try_handle!($ptr, $name, try_from_mut))
    };
}

macro_rules! try_handle {
    ($ptr:expr, $name:literal, $how:ident) => {{
        // SAFETY: non-NULL handle pointers given to this library come from its own
        // constructors and stay valid until the matching free, and a handle is not used from
        // two threads at once (the header's rules), so no other reference to it is live.
        unsafe { $crate::ffi::handle::$how($ptr) }
            .ok_or_else(|| $crate::ffi::boundary::null_arg($name))
    }};
}

/// Reads a parameter-struct argument (not a handle): NULL is a NULL-argument failure.
macro_rules! try_arg {
    ($ptr:expr, $name:literal) => {{
        let p = $ptr;
        if p.is_null() {
            bail!($crate::ffi::boundary::null_arg($name));
        }
        // SAFETY: non-NULL; the header requires it to point to a valid struct for the call.
        unsafe { &*p }
    }};
}

/// Checks a caller (pointer, element count) pair: NULL or misaligned with a non-zero count, or
/// a count whose byte size exceeds `isize::MAX` (no Rust slice can be that large), is an error.
pub(crate) fn check_slice<T>(p: *const T, n: usize, what: &str) -> crate::error::Result<()> {
    if n != 0 && p.is_null() {
        return Err(null_arg(what));
    }
    if n != 0 && !p.is_aligned() {
        return Err(Error::new(
            crate::error::ErrorKind::InvalidArgument,
            format!("{what} is not aligned for its element type"),
        ));
    }
    if n.checked_mul(std::mem::size_of::<T>().max(1))
        .is_none_or(|b| b > isize::MAX as usize)
    {
        return Err(Error::new(
            crate::error::ErrorKind::InvalidArgument,
            format!("{what}: {n} elements exceed the largest possible buffer"),
        ));
    }
    Ok(())
}

/// A caller's writable buffer of `n` elements as a slice (see [`check_slice`]).
///
/// # Safety
/// A non-NULL `p` must point to `n` writable elements that nothing else accesses for `'a`.
pub(crate) unsafe fn buf_mut<'a, T>(
    p: *mut T,
    n: usize,
    what: &str,
) -> crate::error::Result<&'a mut [T]> {
    check_slice(p.cast_const(), n, what)?;
    if n == 0 {
        return Ok(&mut []);
    }
    // SAFETY: the caller's contract; check_slice refused NULL, misaligned and oversized buffers.
    Ok(unsafe { std::slice::from_raw_parts_mut(p, n) })
}

/// Builds a slice from a caller pointer and element count, or records an error and returns
/// the failure value (see [`check_slice`]).
macro_rules! try_slice {
    ($ptr:expr, $len:expr, $name:literal) => {{
        let (p, n) = ($ptr, $len);
        try_or!($crate::ffi::boundary::check_slice(p, n, $name));
        if n == 0 {
            &[][..]
        } else {
            // SAFETY: the header requires `$ptr` to point to `$len` readable elements;
            // check_slice refused NULL and sizes above isize::MAX.
            unsafe { ::std::slice::from_raw_parts(p, n) }
        }
    }};
}

/// Mutable variant of [`try_slice!`].
macro_rules! try_slice_mut {
    ($ptr:expr, $len:expr, $name:literal) => {{
        let (p, n) = ($ptr, $len);
        try_or!($crate::ffi::boundary::check_slice(p.cast_const(), n, $name));
        if n == 0 {
            &mut [][..]
        } else {
            // SAFETY: the header requires `$ptr` to point to `$len` writable elements that
            // nothing else accesses during the call; check_slice refused NULL and sizes above
            // isize::MAX.
            unsafe { ::std::slice::from_raw_parts_mut(p, n) }
        }
    }};
}

/// Checks that `t` is a contiguous tensor of one of `types` in host memory and returns it with
/// its elements viewed as `E`.
///
/// # Safety
/// `t` must be NULL or a valid ggml tensor whose data nothing else accesses for `'a`.
pub(crate) unsafe fn host_tensor<'a, E>(
    t: *mut ggml_sys::ggml_tensor,
    types: &[ggml_sys::ggml_type],
) -> crate::error::Result<(&'a ggml_sys::ggml_tensor, &'a mut [E])> {
    if t.is_null() {
        return Err(crate::error::err!(NullArgument, "dst tensor is NULL"));
    }
    // SAFETY: the caller's contract: a valid tensor.
    let tr = unsafe { &*t };
    if !types.contains(&tr.type_) {
        return Err(crate::error::err!(
            InvalidArgument,
            "dst tensor has type {}, expected one of {types:?}",
            tr.type_
        ));
    }
    // SAFETY: `tr.buffer` is checked for NULL first; ggml only reads the buffer's interface.
    if tr.buffer.is_null() || !unsafe { ggml_sys::ggml_backend_buffer_is_host(tr.buffer) } {
        return Err(crate::error::err!(
            InvalidArgument,
            "dst tensor is not in a host buffer"
        ));
    }
    // SAFETY: `t` is a valid tensor (see above); these functions only read its header.
    let (contiguous, n) = unsafe { (ggml_sys::ggml_is_contiguous(t), ggml_sys::ggml_nelements(t)) };
    if !contiguous
        || tr.data.is_null()
        || n < 0
        || tr.data.align_offset(std::mem::align_of::<E>()) != 0
    {
        return Err(crate::error::err!(
            InvalidArgument,
            "dst tensor is not contiguous, aligned host data"
        ));
    }
    // SAFETY: a contiguous host tensor of this element type holds `n` elements at `data`
    // (aligned, checked above), and the caller does not access it during the call.
    let data = unsafe { std::slice::from_raw_parts_mut(tr.data.cast::<E>(), n as usize) };
    Ok((tr, data))
}

/// Writes up to `cap` (buffer type, bytes) pairs of a memory breakdown into the caller's
/// arrays and returns how many pairs there are (`cap = 0` sizes the arrays).
pub(crate) fn write_breakdown(
    bd: &[(*mut ggml_sys::ggml_backend_buffer_type, usize)],
    bufts: *mut *mut ggml_sys::ggml_backend_buffer_type,
    sizes: *mut usize,
    cap: usize,
) -> crate::error::Result<usize> {
    let n = bd.len().min(cap);
    check_slice(bufts.cast_const(), n, "bufts")?;
    check_slice(sizes.cast_const(), n, "sizes")?;
    if n > 0 {
        // SAFETY: the header requires the arrays to hold `cap` writable elements; check_slice
        // refused NULL, misaligned and oversized ones for the `n <= cap` written.
        let (out_b, out_s) = unsafe {
            (
                std::slice::from_raw_parts_mut(bufts, n),
                std::slice::from_raw_parts_mut(sizes, n),
            )
        };
        for (i, (b, s)) in bd.iter().take(n).enumerate() {
            out_b[i] = *b;
            out_s[i] = *s;
        }
    }
    Ok(bd.len())
}
