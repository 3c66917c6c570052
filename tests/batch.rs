//! Two-stream batches: reproducible per iteration, images and labels augmented alike, crops centred
//! on foreground when asked, and augmentation a permutation of the voxels.

use metaseg::data::Volume;
use metaseg::train::augment::RotateScale;
use metaseg::train::batch::{sample, LoadedCase, Sampling};
use metaseg_autograd::Warp;

/// A case whose image equals its label (0 or 1), so any misalignment between the two shows.
fn case(name: &str, dims: [usize; 3], seed: u64) -> LoadedCase {
    let n: usize = dims.iter().product();
    let label: Vec<u8> = (0..n)
        .map(|i| u8::from(metaseg_autograd::random::uniform(seed, i as u64) < 0.2))
        .collect();
    let image = label.iter().map(|&l| f32::from(l)).collect();
    LoadedCase {
        name: name.into(),
        image: Volume::new(image, dims, [1.0; 3]).unwrap(),
        label: Some(label),
    }
}

fn sampling(patch: [usize; 3], foreground: f64) -> Sampling {
    Sampling {
        patch,
        foreground,
        rotate_flip: true,
        intensity: 0.0,
        noise: 0.0,
        unlabeled_labels: false,
    }
}

#[test]
fn a_batch_depends_only_on_the_seed_and_the_iteration() {
    let cases = [case("a", [6, 9, 8], 1), case("b", [7, 8, 8], 2)];
    let s = sampling([4, 5, 5], 0.5);
    let b = |seed, it| sample(&cases, &cases, (2, 2), 2, &s, seed, it);
    assert_eq!(b(3, 10), b(3, 10));
    assert_ne!(b(3, 10), b(3, 11));
    assert_ne!(b(3, 10), b(4, 10));
    let batch = b(3, 10);
    assert_eq!(batch.images.len(), 4 * 100);
    assert_eq!(batch.labels.len(), 2 * 2 * 100);
}

#[test]
fn labels_follow_their_images_through_crop_rotation_and_flip() {
    let cases = [case("a", [6, 9, 8], 1)];
    let s = sampling([4, 5, 5], 0.5);
    for it in 0..20 {
        let batch = sample(&cases, &[], (1, 0), 2, &s, 9, it);
        // Channel 1 of the one-hot label is the foreground, which is the image.
        assert_eq!(batch.images, batch.labels[100..], "iteration {it}");
    }
}

#[test]
fn foreground_crops_are_centred_on_foreground() {
    // Three foreground voxels away from the borders, so no crop around them is clamped.
    let mut sparse = case("a", [9, 9, 9], 5);
    let label: Vec<u8> = (0..729)
        .map(|i| u8::from([100, 364, 600].contains(&i)))
        .collect();
    sparse.image.data = label.iter().map(|&l| f32::from(l)).collect();
    sparse.label = Some(label);
    let cases = [sparse];
    let mut s = sampling([3, 3, 3], 1.0);
    s.rotate_flip = false;
    for it in 0..20 {
        let batch = sample(&cases, &[], (1, 0), 2, &s, 2, it);
        assert_eq!(
            batch.images[13], 1.0,
            "iteration {it}: the centre voxel is background"
        );
    }
}

#[test]
fn augmentation_permutes_the_voxels_of_a_whole_volume_crop() {
    let cases = [case("a", [4, 6, 6], 3)];
    let plain = Sampling {
        rotate_flip: false,
        ..sampling([4, 6, 6], 0.0)
    };
    let reference: Vec<f64> = cases[0].image.data.iter().map(|&v| f64::from(v)).collect();
    assert_eq!(
        sample(&cases, &[], (1, 0), 2, &plain, 1, 0).images,
        reference
    );
    let mut changed = false;
    for it in 0..8 {
        let images = sample(&cases, &[], (1, 0), 2, &sampling([4, 6, 6], 0.0), 1, it).images;
        let (mut a, mut b) = (images.clone(), reference.clone());
        a.sort_by(f64::total_cmp);
        b.sort_by(f64::total_cmp);
        assert_eq!(a, b);
        changed |= images != reference;
    }
    assert!(changed, "no iteration rotated or flipped");
}

#[test]
fn device_warps_depend_on_the_seed_iteration_and_slot_and_stay_in_their_bounds() {
    let r = RotateScale {
        rotate: 15.0,
        scale: 0.1,
    };
    let patch = [6, 8, 8];
    assert_eq!(r.warp(patch, 1, 5, 0), r.warp(patch, 1, 5, 0));
    assert_ne!(r.warp(patch, 1, 5, 0), r.warp(patch, 1, 5, 1));
    assert_ne!(r.warp(patch, 1, 5, 0), r.warp(patch, 1, 6, 0));
    assert_ne!(r.warp(patch, 1, 5, 0), r.warp(patch, 2, 5, 0));
    for slot in 0..20 {
        // The linear part is R^T / scale: its determinant is 1 / scale^3.
        let m = r.warp(patch, 7, 3, slot).matrix;
        let det = m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
            - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]);
        let scale = det.cbrt().recip();
        assert!((0.9..=1.1).contains(&scale), "scale {scale}");
        // The angle of the whole rotation is at most the sum of the three angles.
        let trace = (m[0][0] + m[1][1] + m[2][2]) * scale;
        let angle = ((trace - 1.0) / 2.0).clamp(-1.0, 1.0).acos().to_degrees();
        assert!(angle <= 45.0 + 1e-9, "angle {angle}");
    }
    // A 2D patch (depth 1) turns in its H-W plane only: D maps to D.
    for slot in 0..5 {
        let m = r.warp([1, 8, 8], 7, 3, slot).matrix;
        assert_eq!(m[0], [1.0, 0.0, 0.0, 0.0], "slot {slot}");
        assert_eq!([m[1][0], m[2][0]], [0.0, 0.0]);
    }
    let off = RotateScale {
        rotate: 0.0,
        scale: 0.0,
    };
    assert!(off.is_off());
    assert_eq!(
        off.warp(patch, 1, 5, 0).matrix,
        Warp::identity(patch).matrix
    );
}
