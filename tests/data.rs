//! The data layer without a GPU: NIfTI round trips and hand-built files (vox_offset, scaling, byte
//! order, qform), errors for bad files, the MSD layout and splits, preprocessing, and the synthetic
//! default data set.

use metaseg::data::nifti::{self, Dtype, Volume};
use metaseg::data::preprocess::{self, Clip, CropBox};
use metaseg::data::synthetic::{self, SyntheticConfig, SyntheticKnobs};
use metaseg::data::{DataError, Msd, SplitFile, SplitSpec};
use metaseg::train::config::TrainConfig;
use metaseg::train::run;
use metaseg_autograd::random::uniform;
use std::path::{Path, PathBuf};
use tempfile::TempDir;

const DIMS: [usize; 3] = [3, 5, 7]; // [D, H, W], odd so no axis can be mistaken for another

/// Values that every dtype holds exactly: integers in [lo, lo + 100), fractions for floats.
fn values(dtype: Dtype, n: usize, seed: u64) -> Vec<f32> {
    let signed = matches!(dtype, Dtype::I8 | Dtype::I16 | Dtype::I32 | Dtype::I64);
    let lo = if signed { -50.0 } else { 0.0 };
    (0..n as u64)
        .map(|i| {
            let v = lo + (100.0 * uniform(seed, i)).floor();
            if matches!(dtype, Dtype::F32 | Dtype::F64) {
                (v + 0.25) as f32
            } else {
                v as f32
            }
        })
        .collect()
}

/// A volume with an oblique sform (a rotation about z, anisotropic spacing, an origin).
fn oblique(data: Vec<f32>) -> Volume {
    let mut v = Volume::new(data, DIMS, [2.5, 0.7, 1.3]).unwrap();
    let (c, s) = (0.6f32, 0.8f32);
    v.header.srow_x = [1.3 * c, -0.7 * s, 0.0, -10.5];
    v.header.srow_y = [1.3 * s, 0.7 * c, 0.0, 20.25];
    v.header.srow_z = [0.0, 0.0, 2.5, 3.0];
    v
}

fn assert_same_geometry(a: &Volume, b: &Volume) {
    assert_eq!(a.dims, b.dims);
    assert_eq!(a.channels, b.channels);
    for i in 0..3 {
        assert!(
            (a.spacing[i] - b.spacing[i]).abs() < 1e-6,
            "{:?} {:?}",
            a.spacing,
            b.spacing
        );
    }
    assert_eq!(a.affine(), b.affine());
}

#[test]
fn round_trip_every_dtype_nii_and_gz() {
    let dir = TempDir::new().unwrap();
    let n: usize = DIMS.iter().product();
    for (k, dtype) in Dtype::ALL.into_iter().enumerate() {
        for ext in ["nii", "nii.gz"] {
            let volume = oblique(values(dtype, n, k as u64));
            let path = dir.path().join(format!("v{k}.{ext}"));
            nifti::write(&path, &volume, dtype).unwrap();
            let back = nifti::read(&path).unwrap();
            assert_eq!(back.data, volume.data, "{dtype:?} .{ext}");
            assert_same_geometry(&back, &volume);
            assert_eq!(back.header.datatype, dtype.nifti_type() as i16);
        }
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        20,
        "temporary files left"
    );
}

/// The axis order against the nifti crate's own reader, which indexes its array by (x, y, z):
/// voxel (x, y, z) must be data[(z * H + y) * W + x].
#[test]
fn axis_order_matches_the_nifti_crates_xyz_indexing() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("v.nii");
    let n: usize = DIMS.iter().product();
    nifti::write(&path, &oblique(values(Dtype::F32, n, 3)), Dtype::F32).unwrap();
    let ours = nifti::read(&path).unwrap();
    use ::nifti::{IntoNdArray as _, NiftiObject as _};
    let theirs = ::nifti::ReaderOptions::new()
        .read_file(&path)
        .unwrap()
        .into_volume()
        .into_ndarray::<f32>()
        .unwrap();
    let [d, h, w] = DIMS;
    assert_eq!(theirs.shape(), &[w, h, d]);
    for z in 0..d {
        for y in 0..h {
            for x in 0..w {
                assert_eq!(theirs[[x, y, z]], ours.data[(z * h + y) * w + x]);
            }
        }
    }
}

/// The fields of a NIfTI-1 header a test sets by hand; the rest are zero.
struct RawHeader {
    big_endian: bool,
    dim: [i16; 8],
    datatype: i16,
    bitpix: i16,
    pixdim: [f32; 8],
    vox_offset: f32,
    scl_slope: f32,
    scl_inter: f32,
    qform_code: i16,
    sform_code: i16,
    quatern: [f32; 6],
    srow: [[f32; 4]; 3],
}

