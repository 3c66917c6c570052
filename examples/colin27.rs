//! Cuts the Colin27 T1 (`ch2.nii.gz`) and its AAL labels (`aal.nii.gz`, same grid) from Debian's
//! `mricron-data` into a Medical Segmentation Decathlon folder for a semi-supervised comparison on
//! real anatomy (see `scripts/colin27.sh`, which fetches the package and runs the comparison).
//!
//! The task: the deep grey nuclei (AAL regions 71-78: caudate, putamen, pallidum, thalamus, both
//! sides) against everything else, in T1 where they are barely brighter than the white matter
//! around them. The volume is tiled into non-overlapping cubes of BLOCK voxels (the tiling centred
//! on the grid); every cube with at least MIN_FRACTION of its voxels in the nuclei is a case, so no
//! voxel belongs to two cases. The cases are ordered by a fixed hash of their position (so the
//! labeled, unlabeled and test sets each spread over the nuclei rather than taking one side) and
//! split: the first LABELED labeled, the last TEST test, the rest unlabeled (`split.json`).
//!
//! Usage: cargo run --release --example colin27 -- TEMPLATES_DIR OUT_DIR [BLOCK LABELED TEST
//! MIN_FRACTION]   (defaults 16 4 8 0.02: 45 cases, 4 labeled, 33 unlabeled, 8 test)
//!
//! With `--2d` first, whole axial slices instead (see [`slices`]): cargo run --release --example
//! colin27 -- --2d TEMPLATES_DIR OUT_DIR [LABELED TEST GAP_MM]   (defaults 4 10 10).
//!
//! Either way it is one brain: the cases are parts of the same head, so the test cases measure
//! how well a method carries what it learnt to other parts of that head, not to other people.

use metaseg::data::msd::{self, DatasetInfo, SplitFile};
use metaseg::data::nifti::{self, Dtype, Volume};
use metaseg_autograd::random::random_bits;
use std::path::{Path, PathBuf};

/// AAL's indices of the caudate, putamen, pallidum and thalamus, left and right.
const DEEP_GREY: std::ops::RangeInclusive<u8> = 71..=78;

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

fn run() -> AnyResult<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("--2d") => slices(&args[1..]),
        _ => cubes(&args),
    }
}

/// The T1 and the deep grey nuclei mask (1 inside, 0 outside) on its grid.
fn read_colin(templates: &Path) -> AnyResult<(Volume, Vec<f32>)> {
    let image = nifti::read(&templates.join("ch2.nii.gz"))?;
    let atlas = nifti::read(&templates.join("aal.nii.gz"))?;
    if image.dims != atlas.dims {
        return Err(format!(
            "ch2 is {:?}, aal {:?}: not one grid",
            image.dims, atlas.dims
        )
        .into());
    }
    let label: Vec<f32> = (atlas.data.iter())
        .map(|&v| f32::from(u8::from(DEEP_GREY.contains(&(v.round() as u8)))))
        .collect();
    Ok((image, label))
}

/// The 3D cases: cubes of the volume.
fn cubes(args: &[String]) -> AnyResult<()> {
    if args.len() < 2 {
        return Err(
            "usage: colin27 TEMPLATES_DIR OUT_DIR [BLOCK LABELED TEST MIN_FRACTION]".into(),
        );
    }
    let (templates, out) = (PathBuf::from(&args[0]), PathBuf::from(&args[1]));
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or(default.into());
    let block: usize = arg(2, "16").parse()?;
    let labeled: usize = arg(3, "4").parse()?;
    let test: usize = arg(4, "8").parse()?;
    let min_fraction: f64 = arg(5, "0.02").parse()?;

    let (image, label) = read_colin(&templates)?;

    // Non-overlapping cubes, the tiling centred on the grid.
    let dims = image.dims;
    let starts = |axis: usize| -> Vec<usize> {
        let n = dims[axis] / block;
        let offset = (dims[axis] - n * block) / 2;
        (0..n).map(|i| offset + i * block).collect()
    };
    let mut cubes = Vec::new();
    for &d in &starts(0) {
        for &h in &starts(1) {
            for &w in &starts(2) {
                let start = [d, h, w];
                let cut = crop(&label, dims, start, block);
                let fraction = cut.iter().sum::<f32>() as f64 / cut.len() as f64;
                if fraction >= min_fraction {
                    cubes.push((start, fraction));
                }
            }
        }
    }
    if cubes.len() < labeled + test + 1 {
        return Err(format!(
            "{} cubes of {block}^3 hold at least {min_fraction} deep grey; {labeled} labeled + \
             {test} test + at least 1 unlabeled are asked: a smaller BLOCK or MIN_FRACTION gives more",
            cubes.len()
        )
        .into());
    }
    let position_key =
        |s: &[usize; 3]| random_bits(27, ((s[0] * 1000 + s[1]) * 1000 + s[2]) as u64);
    cubes.sort_by_key(|(s, _)| position_key(s));

    for sub in ["imagesTr", "labelsTr"] {
        std::fs::create_dir_all(out.join(sub))?;
    }
    let mut names = Vec::new();
    for (i, (start, fraction)) in cubes.iter().enumerate() {
        let name = format!("colin27_{i:03}");
        let file = format!("{name}.nii.gz");
        write_cube(
            &out.join("imagesTr").join(&file),
            &image,
            &image.data,
            *start,
            block,
            Dtype::F32,
        )?;
        write_cube(
            &out.join("labelsTr").join(&file),
            &image,
            &label,
            *start,
            block,
            Dtype::U8,
        )?;
        println!(
            "{name}: cube at (D, H, W) = {start:?}, deep grey {:.1} %",
            100.0 * fraction
        );
        names.push(name);
    }
    let rest = names.len() - test;
    let split = SplitFile {
        labeled: names[..labeled].to_vec(),
        unlabeled: names[labeled..rest].to_vec(),
        test: names[rest..].to_vec(),
    };
    write_msd(&out, "cubes", &names, &split)?;
    println!(
        "{} cases of {block}^3 in {}: {labeled} labeled, {} unlabeled, {test} test (split.json)",
        names.len(),
        out.display(),
        rest - labeled
    );
    Ok(())
}

