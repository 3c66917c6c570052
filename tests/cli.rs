//! `metaseg kernel` end to end on the cpu64 backend: arrays go in and come out as .npy files, and
//! every mistake a user can make ends in a one-line message that names it.

use metaseg::npy::{self, Dtype};
use metaseg_autograd::Shape;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tempfile::TempDir;

struct Dir(TempDir);

impl Dir {
    fn new() -> Self {
        Dir(TempDir::new().unwrap())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }

    /// Writes an array and returns its path as a string for the command line.
    fn array(&self, name: &str, values: &[f64], dims: &[usize]) -> String {
        let path = self.path(name);
        npy::write(&path, values, &Shape::new(dims), Dtype::F64).unwrap();
        path.to_str().unwrap().to_string()
    }

    fn read(&self, name: &str) -> (Vec<f64>, Shape) {
        npy::read(&self.path(name)).unwrap()
    }

    fn out(&self) -> String {
        self.path("out").to_str().unwrap().to_string()
    }
}

fn metaseg(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_metaseg"))
        .args(args)
        .output()
        .unwrap()
}

/// Runs `metaseg kernel` on cpu64 and returns its stdout, failing with its stderr.
fn kernel(args: &[&str]) -> String {
    let output = metaseg(&[&["kernel", "--backend", "cpu64"], args].concat());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "metaseg failed: {stderr}");
    String::from_utf8(output.stdout).unwrap()
}

/// Runs `metaseg kernel` on cpu64, expecting it to fail with a one-line message containing each
/// of `expected`.
fn kernel_fails(args: &[&str], expected: &[&str]) {
    let output = metaseg(&[&["kernel", "--backend", "cpu64"], args].concat());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr}");
    for e in expected {
        assert!(stderr.contains(e), "{stderr:?} does not contain {e:?}");
    }
}

fn assert_close(actual: &[f64], expected: &[f64]) {
    assert_eq!(actual.len(), expected.len());
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!(
            (a - e).abs() <= 1e-12 * (1.0 + e.abs()),
            "[{i}]: {a} vs {e}"
        );
    }
}

/// Values that differ everywhere, so a swapped index shows.
fn ramp(n: usize, scale: f64) -> Vec<f64> {
    (0..n)
        .map(|i| scale * (i as f64 + 1.0) - 0.37 * (i % 3) as f64)
        .collect()
}

/// `x[i, j]` of a row-major matrix with `cols` columns.
fn at(x: &[f64], cols: usize, i: usize, j: usize) -> f64 {
    x[i * cols + j]
}

#[test]
fn matmul_trans_b_with_gradients() {
    let dir = Dir::new();
    let (m, k, n) = (2, 3, 4);
    let (a, b, g) = (ramp(m * k, 0.5), ramp(n * k, -0.25), ramp(m * n, 0.1));
    let stdout = kernel(&[
        "matmul",
        "--in",
        &format!("a={}", dir.array("a.npy", &a, &[m, k])),
        "--in",
        &format!("b={}", dir.array("b.npy", &b, &[n, k])),
        "--set",
        "trans_b=true",
        "--grad-output",
        &dir.array("g.npy", &g, &[m, n]),
        "--out",
        &dir.out(),
        "--repeat",
        "3",
    ]);
    assert!(
        stdout.contains("run 3: ") && stdout.contains("ms (wall clock)"),
        "{stdout}"
    );

    // C = A B^T, so dA = G B and dB = G^T A.
    let sum = |len: usize, f: &dyn Fn(usize) -> f64| (0..len).map(f).sum::<f64>();
    let c: Vec<f64> = (0..m * n)
        .map(|ij| sum(k, &|p| at(&a, k, ij / n, p) * at(&b, k, ij % n, p)))
        .collect();
    let da: Vec<f64> = (0..m * k)
        .map(|ip| sum(n, &|j| at(&g, n, ip / k, j) * at(&b, k, j, ip % k)))
        .collect();
    let db: Vec<f64> = (0..n * k)
        .map(|jp| sum(m, &|i| at(&g, n, i, jp / k) * at(&a, k, i, jp % k)))
        .collect();

    let (out, shape) = dir.read("out/out.npy");
    assert_eq!(shape, Shape::from([m, n]));
    assert_close(&out, &c);
    let (grad_a, shape) = dir.read("out/grad_a.npy");
    assert_eq!(shape, Shape::from([m, k]));
    assert_close(&grad_a, &da);
    let (grad_b, shape) = dir.read("out/grad_b.npy");
    assert_eq!(shape, Shape::from([n, k]));
    assert_close(&grad_b, &db);
}

