//! Failure injection for the unit tests of restores: a test arms the `n`-th failpoint its
//! thread hits, and shows that the operation then fails without changing anything. Outside the
//! crate's own tests a failpoint is an empty inline function.

#![forbid(unsafe_code)]

use crate::error::Result;

#[cfg(test)]
thread_local! {
    /// (failpoints hit so far, the hit that fails).
    static ARMED: std::cell::Cell<(u32, Option<u32>)> = const { std::cell::Cell::new((0, None)) };
}

/// Fails with an injected error when the armed count is reached.
#[cfg(test)]
pub(crate) fn hit(what: &str) -> Result<()> {
    let (n, at) = ARMED.with(|a| a.get());
    ARMED.with(|a| a.set((n + 1, at)));
    if at == Some(n) {
        return Err(crate::error::err!(Io, "injected failure at {what}"));
    }
    Ok(())
}

/// A failpoint outside tests: nothing.
#[cfg(not(test))]
#[inline(always)]
pub(crate) fn hit(_what: &str) -> Result<()> {
    Ok(())
}

/// Arms the `at`-th failpoint hit from now on this thread (`None`: none), and returns the
/// number of hits since the last call.
#[cfg(test)]
pub(crate) fn arm(at: Option<u32>) -> u32 {
    ARMED.with(|a| a.replace((0, at)).0)
}
