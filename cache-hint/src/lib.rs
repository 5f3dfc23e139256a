//! Cache hints. A driver that knows what comes next (the next arrival's key, the
//! next event's request) can ask for its memory early, so handling it does not
//! wait on a cache miss. A hint changes no state, and no decision depends on it.

/// Asks the CPU to bring every cache line of `value` toward its L1 cache,
/// without waiting for them. A no-op on targets other than x86-64.
#[inline]
pub fn prefetch<T: ?Sized>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        let start = (value as *const T).cast::<i8>();
        for offset in (0..std::mem::size_of_val(value)).step_by(64) {
            // SAFETY: a prefetch is a hint to the cache: it never faults, whatever
            // the address, and neither reads into the program nor writes memory.
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(start.wrapping_add(offset));
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}