#[test]
fn cpu64_writes_float64() {
    let dir = Dir::new();
    let x = dir.array("x.npy", &[0.1, 0.2], &[2]);
    kernel(&["neg", "--in", &format!("x={x}"), "--out", &dir.out()]);
    let bytes = std::fs::read(dir.path("out/out.npy")).unwrap();
    let file = npyz::NpyFile::new(bytes.as_slice()).unwrap();
    assert_eq!(file.dtype().descr(), "'<f8'");
}

#[test]
fn add_broadcasts_and_sums_the_gradient_back() {
    let dir = Dir::new();
    let (a, b, g) = (ramp(6, 1.0), vec![10.0, 20.0, 30.0], ramp(6, 0.5));
    kernel(&[
        "add",
        "--in",
        &format!("a={}", dir.array("a.npy", &a, &[2, 3])),
        "--in",
        &format!("b={}", dir.array("b.npy", &b, &[3])),
        "--grad-output",
        &dir.array("g.npy", &g, &[2, 3]),
        "--out",
        &dir.out(),
    ]);
    let expected: Vec<f64> = (0..6).map(|i| a[i] + b[i % 3]).collect();
    assert_eq!(dir.read("out/out.npy"), (expected, Shape::from([2, 3])));
    assert_eq!(dir.read("out/grad_a.npy"), (g.clone(), Shape::from([2, 3])));
    // b was broadcast along the rows, so its gradient sums over them.
    let grad_b: Vec<f64> = (0..3).map(|j| g[j] + g[3 + j]).collect();
    assert_eq!(dir.read("out/grad_b.npy"), (grad_b, Shape::from([3])));
}

#[test]
fn sum_over_axes() {
    let dir = Dir::new();
    let (d0, d1, d2) = (2, 3, 4);
    let x = ramp(d0 * d1 * d2, 0.3);
    let input = format!("x={}", dir.array("x.npy", &x, &[d0, d1, d2]));
    let over_0_and_2: Vec<f64> = (0..d1)
        .map(|j| {
            let row = |i: usize| (0..d2).map(|l| x[(i * d1 + j) * d2 + l]).sum::<f64>();
            (0..d0).map(row).sum()
        })
        .collect();

    kernel(&[
        "sum",
        "--in",
        &input,
        "--set",
        "axes=0,2",
        "--out",
        &dir.out(),
    ]);
    let (out, shape) = dir.read("out/out.npy");
    assert_eq!(shape, Shape::from([d1]));
    assert_close(&out, &over_0_and_2);

    let keep = ["--set", "axes=2,0", "--set", "keepdim=true"];
    kernel(&[&["sum", "--in", &input, "--out", &dir.out()], &keep[..]].concat());
    let (out, shape) = dir.read("out/out.npy");
    assert_eq!(shape, Shape::from([1, d1, 1]));
    assert_close(&out, &over_0_and_2);
}

#[test]
fn malformed_npy_is_named() {
    let dir = Dir::new();
    let path = dir.path("junk.npy");
    std::fs::write(&path, b"this is not an array at all").unwrap();
    let input = format!("x={}", path.display());
    kernel_fails(
        &["neg", "--in", &input, "--out", &dir.out()],
        &["junk.npy", "not a valid .npy file"],
    );
}

#[test]
fn missing_input_file_and_missing_input() {
    let dir = Dir::new();
    let a = format!("a={}", dir.array("a.npy", &[1.0], &[1]));
    kernel_fails(
        &["add", "--in", "a=nowhere.npy", "--out", &dir.out()],
        &["nowhere.npy: file not found"],
    );
    kernel_fails(
        &["add", "--in", &a, "--out", &dir.out()],
        &["add: missing input 'b'", "a, b"],
    );
    kernel_fails(
        &["neg", "--in", &a, "--out", &dir.out()],
        &["neg: unknown input 'a'", "x"],
    );
}

#[test]
fn unknown_op_lists_the_known_ones() {
    let dir = Dir::new();
    kernel_fails(
        &["conv9d", "--out", &dir.out()],
        &["unknown op 'conv9d'", "known ops:", "matmul"],
    );
    assert!(
        !Path::new(&dir.out()).exists(),
        "nothing is created for a bad call"
    );
}

