//! The allocator: mimalloc, for glibc's spent more time than the parser on the first load of
//! 100k objects parsed on several threads, and kept what its per-thread arenas freed.

/// The binary's global allocator.
pub type Allocator = mimalloc::MiMalloc;

/// Hands memory freed by a burst of work (the first load's parsing and compiling) back to the
/// system now: the allocator does it only when next called, and an idle agent calls it little.
pub fn release() {
    // SAFETY: mi_collect only walks and purges the allocator's own free memory.
    unsafe { libmimalloc_sys::mi_collect(true) }
}
