//! Segmentation metrics (CPU only) against their definitions written out by brute force: surface
//! voxels found by looking at each voxel's six face neighbours, surface distances over every pair
//! of surface voxels, the percentile as numpy's linear rule states it; on seeded random masks with
//! odd sizes and anisotropic spacing, on empty masks, and on two concentric boxes whose values are
//! derived by hand.

use metaseg::eval::metrics::{
    binary_metrics, class_metrics, overlap, percentile, summarize, surface, Grid, Metrics, Stat,
};
use metaseg_autograd::check::seeded;

/// Voxel coordinates (z, y, x) of index `i` on `dims`.
fn coords(i: usize, [_, h, w]: [usize; 3]) -> [i64; 3] {
    [(i / (h * w)) as i64, (i / w % h) as i64, (i % w) as i64]
}

/// A voxel of the mask is on its surface if one of its six face neighbours is background or lies
/// outside the volume (erosion with the border counted as background).
fn surface_brute(mask: &[bool], dims: [usize; 3]) -> Vec<bool> {
    let inside = |c: [i64; 3]| (0..3).all(|a| c[a] >= 0 && c[a] < dims[a] as i64);
    let index = |c: [i64; 3]| ((c[0] as usize * dims[1]) + c[1] as usize) * dims[2] + c[2] as usize;
    let steps = [
        [1, 0, 0],
        [-1, 0, 0],
        [0, 1, 0],
        [0, -1, 0],
        [0, 0, 1],
        [0, 0, -1],
    ];
    (0..mask.len())
        .map(|i| {
            let c = coords(i, dims);
            mask[i]
                && steps.iter().any(|s| {
                    let n = [c[0] + s[0], c[1] + s[1], c[2] + s[2]];
                    !inside(n) || !mask[index(n)]
                })
        })
        .collect()
}

/// For every surface voxel of `from` (in index order), the least physical distance to a surface
/// voxel of `to`, over all pairs.
fn directed_brute(from: &[bool], to: &[bool], grid: Grid) -> Vec<f64> {
    let (sf, st) = (surface_brute(from, grid.dims), surface_brute(to, grid.dims));
    let targets: Vec<[i64; 3]> = (0..to.len())
        .filter(|&j| st[j])
        .map(|j| coords(j, grid.dims))
        .collect();
    (0..from.len())
        .filter(|&i| sf[i])
        .map(|i| {
            let a = coords(i, grid.dims);
            targets
                .iter()
                .map(|b| {
                    (0..3)
                        .map(|k| ((a[k] - b[k]) as f64 * grid.spacing[k]).powi(2))
                        .sum::<f64>()
                        .sqrt()
                })
                .fold(f64::INFINITY, f64::min)
        })
        .collect()
}

/// numpy's default percentile: sorted values, position q/100 (n - 1), linear between neighbours.
fn percentile_plain(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let position = q / 100.0 * (v.len() - 1) as f64;
    let lo = position.floor() as usize;
    let hi = (lo + 1).min(v.len() - 1);
    v[lo] + (position - lo as f64) * (v[hi] - v[lo])
}

/// The metrics by their definitions (module documentation of metaseg::eval::metrics).
fn metrics_brute(a: &[bool], b: &[bool], grid: Grid) -> Metrics {
    let count = |m: &[bool]| m.iter().filter(|&&v| v).count();
    let both = a.iter().zip(b).filter(|(&x, &y)| x && y).count();
    let either = a.iter().zip(b).filter(|(&x, &y)| x || y).count();
    let (na, nb) = (count(a), count(b));
    let mut m = Metrics {
        dice: if na + nb == 0 {
            1.0
        } else {
            2.0 * both as f64 / (na + nb) as f64
        },
        jaccard: if either == 0 {
            1.0
        } else {
            both as f64 / either as f64
        },
        hd95: None,
        asd: None,
        assd: None,
        pred_voxels: na,
        reference_voxels: nb,
    };
    if na > 0 && nb > 0 {
        let (ab, ba) = (directed_brute(a, b, grid), directed_brute(b, a, grid));
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        m.hd95 = Some(percentile_plain(&[ab.clone(), ba.clone()].concat(), 95.0));
        m.asd = Some(mean(&ab));
        m.assd = Some(mean(&[ab, ba].concat()));
    }
    m
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * (1.0 + b.abs())
}

