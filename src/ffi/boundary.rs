//! Panic boundary and pointer checks shared by every entry point.

/// Runs `$body` (which evaluates to the return value) with panics caught: a caught panic sets
/// the last error and yields `$fail`.
macro_rules! ffi_boundary {
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

/// Converts a `Result<T>` into `T`, or records the error and returns `$fail` from the function.
macro_rules! try_or {
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

/// Dereferences a handle pointer, or records a NULL-argument error and returns `$fail`.
macro_rules! try_ref {
    ($fail:expr, $ptr:expr, $name:literal) => {{
        let p = $ptr;
        if p.is_null() {
            $crate::ffi::error::set_error(&$crate::error::Error::new(
                $crate::error::ErrorKind::NullArgument,
                concat!($name, " is NULL"),
            ));
            return $fail;
        }
        // SAFETY: non-NULL handle pointers given to this library come from its own
        // constructors and stay valid until the matching free, as the header documents.
        unsafe { &*p }
    }};
}

/// Mutable variant of [`try_ref!`].
macro_rules! try_mut {
    ($fail:expr, $ptr:expr, $name:literal) => {{
        let p = $ptr;
        if p.is_null() {
            $crate::ffi::error::set_error(&$crate::error::Error::new(
                $crate::error::ErrorKind::NullArgument,
                concat!($name, " is NULL"),
            ));
            return $fail;
        }
        // SAFETY: as in try_ref!, plus the header's rule that a handle is not used from two
        // threads at once, so no other reference to it is live during this call.
        unsafe { &mut *p }
    }};
}

/// Builds a slice from a caller pointer and element count, or records an error and returns
/// `$fail` (NULL with a non-zero count).
macro_rules! try_slice {
    ($fail:expr, $ptr:expr, $len:expr, $name:literal) => {{
        let (p, n) = ($ptr, $len);
        if n == 0 {
            &[][..]
        } else if p.is_null() {
            $crate::ffi::error::set_error(&$crate::error::Error::new(
                $crate::error::ErrorKind::NullArgument,
                concat!($name, " is NULL"),
            ));
            return $fail;
        } else {
            // SAFETY: the header requires `$ptr` to point to `$len` readable elements.
            unsafe { ::std::slice::from_raw_parts(p, n) }
        }
    }};
}

/// Mutable variant of [`try_slice!`].
macro_rules! try_slice_mut {
    ($fail:expr, $ptr:expr, $len:expr, $name:literal) => {{
        let (p, n) = ($ptr, $len);
        if n == 0 {
            &mut [][..]
        } else if p.is_null() {
            $crate::ffi::error::set_error(&$crate::error::Error::new(
                $crate::error::ErrorKind::NullArgument,
                concat!($name, " is NULL"),
            ));
            return $fail;
        } else {
            // SAFETY: the header requires `$ptr` to point to `$len` writable elements that
            // nothing else accesses during the call.
            unsafe { ::std::slice::from_raw_parts_mut(p, n) }
        }
    }};
}
