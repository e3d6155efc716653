//! Atomics, swapped for loom's model-checked versions under `--cfg loom`.
//!
//! The lock-free cores of the workspace import their atomics from here, so that one
//! `RUSTFLAGS="--cfg loom"` build model-checks all of them.

#[cfg(loom)]
pub use loom::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
pub use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU32, AtomicU64, Ordering};

/// Called inside the (short, bounded) spin of a bucket reset.
#[inline]
pub fn spin_wait() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::hint::spin_loop();
}

/// Keeps a hot atomic on its own cache line so that writers of one field do not
/// invalidate readers of its neighbours.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct CachePadded<T>(pub T);

impl<T> std::ops::Deref for CachePadded<T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        &self.0
    }
}