#[test]
fn shape_mismatch_names_the_op_and_both_shapes() {
    let dir = Dir::new();
    let a = format!("a={}", dir.array("a.npy", &ramp(6, 1.0), &[2, 3]));
    let b = format!("b={}", dir.array("b.npy", &ramp(8, 1.0), &[4, 2]));
    kernel_fails(
        &["matmul", "--in", &a, "--in", &b, "--out", &dir.out()],
        &["matmul", "[2, 3]", "[4, 2]"],
    );
    kernel_fails(
        &["mul", "--in", &a, "--in", &b, "--out", &dir.out()],
        &["mul", "[2, 3]", "[4, 2]"],
    );
}

#[test]
fn bad_settings_are_named() {
    let dir = Dir::new();
    let a = format!("a={}", dir.array("a.npy", &[1.0], &[1, 1]));
    let b = format!("b={}", dir.array("b.npy", &[1.0], &[1, 1]));
    let matmul = ["matmul", "--in", &a, "--in", &b, "--out", &dir.out()];
    let with = |setting: &'static str| [&matmul[..], &["--set", setting]].concat();
    kernel_fails(&with("trans_b=yes"), &["trans_b=yes", "true or false"]);
    kernel_fails(
        &with("slope=0.1"),
        &["matmul: unknown setting 'slope'", "trans_a, trans_b"],
    );
    kernel_fails(&with("trans_b"), &["'trans_b'", "KEY=VALUE"]);
    let x = format!("x={}", dir.array("x.npy", &[1.0], &[1]));
    kernel_fails(
        &["clamp", "--in", &x, "--set", "min=0", "--out", &dir.out()],
        &["clamp: setting 'max' is required"],
    );
    kernel_fails(
        &["sum", "--in", &x, "--set", "axes=0,-1", "--out", &dir.out()],
        &["axes=0,-1", "non-negative integers"],
    );
}

#[test]
fn grad_output_of_the_wrong_shape() {
    let dir = Dir::new();
    let x = format!("x={}", dir.array("x.npy", &ramp(6, 1.0), &[2, 3]));
    let g = dir.array("g.npy", &ramp(6, 1.0), &[3, 2]);
    kernel_fails(
        &["tanh", "--in", &x, "--grad-output", &g, "--out", &dir.out()],
        &[
            "tanh",
            "gradient has shape [3, 2]",
            "output has shape [2, 3]",
        ],
    );
}

