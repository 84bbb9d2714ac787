//! What the static musl build (the release image's binary, see README "Benchmark") links
//! instead of two of musl's defaults, both measured as the larger part of a run's own time:
//!
//! * **The allocator.** musl's malloc hands memory back to the kernel on most frees (an
//!   `munmap` and later a page fault each), and the `GlobalDlmalloc` of the `dlmalloc` crate
//!   takes a pthread mutex around every call. [`Allocator`] is the same dlmalloc behind a
//!   spin lock that yields: the program is single-threaded but for `--run-validation`'s
//!   short-lived listener threads, so the lock is almost never contended.
//! * **`memcpy` and `memmove`.** musl's x86_64 `memcpy` starts every copy, however small,
//!   with `rep movsq` and finishes with a `movsb` loop; Rust calls it for every `String` append,
//!   so formatting 7,000 rules spent a third of its time there. These copy up to 32 bytes
//!   with (possibly overlapping) unaligned loads and stores, all loads first, and larger
//!   blocks with one `rep movsb` (backwards, for a `memmove` onto an overlapping higher
//!   address). Defining them here keeps musl's `memcpy.o` and `memmove.o` out of the link.
//!   The bodies use no loop a compiler could turn back into a `memcpy` call.
//!
//! The glibc build (the default target, tests and CI) uses neither: glibc's are fast.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout};
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, Ordering};

/// dlmalloc behind a spin lock (see the module docs).
pub struct Allocator {
    locked: AtomicBool,
    heap: UnsafeCell<dlmalloc::Dlmalloc>,
}

// SAFETY: `heap` is only reached through `with`, which holds `locked`.
unsafe impl Sync for Allocator {}

impl Allocator {
    pub const fn new() -> Self {
        Self {
            locked: AtomicBool::new(false),
            heap: UnsafeCell::new(dlmalloc::Dlmalloc::new()),
        }
    }

    /// Runs `f` on the heap with the lock held.
    #[inline]
    fn with<T>(&self, f: impl FnOnce(&mut dlmalloc::Dlmalloc) -> T) -> T {
        while self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::thread::yield_now();
        }
        // SAFETY: the lock is held: no other reference to the heap exists until it is
        // released below. `f` is an allocator call, which cannot re-enter the allocator.
        let r = f(unsafe { &mut *self.heap.get() });
        self.locked.store(false, Ordering::Release);
        r
    }
}

impl Default for Allocator {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: each method forwards to dlmalloc's matching call with the layout it was given,
// which is what dlmalloc's own `GlobalDlmalloc` does, under a lock instead of a mutex.
unsafe impl GlobalAlloc for Allocator {
    #[inline]
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        self.with(|h| unsafe { h.malloc(l.size(), l.align()) })
    }
    #[inline]
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        self.with(|h| unsafe { h.calloc(l.size(), l.align()) })
    }
    #[inline]
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        self.with(|h| unsafe { h.free(p, l.size(), l.align()) })
    }
    #[inline]
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
        self.with(|h| unsafe { h.realloc(p, l.size(), l.align(), new_size) })
    }
}

/// Copies `n <= 32` bytes, every load before the first store (so `src` and `dst` may
/// overlap).
///
/// # Safety
/// `src` readable and `dst` writable for `n` bytes.
#[inline(always)]
unsafe fn copy_small(dst: *mut u8, src: *const u8, n: usize) {
    unsafe {
        if n > 16 {
            let a = src.cast::<u128>().read_unaligned();
            let b = src.add(n - 16).cast::<u128>().read_unaligned();
            dst.cast::<u128>().write_unaligned(a);
            dst.add(n - 16).cast::<u128>().write_unaligned(b);
        } else if n >= 8 {
            let a = src.cast::<u64>().read_unaligned();
            let b = src.add(n - 8).cast::<u64>().read_unaligned();
            dst.cast::<u64>().write_unaligned(a);
            dst.add(n - 8).cast::<u64>().write_unaligned(b);
        } else if n >= 4 {
            let a = src.cast::<u32>().read_unaligned();
            let b = src.add(n - 4).cast::<u32>().read_unaligned();
            dst.cast::<u32>().write_unaligned(a);
            dst.add(n - 4).cast::<u32>().write_unaligned(b);
        } else if n > 0 {
            let a = *src;
            let b = *src.add(n / 2);
            let c = *src.add(n - 1);
            *dst = a;
            *dst.add(n / 2) = b;
            *dst.add(n - 1) = c;
        }
    }
}

