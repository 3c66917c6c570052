//! The device: adapter selection, limits, and the one path every kernel launch takes
//! (pipeline from the registry, bind group, compute pass recorded into the batch's command
//! buffer, submitted without waiting every BATCH launches or before anything else uses the queue).

use super::kernels::{Access, Kernel, Registry};
use super::pool::{BufferPool, PoolStats};
use super::profiler::{Clock, KernelTime, Profiler, CAPACITY};
use parking_lot::{ReentrantMutex, ReentrantMutexGuard};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Dispatches recorded per command buffer at most. On lavapipe each submission costs a wake-up of
/// the driver's queue thread and a fence, more than a small kernel of the 2D network runs; a
/// batch still lets the device start on the first launches while later ones are recorded.
const BATCH: usize = 32;

/// Dispatches recorded but not yet submitted, with what must outlive their submission.
#[derive(Default)]
struct Batch {
    encoder: Option<wgpu::CommandEncoder>,
    /// The kernels recorded, for the message of an error the submission reports.
    kernels: Vec<String>,
    /// Their parameter uniforms, back to the pool once submitted.
    uniforms: Vec<wgpu::Buffer>,
}

/// Why no device could be opened.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "no GPU adapter found ({backends}): {reason}. Install a GPU driver, or a software adapter: \
         Mesa's lavapipe (Debian/Ubuntu: apt-get install mesa-vulkan-drivers) for Vulkan, or Mesa's \
         llvmpipe through OpenGL/EGL (libegl1 + libgl1-mesa-dri, then WGPU_BACKEND=gl)"
    )]
    NoAdapter { backends: String, reason: String },
    #[error("the adapter {adapter} refused a device: {reason}")]
    RequestDevice { adapter: String, reason: String },
    #[error("a binding limit that cannot be used: {0}")]
    BindingOverride(String),
}

/// Everything `metaseg info` shows about the adapter.
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    pub info: wgpu::AdapterInfo,
    pub limits: wgpu::Limits,
    pub features: wgpu::Features,
}

pub struct Context {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub adapter: AdapterSummary,
    pub registry: Registry,
    pub storage: BufferPool,
    pub uniforms: BufferPool,
    profiler: Mutex<Option<Profiler>>,
    batch: Mutex<Batch>,
    /// Kernel launches since the device opened (a step's count is the difference).
    dispatches: AtomicU64,
    /// OpenGL has one context per device, which wgpu locks with a 6 s timeout and panics after it;
    /// a long wait for the device on one thread would then bring down another. On GL every device
    /// call of ours therefore takes this lock first (re-entrant, so nested calls are fine).
    gl_lock: Option<ReentrantMutex<()>>,
    /// A binding limit below the adapter's, to run the split paths with small tensors.
    binding_override: Option<u64>,
    /// The ops that ran in ranges since the device opened (see `split`), for tests and reports.
    split_ops: Mutex<std::collections::BTreeSet<String>>,
}

/// The environment variable that lowers the binding limit (bytes) of every context opened, to
/// study or test how kernels split tensors larger than one binding.
pub const MAX_BINDING_ENV: &str = "METASEG_MAX_BINDING_BYTES";

/// A buffer and how the kernel reads it.
pub struct Binding<'a> {
    pub binding: u32,
    pub access: Access,
    pub buffer: &'a wgpu::Buffer,
    /// The bound range: its start (a multiple of min_storage_buffer_offset_alignment) and length.
    pub offset: u64,
    pub size: u64,
    /// The bytes of the buffer that hold the tensor (a pooled buffer may be larger): the
    /// profiler's traffic count.
    pub bytes: u64,
}

/// One region of [`Context::copy_regions`].
pub struct BufferCopy<'a> {
    pub from: &'a wgpu::Buffer,
    pub from_offset: u64,
    pub to: &'a wgpu::Buffer,
    pub to_offset: u64,
    pub bytes: u64,
}

