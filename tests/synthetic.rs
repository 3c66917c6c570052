//! The generator's knobs, each changing the volumes as `SyntheticKnobs` documents it, and 2D cases
//! (the plane through the 3D anatomy's centre). No GPU. The other checks of the embedded data set
//! (reproducibility, labels no threshold recovers, the MSD folder) are in tests/data.rs.

use metaseg::data::synthetic::{self, SyntheticCase, SyntheticConfig, SyntheticKnobs};

fn config(seed: u64, size: [usize; 3], knobs: SyntheticKnobs) -> SyntheticConfig {
    SyntheticConfig {
        seed,
        cases: 16,
        size,
        knobs,
        ..SyntheticConfig::default()
    }
}

fn case(config: &SyntheticConfig, index: usize) -> SyntheticCase {
    synthetic::case(config, index).unwrap()
}

/// Knobs with the image left clean: no noise, blur, bias or coarser grid, so that a change of one
/// knob shows undisturbed.
fn clean_knobs() -> SyntheticKnobs {
    SyntheticKnobs {
        noise: 0.0,
        blur: 0.0,
        bias: 0.0,
        resolution: (1.0, 1.0),
        ..SyntheticKnobs::default()
    }
}

/// A target of the body alone, centred: no tubes, branches or holes.
fn body_only() -> SyntheticKnobs {
    SyntheticKnobs {
        position: 0.0,
        tubes: (0, 0),
        branches: (0, 0),
        holes: (0, 0),
        ..clean_knobs()
    }
}

fn foreground(c: &SyntheticCase) -> Vec<bool> {
    c.label.data.iter().map(|&v| v > 0.5).collect()
}

fn count(mask: &[bool]) -> usize {
    mask.iter().filter(|&&m| m).count()
}

/// The label's centroid in unit coordinates (x, y, z), as the generator maps voxels: the shortest
/// axis of more than one voxel spans [-1, 1].
fn centroid(c: &SyntheticCase) -> [f64; 3] {
    let [d, h, w] = c.label.dims;
    let shortest = if d == 1 { h.min(w) } else { d.min(h).min(w) };
    let unit = |i: usize, n: usize| (i as f64 + 0.5 - n as f64 / 2.0) / (shortest as f64 / 2.0);
    let (mut sum, mut n) = ([0.0; 3], 0.0);
    for (i, &v) in c.label.data.iter().enumerate() {
        if v > 0.5 {
            let (z, y, x) = (i / (h * w), i / w % h, i % w);
            sum = [
                sum[0] + unit(x, w),
                sum[1] + unit(y, h),
                sum[2] + unit(z, d),
            ];
            n += 1.0;
        }
    }
    sum.map(|s| s / n)
}

/// `position`: at 0 the body sits at the centre (its centroid off by its surface waves only); at
/// 0.4 the centroids spread over the cases, each within 0.4 (plus the waves) of the centre. A 2D
/// case's plane passes through the body's centre: its centroid has z = 0.
#[test]
fn position_moves_the_target_within_its_range() {
    // The surface waves move a body's centroid by a few percent of its radius (at most 0.36 x
    // 1.3 zoom): 0.06 bounds it.
    let waves = 0.06;
    let centred = config(1, [1, 64, 64], body_only());
    let moved = config(
        1,
        [1, 64, 64],
        SyntheticKnobs {
            position: 0.4,
            ..body_only()
        },
    );
    let mut farthest: f64 = 0.0;
    for i in 0..12 {
        let c = centroid(&case(&centred, i));
        assert!(c.iter().all(|v| v.abs() < waves), "case {i}: {c:?}");
        let m = centroid(&case(&moved, i));
        assert!(
            m[..2].iter().all(|v| v.abs() < 0.4 + waves),
            "case {i}: {m:?}"
        );
        assert_eq!(m[2], 0.0);
        farthest = farthest.max(m[0].abs()).max(m[1].abs());
    }
    // 24 offsets uniform in (-0.4, 0.4): all within 0.25 of the centre has chance (0.625)^24.
    assert!(farthest > 0.25, "{farthest}");
}

/// `zoom` scales the anatomy about the body's centre: the same case zoomed by 1.5 has 1.5^3 times
/// the target voxels in 3D and 1.5^2 in 2D, up to the voxelisation of its surface.
#[test]
fn zoom_scales_the_target() {
    for (size, power) in [([40, 40, 40], 3), ([1, 96, 96], 2)] {
        let at = |z: f64| {
            let knobs = SyntheticKnobs {
                zoom: (z, z),
                ..body_only()
            };
            count(&foreground(&case(&config(2, size, knobs), 0)))
        };
        let ratio = at(1.5) as f64 / at(1.0) as f64;
        let expected = 1.5f64.powi(power);
        assert!(
            (ratio / expected - 1.0).abs() < 0.1,
            "{size:?}: ratio {ratio}, expected {expected}"
        );
    }
}

