//! Per-kernel GPU time. Where the adapter has timestamp queries (lavapipe does), each profiled
//! dispatch gets its own compute pass with a timestamp at its start and end; otherwise each profiled
//! dispatch is submitted and waited for, and timed by the wall clock.

use std::time::Duration;

/// Queries kept before they are resolved and read back.
pub const CAPACITY: u32 = 2048;

#[derive(Clone, Debug, PartialEq)]
pub struct KernelTime {
    pub kernel: String,
    pub time: Duration,
    /// The bytes of the tensors bound to the dispatch: what it reads and writes at least once.
    pub bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clock {
    /// GPU timestamps around each dispatch: kernel execution only.
    Timestamps,
    /// Host time from submit to completion of each dispatch: includes submission overhead.
    WallClock,
}

impl std::fmt::Display for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Clock::Timestamps => "GPU timestamps",
            Clock::WallClock => "wall clock",
        })
    }
}

pub struct Profiler {
    pub clock: Clock,
    pub query_set: Option<wgpu::QuerySet>,
    /// Kernels (with their bytes bound) whose timestamp pairs are pending, in query-slot order.
    pub pending: Vec<(String, u64)>,
    pub done: Vec<KernelTime>,
}

impl Profiler {
    pub fn new(device: &wgpu::Device, timestamps: bool) -> Self {
        let query_set = timestamps.then(|| {
            device.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("metaseg kernel timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: CAPACITY,
            })
        });
        Profiler {
            clock: if timestamps {
                Clock::Timestamps
            } else {
                Clock::WallClock
            },
            query_set,
            pending: Vec::new(),
            done: Vec::new(),
        }
    }

    pub fn is_full(&self) -> bool {
        (self.pending.len() as u32 + 1) * 2 > CAPACITY
    }
}