impl Context {
    /// Opens the adapter that `WGPU_BACKEND` (vulkan, metal, dx12, gl) selects, or the best one
    /// available, asking for the adapter's own limits rather than wgpu's conservative defaults.
    pub fn new() -> Result<Context, DeviceError> {
        let from_env = std::env::var(MAX_BINDING_ENV).ok();
        let limit = match from_env.as_deref().map(str::parse::<u64>) {
            None => None,
            Some(Ok(bytes)) => Some(bytes),
            Some(Err(e)) => {
                return Err(DeviceError::BindingOverride(format!(
                    "{MAX_BINDING_ENV}={}: {e}",
                    from_env.unwrap_or_default()
                )))
            }
        };
        Context::with_max_binding_bytes(limit)
    }

    /// [`Context::new`] with the binding limit lowered to `limit` bytes (if given): every tensor
    /// larger than that is bound in ranges, as on an adapter that binds no more.
    pub fn with_max_binding_bytes(limit: Option<u64>) -> Result<Context, DeviceError> {
        // A software adapter's worker threads start while the adapter and device open, and keep
        // this thread's floating-point state: subnormals flushed, as on a GPU (see `denormals`).
        let flush = super::denormals::FlushSubnormals::new();
        // Without WGPU_BACKEND, the native APIs first; OpenGL only if none has an adapter (probing
        // GL needlessly opens EGL, which prints warnings on headless machines).
        let adapter = match wgpu::Backends::from_env() {
            Some(backends) => request_adapter(backends),
            None => request_adapter(wgpu::Backends::PRIMARY)
                .or_else(|_| request_adapter(wgpu::Backends::SECONDARY)),
        }?;
        let summary = AdapterSummary {
            info: adapter.get_info(),
            limits: adapter.limits(),
            features: adapter.features(),
        };
        let wanted = wgpu::Features::TIMESTAMP_QUERY;
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("metaseg"),
            required_features: summary.features & wanted,
            required_limits: summary.limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| DeviceError::RequestDevice {
            adapter: summary.info.name.clone(),
            reason: e.to_string(),
        })?;
        drop(flush);
        if let Some(bytes) = limit {
            let align = (summary.limits.min_storage_buffer_offset_alignment as u64).max(16);
            if bytes < align || !bytes.is_multiple_of(16) {
                return Err(DeviceError::BindingOverride(format!(
                    "{bytes} bytes: it must be a multiple of 16 and at least the adapter's offset \
                     alignment ({align} bytes)"
                )));
            }
        }
        let is_gl = summary.info.backend == wgpu::Backend::Gl;
        let storage = wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_SRC
            | wgpu::BufferUsages::COPY_DST;
        Ok(Context {
            device,
            queue,
            adapter: summary,
            registry: Registry::default(),
            storage: BufferPool::new(storage),
            uniforms: BufferPool::new(wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST),
            profiler: Mutex::new(None),
            batch: Mutex::new(Batch::default()),
            dispatches: AtomicU64::new(0),
            gl_lock: is_gl.then(|| ReentrantMutex::new(())),
            binding_override: limit,
            split_ops: Mutex::default(),
        })
    }

    /// Held while calling into the device; serialises threads on OpenGL only (see `gl_lock`).
    pub fn exclusive(&self) -> Option<ReentrantMutexGuard<'_, ()>> {
        self.gl_lock.as_ref().map(|l| l.lock())
    }

    pub fn has_timestamps(&self) -> bool {
        self.device
            .features()
            .contains(wgpu::Features::TIMESTAMP_QUERY)
    }

    /// Kernel launches since the device opened.
    pub fn dispatch_count(&self) -> u64 {
        self.dispatches.load(Ordering::Relaxed)
    }

    /// Largest range of a buffer a kernel can bind (the adapter's limit, or the lower one the
    /// context was opened with).
    pub fn max_binding_bytes(&self) -> u64 {
        let adapter = (self.adapter.limits.max_storage_buffer_binding_size)
            .min(self.adapter.limits.max_buffer_size);
        self.binding_override.map_or(adapter, |b| b.min(adapter))
    }

    /// Notes that `op` ran in ranges because a tensor exceeded one binding.
    pub fn note_split(&self, op: &str) {
        let mut ops = self.split_ops.lock().unwrap();
        if !ops.contains(op) {
            ops.insert(op.to_string());
        }
    }

    /// The ops (or flat kernels) that have run in ranges since the device opened.
    pub fn split_ops(&self) -> Vec<String> {
        self.split_ops.lock().unwrap().iter().cloned().collect()
    }

    /// Largest buffer, and so the largest tensor.
    pub fn max_buffer_bytes(&self) -> u64 {
        self.adapter.limits.max_buffer_size
    }

    /// Where a bound range may start: a multiple of this many bytes (of 16 at least, so that
    /// every range but a tensor's last holds whole vec4s).
    pub fn binding_alignment(&self) -> u64 {
        (self.adapter.limits.min_storage_buffer_offset_alignment as u64).max(16)
    }

    /// The 2D grid of workgroups for `groups` workgroups in all (a dimension holds at most
    /// max_compute_workgroups_per_dimension); kernels linearise it as y * groups.x + x.
    pub fn grid(&self, groups: u32) -> [u32; 3] {
        let max = self
            .adapter
            .limits
            .max_compute_workgroups_per_dimension
            .max(1);
        if groups <= max {
            [groups.max(1), 1, 1]
        } else {
            [max, groups.div_ceil(max), 1]
        }
    }

    /// Records one dispatch of `kernel` into the batch (submitted without waiting when the batch
    /// is full, see BATCH). `params`, if any, become the uniform at binding 0. Validation errors
    /// are reported with the kernel's name (those found at submission, with the batch's kernels).
    pub fn dispatch(
        &self,
        kernel: &Kernel,
        params: Option<&[u8]>,
        buffers: &[Binding],
        workgroups: [u32; 3],
    ) -> Result<(), String> {
        let _device = self.exclusive();
        let uniform = params.map(|p| {
            let buffer = self.uniforms.acquire(&self.device, p.len() as u64);
            self.queue.write_buffer(&buffer, 0, p);
            buffer
        });
        let mut layout: Vec<(u32, Access)> = Vec::new();
        let mut entries: Vec<wgpu::BindGroupEntry> = Vec::new();
        if let Some(u) = &uniform {
            layout.push((0, Access::Uniform));
            entries.push(wgpu::BindGroupEntry {
                binding: 0,
                resource: u.as_entire_binding(),
            });
        }
        for b in buffers {
            layout.push((b.binding, b.access));
            if b.size > self.max_binding_bytes() {
                return Err(format!(
                    "{}: binding {} is {} bytes; the adapter binds at most {} bytes and this \
                     kernel does not split its tensors",
                    kernel.label(),
                    b.binding,
                    b.size,
                    self.max_binding_bytes()
                ));
            }
            entries.push(wgpu::BindGroupEntry {
                binding: b.binding,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: b.buffer,
                    offset: b.offset,
                    size: std::num::NonZeroU64::new(b.size),
                }),
            });
        }
        let pipeline = self.registry.pipeline(&self.device, kernel, &layout)?;

        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.layout,
            entries: &entries,
        });
        let traffic = buffers.iter().map(|b| b.bytes).sum();
        let mut profiler = self.profiler.lock().unwrap();
        if profiler.as_ref().is_some_and(Profiler::is_full) {
            self.resolve_timestamps(profiler.as_mut().unwrap())?;
        }
        let slot = match profiler.as_mut() {
            Some(p) if p.clock == Clock::Timestamps => {
                p.pending.push((kernel.label(), traffic));
                Some(2 * (p.pending.len() as u32 - 1))
            }
            _ => None,
        };
        let wall_clock = profiler
            .as_ref()
            .is_some_and(|p| p.clock == Clock::WallClock);
        if wall_clock {
            self.flush()?; // the earlier launches' time is not this kernel's
        }
        let mut batch = self.batch.lock().unwrap();
        let encoder = batch
            .encoder
            .get_or_insert_with(|| self.device.create_command_encoder(&Default::default()));
        {
            let timestamp_writes = slot.map(|s| wgpu::ComputePassTimestampWrites {
                query_set: profiler.as_ref().unwrap().query_set.as_ref().unwrap(),
                beginning_of_pass_write_index: Some(s),
                end_of_pass_write_index: Some(s + 1),
            });
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: None,
                timestamp_writes,
            });
            pass.set_pipeline(&pipeline.pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(workgroups[0], workgroups[1], workgroups[2]);
        }
        batch.kernels.push(kernel.label());
        batch.uniforms.extend(uniform);
        let full = batch.kernels.len() >= BATCH;
        drop(batch);
        self.dispatches.fetch_add(1, Ordering::Relaxed);
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(format!("dispatching {}: {err}", kernel.label()));
        }
        if wall_clock {
            let start = Instant::now();
            if let Some(submission) = self.flush()? {
                self.wait_for(submission)?;
            }
            profiler.as_mut().unwrap().done.push(KernelTime {
                kernel: kernel.label(),
                time: start.elapsed(),
                bytes: traffic,
            });
        } else if full {
            self.flush()?;
        }
        Ok(())
    }

    /// Submits the dispatches recorded so far, if any: before anything else goes to the queue
    /// (uploads, copies, readbacks), which would otherwise run ahead of them.
    fn flush(&self) -> Result<Option<wgpu::SubmissionIndex>, String> {
        let _device = self.exclusive();
        let mut batch = self.batch.lock().unwrap();
        let Some(encoder) = batch.encoder.take() else {
            return Ok(None);
        };
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let submission = self.queue.submit([encoder.finish()]);
        let kernels = std::mem::take(&mut batch.kernels);
        for u in batch.uniforms.drain(..) {
            self.uniforms.release(u);
        }
        drop(batch);
        match pollster::block_on(scope.pop()) {
            Some(err) => Err(format!("dispatching {}: {err}", kernels.join(", "))),
            None => Ok(Some(submission)),
        }
    }

    /// Records buffer-to-buffer copies (source, source offset, destination, destination offset,
    /// bytes; offsets and sizes multiples of 4) in one command buffer and submits it without
    /// waiting: a DMA-style copy, no kernel.
    pub fn copy_regions(&self, copies: &[BufferCopy]) -> Result<(), String> {
        let _device = self.exclusive();
        self.flush()?;
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let mut encoder = self.device.create_command_encoder(&Default::default());
        for c in copies {
            encoder.copy_buffer_to_buffer(c.from, c.from_offset, c.to, c.to_offset, c.bytes);
        }
        self.queue.submit([encoder.finish()]);
        match pollster::block_on(scope.pop()) {
            Some(err) => Err(format!("copying between buffers: {err}")),
            None => Ok(()),
        }
    }

    /// Blocks until `submission` has finished on the device. Waits without a timeout: a single
    /// kernel can run for seconds on a software adapter.
    pub fn wait_for(&self, submission: wgpu::SubmissionIndex) -> Result<(), String> {
        let _device = self.exclusive();
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: Some(submission),
                timeout: None,
            })
            .map(|_| ())
            .map_err(|e| format!("waiting for the device: {e}"))
    }

    /// Blocks until all submitted work has finished.
    pub fn synchronize(&self) -> Result<(), String> {
        let _device = self.exclusive();
        self.flush()?;
        let submission = self.queue.submit([]);
        self.wait_for(submission)
    }

    /// Copies `bytes` bytes of `buffer` from `offset` to the host (waits for the device).
    pub fn read(&self, buffer: &wgpu::Buffer, offset: u64, bytes: u64) -> Result<Vec<u8>, String> {
        let _device = self.exclusive();
        self.flush()?;
        let size = bytes.next_multiple_of(wgpu::COPY_BUFFER_ALIGNMENT).max(4);
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("metaseg readback"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = self.device.create_command_encoder(&Default::default());
        encoder.copy_buffer_to_buffer(buffer, offset, &staging, 0, size);
        let submission = self.queue.submit([encoder.finish()]);
        let (tx, rx) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.wait_for(submission)?;
        rx.recv()
            .map_err(|e| format!("readback callback lost: {e}"))?
            .map_err(|e| format!("mapping the readback buffer: {e}"))?;
        let data = staging
            .get_mapped_range(..)
            .map_err(|e| format!("reading the mapped buffer: {e}"))?[..bytes as usize]
            .to_vec();
        staging.unmap();
        Ok(data)
    }

    /// Starts recording the time of every dispatch (until `take_kernel_times`).
    pub fn start_profiling(&self) {
        let _device = self.exclusive();
        *self.profiler.lock().unwrap() = Some(Profiler::new(&self.device, self.has_timestamps()));
    }

    /// The time of each dispatch since `start_profiling`, and how it was measured; stops profiling.
    pub fn take_kernel_times(&self) -> Result<(Vec<KernelTime>, Clock), String> {
        let _device = self.exclusive();
        let Some(mut p) = self.profiler.lock().unwrap().take() else {
            return Err("profiling was not started".into());
        };
        self.resolve_timestamps(&mut p)?;
        Ok((p.done, p.clock))
    }

    fn resolve_timestamps(&self, p: &mut Profiler) -> Result<(), String> {
        let (Some(query_set), false) = (&p.query_set, p.pending.is_empty()) else {
            return Ok(());
        };
        let count = 2 * p.pending.len() as u32;
        debug_assert!(count <= CAPACITY);
        self.flush()?;
        let resolved = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("metaseg timestamps"),
            size: 8 * count as u64,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let mut encoder = self.device.create_command_encoder(&Default::default());
        encoder.resolve_query_set(query_set, 0..count, &resolved, 0);
        self.queue.submit([encoder.finish()]);
        let bytes = self.read(&resolved, 0, 8 * count as u64)?;
        let ticks: &[u64] = bytemuck::cast_slice(&bytes);
        let period = self.queue.get_timestamp_period() as f64;
        for (i, (kernel, bytes)) in p.pending.drain(..).enumerate() {
            let ns = ticks[2 * i + 1].saturating_sub(ticks[2 * i]) as f64 * period;
            p.done.push(KernelTime {
                kernel,
                time: Duration::from_nanos(ns as u64),
                bytes,
            });
        }
        Ok(())
    }

    /// A storage buffer of at least `bytes` bytes from the pool.
    pub fn acquire(&self, bytes: u64) -> wgpu::Buffer {
        let _device = self.exclusive();
        self.storage.acquire(&self.device, bytes)
    }

    /// Returns a storage buffer to the pool.
    pub fn release(&self, buffer: wgpu::Buffer) {
        let _device = self.exclusive();
        self.storage.release(buffer);
    }

    /// Copies host data into the start of `buffer`, after the launches recorded so far (a pooled
    /// buffer may still be read by one of them) and before those recorded later.
    pub fn write(&self, buffer: &wgpu::Buffer, data: &[u8]) -> Result<(), String> {
        let _device = self.exclusive();
        self.flush()?;
        self.queue.write_buffer(buffer, 0, data);
        Ok(())
    }

    pub fn pool_stats(&self) -> PoolStats {
        self.storage.stats()
    }

    /// Starts a new peak of the storage pool's bytes in use (see [`PoolStats::peak_bytes`]).
    pub fn reset_pool_peak(&self) {
        self.storage.reset_peak();
    }
}

fn request_adapter(backends: wgpu::Backends) -> Result<wgpu::Adapter, DeviceError> {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    desc.backends = backends;
    let instance = wgpu::Instance::new(desc);
    pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
        power_preference: wgpu::PowerPreference::HighPerformance,
        force_fallback_adapter: false,
        compatible_surface: None,
        apply_limit_buckets: false,
    }))
    .map_err(|e| DeviceError::NoAdapter {
        backends: format!("{backends:?}"),
        reason: e.to_string(),
    })
}