/// C's `memcpy` (see the module docs).
///
/// # Safety
/// As C's: `src` readable and `dst` writable for `n` bytes, not overlapping.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    unsafe {
        if n <= 32 {
            copy_small(dst, src, n);
        } else {
            std::arch::asm!(
                "rep movsb",
                inout("rcx") n => _,
                inout("rdi") dst => _,
                inout("rsi") src => _,
                options(nostack, preserves_flags)
            );
        }
    }
    dst
}

/// C's `memmove` (see the module docs).
///
/// # Safety
/// As C's: `src` readable and `dst` writable for `n` bytes; they may overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    unsafe {
        if n <= 32 {
            copy_small(dst, src, n);
        } else if (dst as usize).wrapping_sub(src as usize) >= n {
            // dst below src, or past its end: a forward copy reads each byte before
            // overwriting it.
            std::arch::asm!(
                "rep movsb",
                inout("rcx") n => _,
                inout("rdi") dst => _,
                inout("rsi") src => _,
                options(nostack, preserves_flags)
            );
        } else {
            // dst inside (src, src + n): copy from the last byte down.
            std::arch::asm!(
                "std",
                "rep movsb",
                "cld",
                inout("rcx") n => _,
                inout("rdi") dst.add(n - 1) => _,
                inout("rsi") src.add(n - 1) => _,
                options(nostack)
            );
        }
    }
    dst
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + 3) as u8).collect()
    }

    #[test]
    fn memcpy_copies_every_length_and_alignment() {
        let src = pattern(600);
        for n in 0..=300 {
            for off in 0..8 {
                let mut dst = vec![0xAAu8; 320];
                let r = unsafe { memcpy(dst.as_mut_ptr().add(off), src.as_ptr().add(3), n) };
                assert_eq!(r, unsafe { dst.as_mut_ptr().add(off) });
                assert_eq!(&dst[off..off + n], &src[3..3 + n], "n={n} off={off}");
                assert!(dst[..off].iter().all(|&b| b == 0xAA), "n={n} off={off}");
                assert!(dst[off + n..].iter().all(|&b| b == 0xAA), "n={n} off={off}");
            }
        }
    }

    #[test]
    fn memmove_handles_overlap_both_ways() {
        for n in 0..=200 {
            for shift in 0..40usize {
                for up in [false, true] {
                    let mut buf = pattern(300);
                    let mut want = buf.clone();
                    let (from, to) = if up {
                        (10, 10 + shift)
                    } else {
                        (10 + shift, 10)
                    };
                    want.copy_within(from..from + n, to);
                    let p = buf.as_mut_ptr();
                    unsafe { memmove(p.add(to), p.add(from), n) };
                    assert_eq!(buf, want, "n={n} shift={shift} up={up}");
                }
            }
        }
    }

    #[test]
    fn allocator_allocates_aligned_and_reallocates() {
        let a = Allocator::new();
        for (size, align) in [(1, 1), (24, 8), (100, 64), (5000, 4096), (1 << 20, 16)] {
            let l = Layout::from_size_align(size, align).unwrap();
            unsafe {
                let p = a.alloc_zeroed(l);
                assert!(!p.is_null());
                assert_eq!(p as usize % align, 0);
                assert!((0..size).all(|i| *p.add(i) == 0));
                p.write_bytes(0x5A, size);
                let q = a.realloc(p, l, size * 2);
                assert!((0..size).all(|i| *q.add(i) == 0x5A));
                a.dealloc(q, Layout::from_size_align(size * 2, align).unwrap());
            }
        }
    }
}
