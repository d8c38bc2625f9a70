//! Typed handles, in the manner of rustls-ffi's `Castable`: each opaque C handle type names the
//! Rust type behind it and how the C side holds it, so a pointer is only ever turned into the
//! one type it was made from, and only a boxed handle can be freed.

/// A C handle type: an opaque, never-constructed struct whose pointers stand for a
/// `RustType`.
pub(crate) trait Castable {
    /// How the C side holds the value.
    type Ownership;
    /// The value a handle pointer stands for.
    type RustType;
}

/// The handle owns its value: made by [`to_boxed_mut_ptr`], ended by [`free_box`].
pub(crate) struct OwnershipBox;

/// Moves `value` to the heap and returns it as a handle pointer.
pub(crate) fn to_boxed_mut_ptr<C>(value: C::RustType) -> *mut C
where
    C: Castable<Ownership = OwnershipBox>,
{
    Box::into_raw(Box::new(value)).cast()
}

/// The value behind a handle pointer, `None` for NULL.
///
/// # Safety
/// A non-NULL `ptr` must come from [`to_boxed_mut_ptr`] for the same `C` and not be freed, and
/// no `&mut` to the value may be live for `'a`.
pub(crate) unsafe fn try_from<'a, C: Castable>(ptr: *const C) -> Option<&'a C::RustType> {
    // SAFETY: the caller's contract: the pointer was made from a `C::RustType`.
    unsafe { ptr.cast::<C::RustType>().as_ref() }
}

/// Mutable [`try_from`].
///
/// # Safety
/// As [`try_from`], and no other reference to the value may be live for `'a`.
pub(crate) unsafe fn try_from_mut<'a, C: Castable>(ptr: *mut C) -> Option<&'a mut C::RustType> {
    // SAFETY: the caller's contract, as in try_from, with exclusive access.
    unsafe { ptr.cast::<C::RustType>().as_mut() }
}

/// Takes the value back from a boxed handle; NULL gives `None`.
///
/// # Safety
/// A non-NULL `ptr` must come from [`to_boxed_mut_ptr`] for the same `C` and must not be used
/// afterwards.
pub(crate) unsafe fn take_box<C>(ptr: *mut C) -> Option<Box<C::RustType>>
where
    C: Castable<Ownership = OwnershipBox>,
{
    if ptr.is_null() {
        return None;
    }
    // SAFETY: the caller's contract: the pointer came from Box::into_raw of a C::RustType.
    Some(unsafe { Box::from_raw(ptr.cast::<C::RustType>()) })
}

/// Drops the value behind a boxed handle; NULL is a no-op.
///
/// # Safety
/// As [`take_box`].
pub(crate) unsafe fn free_box<C>(ptr: *mut C)
where
    C: Castable<Ownership = OwnershipBox>,
{
    // SAFETY: forwarded contract.
    drop(unsafe { take_box(ptr) });
}
