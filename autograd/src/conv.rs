//! 3D convolution: its geometry (checked shapes), the Cpu64 reference, and the three differentiable
//! primitives conv3d, conv3d_grad_input and conv3d_grad_weight, each of whose backward rule is
//! written with the other two, so gradients of gradients work. conv_transpose3d is
//! conv3d_grad_input with the weight read as the transposed convolution's.
//!
//! Layouts as PyTorch: x [N, C, D, H, W], w [K, C, kd, kh, kw], bias [K], y [N, K, Do, Ho, Wo] with
//! y[n, k, o] = bias[k] + sum_{c, t} w[k, c, t] x[n, c, o * stride - padding + t * dilation]
//! per spatial axis, where reads outside the input are zeros.

use crate::backend::Backend;
use crate::cpu64::{collected, filled};
use crate::ops::{rule, tangent};
use crate::var::{sum_tangents, Var};
use crate::{Cpu64, CpuTensor, Error, Result, Shape};
use std::sync::Arc;

/// Stride, zero padding and dilation of a 3D convolution, per axis (depth, height, width).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvSpec {
    pub stride: [usize; 3],
    pub padding: [usize; 3],
    pub dilation: [usize; 3],
}

impl Default for ConvSpec {
    /// PyTorch's defaults: stride 1, no padding, no dilation.
    fn default() -> Self {
        ConvSpec {
            stride: [1; 3],
            padding: [0; 3],
            dilation: [1; 3],
        }
    }
}

impl ConvSpec {
    pub fn new(stride: [usize; 3], padding: [usize; 3]) -> Self {
        ConvSpec {
            stride,
            padding,
            dilation: [1; 3],
        }
    }
}

/// The sizes of one convolution, checked: x [batch, c_in, input], w [c_out, c_in, kernel] and
/// y [batch, c_out, output], with `output` what `spec` makes of `input` and `kernel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conv3dGeometry {
    pub batch: usize,
    pub c_in: usize,
    pub c_out: usize,
    pub input: [usize; 3],
    pub kernel: [usize; 3],
    pub output: [usize; 3],
    pub spec: ConvSpec,
}

/// The message for a setting whose size arithmetic overflows.
fn too_large(axis: usize, setting: &str, value: usize) -> String {
    format!("axis {axis}: {setting} {value} is too large")
}

/// How a geometry reads in a message: the three shapes and the settings.
impl std::fmt::Display for Conv3dGeometry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ConvSpec {
            stride,
            padding,
            dilation,
        } = self.spec;
        write!(
            f,
            "the convolution of x {} by weight {} into {} (stride {stride:?}, padding {padding:?}, \
             dilation {dilation:?})",
            self.input_shape(),
            self.weight_shape(),
            self.output_shape()
        )
    }
}

fn dims5(s: &Shape) -> Option<[usize; 5]> {
    s.dims().try_into().ok()
}

fn spatial(d: [usize; 5]) -> [usize; 3] {
    [d[2], d[3], d[4]]
}

impl Conv3dGeometry {
    /// The geometry of `conv3d(x, w)`.
    pub fn new(x: &Shape, w: &Shape, spec: ConvSpec) -> Result<Self> {
        Self::build("conv3d", x, w, spec, |xd, wd| {
            if xd[1] != wd[1] {
                return Err(format!(
                    "x has {} channels but the weight expects {}",
                    xd[1], wd[1]
                ));
            }
            let (input, kernel) = (spatial(xd), spatial(wd));
            let mut output = [0; 3];
            for a in 0..3 {
                let span = spec.dilation[a]
                    .checked_mul(kernel[a] - 1)
                    .and_then(|s| s.checked_add(1))
                    .ok_or_else(|| too_large(a, "dilation", spec.dilation[a]))?;
                let padded = (spec.padding[a].checked_mul(2))
                    .and_then(|p| p.checked_add(input[a]))
                    .ok_or_else(|| too_large(a, "padding", spec.padding[a]))?;
                if padded < span {
                    return Err(format!(
                        "axis {a}: the kernel spans {span} but the padded input only {padded}"
                    ));
                }
                output[a] = (padded - span) / spec.stride[a] + 1;
            }
            Ok(Conv3dGeometry {
                batch: xd[0],
                c_in: xd[1],
                c_out: wd[0],
                input,
                kernel,
                output,
                spec,
            })
        })
    }