/// Runs `metaseg kernel` on `backend` with `args`, writing into `out`; returns stdout.
fn kernel_on(backend: &str, out: &str, args: &[&str]) -> String {
    let output = metaseg(&[&["kernel", "--backend", backend, "--out", out], args].concat());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "metaseg on {backend} failed: {stderr}"
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn gpu_agrees_with_cpu64_on_user_arrays_to_f32_precision() {
    let dir = Dir::new();
    let seeded = |n: usize, seed: u64| -> Vec<f64> {
        (0..n as u64)
            .map(|i| 2.0 * metaseg_autograd::random::uniform(seed, i) - 1.0)
            .collect()
    };
    let a = dir.array("a.npy", &seeded(3 * 37 * 29, 1), &[3, 37, 29]);
    let b = dir.array("b.npy", &seeded(41 * 29, 2), &[41, 29]);
    let g = dir.array("g.npy", &seeded(3 * 37 * 41, 3), &[3, 37, 41]);
    let x = dir.array("x.npy", &seeded(2 * 3 * 5 * 7, 4), &[2, 3, 5, 7]);
    let c = dir.array("c.npy", &seeded(3, 5), &[1, 3, 1, 1]);
    let gx = dir.array("gx.npy", &seeded(2 * 3 * 5 * 7, 6), &[2, 3, 5, 7]);
    let gs = dir.array("gs.npy", &seeded(2 * 5, 7), &[2, 5]);
    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            "matmul",
            vec![format!("a={a}"), format!("b={b}"), "trans_b=true".into(), g],
        ),
        (
            "add",
            vec![
                format!("a={x}"),
                format!("b={c}"),
                String::new(),
                gx.clone(),
            ],
        ),
        (
            "tanh",
            vec![format!("x={x}"), String::new(), String::new(), gx],
        ),
        (
            "sum",
            vec![format!("x={x}"), String::new(), "axes=1,3".into(), gs],
        ),
    ];
    for (op, parts) in cases {
        let mut args = vec![op.to_string()];
        for input in parts[..2].iter().filter(|s| !s.is_empty()) {
            args.extend(["--in".to_string(), input.clone()]);
        }
        if !parts[2].is_empty() {
            args.extend(["--set".to_string(), parts[2].clone()]);
        }
        args.extend(["--grad-output".to_string(), parts[3].clone()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (cpu_dir, gpu_dir) = (
            dir.path(&format!("{op}-cpu")),
            dir.path(&format!("{op}-gpu")),
        );
        kernel_on("cpu64", cpu_dir.to_str().unwrap(), &args);
        kernel_on("gpu", gpu_dir.to_str().unwrap(), &args);
        let mut files = vec!["out.npy".to_string()];
        let spec = metaseg::runner::op_spec(op).unwrap();
        files.extend(spec.inputs.iter().map(|n| format!("grad_{n}.npy")));
        for file in files {
            let (cpu, cpu_shape) = npy::read(&cpu_dir.join(&file)).unwrap();
            let (gpu, gpu_shape) = npy::read(&gpu_dir.join(&file)).unwrap();
            assert_eq!(cpu_shape, gpu_shape, "{op} {file}");
            metaseg_autograd::Tolerance::F32_ACCUMULATED.assert(
                &format!("{op} {file}"),
                &gpu,
                &cpu,
            );
        }
    }
}

#[test]
fn gpu_writes_float32_and_times_each_run_per_kernel() {
    let dir = Dir::new();
    let x = dir.array("x.npy", &ramp(1000, 0.01), &[10, 100]);
    let stdout = kernel_on(
        "gpu",
        &dir.out(),
        &["exp", "--in", &format!("x={x}"), "--repeat", "2"],
    );
    assert!(
        stdout.contains("run 1:") && stdout.contains("run 2:"),
        "{stdout}"
    );
    assert!(stdout.contains("elementwise.wgsl:unary[OP=1]"), "{stdout}");
    let header = std::fs::read(dir.path("out/out.npy")).unwrap();
    assert!(String::from_utf8_lossy(&header[..128]).contains("<f4"));
}

#[test]
fn info_names_the_adapter_and_its_limits() {
    let output = metaseg(&["info"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for field in [
        "adapter",
        "backend",
        "max_storage_buffer_binding_size",
        "TIMESTAMP_QUERY",
    ] {
        assert!(stdout.contains(field), "{field} missing from:\n{stdout}");
    }
}

/// conv3d with its optional bias and the settings written as the issue writes them (one --set,
/// several KEY=VALUE): a delta kernel at the centre with padding 1 gives back x + b, on cpu64 and
/// on the GPU; without b there is no grad_b.
#[test]
fn conv3d_with_and_without_its_optional_bias() {
    let dir = Dir::new();
    let dims = [1, 1, 2, 3, 4];
    let xv = ramp(24, 0.1);
    let x = dir.array("x.npy", &xv, &dims);
    let mut delta = vec![0.0; 27];
    delta[13] = 1.0;
    let w = dir.array("w.npy", &delta, &[1, 1, 3, 3, 3]);
    let b = dir.array("b.npy", &[0.5], &[1]);
    let g = dir.array("g.npy", &[1.0; 24], &dims);
    for backend in ["cpu64", "gpu"] {
        let out = dir.path(backend);
        let out = out.to_str().unwrap();
        let (x, w, b, g) = (format!("x={x}"), format!("w={w}"), format!("b={b}"), &g);
        let args = [
            "conv3d",
            "--in",
            &x,
            "--in",
            &w,
            "--in",
            &b,
            "--grad-output",
            g,
        ];
        let settings = ["--set", "stride=1,1,1", "padding=1,1,1"];
        kernel_on(backend, out, &[&args[..], &settings[..]].concat());
        let (y, shape) = dir.read(&format!("{backend}/out.npy"));
        assert_eq!(shape, Shape::new(&dims));
        let expected: Vec<f64> = xv.iter().map(|v| v + 0.5).collect();
        metaseg_autograd::Tolerance::F32.assert(backend, &y, &expected);
        let (db, _) = dir.read(&format!("{backend}/grad_b.npy"));
        assert_eq!(db, vec![24.0], "{backend}");
    }
    let no_bias = dir.path("no-bias");
    let x = format!("x={x}");
    let w = format!("w={w}");
    let args = [
        "conv3d",
        "--in",
        &x,
        "--in",
        &w,
        "--set",
        "padding=1,1,1",
        "--grad-output",
        &g,
    ];
    kernel_on("cpu64", no_bias.to_str().unwrap(), &args);
    assert!(no_bias.join("grad_w.npy").exists() && !no_bias.join("grad_b.npy").exists());
}

#[test]
fn dataset_default_writes_an_msd_folder_the_reader_opens() {
    use metaseg::data::{synthetic, Msd, SplitSpec, SyntheticConfig};
    let dir = Dir::new();
    let out = dir.out();
    let args = [
        "dataset", "default", "--out", &out, "--cases", "3", "--seed", "2",
    ];
    let output = metaseg(
        &[
            &args[..],
            &["--size", "16,20,24", "--labeled", "1", "--test", "1"],
        ]
        .concat(),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("3 cases of 16x20x24 voxels (1 labeled, 1 unlabeled, 1 test)"),
        "{stdout}"
    );
    let msd = Msd::open(Path::new(&out)).unwrap();
    let split = msd
        .split(&SplitSpec::File(dir.path("out/split.json")))
        .unwrap();
    let (image, _) = msd.load(&split.unlabeled[0]).unwrap();
    let config = SyntheticConfig {
        seed: 2,
        cases: 3,
        size: [16, 20, 24],
        ..SyntheticConfig::default()
    };
    assert_eq!(image.data, synthetic::case(&config, 1).unwrap().image.data);
}

#[test]
fn dataset_default_rejects_a_bad_size_and_split() {
    let dir = Dir::new();
    let out = dir.out();
    let output = metaseg(&["dataset", "default", "--out", &out, "--size", "16,20"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("D,H,W"));
    let output = metaseg(&[
        "dataset",
        "default",
        "--out",
        &out,
        "--cases",
        "4",
        "--labeled",
        "3",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("3 labeled + 8 test of 4 cases"), "{stderr}");
}

#[test]
fn meta_gradient_writes_the_gradient_and_weights_that_sum_to_one() {
    let dir = Dir::new();
    let seeded = |n: usize, seed: u64| metaseg_autograd::check::seeded(n, seed, -1.0, 1.0);
    let label = |seed| metaseg_autograd::check::one_hot(&Shape::new(&[1, 2, 2, 3, 3]), seed, None);
    let x = [1, 1, 2, 3, 3];
    let args = [
        format!("x_u={}", dir.array("xu.npy", &seeded(18, 1), &x)),
        format!("y_u={}", dir.array("yu.npy", &label(2), &[1, 2, 2, 3, 3])),
        format!("x_m={}", dir.array("xm.npy", &seeded(18, 3), &x)),
        format!("y_m={}", dir.array("ym.npy", &label(4), &[1, 2, 2, 3, 3])),
        format!(
            "w1={}",
            dir.array("w1.npy", &seeded(54, 5), &[2, 1, 3, 3, 3])
        ),
        format!("b1={}", dir.array("b1.npy", &seeded(2, 6), &[2])),
        format!(
            "w2={}",
            dir.array("w2.npy", &seeded(4, 7), &[2, 2, 1, 1, 1])
        ),
        format!("b2={}", dir.array("b2.npy", &seeded(2, 8), &[2])),
    ];
    let mut cli: Vec<&str> = vec!["meta_gradient"];
    for a in &args {
        cli.extend(["--in", a.as_str()]);
    }
    let out = dir.out();
    cli.extend(["--set", "lr=0.1", "path=reverse", "--out", &out]);
    kernel(&cli);
    let (g, shape) = dir.read("out/out.npy");
    assert_eq!(shape.dims(), [1, 1, 2, 3, 3]);
    assert!(
        g.iter().any(|&v| v < 0.0),
        "no voxel would gain weight: {g:?}"
    );
    let (w, _) = dir.read("out/weights.npy");
    let total: f64 = w.iter().sum();
    assert!(
        (total - 1.0).abs() < 1e-9 && w.iter().all(|&v| v >= 0.0),
        "{w:?}"
    );
    // A meta-gradient has no gradient of its own: a typed error, not zeros.
    let g_out = dir.array("g.npy", &[1.0; 18], &[1, 1, 2, 3, 3]);
    cli.extend(["--grad-output", &g_out]);
    kernel_fails(&cli, &["meta_gradient", "no backward rule"]);
}
