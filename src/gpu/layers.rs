//! Pooling, up-sampling (kernels/pool.wgsl) and channel windows (kernels/channels.wgsl) on the GPU.

use super::backend::{Gpu, GpuTensor};
use super::kernels::{Kernel, KernelFile};
use super::split::{with_samples, Join};
use metaseg_autograd::layers::{
    affine_entries, affine_relu_entries, dims5, dots_dims, statistic_channels, upsample_shape,
};
use metaseg_autograd::{
    Backend, BatchStatistic, Error, FusedBatchNorm, LayerBackend, Result, Shape, Statistic,
    TensorShape, Upsample, Window3d,
};

/// Invocations per workgroup (the `WG` override default of both files).
pub(super) const WG: usize = 256;

/// The uniform of pool.wgsl: src is the forward op's input, dst its output.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(super) struct PoolParams {
    pub(super) n: u32,
    pub(super) volumes: u32,
    pub(super) src_d: u32,
    pub(super) src_h: u32,
    pub(super) src_w: u32,
    pub(super) dst_d: u32,
    pub(super) dst_h: u32,
    pub(super) dst_w: u32,
    pub(super) k_d: u32,
    pub(super) k_h: u32,
    pub(super) k_w: u32,
    pub(super) s_d: u32,
    pub(super) s_h: u32,
    pub(super) s_w: u32,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(super) struct AffineParams {
    pub(super) n: u32,
    pub(super) volume: u32,
    pub(super) groups: u32,
    pub(super) chunk: u32,
}

/// Invocations per workgroup of batch_statistic (one per channel).
pub(super) const STATISTIC_WG: usize = 64;

/// The code of a statistic in channel_affine.wgsl (its STATISTIC_ constants).
pub(super) fn statistic_code(s: Statistic) -> u32 {
    match s {
        Statistic::Mean => 0,
        Statistic::Variance => 1,
        Statistic::Scale => 2,
        Statistic::Shift => 3,
    }
}

/// Invocations per workgroup of channel_dots: few, so its tree in workgroup memory is short.
const DOTS_WG: usize = 64;
/// Vec4s each channel_dots workgroup sums: a piece of a channel row large enough that the
/// partial sums are a small fraction of the traffic.
const DOTS_VEC4S: usize = 16 * DOTS_WG;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(super) struct ChannelParams {
    pub(super) n: u32,
    pub(super) volume: u32,
    pub(super) channels_in: u32,
    pub(super) channels_out: u32,
    pub(super) start: i32,
}

fn spatial(s: &Shape) -> [u32; 3] {
    [s.dims()[2] as u32, s.dims()[3] as u32, s.dims()[4] as u32]
}

fn check_shape(op: &'static str, expected: &Shape, got: &Shape) -> Result<()> {
    if expected != got {
        return Err(Error::Shape {
            op,
            lhs: expected.clone(),
            rhs: got.clone(),
            reason: "the shapes must be equal".into(),
        });
    }
    Ok(())
}

