//! NIfTI-1 volumes (`.nii`, `.nii.gz`) in and out.
//!
//! Axis order: NIfTI stores voxel (x, y, z[, t]) with x fastest. A [`Volume`] keeps the bytes in that
//! order and names the axes as the framework's NCDHW tensors do: `dims = [D, H, W] = [nz, ny, nx]`,
//! W fastest, so voxel (x, y, z) sits at `(z * H + y) * W + x` and the data need no transpose. A 4D
//! file's fourth axis is read as channels (the MSD stores modalities there): the data are then
//! [C, D, H, W]. `spacing` follows `dims`: [dz, dy, dx] = [pixdim[3], pixdim[2], pixdim[1]].
//!
//! The header is parsed by the `nifti` crate (both byte orders) and files are written by it; the voxel
//! data are read here, at `vox_offset`, because the crate (0.18) reads them from byte 352 whenever a
//! file has no extensions, whatever `vox_offset` says (shared/DATA.md).

use super::error::{DataError, Result};
use nifti::{Endianness, NiftiHeader, NiftiType};
use std::io::Read;
use std::path::Path;

/// Size of the NIfTI-1 header; single-file data start at 352 at the earliest (header + 4-byte extender).
const HEADER_SIZE: usize = 348;
const MIN_DATA_OFFSET: usize = 352;

/// A volume in physical values (after `scl_slope`/`scl_inter`), with the header it came from or will
/// be written with. See the module documentation for the axis order.
#[derive(Clone, Debug)]
pub struct Volume {
    /// [C, D, H, W], W fastest.
    pub data: Vec<f32>,
    pub channels: usize,
    /// [D, H, W] = NIfTI (nz, ny, nx).
    pub dims: [usize; 3],
    /// Voxel size along [D, H, W] in the header's units (usually mm).
    pub spacing: [f64; 3],
    /// Geometry (sform, qform, pixdim, units) and descriptive fields; `dim`, `datatype` and the scaling
    /// are set from the volume when it is written.
    pub header: NiftiHeader,
}

/// Element types a volume can be read from and written as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    U8,
    I8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F32,
    F64,
}

impl Dtype {
    pub const ALL: [Dtype; 10] = [
        Dtype::U8,
        Dtype::I8,
        Dtype::I16,
        Dtype::U16,
        Dtype::I32,
        Dtype::U32,
        Dtype::I64,
        Dtype::U64,
        Dtype::F32,
        Dtype::F64,
    ];

    pub fn nifti_type(self) -> NiftiType {
        match self {
            Dtype::U8 => NiftiType::Uint8,
            Dtype::I8 => NiftiType::Int8,
            Dtype::I16 => NiftiType::Int16,
            Dtype::U16 => NiftiType::Uint16,
            Dtype::I32 => NiftiType::Int32,
            Dtype::U32 => NiftiType::Uint32,
            Dtype::I64 => NiftiType::Int64,
            Dtype::U64 => NiftiType::Uint64,
            Dtype::F32 => NiftiType::Float32,
            Dtype::F64 => NiftiType::Float64,
        }
    }

    fn from_code(code: i16) -> Option<Dtype> {
        Dtype::ALL
            .into_iter()
            .find(|d| d.nifti_type() as i16 == code)
    }

    pub fn size(self) -> usize {
        self.nifti_type().size_of()
    }

    pub fn name(self) -> &'static str {
        match self {
            Dtype::U8 => "uint8",
            Dtype::I8 => "int8",
            Dtype::I16 => "int16",
            Dtype::U16 => "uint16",
            Dtype::I32 => "int32",
            Dtype::U32 => "uint32",
            Dtype::I64 => "int64",
            Dtype::U64 => "uint64",
            Dtype::F32 => "float32",
            Dtype::F64 => "float64",
        }
    }
}