/// `branches` add side tubes to the tubes: the target with branches covers the one without and
/// more; nothing else of the case is drawn differently, so the rest of the label stays.
#[test]
fn branches_only_add_to_the_target() {
    let with = |n: usize| SyntheticKnobs {
        tubes: (2, 2),
        branches: (n, n),
        holes: (0, 0),
        ..clean_knobs()
    };
    for i in 0..3 {
        let plain = foreground(&case(&config(3, [40, 40, 40], with(0)), i));
        let branched = foreground(&case(&config(3, [40, 40, 40], with(2)), i));
        assert!(
            plain.iter().zip(&branched).all(|(p, b)| !*p || *b),
            "case {i}"
        );
        assert!(count(&branched) > count(&plain), "case {i}");
    }
}

/// `holes` cut tunnels through the body: the target with holes is a strict part of the one
/// without, and what they remove is tissue and wall now, darker than the target's blood.
#[test]
fn holes_cut_tissue_out_of_the_target() {
    let with = |n: usize| SyntheticKnobs {
        holes: (n, n),
        contrast: 0.0,
        ..clean_knobs()
    };
    for i in 0..3 {
        let whole = case(&config(4, [40, 40, 40], with(0)), i);
        let holed = case(&config(4, [40, 40, 40], with(2)), i);
        let (a, b) = (foreground(&whole), foreground(&holed));
        assert!(a.iter().zip(&b).all(|(a, b)| *a || !*b), "case {i}");
        let mean = |mask: &dyn Fn(usize) -> bool| {
            let values: Vec<f64> = (0..a.len())
                .filter(|&v| mask(v))
                .map(|v| holed.image.data[v] as f64)
                .collect();
            (
                values.iter().sum::<f64>() / values.len() as f64,
                values.len(),
            )
        };
        let (removed, n) = mean(&|v| a[v] && !b[v]);
        let (kept, _) = mean(&|v| b[v]);
        assert!(n > 0, "case {i}: the holes removed nothing");
        assert!(
            removed < 0.8 * kept,
            "case {i}: removed {removed}, kept {kept}"
        );
    }
}

/// `contrast` maps every clean intensity v to v^g: on an image without noise, blur, bias or
/// resampling, ln(image) with contrast is exactly g ln(image without) + (1 - g) ln(gain), one g
/// per case, within exp(+-contrast), and the labels stay.
#[test]
fn contrast_is_a_power_curve_per_case() {
    let with = |c: f64| {
        config(
            5,
            [1, 48, 48],
            SyntheticKnobs {
                contrast: c,
                ..clean_knobs()
            },
        )
    };
    let mut exponents = Vec::new();
    for i in 0..3 {
        let (plain, curved) = (case(&with(0.0), i), case(&with(1.0), i));
        assert_eq!(plain.label.data, curved.label.data);
        let ln = |c: &SyntheticCase| -> Vec<f64> {
            c.image.data.iter().map(|&v| (v as f64).ln()).collect()
        };
        let (x, y) = (ln(&plain), ln(&curved));
        let n = x.len() as f64;
        let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
        let sxy: f64 = x.iter().zip(&y).map(|(a, b)| (a - mx) * (b - my)).sum();
        let sxx: f64 = x.iter().map(|a| (a - mx).powi(2)).sum();
        let g = sxy / sxx;
        // f32 images: ln of a value with 24 significant bits is exact to about 1e-7, times g.
        let worst = (x.iter().zip(&y))
            .map(|(a, b)| (b - my - g * (a - mx)).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-5, "case {i}: off the power law by {worst}");
        assert!((-1.0..=1.0).contains(&g.ln()), "case {i}: g = {g}");
        exponents.push(g);
    }
    assert!(
        exponents.iter().any(|g| (g - 1.0).abs() > 0.05),
        "{exponents:?}"
    );
}

/// The sum of squared differences between neighbours along W: how much fine detail there is.
fn roughness(c: &SyntheticCase) -> f64 {
    let w = c.image.dims[2];
    (c.image.data.windows(2).enumerate())
        .filter(|(i, _)| (i + 1) % w != 0)
        .map(|(_, p)| (p[1] as f64 - p[0] as f64).powi(2))
        .sum()
}