impl Gpu {
    /// Runs entry `entry` of pool.wgsl with `invocations` invocations, writing a tensor of shape
    /// `out` (src- or dst-shaped).
    #[allow(clippy::too_many_arguments)]
    fn pool_launch(
        &self,
        entry: &'static str,
        (src, dst): (&Shape, &Shape),
        kernel: [usize; 3],
        stride: [usize; 3],
        inputs: &[(u32, &GpuTensor)],
        out: &Shape,
        invocations: usize,
    ) -> Result<GpuTensor> {
        // Every operand and the result are [N, C, ...] with independent samples.
        let batched: Vec<&GpuTensor> = inputs.iter().map(|&(_, t)| t).collect();
        let total = src.dims()[0];
        let split = self.by_samples(entry, &batched, (out, Join::Samples), |parts, n| {
            let with = |s: &Shape| with_samples(s, n);
            let inputs: Vec<(u32, &GpuTensor)> = inputs
                .iter()
                .zip(parts)
                .map(|(&(b, _), p)| (b, p))
                .collect();
            let (src, dst, out) = (with(src), with(dst), with(out));
            let invocations = invocations / total * n;
            let shapes = (&src, &dst);
            self.pool_launch(entry, shapes, kernel, stride, &inputs, &out, invocations)
        })?;
        if let Some(y) = split {
            return Ok(y);
        }
        let [src_d, src_h, src_w] = spatial(src);
        let [dst_d, dst_h, dst_w] = spatial(dst);
        let [k_d, k_h, k_w] = kernel.map(|k| k as u32);
        let [s_d, s_h, s_w] = stride.map(|s| s as u32);
        let params = PoolParams {
            n: invocations as u32,
            volumes: (src.dims()[0] * src.dims()[1]) as u32,
            src_d,
            src_h,
            src_w,
            dst_d,
            dst_h,
            dst_w,
            k_d,
            k_h,
            k_w,
            s_d,
            s_h,
            s_w,
        };
        let result = self.empty(out)?;
        let grid = self.grid(invocations.div_ceil(WG));
        let kernel = Kernel::new(KernelFile::Pool, entry);
        self.launch(&kernel, bytemuck::bytes_of(&params), inputs, &result, grid)?;
        Ok(result)
    }
}

/// Whether the windows tile `src` exactly (kernel = stride, src = dst stride on every axis): then
/// the backward can write each window's elements from one invocation per window.
fn tiles(w: Window3d, src: &Shape, dst: &Shape) -> bool {
    let (src, dst) = (spatial(src), spatial(dst));
    (0..3).all(|a| w.kernel[a] == w.stride[a] && src[a] == dst[a] * w.stride[a] as u32)
}

impl LayerBackend for Gpu {
    fn max_pool3d(&self, x: &GpuTensor, w: Window3d) -> Result<GpuTensor> {
        let dst = w.output_shape("max_pool3d", x.shape())?;
        let shapes = (x.shape(), &dst);
        let n = dst.numel();
        self.pool_launch("max_pool3d", shapes, w.kernel, w.stride, &[(1, x)], &dst, n)
    }

    fn max_pool3d_gather(&self, x: &GpuTensor, v: &GpuTensor, w: Window3d) -> Result<GpuTensor> {
        let dst = w.output_shape("max_pool3d", x.shape())?;
        check_shape("max_pool3d_gather", x.shape(), v.shape())?;
        let (shapes, inputs) = ((x.shape(), &dst), [(1, x), (2, v)]);
        let n = dst.numel();
        self.pool_launch(
            "max_pool3d_gather",
            shapes,
            w.kernel,
            w.stride,
            &inputs,
            &dst,
            n,
        )
    }

    fn max_pool3d_scatter(&self, x: &GpuTensor, g: &GpuTensor, w: Window3d) -> Result<GpuTensor> {
        let dst = w.output_shape("max_pool3d_scatter", x.shape())?;
        check_shape("max_pool3d_scatter", &dst, g.shape())?;
        let (src, inputs) = (x.shape(), [(1, x), (2, g)]);
        let (entry, n) = if tiles(w, src, &dst) {
            ("max_pool3d_scatter_tiled", dst.numel())
        } else {
            ("max_pool3d_scatter", src.numel())
        };
        self.pool_launch(entry, (src, &dst), w.kernel, w.stride, &inputs, src, n)
    }

    fn avg_pool3d(&self, x: &GpuTensor, w: Window3d) -> Result<GpuTensor> {
        let dst = w.output_shape("avg_pool3d", x.shape())?;
        let shapes = (x.shape(), &dst);
        let n = dst.numel();
        self.pool_launch("avg_pool3d", shapes, w.kernel, w.stride, &[(1, x)], &dst, n)
    }