impl Volume {
    /// A single-channel volume on an axis-aligned grid with its origin at 0: sform and qform both set
    /// (codes 2 "aligned" and 1 "scanner"), units mm.
    pub fn new(data: Vec<f32>, dims: [usize; 3], spacing: [f64; 3]) -> Result<Volume> {
        let mut header = NiftiHeader {
            magic: *b"n+1\0",
            endianness: Endianness::Little,
            sform_code: 2,
            qform_code: 1,
            xyzt_units: 2, // NIFTI_UNITS_MM
            ..NiftiHeader::default()
        };
        let [dz, dy, dx] = spacing;
        header.pixdim = [1.0, dx as f32, dy as f32, dz as f32, 1.0, 1.0, 1.0, 1.0];
        header.srow_x = [dx as f32, 0.0, 0.0, 0.0];
        header.srow_y = [0.0, dy as f32, 0.0, 0.0];
        header.srow_z = [0.0, 0.0, dz as f32, 0.0];
        header.descrip = pad_description(b"metaseg");
        header.dim = header_dim(dims, 1);
        let volume = Volume {
            data,
            channels: 1,
            dims,
            spacing,
            header,
        };
        volume.check()?;
        Ok(volume)
    }

    /// A single-channel volume with this one's grid and header: how a prediction is written back on
    /// its input's geometry.
    pub fn like(&self, data: Vec<f32>) -> Result<Volume> {
        let volume = Volume {
            data,
            channels: 1,
            dims: self.dims,
            spacing: self.spacing,
            header: self.header.clone(),
        };
        volume.check()?;
        Ok(volume)
    }

    /// Voxels per channel.
    pub fn voxels(&self) -> usize {
        self.dims.iter().product()
    }

    /// Channel `c` as a [D, H, W] slice.
    pub fn channel(&self, c: usize) -> &[f32] {
        let n = self.voxels();
        &self.data[c * n..(c + 1) * n]
    }

    /// The 4x4 matrix from voxel index (x, y, z, 1) = (w, h, d, 1) to world coordinates: the sform if
    /// `sform_code > 0`, else the qform if `qform_code > 0`, else the spacing alone (NIfTI method 1).
    pub fn affine(&self) -> [[f64; 4]; 4] {
        affine_of(&self.header)
    }

    fn check(&self) -> Result<()> {
        let expected = self.voxels() * self.channels;
        if self.data.len() != expected || self.channels == 0 {
            return Err(DataError::invalid(
                "volume",
                format!(
                    "{} values for {} channel(s) of {:?} voxels ({expected} expected)",
                    self.data.len(),
                    self.channels,
                    self.dims
                ),
            ));
        }
        if self.spacing.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            let reason = format!("spacing {:?} must be positive", self.spacing);
            return Err(DataError::invalid("volume", reason));
        }
        Ok(())
    }
}

/// The header's `dim` field for a volume of `dims` [D, H, W] and `channels` (saturating: the writer
/// rejects sizes NIfTI-1 cannot hold).
pub fn header_dim([d, h, w]: [usize; 3], channels: usize) -> [u16; 8] {
    let n = |v: usize| v.min(u16::MAX as usize) as u16;
    let rank = if channels > 1 { 4 } else { 3 };
    [rank, n(w), n(h), n(d), n(channels), 1, 1, 1]
}

fn pad_description(text: &[u8]) -> Vec<u8> {
    let mut descrip = text.to_vec();
    descrip.resize(80, 0);
    descrip
}

/// Reads a `.nii` or `.nii.gz` (recognised by its gzip magic, not its name) into physical values.
pub fn read(path: &Path) -> Result<Volume> {
    let bytes = read_bytes(path)?;
    let header = parse_header(path, &bytes)?;
    let dtype = dtype_of(path, &header)?;
    let (dims, channels) = dims_of(path, &header)?;
    let spacing = spacing_of(path, &header, dims)?;
    let offset = data_offset(path, &header)?;
    let count = dims.iter().product::<usize>() * channels;
    let raw = voxel_bytes(path, &bytes, offset, count * dtype.size())?;
    let data = decode(raw, dtype, header.endianness, scaling(&header));
    check_finite(path, &data, dims)?;
    Ok(Volume {
        data,
        channels,
        dims,
        spacing,
        header,
    })
}

/// Every voxel must be a number: a NaN or an infinity (in the file, or made by its scaling) would
/// flow through normalisation and the network into every output (issue 25). The first one is
/// named by its NIfTI index (x, y, z), and t in a 4D file.
fn check_finite(path: &Path, data: &[f32], [d, h, w]: [usize; 3]) -> Result<()> {
    let Some(i) = data.iter().position(|v| !v.is_finite()) else {
        return Ok(());
    };
    let (x, y, z, t) = (i % w, i / w % h, i / (w * h) % d, i / (w * h * d));
    let voxel = if data.len() > d * h * w {
        format!("(x, y, z, t) = ({x}, {y}, {z}, {t})")
    } else {
        format!("(x, y, z) = ({x}, {y}, {z})")
    };
    Err(DataError::NonFinite {
        path: path.to_path_buf(),
        value: data[i],
        voxel,
    })
}

fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(bytes);
    }
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes.as_slice())
        .read_to_end(&mut out)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => DataError::Truncated {
                path: path.to_path_buf(),
                detail: "the gzip stream ends early".into(),
            },
            _ => DataError::Malformed {
                path: path.to_path_buf(),
                reason: format!("bad gzip data: {e}"),
            },
        })?;
    Ok(out)
}

fn parse_header(path: &Path, bytes: &[u8]) -> Result<NiftiHeader> {
    let malformed = |reason: String| DataError::Malformed {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() < HEADER_SIZE {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            detail: format!("{} bytes, less than a NIfTI-1 header", bytes.len()),
        });
    }
    let first: [u8; 4] = bytes[..4].try_into().unwrap();
    if i32::from_le_bytes(first) == 540 || i32::from_be_bytes(first) == 540 {
        return Err(DataError::Unsupported {
            path: path.to_path_buf(),
            reason: "NIfTI-2; save it as NIfTI-1 (e.g. nibabel's Nifti1Image)".into(),
        });
    }
    check_rank(&first, bytes).map_err(malformed)?;
    let header = NiftiHeader::from_reader(bytes).map_err(|e| malformed(e.to_string()))?;
    if header.sizeof_hdr != HEADER_SIZE as i32 {
        return Err(malformed(format!(
            "sizeof_hdr is {}, not 348",
            header.sizeof_hdr
        )));
    }
    if &header.magic != b"n+1\0" {
        return Err(DataError::Unsupported {
            path: path.to_path_buf(),
            reason: "a header of a .hdr/.img pair; convert it to a single .nii file".into(),
        });
    }
    Ok(header)
}

/// dim[0] (bytes 40-41) must be 1 to 7, read in the byte order sizeof_hdr = 348 reveals: the
/// `nifti` crate takes a dim[0] outside 1 to 7 as a sign of the other byte order and then reports
/// a wrong sizeof_hdr, naming the wrong field.
fn check_rank(first: &[u8; 4], bytes: &[u8]) -> std::result::Result<(), String> {
    let raw: [u8; 2] = bytes[40..42].try_into().unwrap();
    let rank = if i32::from_le_bytes(*first) == HEADER_SIZE as i32 {
        i16::from_le_bytes(raw)
    } else if i32::from_be_bytes(*first) == HEADER_SIZE as i32 {
        i16::from_be_bytes(raw)
    } else {
        return Ok(()); // a bad sizeof_hdr, reported as such below
    };
    if (1..=7).contains(&rank) {
        return Ok(());
    }
    Err(format!(
        "dim[0] (the number of dimensions) is {rank}; it must be 1 to 7"
    ))
}

fn dtype_of(path: &Path, header: &NiftiHeader) -> Result<Dtype> {
    Dtype::from_code(header.datatype).ok_or_else(|| DataError::UnsupportedType {
        path: path.to_path_buf(),
        code: header.datatype,
        name: match header.data_type() {
            Ok(t) => format!("{t:?}"),
            Err(_) => "unknown".into(),
        },
    })
}

/// [D, H, W] and the number of channels (the 4th axis); axes 5 to 7 must have size 1.
///
/// `dim` is read here as the standard declares it, signed 16-bit: the `nifti` crate reads it
/// unsigned (a -1 would be a size of 65535) and names the wrong element in its own messages.
fn dims_of(path: &Path, header: &NiftiHeader) -> Result<([usize; 3], usize)> {
    let malformed = |reason: String| DataError::Malformed {
        path: path.to_path_buf(),
        reason,
    };
    let raw = header.dim.map(|d| d as i16);
    let rank = raw[0];
    if !(1..=7).contains(&rank) {
        return Err(malformed(format!(
            "dim[0] (the number of dimensions) is {rank}; it must be 1 to 7"
        )));
    }
    let dim = &raw[1..=rank as usize];
    if let Some(axis) = dim.iter().position(|&d| d < 1) {
        return Err(malformed(format!(
            "dim[{}] (the size of axis {}) is {}; sizes must be at least 1",
            axis + 1,
            axis + 1,
            dim[axis]
        )));
    }
    let size = |i: usize| dim.get(i).map_or(1, |&d| d as usize);
    if dim.len() > 4 && dim[4..].iter().any(|&d| d > 1) {
        return Err(DataError::Unsupported {
            path: path.to_path_buf(),
            reason: format!("dims {dim:?}: only 3 spatial axes and one channel axis are read"),
        });
    }
    Ok(([size(2), size(1), size(0)], size(3)))
}

