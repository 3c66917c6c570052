//! The kernel registry: every `kernels/*.wgsl` file compiled into the binary, and their pipelines
//! compiled once and cached by (file, entry point, override constants).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// One WGSL file: a kernel family, forward and backward entry points side by side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelFile {
    Elementwise,
    Reduce,
    Matmul,
    Random,
    Ceilings,
    Conv,
    Losses,
    Pool,
    Channels,
    ChannelAffine,
    MetaWeights,
    Contrastive,
    Distance,
    Warp,
}

impl KernelFile {
    pub const ALL: [KernelFile; 14] = [
        KernelFile::Elementwise,
        KernelFile::Reduce,
        KernelFile::Matmul,
        KernelFile::Random,
        KernelFile::Ceilings,
        KernelFile::Conv,
        KernelFile::Losses,
        KernelFile::Pool,
        KernelFile::Channels,
        KernelFile::ChannelAffine,
        KernelFile::MetaWeights,
        KernelFile::Contrastive,
        KernelFile::Distance,
        KernelFile::Warp,
    ];

    pub fn name(self) -> &'static str {
        match self {
            KernelFile::Elementwise => "elementwise.wgsl",
            KernelFile::Reduce => "reduce.wgsl",
            KernelFile::Matmul => "matmul.wgsl",
            KernelFile::Random => "random.wgsl",
            KernelFile::Ceilings => "ceilings.wgsl",
            KernelFile::Pool => "pool.wgsl",
            KernelFile::Channels => "channels.wgsl",
            KernelFile::ChannelAffine => "channel_affine.wgsl",
            KernelFile::MetaWeights => "meta_weights.wgsl",
            KernelFile::Conv => "conv.wgsl",
            KernelFile::Losses => "losses.wgsl",
            KernelFile::Contrastive => "contrastive.wgsl",
            KernelFile::Distance => "distance.wgsl",
            KernelFile::Warp => "warp.wgsl",
        }
    }

    pub fn source(self) -> &'static str {
        match self {
            KernelFile::Elementwise => include_str!("../../kernels/elementwise.wgsl"),
            KernelFile::Reduce => include_str!("../../kernels/reduce.wgsl"),
            KernelFile::Matmul => include_str!("../../kernels/matmul.wgsl"),
            KernelFile::Random => include_str!("../../kernels/random.wgsl"),
            KernelFile::Ceilings => include_str!("../../kernels/ceilings.wgsl"),
            KernelFile::Pool => include_str!("../../kernels/pool.wgsl"),
            KernelFile::Channels => include_str!("../../kernels/channels.wgsl"),
            KernelFile::ChannelAffine => include_str!("../../kernels/channel_affine.wgsl"),
            KernelFile::MetaWeights => include_str!("../../kernels/meta_weights.wgsl"),
            KernelFile::Conv => include_str!("../../kernels/conv.wgsl"),
            KernelFile::Losses => include_str!("../../kernels/losses.wgsl"),
            KernelFile::Contrastive => include_str!("../../kernels/contrastive.wgsl"),
            KernelFile::Distance => include_str!("../../kernels/distance.wgsl"),
            KernelFile::Warp => include_str!("../../kernels/warp.wgsl"),
        }
    }
}

/// How an entry point uses one binding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    Uniform,
    Read,
    ReadWrite,
}

/// A kernel to run: file, entry point and the values of its override constants.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    pub file: KernelFile,
    pub entry: &'static str,
    pub constants: Vec<(&'static str, f64)>,
}

impl Kernel {
    pub fn new(file: KernelFile, entry: &'static str) -> Self {
        Kernel {
            file,
            entry,
            constants: Vec::new(),
        }
    }

    pub fn with(mut self, name: &'static str, value: f64) -> Self {
        self.constants.push((name, value));
        self
    }

    /// "file:entry[NAME=value,...]", how errors and timings name the kernel.
    pub fn label(&self) -> String {
        let mut s = format!("{}:{}", self.file.name(), self.entry);
        if !self.constants.is_empty() {
            let c: Vec<String> = self
                .constants
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            s.push_str(&format!("[{}]", c.join(",")));
        }
        s
    }