    fn avg_pool3d_backward(&self, g: &GpuTensor, w: Window3d, input: &Shape) -> Result<GpuTensor> {
        let dst = w.output_shape("avg_pool3d_backward", input)?;
        check_shape("avg_pool3d_backward", &dst, g.shape())?;
        let (entry, n) = if tiles(w, input, &dst) {
            ("avg_pool3d_backward_tiled", dst.numel())
        } else {
            ("avg_pool3d_backward", input.numel())
        };
        let shapes = (input, &dst);
        self.pool_launch(entry, shapes, w.kernel, w.stride, &[(1, g)], input, n)
    }

    fn upsample3d(&self, x: &GpuTensor, mode: Upsample, scale: [usize; 3]) -> Result<GpuTensor> {
        let dst = upsample_shape(mode.name(), x.shape(), scale)?;
        // Nearest runs one invocation per source element (it writes a block), trilinear one per
        // output element.
        let (entry, n) = match mode {
            Upsample::Nearest => ("upsample_nearest", x.shape().numel()),
            Upsample::Trilinear => ("upsample_trilinear", dst.numel()),
        };
        let shapes = (x.shape(), &dst);
        self.pool_launch(entry, shapes, [1; 3], scale, &[(1, x)], &dst, n)
    }

    fn upsample3d_backward(
        &self,
        g: &GpuTensor,
        mode: Upsample,
        scale: [usize; 3],
        input: &Shape,
    ) -> Result<GpuTensor> {
        let dst = upsample_shape(mode.name(), input, scale)?;
        check_shape("upsample3d_backward", &dst, g.shape())?;
        let entry = match mode {
            Upsample::Nearest => "upsample_nearest_backward",
            Upsample::Trilinear => "upsample_trilinear_backward",
        };
        let (shapes, n) = ((input, &dst), input.numel());
        self.pool_launch(entry, shapes, [1; 3], scale, &[(1, g)], input, n)
    }

    fn channel_window(&self, x: &GpuTensor, start: isize, channels: usize) -> Result<GpuTensor> {
        let [n, c, d, h, w] = dims5("channel_window", x.shape())?;
        let out_shape = Shape::from([n, channels, d, h, w]);
        let split = self.by_samples(
            "channel_window",
            &[x],
            (&out_shape, Join::Samples),
            |x, _| self.channel_window(&x[0], start, channels),
        )?;
        if let Some(y) = split {
            return Ok(y);
        }
        let params = ChannelParams {
            n: out_shape.numel() as u32,
            volume: (d * h * w) as u32,
            channels_in: c as u32,
            channels_out: channels as u32,
            start: start as i32,
        };
        let out = self.empty(&out_shape)?;
        let grid = self.grid(out_shape.numel().div_ceil(WG));
        let kernel = Kernel::new(KernelFile::Channels, "channel_window");
        self.launch(&kernel, bytemuck::bytes_of(&params), &[(1, x)], &out, grid)?;
        Ok(out)
    }

    fn channel_affine(&self, x: &GpuTensor, a: &GpuTensor, b: &GpuTensor) -> Result<GpuTensor> {
        let entries = affine_entries(x.shape(), a.shape(), b.shape())?;
        self.affine_launch(x, a, b, entries, false)
    }

    fn channel_affine_relu(
        &self,
        x: &GpuTensor,
        a: &GpuTensor,
        b: &GpuTensor,
    ) -> Result<GpuTensor> {
        let entries = affine_relu_entries(x.shape(), a.shape(), b.shape())?;
        self.affine_launch(x, a, b, entries, true)
    }

    fn channel_dots(&self, x: &GpuTensor, m: &GpuTensor) -> Result<GpuTensor> {
        self.channel_dots_masked(x, m, None)
    }

    fn batch_statistic(
        &self,
        moments: &GpuTensor,
        gamma: &GpuTensor,
        beta: &GpuTensor,
        s: BatchStatistic,
    ) -> Result<GpuTensor> {
        let kernel = Kernel::new(KernelFile::ChannelAffine, "batch_statistic");
        self.statistic_launch(kernel, [moments, gamma, beta], s, false)
    }

