//! The embedded default data set: procedural 3D MRI-like volumes with exact binary labels, made from
//! (seed, case index) alone, so a run needs no download (shared/DATA.md, "The embedded default").
//!
//! Each case is an anatomy drawn from the case's own counter-based random stream
//! (`metaseg_autograd::random`), rendered on a voxel grid:
//!
//! - **target** (label 1): an "atrium", a randomly rotated ellipsoid whose surface is deformed by a
//!   few low-frequency waves, with 2-4 curved, tapering "vein/appendage" tubes leaving it in random
//!   directions; a thin dark wall around it.
//! - **distractors** of the same intensity (blood pools are equally bright in contrast MRI), placed
//!   against the target so that they touch it or merge with it (no wall between them): an elongated
//!   "ventricle" with a thick dark wall, a long "aorta" tube crossing the volume, and a few small
//!   blobs. Only shape and context separate them from the target: a global threshold cannot.
//! - **intensities**: tissue with a smooth texture, dark walls, blood with a weak texture; then
//!   partial-volume blur (Gaussian), a smooth multiplicative bias field, Rician noise and a random
//!   overall gain.
//!
//! The knobs are the fields of [`SyntheticKnobs`] (`[data.synthetic]` of a training
//! configuration). Harder: more `noise`, `bias`, `blur`, `blobs`, a wider `distractor_contrast`
//! (the distractors' intensity may then differ from the target's in either direction, so an
//! intensity window cannot cut them off), a wider `body_radius` range and more `tubes` (more shape
//! variability), a wider `tissue_level` range (varying contrast), a `degradation_spread` (noise and
//! blur that differ from case to case, as between scanners).
//!
//! Geometry is drawn in "unit" coordinates: voxel centres mapped so that the shortest axis spans
//! [-1, 1] (isotropic in voxels), so a case looks the same at every size.

use super::error::{DataError, Result};
use super::msd::{self, DatasetInfo, SplitFile};
use super::nifti::{self, Dtype, Volume};
use metaseg_autograd::random::{normal, random_bits, uniform};
use std::path::Path;

type V3 = [f64; 3];

/// The generator's settings; `Default` is the default data set.
#[derive(Clone, Debug, PartialEq)]
pub struct SyntheticConfig {
    pub seed: u64,
    pub cases: usize,
    /// [D, H, W] voxels.
    pub size: [usize; 3],
    /// Voxel size along [D, H, W] in mm, written to the header (the anatomy is drawn in voxels).
    pub spacing: [f64; 3],
    pub knobs: SyntheticKnobs,
}

/// What makes the task hard: shape variability, distractors and image degradation. A training
/// configuration names them as `[data.synthetic]`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticKnobs {
    /// Range of the target body's semi-axes, in unit coordinates (1 = half the shortest axis).
    pub body_radius: (f64, f64),
    /// Range of the number of tubes on the target (inclusive).
    pub tubes: (usize, usize),
    /// Small distractor blobs besides the ventricle and the aorta.
    pub blobs: usize,
    /// Each distractor's mean intensity is the target's times 1 + U(-c, c).
    pub distractor_contrast: f64,
    /// Range of the surrounding tissue's intensity, relative to the target's blood (1): above 1,
    /// the blood pools are darker than the tissue, as in another MRI contrast.
    pub tissue_level: (f64, f64),
    /// Rician noise sigma, relative to the target's mean intensity.
    pub noise: f64,
    /// Amplitude of the log bias field: the field lies within exp(+-bias).
    pub bias: f64,
    /// Partial-volume blur: Gaussian sigma in voxels (0 for none).
    pub blur: f64,
    /// Scanner variety: each case's noise and blur are `noise` and `blur` times exp(U(-s, s)),
    /// drawn independently per case (0: every case alike).
    pub degradation_spread: f64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            seed: 0,
            cases: 30,
            size: [48, 48, 48],
            spacing: [1.0, 1.0, 1.0],
            knobs: SyntheticKnobs::default(),
        }
    }
}

impl Default for SyntheticKnobs {
    fn default() -> Self {
        SyntheticKnobs {
            body_radius: (0.34, 0.5),
            tubes: (2, 4),
            blobs: 3,
            distractor_contrast: 0.08,
            tissue_level: (0.38, 0.5),
            noise: 0.1,
            bias: 0.3,
            blur: 0.8,
            // Without scanner variety four labeled cases cover the generator as well as 24 do
            // (README, "Results on the embedded default"); at 1.2 all labels beat four.
            degradation_spread: 1.2,
        }
    }
}

