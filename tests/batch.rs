//! Two-stream batches: reproducible per iteration, images and labels augmented alike, crops centred
//! on foreground when asked, and augmentation a permutation of the voxels.

use metaseg::data::Volume;
use metaseg::train::batch::{sample, LoadedCase, Sampling};

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