impl RawHeader {
    fn int16(dims_xyz: [i16; 3]) -> Self {
        RawHeader {
            big_endian: false,
            dim: [3, dims_xyz[0], dims_xyz[1], dims_xyz[2], 1, 1, 1, 1],
            datatype: 4,
            bitpix: 16,
            pixdim: [1.0, 1.5, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0],
            vox_offset: 352.0,
            scl_slope: 1.0,
            scl_inter: 0.0,
            qform_code: 0,
            sform_code: 0,
            quatern: [0.0; 6],
            srow: [[0.0; 4]; 3],
        }
    }

    /// The 348 header bytes at the offsets of the NIfTI-1 standard (nifti1.h), then the 4-byte
    /// extender (no extensions) and zeros up to vox_offset.
    fn bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; 348];
        let be = self.big_endian;
        let mut put = |at: usize, bytes: &[u8]| b[at..at + bytes.len()].copy_from_slice(bytes);
        let i32b = |v: i32| if be { v.to_be_bytes() } else { v.to_le_bytes() };
        let i16b = |v: i16| if be { v.to_be_bytes() } else { v.to_le_bytes() };
        let f32b = |v: f32| if be { v.to_be_bytes() } else { v.to_le_bytes() };
        put(0, &i32b(348));
        for (i, d) in self.dim.iter().enumerate() {
            put(40 + 2 * i, &i16b(*d));
        }
        put(70, &i16b(self.datatype));
        put(72, &i16b(self.bitpix));
        for (i, p) in self.pixdim.iter().enumerate() {
            put(76 + 4 * i, &f32b(*p));
        }
        put(108, &f32b(self.vox_offset));
        put(112, &f32b(self.scl_slope));
        put(116, &f32b(self.scl_inter));
        put(252, &i16b(self.qform_code));
        put(254, &i16b(self.sform_code));
        for (i, q) in self.quatern.iter().enumerate() {
            put(256 + 4 * i, &f32b(*q));
        }
        for (r, row) in self.srow.iter().enumerate() {
            for (i, v) in row.iter().enumerate() {
                put(280 + 16 * r + 4 * i, &f32b(*v));
            }
        }
        put(344, b"n+1\0");
        b.resize(self.vox_offset as usize, 0);
        b
    }

    fn file(&self, dir: &Path, name: &str, raw: &[i16]) -> PathBuf {
        let mut bytes = self.bytes();
        for v in raw {
            let v = if self.big_endian {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            };
            bytes.extend_from_slice(&v);
        }
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

fn ramp16(n: usize) -> Vec<i16> {
    (0..n as i16).map(|i| i * 7 - 40).collect()
}

/// vox_offset 480 with no extensions, big-endian, scaled: the trap of nifti 0.18 (shared/DATA.md).
#[test]
fn vox_offset_beyond_352_is_honoured() {
    let dir = TempDir::new().unwrap();
    let mut header = RawHeader::int16([4, 3, 2]);
    header.vox_offset = 480.0;
    header.big_endian = true;
    header.scl_slope = 2.0;
    header.scl_inter = -3.0;
    let raw = ramp16(24);
    let path = header.file(dir.path(), "offset.nii", &raw);
    let volume = nifti::read(&path).unwrap();
    let expected: Vec<f32> = raw.iter().map(|&r| r as f32 * 2.0 - 3.0).collect();
    assert_eq!(volume.data, expected);
    assert_eq!(volume.dims, [2, 3, 4]);
    assert_eq!(volume.spacing, [3.0, 2.0, 1.5]);
    // The same file through the crate's reader starts at byte 352: if this ever reads correctly,
    // the crate fixed the trap and this module could use its reader.
    let crate_read = ::nifti::ReaderOptions::new().read_file(&path);
    let crate_values = crate_read.map(|o| {
        use ::nifti::{IntoNdArray as _, NiftiObject as _};
        o.into_volume()
            .into_ndarray::<f32>()
            .unwrap()
            .t()
            .iter()
            .copied()
            .collect::<Vec<_>>()
    });
    assert!(crate_values.map_or(true, |v| v != expected));
}

#[test]
fn scl_slope_zero_means_no_scaling_and_slope_applies_otherwise() {
    let dir = TempDir::new().unwrap();
    let raw = ramp16(24);
    let mut header = RawHeader::int16([4, 3, 2]);
    header.scl_slope = 0.0;
    header.scl_inter = 5.0;
    let plain = nifti::read(&header.file(dir.path(), "a.nii", &raw)).unwrap();
    assert_eq!(
        plain.data,
        raw.iter().map(|&r| r as f32).collect::<Vec<_>>()
    );
    header.scl_slope = 0.5;
    let scaled = nifti::read(&header.file(dir.path(), "b.nii", &raw)).unwrap();
    assert_eq!(
        scaled.data,
        raw.iter()
            .map(|&r| r as f32 * 0.5 + 5.0)
            .collect::<Vec<_>>()
    );
}

/// qform of a 90 degree rotation about z: quaternion (a, b, c, d) = (cos 45, 0, 0, sin 45) gives
/// R = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]; columns scaled by pixdim (1.5, 2, 3) and the third by
/// qfac = pixdim[0] = -1; translation = qoffset.
#[test]
fn qform_is_used_without_sform_and_sform_wins_over_it() {
    let dir = TempDir::new().unwrap();
    let mut header = RawHeader::int16([4, 3, 2]);
    header.pixdim[0] = -1.0;
    header.qform_code = 1;
    header.quatern = [0.0, 0.0, std::f32::consts::FRAC_1_SQRT_2, 10.0, -20.0, 30.0];
    let path = header.file(dir.path(), "q.nii", &ramp16(24));
    let affine = nifti::read(&path).unwrap().affine();
    let expected = [
        [0.0, -2.0, 0.0, 10.0],
        [1.5, 0.0, 0.0, -20.0],
        [0.0, 0.0, -3.0, 30.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    for i in 0..4 {
        for j in 0..4 {
            assert!((affine[i][j] - expected[i][j]).abs() < 1e-6, "{affine:?}");
        }
    }
    header.sform_code = 2;
    header.srow = [
        [1.0, 0.0, 0.0, 4.0],
        [0.0, 2.0, 0.0, 5.0],
        [0.0, 0.0, 3.0, 6.0],
    ];
    let path = header.file(dir.path(), "s.nii", &ramp16(24));
    assert_eq!(
        nifti::read(&path).unwrap().affine()[1],
        [0.0, 2.0, 0.0, 5.0]
    );
}

fn expect_err(result: Result<Volume, DataError>, check: impl Fn(&DataError) -> bool) -> String {
    let e = result.expect_err("expected an error");
    assert!(check(&e), "unexpected error: {e:?}");
    e.to_string()
}

#[test]
fn truncated_and_missing_files_are_errors_not_panics() {
    let dir = TempDir::new().unwrap();
    let n: usize = DIMS.iter().product();
    for ext in ["nii", "nii.gz"] {
        let path = dir.path().join(format!("full.{ext}"));
        nifti::write(&path, &oblique(values(Dtype::I16, n, 1)), Dtype::I16).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        for keep in [bytes.len() - 3, 200, 10] {
            let cut = dir.path().join(format!("cut{keep}.{ext}"));
            std::fs::write(&cut, &bytes[..keep]).unwrap();
            let message = expect_err(nifti::read(&cut), |e| {
                matches!(e, DataError::Truncated { .. } | DataError::Malformed { .. })
            });
            assert!(message.contains(&format!("cut{keep}")), "{message}");
        }
    }
    let raw_cut = dir.path().join("cut.nii");
    let mut bytes = RawHeader::int16([4, 3, 2]).bytes();
    bytes.extend_from_slice(&[0; 47]); // 24 int16 values need 48 bytes
    std::fs::write(&raw_cut, bytes).unwrap();
    let message = expect_err(nifti::read(&raw_cut), |e| {
        matches!(e, DataError::Truncated { .. })
    });
    assert!(message.contains("48 bytes"), "{message}");
    let missing = dir.path().join("missing.nii.gz");
    expect_err(nifti::read(&missing), |e| {
        matches!(e, DataError::NotFound { .. })
    });
}

#[test]
fn unsupported_types_and_shapes_are_named() {
    let dir = TempDir::new().unwrap();
    let mut header = RawHeader::int16([2, 2, 2]);
    header.datatype = 32; // complex64
    header.bitpix = 64;
    let path = header.file(dir.path(), "c.nii", &[0; 32]);
    let message = expect_err(nifti::read(&path), |e| {
        matches!(e, DataError::UnsupportedType { .. })
    });
    assert!(
        message.contains("Complex64") && message.contains("c.nii"),
        "{message}"
    );
    let mut header = RawHeader::int16([2, 2, 2]);
    header.dim = [5, 2, 2, 2, 1, 2, 1, 1];
    let path = header.file(dir.path(), "five.nii", &[0; 16]);
    expect_err(nifti::read(&path), |e| {
        matches!(e, DataError::Unsupported { .. })
    });
}

/// dim is signed in the standard: a negative size is an error naming its field, as are a zero
/// size and a bad dim[0] (the `nifti` crate read -1 as 65535 and named dim[0] for any of them).
#[test]
fn bad_dims_are_errors_that_name_their_field() {
    let dir = TempDir::new().unwrap();
    let cases: [([i16; 4], &str); 4] = [
        ([3, 4, -1, 2], "dim[2] (the size of axis 2) is -1"),
        ([3, 0, 3, 2], "dim[1] (the size of axis 1) is 0"),
        ([9, 4, 3, 2], "dim[0] (the number of dimensions) is 9"),
        ([-3, 4, 3, 2], "dim[0] (the number of dimensions) is -3"),
    ];
    for (k, (dim, expected)) in cases.into_iter().enumerate() {
        let mut header = RawHeader::int16([4, 3, 2]);
        header.dim[..4].copy_from_slice(&dim);
        let path = header.file(dir.path(), &format!("dim{k}.nii"), &[0; 24]);
        let message = expect_err(nifti::read(&path), |e| {
            matches!(e, DataError::Malformed { .. })
        });
        assert!(
            message.contains(expected) && message.contains(&format!("dim{k}.nii")),
            "{message}"
        );
    }
}

/// A NaN or infinite voxel, stored or made by scl_slope, is an error naming the file and the first
/// such voxel by its NIfTI index.
#[test]
fn non_finite_voxels_are_errors_naming_the_file_and_voxel() {
    let dir = TempDir::new().unwrap();
    let n: usize = DIMS.iter().product();
    let mut data = values(Dtype::F32, n, 3);
    // (x, y, z) = (2, 4, 1): flat index (z H + y) W + x with [D, H, W] = [3, 5, 7].
    data[(5 + 4) * 7 + 2] = f32::NAN;
    data[n - 1] = f32::INFINITY;
    let path = dir.path().join("nan.nii.gz");
    nifti::write(&path, &oblique(data), Dtype::F32).unwrap();
    let message = expect_err(nifti::read(&path), |e| {
        matches!(e, DataError::NonFinite { .. })
    });
    assert!(
        message.contains("nan.nii.gz") && message.contains("(x, y, z) = (2, 4, 1) is NaN"),
        "{message}"
    );
    // int16 values 0..24 times 2e38: the first past f32's range is 2 (x, y, z) = (2, 0, 0).
    let mut header = RawHeader::int16([4, 3, 2]);
    header.scl_slope = 2e38;
    let raw: Vec<i16> = (0..24).collect();
    let path = header.file(dir.path(), "scaled.nii", &raw);
    let message = expect_err(nifti::read(&path), |e| {
        matches!(e, DataError::NonFinite { .. })
    });
    assert!(
        message.contains("(x, y, z) = (2, 0, 0) is inf"),
        "{message}"
    );
}

#[test]
fn channels_are_the_fourth_axis_and_ncdhw() {
    let dir = TempDir::new().unwrap();
    let n: usize = DIMS.iter().product();
    let mut volume = oblique(values(Dtype::F32, 2 * n, 9)[..n].to_vec());
    volume.data = values(Dtype::F32, 2 * n, 9);
    volume.channels = 2;
    let path = dir.path().join("two.nii.gz");
    nifti::write(&path, &volume, Dtype::F32).unwrap();
    let back = nifti::read(&path).unwrap();
    assert_eq!(back.channels, 2);
    assert_eq!(back.data, volume.data);
    let [d, h, w] = DIMS;
    assert_eq!(&back.header.dim[..5], &[4, w as u16, h as u16, d as u16, 2]);
}

#[test]
fn values_a_dtype_cannot_hold_are_errors() {
    let dir = TempDir::new().unwrap();
    let n: usize = DIMS.iter().product();
    let mut data = vec![1.0; n];
    data[17] = 256.0;
    let path = dir.path().join("big.nii");
    let e = nifti::write(&path, &oblique(data), Dtype::U8).unwrap_err();
    assert!(
        matches!(e, DataError::OutOfRange { index: 17, .. }),
        "{e:?}"
    );
    assert!(!path.exists());
}

#[test]
fn crop_keeps_world_position_and_paste_restores_the_grid() {
    let n: usize = DIMS.iter().product();
    let volume = oblique(values(Dtype::F32, n, 4));
    let b = CropBox {
        start: [1, 2, 3],
        end: [3, 5, 6],
    };
    let cropped = preprocess::crop(&volume, &b).unwrap();
    assert_eq!(cropped.dims, [2, 3, 3]);
    assert_eq!(cropped.header.dim, [3, 3, 3, 2, 1, 1, 1, 1]);
    let world = |v: &Volume, xyz: [f64; 3]| {
        let m = v.affine();
        [0, 1, 2].map(|i| (0..3).map(|j| m[i][j] * xyz[j]).sum::<f64>() + m[i][3])
    };
    let (a, c) = (world(&cropped, [0.0; 3]), world(&volume, [3.0, 2.0, 1.0]));
    assert!((0..3).all(|i| (a[i] - c[i]).abs() < 1e-4), "{a:?} vs {c:?}");
    let [_, h, w] = DIMS;
    assert_eq!(cropped.data[0], volume.data[(h + 2) * w + 3]);
    let restored = preprocess::uncrop(&cropped.data, &b, &volume, -1.0).unwrap();
    for (i, (&r, &v)) in restored.data.iter().zip(&volume.data).enumerate() {
        let (z, y, x) = (i / (h * w), i / w % h, i % w);
        let inside = (1..3).contains(&z) && (2..5).contains(&y) && (3..6).contains(&x);
        assert_eq!(r, if inside { v } else { -1.0 });
    }
    assert_eq!(restored.affine(), volume.affine());
}

#[test]
fn foreground_box_adds_the_margin_grows_to_min_size_and_clamps() {
    let dims = [10, 12, 14];
    let mut label = vec![0.0; 10 * 12 * 14];
    for (z, y, x) in [(4, 5, 6), (5, 7, 9)] {
        label[(z * 12 + y) * 14 + x] = 1.0;
    }
    let b = preprocess::foreground_box(&label, dims, [1, 2, 3], [0, 0, 0]).unwrap();
    assert_eq!(
        b,
        CropBox {
            start: [3, 3, 3],
            end: [7, 10, 13]
        }
    );
    // H: box 5..8 plus margin 6 = 9 wide; min 11 adds 1 before, 1 after. W: clamped at 14.
    let b = preprocess::foreground_box(&label, dims, [0, 3, 6], [0, 11, 0]).unwrap();
    assert_eq!(
        b,
        CropBox {
            start: [4, 1, 0],
            end: [6, 12, 14]
        }
    );
    assert_eq!(
        preprocess::foreground_box(&vec![0.0; 1680], dims, [1; 3], [0; 3]),
        None
    );
}

#[test]
fn zscore_with_and_without_clipping() {
    let raw: Vec<f32> = (0..101).map(|i| i as f32 * 2.0).collect();
    let mut v = raw.clone();
    preprocess::zscore_values(&mut v, Clip::None).unwrap();
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / 101.0;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / 101.0;
    assert!(
        mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5,
        "{mean} {var}"
    );
    // 0..200 in steps of 2: the 10th and 90th percentiles are 20 and 180; clipped values tie there.
    let mut v = raw.clone();
    preprocess::zscore_values(&mut v, Clip::Percentiles(10.0, 90.0)).unwrap();
    assert_eq!(v[0], v[10]);
    assert!(v[10] < v[11] && v[89] < v[90] && v[90] == v[100]);
    let mut constant = vec![3.0; 8];
    preprocess::zscore_values(&mut constant, Clip::None).unwrap();
    assert!(constant.iter().all(|&x| x == 0.0));
}

/// A tiny MSD folder: cases c0..c4 in imagesTr with labels, t0 in imagesTs, a macOS resource fork.
fn tiny_msd(dir: &Path, labels_json: &str) {
    for sub in ["imagesTr", "labelsTr", "imagesTs"] {
        std::fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let n: usize = DIMS.iter().product();
    let label: Vec<f32> = (0..n).map(|i| (i % 3 == 0) as u8 as f32).collect();
    for c in 0..5 {
        let file = format!("c{c}.nii.gz");
        nifti::write(
            &dir.join("imagesTr").join(&file),
            &oblique(values(Dtype::F32, n, c)),
            Dtype::F32,
        )
        .unwrap();
        nifti::write(
            &dir.join("labelsTr").join(&file),
            &oblique(label.clone()),
            Dtype::U8,
        )
        .unwrap();
    }
    nifti::write(
        &dir.join("imagesTs/t0.nii.gz"),
        &oblique(values(Dtype::F32, n, 7)),
        Dtype::F32,
    )
    .unwrap();
    std::fs::write(dir.join("imagesTr/._c0.nii.gz"), b"resource fork").unwrap();
    let json =
        format!(r#"{{"name": "tiny", "modality": {{"0": "MRI"}}, "labels": {labels_json}}}"#);
    std::fs::write(dir.join("dataset.json"), json).unwrap();
}

#[test]
fn msd_first_n_split_and_split_file() {
    let dir = TempDir::new().unwrap();
    tiny_msd(dir.path(), r#"{"0": "background", "1": "atrium"}"#);
    let msd = Msd::open(dir.path()).unwrap();
    assert_eq!(
        msd.info.labels,
        vec![(0, "background".into()), (1, "atrium".into())]
    );
    assert_eq!(msd.training_cases(), ["c0", "c1", "c2", "c3", "c4"]);
    let split = msd
        .split(&SplitSpec::FirstN {
            labeled: 2,
            test: Some(1),
        })
        .unwrap();
    let names =
        |cases: &[metaseg::data::Case]| cases.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&split.labeled), ["c0", "c1"]);
    assert_eq!(names(&split.unlabeled), ["c2", "c3"]);
    assert_eq!(names(&split.test), ["c4"]);
    assert!(split.unlabeled.iter().all(|c| c.label.is_none()));
    let (image, label) = msd.load(&split.labeled[1]).unwrap();
    assert_eq!(image.dims, DIMS);
    assert_eq!(
        label.unwrap().data.iter().filter(|&&v| v == 1.0).count(),
        35
    );
    let split = msd
        .split(&SplitSpec::FirstN {
            labeled: 3,
            test: None,
        })
        .unwrap();
    assert_eq!(names(&split.test), ["t0"]);
    assert_eq!(split.test[0].label, None);

    let file = dir.path().join("split.json");
    std::fs::write(
        &file,
        r#"{"labeled": ["c3"], "unlabeled": ["c0", "t0"], "test": ["c1"]}"#,
    )
    .unwrap();
    let split = msd.split(&SplitSpec::File(file.clone())).unwrap();
    assert_eq!(
        (names(&split.labeled), names(&split.unlabeled)),
        (vec!["c3".into()], vec!["c0".into(), "t0".into()])
    );
    // The ceiling's split: the unlabeled cases join the labeled ones with their labels.
    let full = msd.split_all_labeled(&SplitSpec::File(file.clone()));
    let err = full.unwrap_err().to_string();
    assert!(err.contains("imagesTr/t0.nii.gz"), "t0 has no label: {err}");
    std::fs::write(
        &file,
        r#"{"labeled": ["c3"], "unlabeled": ["c0", "c2"], "test": ["c1"]}"#,
    )
    .unwrap();
    let full = msd
        .split_all_labeled(&SplitSpec::File(file.clone()))
        .unwrap();
    assert_eq!(names(&full.labeled), ["c3", "c0", "c2"]);
    assert!(full.unlabeled.is_empty() && full.labeled.iter().all(|c| c.label.is_some()));
    assert_eq!(names(&full.test), ["c1"]);
    let bad = |json: &str| {
        std::fs::write(&file, json).unwrap();
        msd.split(&SplitSpec::File(file.clone()))
            .unwrap_err()
            .to_string()
    };
    assert!(bad(r#"{"labeled": ["c9"]}"#).contains("case 'c9'"));
    assert!(bad(r#"{"labeled": ["c1"], "test": ["c1"]}"#).contains("'c1' is listed twice"));
    assert!(bad(r#"{"labeled": ["t0"]}"#).contains("imagesTr/t0.nii.gz"));
    assert!(bad(r#"{"labelled": ["c1"]}"#).contains("split.json"));
    std::fs::remove_file(dir.path().join("labelsTr/c2.nii.gz")).unwrap();
    assert!(
        bad(r#"{"labeled": ["c2"]}"#).contains("case 'c2': ")
            && bad(r#"{"labeled": ["c2"]}"#).contains("labelsTr/c2.nii.gz")
    );
    let too_many = msd
        .split(&SplitSpec::FirstN {
            labeled: 5,
            test: Some(1),
        })
        .unwrap_err();
    assert!(matches!(too_many, DataError::Split { .. }));
}

#[test]
fn msd_labels_outside_the_classes_and_grid_mismatch_are_errors() {
    let dir = TempDir::new().unwrap();
    // nnU-Net v2's "labels" direction, declaring only 0: the label value 1 is undeclared.
    tiny_msd(dir.path(), r#"{"background": 0}"#);
    let msd = Msd::open(dir.path()).unwrap();
    let split = msd
        .split(&SplitSpec::FirstN {
            labeled: 2,
            test: None,
        })
        .unwrap();
    let e = msd.load(&split.labeled[0]).unwrap_err().to_string();
    assert!(
        e.contains("labelsTr/c0.nii.gz") && e.contains("label value 1"),
        "{e}"
    );

    let small = Volume::new(vec![0.0; 8], [2, 2, 2], [1.0; 3]).unwrap();
    nifti::write(&dir.path().join("labelsTr/c1.nii.gz"), &small, Dtype::U8).unwrap();
    let e = msd.load(&split.labeled[1]).unwrap_err();
    assert!(matches!(e, DataError::GridMismatch { .. }), "{e:?}");
    assert!(e.to_string().contains("imagesTr/c1.nii.gz"), "{e}");
    std::fs::remove_file(dir.path().join("dataset.json")).unwrap();
    assert!(matches!(
        Msd::open(dir.path()).unwrap_err(),
        DataError::NotFound { .. }
    ));
}

/// dataset.json declares {0, 1, 2} and a label holds 2: with the data set used with 2 classes
/// (data.classes = 2) loading it is an error naming the file and the value; with 3 it loads.
#[test]
fn labels_beyond_the_classes_in_use_are_errors() {
    let dir = TempDir::new().unwrap();
    tiny_msd(dir.path(), r#"{"0": "background", "1": "a", "2": "b"}"#);
    let n: usize = DIMS.iter().product();
    let label: Vec<f32> = (0..n).map(|i| (i % 3) as f32).collect();
    let file = dir.path().join("labelsTr/c0.nii.gz");
    nifti::write(&file, &oblique(label), Dtype::U8).unwrap();
    let spec = SplitSpec::FirstN {
        labeled: 1,
        test: None,
    };
    let msd = Msd::open(dir.path()).unwrap();
    let case = &msd.split(&spec).unwrap().labeled[0];
    let e = msd.clone().with_classes(2).load(case).unwrap_err();
    assert!(matches!(e, DataError::LabelBeyondClasses { .. }), "{e:?}");
    let message = e.to_string();
    assert!(
        message.contains("labelsTr/c0.nii.gz") && message.contains("label value 2"),
        "{message}"
    );
    assert!(msd.with_classes(3).load(case).is_ok());
}

fn small_config(seed: u64) -> SyntheticConfig {
    SyntheticConfig {
        seed,
        cases: 6,
        size: [32, 40, 36],
        ..SyntheticConfig::default()
    }
}

#[test]
fn synthetic_cases_are_deterministic_and_differ_by_seed_and_index() {
    let bits = |config: &SyntheticConfig, i: usize| {
        let c = synthetic::case(config, i).unwrap();
        let image: Vec<u32> = c.image.data.iter().map(|v| v.to_bits()).collect();
        (image, c.label.data)
    };
    let a = small_config(5);
    assert_eq!(bits(&a, 2), bits(&a, 2));
    assert_ne!(bits(&a, 2).0, bits(&small_config(6), 2).0);
    assert_ne!(bits(&a, 2).1, bits(&a, 3).1);
}

/// The best Dice any global threshold `image > t` reaches against the label: sweep t down through
/// every intensity, counting true positives.
fn best_threshold_dice(image: &[f32], label: &[f32]) -> f64 {
    let mut order: Vec<usize> = (0..image.len()).collect();
    order.sort_by(|&a, &b| image[b].total_cmp(&image[a]));
    let total: f64 = label.iter().map(|&v| v as f64).sum();
    let (mut tp, mut best) = (0.0, 0.0f64);
    for (k, &i) in order.iter().enumerate() {
        tp += label[i] as f64;
        best = best.max(2.0 * tp / ((k + 1) as f64 + total));
    }
    best
}

/// The default preset's cases (2D): the label is a few percent of the image and no intensity
/// threshold recovers it. The body's cross-section through its centre has semi-axes in
/// [0.22, 0.36] x zoom [0.7, 1.3] x surface waves [0.8, 1.2], an area between pi 0.12^2 and
/// pi 0.56^2 of the image's 2 x 2 units: 1.2 % to 25 %, which holes, tubes and the image's edge
/// move a little (hence 0.5 % to 30 %). If the distractors (same intensity) covered alpha times
/// the target and a threshold were otherwise perfect, its Dice would be 2 / (2 + alpha); the
/// ventricle alone is about as large as the target (alpha ~ 1, Dice ~ 0.67), so 0.75 bounds it
/// with room for a case whose distractors miss the plane. Checked without scanner variety, which
/// draws some cases almost free of noise and blur: the property is the anatomy's.
#[test]
fn synthetic_labels_are_sized_sanely_and_not_an_intensity_threshold() {
    let preset = TrainConfig::load("default", &[]).unwrap();
    assert_eq!(preset.data.size[0], 1, "the bounds below are a 2D case's");
    let config = SyntheticConfig {
        size: preset.data.size,
        knobs: SyntheticKnobs {
            degradation_spread: 0.0,
            ..preset.data.synthetic
        },
        ..SyntheticConfig::default()
    };
    for i in 0..8 {
        let c = synthetic::case(&config, i).unwrap();
        let fraction = c.label.data.iter().sum::<f32>() / c.label.data.len() as f32;
        assert!(
            (0.005..0.3).contains(&fraction),
            "case {i}: label fraction {fraction}"
        );
        let dice = best_threshold_dice(&c.image.data, &c.label.data);
        assert!(dice < 0.75, "case {i}: a threshold reaches Dice {dice}");
    }
}

/// The default preset names the generator's defaults, and `--set data.synthetic.KEY` reaches the
/// generator: the training data are the normalised cases of the generator with those knobs.
#[test]
fn the_training_configuration_carries_the_generator_knobs() {
    let preset = TrainConfig::load("default", &[]).unwrap();
    assert_eq!(preset.data.synthetic, SyntheticKnobs::default());
    let sets = [
        "data.synthetic.noise=0.3",
        "data.synthetic.tissue_level=[0.6, 0.7]",
        "data.cases=2",
        "data.size=[12, 14, 16]",
        "data.labeled=1",
        "data.test=1",
    ]
    .map(String::from);
    let config = TrainConfig::load("default", &sets).unwrap();
    assert_eq!(config.data.synthetic.noise, 0.3);
    assert_eq!(config.data.synthetic.tissue_level, (0.6, 0.7));
    let generator = |knobs: SyntheticKnobs| {
        let c = SyntheticConfig {
            seed: config.seed,
            cases: 2,
            size: [12, 14, 16],
            knobs,
            ..SyntheticConfig::default()
        };
        let case = synthetic::case(&c, 0).unwrap();
        run::normalised("synth_000".into(), case.image, None)
            .unwrap()
            .image
            .data
    };
    let data = run::load_data(&config).unwrap();
    assert_eq!(
        data.labeled[0].image.data,
        generator(config.data.synthetic.clone())
    );
    assert_ne!(
        data.labeled[0].image.data,
        generator(SyntheticKnobs::default())
    );
}

/// Scanner variety changes each case's noise and blur, not its anatomy: the labels stay, the
/// images differ, and differently per case.
#[test]
fn degradation_spread_varies_the_images_and_keeps_the_labels() {
    let with_spread = |degradation_spread| SyntheticConfig {
        knobs: SyntheticKnobs {
            degradation_spread,
            ..SyntheticKnobs::default()
        },
        ..small_config(3)
    };
    let (plain, varied) = (with_spread(0.0), with_spread(1.0));
    for i in 0..2 {
        let (a, b) = (
            synthetic::case(&plain, i).unwrap(),
            synthetic::case(&varied, i).unwrap(),
        );
        assert_eq!(a.label.data, b.label.data, "case {i}");
        assert_ne!(a.image.data, b.image.data, "case {i}");
    }
}

#[test]
fn bad_generator_knobs_are_errors_that_name_them() {
    let bad = |knobs: SyntheticKnobs| {
        let config = SyntheticConfig {
            knobs,
            ..SyntheticConfig::default()
        };
        synthetic::case(&config, 0).unwrap_err().to_string()
    };
    let e = bad(SyntheticKnobs {
        tissue_level: (0.8, 0.4),
        ..SyntheticKnobs::default()
    });
    assert!(e.contains("tissue_level"), "{e}");
    let e = bad(SyntheticKnobs {
        tubes: (3, 1),
        ..SyntheticKnobs::default()
    });
    assert!(e.contains("tubes"), "{e}");
    let e = bad(SyntheticKnobs {
        degradation_spread: -1.0,
        ..SyntheticKnobs::default()
    });
    assert!(e.contains("degradation_spread"), "{e}");
}

#[test]
fn synthetic_folder_reads_back_through_the_msd_reader() {
    let dir = TempDir::new().unwrap();
    let config = small_config(1);
    synthetic::write_msd(dir.path(), &config, 2, 1).unwrap();
    let msd = Msd::open(dir.path()).unwrap();
    let split = msd
        .split(&SplitSpec::File(dir.path().join("split.json")))
        .unwrap();
    let first_n = msd
        .split(&SplitSpec::FirstN {
            labeled: 2,
            test: Some(1),
        })
        .unwrap();
    assert_eq!(split, first_n);
    assert_eq!(
        (split.labeled.len(), split.unlabeled.len(), split.test.len()),
        (2, 3, 1)
    );
    let (image, label) = msd.load(&split.test[0]).unwrap();
    let expected = synthetic::case(&config, 5).unwrap();
    assert_eq!(image.data, expected.image.data);
    assert_eq!(label.unwrap().data, expected.label.data);
    let file: SplitFile =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("split.json")).unwrap())
            .unwrap();
    assert_eq!(file.test, ["synth_005"]);
}

/// The labeled draw: "random" keeps the first `labeled` training cases (the split every earlier
/// run had); "stratified" takes one case from each quarter of the training cases ordered by the
/// contrast key, the same ones for the same seed, and leaves the pool, the test set and `full`'s
/// training set as they were.
#[test]
fn the_labeled_draw_random_keeps_the_first_cases_stratified_covers_the_strata() {
    let load = |draw: &str, method: &str| {
        let sets = [
            "data.cases=20",
            "data.size=[1, 16, 16]",
            "batch.patch=[1, 16, 16]",
            "data.labeled=4",
            "data.test=4",
            &format!("data.labeled_draw={draw}"),
            &format!("method={method}"),
        ]
        .map(String::from);
        run::load_data(&TrainConfig::load("default", &sets).unwrap()).unwrap()
    };
    let names = |cases: &[metaseg::train::batch::LoadedCase]| -> Vec<String> {
        cases.iter().map(|c| c.name.clone()).collect()
    };
    let range =
        |r: std::ops::Range<usize>| -> Vec<String> { r.map(synthetic::case_name).collect() };
    let random = load("random", "supervised");
    assert_eq!(names(&random.labeled), range(0..4));
    assert_eq!(names(&random.unlabeled), range(4..16));
    assert_eq!(names(&random.test), range(16..20));

    let stratified = load("stratified", "supervised");
    assert_eq!(names(&stratified.test), names(&random.test));
    let training: Vec<_> = random.labeled.iter().chain(&random.unlabeled).collect();
    let keys: Vec<f64> = training
        .iter()
        .map(|c| metaseg::data::draw::contrast_key(&c.image))
        .collect();
    let mut ranks: Vec<usize> = (0..16).collect();
    ranks.sort_by(|&a, &b| keys[a].total_cmp(&keys[b]));
    let stratum_of = |name: &str| {
        let i = training.iter().position(|c| c.name == name).unwrap();
        ranks.iter().position(|&r| r == i).unwrap() / 4
    };
    let mut strata: Vec<usize> = stratified
        .labeled
        .iter()
        .map(|c| stratum_of(&c.name))
        .collect();
    strata.sort_unstable();
    assert_eq!(strata, vec![0, 1, 2, 3]);
    let mut all = names(&stratified.labeled);
    all.extend(names(&stratified.unlabeled));
    all.sort();
    assert_eq!(all, range(0..16));
    for c in stratified.labeled.iter().chain(&stratified.unlabeled) {
        let same = training.iter().find(|r| r.name == c.name).unwrap();
        assert_eq!(c.image.data, same.image.data, "{}", c.name);
    }
    assert_eq!(
        names(&load("stratified", "supervised").labeled),
        names(&stratified.labeled)
    );
    assert_eq!(
        names(&load("stratified", "full").labeled),
        names(&load("random", "full").labeled)
    );

    let sets = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert!(TrainConfig::load("default", &sets(&["data.labeled_draw=sorted"])).is_err());
    let folder = sets(&[
        "data.labeled_draw=stratified",
        "data.source=/no/such/folder",
    ]);
    assert!(TrainConfig::load("default", &folder).is_err());
}