impl SyntheticConfig {
    pub fn check(&self) -> Result<()> {
        let bad = |reason: String| Err(DataError::invalid("synthetic data set", reason));
        if self.size.iter().any(|&n| n < 8) {
            return bad(format!(
                "size {:?}: every axis needs at least 8 voxels",
                self.size
            ));
        }
        if self.cases == 0 {
            return bad("no cases".into());
        }
        let k = &self.knobs;
        let (r0, r1) = k.body_radius;
        if !(0.05 <= r0 && r0 <= r1 && r1 <= 0.8) {
            return bad(format!(
                "body_radius ({r0}, {r1}) must satisfy 0.05 <= lo <= hi <= 0.8"
            ));
        }
        let (t0, t1) = k.tissue_level;
        if !(0.0 <= t0 && t0 <= t1 && t1.is_finite()) {
            return bad(format!(
                "tissue_level ({t0}, {t1}) must satisfy 0 <= lo <= hi"
            ));
        }
        if k.tubes.0 > k.tubes.1 {
            return bad(format!("tubes {:?}: lo > hi", k.tubes));
        }
        let levels = [
            k.distractor_contrast,
            k.noise,
            k.bias,
            k.blur,
            k.degradation_spread,
        ];
        if levels.iter().any(|v| !(v.is_finite() && *v >= 0.0)) || k.distractor_contrast >= 1.0 {
            return bad(
                "contrast (< 1), noise, bias, blur and degradation_spread must be finite and >= 0"
                    .into(),
            );
        }
        if self.spacing.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return bad(format!("spacing {:?} must be positive", self.spacing));
        }
        Ok(())
    }
}

/// One generated case: the image and its binary label, on the same grid.
#[derive(Clone, Debug)]
pub struct SyntheticCase {
    pub image: Volume,
    pub label: Volume,
}

/// Case `index` of the data set `config` describes (the same bytes for the same seed and index).
pub fn case(config: &SyntheticConfig, index: usize) -> Result<SyntheticCase> {
    config.check()?;
    let mut draws = Draws::new(case_key(config.seed, index, 0));
    let anatomy = Anatomy::draw(&mut draws, config);
    let scanner = Scanner::draw(config, index);
    let (image, label) = anatomy.render(config, scanner, case_key(config.seed, index, 1));
    Ok(SyntheticCase {
        image: Volume::new(image, config.size, config.spacing)?,
        label: Volume::new(label, config.size, config.spacing)?,
    })
}

pub fn case_name(index: usize) -> String {
    format!("synth_{index:03}")
}

/// Writes the data set as an MSD folder: `imagesTr/` (float32) and `labelsTr/` (uint8) for every
/// case, `dataset.json`, and `split.json` with the first `labeled` cases labeled, the last `test`
/// cases the test set and the rest unlabeled (the same split as `SplitSpec::FirstN`). All cases keep
/// their labels on disk so the unlabeled pool can be scored too.
pub fn write_msd(dir: &Path, config: &SyntheticConfig, labeled: usize, test: usize) -> Result<()> {
    config.check()?;
    if labeled == 0 || labeled + test > config.cases {
        let reason = format!("{labeled} labeled + {test} test of {} cases", config.cases);
        return Err(DataError::invalid("split", reason));
    }
    for sub in ["imagesTr", "labelsTr"] {
        let path = dir.join(sub);
        std::fs::create_dir_all(&path).map_err(|e| DataError::io(&path, e))?;
    }
    let names: Vec<String> = (0..config.cases).map(case_name).collect();
    let files: Vec<String> = names.iter().map(|n| format!("{n}.nii.gz")).collect();
    for (index, file) in files.iter().enumerate() {
        let generated = case(config, index)?;
        nifti::write(
            &dir.join("imagesTr").join(file),
            &generated.image,
            Dtype::F32,
        )?;
        nifti::write(
            &dir.join("labelsTr").join(file),
            &generated.label,
            Dtype::U8,
        )?;
    }
    let info = DatasetInfo {
        name: format!("metaseg synthetic atria (seed {})", config.seed),
        modalities: vec!["MRI".into()],
        labels: vec![(0, "background".into()), (1, "atrium".into())],
    };
    msd::write_json(
        &dir.join("dataset.json"),
        &msd::dataset_json(&info, &files, &[]),
    )?;
    let rest = config.cases - test;
    let split = SplitFile {
        labeled: names[..labeled].to_vec(),
        unlabeled: names[labeled..rest].to_vec(),
        test: names[rest..].to_vec(),
    };
    msd::write_json(&dir.join("split.json"), &split)
}