fn assert_metrics(got: &Metrics, want: &Metrics, what: &str) {
    assert_eq!(got.pred_voxels, want.pred_voxels, "{what}: pred voxels");
    assert_eq!(got.reference_voxels, want.reference_voxels, "{what}");
    let names = ["dice", "jaccard", "hd95", "asd", "assd"];
    for ((g, w), name) in got.values().iter().zip(want.values()).zip(names) {
        match (g, w) {
            (Some(g), Some(w)) => assert!(close(*g, w), "{what}: {name} {g} vs {w}"),
            (None, None) => {}
            _ => panic!("{what}: {name} {g:?} vs {w:?}"),
        }
    }
}

/// A seeded random mask of `density` inside the box [lo, hi) of each axis (false outside).
fn random_mask(
    dims: [usize; 3],
    seed: u64,
    density: f64,
    lo: [usize; 3],
    hi: [usize; 3],
) -> Vec<bool> {
    let u = seeded(dims.iter().product(), seed, 0.0, 1.0);
    (0..u.len())
        .map(|i| {
            let c = coords(i, dims);
            let in_box = (0..3).all(|a| c[a] as usize >= lo[a] && (c[a] as usize) < hi[a]);
            in_box && u[i] < density
        })
        .collect()
}

#[test]
fn surface_is_the_mask_minus_its_face_eroded_interior_with_the_border_as_background() {
    for (k, dims) in [[5, 7, 9], [1, 9, 13], [6, 3, 11]].into_iter().enumerate() {
        let mask = random_mask(dims, 10 + k as u64, 0.7, [0; 3], dims);
        assert_eq!(surface(&mask, dims), surface_brute(&mask, dims), "{dims:?}");
    }
    // A full volume: only its faces are surface (outside counts as background).
    let dims = [3, 4, 5];
    let s = surface(&[true; 60], dims);
    let interior = (0..60).filter(|&i| !s[i]).collect::<Vec<_>>();
    assert_eq!(
        interior,
        vec![
            (4 + 1) * 5 + 1,
            (4 + 1) * 5 + 2,
            (4 + 1) * 5 + 3,
            (4 + 2) * 5 + 1,
            (4 + 2) * 5 + 2,
            (4 + 2) * 5 + 3
        ]
    );
}

#[test]
fn metrics_match_brute_force_on_random_masks_with_anisotropic_spacing() {
    let cases: [([usize; 3], [f64; 3]); 4] = [
        ([5, 7, 9], [2.5, 0.7, 1.3]),
        ([1, 9, 13], [3.0, 0.9, 1.1]),
        ([7, 5, 6], [1.0, 1.0, 1.0]),
        ([9, 11, 3], [0.5, 1.7, 2.2]),
    ];
    for (k, (dims, spacing)) in cases.into_iter().enumerate() {
        let grid = Grid { dims, spacing };
        let seed = 100 + 10 * k as u64;
        // Full-volume masks (surfaces on the border) and masks in sub-boxes (a bounding box
        // smaller than the volume), of different densities.
        let inner_lo = dims.map(|d| d / 4);
        let inner_hi = dims.map(|d| (d - d / 4).max(d / 4 + 1));
        let pairs = [
            (
                random_mask(dims, seed, 0.5, [0; 3], dims),
                random_mask(dims, seed + 1, 0.6, [0; 3], dims),
            ),
            (
                random_mask(dims, seed + 2, 0.8, inner_lo, inner_hi),
                random_mask(dims, seed + 3, 0.3, [0; 3], dims),
            ),
            (
                random_mask(dims, seed + 4, 0.9, inner_lo, inner_hi),
                random_mask(dims, seed + 5, 0.9, inner_lo, inner_hi),
            ),
        ];
        for (j, (a, b)) in pairs.iter().enumerate() {
            let what = format!("dims {dims:?} spacing {spacing:?} pair {j}");
            let got = binary_metrics(a, b, grid).unwrap();
            assert!(got.hd95.is_some(), "{what}: both masks are non-empty");
            assert_metrics(&got, &metrics_brute(a, b, grid), &what);
        }
    }
}

