//! Buffer reuse: a tensor's buffer goes back to the pool when the tensor is dropped, and the next
//! request of the same size class takes it, so a training step stops allocating after its first
//! iteration. The pool also counts the bytes handed out and not yet given back, and their peak,
//! so a test or a bench can show how much memory an op needed at most.

use std::collections::HashMap;
use std::sync::Mutex;

/// Free buffers kept beyond this are destroyed rather than pooled.
const MAX_POOLED_BYTES: u64 = 1 << 30;

pub struct BufferPool {
    usage: wgpu::BufferUsages,
    free: Mutex<Free>,
}

#[derive(Default)]
struct Free {
    by_size: HashMap<u64, Vec<wgpu::Buffer>>,
    bytes: u64,
    created: u64,
    reused: u64,
    in_use: u64,
    peak: u64,
}

/// Counters for tests and reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolStats {
    pub created: u64,
    pub reused: u64,
    pub pooled_bytes: u64,
    /// Bytes of the buffers handed out and not yet released (size classes, not requests).
    pub in_use_bytes: u64,
    /// The most `in_use_bytes` has been since the pool was created or [`BufferPool::reset_peak`].
    pub peak_bytes: u64,
}

/// Rounds a request up to a size class: 256-byte granularity, then steps of a quarter of a power of
/// two, so a class wastes at most 25% and similar sizes share buffers.
pub fn size_class(bytes: u64) -> u64 {
    let bytes = bytes.max(256).next_multiple_of(256);
    let top = 63 - bytes.leading_zeros() as u64;
    if top < 10 {
        return bytes;
    }
    let step = 1u64 << (top - 2);
    bytes.next_multiple_of(step)
}

impl BufferPool {
    pub fn new(usage: wgpu::BufferUsages) -> Self {
        BufferPool {
            usage,
            free: Mutex::new(Free::default()),
        }
    }

    /// A buffer of at least `bytes` bytes (contents undefined).
    pub fn acquire(&self, device: &wgpu::Device, bytes: u64) -> wgpu::Buffer {
        let size = size_class(bytes);
        let mut free = self.free.lock().unwrap();
        free.in_use += size;
        free.peak = free.peak.max(free.in_use);
        if let Some(buffer) = free.by_size.get_mut(&size).and_then(Vec::pop) {
            free.bytes -= size;
            free.reused += 1;
            return buffer;
        }
        free.created += 1;
        drop(free);
        device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("metaseg pooled buffer"),
            size,
            usage: self.usage,
            mapped_at_creation: false,
        })
    }

    /// Gives a buffer back. Work already submitted that uses it still completes first: the queue
    /// orders later writes after it.
    pub fn release(&self, buffer: wgpu::Buffer) {
        let size = buffer.size();
        let mut free = self.free.lock().unwrap();
        free.in_use = free.in_use.saturating_sub(size);
        if free.bytes + size > MAX_POOLED_BYTES {
            // Dropping defers the actual free until submitted work that uses it is done.
            return;
        }
        free.bytes += size;
        free.by_size.entry(size).or_default().push(buffer);
    }

    pub fn stats(&self) -> PoolStats {
        let free = self.free.lock().unwrap();
        PoolStats {
            created: free.created,
            reused: free.reused,
            pooled_bytes: free.bytes,
            in_use_bytes: free.in_use,
            peak_bytes: free.peak,
        }
    }

    /// Starts a new peak from the bytes in use now.
    pub fn reset_peak(&self) {
        let mut free = self.free.lock().unwrap();
        free.peak = free.in_use;
    }
}

#[cfg(test)]
mod tests {
    use super::{size_class, BufferPool};
    use crate::gpu::Context;

    #[test]
    fn peak_bytes_are_the_most_bytes_in_use_at_once() {
        let ctx = Context::new().unwrap_or_else(|e| panic!("{e}"));
        // A pool of its own, so no other test's buffers count.
        let pool = BufferPool::new(wgpu::BufferUsages::STORAGE);
        let (small, large) = (size_class(1000), size_class(70_000));
        let in_use = |p: &BufferPool| (p.stats().in_use_bytes, p.stats().peak_bytes);
        let a = pool.acquire(&ctx.device, 1000);
        let b = pool.acquire(&ctx.device, 70_000);
        assert_eq!(in_use(&pool), (small + large, small + large));
        pool.release(a);
        assert_eq!(in_use(&pool), (large, small + large));
        // A reused buffer counts as in use again.
        let c = pool.acquire(&ctx.device, 900);
        assert_eq!(pool.stats().reused, 1);
        assert_eq!(in_use(&pool), (small + large, small + large));
        pool.release(b);
        pool.release(c);
        assert_eq!(in_use(&pool), (0, small + large));
        pool.reset_peak();
        assert_eq!(in_use(&pool), (0, 0));
        let d = pool.acquire(&ctx.device, 300);
        assert_eq!(in_use(&pool), (512, 512));
        pool.release(d);
    }

    #[test]
    fn size_classes_round_up_by_at_most_a_quarter() {
        assert_eq!(size_class(1), 256);
        assert_eq!(size_class(257), 512);
        for bytes in [1000u64, 4097, 65_537, 10_000_000, 123_456_789] {
            let c = size_class(bytes);
            assert!(
                c >= bytes && (c as f64) <= bytes as f64 * 1.25 + 256.0,
                "{bytes} -> {c}"
            );
        }
    }
}