/// Salt of the per-case scanner draws (`degradation_spread`).
const SCANNER_SALT: u64 = 0x5ca1_1e55;

/// A case's image degradation: its blur sigma and noise level.
#[derive(Clone, Copy)]
struct Scanner {
    blur: f64,
    noise: f64,
}

impl Scanner {
    /// The knobs' blur and noise, each times exp(U(-s, s)) with s = `degradation_spread`, from a
    /// stream of their own: a spread of 0 leaves every other draw of the case as it was.
    fn draw(config: &SyntheticConfig, index: usize) -> Scanner {
        let mut d = Draws::new(case_key(config.seed ^ SCANNER_SALT, index, 0));
        let s = config.knobs.degradation_spread;
        let blur = config.knobs.blur * d.range(-s, s).exp();
        let noise = config.knobs.noise * d.range(-s, s).exp();
        Scanner { blur, noise }
    }
}

/// A 64-bit key for a case's stream (0: anatomy, 1: noise), from the seed by the shared hash.
fn case_key(seed: u64, index: usize, stream: u64) -> u64 {
    let counter = (index as u64) * 4 + stream * 2;
    ((random_bits(seed, counter) as u64) << 32) | random_bits(seed, counter + 1) as u64
}

/// Uniform draws in sequence from one key.
struct Draws {
    key: u64,
    counter: u64,
}

impl Draws {
    fn new(key: u64) -> Self {
        Draws { key, counter: 0 }
    }

    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        self.counter += 1;
        lo + (hi - lo) * uniform(self.key, self.counter)
    }

    fn count(&mut self, (lo, hi): (usize, usize)) -> usize {
        (lo + (self.range(0.0, (hi - lo + 1) as f64) as usize)).min(hi)
    }

    /// Uniform on the unit sphere.
    fn direction(&mut self) -> V3 {
        let z = self.range(-1.0, 1.0);
        let phi = self.range(0.0, std::f64::consts::TAU);
        let r = (1.0 - z * z).sqrt();
        [r * phi.cos(), r * phi.sin(), z]
    }

    /// A unit vector orthogonal to `v`.
    fn orthogonal(&mut self, v: V3) -> V3 {
        loop {
            let w = self.direction();
            let o = sub(w, scale(v, dot(w, v)));
            if norm(o) > 0.1 {
                return scale(o, 1.0 / norm(o));
            }
        }
    }

    /// A uniformly random rotation (Shoemake's unit quaternion), as its three rows.
    fn rotation(&mut self) -> [V3; 3] {
        let (u1, u2, u3) = (
            self.range(0.0, 1.0),
            self.range(0.0, 1.0),
            self.range(0.0, 1.0),
        );
        let tau = std::f64::consts::TAU;
        let (a, b) = ((1.0 - u1).sqrt(), u1.sqrt());
        let (x, y, z, w) = (
            a * (tau * u2).sin(),
            a * (tau * u2).cos(),
            b * (tau * u3).sin(),
            b * (tau * u3).cos(),
        );
        [
            [
                1.0 - 2.0 * (y * y + z * z),
                2.0 * (x * y - z * w),
                2.0 * (x * z + y * w),
            ],
            [
                2.0 * (x * y + z * w),
                1.0 - 2.0 * (x * x + z * z),
                2.0 * (y * z - x * w),
            ],
            [
                2.0 * (x * z - y * w),
                2.0 * (y * z + x * w),
                1.0 - 2.0 * (x * x + y * y),
            ],
        ]
    }
}

fn dot(a: V3, b: V3) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}
fn sub(a: V3, b: V3) -> V3 {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}
fn add(a: V3, b: V3) -> V3 {
    [a[0] + b[0], a[1] + b[1], a[2] + b[2]]
}
fn scale(a: V3, s: f64) -> V3 {
    [a[0] * s, a[1] * s, a[2] * s]
}
fn norm(a: V3) -> f64 {
    dot(a, a).sqrt()
}

/// A smooth random field: a sum of plane waves, |field| <= amplitude.
struct Waves(Vec<(V3, f64, f64)>);

