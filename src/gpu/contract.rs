//! The Rust-WGSL contract, checked by machine with no GPU: naga reflects every kernel file, and the
//! constants, uniform structs and op codes the host keeps in step with them are compared with it.
//! A change on one side only (a constant, a field, its type or order, an op code) fails here.

use super::backend::{
    binary_code, unary_code, ElementwiseParams, MatmulParams, RandomParams, ReduceParams,
};
use super::contrastive::InfonceParams;
use super::conv::plan;
use super::conv::{ConvParams, ConvPlan, ConvVariant};
use super::distance::DistanceParams;
use super::kernels::KernelFile;
use super::layers::{AffineParams, ChannelParams, PoolParams};
use super::losses::LossParams;
use super::meta::{norm_code, MetaWeightsParams};
use super::warp::WarpParams;
use metaseg_autograd::meta::Normalization;
use metaseg_autograd::{BinaryOp, Conv3dGeometry, ConvSpec, Shape, Statistic, UnaryOp};
use naga::{proc::Layouter, AddressSpace, Expression, Literal, Module, TypeInner};
use std::collections::BTreeMap;

fn module(file: KernelFile) -> Module {
    naga::front::wgsl::parse_str(file.source())
        .unwrap_or_else(|e| panic!("{}: {}", file.name(), e.emit_to_string(file.source())))
}

/// A scalar of a constant expression as f64, or None if it is not a literal.
fn literal(module: &Module, init: naga::Handle<Expression>) -> Option<f64> {
    match module.global_expressions[init] {
        Expression::Literal(l) => Some(match l {
            Literal::U32(v) => f64::from(v),
            Literal::I32(v) => f64::from(v),
            Literal::F32(v) => f64::from(v),
            Literal::Bool(v) => f64::from(u8::from(v)),
            Literal::AbstractInt(v) => v as f64,
            Literal::AbstractFloat(v) => v,
            other => panic!("unexpected literal {other:?}"),
        }),
        _ => None,
    }
}

/// Every named `const` and the default of every `override` of a file, by name.
fn constants(module: &Module) -> BTreeMap<String, f64> {
    let consts = module
        .constants
        .iter()
        .filter_map(|(_, c)| Some((c.name.clone()?, literal(module, c.init)?)));
    let overrides = module
        .overrides
        .iter()
        .filter_map(|(_, o)| Some((o.name.clone()?, literal(module, o.init?)?)));
    consts.chain(overrides).collect()
}

/// The Rust side of one shared value: (file, name in the WGSL, value on the host).
fn shared_constants() -> Vec<(KernelFile, &'static str, f64)> {
    use super::{backend, contrastive, distance, layers, losses, meta, warp};
    use KernelFile::*;
    let n = |v: usize| v as f64;
    let statistic = |s| f64::from(layers::statistic_code(s));
    vec![
        (Elementwise, "WG", f64::from(backend::WG)),
        (Elementwise, "VECS", f64::from(backend::VECS)),
        (Reduce, "WG", f64::from(backend::WG)),
        (Random, "WG", f64::from(backend::WG)),
        (
            Random,
            "MAX_K",
            n(metaseg_autograd::contrastive::MAX_ANCHORS),
        ),
        (Matmul, "WG", n(backend::MATMUL_WG)),
        (Matmul, "RM", n(backend::MATMUL_RM)),
        (Matmul, "RN", n(backend::MATMUL_RN)),
        (Matmul, "MAX_ACC", n(backend::MATMUL_MAX_ACC)),
        (Conv, "WG", n(plan::WG)),
        (Conv, "MAX_SEGMENT", n(plan::MAX_SEGMENT)),
        (Conv, "MAX_ACC", n(plan::MAX_ACC)),
        (Conv, "MAX_TAP_WEIGHTS", n(plan::MAX_TAP_WEIGHTS)),
        (Conv, "PART", n(plan::PART)),
        (Conv, "ROW_ACC", n(plan::ROW_ACC)),
        (Conv, "MAX_STAGED", n(plan::MAX_STAGED)),
        (Losses, "WG", n(losses::WG)),
        (Losses, "MAX_CLASSES", n(losses::MAX_CLASSES)),
        (Pool, "WG", n(layers::WG)),
        (Channels, "WG", n(layers::WG)),
        (ChannelAffine, "WG", n(layers::WG)),
        (ChannelAffine, "STATISTIC_WG", n(layers::STATISTIC_WG)),
        (ChannelAffine, "STATISTIC_MEAN", statistic(Statistic::Mean)),
        (
            ChannelAffine,
            "STATISTIC_VARIANCE",
            statistic(Statistic::Variance),
        ),
        (
            ChannelAffine,
            "STATISTIC_SCALE",
            statistic(Statistic::Scale),
        ),
        (
            ChannelAffine,
            "STATISTIC_SHIFT",
            statistic(Statistic::Shift),
        ),
        (MetaWeights, "WG", n(meta::WG)),
        (MetaWeights, "GROUPS", n(meta::GROUPS)),
        (Contrastive, "WG", n(contrastive::WG)),
        (Contrastive, "MAX_ROWS", n(contrastive::MAX_ROWS)),
        (Contrastive, "MAX_REG", n(contrastive::MAX_REG)),
        (Distance, "WG", n(distance::LINE_WG)),
        (Distance, "MAX_LINE", n(distance::MAX_LINE)),
        (Warp, "WG", n(warp::WG)),
    ]
}

