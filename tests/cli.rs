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

/// A write that fails part-way leaves no half-written out.npy: a file-size limit stands in for a
/// full disk (writes past it fail with EFBIG, once sh ignores SIGXFSZ for the process it runs).
/// The earlier out.npy is kept as it was and no temporary file is left (issue 25).
#[test]
fn kernel_out_is_never_left_half_written() {
    let dir = Dir::new();
    let out = dir.out();
    let small = dir.array("small.npy", &[1.0, 2.0], &[2]);
    kernel(&["neg", "--in", &format!("x={small}"), "--out", &out]);
    let before = std::fs::read(dir.path("out/out.npy")).unwrap();
    // 160 kB of float64 out, past a limit of 64 blocks (32 or 64 kB, by the shell's block size).
    let large = dir.array("large.npy", &ramp(20_000, 1.0), &[20_000]);
    let output = Command::new("sh")
        .args(["-c", "trap '' XFSZ; ulimit -f 64; exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_metaseg"))
        .args(["kernel", "--backend", "cpu64", "neg", "--out", &out])
        .arg(format!("--in=x={large}"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("out.npy"), "{stderr}");
    assert_eq!(std::fs::read(dir.path("out/out.npy")).unwrap(), before);
    let left: Vec<_> = std::fs::read_dir(dir.path("out")).unwrap().collect();
    assert_eq!(left.len(), 1, "{left:?}");
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

// ---- metaseg evaluate and metaseg predict ----

/// Writes a uint8 label volume on an axis-aligned grid.
fn write_labels(path: &Path, labels: &[u8], dims: [usize; 3], spacing: [f64; 3]) {
    use metaseg::data::{nifti, Volume};
    let data = labels.iter().map(|&v| f32::from(v)).collect();
    let volume = Volume::new(data, dims, spacing).unwrap();
    nifti::write(path, &volume, metaseg::data::Dtype::U8).unwrap();
}

/// Seeded labels 0 to `classes` - 1; class `absent`, if given, replaced by 0.
fn seeded_labels(n: usize, seed: u64, classes: u8, absent: Option<u8>) -> Vec<u8> {
    metaseg_autograd::check::seeded(n, seed, 0.0, f64::from(classes))
        .into_iter()
        .map(|u| u as u8)
        .map(|v| if Some(v) == absent { 0 } else { v })
        .collect()
}

/// Runs metaseg expecting success; returns stdout.
fn metaseg_ok(args: &[&str]) -> String {
    let output = metaseg(args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "metaseg {args:?} failed: {stderr}");
    String::from_utf8(output.stdout).unwrap()
}

/// Runs metaseg expecting exit code 1 with a one-line message holding each of `expected`.
fn metaseg_fails(args: &[&str], expected: &[&str]) {
    let output = metaseg(args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr}");
    for e in expected {
        assert!(stderr.contains(e), "{stderr:?} does not contain {e:?}");
    }
}

/// Runs `train` expecting exit code 1 with an error line (after the adapter's and the run's
/// progress lines) holding each of `expected`.
fn train_fails(args: &[&str], expected: &[&str]) {
    let output = metaseg(args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "stderr: {stderr}");
    let error = stderr.lines().last().unwrap_or_default();
    assert!(error.starts_with("error: "), "{stderr}");
    for e in expected {
        assert!(error.contains(e), "{stderr:?} does not contain {e:?}");
    }
}

/// Two cases in pred/ and labels/: case_a with classes 1 and 2 in both; case_b whose prediction
/// has no class 2 (an empty prediction for that class). Returns the label arrays by case.
fn evaluation_folders(dir: &Dir) -> Vec<(String, Vec<u8>, Vec<u8>)> {
    let (dims, spacing) = ([5, 7, 9], [2.5, 0.7, 1.3]);
    std::fs::create_dir_all(dir.path("pred")).unwrap();
    std::fs::create_dir_all(dir.path("labels")).unwrap();
    let cases = vec![
        (
            "case_a".to_string(),
            seeded_labels(315, 1, 3, None),
            seeded_labels(315, 2, 3, None),
        ),
        (
            "case_b".to_string(),
            seeded_labels(315, 3, 3, Some(2)),
            seeded_labels(315, 4, 3, None),
        ),
    ];
    for (case, pred, label) in &cases {
        let name = format!("{case}.nii.gz");
        write_labels(&dir.path("pred").join(&name), pred, dims, spacing);
        write_labels(&dir.path("labels").join(&name), label, dims, spacing);
    }
    cases
}

fn json_f64(v: &serde_json::Value) -> Option<f64> {
    if v.is_null() {
        None
    } else {
        Some(v.as_f64().expect("a number or null"))
    }
}

#[test]
fn evaluate_prints_a_table_and_json_lines_with_nulls_and_means() {
    use metaseg::eval::metrics::{class_metrics, summarize, Grid};
    let dir = Dir::new();
    let cases = evaluation_folders(&dir);
    let (pred, labels) = (dir.path("pred"), dir.path("labels"));
    let (pred, labels) = (pred.to_str().unwrap(), labels.to_str().unwrap());

    let table = metaseg_ok(&["evaluate", "--pred", pred, "--label", labels]);
    assert!(table.contains("distances in mm"), "{table}");
    assert!(
        table.contains("case_a") && table.contains("case_b"),
        "{table}"
    );
    assert!(table.contains("empty prediction"), "{table}");
    assert!(table.contains("mean ± std over 2 case(s)"), "{table}");

    // The header stores the spacing as f32: the metrics use what it reads back.
    let stored = metaseg::data::nifti::read(&dir.path("labels/case_a.nii.gz"))
        .unwrap()
        .spacing;
    for (voxel_units, spacing) in [(false, stored), (true, [1.0; 3])] {
        let mut args = vec!["evaluate", "--pred", pred, "--label", labels, "--json"];
        if voxel_units {
            args.push("--voxel-units");
        }
        let out = metaseg_ok(&args);
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        // 2 cases x 2 classes, then a mean line per class.
        assert_eq!(lines.len(), 6, "{out}");
        let grid = Grid {
            dims: [5, 7, 9],
            spacing,
        };
        let mut per_class = [Vec::new(), Vec::new()];
        for (k, (case, p, l)) in cases.iter().enumerate() {
            for class in [1u8, 2] {
                let line = &lines[2 * k + usize::from(class) - 1];
                let want = class_metrics(p, l, class, grid).unwrap();
                per_class[usize::from(class) - 1].push(want);
                assert_eq!(line["case"], case.as_str());
                assert_eq!(line["class"], class);
                for (name, value) in ["dice", "jaccard", "hd95", "asd", "assd"]
                    .iter()
                    .zip(want.values())
                {
                    let got = json_f64(&line[*name]);
                    match (got, value) {
                        (Some(g), Some(w)) => assert!((g - w).abs() <= 1e-12 * (1.0 + w)),
                        (None, None) => {}
                        _ => panic!("{case} class {class} {name}: {got:?} vs {value:?}"),
                    }
                }
            }
        }
        // case_b has no class 2 in its prediction: distances null (present, not missing).
        let empty = &lines[3];
        assert_eq!(empty["pred_voxels"], 0);
        for name in ["hd95", "asd", "assd"] {
            assert!(empty.get(name).is_some_and(|v| v.is_null()), "{empty}");
        }
        assert_eq!(empty["dice"], 0.0);
        for class in [1u8, 2] {
            let mean = &lines[4 + usize::from(class) - 1];
            assert_eq!(mean["case"], "mean");
            assert_eq!(mean["class"], class);
            let stats = summarize(&per_class[usize::from(class) - 1]);
            for (name, s) in ["dice", "jaccard", "hd95", "asd", "assd"].iter().zip(stats) {
                let got = json_f64(&mean[*name]).unwrap();
                assert!(
                    (got - s.mean.unwrap()).abs() <= 1e-12 * (1.0 + got),
                    "{name}"
                );
                assert_eq!(mean["n"][*name], s.defined);
            }
        }
        // Class 2's distances are over case_a only.
        assert_eq!(lines[5]["n"]["hd95"], 1);
        assert_eq!(lines[5]["n"]["dice"], 2);
    }

    // One pair of files, one class asked for.
    let one = metaseg_ok(&[
        "evaluate",
        "--pred",
        &format!("{pred}/case_a.nii.gz"),
        "--label",
        &format!("{labels}/case_a.nii.gz"),
        "--json",
        "--classes",
        "2",
    ]);
    let classes: Vec<u64> = one
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["class"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(classes, vec![2, 2]);
}

/// ASSD as medpy 0.5 computes it, the mean over both directed surface-distance sets together,
/// checked end to end on a case derived by hand (tests/metrics.rs, concentric cubes): prediction
/// [3, 7)^3 inside reference [2, 8)^3 in a 12^3 grid of spacing 0.8. Its surfaces have 56 and 152
/// voxels; the distances are 56 + 96 of one step, 48 of sqrt(2) and 8 of sqrt(3) steps, so
/// assd = (152 + 48 sqrt(2) + 8 sqrt(3)) 0.8 / 208 (medpy 0.5.2: 0.8989948363633062), while the
/// mean of the two directed means (what evaluate returned before) is 0.8677.
#[test]
fn evaluate_gives_medpys_assd_on_a_case_derived_by_hand() {
    let dir = Dir::new();
    let dims = [12; 3];
    let cube = |lo: usize, hi: usize| -> Vec<u8> {
        (0..1728)
            .map(|i| [i / 144, i / 12 % 12, i % 12])
            .map(|c| u8::from(c.iter().all(|&v| v >= lo && v < hi)))
            .collect()
    };
    let (pred, label) = (dir.path("pred.nii.gz"), dir.path("label.nii.gz"));
    write_labels(&pred, &cube(3, 7), dims, [0.8; 3]);
    write_labels(&label, &cube(2, 8), dims, [0.8; 3]);
    let out = metaseg_ok(&[
        "evaluate",
        "--pred",
        pred.to_str().unwrap(),
        "--label",
        label.to_str().unwrap(),
        "--json",
    ]);
    let line: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    let assd = json_f64(&line["assd"]).unwrap();
    let (r2, r3) = (2f64.sqrt(), 3f64.sqrt());
    let pooled = (152.0 + 48.0 * r2 + 8.0 * r3) * 0.8 / 208.0;
    assert!(
        (assd - pooled).abs() <= 1e-4 * pooled,
        "assd {assd}, medpy {pooled}"
    );
}

#[test]
fn evaluate_refuses_mismatched_grids_unpaired_cases_and_non_labels() {
    let dir = Dir::new();
    evaluation_folders(&dir);
    let path = |name: &str| dir.path(name).to_str().unwrap().to_string();
    write_labels(
        &dir.path("small.nii.gz"),
        &[0; 60],
        [3, 4, 5],
        [2.5, 0.7, 1.3],
    );
    let a = path("labels/case_a.nii.gz");
    metaseg_fails(
        &["evaluate", "--pred", &path("small.nii.gz"), "--label", &a],
        &[
            "small.nii.gz",
            "case_a.nii.gz",
            "not on the same grid",
            "[3, 4, 5]",
            "[5, 7, 9]",
        ],
    );
    write_labels(
        &dir.path("spaced.nii.gz"),
        &[0; 315],
        [5, 7, 9],
        [2.5, 0.7, 1.0],
    );
    metaseg_fails(
        &["evaluate", "--pred", &path("spaced.nii.gz"), "--label", &a],
        &["spaced.nii.gz", "case_a.nii.gz", "spacing"],
    );

    // A prediction without a label and a label without a prediction, both listed.
    std::fs::rename(
        dir.path("pred/case_b.nii.gz"),
        dir.path("pred/case_c.nii.gz"),
    )
    .unwrap();
    metaseg_fails(
        &[
            "evaluate",
            "--pred",
            &path("pred"),
            "--label",
            &path("labels"),
        ],
        &[
            "unpaired",
            "without a label",
            "case_c",
            "without a prediction",
            "case_b",
        ],
    );
    metaseg_fails(
        &["evaluate", "--pred", &path("pred"), "--label", &a],
        &["both be files or both be folders"],
    );

    // Nothing to evaluate is said, not printed as an empty table.
    write_labels(
        &dir.path("zeros.nii.gz"),
        &[0; 315],
        [5, 7, 9],
        [2.5, 0.7, 1.3],
    );
    let zeros = path("zeros.nii.gz");
    metaseg_fails(
        &["evaluate", "--pred", &zeros, "--label", &zeros],
        &["no foreground class", "--classes"],
    );

    // Probabilities are not labels.
    let volume = metaseg::data::Volume::new(vec![0.5; 315], [5, 7, 9], [2.5, 0.7, 1.3]).unwrap();
    let probs = dir.path("probs.nii");
    metaseg::data::nifti::write(&probs, &volume, metaseg::data::Dtype::F32).unwrap();
    metaseg_fails(
        &["evaluate", "--pred", probs.to_str().unwrap(), "--label", &a],
        &["probs.nii", "value 0.5", "not a class index"],
    );
}

/// An image with an oblique, offset geometry (sform and qform), anisotropic spacing and sizes
/// that are not multiples of the patch.
fn oblique_image(path: &Path, dims: [usize; 3], seed: u64) -> metaseg::data::Volume {
    let n = dims.iter().product();
    let data = metaseg_autograd::check::seeded(n, seed, 20.0, 180.0)
        .into_iter()
        .map(|v| v as f32)
        .collect();
    let mut volume = metaseg::data::Volume::new(data, dims, [2.0, 0.9, 1.1]).unwrap();
    let h = &mut volume.header;
    h.srow_x = [0.0, 0.9, 0.0, -30.5];
    h.srow_y = [-1.1, 0.0, 0.0, 12.25];
    h.srow_z = [0.0, 0.0, 2.0, 5.5];
    h.quatern_d = std::f32::consts::FRAC_1_SQRT_2;
    h.quatern_x = -30.5;
    h.quatern_y = 12.25;
    h.quatern_z = 5.5;
    metaseg::data::nifti::write(path, &volume, metaseg::data::Dtype::I16).unwrap();
    metaseg::data::nifti::read(path).unwrap()
}

/// Files (recursively) under `dir`.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

#[test]
fn predict_writes_labels_on_the_inputs_grid_from_a_trained_run() {
    let dir = Dir::new();
    let run = dir.path("run");
    let run_s = run.to_str().unwrap();
    let args = train_args(run_s, &["--method", "supervised"]);
    metaseg_ok(&args);
    // Its pictures: the curves, and the overlay of its one test case.
    assert!(run.join("loss.png").is_file());
    let overlays = files_under(&run.join("overlays"));
    let names: Vec<&str> = overlays
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap())
        .collect();
    // The one test case is the last of TINY_TRAINING's 4.
    assert_eq!(names, [metaseg::data::synthetic::case_name(3) + ".png"]);

    std::fs::create_dir_all(dir.path("images")).unwrap();
    let inputs = [
        oblique_image(&dir.path("images/one.nii.gz"), [9, 13, 11], 1),
        oblique_image(&dir.path("images/two.nii"), [5, 8, 7], 2),
    ];
    let images = dir.path("images");
    let before = files_under(dir.0.path());

    // An output folder under a regular file: refused before any work, nothing written.
    std::fs::write(dir.path("a_file"), b"x").unwrap();
    let blocked = dir.path("a_file/predictions");
    let stem = run.join("checkpoint");
    metaseg_fails(
        &[
            "predict",
            "--checkpoint",
            stem.to_str().unwrap(),
            "--input",
            images.to_str().unwrap(),
            "--output",
            blocked.to_str().unwrap(),
            "--quiet",
        ],
        &["cannot write predictions to", "a_file"],
    );
    let mut expected = before.clone();
    expected.push(dir.path("a_file"));
    expected.sort();
    assert_eq!(files_under(dir.0.path()), expected);

    let out = dir.path("predictions");
    let stdout = metaseg_ok(&[
        "predict",
        "--checkpoint",
        run_s,
        "--input",
        images.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--probabilities",
        "--quiet",
    ]);
    assert!(stdout.contains("wrote 2 label volume(s)"), "{stdout}");
    for (name, input) in ["one.nii.gz", "two.nii"].iter().zip(&inputs) {
        let labels = metaseg::data::nifti::read(&out.join(name)).unwrap();
        assert_eq!(labels.header.datatype, 2, "{name}: uint8");
        assert_eq!((labels.dims, labels.channels), (input.dims, 1), "{name}");
        assert_eq!(labels.spacing, input.spacing, "{name}");
        assert_eq!(labels.affine(), input.affine(), "{name}");
        let (h, i) = (&labels.header, &input.header);
        assert_eq!(
            (h.sform_code, h.qform_code, h.quatern_d, h.quatern_x),
            (i.sform_code, i.qform_code, i.quatern_d, i.quatern_x),
            "{name}"
        );
        assert!(labels.data.iter().all(|&v| v == 0.0 || v == 1.0), "{name}");
        // The labels are the argmax of the probabilities written beside them.
        let probs = metaseg::data::nifti::read(&out.join("probabilities").join(name)).unwrap();
        assert_eq!((probs.channels, probs.dims), (2, input.dims));
        let n = input.voxels();
        for v in 0..n {
            let (p0, p1) = (probs.data[v], probs.data[n + v]);
            assert!(
                (p0 + p1 - 1.0).abs() < 1e-5,
                "{name} voxel {v}: {p0} + {p1}"
            );
            assert_eq!(
                labels.data[v],
                f32::from(u8::from(p1 > p0)),
                "{name} voxel {v}"
            );
        }
    }
    predict_refuses_non_finite_inputs_and_weights(&dir, &run);
}

/// Sets element 0 of the first tensor of a safetensors file to NaN (the format: a u64 header
/// length, the JSON header with each tensor's data offsets, then the data).
fn poison_first_tensor(path: &Path) -> String {
    let mut bytes = std::fs::read(path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let (name, info) = header
        .as_object()
        .unwrap()
        .iter()
        .find(|(name, _)| *name != "__metadata__")
        .unwrap();
    let begin = 8 + header_len + info["data_offsets"][0].as_u64().unwrap() as usize;
    bytes[begin..begin + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
    name.clone()
}

/// An image with a NaN voxel and a checkpoint with a NaN weight: both refused, naming the file and
/// the voxel or tensor, and nothing written (they predicted all background, issue 25).
fn predict_refuses_non_finite_inputs_and_weights(dir: &Dir, run: &Path) {
    let image = dir.path("nan.nii.gz");
    let mut volume = oblique_image(&image, [5, 6, 7], 4);
    // (x, y, z) = (3, 2, 1): flat index (z H + y) W + x with [D, H, W] = [5, 6, 7].
    volume.data[(6 + 2) * 7 + 3] = f32::NAN;
    metaseg::data::nifti::write(&image, &volume, metaseg::data::Dtype::F32).unwrap();
    let out = dir.path("nan_out.nii.gz");
    let predict = |checkpoint: &Path, input: &Path| {
        vec![
            "predict".to_string(),
            "--checkpoint".into(),
            checkpoint.to_str().unwrap().into(),
            "--input".into(),
            input.to_str().unwrap().into(),
            "--output".into(),
            out.to_str().unwrap().into(),
            "--quiet".into(),
        ]
    };
    let args = predict(run, &image);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    metaseg_fails(&args, &["nan.nii.gz", "(x, y, z) = (3, 2, 1) is NaN"]);
    assert!(!out.exists());

    let poisoned = dir.path("poisoned");
    std::fs::create_dir_all(&poisoned).unwrap();
    for file in ["checkpoint.safetensors", "checkpoint.json"] {
        std::fs::copy(run.join(file), poisoned.join(file)).unwrap();
    }
    let tensor = poison_first_tensor(&poisoned.join("checkpoint.safetensors"));
    let clean = dir.path("images/two.nii");
    let args = predict(&poisoned, &clean);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let expected = format!("tensor '{tensor}' holds NaN at element 0");
    metaseg_fails(&args, &["poisoned/checkpoint.safetensors", &expected]);
    assert!(!out.exists());
}

#[test]
fn predict_says_where_it_looked_for_a_missing_checkpoint() {
    let dir = Dir::new();
    let image = dir.path("image.nii.gz");
    oblique_image(&image, [3, 4, 5], 3);
    let missing = dir.path("no_run");
    std::fs::create_dir_all(&missing).unwrap();
    metaseg_fails(
        &[
            "predict",
            "--checkpoint",
            missing.to_str().unwrap(),
            "--input",
            image.to_str().unwrap(),
            "--output",
            dir.path("out.nii.gz").to_str().unwrap(),
        ],
        &[
            "no checkpoint at",
            "no_run/checkpoint.safetensors",
            "no_run/checkpoint.json",
        ],
    );
    assert!(!dir.path("out.nii.gz").exists());
}

/// The smallest training configuration: 2 iterations of a 2-level V-Net of width 2 on 8^3 patches.
const TINY_TRAINING: [&str; 10] = [
    "iterations=2",
    "data.cases=4",
    "data.size=[16, 16, 16]",
    "data.labeled=1",
    "data.test=1",
    "network.base_width=2",
    "network.levels=2",
    "batch.patch=[8, 8, 8]",
    "batch.labeled=1",
    "batch.unlabeled=1",
];

fn train_args<'a>(out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    // One --set for every key, as a user would write it; `extra` may add more --set flags.
    let mut args = vec!["train", "--quiet", "--out", out, "--set"];
    args.extend(TINY_TRAINING);
    args.extend(extra);
    args
}

#[test]
fn train_profile_splits_an_mlb_seg_iteration_into_its_passes_and_no_other_method() {
    let dir = Dir::new();
    let (mlb, sup) = (dir.path("mlb"), dir.path("sup"));
    let mut args = train_args(mlb.to_str().unwrap(), &["mlb_seg.stage0_iterations=1"]);
    args.extend(["--method", "mlb-seg", "--profile", "1"]);
    let stdout = metaseg_ok(&args);
    for line in [
        "1 profiled steps, kernels timed by",
        "An MLB-Seg iteration by its parts",
        "teacher over the K U views",
        "costs in forward mode (meta-gradient)",
        "the iteration / the sum of its passes",
        "the passes alone:",
    ] {
        assert!(stdout.contains(line), "{line:?} missing from\n{stdout}");
    }
    let mut args = train_args(sup.to_str().unwrap(), &[]);
    args.extend(["--method", "supervised", "--profile", "1"]);
    let stdout = metaseg_ok(&args);
    assert!(stdout.contains("1 profiled steps"), "{stdout}");
    assert!(!stdout.contains("by its parts"), "{stdout}");
}

#[test]
fn train_without_a_method_compares_the_baselines_in_one_table() {
    let dir = Dir::new();
    let out = dir.path("cmp");
    let stdout = metaseg_ok(&train_args(out.to_str().unwrap(), &[]));
    let table = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert!(
        stdout.contains(&table),
        "the printed table is the written one"
    );
    for method in ["supervised", "mean-teacher", "full"] {
        assert!(table.contains(&format!("| {method} | 1 |")), "{table}");
        assert!(out.join(method).join("checkpoint.safetensors").is_file());
    }
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "{csv}");
    assert!(out.join("comparison.png").is_file());
    // Each method's paired difference to supervised, printed and in results.json, is its Dice
    // minus supervised's as results.csv has them.
    let dice: Vec<f64> = (csv.lines().skip(1))
        .map(|l| l.split(',').nth(2).unwrap().parse().unwrap())
        .collect();
    let text = std::fs::read_to_string(out.join("results.json")).unwrap();
    let summary: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (i, method) in [(1, "mean-teacher"), (2, "full")] {
        let entry = &summary["methods"][i];
        assert_eq!(entry["method"], method);
        let difference = dice[i] - dice[0];
        let got = entry["paired_to_supervised"]["mean"].as_f64().unwrap();
        assert!((got - difference).abs() < 1e-12, "{text}");
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("| {method} |")));
        let ahead = usize::from(difference > 0.0);
        let cell = format!("| {difference:+.3} | {ahead} of 1 |");
        assert!(row.unwrap().ends_with(&cell), "{cell} in\n{table}");
    }
}