    fn batch_statistic_backward(
        &self,
        moments: &GpuTensor,
        gamma: &GpuTensor,
        g: &GpuTensor,
        s: BatchStatistic,
        wrt_moments: bool,
    ) -> Result<GpuTensor> {
        let kernel = Kernel::new(KernelFile::ChannelAffine, "batch_statistic_backward")
            .with("WRT_MOMENTS", f64::from(u8::from(wrt_moments)));
        self.statistic_launch(kernel, [moments, gamma, g], s, wrt_moments)
    }

    fn batch_norm_statistics(
        &self,
        moments: &GpuTensor,
        gamma: &GpuTensor,
        beta: &GpuTensor,
        p: FusedBatchNorm,
    ) -> Result<[GpuTensor; 4]> {
        let kernel = Kernel::new(KernelFile::ChannelAffine, "batch_norm_statistics");
        let rows = self.channel_rows(kernel, [moments, gamma, beta], p, 4)?;
        let c = gamma.shape().numel();
        Ok([0, 1, 2, 3].map(|r| self.row(&rows, r, c)))
    }

    fn batch_norm_backward(
        &self,
        [x, y, g]: [&GpuTensor; 3],
        moments: &GpuTensor,
        gamma: &GpuTensor,
        p: FusedBatchNorm,
    ) -> Result<[GpuTensor; 3]> {
        let [_, c, volume] = dots_dims(x.shape(), g.shape())?;
        dots_dims(x.shape(), y.shape())?;
        statistic_channels(moments.shape(), gamma.shape(), gamma.shape())?;
        // With the ReLU, g' = g [y > 0] is formed where it is read (channel_dots, batch_norm_dx).
        let relu_out = p.relu.then_some(y);
        let dots = self.channel_dots_masked(x, g, relu_out)?;
        let kernel = Kernel::new(KernelFile::ChannelAffine, "batch_norm_coefficients");
        let rows = self.channel_rows(kernel, [moments, gamma, &dots], p, 5)?;
        let stride = self.row_stride(c);
        let dx = self.batch_norm_dx([x, g], relu_out, &rows, (c, volume, stride))?;
        Ok([dx, self.row(&rows, 0, c), self.row(&rows, 1, c)])
    }
}

impl Gpu {
    /// Elements between the rows of [`Gpu::channel_rows`]: C rounded up so that each row starts
    /// where a binding may.
    fn row_stride(&self, c: usize) -> usize {
        c.next_multiple_of(self.context().binding_alignment() as usize / 4)
    }

    /// A per-channel kernel of a batch norm (one invocation per channel) on (moments, gamma,
    /// third) writing `count` rows of C, [`Gpu::row_stride`] apart (see [`Gpu::row`]).
    fn channel_rows(
        &self,
        kernel: Kernel,
        [moments, gamma, third]: [&GpuTensor; 3],
        p: FusedBatchNorm,
        count: usize,
    ) -> Result<GpuTensor> {
        let c = statistic_channels(moments.shape(), gamma.shape(), gamma.shape())?;
        if c == 0 || p.count == 0 {
            return Err(Error::InvalidArgument {
                op: "batch_norm3d",
                message: format!("{c} channels of {} elements each", p.count),
            });
        }
        let stride = self.row_stride(c);
        let out = self.empty(&Shape::from([count * stride]))?;
        let params = AffineParams {
            n: stride as u32,
            volume: ((1.0 / p.count as f64) as f32).to_bits(),
            groups: c as u32,
            chunk: (p.eps as f32).to_bits(),
        };
        let inputs = [(2, moments), (4, gamma), (6, third)];
        let grid = [c.div_ceil(STATISTIC_WG) as u32, 1, 1];
        self.launch(&kernel, bytemuck::bytes_of(&params), &inputs, &out, grid)?;
        Ok(out)
    }