#[test]
fn constants_agree_with_the_kernels() {
    for (file, name, value) in shared_constants() {
        let wgsl = constants(&module(file));
        let found = wgsl.get(name).unwrap_or_else(|| {
            panic!(
                "{}: no const or override {name} (the host has {value})",
                file.name()
            )
        });
        assert_eq!(
            *found,
            value,
            "{}: {name} is {found} in the WGSL but {value} on the host",
            file.name()
        );
    }
}

/// One field: name, byte offset, size, scalar type ("u32", "f32", ...).
type Field = (String, usize, usize, String);

/// A Rust uniform struct's size and fields; every field must be listed (the destructuring
/// pattern in `twin!` does not compile otherwise).
struct Twin {
    file: KernelFile,
    rust: &'static str,
    size: usize,
    fields: Vec<Field>,
}

/// The scalar a Rust field's type is made of: "u32" of "[[u32; 4]; 3]".
fn rust_scalar<T, F>(_: fn(&T) -> &F) -> String {
    let name = std::any::type_name::<F>();
    name.trim_start_matches('[')
        .split([';', ']'])
        .next()
        .unwrap()
        .to_string()
}

fn field_size<T, F>(_: fn(&T) -> &F) -> usize {
    std::mem::size_of::<F>()
}

macro_rules! twin {
    ($file:ident, $rust:ident { $($field:ident),* $(,)? }) => {{
        // Lists every field of the struct, or fails to compile.
        let _ = |p: $rust| {
            let $rust { $($field: _),* } = p;
        };
        Twin {
            file: KernelFile::$file,
            rust: stringify!($rust),
            size: std::mem::size_of::<$rust>(),
            fields: vec![$((
                stringify!($field).to_string(),
                std::mem::offset_of!($rust, $field),
                field_size(|p: &$rust| &p.$field),
                rust_scalar(|p: &$rust| &p.$field),
            )),*],
        }
    }};
}

fn twins() -> Vec<Twin> {
    vec![
        twin!(
            Elementwise,
            ElementwiseParams {
                n,
                p0,
                p1,
                unused,
                shape,
                stride_a,
                stride_b
            }
        ),
        twin!(
            Reduce,
            ReduceParams {
                outer,
                reduce,
                inner,
                chunk,
                chunks
            }
        ),
        twin!(
            Matmul,
            MatmulParams {
                m,
                k,
                n,
                batch_a,
                batch_b,
                batch,
                chunk,
                splits,
                row_blocks,
                col_blocks
            }
        ),
        twin!(
            Random,
            RandomParams {
                n,
                seed_lo,
                seed_hi,
                counter_lo,
                counter_hi,
                classes
            }
        ),
        twin!(
            Conv,
            ConvParams {
                batch,
                c_in,
                c_out,
                rows_per_chunk,
                channels_padded,
                _pad,
                input,
                kernel,
                output,
                stride,
                padding,
                dilation,
            }
        ),
        twin!(Losses, LossParams { n, s, chunk, decay }),
        twin!(
            Pool,
            PoolParams {
                n,
                volumes,
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
                s_w
            }
        ),
        twin!(
            Channels,
            ChannelParams {
                n,
                volume,
                channels_in,
                channels_out,
                start
            }
        ),
        twin!(
            ChannelAffine,
            AffineParams {
                n,
                volume,
                groups,
                chunk
            }
        ),
        twin!(MetaWeights, MetaWeightsParams { n }),
        twin!(
            Contrastive,
            InfonceParams {
                e,
                s,
                m,
                chunk,
                chunks,
                inv_tau
            }
        ),
        twin!(
            Distance,
            DistanceParams {
                lines,
                len,
                inner,
                weight,
                infinity,
                voxels,
                groups,
                d,
                h,
                w,
                pad
            }
        ),
        twin!(
            Warp,
            WarpParams {
                rows,
                inverse,
                reach,
                src,
                dst
            }
        ),
    ]
}

