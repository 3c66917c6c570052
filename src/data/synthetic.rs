//! The embedded default data set: procedural MRI-like volumes with exact binary labels, made from
//! (seed, case index) alone, so a run needs no download (shared/DATA.md, "The embedded default").
//! A case is 3D, or 2D: a size of depth 1 is the plane through the centre of the same 3D anatomy.
//!
//! Each case is an anatomy drawn from the case's own counter-based random streams
//! (`metaseg_autograd::random`), rendered on a voxel grid:
//!
//! - **target** (label 1): an "atrium", a randomly rotated ellipsoid whose surface is deformed by a
//!   few low-frequency waves, placed anywhere near the centre, with curved, tapering
//!   "vein/appendage" tubes leaving it in random directions, side branches on the tubes and holes
//!   (tunnels of tissue) through the body; a thin dark wall around it.
//! - **distractors** of the same intensity (blood pools are equally bright in contrast MRI), placed
//!   against the target so that they touch it or merge with it (no wall between them): an elongated
//!   "ventricle" with a thick dark wall, a long "aorta" tube crossing the volume, and a few small
//!   blobs. Only shape and context separate them from the target: a global threshold cannot.
//! - **zoom**: the whole anatomy is scaled about the target's centre, as patients and fields of
//!   view differ.
//! - **intensities**: tissue with a smooth texture, dark walls, blood with a weak texture; then,
//!   per case as between scanners, a contrast curve (a power law), partial-volume blur
//!   (Gaussian), a coarser acquisition grid, a smooth multiplicative bias field, Rician noise and a
//!   random overall gain.
//!
//! The knobs are the fields of [`SyntheticKnobs`] (`[data.synthetic]` of a training
//! configuration), each documented with its range. Every part of a case (the body, the tubes,
//! each tube's branches, the holes, the distractors, the appearance, the scanner) is drawn from a
//! stream of its own, so a knob changes its part and leaves the others' draws as they were.
//!
//! Geometry is drawn in "unit" coordinates: voxel centres mapped so that the shortest axis (of more
//! than one voxel) spans [-1, 1] (isotropic in voxels), so a case looks the same at every size.

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

/// What makes the task hard: variety of the target's pose, size and shape, distractors, and the
/// image's appearance, each drawn per case. A training configuration names them as
/// `[data.synthetic]`; lengths are in unit coordinates (1 = half the shortest axis), ranges are
/// inclusive, and a knob's neutral value is given where it has one.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticKnobs {
    /// Range of the target body's semi-axes, before the zoom; within [0.05, 0.8].
    pub body_radius: (f64, f64),
    /// Range of the number of tubes on the target.
    pub tubes: (usize, usize),
    /// Range of the number of side branches on each tube (0: none).
    pub branches: (usize, usize),
    /// Range of the number of holes through the target body: tunnels of tissue lined with the
    /// target's wall, so the body's topology changes (0: none).
    pub holes: (usize, usize),
    /// The target body's centre lies U(-p, p) from the volume's centre along each axis, in [0, 1]
    /// (0: centred; a 2D case's plane always passes through it).
    pub position: f64,
    /// Range of the case's zoom, drawn log-uniformly within [0.25, 4]: the whole anatomy scaled
    /// about the target's centre ((1, 1): none).
    pub zoom: (f64, f64),
    /// Small distractor blobs besides the ventricle and the aorta, anywhere in the volume.
    pub blobs: usize,
    /// Range of the blobs' radii, before the zoom; within [0.02, 0.5].
    pub blob_radius: (f64, f64),
    /// Each distractor's mean intensity is the target's times 1 + U(-c, c), c in [0, 1).
    pub distractor_contrast: f64,
    /// Range of the surrounding tissue's intensity, relative to the target's blood (1): above 1,
    /// the blood pools are darker than the tissue, as in another MRI contrast.
    pub tissue_level: (f64, f64),
    /// Per-case contrast curve: every intensity v (blood about 1) becomes v^g with
    /// ln g ~ U(-c, c), c in [0, 3] (0: none); g > 1 darkens tissue and walls against blood.
    pub contrast: f64,
    /// Rician noise sigma, relative to the target's mean intensity.
    pub noise: f64,
    /// Amplitude of the log bias field: the field lies within exp(+-bias).
    pub bias: f64,
    /// Partial-volume blur: Gaussian sigma in voxels (0 for none).
    pub blur: f64,
    /// Scanner variety: each case's noise and blur are `noise` and `blur` times exp(U(-s, s)),
    /// drawn independently per case (0: every case alike).
    pub degradation_spread: f64,
    /// Range of the case's acquisition voxel size, in grid voxels, within [1, 8]: the image is
    /// averaged over voxels this much larger along each axis (of more than one voxel) and
    /// interpolated back linearly, as a coarser scanner gives; the label keeps the fine grid
    /// ((1, 1): none).
    pub resolution: (f64, f64),
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
    /// The default data set (docs/default-data.md: each value and the measurement that chose it).
    fn default() -> Self {
        SyntheticKnobs {
            body_radius: (0.22, 0.36),
            tubes: (1, 4),
            branches: (0, 2),
            holes: (0, 2),
            position: 0.5,
            zoom: (0.7, 1.3),
            blobs: 3,
            blob_radius: (0.04, 0.08),
            distractor_contrast: 0.08,
            tissue_level: (0.3, 0.6),
            contrast: 0.7,
            noise: 0.1,
            bias: 0.3,
            blur: 0.8,
            degradation_spread: 1.0,
            resolution: (1.0, 2.5),
        }
    }
}