#[test]
fn class_metrics_are_the_binary_metrics_of_each_class() {
    let dims = [5, 6, 7];
    let grid = Grid {
        dims,
        spacing: [1.5, 0.8, 1.1],
    };
    let classes = |seed| -> Vec<u8> {
        seeded(210, seed, 0.0, 3.0)
            .into_iter()
            .map(|u| u as u8)
            .collect()
    };
    let (pred, reference) = (classes(7), classes(8));
    for class in 0..3u8 {
        let a: Vec<bool> = pred.iter().map(|&v| v == class).collect();
        let b: Vec<bool> = reference.iter().map(|&v| v == class).collect();
        let got = class_metrics(&pred, &reference, class, grid).unwrap();
        assert_metrics(
            &got,
            &metrics_brute(&a, &b, grid),
            &format!("class {class}"),
        );
    }
    // Foreground overlap (what validation Dice uses): classes 1 and 2 together.
    let fg = overlap(&pred, &reference, |v| v > 0);
    let a: Vec<bool> = pred.iter().map(|&v| v > 0).collect();
    let b: Vec<bool> = reference.iter().map(|&v| v > 0).collect();
    assert!(close(fg.dice(), metrics_brute(&a, &b, grid).dice));
}

#[test]
fn empty_masks_give_undefined_distances_not_numbers() {
    let dims = [4, 5, 3];
    let grid = Grid {
        dims,
        spacing: [1.0, 2.0, 0.5],
    };
    let some = random_mask(dims, 3, 0.4, [0; 3], dims);
    let n = some.iter().filter(|&&v| v).count();
    assert!(n > 0);
    let none = vec![false; 60];

    let empty_pred = binary_metrics(&none, &some, grid).unwrap();
    assert_eq!((empty_pred.dice, empty_pred.jaccard), (0.0, 0.0));
    assert_eq!(
        (empty_pred.hd95, empty_pred.asd, empty_pred.assd),
        (None, None, None)
    );
    assert_eq!(
        (empty_pred.pred_voxels, empty_pred.reference_voxels),
        (0, n)
    );

    let empty_ref = binary_metrics(&some, &none, grid).unwrap();
    assert_eq!((empty_ref.dice, empty_ref.jaccard), (0.0, 0.0));
    assert_eq!(
        (empty_ref.hd95, empty_ref.asd, empty_ref.assd),
        (None, None, None)
    );
    assert_eq!((empty_ref.pred_voxels, empty_ref.reference_voxels), (n, 0));

    // Both empty: dice 1 (METHODS.md), jaccard 1 with it, no distances.
    let both = binary_metrics(&none, &none, grid).unwrap();
    assert_eq!(both, Metrics::BOTH_EMPTY);
    assert_eq!((both.dice, both.jaccard, both.hd95), (1.0, 1.0, None));
    // A class absent from both label volumes is the same.
    let zeros = vec![0u8; 60];
    assert_eq!(
        class_metrics(&zeros, &zeros, 1, grid).unwrap(),
        Metrics::BOTH_EMPTY
    );
}