/// The cube of `block` voxels at `start` of [D, H, W] data.
fn crop(data: &[f32], dims: [usize; 3], start: [usize; 3], block: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(block * block * block);
    for d in start[0]..start[0] + block {
        for h in start[1]..start[1] + block {
            let row = (d * dims[1] + h) * dims[2] + start[2];
            out.extend_from_slice(&data[row..row + block]);
        }
    }
    out
}

/// Writes the cube of `data` (on `like`'s grid) with `like`'s header moved to the cube's origin.
fn write_cube(
    path: &Path,
    like: &Volume,
    data: &[f32],
    start: [usize; 3],
    block: usize,
    dtype: Dtype,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut cube = Volume::new(
        crop(data, like.dims, start, block),
        [block; 3],
        like.spacing,
    )?;
    cube.header = like.header.clone();
    cube.header.dim = nifti::header_dim([block; 3], 1);
    nifti::shift_origin(&mut cube.header, [start[2], start[1], start[0]]);
    nifti::write(path, &cube, dtype)?;
    Ok(())
}

/// dataset.json (every case in imagesTr) and split.json of the cases `names`.
fn write_msd(out: &Path, what: &str, names: &[String], split: &SplitFile) -> AnyResult<()> {
    let files: Vec<String> = names.iter().map(|n| format!("{n}.nii.gz")).collect();
    let info = DatasetInfo {
        name: format!("Colin27 deep grey nuclei (AAL 71-78), {what} of the single brain"),
        modalities: vec!["T1".into()],
        labels: vec![(0, "background".into()), (1, "deep grey nuclei".into())],
    };
    msd::write_json(
        &out.join("dataset.json"),
        &msd::dataset_json(&info, &files, &[]),
    )?;
    msd::write_json(&out.join("split.json"), split)?;
    Ok(())
}

/// Voxels of the deep grey nuclei a slice needs (at the 2 mm in-plane grid, 100 mm^2) to be a
/// case: below that, its Dice is the Dice of a few pixels.
const MIN_PIXELS: usize = 25;