impl SyntheticConfig {
    pub fn check(&self) -> Result<()> {
        let bad = |reason: String| Err(DataError::invalid("synthetic data set", reason));
        let [d, h, w] = self.size;
        if d == 0 || (d != 1 && d < 8) || h < 8 || w < 8 {
            return bad(format!(
                "size {:?}: every axis needs at least 8 voxels (D may be 1: 2D cases)",
                self.size
            ));
        }
        if self.cases == 0 {
            return bad("no cases".into());
        }
        if self.spacing.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return bad(format!("spacing {:?} must be positive", self.spacing));
        }
        self.knobs
            .check()
            .map_err(|reason| DataError::invalid("synthetic data set", reason))
    }
}

impl SyntheticKnobs {
    /// Every knob within its documented range; the error names the first that is not.
    fn check(&self) -> std::result::Result<(), String> {
        let range = |name: &str, (lo, hi): (f64, f64), min: f64, max: f64| {
            if min <= lo && lo <= hi && hi <= max {
                Ok(())
            } else {
                Err(format!(
                    "{name} ({lo}, {hi}) must satisfy {min} <= lo <= hi <= {max}"
                ))
            }
        };
        let level = |name: &str, v: f64, max: f64| range(name, (v, v), 0.0, max);
        let count = |name: &str, (lo, hi): (usize, usize)| {
            if lo <= hi {
                Ok(())
            } else {
                Err(format!("{name} ({lo}, {hi}): lo > hi"))
            }
        };
        range("body_radius", self.body_radius, 0.05, 0.8)?;
        range("blob_radius", self.blob_radius, 0.02, 0.5)?;
        range("tissue_level", self.tissue_level, 0.0, f64::MAX)?;
        range("zoom", self.zoom, 0.25, 4.0)?;
        range("resolution", self.resolution, 1.0, 8.0)?;
        count("tubes", self.tubes)?;
        count("branches", self.branches)?;
        count("holes", self.holes)?;
        level("position", self.position, 1.0)?;
        level("contrast", self.contrast, 3.0)?;
        // Below 1, so a distractor's intensity stays positive.
        level("distractor_contrast", self.distractor_contrast, 0.999)?;
        for (name, v) in [
            ("noise", self.noise),
            ("bias", self.bias),
            ("blur", self.blur),
            ("degradation_spread", self.degradation_spread),
        ] {
            level(name, v, f64::MAX)?;
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
    let key = case_key(config.seed, index, 0);
    let anatomy = Anatomy::draw(key, config);
    let scanner = Scanner::draw(&mut Draws::part(key, Stream::Scanner), &config.knobs);
    let (image, label) = anatomy.render(config.size, scanner, case_key(config.seed, index, 1));
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

/// A case's image acquisition: its contrast curve's exponent, blur sigma, voxel size (in grid
/// voxels) and noise level.
#[derive(Clone, Copy)]
struct Scanner {
    gamma: f64,
    blur: f64,
    resolution: f64,
    noise: f64,
}

impl Scanner {
    /// The knobs' blur and noise, each times exp(U(-s, s)) with s = `degradation_spread`, the
    /// contrast exponent exp(U(-c, c)) and the voxel size U(resolution).
    fn draw(d: &mut Draws, knobs: &SyntheticKnobs) -> Scanner {
        let s = knobs.degradation_spread;
        let c = knobs.contrast;
        Scanner {
            gamma: d.range(-c, c).exp(),
            blur: knobs.blur * d.range(-s, s).exp(),
            resolution: d.range(knobs.resolution.0, knobs.resolution.1),
            noise: knobs.noise * d.range(-s, s).exp(),
        }
    }
}

/// A 64-bit key for a case's stream (0: anatomy, 1: noise), from the seed by the shared hash.
fn case_key(seed: u64, index: usize, stream: u64) -> u64 {
    let counter = (index as u64) * 4 + stream * 2;
    ((random_bits(seed, counter) as u64) << 32) | random_bits(seed, counter + 1) as u64
}

/// The parts of a case drawn from streams of their own (each tube's branches from the stream
/// `Branches` + the tube's index).
#[derive(Clone, Copy)]
enum Stream {
    Body = 1,
    Tubes,
    Holes,
    Distractors,
    Appearance,
    Scanner,
    Branches,
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

    /// The stream of one part of the case with anatomy key `key`.
    fn part(key: u64, part: Stream) -> Self {
        Self::stream(key, part as u64)
    }

    /// Sub-stream `n` of `key`: its key hashed from both.
    fn stream(key: u64, n: u64) -> Self {
        let half = |i: u64| random_bits(key, (n << 1) | i) as u64;
        Draws::new((half(0) << 32) | half(1))
    }

    fn range(&mut self, lo: f64, hi: f64) -> f64 {
        self.counter += 1;
        lo + (hi - lo) * uniform(self.key, self.counter)
    }

    /// Log-uniform in [lo, hi] (both positive).
    fn log_range(&mut self, (lo, hi): (f64, f64)) -> f64 {
        self.range(lo.ln(), hi.ln()).exp()
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
    /// The target is the union of these (body, tubes, branches) ...
    target: Vec<Shape>,
    /// ... minus these.
    holes: Vec<Shape>,
    target_wall: f64,
    distractors: Vec<Part>,
    tissue_level: f64,
    tissue: Waves,
    wall_level: f64,
    blood_texture: Waves,
    bias: Waves,
    gain: f64,
    /// A grid point p shows the anatomy at centre + (p - centre) / zoom.
    centre: V3,
    zoom: f64,
}

impl Anatomy {
    fn draw(key: u64, config: &SyntheticConfig) -> Anatomy {
        let k = &config.knobs;
        let mut d = Draws::part(key, Stream::Body);
        let mut centre = [0, 1, 2].map(|_| d.range(-k.position, k.position));
        if config.size[0] == 1 {
            // A 2D case is the plane z = 0: through the body's centre.
            centre[2] = 0.0;
        }
        let zoom = d.log_range(k.zoom);
        let body = draw_body(&mut d, centre, k.body_radius);
        let mut d = Draws::part(key, Stream::Tubes);
        let tubes: Vec<Shape> = (0..d.count(k.tubes))
            .map(|_| draw_tube(&mut d, &body))
            .collect();
        let branches: Vec<Shape> = (tubes.iter().enumerate())
            .flat_map(|(i, tube)| {
                let mut d = Draws::stream(key, Stream::Branches as u64 + i as u64);
                (0..d.count(k.branches))
                    .map(|_| draw_branch(&mut d, tube))
                    .collect::<Vec<_>>()
            })
            .collect();
        let mut d = Draws::part(key, Stream::Holes);
        let holes = (0..d.count(k.holes))
            .map(|_| draw_hole(&mut d, &body))
            .collect();
        let mut d = Draws::part(key, Stream::Distractors);
        let mut distractors = vec![draw_ventricle(&mut d, &body), draw_aorta(&mut d, &body)];
        distractors.extend((0..k.blobs).map(|_| draw_blob(&mut d, config.size, k.blob_radius)));
        for part in &mut distractors {
            part.level = 1.0 + d.range(-1.0, 1.0) * k.distractor_contrast;
        }
        let mut d = Draws::part(key, Stream::Appearance);
        Anatomy {
            target: std::iter::once(body).chain(tubes).chain(branches).collect(),
            holes,
            target_wall: d.range(0.03, 0.05),
            distractors,
            tissue_level: d.range(k.tissue_level.0, k.tissue_level.1),
            tissue: Waves::draw(&mut d, 4, (2.0, 6.0), 0.3),
            wall_level: d.range(0.15, 0.25),
            blood_texture: Waves::draw(&mut d, 3, (2.0, 5.0), 0.06),
            bias: Waves::draw(&mut d, 3, (0.8, 2.0), k.bias),
            gain: 100.0 * d.range(0.7, 1.4),
            centre,
            zoom,
        }
    }

    /// The target's approximate signed distance at `p`: the union's, with the holes cut out.
    fn target_distance(&self, p: V3) -> f64 {
        let nearest = |shapes: &[Shape]| {
            (shapes.iter())
                .map(|s| s.distance(p))
                .fold(f64::INFINITY, f64::min)
        };
        nearest(&self.target).max(-nearest(&self.holes))
    }

    /// The noiseless intensity at anatomy point `p` and whether `p` is in the target.
    fn clean(&self, p: V3) -> (f64, bool) {
        let blood = 1.0 + self.blood_texture.at(p);
        let t = self.target_distance(p);
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

    /// The anatomy point a grid point shows.
    fn unzoomed(&self, p: V3) -> V3 {
        add(self.centre, scale(sub(p, self.centre), 1.0 / self.zoom))
    }

    /// The image (contrast curve, blur, coarser grid, bias, noise, gain) and the label, [D, H, W].
    fn render(&self, size: [usize; 3], scanner: Scanner, noise_key: u64) -> (Vec<f32>, Vec<f32>) {
        let points = grid_points(size);
        let (mut clean, label): (Vec<f64>, Vec<f32>) = points
            .iter()
            .map(|&p| {
                let (v, inside) = self.clean(self.unzoomed(p));
                (v.powf(scanner.gamma), if inside { 1.0 } else { 0.0 })
            })
            .unzip();
        gaussian_blur(&mut clean, size, scanner.blur);
        coarsen(&mut clean, size, scanner.resolution);
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

/// The target body: a deformed ellipsoid at `centre`, randomly rotated.
fn draw_body(d: &mut Draws, centre: V3, (r0, r1): (f64, f64)) -> Shape {
    Shape::Blob {
        centre,
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

/// A thinner side branch leaving a tube part-way along it, at 35-75 degrees to it.
fn draw_branch(d: &mut Draws, tube: &Shape) -> Shape {
    let Shape::Tube { points, radii } = tube else {
        unreachable!("branches grow on tubes")
    };
    let i = (d.range(0.35, 0.75) * (points.len() - 1) as f64) as usize;
    let along = sub(points[i + 1], points[i]);
    let along = scale(along, 1.0 / norm(along).max(1e-12));
    let angle = d.range(35.0f64, 75.0).to_radians();
    let dir = add(
        scale(along, angle.cos()),
        scale(d.orthogonal(along), angle.sin()),
    );
    let start = points[i];
    let end = add(start, scale(dir, d.range(0.2, 0.4)));
    let bend = scale(d.orthogonal(dir), d.range(-0.08, 0.08));
    let control = add(scale(add(start, end), 0.5), bend);
    let r0 = radii[i] * d.range(0.6, 0.8);
    let r1 = r0 * d.range(0.55, 0.85);
    tapered_tube(bezier(start, control, end, 8), r0, r1)
}

/// A straight tunnel through the body near its centre (within 0.3 of its smallest semi-axis), of
/// radius 0.3-0.45 of that semi-axis, long enough to leave it on both sides.
fn draw_hole(d: &mut Draws, body: &Shape) -> Shape {
    let Shape::Blob { centre, radii, .. } = body else {
        unreachable!("holes go through the body")
    };
    let smallest = radii.iter().copied().fold(f64::INFINITY, f64::min);
    let largest = radii.iter().copied().fold(0.0, f64::max);
    let axis = d.direction();
    let through = add(
        *centre,
        scale(d.orthogonal(axis), d.range(0.0, 0.3) * smallest),
    );
    let half = 2.0 * largest;
    let radius = smallest * d.range(0.3, 0.45);
    let ends = vec![
        sub(through, scale(axis, half)),
        add(through, scale(axis, half)),
    ];
    tapered_tube(ends, radius, radius)
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
fn draw_blob(d: &mut Draws, size: [usize; 3], (r0, r1): (f64, f64)) -> Part {
    let half = half_extent(size);
    let r = d.range(r0, r1);
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

/// Voxels per unit length: half the shortest axis of more than one voxel (a 2D case is the
/// plane z = 0 through the 3D anatomy, on the scale of its H and W).
fn voxels_per_unit([d, h, w]: [usize; 3]) -> f64 {
    let shortest = if d == 1 { h.min(w) } else { d.min(h).min(w) };
    shortest as f64 / 2.0
}

/// Half the extent of the volume along (x, y, z) in unit coordinates.
fn half_extent(size: [usize; 3]) -> V3 {
    let m = 2.0 * voxels_per_unit(size);
    let [d, h, w] = size.map(|n| n as f64);
    [w / m, h / m, d / m]
}

/// Unit coordinates (x, y, z) of every voxel centre, in [D, H, W] order.
fn grid_points(size: [usize; 3]) -> Vec<V3> {
    let [d, h, w] = size;
    let m = voxels_per_unit(size);
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

/// Calls `f` on every line of `values` ([D, H, W]) along `axis`, writing back what it leaves.
fn for_each_line(values: &mut [f64], size: [usize; 3], axis: usize, mut f: impl FnMut(&mut [f64])) {
    let n = size[axis];
    let stride = [size[1] * size[2], size[2], 1][axis];
    let mut line = vec![0.0; n];
    for start in (0..values.len()).filter(|i| (i / stride).is_multiple_of(n)) {
        for (j, v) in line.iter_mut().enumerate() {
            *v = values[start + j * stride];
        }
        f(&mut line);
        for (j, v) in line.iter().enumerate() {
            values[start + j * stride] = *v;
        }
    }
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
    for axis in 0..3 {
        for_each_line(values, size, axis, |line| {
            let n = line.len() as isize;
            let blurred: Vec<f64> = (0..n)
                .map(|j| {
                    (weights.iter().enumerate())
                        .map(|(k, wk)| {
                            wk * line[(j + k as isize - radius).clamp(0, n - 1) as usize]
                        })
                        .sum()
                })
                .collect();
            line.copy_from_slice(&blurred);
        });
    }
}

/// The image as acquired on voxels `factor` times larger along every axis of more than one voxel:
/// see [`coarsen_line`].
fn coarsen(values: &mut [f64], size: [usize; 3], factor: f64) {
    if factor <= 1.0 {
        return;
    }
    for axis in (0..3).filter(|&a| size[a] > 1) {
        for_each_line(values, size, axis, |line| {
            let coarse = coarsen_line(line, factor);
            line.copy_from_slice(&coarse);
        });
    }
}

/// A line as acquired on voxels `factor` (>= 1) times larger: each coarse voxel [k f, (k + 1) f)
/// (the last cut at the line's end) holds the mean of the fine voxels it covers, by overlap; each
/// fine voxel centre then interpolates linearly between the coarse voxels' centres, and takes the
/// end value beyond the first or last. A linear ramp comes back unchanged between those centres
/// for an integer factor, and within |slope| / (4 factor) for a fractional one.
fn coarsen_line(line: &[f64], factor: f64) -> Vec<f64> {
    let n = line.len() as f64;
    let cells = (n / factor).ceil() as usize;
    let (mut centres, mut means) = (Vec::with_capacity(cells), Vec::with_capacity(cells));
    for k in 0..cells {
        let (lo, hi) = (k as f64 * factor, ((k + 1) as f64 * factor).min(n));
        let mut sum = 0.0;
        for (i, v) in line.iter().enumerate().skip(lo.floor() as usize) {
            let overlap = (hi.min(i as f64 + 1.0) - lo.max(i as f64)).max(0.0);
            if overlap == 0.0 && i as f64 >= hi {
                break;
            }
            sum += overlap * v;
        }
        centres.push((lo + hi) / 2.0);
        means.push(sum / (hi - lo));
    }
    (0..line.len())
        .map(|i| {
            let x = i as f64 + 0.5;
            let k = centres.partition_point(|&c| c <= x);
            match k {
                0 => means[0],
                k if k == cells => means[cells - 1],
                k => {
                    let t = (x - centres[k - 1]) / (centres[k] - centres[k - 1]);
                    means[k - 1] + t * (means[k] - means[k - 1])
                }
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value at each voxel centre of the line x -> a x + b.
    fn ramp(n: usize, a: f64, b: f64) -> Vec<f64> {
        (0..n).map(|i| a * (i as f64 + 0.5) + b).collect()
    }

    /// The fine voxels are boxes of their centre's value. Over whole voxels (an integer factor) a
    /// coarse voxel's mean of a linear ramp is the ramp at the coarse centre, and linear
    /// interpolation between those is exact wherever a voxel centre lies between the first and
    /// the last coarse centre. A fractional factor cuts a fine voxel: over a part of width w its
    /// box differs from the ramp (slope a) by an integral of at most |a| w (1 - w) / 2 <= |a| / 8,
    /// two such parts per coarse voxel of width `factor`, hence an error of at most
    /// |a| / (4 factor), which interpolation does not exceed (the 20 voxels are 8 whole coarse
    /// voxels of 2.5, so none is cut short at the end).
    #[test]
    fn coarsening_a_linear_ramp_keeps_it_between_the_coarse_centres() {
        let slope = 0.7;
        for factor in [1.0, 2.0, 2.5, 3.0] {
            let line = ramp(20, slope, -3.0);
            let coarse = coarsen_line(&line, factor);
            let cells = (20.0 / factor).ceil() as usize;
            let last_centre = ((cells - 1) as f64 * factor + 20.0) / 2.0;
            let tolerance = if factor.fract() == 0.0 {
                1e-12
            } else {
                slope / (4.0 * factor)
            };
            for (i, (c, v)) in coarse.iter().zip(&line).enumerate() {
                let x = i as f64 + 0.5;
                if x >= factor / 2.0 && x <= last_centre {
                    assert!(
                        (c - v).abs() <= tolerance,
                        "factor {factor}, voxel {i}: {c} vs {v}"
                    );
                }
            }
        }
    }

    /// Factor 1 is the identity; factor 3 turns a step into a ramp over about 3 voxels, keeping
    /// the values within the step's, and keeps a constant line.
    #[test]
    fn coarsening_spreads_a_step_and_keeps_a_constant() {
        let step: Vec<f64> = (0..12).map(|i| if i < 6 { 0.0 } else { 1.0 }).collect();
        assert_eq!(coarsen_line(&step, 1.0), step);
        let coarse = coarsen_line(&step, 3.0);
        assert!(coarse.iter().all(|v| (0.0..=1.0).contains(v)));
        let between = coarse.iter().filter(|v| **v > 0.0 && **v < 1.0).count();
        assert!((2..=4).contains(&between), "{coarse:?}");
        assert!(coarse.windows(2).all(|w| w[0] <= w[1]), "{coarse:?}");
        let constant = vec![2.5; 11];
        for v in coarsen_line(&constant, 2.5) {
            assert!((v - 2.5).abs() < 1e-12);
        }
    }
}
