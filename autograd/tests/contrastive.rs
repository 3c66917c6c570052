//! The contrastive family on the reference backend: the local contrastive loss and dense InfoNCE
//! against brute-force f64 loops written per anchor, class and location (not as the matmuls of
//! the implementation), with odd sizes and classes absent from one image of a pair; gradients
//! against central finite differences (and, for the local loss, its Hessian-vector product);
//! closed forms for orthonormal embeddings; the typed error of InfoNCE's first-order-only
//! backward; the anchor sampler; errors for bad shapes.

use metaseg_autograd::check::{
    analytic_gradient, assert_gradients, numeric_gradient, one_hot, seeded,
};
use metaseg_autograd::contrastive::sample_anchors;
use metaseg_autograd::{grad, Cpu64, Error, Shape, Tolerance, Var};

fn var(values: &[f64], shape: &Shape) -> Var<Cpu64> {
    Var::from_f64(&Cpu64, values, shape, false).unwrap()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn normalized(v: Vec<f64>) -> Vec<f64> {
    let norm = dot(&v, &v).sqrt();
    v.into_iter().map(|x| x / norm).collect()
}

/// The embedding of voxel v of image x in [N, E, S] data, normalised.
fn embedding(data: &[f64], e: usize, s: usize, x: usize, v: usize) -> Vec<f64> {
    normalized((0..e).map(|ch| data[(x * e + ch) * s + v]).collect())
}

/// One-hot labels [N, C, S] drawn per image, image x never using class `absent[x]`.
fn labels(c: usize, s: usize, absent: &[Option<usize>], seed: u64) -> Vec<f64> {
    absent
        .iter()
        .enumerate()
        .flat_map(|(x, &empty)| one_hot(&Shape::from([1, c, s]), seed + x as u64, empty))
        .collect()
}

struct Batch {
    emb: Vec<f64>,
    labels: Vec<f64>,
    n: usize,
    e: usize,
    c: usize,
    spatial: Vec<usize>,
}

impl Batch {
    fn new(e: usize, c: usize, spatial: &[usize], absent: &[Option<usize>], seed: u64) -> Batch {
        let n = absent.len();
        let s: usize = spatial.iter().product();
        Batch {
            emb: seeded(n * e * s, seed, -1.0, 1.0),
            labels: labels(c, s, absent, seed + 100),
            n,
            e,
            c,
            spatial: spatial.to_vec(),
        }
    }

    fn s(&self) -> usize {
        self.spatial.iter().product()
    }

    fn shape(&self, channels: usize) -> Shape {
        let mut dims = vec![self.n, channels];
        dims.extend(&self.spatial);
        Shape(dims)
    }

    fn loss(&self, anchors: Option<&[f64]>, tau: f64) -> f64 {
        let anchors = anchors.map(|a| var(a, &self.shape(1)));
        var(&self.emb, &self.shape(self.e))
            .local_contrastive(
                &var(&self.labels, &self.shape(self.c)),
                anchors.as_ref(),
                tau,
            )
            .unwrap()
            .item()
            .unwrap()
    }

    fn anchors(&self, per_class: usize, seed: u64) -> Vec<f64> {
        sample_anchors(&self.labels, &self.shape(self.c), per_class, seed).unwrap()
    }

    /// The loss by its definition: for every pair, every anchor of a foreground class, every
    /// positive mean of that class present in either image, -log(exp(cos+ / tau) / sum over the
    /// present foreground means of both images of exp(cos / tau)); the mean over all such terms.
    fn reference(&self, anchors: Option<&[f64]>, tau: f64) -> f64 {
        let (e, c, s) = (self.e, self.c, self.s());
        let class_of =
            |x: usize, v: usize| (0..c).find(|&k| self.labels[(x * c + k) * s + v] == 1.0);
        let mean = |x: usize, k: usize| -> Option<Vec<f64>> {
            let members: Vec<usize> = (0..s).filter(|&v| class_of(x, v) == Some(k)).collect();
            if members.is_empty() {
                return None;
            }
            let sum = (0..e)
                .map(|ch| {
                    members
                        .iter()
                        .map(|&v| embedding(&self.emb, e, s, x, v)[ch])
                        .sum()
                })
                .collect();
            Some(normalized(sum))
        };
        let (mut total, mut count) = (0.0, 0usize);
        for p in 0..self.n / 2 {
            let images = [2 * p, 2 * p + 1];
            let means: Vec<Vec<f64>> = images
                .iter()
                .flat_map(|&x| (1..c).filter_map(move |k| mean(x, k)))
                .collect();
            for x in images {
                for v in 0..s {
                    if anchors.is_some_and(|a| a[x * s + v] == 0.0) {
                        continue;
                    }
                    let Some(k) = class_of(x, v).filter(|&k| k > 0) else {
                        continue;
                    };
                    let z = embedding(&self.emb, e, s, x, v);
                    let den: f64 = means.iter().map(|m| (dot(&z, m) / tau).exp()).sum();
                    for y in images {
                        if let Some(m) = mean(y, k) {
                            total -= ((dot(&z, &m) / tau).exp() / den).ln();
                            count += 1;
                        }
                    }
                }
            }
        }
        if count == 0 {
            0.0
        } else {
            total / count as f64
        }
    }
}

#[test]
fn local_contrastive_matches_the_definition_with_absent_classes() {
    let batches = [
        // Pair (0, 1): class 2 absent from image 1; pair (2, 3): class 3 from 2, class 1 from 3.
        Batch::new(3, 4, &[1, 3, 5], &[None, Some(2), Some(3), Some(1)], 1),
        Batch::new(5, 3, &[3, 1, 7], &[Some(1), None], 2),
        Batch::new(7, 5, &[2, 3, 3], &[None, None], 3),
    ];
    for b in &batches {
        let sampled = b.anchors(3, 9);
        for tau in [0.1, 0.5] {
            for anchors in [None, Some(&sampled[..])] {
                let what = format!(
                    "local_contrastive C={} tau={tau} anchors={}",
                    b.c,
                    anchors.is_some()
                );
                let value = b.loss(anchors, tau);
                Tolerance::F64.assert(&what, &[value], &[b.reference(anchors, tau)]);
                assert!(value > 0.0, "{what}: {value}");
            }
        }
    }
}

#[test]
fn local_contrastive_of_orthonormal_class_embeddings_has_a_closed_form() {
    // Every voxel of class k embeds as a positive multiple of the basis vector e_k, so z_v = mu_k
    // in both images: cos = 1 to both means of its own class, 0 to every other mean. With F
    // foreground classes present in both images, each anchor's denominator holds 2 e^{1/tau}
    // (its class, twice) and 2 (F - 1) e^0, and every term is -log(e^{1/tau} / that).
    let (c, s, tau) = (4, 12, 0.2);
    let classes: Vec<usize> = (0..2 * s).map(|i| i % c).collect();
    let mut emb = vec![0.0; 2 * c * s];
    let mut y = vec![0.0; 2 * c * s];
    for (i, &k) in classes.iter().enumerate() {
        let (x, v) = (i / s, i % s);
        emb[(x * c + k) * s + v] = 0.5 + seeded(1, i as u64, 0.0, 1.0)[0];
        y[(x * c + k) * s + v] = 1.0;
    }
    let shape = Shape::from([2, c, 1, 3, 4]);
    let loss = var(&emb, &shape)
        .local_contrastive(&var(&y, &shape), None, tau)
        .unwrap()
        .item()
        .unwrap();
    let f = (c - 1) as f64;
    let p = (1.0 / tau).exp();
    let expected = -(p / (2.0 * p + 2.0 * (f - 1.0))).ln();
    Tolerance::F64.assert("orthonormal classes", &[loss], &[expected]);
}

#[test]
fn local_contrastive_without_foreground_anchors_is_zero_and_such_pairs_add_nothing() {
    let b = Batch::new(3, 3, &[1, 2, 5], &[None, Some(2)], 4);
    let s = b.s();
    let zero_anchors = vec![0.0; 2 * s];
    assert_eq!(b.loss(Some(&zero_anchors), 0.1), 0.0);
    let background = Batch {
        // Every voxel of both images is background (class 0).
        labels: (0..2 * 3)
            .flat_map(|row| vec![f64::from(u8::from(row % 3 == 0)); s])
            .collect(),
        ..Batch::new(3, 3, &[1, 2, 5], &[None, None], 4)
    };
    assert_eq!(background.loss(None, 0.1), 0.0);
    // Only the background class: no foreground term anywhere.
    let single = Batch::new(3, 1, &[1, 2, 5], &[None, None], 6);
    assert_eq!(single.loss(None, 0.1), 0.0);
    // A second pair without foreground leaves the mean over the first pair's terms unchanged.
    let joined = Batch {
        emb: [b.emb.clone(), background.emb.clone()].concat(),
        labels: [b.labels.clone(), background.labels.clone()].concat(),
        n: 4,
        ..Batch::new(3, 3, &[1, 2, 5], &[None; 4], 4)
    };
    Tolerance::F64.assert("joined", &[joined.loss(None, 0.1)], &[b.loss(None, 0.1)]);
}

#[test]
fn local_contrastive_gradients_first_and_second_order() {
    let b = Batch::new(3, 3, &[1, 2, 3], &[None, Some(2)], 7);
    let anchors = b.anchors(2, 3);
    let (y, a) = (var(&b.labels, &b.shape(3)), var(&anchors, &b.shape(1)));
    for tau in [0.1, 0.5] {
        let f = |xs: &[Var<Cpu64>]| xs[0].local_contrastive(&y, Some(&a), tau);
        let inputs = [(b.emb.clone(), b.shape(b.e))];
        let direction = vec![seeded(b.emb.len(), 8, -1.0, 1.0)];
        assert_gradients(
            &format!("local_contrastive tau={tau}"),
            &f,
            &inputs,
            &[1.0],
            &direction,
            Tolerance::FINITE_DIFFERENCE,
        );
    }
}

#[test]
fn local_contrastive_rejects_bad_shapes_and_temperatures() {
    let b = Batch::new(3, 3, &[1, 2, 3], &[None, None], 9);
    let emb = var(&b.emb, &b.shape(3));
    let y = var(&b.labels, &b.shape(3));
    let message = |r: metaseg_autograd::Result<Var<Cpu64>>| r.err().expect("an error").to_string();
    let odd = var(&b.emb[..b.emb.len() / 2], &Shape::from([1, 3, 1, 2, 3]));
    let odd_y = var(
        &b.labels[..b.labels.len() / 2],
        &Shape::from([1, 3, 1, 2, 3]),
    );
    let m = message(odd.local_contrastive(&odd_y, None, 0.1));
    assert!(m.contains("local_contrastive") && m.contains("even"), "{m}");
    let other = var(&b.labels, &Shape::from([2, 3, 1, 3, 2]));
    let m = message(emb.local_contrastive(&other, None, 0.1));
    assert!(
        m.contains("local_contrastive") && m.contains("[2, 3, 1, 3, 2]"),
        "{m}"
    );
    let two = var(&[1.0; 24], &Shape::from([2, 2, 1, 2, 3]));
    let m = message(emb.local_contrastive(&y, Some(&two), 0.1));
    assert!(m.contains("anchors"), "{m}");
    let m = message(emb.local_contrastive(&y, None, 0.0));
    assert!(m.contains("tau"), "{m}");
}

#[test]
fn sampled_anchors_are_distinct_voxels_of_each_present_class_and_repeat_with_the_seed() {
    let b = Batch::new(2, 4, &[2, 3, 5], &[None, Some(3), Some(1), None], 10);
    let (c, s) = (b.c, b.s());
    // A class with fewer voxels than asked for: image 0 gets just 2 voxels of class 2.
    let mut labels = b.labels.clone();
    let mut kept = 0;
    for v in 0..s {
        if labels[2 * s + v] == 1.0 {
            kept += 1;
            if kept > 2 {
                labels[2 * s + v] = 0.0;
                labels[v] = 1.0;
            }
        }
    }
    let shape = b.shape(c);
    let mask = sample_anchors(&labels, &shape, 3, 21).unwrap();
    assert_eq!(mask, sample_anchors(&labels, &shape, 3, 21).unwrap());
    assert_ne!(mask, sample_anchors(&labels, &shape, 3, 22).unwrap());
    for x in 0..b.n {
        for k in 0..c {
            let members = (0..s)
                .filter(|&v| labels[(x * c + k) * s + v] == 1.0)
                .count();
            let chosen = (0..s)
                .filter(|&v| mask[x * s + v] == 1.0 && labels[(x * c + k) * s + v] == 1.0)
                .count();
            let expected = if k == 0 { 0 } else { members.min(3) };
            assert_eq!(chosen, expected, "image {x} class {k} of {members} voxels");
        }
    }
    assert!(mask.iter().all(|&m| m == 0.0 || m == 1.0));
    // As an op it is a constant of its labels: asking for a gradient is a typed error.
    let y = Var::from_f64(&Cpu64, &labels, &shape, true).unwrap();
    let anchors = y.sample_anchors(3, 21).unwrap();
    assert_eq!(anchors.to_f64().unwrap(), mask);
    assert!(matches!(
        grad(&anchors.sum().unwrap(), &[&y], None, false),
        Err(Error::NoGradient {
            op: "sample_anchors"
        })
    ));
}

/// The draw is uniform without replacement: over 3000 seeds, each of a class's 10 voxels is among
/// the 3 anchors 3 / 10 of the time (binomial standard deviation 0.008; the bound is 5 of them),
/// and every draw holds exactly 3 of them.
#[test]
fn sampled_anchors_are_uniform_over_the_class() {
    let s = 16;
    // One image, 2 classes: voxels 3..13 are foreground.
    let mut labels = vec![0.0; 2 * s];
    for v in 0..s {
        let fg = (3..13).contains(&v);
        labels[v] = if fg { 0.0 } else { 1.0 };
        labels[s + v] = if fg { 1.0 } else { 0.0 };
    }
    let shape = Shape::from([1, 2, s]);
    let seeds = 3000;
    let mut counts = vec![0usize; s];
    for seed in 0..seeds {
        let mask = sample_anchors(&labels, &shape, 3, seed).unwrap();
        assert_eq!(mask.iter().sum::<f64>(), 3.0, "seed {seed}");
        for (v, &m) in mask.iter().enumerate() {
            counts[v] += (m == 1.0) as usize;
        }
    }
    for (v, &count) in counts.iter().enumerate() {
        let share = count as f64 / seeds as f64;
        let expected = if (3..13).contains(&v) { 0.3 } else { 0.0 };
        assert!((share - expected).abs() < 0.04, "voxel {v}: {share}");
    }
}

/// Dense InfoNCE by its definition: every location i of the batch against every location j.
fn infonce_reference(q: &[f64], k: &[f64], n: usize, e: usize, s: usize, tau: f64) -> f64 {
    let qs: Vec<Vec<f64>> = (0..n * s)
        .map(|i| embedding(q, e, s, i / s, i % s))
        .collect();
    let ks: Vec<Vec<f64>> = (0..n * s)
        .map(|i| embedding(k, e, s, i / s, i % s))
        .collect();
    let mut total = 0.0;
    for (qi, ki) in qs.iter().zip(&ks) {
        let den: f64 = ks.iter().map(|kj| (dot(qi, kj) / tau).exp()).sum();
        total -= ((dot(qi, ki) / tau).exp() / den).ln();
    }
    total / (n * s) as f64
}

fn infonce(q: &[f64], k: &[f64], shape: &Shape, tau: f64) -> f64 {
    var(q, shape)
        .dense_infonce(&var(k, shape), tau)
        .unwrap()
        .item()
        .unwrap()
}

#[test]
fn dense_infonce_matches_the_definition() {
    for (dims, tau) in [
        ([2, 5, 1, 3, 5], 0.1),
        ([3, 4, 2, 1, 3], 0.3),
        ([1, 7, 3, 3, 1], 0.05),
    ] {
        let shape = Shape::from(dims);
        let (q, k) = (
            seeded(shape.numel(), 1, -1.0, 1.0),
            seeded(shape.numel(), 2, -1.0, 1.0),
        );
        let (n, e, s) = (dims[0], dims[1], dims[2] * dims[3] * dims[4]);
        let what = format!("dense_infonce {shape} tau={tau}");
        Tolerance::F64.assert(
            &what,
            &[infonce(&q, &k, &shape, tau)],
            &[infonce_reference(&q, &k, n, e, s, tau)],
        );
    }
}

#[test]
fn dense_infonce_of_identical_orthonormal_embeddings_has_a_closed_form() {
    // With q = k orthonormal across the M locations (after normalisation), q_i . k_j = delta_ij,
    // so every location's term is -log(e^{1/tau} / (e^{1/tau} + (M - 1) e^0)).
    let (n, e, s, tau) = (2, 7, 3, 0.1_f64);
    let m = n * s;
    // Gram-Schmidt on seeded vectors: M orthonormal vectors in R^E.
    let mut basis: Vec<Vec<f64>> = Vec::new();
    for i in 0..m {
        let mut v = seeded(e, 40 + i as u64, -1.0, 1.0);
        for b in &basis {
            let p = dot(&v, b);
            v.iter_mut().zip(b).for_each(|(x, y)| *x -= p * y);
        }
        basis.push(normalized(v));
    }
    // q and k scale each location differently: normalisation must undo it.
    let scales = seeded(2 * m, 60, 0.5, 2.0);
    let (mut q, mut k) = (vec![0.0; n * e * s], vec![0.0; n * e * s]);
    for (i, b) in basis.iter().enumerate() {
        for (ch, &value) in b.iter().enumerate() {
            let at = (i / s * e + ch) * s + i % s;
            q[at] = scales[i] * value;
            k[at] = scales[m + i] * value;
        }
    }
    let p = (1.0 / tau).exp();
    let expected = -(p / (p + (m - 1) as f64)).ln();
    let value = infonce(&q, &k, &Shape::from([n, e, s]), tau);
    Tolerance::F64.assert("orthonormal InfoNCE", &[value], &[expected]);
}

#[test]
fn dense_infonce_gradients_against_finite_differences() {
    let shape = Shape::from([2, 3, 1, 2, 3]);
    let inputs = [
        (seeded(shape.numel(), 3, -1.0, 1.0), shape.clone()),
        (seeded(shape.numel(), 4, -1.0, 1.0), shape.clone()),
    ];
    let tol = Tolerance::FINITE_DIFFERENCE;
    for tau in [0.1, 0.7] {
        // The loss, and the primitive alone under an uneven weighting of its outputs.
        let loss = |xs: &[Var<Cpu64>]| xs[0].dense_infonce(&xs[1], tau);
        let lse = |xs: &[Var<Cpu64>]| xs[0].infonce_logsumexp(&xs[1], tau);
        let weighted = seeded(shape.reduced(&[1]).numel(), 5, -1.0, 1.0);
        for (what, f, weights) in [
            (
                "dense_infonce",
                &loss as &dyn Fn(&[Var<Cpu64>]) -> _,
                vec![1.0],
            ),
            ("infonce_logsumexp", &lse, weighted),
        ] {
            let a = analytic_gradient(f, &inputs, &weights).unwrap();
            let fd = numeric_gradient(f, &inputs, &weights, 1e-6).unwrap();
            for k in 0..2 {
                tol.assert(&format!("{what} tau={tau} d input {k}"), &a[k], &fd[k]);
            }
        }
    }
}

#[test]
fn dense_infonce_second_order_is_a_typed_error_not_a_silent_zero() {
    let shape = Shape::from([2, 3, 4]);
    let q = Var::from_f64(&Cpu64, &seeded(24, 1, -1.0, 1.0), &shape, true).unwrap();
    let k = Var::from_f64(&Cpu64, &seeded(24, 2, -1.0, 1.0), &shape, true).unwrap();
    let loss = q.dense_infonce(&k, 0.1).unwrap();
    assert!(grad(&loss, &[&q, &k], None, false).is_ok());
    assert!(matches!(
        grad(&loss, &[&q, &k], None, true),
        Err(Error::NoSecondOrder {
            op: "infonce_logsumexp"
        })
    ));
}

#[test]
fn dense_infonce_rejects_bad_shapes_and_temperatures() {
    let a = var(&[0.5; 24], &Shape::from([2, 3, 4]));
    let b = var(&[0.5; 24], &Shape::from([2, 4, 3]));
    let m = a.dense_infonce(&b, 0.1).err().unwrap().to_string();
    assert!(
        m.contains("dense_infonce") && m.contains("[2, 3, 4]") && m.contains("[2, 4, 3]"),
        "{m}"
    );
    let flat = var(&[0.5; 4], &Shape::from([4]));
    assert!(flat.dense_infonce(&flat, 0.1).is_err());
    let m = a.dense_infonce(&a, -1.0).err().unwrap().to_string();
    assert!(m.contains("tau"), "{m}");
}
