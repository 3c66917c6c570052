//! Buffer reuse: a tensor's buffer goes back to the pool when the tensor is dropped, and the next
//! request of the same size class takes it, so a training step stops allocating after its first
//! iteration.

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
    /// Bytes of buffers handed out and not yet given back, and the most there have been.
    live: u64,
    peak: u64,
}

/// Counters for tests and reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolStats {
    pub created: u64,
    pub reused: u64,
    pub pooled_bytes: u64,
    /// Bytes in buffers held by tensors now, and the most since the last [`BufferPool::reset_peak`]:
    /// the device memory a computation needs, as the pool sees it.
    pub live_bytes: u64,
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
        free.live += size;
        free.peak = free.peak.max(free.live);
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
        free.live -= size;
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
            live_bytes: free.live,
            peak_bytes: free.peak,
        }
    }

    /// Starts a new peak from the bytes live now.
    pub fn reset_peak(&self) {
        let mut free = self.free.lock().unwrap();
        free.peak = free.live;
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

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