#[test]
fn train_refuses_an_unwritable_output_and_a_method_given_as_a_setting() {
    let dir = Dir::new();
    let file = dir.path("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let under_file = file.join("run");
    metaseg_fails(
        &train_args(under_file.to_str().unwrap(), &["--method", "full"]),
        &["--out", "cannot write there"],
    );
    let out = dir.path("run");
    metaseg_fails(
        &train_args(out.to_str().unwrap(), &["--set", "method=full"]),
        &["--method"],
    );
    assert!(
        !out.exists(),
        "nothing is written before the arguments are checked"
    );
}

#[test]
fn train_on_a_folder_with_a_mismatched_label_names_the_file_and_writes_no_checkpoint() {
    let dir = Dir::new();
    let data = dir.path("msd");
    metaseg_ok(&[
        "dataset",
        "default",
        "--out",
        data.to_str().unwrap(),
        "--cases",
        "3",
        "--size",
        "16,16,16",
        "--labeled",
        "1",
        "--test",
        "1",
    ]);
    let label = data.join("labelsTr/synth_000.nii.gz");
    let small = metaseg::data::Volume::new(vec![0.0; 8], [2, 2, 2], [1.0; 3]).unwrap();
    metaseg::data::nifti::write(&label, &small, metaseg::data::nifti::Dtype::U8).unwrap();
    let out = dir.path("run");
    let out_s = out.to_str().unwrap();
    let data_s = data.to_str().unwrap();
    let output = metaseg(&train_args(
        out_s,
        &["--method", "supervised", "--data", data_s],
    ));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    // Progress lines come first; the error is the last line.
    let last = stderr.lines().last().unwrap();
    assert!(last.contains("labelsTr/synth_000.nii.gz"), "{stderr}");
    // Issue 25, item 5: no empty run directory is left behind, but one the user made stays.
    assert!(!out.exists(), "the failed train left {}", out.display());
    std::fs::create_dir(&out).unwrap();
    let output = metaseg(&train_args(
        out_s,
        &["--method", "supervised", "--data", data_s],
    ));
    assert_eq!(output.status.code(), Some(1));
    assert!(out.is_dir(), "a directory the train did not create is kept");
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0);
}