/// The scalar a WGSL type is made of.
fn wgsl_scalar(module: &Module, ty: naga::Handle<naga::Type>) -> String {
    let scalar = match module.types[ty].inner {
        TypeInner::Scalar(s) | TypeInner::Vector { scalar: s, .. } | TypeInner::Atomic(s) => s,
        TypeInner::Matrix { scalar, .. } => scalar,
        TypeInner::Array { base, .. } => return wgsl_scalar(module, base),
        ref other => panic!("no scalar in {other:?}"),
    };
    let kind = match scalar.kind {
        naga::ScalarKind::Uint => "u",
        naga::ScalarKind::Sint => "i",
        naga::ScalarKind::Float => "f",
        naga::ScalarKind::Bool => return "bool".into(),
        other => panic!("unexpected scalar kind {other:?}"),
    };
    format!("{kind}{}", 8 * scalar.width)
}

/// The uniform at group 0 binding 0 of a file, if it has one: its struct's name, size and fields.
fn uniform(module: &Module) -> Option<(String, usize, Vec<Field>)> {
    let global = module.global_variables.iter().find_map(|(_, g)| {
        let at_zero = g
            .binding
            .as_ref()
            .is_some_and(|b| b.group == 0 && b.binding == 0);
        (g.space == AddressSpace::Uniform && at_zero).then_some(g)
    })?;
    let mut layouter = Layouter::default();
    layouter.update(module.to_ctx()).expect("a layout");
    let ty = &module.types[global.ty];
    let TypeInner::Struct { members, span } = &ty.inner else {
        panic!("the uniform is not a struct");
    };
    let fields = members
        .iter()
        .map(|m| {
            (
                m.name.clone().unwrap_or_default(),
                m.offset as usize,
                layouter[m.ty].size as usize,
                wgsl_scalar(module, m.ty),
            )
        })
        .collect();
    Some((ty.name.clone().unwrap_or_default(), *span as usize, fields))
}

/// Padding fields are free to differ in name and split: `_pad`, `pad0`, `unused`, ...
fn is_padding(name: &str) -> bool {
    name.starts_with('_') || name.starts_with("pad") || name == "unused"
}

fn named(fields: &[Field]) -> Vec<&Field> {
    fields.iter().filter(|f| !is_padding(&f.0)).collect()
}

#[test]
fn uniform_structs_agree_with_their_rust_twins() {
    let twins = twins();
    for file in KernelFile::ALL {
        let Some((name, size, fields)) = uniform(&module(file)) else {
            continue;
        };
        let twin = twins
            .iter()
            .find(|t| t.file == file)
            .unwrap_or_else(|| panic!("{}: the uniform {name} has no Rust twin", file.name()));
        let what = format!("{} {name} and {}", file.name(), twin.rust);
        assert_eq!(size, twin.size, "{what}: size in bytes (WGSL, Rust)");
        let (wgsl, rust) = (named(&fields), named(&twin.fields));
        for f in &wgsl {
            let r = rust.iter().find(|r| r.0 == f.0);
            let r = r.unwrap_or_else(|| panic!("{what}: {} is not on the Rust side", f.0));
            assert_eq!(
                (r.1, r.2, &r.3),
                (f.1, f.2, &f.3),
                "{what}: field {} (offset, size, scalar) in Rust, in WGSL",
                f.0
            );
        }
        for r in &rust {
            assert!(
                wgsl.iter().any(|f| f.0 == r.0),
                "{what}: {} is not on the WGSL side",
                r.0
            );
        }
    }
}

/// Every unary op, one of each kind (a new one fails to compile in the match until listed).
fn unary_ops() -> Vec<UnaryOp> {
    use UnaryOp::*;
    let ops = vec![
        Neg,
        Exp,
        Log,
        Sqrt,
        Square,
        Relu,
        LeakyRelu { slope: 0.0 },
        Sigmoid,
        Tanh,
        Clamp { min: 0.0, max: 0.0 },
        Scale { factor: 0.0 },
        AddScalar { value: 0.0 },
        ReluMask,
        LeakyReluSlope { slope: 0.0 },
        ClampMask { min: 0.0, max: 0.0 },
    ];
    for op in &ops {
        match op {
            Neg
            | Exp
            | Log
            | Sqrt
            | Square
            | Relu
            | LeakyRelu { .. }
            | Sigmoid
            | Tanh
            | Clamp { .. }
            | Scale { .. }
            | AddScalar { .. }
            | ReluMask
            | LeakyReluSlope { .. }
            | ClampMask { .. } => {}
        }
    }
    ops
}

/// The case values of the `switch` on an override in function `function` of a file.
fn switch_cases(module: &Module, function: &str) -> Vec<u32> {
    let (_, f) = module
        .functions
        .iter()
        .find(|(_, f)| f.name.as_deref() == Some(function))
        .unwrap_or_else(|| panic!("no function {function}"));
    let mut cases = Vec::new();
    for statement in f.body.iter() {
        if let naga::Statement::Switch { cases: c, .. } = statement {
            cases.extend(c.iter().filter_map(|c| match c.value {
                naga::SwitchValue::U32(v) => Some(v),
                _ => None,
            }));
        }
    }
    cases
}