    /// channel_dots(x, m), or with `relu_out` (a ReLU's output y) channel_dots(x, m [y > 0]),
    /// the mask applied as m is loaded (bit for bit the masked tensor's sums, without writing
    /// it): one launch and the partial sums' reduction.
    fn channel_dots_masked(
        &self,
        x: &GpuTensor,
        m: &GpuTensor,
        relu_out: Option<&GpuTensor>,
    ) -> Result<GpuTensor> {
        let [n, c, volume] = dots_dims(x.shape(), m.shape())?;
        if let Some(y) = relu_out {
            dots_dims(x.shape(), y.shape())?;
        }
        if n * c * volume == 0 {
            return self.fill(&Shape::from([2, c]), 0.0);
        }
        // Sums over the samples: the ranges' sums add up.
        let result = (&Shape::from([2, c]), Join::Sum);
        let operands: Vec<&GpuTensor> = [x, m].into_iter().chain(relu_out).collect();
        let split = self.by_samples("channel_dots", &operands, result, |p, _| {
            self.channel_dots_masked(&p[0], &p[1], p.get(2))
        })?;
        if let Some(sums) = split {
            return Ok(sums);
        }
        let chunk = (4 * DOTS_VEC4S).min(volume.next_multiple_of(4));
        let pieces = n * volume.div_ceil(chunk);
        let params = AffineParams {
            n: (n * c * volume) as u32,
            volume: volume as u32,
            groups: c as u32,
            chunk: chunk as u32,
        };
        let flag = |b: bool| f64::from(u8::from(b));
        let kernel = Kernel::new(KernelFile::ChannelAffine, "channel_dots")
            .with("WG", DOTS_WG as f64)
            .with("ALIGNED", flag(volume.is_multiple_of(4)))
            .with(
                "SAME",
                flag(x.buffer() == m.buffer() && x.offset() == m.offset()),
            )
            .with("MASKED", flag(relu_out.is_some()));
        let partial = self.empty(&Shape::from([2, pieces, c]))?;
        let grid = [pieces as u32, c as u32, 1];
        // Binding 7 is in the layout either way; without MASKED it is never read.
        let inputs = [(1, x), (5, m), (7, relu_out.unwrap_or(m))];
        self.launch(
            &kernel,
            bytemuck::bytes_of(&params),
            &inputs,
            &partial,
            grid,
        )?;
        let summed = self.sum_axes(&partial, &[1])?;
        self.reshape(&summed, &Shape::from([2, c]))
    }

    /// Row `r` of C channels of [`Gpu::channel_rows`]' result, in place.
    fn row(&self, rows: &GpuTensor, r: usize, c: usize) -> GpuTensor {
        rows.view(r * self.row_stride(c), Shape::from([c]))
    }

    /// d x = g' a + x p + q per channel, the rows a, p, q at 2, 3 and 4 `stride` of `rows`, with
    /// g' = g, or g [y > 0] for a ReLU's output y (`relu_out`); by ranges of samples when x
    /// exceeds one binding.
    fn batch_norm_dx(
        &self,
        [x, g]: [&GpuTensor; 2],
        relu_out: Option<&GpuTensor>,
        rows: &GpuTensor,
        (c, volume, stride): (usize, usize, usize),
    ) -> Result<GpuTensor> {
        let operands: Vec<&GpuTensor> = [x, g].into_iter().chain(relu_out).collect();
        let split = self.by_samples(
            "batch_norm_dx",
            &operands,
            (x.shape(), Join::Samples),
            |p, _| self.batch_norm_dx([&p[0], &p[1]], p.get(2), rows, (c, volume, stride)),
        )?;
        if let Some(dx) = split {
            return Ok(dx);
        }
        let n = x.shape().numel();
        let params = AffineParams {
            n: n as u32,
            volume: volume as u32,
            groups: c as u32,
            chunk: stride as u32,
        };
        let flag = |b: bool| f64::from(u8::from(b));
        let kernel = Kernel::new(KernelFile::ChannelAffine, "batch_norm_dx")
            .with("ALIGNED", flag(volume.is_multiple_of(4)))
            .with("MASKED", flag(relu_out.is_some()));
        let out = self.empty(x.shape())?;
        let grid = self.grid(n.div_ceil(4).div_ceil(WG));
        let inputs = [(1, x), (5, g), (2, rows), (7, relu_out.unwrap_or(g))];
        self.launch(&kernel, bytemuck::bytes_of(&params), &inputs, &out, grid)?;
        Ok(out)
    }