/// Issue 25, item 5: a run that fails in its first step (a patch too large for the device) takes
/// back the configuration and empty log it wrote, and the directory the train created.
#[test]
fn train_failing_in_its_first_step_leaves_nothing_behind() {
    let dir = Dir::new();
    let out = dir.path("run");
    let output = metaseg(&train_args(
        out.to_str().unwrap(),
        &[
            "--method",
            "supervised",
            "--set",
            "batch.patch=[512, 512, 512]",
        ],
    ));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("at most"), "{stderr}");
    assert!(!out.exists(), "left {:?}", files_under(&out));
}

/// Issue 25, item 5 and 7: `iterations=0` and `--stop-after 0` are refused, naming the setting,
/// before anything is written.
#[test]
fn train_refuses_zero_iterations_and_stop_after_zero() {
    let dir = Dir::new();
    let out = dir.path("run");
    let out_s = out.to_str().unwrap();
    metaseg_fails(
        &train_args(out_s, &["--method", "supervised", "--set", "iterations=0"]),
        &["iterations must be at least 1"],
    );
    metaseg_fails(
        &train_args(out_s, &["--method", "supervised", "--stop-after", "0"]),
        &["--stop-after"],
    );
    assert!(!out.exists(), "nothing is written");
}

/// Issue 25, item 7: `--stop-after N` counts a first stage's iterations first, as `--help` says:
/// an N inside online-pl's 2-iteration first stage stops there (the test Dice is then not
/// measured, though there is a test case), and an N beyond the run's 2 + 3 iterations resumes it
/// to its end.
#[test]
fn train_stop_after_counts_the_first_stage_and_runs_to_the_end_beyond_it() {
    let dir = Dir::new();
    let out = dir.path("run");
    let out_s = out.to_str().unwrap();
    let sets = [
        "--method",
        "online-pl",
        "--set",
        "iterations=3",
        "online_pl.stage1_iterations=2",
        "data.cases=6",
        "data.labeled=2",
        "network.base_width=4",
    ];
    let stdout = metaseg_ok(&[train_args(out_s, &sets), vec!["--stop-after", "1"]].concat());
    assert!(stdout.contains("test Dice not measured"), "{stdout}");
    assert!(out.join("stage1/checkpoint.json").is_file());
    assert!(!out.join("checkpoint.json").exists());
    metaseg_ok(
        &[
            train_args(out_s, &sets),
            vec!["--resume", "--stop-after", "100"],
        ]
        .concat(),
    );
    let log = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 3, "{log}");
    assert!(out.join("checkpoint.json").is_file());
}

