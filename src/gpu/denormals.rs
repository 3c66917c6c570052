//! Subnormal floats on software adapters.
//!
//! Mesa's lavapipe and llvmpipe run compute shaders on CPU worker threads, and an x86 core takes a
//! microcode assist for every operation that reads or produces a subnormal f32 unless the thread's
//! MXCSR flushes them (FTZ, DAZ). Mesa sets those bits for its rasteriser threads but not for its
//! compute threads: measured on lavapipe, `metaseg kernel mul` over 4M subnormal inputs took about
//! twice as long as over normal ones. Softmax and sigmoid tails (DTML's sigmoid(-1500 sdf), say)
//! produce subnormals. GPUs flush f32 subnormals anyway and WGSL allows it, so the adapter is
//! opened with the bits set: threads inherit the floating-point state of the thread that creates
//! them, and Mesa creates its workers while the adapter and device open. The opening thread's own
//! state is restored afterwards.

/// Sets flush-to-zero and denormals-are-zero on this thread until dropped.
pub struct FlushSubnormals {
    #[cfg(target_arch = "x86_64")]
    saved: u32,
}

#[cfg(target_arch = "x86_64")]
const FTZ_DAZ: u32 = (1 << 15) | (1 << 6);

impl FlushSubnormals {
    pub fn new() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let saved = read_mxcsr();
            write_mxcsr(saved | FTZ_DAZ);
            FlushSubnormals { saved }
        }
        #[cfg(not(target_arch = "x86_64"))]
        FlushSubnormals {}
    }
}

impl Default for FlushSubnormals {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for FlushSubnormals {
    fn drop(&mut self) {
        #[cfg(target_arch = "x86_64")]
        write_mxcsr(self.saved);
    }
}

/// This thread's MXCSR, the SSE/AVX control and status register.
#[cfg(target_arch = "x86_64")]
pub fn read_mxcsr() -> u32 {
    let mut value = 0u32;
    // SAFETY: stmxcsr stores 4 bytes to the pointed-to, writable u32 and has no other effect.
    unsafe {
        std::arch::asm!("stmxcsr [{}]", in(reg) &mut value, options(nostack, preserves_flags));
    }
    value
}

#[cfg(target_arch = "x86_64")]
fn write_mxcsr(value: u32) {
    // SAFETY: ldmxcsr reads 4 bytes from a valid u32; FTZ/DAZ and the saved value only change how
    // subnormals are treated (reserved bits come from a value the CPU itself stored).
    unsafe {
        std::arch::asm!("ldmxcsr [{}]", in(reg) &value, options(nostack, preserves_flags, readonly));
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn the_guard_sets_the_bits_and_restores_the_state() {
        let before = read_mxcsr();
        {
            let _flush = FlushSubnormals::new();
            assert_eq!(read_mxcsr(), before | FTZ_DAZ);
            // A thread started now inherits the bits, as Mesa's workers do.
            let child = std::thread::spawn(read_mxcsr).join().unwrap();
            assert_eq!(child & FTZ_DAZ, FTZ_DAZ);
        }
        assert_eq!(read_mxcsr(), before);
    }
}