/// Reference B: the cube [2, 8)^3, prediction A: the cube [3, 7)^3 inside it, in a 12^3 grid of
/// spacing s. |A| = 64, |B| = 216, A and B = A: dice = 128 / 280, jaccard = 64 / 216.
/// S(A) is A without its 2^3 core (56 voxels), S(B) is B without its 4^3 core (152 voxels).
/// Every voxel of S(A) has a face neighbour in S(B), and no S(B) voxel is nearer: D_AB = 56 x s.
/// A voxel of S(B) is 1, sqrt 2 or sqrt 3 steps from the cube [3, 6]^3 (whose boundary voxels are
/// all in S(A)) as it sits on a face (6 x 4^2 = 96), an edge (12 x 4 = 48) or a corner (8):
/// D_BA = 96 x s, 48 x sqrt(2) s, 8 x sqrt(3) s.
/// Together 208 values sorted: indices 0-151 are s, 152-199 sqrt(2) s, 200-207 sqrt(3) s; the 95th
/// percentile sits at 0.95 x 207 = 196.65, between two values sqrt(2) s: hd95 = sqrt(2) s.
/// assd is their mean (medpy 0.5): (152 + 48 sqrt(2) + 8 sqrt(3)) s / 208. medpy 0.5.2's
/// `assd(A, B, voxelspacing=(0.8,) * 3)` returned 0.8989948363633062, the formula's value.
#[test]
fn concentric_cubes_give_the_values_derived_by_hand() {
    let s = 0.8;
    let dims = [12; 3];
    let grid = Grid {
        dims,
        spacing: [s; 3],
    };
    let cube = |lo: usize, hi: usize| -> Vec<bool> {
        (0..1728)
            .map(|i| {
                coords(i, dims)
                    .iter()
                    .all(|&c| c >= lo as i64 && c < hi as i64)
            })
            .collect()
    };
    let (a, b) = (cube(3, 7), cube(2, 8));
    let m = binary_metrics(&a, &b, grid).unwrap();
    let (r2, r3) = (2f64.sqrt(), 3f64.sqrt());
    assert!(close(m.dice, 128.0 / 280.0), "dice {}", m.dice);
    assert!(close(m.jaccard, 64.0 / 216.0), "jaccard {}", m.jaccard);
    assert!(close(m.hd95.unwrap(), r2 * s), "hd95 {:?}", m.hd95);
    assert!(close(m.asd.unwrap(), s), "asd {:?}", m.asd);
    let mean_ba = (96.0 + 48.0 * r2 + 8.0 * r3) / 152.0 * s;
    let pooled = (152.0 + 48.0 * r2 + 8.0 * r3) / 208.0 * s;
    assert!(close(m.assd.unwrap(), pooled), "assd {:?}", m.assd);
    // Not the mean of the two directed means (older medpy): 0.8677 here, 3.5 % below.
    assert!((m.assd.unwrap() - (s + mean_ba) / 2.0).abs() > 0.03);
    // The other way round, asd is the mean of D_BA.
    let swapped = binary_metrics(&b, &a, grid).unwrap();
    assert!(close(swapped.asd.unwrap(), mean_ba));
    // Identical masks: every surface distance is 0.
    let same = binary_metrics(&b, &b, grid).unwrap();
    assert_eq!(
        (same.dice, same.hd95, same.assd),
        (1.0, Some(0.0), Some(0.0))
    );
}

#[test]
fn percentile_follows_numpys_linear_rule() {
    // Sorted [1, 2, 3, 4]: position 0.95 x 3 = 2.85, so 3 + 0.85 (4 - 3) = 3.85.
    assert!(close(percentile(&[4.0, 1.0, 3.0, 2.0], 95.0), 3.85));
    // Position 0.5 x 4 = 2 exactly: the middle value; one value: itself.
    assert_eq!(percentile(&[5.0, 1.0, 9.0, 3.0, 7.0], 50.0), 5.0);
    assert_eq!(percentile(&[2.5], 95.0), 2.5);
    let v = seeded(37, 5, 0.0, 10.0);
    for q in [0.0, 5.0, 50.0, 95.0, 100.0] {
        assert!(close(percentile(&v, q), percentile_plain(&v, q)), "q {q}");
    }
}

#[test]
fn summaries_skip_undefined_values_and_count_them() {
    // Mean of 1 and 3 is 2; population std sqrt(((1 - 2)^2 + (3 - 2)^2) / 2) = 1.
    let s = Stat::of(&[Some(1.0), None, Some(3.0)]);
    assert_eq!(
        (s.mean, s.std, s.defined, s.undefined),
        (Some(2.0), Some(1.0), 2, 1)
    );
    let none = Stat::of(&[None, None]);
    assert_eq!(
        (none.mean, none.std, none.defined, none.undefined),
        (None, None, 0, 2)
    );
    let cases = [
        Metrics {
            dice: 0.5,
            jaccard: 1.0 / 3.0,
            hd95: Some(2.0),
            asd: Some(1.0),
            assd: Some(1.5),
            pred_voxels: 3,
            reference_voxels: 5,
        },
        Metrics::BOTH_EMPTY,
    ];
    let [dice, _, hd95, ..] = summarize(&cases);
    assert_eq!(
        (dice.mean, dice.std, dice.defined),
        (Some(0.75), Some(0.25), 2)
    );
    assert_eq!((hd95.mean, hd95.defined, hd95.undefined), (Some(2.0), 1, 1));
}