impl Waves {
    fn draw(d: &mut Draws, n: usize, freq: (f64, f64), amplitude: f64) -> Waves {
        let weights: Vec<f64> = (0..n).map(|_| d.range(0.5, 1.0)).collect();
        let total: f64 = weights.iter().sum();
        let waves = weights
            .iter()
            .map(|w| {
                let k = scale(d.direction(), d.range(freq.0, freq.1));
                (
                    k,
                    d.range(0.0, std::f64::consts::TAU),
                    amplitude * w / total,
                )
            })
            .collect();
        Waves(waves)
    }

    fn at(&self, p: V3) -> f64 {
        self.0
            .iter()
            .map(|(k, phase, a)| a * (dot(*k, p) + phase).cos())
            .sum()
    }
}

/// A shape with an approximate signed distance (negative inside), in unit coordinates.
enum Shape {
    /// A rotated ellipsoid whose radius along each direction is scaled by 1 + surface(direction).
    Blob {
        centre: V3,
        rows: [V3; 3],
        radii: V3,
        surface: Waves,
    },
    /// Spheres swept along a polyline, the radius interpolated along it.
    Tube { points: Vec<V3>, radii: Vec<f64> },
}

impl Shape {
    fn distance(&self, p: V3) -> f64 {
        match self {
            Shape::Blob { centre, .. } => {
                let offset = sub(p, *centre);
                let r = norm(offset);
                if r < 1e-9 {
                    return -self.reach([1.0, 0.0, 0.0]);
                }
                // The distance along the ray from the centre: exact for a star-shaped body.
                r - self.reach(scale(offset, 1.0 / r))
            }
            Shape::Tube { points, radii } => (0..points.len() - 1)
                .map(|i| segment_distance(p, points[i], points[i + 1], radii[i], radii[i + 1]))
                .fold(f64::INFINITY, f64::min),
        }
    }

    /// A blob's extent from its centre along the unit direction `dir`.
    fn reach(&self, dir: V3) -> f64 {
        match self {
            Shape::Blob {
                rows,
                radii,
                surface,
                ..
            } => {
                let q = [0, 1, 2].map(|i| dot(rows[i], dir) / radii[i]);
                let per_unit = norm(q);
                (1.0 + surface.at(scale(q, 1.0 / per_unit))) / per_unit
            }
            Shape::Tube { .. } => 0.0,
        }
    }
}

fn segment_distance(p: V3, a: V3, b: V3, ra: f64, rb: f64) -> f64 {
    let ab = sub(b, a);
    let t = (dot(sub(p, a), ab) / dot(ab, ab).max(1e-12)).clamp(0.0, 1.0);
    norm(sub(p, add(a, scale(ab, t)))) - (ra + (rb - ra) * t)
}

/// A quadratic Bezier curve through p0 and p2, pulled towards p1, as `n` segments.
fn bezier(p0: V3, p1: V3, p2: V3, n: usize) -> Vec<V3> {
    (0..=n)
        .map(|i| {
            let t = i as f64 / n as f64;
            let (a, b, c) = ((1.0 - t) * (1.0 - t), 2.0 * t * (1.0 - t), t * t);
            add(add(scale(p0, a), scale(p1, b)), scale(p2, c))
        })
        .collect()
}

fn tapered_tube(points: Vec<V3>, r0: f64, r1: f64) -> Shape {
    let n = (points.len() - 1) as f64;
    let radii = (0..points.len())
        .map(|i| r0 + (r1 - r0) * i as f64 / n)
        .collect();
    Shape::Tube { points, radii }
}

/// A structure with its mean intensity (target = 1) and wall thickness.
struct Part {
    shape: Shape,
    level: f64,
    wall: f64,
}

struct Anatomy {
    target: Vec<Shape>,
    target_wall: f64,
    distractors: Vec<Part>,
    tissue_level: f64,
    tissue: Waves,
    wall_level: f64,
    blood_texture: Waves,
    bias: Waves,
    gain: f64,
}