    /// A batch_statistic kernel of channel_affine.wgsl on (moments, gamma, third), one
    /// invocation per channel; out [2, C] with `two_rows`, else [C].
    fn statistic_launch(
        &self,
        kernel: Kernel,
        [moments, gamma, third]: [&GpuTensor; 3],
        s: BatchStatistic,
        two_rows: bool,
    ) -> Result<GpuTensor> {
        let c = statistic_channels(moments.shape(), gamma.shape(), third.shape())?;
        let out_shape = if two_rows {
            Shape::from([2, c])
        } else {
            Shape::from([c])
        };
        if c == 0 || s.count == 0 {
            return Err(Error::InvalidArgument {
                op: "batch_statistic",
                message: format!("{c} channels of {} elements each", s.count),
            });
        }
        let params = AffineParams {
            n: 0,
            volume: ((1.0 / s.count as f64) as f32).to_bits(),
            groups: c as u32,
            chunk: (s.eps as f32).to_bits(),
        };
        let kernel = kernel.with("STATISTIC", f64::from(statistic_code(s.statistic)));
        let out = self.empty(&out_shape)?;
        let inputs = [(2, moments), (4, gamma), (6, third)];
        let grid = [c.div_ceil(STATISTIC_WG) as u32, 1, 1];
        self.launch(&kernel, bytemuck::bytes_of(&params), &inputs, &out, grid)?;
        Ok(out)
    }

    /// x a + b per (sample and) channel, and the ReLU with `relu`.
    fn affine_launch(
        &self,
        x: &GpuTensor,
        a: &GpuTensor,
        b: &GpuTensor,
        entries: usize,
        relu: bool,
    ) -> Result<GpuTensor> {
        // a and b are per channel, or per sample and channel (then split with x).
        let per_sample = entries > a.shape().dims()[1];
        let batched: &[&GpuTensor] = if per_sample { &[x, a, b] } else { &[x] };
        let split = self.by_samples(
            "channel_affine",
            batched,
            (x.shape(), Join::Samples),
            |p, _| {
                let (a, b) = if per_sample { (&p[1], &p[2]) } else { (a, b) };
                self.affine_launch(&p[0], a, b, a.shape().numel(), relu)
            },
        )?;
        if let Some(y) = split {
            return Ok(y);
        }
        let n = x.shape().numel();
        let volume = n / (x.shape().dims()[0] * x.shape().dims()[1]).max(1);
        let params = AffineParams {
            n: n as u32,
            volume: volume as u32,
            groups: entries as u32,
            chunk: 0,
        };
        let out = self.empty(x.shape())?;
        let grid = self.grid(n.div_ceil(4).div_ceil(WG));
        let flag = |b: bool| f64::from(u8::from(b));
        let kernel = Kernel::new(KernelFile::ChannelAffine, "channel_affine")
            .with("ALIGNED", flag(volume.is_multiple_of(4)))
            .with("RELU", flag(relu));
        let inputs = [(1, x), (2, a), (4, b)];
        self.launch(&kernel, bytemuck::bytes_of(&params), &inputs, &out, grid)?;
        Ok(out)
    }
}
