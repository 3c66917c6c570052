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

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
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
    let files: Vec<String> = names.iter().map(|n| format!("{n}.nii.gz")).collect();
    let info = DatasetInfo {
        name: "Colin27 deep grey nuclei (AAL 71-78), cubes of the single brain".into(),
        modalities: vec!["T1".into()],
        labels: vec![(0, "background".into()), (1, "deep grey nuclei".into())],
    };
    msd::write_json(
        &out.join("dataset.json"),
        &msd::dataset_json(&info, &files, &[]),
    )?;
    let rest = names.len() - test;
    let split = SplitFile {
        labeled: names[..labeled].to_vec(),
        unlabeled: names[labeled..rest].to_vec(),
        test: names[rest..].to_vec(),
    };
    msd::write_json(&out.join("split.json"), &split)?;
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