impl Anatomy {
    fn draw(d: &mut Draws, config: &SyntheticConfig) -> Anatomy {
        let body = draw_body(d, config.knobs.body_radius);
        let mut target: Vec<Shape> = (0..d.count(config.knobs.tubes))
            .map(|_| draw_tube(d, &body))
            .collect();
        let mut distractors = vec![draw_ventricle(d, &body), draw_aorta(d, &body)];
        distractors.extend((0..config.knobs.blobs).map(|_| draw_blob(d, config.size)));
        for part in &mut distractors {
            part.level = 1.0 + d.range(-1.0, 1.0) * config.knobs.distractor_contrast;
        }
        target.insert(0, body);
        Anatomy {
            target,
            target_wall: d.range(0.03, 0.05),
            distractors,
            tissue_level: d.range(config.knobs.tissue_level.0, config.knobs.tissue_level.1),
            tissue: Waves::draw(d, 4, (2.0, 6.0), 0.3),
            wall_level: d.range(0.15, 0.25),
            blood_texture: Waves::draw(d, 3, (2.0, 5.0), 0.06),
            bias: Waves::draw(d, 3, (0.8, 2.0), config.knobs.bias),
            gain: 100.0 * d.range(0.7, 1.4),
        }
    }

    /// The noiseless intensity at `p` and whether `p` is in the target.
    fn clean(&self, p: V3) -> (f64, bool) {
        let blood = 1.0 + self.blood_texture.at(p);
        let t = (self.target.iter())
            .map(|s| s.distance(p))
            .fold(f64::INFINITY, f64::min);
        if t < 0.0 {
            return (blood, true);
        }
        let mut inside: Option<(f64, f64)> = None;
        let mut wall = t < self.target_wall;
        for part in &self.distractors {
            let dist = part.shape.distance(p);
            if dist < 0.0 && inside.is_none_or(|(best, _)| dist < best) {
                inside = Some((dist, part.level));
            }
            wall |= dist < part.wall;
        }
        match inside {
            Some((_, level)) => (level * blood, false),
            None if wall => (self.wall_level, false),
            None => (self.tissue_level * (1.0 + self.tissue.at(p)), false),
        }
    }

    /// The image (blurred, biased, noisy, scaled) and the label, [D, H, W].
    fn render(
        &self,
        config: &SyntheticConfig,
        scanner: Scanner,
        noise_key: u64,
    ) -> (Vec<f32>, Vec<f32>) {
        let points = grid_points(config.size);
        let (mut clean, label): (Vec<f64>, Vec<f32>) = points
            .iter()
            .map(|&p| {
                let (v, inside) = self.clean(p);
                (v, if inside { 1.0 } else { 0.0 })
            })
            .unzip();
        gaussian_blur(&mut clean, config.size, scanner.blur);
        let sigma = scanner.noise;
        let image = (clean.iter().zip(&points).enumerate())
            .map(|(i, (&v, &p))| {
                let signal = v * self.bias.at(p).exp();
                let (n1, n2) = (
                    normal(noise_key, 2 * i as u64),
                    normal(noise_key, 2 * i as u64 + 1),
                );
                // Rician: the magnitude of a complex signal with Gaussian noise in both parts.
                (self.gain * ((signal + sigma * n1).powi(2) + (sigma * n2).powi(2)).sqrt()) as f32
            })
            .collect();
        (image, label)
    }
}

/// The target body: a deformed, rotated ellipsoid near the centre.
fn draw_body(d: &mut Draws, (r0, r1): (f64, f64)) -> Shape {
    Shape::Blob {
        centre: [0, 1, 2].map(|_| d.range(-0.12, 0.12)),
        rows: d.rotation(),
        radii: [0, 1, 2].map(|_| d.range(r0, r1)),
        surface: Waves::draw(d, 4, (1.5, 3.5), 0.2),
    }
}

fn centre_of(shape: &Shape) -> V3 {
    match shape {
        Shape::Blob { centre, .. } => *centre,
        Shape::Tube { points, .. } => points[0],
    }
}

/// A curved, tapering tube from inside the body outwards.
fn draw_tube(d: &mut Draws, body: &Shape) -> Shape {
    let c = centre_of(body);
    let dir = d.direction();
    let reach = body.reach(dir);
    let start = add(c, scale(dir, 0.6 * reach));
    let end = add(c, scale(dir, reach + d.range(0.3, 0.55)));
    let bend = scale(d.orthogonal(dir), d.range(-0.2, 0.2));
    let control = add(scale(add(start, end), 0.5), bend);
    let r0 = d.range(0.07, 0.11);
    let r1 = r0 * d.range(0.55, 0.85);
    tapered_tube(bezier(start, control, end, 12), r0, r1)
}