/// Spacing along [D, H, W]: |pixdim|; an axis of size 1 without a valid pixdim gets 1.
fn spacing_of(path: &Path, header: &NiftiHeader, dims: [usize; 3]) -> Result<[f64; 3]> {
    let mut spacing = [1.0; 3];
    for (axis, s) in spacing.iter_mut().enumerate() {
        let pixdim = header.pixdim[3 - axis].abs() as f64;
        if pixdim.is_finite() && pixdim > 0.0 {
            *s = pixdim;
        } else if dims[axis] > 1 {
            return Err(DataError::Malformed {
                path: path.to_path_buf(),
                reason: format!("pixdim[{}] = {pixdim} is not a voxel size", 3 - axis),
            });
        }
    }
    Ok(spacing)
}

/// Where the voxel data start. A `vox_offset` below 352 is invalid in a single file; like nibabel's
/// fix, it is read as 352.
fn data_offset(path: &Path, header: &NiftiHeader) -> Result<usize> {
    let offset = header.vox_offset;
    if !offset.is_finite() || offset.fract() != 0.0 || offset < 0.0 {
        return Err(DataError::Malformed {
            path: path.to_path_buf(),
            reason: format!("vox_offset {offset} is not a byte offset"),
        });
    }
    Ok((offset as usize).max(MIN_DATA_OFFSET))
}

fn voxel_bytes<'a>(path: &Path, bytes: &'a [u8], offset: usize, len: usize) -> Result<&'a [u8]> {
    match offset
        .checked_add(len)
        .and_then(|end| bytes.get(offset..end))
    {
        Some(raw) => Ok(raw),
        None => Err(DataError::Truncated {
            path: path.to_path_buf(),
            detail: format!(
                "the header promises {len} bytes of voxel data from byte {offset}, the file has {}",
                bytes.len().saturating_sub(offset)
            ),
        }),
    }
}

/// (slope, intercept), or None when the header asks for no scaling (slope 0 or not finite, as the
/// NIfTI standard and nibabel read it).
fn scaling(header: &NiftiHeader) -> Option<(f64, f64)> {
    let slope = header.scl_slope as f64;
    let inter = header.scl_inter as f64;
    if slope == 0.0 || !slope.is_finite() {
        return None;
    }
    Some((slope, if inter.is_finite() { inter } else { 0.0 }))
}

fn decode(raw: &[u8], dtype: Dtype, endian: Endianness, scale: Option<(f64, f64)>) -> Vec<f32> {
    let big = endian == Endianness::Big;
    macro_rules! as_f64 {
        ($t:ty) => {{
            const N: usize = std::mem::size_of::<$t>();
            convert(raw, N, scale, |c| {
                let b: [u8; N] = c.try_into().unwrap();
                (if big {
                    <$t>::from_be_bytes(b)
                } else {
                    <$t>::from_le_bytes(b)
                }) as f64
            })
        }};
    }
    match dtype {
        Dtype::U8 => as_f64!(u8),
        Dtype::I8 => as_f64!(i8),
        Dtype::I16 => as_f64!(i16),
        Dtype::U16 => as_f64!(u16),
        Dtype::I32 => as_f64!(i32),
        Dtype::U32 => as_f64!(u32),
        Dtype::I64 => as_f64!(i64),
        Dtype::U64 => as_f64!(u64),
        Dtype::F32 => as_f64!(f32),
        Dtype::F64 => as_f64!(f64),
    }
}

fn convert(
    raw: &[u8],
    size: usize,
    scale: Option<(f64, f64)>,
    value: impl Fn(&[u8]) -> f64,
) -> Vec<f32> {
    let chunks = raw.chunks_exact(size);
    match scale {
        None => chunks.map(|c| value(c) as f32).collect(),
        Some((slope, inter)) => chunks.map(|c| (value(c) * slope + inter) as f32).collect(),
    }
}