/// The host's codes against the WGSL's named constants `prefix` + NAME, and the cases of
/// `function`'s switch against those constants: each code has its constant, and each case a code.
fn check_codes(file: KernelFile, function: &str, prefix: &str, host: &[(String, u32)]) {
    let module = module(file);
    let wgsl = constants(&module);
    for (name, code) in host {
        let constant = format!("{prefix}{}", name.to_uppercase());
        assert_eq!(
            wgsl.get(&constant).copied(),
            Some(f64::from(*code)),
            "{}: {constant} (the host's {name} is {code})",
            file.name()
        );
    }
    let mut declared: Vec<u32> = wgsl
        .iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(_, v)| *v as u32)
        .collect();
    let mut codes: Vec<u32> = host.iter().map(|h| h.1).collect();
    let mut cases = switch_cases(&module, function);
    declared.sort_unstable();
    codes.sort_unstable();
    cases.sort_unstable();
    assert_eq!(
        declared,
        codes,
        "{}: {prefix} constants against the host's codes",
        file.name()
    );
    assert_eq!(cases, codes, "{}: the cases of {function}", file.name());
}

#[test]
fn op_codes_agree_with_the_kernels() {
    let unary: Vec<_> = unary_ops()
        .into_iter()
        .map(|op| (op.name().to_string(), unary_code(op)))
        .collect();
    check_codes(KernelFile::Elementwise, "unary_op", "UNARY_", &unary);
    let binary: Vec<_> = [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div]
        .into_iter()
        .map(|op| (op.name().to_string(), binary_code(op)))
        .collect();
    check_codes(KernelFile::Elementwise, "binary_op", "BINARY_", &binary);
    let norms: Vec<_> = [
        Normalization::Clip,
        Normalization::Softmax,
        Normalization::Sigmoid,
        Normalization::Hard,
    ]
    .into_iter()
    .map(|n| (format!("{n:?}"), norm_code(n)))
    .collect();
    check_codes(KernelFile::MetaWeights, "raw", "NORM_", &norms);
}

/// Geometries that between them take every row of the plan's table.
fn plan_geometries() -> Vec<Conv3dGeometry> {
    let geo = |x: [usize; 5], w: [usize; 5], stride: [usize; 3], padding: [usize; 3]| {
        let spec = ConvSpec::new(stride, padding);
        Conv3dGeometry::new(&Shape::from(x), &Shape::from(w), spec).unwrap()
    };
    vec![
        geo([1, 2, 3, 4, 8], [3, 2, 3, 3, 3], [1; 3], [1; 3]),
        geo([1, 2, 4, 4, 16], [3, 2, 2, 2, 2], [2; 3], [0; 3]),
        geo([1, 2, 4, 5, 16], [3, 2, 2, 2, 2], [2; 3], [0; 3]),
        geo([1, 2, 3, 4, 24], [3, 2, 3, 3, 3], [1, 1, 3], [0; 3]),
        geo([1, 2, 3, 4, 7], [3, 2, 3, 3, 3], [1; 3], [1; 3]),
        geo([1, 2, 7, 7, 12], [3, 2, 7, 7, 7], [1; 3], [1; 3]),
        geo([2, 3, 1, 9, 12], [4, 3, 1, 3, 3], [1; 3], [0, 1, 1]),
    ]
}

/// Every kernel a conv plan launches names an entry point of conv.wgsl and only its overrides.
#[test]
fn conv_plans_name_entry_points_and_overrides_of_the_kernel() {
    let module = module(KernelFile::Conv);
    let overrides = constants(&module);
    let mut seen = std::collections::BTreeSet::new();
    for g in plan_geometries() {
        for variant in ConvVariant::ALL {
            let plan = ConvPlan::new(variant, &g);
            for kernel in plan.kernels(&g) {
                assert!(
                    module.entry_points.iter().any(|e| e.name == kernel.entry),
                    "{}: no entry point {}",
                    KernelFile::Conv.name(),
                    kernel.entry
                );
                for (name, _) in &kernel.constants {
                    let is_override = module
                        .overrides
                        .iter()
                        .any(|(_, o)| o.name.as_deref() == Some(*name));
                    assert!(
                        is_override && overrides.contains_key(*name),
                        "no override {name}"
                    );
                }
                seen.insert(kernel.entry);
            }
        }
    }
    // Every entry point of the table is planned for one of the geometries.
    let planned: Vec<&str> = seen.into_iter().collect();
    let mut entries: Vec<&str> = module
        .entry_points
        .iter()
        .map(|e| e.name.as_str())
        .filter(|e| *e != "conv3d_arrange_weight")
        .collect();
    entries.sort_unstable();
    assert_eq!(planned, entries);
}