/// An elongated blob against the body (overlapping it by up to 0.06, or up to 0.06 away), with a
/// thick wall like a ventricle's myocardium.
fn draw_ventricle(d: &mut Draws, body: &Shape) -> Part {
    let dir = d.direction();
    let mut shape = Shape::Blob {
        centre: [0.0; 3],
        rows: d.rotation(),
        radii: [d.range(0.3, 0.4), d.range(0.3, 0.4), d.range(0.45, 0.6)],
        surface: Waves::draw(d, 3, (1.5, 3.0), 0.12),
    };
    let gap = d.range(-0.06, 0.06);
    let offset = body.reach(dir) + shape.reach(scale(dir, -1.0)) + gap;
    if let Shape::Blob { centre, .. } = &mut shape {
        *centre = add(centre_of(body), scale(dir, offset));
    }
    Part {
        shape,
        level: 1.0,
        wall: d.range(0.1, 0.14),
    }
}

/// A long, slightly curved tube crossing the volume that passes the body at a distance between an
/// overlap of 0.05 and a gap of 0.03.
fn draw_aorta(d: &mut Draws, body: &Shape) -> Part {
    let axis = d.direction();
    let side = d.orthogonal(axis);
    let radius = d.range(0.11, 0.16);
    let passing = body.reach(side) + radius + d.range(-0.05, 0.03);
    let mid = add(centre_of(body), scale(side, passing));
    let control = add(mid, scale(side, d.range(0.0, 0.3)));
    let (start, end) = (add(mid, scale(axis, -3.0)), add(mid, scale(axis, 3.0)));
    Part {
        shape: tapered_tube(bezier(start, control, end, 16), radius, radius),
        level: 1.0,
        wall: d.range(0.03, 0.05),
    }
}

/// A small deformed blob anywhere in the volume.
fn draw_blob(d: &mut Draws, size: [usize; 3]) -> Part {
    let half = half_extent(size);
    let r = d.range(0.07, 0.14);
    Part {
        shape: Shape::Blob {
            centre: [0, 1, 2].map(|a| d.range(-half[a], half[a])),
            rows: d.rotation(),
            radii: [r, r * d.range(0.7, 1.3), r * d.range(0.7, 1.3)],
            surface: Waves::draw(d, 2, (2.0, 4.0), 0.1),
        },
        level: 1.0,
        wall: d.range(0.03, 0.05),
    }
}

/// Half the extent of the volume along (x, y, z) in unit coordinates.
fn half_extent([d, h, w]: [usize; 3]) -> V3 {
    let m = d.min(h).min(w) as f64;
    [w as f64 / m, h as f64 / m, d as f64 / m]
}

/// Unit coordinates (x, y, z) of every voxel centre, in [D, H, W] order.
fn grid_points(size: [usize; 3]) -> Vec<V3> {
    let [d, h, w] = size;
    let m = d.min(h).min(w) as f64 / 2.0;
    let coordinate = |i: usize, n: usize| (i as f64 + 0.5 - n as f64 / 2.0) / m;
    let mut points = Vec::with_capacity(d * h * w);
    for z in 0..d {
        for y in 0..h {
            for x in 0..w {
                points.push([coordinate(x, w), coordinate(y, h), coordinate(z, d)]);
            }
        }
    }
    points
}

/// Separable Gaussian blur with edge clamping, sigma in voxels.
fn gaussian_blur(values: &mut [f64], size: [usize; 3], sigma: f64) {
    if sigma <= 0.0 {
        return;
    }
    let radius = (3.0 * sigma).ceil() as isize;
    let weights: Vec<f64> = (-radius..=radius)
        .map(|k| (-((k * k) as f64) / (2.0 * sigma * sigma)).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let weights: Vec<f64> = weights.iter().map(|w| w / total).collect();
    let [d, h, w] = size;
    let strides = [h * w, w, 1];
    for axis in 0..3 {
        let (n, stride) = (size[axis], strides[axis]);
        let mut line = vec![0.0; n];
        for start in (0..d * h * w).filter(|i| (i / stride) % n == 0) {
            for (j, v) in line.iter_mut().enumerate() {
                *v = values[start + j * stride];
            }
            for j in 0..n {
                let blurred = (weights.iter().enumerate())
                    .map(|(k, wk)| {
                        let at = (j as isize + k as isize - radius).clamp(0, n as isize - 1);
                        wk * line[at as usize]
                    })
                    .sum();
                values[start + j * stride] = blurred;
            }
        }
    }
}
