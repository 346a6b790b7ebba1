//! Running a kernel with the widest vector instructions the CPU has, in a portable build.
//!
//! The crate is compiled for the baseline x86-64 (SSE2) that every user's CPU has; on CPUs
//! with AVX-512 (or AVX2) the kernels run in a copy compiled for it, chosen once per call at
//! run time. The kernels are plain loops that the compiler vectorises lane by lane, so every
//! copy rounds every operation the same way (Rust never fuses a multiply and an add).

/// Run `kernel`, compiled for AVX-512 or AVX2 when this CPU supports it.
#[inline(always)]
pub fn dispatch<R>(kernel: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F, just checked.
            return unsafe { avx512(kernel) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, just checked.
            return unsafe { avx2(kernel) };
        }
    }
    kernel()
}

/// `kernel()` with AVX-512F enabled (the closure is inlined here, so its loops use it).
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512<R>(kernel: impl FnOnce() -> R) -> R {
    kernel()
}

/// `kernel()` with AVX2 enabled (the closure is inlined here, so its loops use it).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn avx2<R>(kernel: impl FnOnce() -> R) -> R {
    kernel()
}