    /// The geometry of the convolution whose grad-input `conv_transpose3d(x, w)` is: x [N, C_in, ...]
    /// is that convolution's output and w [C_in, C_out, ...] its weight, so its input, the result,
    /// has C_out channels and per axis the size
    /// (in - 1) stride - 2 padding + dilation (k - 1) + output_padding + 1.
    /// `output_padding` (below the stride) picks among the sizes a strided convolution maps to
    /// the same output.
    pub fn transposed(
        x: &Shape,
        w: &Shape,
        spec: ConvSpec,
        output_padding: [usize; 3],
    ) -> Result<Self> {
        Self::build("conv_transpose3d", x, w, spec, |xd, wd| {
            if xd[1] != wd[0] {
                return Err(format!(
                    "x has {} channels but the weight expects {}",
                    xd[1], wd[0]
                ));
            }
            let (output, kernel) = (spatial(xd), spatial(wd));
            let mut input = [0; 3];
            for a in 0..3 {
                if output_padding[a] >= spec.stride[a] {
                    return Err(format!(
                        "axis {a}: output_padding {} must be below the stride {}",
                        output_padding[a], spec.stride[a]
                    ));
                }
                let full = ((output[a] - 1).checked_mul(spec.stride[a]))
                    .and_then(|n| n.checked_add(spec.dilation[a].checked_mul(kernel[a] - 1)?))
                    .and_then(|n| n.checked_add(output_padding[a] + 1))
                    .ok_or_else(|| too_large(a, "stride or dilation", spec.stride[a]))?;
                let padding = (spec.padding[a].checked_mul(2))
                    .ok_or_else(|| too_large(a, "padding", spec.padding[a]))?;
                if full <= padding {
                    return Err(format!(
                        "axis {a}: padding {} leaves no output",
                        spec.padding[a]
                    ));
                }
                input[a] = full - padding;
            }
            Ok(Conv3dGeometry {
                batch: xd[0],
                c_in: wd[1],
                c_out: wd[0],
                input,
                kernel,
                output,
                spec,
            })
        })
    }

    fn build(
        op: &'static str,
        x: &Shape,
        w: &Shape,
        spec: ConvSpec,
        f: impl FnOnce([usize; 5], [usize; 5]) -> std::result::Result<Self, String>,
    ) -> Result<Self> {
        let err = |reason: String| Error::Shape {
            op,
            lhs: x.clone(),
            rhs: w.clone(),
            reason,
        };
        let (Some(xd), Some(wd)) = (dims5(x), dims5(w)) else {
            return Err(err(
                "x and the weight must have rank 5 ([N, C, D, H, W] and [K, C, kd, kh, kw])".into(),
            ));
        };
        if x.numel() == 0 || w.numel() == 0 {
            return Err(err("empty tensors have no convolution".into()));
        }
        if spec.stride.contains(&0) || spec.dilation.contains(&0) {
            return Err(err(format!(
                "stride {:?} and dilation {:?} must be at least 1",
                spec.stride, spec.dilation
            )));
        }
        let geometry = f(xd, wd).map_err(err)?;
        // Both activations' sizes must be addressable (the result is the output of conv3d and the
        // input of conv_transpose3d); the forward allocates one, the backward the other.
        for shape in [geometry.input_shape(), geometry.output_shape()] {
            Shape::checked(op, shape.dims())?;
        }
        Ok(geometry)
    }

    pub fn input_shape(&self) -> Shape {
        let [d, h, w] = self.input;
        Shape::from([self.batch, self.c_in, d, h, w])
    }

    pub fn weight_shape(&self) -> Shape {
        let [d, h, w] = self.kernel;
        Shape::from([self.c_out, self.c_in, d, h, w])
    }

    pub fn output_shape(&self) -> Shape {
        let [d, h, w] = self.output;
        Shape::from([self.batch, self.c_out, d, h, w])
    }

    /// Multiply-adds of the forward pass (as many as each of the two backward passes) counting
    /// the taps that fall on the zero padding: 2 x this is the conventional FLOP count.
    pub fn multiply_adds(&self) -> u64 {
        let taps: usize = self.kernel.iter().product();
        let outputs: usize = self.output.iter().product();
        (self.batch * self.c_out * self.c_in * taps * outputs) as u64
    }