/// The 2D cases: whole axial slices (all of the head, so the network sees the context around the
/// nuclei), averaged to 2 mm in plane (a nuclei pixel where at least 2 of its 4 voxels are) and
/// padded with the background to a multiple of 8 (three 2D poolings). Of the slices with at least
/// MIN_PIXELS of nuclei, the TEST highest are the test slab; the training slices are the others
/// at least GAP_MM from every test slice (the slices between are left out), so a test slice never
/// has a near copy among the training ones. Training slices are ordered by a fixed hash of their
/// position: the first LABELED labeled, the rest unlabeled.
fn slices(args: &[String]) -> AnyResult<()> {
    if args.len() < 2 {
        return Err("usage: colin27 --2d TEMPLATES_DIR OUT_DIR [LABELED TEST GAP_MM]".into());
    }
    let (templates, out) = (PathBuf::from(&args[0]), PathBuf::from(&args[1]));
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or(default.into());
    let labeled: usize = arg(2, "4").parse()?;
    let test: usize = arg(3, "10").parse()?;
    let gap_mm: f64 = arg(4, "10").parse()?;
    let (image, label) = read_colin(&templates)?;
    let background = image.data.iter().copied().fold(f32::INFINITY, f32::min);
    let slab = |z: usize| axial_slice(&image, &label, z, background);
    let candidates: Vec<usize> = (0..image.dims[0])
        .filter(|&z| slab(z).1.iter().filter(|&&v| v > 0.0).count() >= MIN_PIXELS)
        .collect();
    let spacing = image.spacing[0];
    let test_z = candidates[candidates.len().saturating_sub(test)..].to_vec();
    let mut train_z: Vec<usize> = (candidates.iter().copied())
        .filter(|&z| min_distance(&[z], &test_z, spacing) >= gap_mm)
        .collect();
    if test_z.len() < test || train_z.len() < labeled + 1 {
        return Err(format!(
            "{} slices hold {MIN_PIXELS} nuclei pixels: {test} test, and {} at least {gap_mm} mm \
             from them, are too few for {labeled} labeled + 1 unlabeled",
            candidates.len(),
            train_z.len()
        )
        .into());
    }
    train_z.sort_by_key(|&z| random_bits(27, z as u64));
    let distance = min_distance(&test_z, &train_z, spacing);
    if distance < gap_mm {
        return Err(format!("a test slice is {distance} mm from a training slice").into());
    }
    let name = |z: &usize| format!("colin27_z{z:03}");
    for sub in ["imagesTr", "labelsTr"] {
        std::fs::create_dir_all(out.join(sub))?;
    }
    for &z in train_z.iter().chain(&test_z) {
        let (picture, mask, dims) = slab(z);
        let file = format!("{}.nii.gz", name(&z));
        let in_plane = [spacing, 2.0 * image.spacing[1], 2.0 * image.spacing[2]];
        let write = |dir: &str, data: Vec<f32>, dtype| -> AnyResult<()> {
            let slice = Volume::new(data, dims, in_plane)?;
            Ok(nifti::write(&out.join(dir).join(&file), &slice, dtype)?)
        };
        write("imagesTr", picture, Dtype::F32)?;
        let pixels = mask.iter().filter(|&&v| v > 0.0).count();
        write("labelsTr", mask, Dtype::U8)?;
        println!(
            "{}: axial slice {z}, {dims:?}, {pixels} nuclei pixels",
            name(&z)
        );
    }
    let names: Vec<String> = train_z.iter().chain(&test_z).map(name).collect();
    let split = SplitFile {
        labeled: train_z[..labeled].iter().map(name).collect(),
        unlabeled: train_z[labeled..].iter().map(name).collect(),
        test: test_z.iter().map(name).collect(),
    };
    write_msd(&out, "axial slices", &names, &split)?;
    println!(
        "{} axial slices in {} (one brain): {labeled} labeled, {} unlabeled, {} test; every test \
         slice is at least {distance} mm from every labeled or unlabeled one (asked: {gap_mm})",
        names.len(),
        out.display(),
        train_z.len() - labeled,
        test_z.len()
    );
    Ok(())
}

/// The smallest distance between a slice of `a` and one of `b` (indices along D, `spacing` apart).
fn min_distance(a: &[usize], b: &[usize], spacing: f64) -> f64 {
    let pairs = a
        .iter()
        .flat_map(|&i| b.iter().map(move |&j| i.abs_diff(j)));
    pairs.min().map_or(f64::INFINITY, |d| d as f64 * spacing)
}

/// Axial slice `z` of the image and the nuclei mask at half the in-plane resolution, padded with
/// `background` (the image) and 0 (the mask) to a multiple of 8, and its [1, H, W].
fn axial_slice(
    image: &Volume,
    label: &[f32],
    z: usize,
    background: f32,
) -> (Vec<f32>, Vec<f32>, [usize; 3]) {
    let [_, h, w] = image.dims;
    let (h2, w2) = (h / 2, w / 2);
    let (hp, wp) = (h2.div_ceil(8) * 8, w2.div_ceil(8) * 8);
    let (top, left) = ((hp - h2) / 2, (wp - w2) / 2);
    let mut picture = vec![background; hp * wp];
    let mut mask = vec![0.0; hp * wp];
    for y in 0..h2 {
        for x in 0..w2 {
            let at = |dy: usize, dx: usize| (z * h + 2 * y + dy) * w + 2 * x + dx;
            let four = [at(0, 0), at(0, 1), at(1, 0), at(1, 1)];
            let out = (top + y) * wp + left + x;
            picture[out] = four.iter().map(|&i| image.data[i]).sum::<f32>() / 4.0;
            let inside = four.iter().filter(|&&i| label[i] > 0.0).count();
            mask[out] = f32::from(u8::from(inside >= 2));
        }
    }
    (picture, mask, [1, hp, wp])
}
