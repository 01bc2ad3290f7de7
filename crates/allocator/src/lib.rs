//! The global memory allocator of the three services: mimalloc, told to give freed memory back
//! to the operating system at once.
//!
//! Why not the system allocator: measured with `hitcounter-bench` (docs/performance.md), glibc's
//! `malloc`/`free` took about half of ingest's CPU time (every key is a `String` in several
//! stages), and the aggregator's resident set kept the fragments of every freed checkpoint copy,
//! several times the window store itself. mimalloc is faster for these many small, short-lived
//! allocations.
//!
//! Why the purge delay of 0: mimalloc returns a freed page to the OS only a delay (1 s by
//! default) after it became free, and only when the owning thread runs mimalloc again; an aggregator that
//! goes quiet after a burst (or after a checkpoint) kept tens of MiB it no longer used. With 0,
//! `RSS` follows what is live (1M keys × 10 counters: 14 bytes per counter instead of 24).
//!
//! This is the one crate of the workspace allowed `unsafe`: a single call setting an option.
//! A service links it with `use hitcounter_allocator as _;` and calls [`init`] first in `main`.
#![allow(unsafe_code)]

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` of the bundled mimalloc 3.3's `mi_option_e` (include/mimalloc.h,
/// "memory purging is delayed by N milli seconds; use 0 for immediate purging"; 15 in v2 as
/// well); `libmimalloc-sys` has no constant for it. The test below checks its default.
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Sets the allocator's options. Call it first thing in `main`.
pub fn init() {
    // SAFETY: `mi_option_set` stores a value in mimalloc's global option table (an atomic
    // store); it has no preconditions on its arguments and touches no memory of ours.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, 0) }
}

/// The purge delay in force, in milliseconds.
// `c_long` is `i64` here but `i32` on other targets.
#[allow(clippy::useless_conversion)]
pub fn purge_delay_ms() -> i64 {
    // SAFETY: `mi_option_get` reads one entry of the option table.
    i64::from(unsafe { libmimalloc_sys::mi_option_get(PURGE_DELAY) })
}

#[cfg(test)]
mod tests {
    #[test]
    fn init_sets_the_purge_delay_to_zero() {
        // The default (1000 ms in mimalloc 3) identifies the option: a wrong index would read
        // another option's default.
        assert_eq!(super::purge_delay_ms(), 1000);
        super::init();
        assert_eq!(super::purge_delay_ms(), 0);
    }
}