/// `resolution` acquires the image on coarser voxels: the same case at voxel size 3 has the same
/// label and much less fine detail, its mean intensity about kept.
#[test]
fn resolution_coarsens_the_image_and_keeps_the_label() {
    let with = |r: f64| {
        config(
            6,
            [1, 64, 64],
            SyntheticKnobs {
                resolution: (r, r),
                ..clean_knobs()
            },
        )
    };
    for i in 0..3 {
        let (fine, coarse) = (case(&with(1.0), i), case(&with(3.0), i));
        assert_eq!(fine.label.data, coarse.label.data);
        assert!(
            roughness(&coarse) < 0.5 * roughness(&fine),
            "case {i}: {} vs {}",
            roughness(&coarse),
            roughness(&fine)
        );
        let mean = |c: &SyntheticCase| c.image.data.iter().map(|&v| v as f64).sum::<f64>();
        let ratio = mean(&coarse) / mean(&fine);
        assert!((ratio - 1.0).abs() < 0.03, "case {i}: mean ratio {ratio}");
    }
}

/// A 2D case is the plane z = 0 of the same 3D anatomy: with the body centred (so the 3D case's
/// centre is on that plane too), no blobs (drawn over the volume's own extent) and nothing that
/// mixes neighbouring slices (blur, resampling) or differs per voxel index (noise), it is the
/// middle slice of an odd-depth 3D case with the same H and W.
#[test]
fn a_2d_case_is_the_middle_plane_of_the_3d_anatomy() {
    let knobs = SyntheticKnobs {
        position: 0.0,
        blobs: 0,
        bias: 0.3,
        ..clean_knobs()
    };
    for i in 0..3 {
        let flat = case(&config(7, [1, 48, 48], knobs.clone()), i);
        let deep = case(&config(7, [49, 48, 48], knobs.clone()), i);
        let plane = 48 * 48;
        let middle = &deep.image.data[24 * plane..25 * plane];
        assert_eq!(flat.image.data, middle, "case {i}");
        assert_eq!(flat.label.data, &deep.label.data[24 * plane..25 * plane]);
        assert!(
            flat.label.data.iter().any(|&v| v > 0.5),
            "case {i}: no target"
        );
    }
}

/// Every part of a case has its own random stream: more tubes leave the distractors, the body and
/// the appearance as they were (the image away from the target is the same).
#[test]
fn a_knob_leaves_the_other_parts_of_the_case_alone() {
    let with = |n: usize| {
        config(
            8,
            [1, 64, 64],
            SyntheticKnobs {
                tubes: (n, n),
                ..clean_knobs()
            },
        )
    };
    for i in 0..3 {
        let (few, many) = (case(&with(1), i), case(&with(4), i));
        let (a, b) = (foreground(&few), foreground(&many));
        assert!(a.iter().zip(&b).all(|(a, b)| !*a || *b), "case {i}");
        // Voxels far from either target (neither it nor its wall) keep their intensity.
        let same = (0..a.len())
            .filter(|&v| few.image.data[v] == many.image.data[v])
            .count();
        assert!(same as f64 > 0.5 * a.len() as f64, "case {i}: {same}");
    }
}

#[test]
fn knobs_out_of_their_ranges_are_errors_that_name_them() {
    let bad = |knobs: SyntheticKnobs| {
        synthetic::case(&config(0, [1, 16, 16], knobs), 0)
            .unwrap_err()
            .to_string()
    };
    let d = SyntheticKnobs::default;
    for (knobs, name) in [
        (
            SyntheticKnobs {
                zoom: (0.1, 1.0),
                ..d()
            },
            "zoom",
        ),
        (
            SyntheticKnobs {
                resolution: (0.5, 2.0),
                ..d()
            },
            "resolution",
        ),
        (
            SyntheticKnobs {
                position: -0.1,
                ..d()
            },
            "position",
        ),
        (
            SyntheticKnobs {
                contrast: f64::NAN,
                ..d()
            },
            "contrast",
        ),
        (
            SyntheticKnobs {
                branches: (2, 1),
                ..d()
            },
            "branches",
        ),
        (
            SyntheticKnobs {
                holes: (3, 0),
                ..d()
            },
            "holes",
        ),
    ] {
        let e = bad(knobs);
        assert!(e.contains(name), "{name}: {e}");
    }
    let e = synthetic::case(&config(0, [2, 16, 16], d()), 0).unwrap_err();
    assert!(e.to_string().contains("D may be 1"), "{e}");
}