    /// Errors unless each operand has the shape this geometry gives it.
    pub fn check(&self, op: &'static str, operands: &[(&str, &Shape, Shape)]) -> Result<()> {
        for (name, actual, expected) in operands {
            if *actual != expected {
                return Err(Error::Shape {
                    op,
                    lhs: (*actual).clone(),
                    rhs: expected.clone(),
                    reason: format!("{name} must have the second shape for {self}"),
                });
            }
        }
        Ok(())
    }

    /// Calls `f(x_index, w_index, y_index)` for every tap that reads inside the input: the one
    /// loop nest that defines the convolution, its grad-input and its grad-weight alike.
    pub fn for_each_tap(&self, mut f: impl FnMut(usize, usize, usize)) {
        let [id, ih, iw] = self.input;
        let [kd, kh, kw] = self.kernel;
        let [od, oh, ow] = self.output;
        let ConvSpec {
            stride: s,
            padding: p,
            dilation: dl,
        } = self.spec;
        // The input position an output position reads through tap t, if inside the input.
        let at = |a: usize, o: usize, t: usize, size: usize| {
            (o * s[a] + t * dl[a])
                .checked_sub(p[a])
                .filter(|&i| i < size)
        };
        for n in 0..self.batch {
            for k in 0..self.c_out {
                for c in 0..self.c_in {
                    let x_base = (n * self.c_in + c) * id;
                    let w_base = (k * self.c_in + c) * kd;
                    let y_base = (n * self.c_out + k) * od;
                    for td in 0..kd {
                        for th in 0..kh {
                            for tw in 0..kw {
                                let w_index = ((w_base + td) * kh + th) * kw + tw;
                                for d in 0..od {
                                    let Some(xd) = at(0, d, td, id) else { continue };
                                    for h in 0..oh {
                                        let Some(xh) = at(1, h, th, ih) else { continue };
                                        let x_row = ((x_base + xd) * ih + xh) * iw;
                                        let y_row = ((y_base + d) * oh + h) * ow;
                                        for w in 0..ow {
                                            if let Some(xw) = at(2, w, tw, iw) {
                                                f(x_row + xw, w_index, y_row + w);
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The primitives of this family. `Cpu64` implements them as the loop nest of
/// [`Conv3dGeometry::for_each_tap`] (the reference).
pub trait ConvBackend: Backend {
    /// y = conv3d(x, w) + bias per output channel.
    fn conv3d(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        geometry: &Conv3dGeometry,
    ) -> Result<Self::Tensor>;
    /// dx of conv3d for dy (the adjoint of x -> conv3d(x, w)), + bias per input channel (the
    /// bias of conv_transpose3d).
    fn conv3d_grad_input(
        &self,
        dy: &Self::Tensor,
        w: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        geometry: &Conv3dGeometry,
    ) -> Result<Self::Tensor>;
    /// dw of conv3d for x and dy (the adjoint of w -> conv3d(x, w)).
    fn conv3d_grad_weight(
        &self,
        x: &Self::Tensor,
        dy: &Self::Tensor,
        geometry: &Conv3dGeometry,
    ) -> Result<Self::Tensor>;
}

/// Checks the operands of one primitive: the two tensors and the optional per-channel bias.
pub fn check_operands(
    op: &'static str,
    geometry: &Conv3dGeometry,
    a: (&str, &Shape, Shape),
    b: (&str, &Shape, Shape),
    bias: Option<(&Shape, usize)>,
) -> Result<()> {
    let mut operands = vec![a, b];
    if let Some((shape, channels)) = bias {
        operands.push(("the bias", shape, Shape::from([channels])));
    }
    geometry.check(op, &operands)
}

/// `values` per channel of `shape` [N, C, ...]: the starting value of an output with a bias.
fn per_channel(op: &'static str, shape: &Shape, values: Option<&CpuTensor>) -> Result<Vec<f64>> {
    let Some(b) = values else {
        return filled(op, shape.numel(), 0.0);
    };
    let (channels, inner) = (
        shape.dims()[1],
        shape.numel() / shape.dims()[0] / shape.dims()[1],
    );
    let values = (0..shape.numel()).map(|i| b.data[(i / inner) % channels]);
    collected(op, shape.numel(), values)
}

fn cpu(data: Vec<f64>, shape: Shape) -> CpuTensor {
    CpuTensor {
        data: Arc::new(data),
        shape,
    }
}

impl ConvBackend for Cpu64 {
    fn conv3d(
        &self,
        x: &CpuTensor,
        w: &CpuTensor,
        bias: Option<&CpuTensor>,
        g: &Conv3dGeometry,
    ) -> Result<CpuTensor> {
        check_operands(
            "conv3d",
            g,
            ("x", &x.shape, g.input_shape()),
            ("w", &w.shape, g.weight_shape()),
            bias.map(|b| (&b.shape, g.c_out)),
        )?;
        let mut y = per_channel("conv3d", &g.output_shape(), bias)?;
        g.for_each_tap(|xi, wi, yi| y[yi] += w.data[wi] * x.data[xi]);
        Ok(cpu(y, g.output_shape()))
    }

    fn conv3d_grad_input(
        &self,
        dy: &CpuTensor,
        w: &CpuTensor,
        bias: Option<&CpuTensor>,
        g: &Conv3dGeometry,
    ) -> Result<CpuTensor> {
        check_operands(
            "conv3d_grad_input",
            g,
            ("dy", &dy.shape, g.output_shape()),
            ("w", &w.shape, g.weight_shape()),
            bias.map(|b| (&b.shape, g.c_in)),
        )?;
        let mut dx = per_channel("conv3d_grad_input", &g.input_shape(), bias)?;
        g.for_each_tap(|xi, wi, yi| dx[xi] += w.data[wi] * dy.data[yi]);
        Ok(cpu(dx, g.input_shape()))
    }

    fn conv3d_grad_weight(
        &self,
        x: &CpuTensor,
        dy: &CpuTensor,
        g: &Conv3dGeometry,
    ) -> Result<CpuTensor> {
        check_operands(
            "conv3d_grad_weight",
            g,
            ("x", &x.shape, g.input_shape()),
            ("dy", &dy.shape, g.output_shape()),
            None,
        )?;
        let mut dw = filled("conv3d_grad_weight", g.weight_shape().numel(), 0.0)?;
        g.for_each_tap(|xi, wi, yi| dw[wi] += dy.data[yi] * x.data[xi]);
        Ok(cpu(dw, g.weight_shape()))
    }
}

/// The gradient of a per-channel bias: the incoming gradient summed over all but the channel axis.
fn d_bias<B: ConvBackend>(g: &Var<B>) -> Result<Var<B>> {
    g.sum_axes(&[0, 2, 3, 4], false)
}

/// A bias tangent [K] as [1, K, 1, 1, 1], to broadcast over an output.
fn t_bias<B: ConvBackend>(d: &Var<B>) -> Result<Var<B>> {
    d.reshape(&Shape::from([1, d.shape().numel(), 1, 1, 1]))
}

fn inputs<'a, B: ConvBackend>(
    a: &'a Var<B>,
    b: &'a Var<B>,
    bias: Option<&'a Var<B>>,
) -> Vec<&'a Var<B>> {
    let mut v = vec![a, b];
    v.extend(bias);
    v
}

/// Convolutions. Each is linear in each operand, and the three primitives are one another's
/// adjoints, so every backward rule is a call of the other two.
impl<B: ConvBackend> Var<B> {
    /// conv3d(self, w) + bias, self [N, C, D, H, W], w [K, C, kd, kh, kw], bias [K].
    pub fn conv3d(&self, w: &Var<B>, bias: Option<&Var<B>>, spec: ConvSpec) -> Result<Self> {
        let geometry = Conv3dGeometry::new(self.shape(), w.shape(), spec)?;
        self.conv3d_with(w, bias, geometry)
    }

    /// conv3d with a geometry already checked against the operands' shapes.
    pub fn conv3d_with(
        &self,
        w: &Var<B>,
        bias: Option<&Var<B>>,
        geometry: Conv3dGeometry,
    ) -> Result<Self> {
        let value =
            self.backend()
                .conv3d(self.value(), w.value(), bias.map(Var::value), &geometry)?;
        Ok(Var::from_op_with_jvp(
            "conv3d",
            value,
            &inputs(self, w, bias),
            rule(move |v, _, g| {
                let mut d = vec![
                    Some(g.conv3d_grad_input(&v[1], None, geometry)?),
                    Some(v[0].conv3d_grad_weight(g, geometry)?),
                ];
                if v.len() == 3 {
                    d.push(Some(d_bias(g)?));
                }
                Ok(d)
            }),
            // Linear in each operand.
            tangent(move |v, y, d| {
                let terms = [
                    d[0].as_ref().map(|t| t.conv3d_with(&v[1], None, geometry)),
                    d[1].as_ref().map(|t| v[0].conv3d_with(t, None, geometry)),
                    d.get(2).and_then(Option::as_ref).map(t_bias),
                ];
                sum_tangents(y.backend(), y.shape(), terms.map(Option::transpose))
            }),
        ))
    }

    /// The gradient of conv3d with respect to its input, for self = dy [N, K, Do, Ho, Wo]:
    /// [N, C, D, H, W], plus `bias` [C] per channel if given (the transposed convolution's bias).
    pub fn conv3d_grad_input(
        &self,
        w: &Var<B>,
        bias: Option<&Var<B>>,
        geometry: Conv3dGeometry,
    ) -> Result<Self> {
        let value = self.backend().conv3d_grad_input(
            self.value(),
            w.value(),
            bias.map(Var::value),
            &geometry,
        )?;
        Ok(Var::from_op_with_jvp(
            "conv3d_grad_input",
            value,
            &inputs(self, w, bias),
            // g has x's shape: d(dy) = conv3d(g, w), d(w) = grad_weight(g, dy).
            rule(move |v, _, g| {
                let mut d = vec![
                    Some(g.conv3d_with(&v[1], None, geometry)?),
                    Some(g.conv3d_grad_weight(&v[0], geometry)?),
                ];
                if v.len() == 3 {
                    d.push(Some(d_bias(g)?));
                }
                Ok(d)
            }),
            tangent(move |v, y, d| {
                let terms = [
                    d[0].as_ref()
                        .map(|t| t.conv3d_grad_input(&v[1], None, geometry)),
                    d[1].as_ref()
                        .map(|t| v[0].conv3d_grad_input(t, None, geometry)),
                    d.get(2).and_then(Option::as_ref).map(t_bias),
                ];
                sum_tangents(y.backend(), y.shape(), terms.map(Option::transpose))
            }),
        ))
    }

    /// The gradient of conv3d with respect to its weight, for self = x and `dy`: [K, C, kd, kh, kw].
    pub fn conv3d_grad_weight(&self, dy: &Var<B>, geometry: Conv3dGeometry) -> Result<Self> {
        let value = self
            .backend()
            .conv3d_grad_weight(self.value(), dy.value(), &geometry)?;
        Ok(Var::from_op_with_jvp(
            "conv3d_grad_weight",
            value,
            &[self, dy],
            // g has w's shape: d(x) = grad_input(dy, g), d(dy) = conv3d(x, g).
            rule(move |v, _, g| {
                Ok(vec![
                    Some(v[1].conv3d_grad_input(g, None, geometry)?),
                    Some(v[0].conv3d_with(g, None, geometry)?),
                ])
            }),
            tangent(move |v, y, d| {
                let terms = [
                    d[0].as_ref().map(|t| t.conv3d_grad_weight(&v[1], geometry)),
                    d[1].as_ref().map(|t| v[0].conv3d_grad_weight(t, geometry)),
                ];
                sum_tangents(y.backend(), y.shape(), terms.map(Option::transpose))
            }),
        ))
    }

    /// The transposed convolution as PyTorch's conv_transpose3d: self [N, C_in, D, H, W],
    /// w [C_in, C_out, kd, kh, kw], bias [C_out]; see [`Conv3dGeometry::transposed`] for its size.
    pub fn conv_transpose3d(
        &self,
        w: &Var<B>,
        bias: Option<&Var<B>>,
        spec: ConvSpec,
        output_padding: [usize; 3],
    ) -> Result<Self> {
        let geometry = Conv3dGeometry::transposed(self.shape(), w.shape(), spec, output_padding)?;
        self.conv3d_grad_input(w, bias, geometry)
    }
}