/// Issue 25, item 2: the NaN guard's advice can be followed. A sound run stopped at step 4 and
/// resumed at optimizer.lr=1e30 diverges and stops, keeping step 4's checkpoint; a resume that
/// would change anything but the run's length, learning rates or clipping is refused naming the
/// key, and one whose checkpoint is already at --stop-after says so; `--resume --set
/// optimizer.lr=0.005` (its other settings from the run's own config.toml) continues with finite
/// losses, recording the change against the checkpoint (0.01 -> 0.005; the abandoned 1e30
/// attempt's record is dropped) in log.jsonl and config.toml, whose values are the new ones, so a
/// later `--resume` without flags keeps them to the end.
#[test]
fn a_diverged_run_resumes_with_a_lower_learning_rate_to_its_end() {
    let dir = Dir::new();
    let out = dir.path("run");
    let out_s = out.to_str().unwrap();
    // A sound run stopped at step 4 (checkpoints every 2), resumed at lr=1e30: it diverges within
    // two steps, and the checkpoint the guard keeps is step 4's, written before the change.
    let sets = [
        "iterations=8",
        "log.checkpoint_every=2",
        "optimizer.lr=0.01",
    ];
    let sound = [
        train_args(out_s, &["--method", "supervised", "--set"]),
        sets.to_vec(),
        vec!["--stop-after", "4"],
    ]
    .concat();
    metaseg_ok(&sound);
    let kept = 4;
    let diverging = resume(out_s, &["--set", "optimizer.lr=1e30"]);
    let output = metaseg(&diverging);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("; stopped"), "{stderr}");
    assert!(
        stderr.contains(&format!("step {kept}) is kept")),
        "{stderr}"
    );

    fn resume<'a>(out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let base = [
            "train",
            "--quiet",
            "--out",
            out,
            "--method",
            "supervised",
            "--resume",
        ];
        [base.as_slice(), extra].concat()
    }
    train_fails(
        &resume(
            out_s,
            &["--set", "optimizer.lr=0.01", "optimizer.momentum=0.5"],
        ),
        &[
            "optimizer.momentum (0.9 there, 0.5 now)",
            "may change on resume",
        ],
    );
    let at = kept.to_string();
    train_fails(
        &resume(out_s, &["--stop-after", &at]),
        &[&format!("already at iteration {kept}")],
    );
    let two_more = (kept + 2).to_string();
    metaseg_ok(&resume(
        out_s,
        &["--set", "optimizer.lr=0.005", "--stop-after", &two_more],
    ));
    metaseg_ok(&resume(out_s, &[]));

    let log = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let events: Vec<&serde_json::Value> = lines.iter().filter(|l| l["event"].is_string()).collect();
    let expected = serde_json::json!({
        "event": "resume",
        "step": kept,
        "changed": {"optimizer.lr": {"old": 0.01, "new": 0.005}},
    });
    assert_eq!(events, [&expected], "{log}");
    let steps: Vec<u64> = lines
        .iter()
        .filter(|l| l["event"].is_null())
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=8).collect::<Vec<_>>(), "{log}");
    for line in lines.iter().filter(|l| l["step"].as_u64() > Some(kept)) {
        assert!(line["event"].is_string() || line["loss"].is_f64(), "{log}");
        assert!(line["loss"].as_f64().is_none_or(f64::is_finite), "{log}");
    }
    let config = std::fs::read_to_string(out.join("config.toml")).unwrap();
    let history = format!("# resumed at step {kept} with optimizer.lr 0.01 -> 0.005\n");
    assert!(config.starts_with(&history), "{config}");
    let now =
        metaseg::train::config::TrainConfig::load(out.join("config.toml").to_str().unwrap(), &[]);
    assert_eq!(now.unwrap().optimizer.lr, 0.005);
}