/// The affine of a header: sform if `sform_code > 0`, else qform if `qform_code > 0`, else the
/// spacing alone. Maps voxel (x, y, z) = (w, h, d) to world coordinates.
pub fn affine_of(h: &NiftiHeader) -> [[f64; 4]; 4] {
    let row = |r: [f32; 4]| r.map(|v| v as f64);
    if h.sform_code > 0 {
        [
            row(h.srow_x),
            row(h.srow_y),
            row(h.srow_z),
            [0.0, 0.0, 0.0, 1.0],
        ]
    } else if h.qform_code > 0 {
        qform_affine(h)
    } else {
        let p = |i: usize| h.pixdim[i] as f64;
        [
            [p(1), 0.0, 0.0, 0.0],
            [0.0, p(2), 0.0, 0.0],
            [0.0, 0.0, p(3), 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    }
}

/// The NIfTI-1 quaternion form: rotation from (b, c, d) with a = sqrt(1 - b^2 - c^2 - d^2), columns
/// scaled by pixdim[1..3] (the third also by qfac = sign of pixdim[0]), offset (qoffset_x, y, z).
fn qform_affine(h: &NiftiHeader) -> [[f64; 4]; 4] {
    let (b, c, d) = (h.quatern_b as f64, h.quatern_c as f64, h.quatern_d as f64);
    let a = (1.0 - (b * b + c * c + d * d)).max(0.0).sqrt();
    let rot = [
        [
            a * a + b * b - c * c - d * d,
            2.0 * (b * c - a * d),
            2.0 * (b * d + a * c),
        ],
        [
            2.0 * (b * c + a * d),
            a * a + c * c - b * b - d * d,
            2.0 * (c * d - a * b),
        ],
        [
            2.0 * (b * d - a * c),
            2.0 * (c * d + a * b),
            a * a + d * d - c * c - b * b,
        ],
    ];
    let qfac = if h.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
    let scale = [
        h.pixdim[1].abs() as f64,
        h.pixdim[2].abs() as f64,
        h.pixdim[3].abs() as f64 * qfac,
    ];
    let offset = [h.quatern_x, h.quatern_y, h.quatern_z].map(|v| v as f64);
    let mut m = [[0.0; 4]; 4];
    for i in 0..3 {
        for j in 0..3 {
            m[i][j] = rot[i][j] * scale[j];
        }
        m[i][3] = offset[i];
    }
    m[3][3] = 1.0;
    m
}

/// Moves the header's origin to voxel `start` = (x, y, z): what cropping at `start` does to the
/// geometry, so a cropped volume is still in the right place in world coordinates.
pub fn shift_origin(header: &mut NiftiHeader, start: [usize; 3]) {
    let moved = |m: [[f64; 4]; 4], i: usize| {
        m[i][3] + (0..3).map(|j| m[i][j] * start[j] as f64).sum::<f64>()
    };
    let s = {
        let mut h = header.clone();
        h.sform_code = 1;
        affine_of(&h)
    };
    header.srow_x[3] = moved(s, 0) as f32;
    header.srow_y[3] = moved(s, 1) as f32;
    header.srow_z[3] = moved(s, 2) as f32;
    let q = qform_affine(header);
    header.quatern_x = moved(q, 0) as f32;
    header.quatern_y = moved(q, 1) as f32;
    header.quatern_z = moved(q, 2) as f32;
}

/// Why two volumes are not on the same voxel grid (dims, or an affine entry apart by more than
/// 1e-3 + 1e-4 |value|: float headers rewritten by other tools differ in the last digits), or None.
pub fn grid_difference(a: &Volume, b: &Volume) -> Option<String> {
    if a.dims != b.dims {
        return Some(format!("dims [D, H, W] {:?} and {:?}", a.dims, b.dims));
    }
    let (ma, mb) = (a.affine(), b.affine());
    let close = |x: f64, y: f64| (x - y).abs() <= 1e-3 + 1e-4 * y.abs();
    let same = (0..3).all(|i| (0..4).all(|j| close(ma[i][j], mb[i][j])));
    (!same).then(|| format!("affines {:?} and {:?}", &ma[..3], &mb[..3]))
}

/// Writes `volume` as a `.nii` or `.nii.gz` (by the name) of element type `dtype`, with the geometry
/// of its header. Integer types round to nearest; a value out of the type's range is an error.
pub fn write(path: &Path, volume: &Volume, dtype: Dtype) -> Result<()> {
    volume.check()?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let gz = name.ends_with(".nii.gz");
    if !(gz || name.ends_with(".nii")) {
        return Err(DataError::Unsupported {
            path: path.to_path_buf(),
            reason: "write a .nii or .nii.gz file".into(),
        });
    }
    if volume
        .dims
        .iter()
        .chain([&volume.channels])
        .any(|&d| d > u16::MAX as usize)
    {
        return Err(DataError::Unsupported {
            path: path.to_path_buf(),
            reason: format!("dims {:?} do not fit NIfTI-1", volume.dims),
        });
    }
    // The crate rewrites every extension of the name it is given; a plain temporary name keeps it
    // from altering the user's, and the rename means no half-written file under that name.
    let extension = if gz { ".nii.gz" } else { ".nii" };
    crate::atomic::write_file(
        path,
        extension,
        |tmp| write_as_dtype(path, tmp, volume, dtype),
        |e| DataError::io(path, e),
    )
}

fn write_as_dtype(path: &Path, tmp: &Path, volume: &Volume, dtype: Dtype) -> Result<()> {
    match dtype {
        Dtype::U8 => write_elements::<u8>(path, tmp, volume, dtype),
        Dtype::I8 => write_elements::<i8>(path, tmp, volume, dtype),
        Dtype::I16 => write_elements::<i16>(path, tmp, volume, dtype),
        Dtype::U16 => write_elements::<u16>(path, tmp, volume, dtype),
        Dtype::I32 => write_elements::<i32>(path, tmp, volume, dtype),
        Dtype::U32 => write_elements::<u32>(path, tmp, volume, dtype),
        Dtype::I64 => write_elements::<i64>(path, tmp, volume, dtype),
        Dtype::U64 => write_elements::<u64>(path, tmp, volume, dtype),
        Dtype::F32 => write_elements::<f32>(path, tmp, volume, dtype),
        Dtype::F64 => write_elements::<f64>(path, tmp, volume, dtype),
    }
}

/// An element type a volume's f32 values are stored as.
trait Element: bytemuck::Pod {
    fn from_f32(v: f32) -> Option<Self>;
}

macro_rules! integer_element {
    ($($t:ty),*) => {$(
        impl Element for $t {
            fn from_f32(v: f32) -> Option<Self> {
                let r = (v as f64).round();
                // `MAX as f64 + 1.0` is the first value past the range (2^63, 2^64 exactly for 64 bits).
                (r >= <$t>::MIN as f64 && r < <$t>::MAX as f64 + 1.0).then(|| r as $t)
            }
        }
    )*};
}
integer_element!(u8, i8, i16, u16, i32, u32, i64, u64);

impl Element for f32 {
    fn from_f32(v: f32) -> Option<Self> {
        Some(v)
    }
}

impl Element for f64 {
    fn from_f32(v: f32) -> Option<Self> {
        Some(v as f64)
    }
}

fn write_elements<T: Element>(
    path: &Path,
    tmp: &Path,
    volume: &Volume,
    dtype: Dtype,
) -> Result<()> {
    let values = volume
        .data
        .iter()
        .enumerate()
        .map(|(index, &value)| {
            T::from_f32(value).ok_or(DataError::OutOfRange {
                path: path.to_path_buf(),
                value,
                index,
                dtype: dtype.name(),
            })
        })
        .collect::<Result<Vec<T>>>()?;
    let [d, h, w] = volume.dims;
    let shape: Vec<usize> = if volume.channels > 1 {
        vec![volume.channels, d, h, w]
    } else {
        vec![d, h, w]
    };
    // [C, D, H, W] in C order reversed is (x, y, z, t) in Fortran order: the same bytes, as NIfTI wants.
    let array = ndarray::ArrayD::from_shape_vec(shape, values)
        .expect("length checked")
        .reversed_axes();
    let mut header = volume.header.clone();
    header.descrip.resize(80, 0);
    nifti::writer::WriterOptions::new(tmp)
        .reference_header(&header)
        .write_nifti_with_type(&array, dtype.nifti_type())
        .map_err(|e| match e {
            nifti::NiftiError::Io(source) => DataError::io(path, source),
            other => DataError::Unsupported {
                path: path.to_path_buf(),
                reason: other.to_string(),
            },
        })
}