    fn key(&self, bindings: &[(u32, Access)]) -> PipelineKey {
        let mut constants: Vec<(&'static str, u64)> = self
            .constants
            .iter()
            .map(|&(k, v)| (k, v.to_bits()))
            .collect();
        constants.sort_unstable();
        PipelineKey {
            file: self.file,
            entry: self.entry,
            constants,
            bindings: bindings.to_vec(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PipelineKey {
    file: KernelFile,
    entry: &'static str,
    constants: Vec<(&'static str, u64)>,
    bindings: Vec<(u32, Access)>,
}

pub struct Pipeline {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
}

/// Shader modules and pipelines, each created once.
#[derive(Default)]
pub struct Registry {
    modules: Mutex<HashMap<KernelFile, Arc<wgpu::ShaderModule>>>,
    pipelines: Mutex<HashMap<PipelineKey, Arc<Pipeline>>>,
}

impl Registry {
    /// The pipeline for `kernel` with an explicit layout of `bindings` (group 0), compiled on first use.
    /// Creation runs inside a validation error scope; a failure names the kernel.
    pub fn pipeline(
        &self,
        device: &wgpu::Device,
        kernel: &Kernel,
        bindings: &[(u32, Access)],
    ) -> Result<Arc<Pipeline>, String> {
        let key = kernel.key(bindings);
        if let Some(p) = self.pipelines.lock().unwrap().get(&key) {
            return Ok(p.clone());
        }
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self.module(device, kernel.file);
        let entries: Vec<wgpu::BindGroupLayoutEntry> = bindings
            .iter()
            .map(|&(binding, access)| wgpu::BindGroupLayoutEntry {
                binding,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: match access {
                        Access::Uniform => wgpu::BufferBindingType::Uniform,
                        Access::Read => wgpu::BufferBindingType::Storage { read_only: true },
                        Access::ReadWrite => wgpu::BufferBindingType::Storage { read_only: false },
                    },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            })
            .collect();
        let label = kernel.label();
        let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(&label),
            entries: &entries,
        });
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(&label),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&label),
            layout: Some(&pipeline_layout),
            module: &module,
            entry_point: Some(kernel.entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &kernel.constants,
                zero_initialize_workgroup_memory: true,
            },
            cache: None,
        });
        if let Some(err) = pollster::block_on(scope.pop()) {
            return Err(format!("creating the pipeline of {label}: {err}"));
        }
        let p = Arc::new(Pipeline { pipeline, layout });
        self.pipelines.lock().unwrap().insert(key, p.clone());
        Ok(p)
    }

    fn module(&self, device: &wgpu::Device, file: KernelFile) -> Arc<wgpu::ShaderModule> {
        self.modules
            .lock()
            .unwrap()
            .entry(file)
            .or_insert_with(|| {
                let desc = wgpu::ShaderModuleDescriptor {
                    label: Some(file.name()),
                    source: wgpu::ShaderSource::Wgsl(file.source().into()),
                };
                // Bounds checks stay; the loop-bounding counter wgpu adds to every loop by
                // default goes. That counter hides a loop's trip count from the driver's
                // compiler, which then cannot unroll it, and the register-blocked kernels
                // (conv.wgsl) depend on unrolled loops to keep their accumulators in registers
                // (measured on lavapipe: several times slower with it).
                let checks = wgpu::ShaderRuntimeChecks {
                    force_loop_bounding: false,
                    ..wgpu::ShaderRuntimeChecks::checked()
                };
                // SAFETY: every loop in kernels/*.wgsl runs a bounded number of iterations
                // (counted loops over sizes from the uniform or override constants), so
                // none can be infinite, which is what the dropped check protects against.
                Arc::new(unsafe { device.create_shader_module_trusted(desc, checks) })
            })
            .clone()
    }

    pub fn pipelines_compiled(&self) -> usize {
        self.pipelines.lock().unwrap().len()
    }
}
