//! `.npy` files in and out: any real or boolean C-order array is read as f64 (label arrays are
//! integers); arrays are written as float32 or float64.

use crate::error::{Error, Result};
use metaseg_autograd::Shape;
use npyz::{
    AutoSerialize, DType, Deserialize, NpyFile, NpyHeader, Order, TypeChar, TypeStr, WriterBuilder,
};
use std::fs::File;
use std::io::{self, BufWriter};
use std::path::Path;

/// The element type of a written file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F64,
}

/// Reads a C-order array of any float, integer or bool dtype, converted to f64.
pub fn read(path: &Path) -> Result<(Vec<f64>, Shape)> {
    let bytes = std::fs::read(path).map_err(|e| io_error(path, e))?;
    let malformed = |reason: String| Error::MalformedNpy {
        path: path.to_path_buf(),
        reason,
    };
    if shape_overflows(&bytes) {
        return Err(malformed("the shape has too many elements".into()));
    }
    let mut data = bytes.as_slice();
    let header = NpyHeader::from_reader(&mut data).map_err(|e| malformed(e.to_string()))?;
    let npy = NpyFile::with_header(header, data);
    if npy.order() == Order::Fortran {
        return Err(Error::FortranOrder {
            path: path.to_path_buf(),
        });
    }
    let shape = shape_of(npy.shape()).ok_or_else(|| malformed("shape is too large".into()))?;
    let type_str = match npy.dtype() {
        DType::Plain(t) => t,
        other => {
            return Err(Error::UnsupportedDtype {
                path: path.to_path_buf(),
                dtype: format!("structured {}", other.descr()),
            })
        }
    };
    check_length(&shape, &type_str, data.len()).map_err(malformed)?;
    let values = values(npy, &type_str).ok_or_else(|| Error::UnsupportedDtype {
        path: path.to_path_buf(),
        dtype: dtype_name(&type_str),
    })?;
    Ok((values.map_err(|e| malformed(e.to_string()))?, shape))
}

/// Writes `values` (row-major, `shape`) as an array of `dtype`; f32 rounds to nearest. Atomic:
/// a failed write (a full disk) leaves no file, or the earlier one, under `path`.
pub fn write(path: &Path, values: &[f64], shape: &Shape, dtype: Dtype) -> Result<()> {
    let fill = |file: &mut BufWriter<File>| match dtype {
        Dtype::F32 => write_as(file, shape, values.iter().map(|&v| v as f32)),
        Dtype::F64 => write_as(file, shape, values.iter().copied()),
    };
    crate::atomic::write_with(path, fill, |e| io_error(path, e))
}

fn write_as<T: AutoSerialize>(
    file: &mut BufWriter<File>,
    shape: &Shape,
    values: impl Iterator<Item = T>,
) -> io::Result<()> {
    let dims: Vec<u64> = shape.dims().iter().map(|&d| d as u64).collect();
    let mut writer = npyz::WriteOptions::<T>::new()
        .default_dtype()
        .shape(&dims)
        .writer(file)
        .begin_nd()?;
    writer.extend(values)?;
    writer.finish()
}

fn io_error(path: &Path, source: io::Error) -> Error {
    let path = path.to_path_buf();
    match source.kind() {
        io::ErrorKind::NotFound => Error::NotFound { path },
        _ => Error::Io { path, source },
    }
}

fn shape_of(dims: &[u64]) -> Option<Shape> {
    let dims: Option<Vec<usize>> = dims.iter().map(|&d| usize::try_from(d).ok()).collect();
    let shape = Shape(dims?);
    // The product must fit, or every later size computation would overflow.
    shape
        .dims()
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .map(|_| shape)
}

/// Whether the header's shape has more elements than a u64 counts. npyz multiplies the dimensions
/// unchecked, which panics (debug) or wraps (release) on a corrupt shape, so this looks first.
fn shape_overflows(bytes: &[u8]) -> bool {
    // The header text is the file up to its first newline.
    let end = bytes
        .iter()
        .position(|&b| b == b'\n')
        .unwrap_or(bytes.len());
    let header = String::from_utf8_lossy(&bytes[..end]);
    let Some(tuple) = header
        .split("'shape'")
        .nth(1)
        .and_then(|s| s.split(['(', ')']).nth(1))
    else {
        return false;
    };
    // Anything but a number is left to npyz to reject; the product is taken in npyz's order.
    let mut dims = tuple
        .split(',')
        .filter_map(|d| d.trim().parse::<u64>().ok());
    dims.try_fold(1u64, u64::checked_mul).is_none()
}

/// The header is checked against the bytes present before anything is allocated for the data,
/// so a corrupt shape is an error rather than an enormous allocation.
fn check_length(
    shape: &Shape,
    type_str: &TypeStr,
    present: usize,
) -> std::result::Result<(), String> {
    let item = type_str.num_bytes().unwrap_or(0);
    let expected = shape.numel().checked_mul(item);
    match expected {
        Some(n) if n <= present => Ok(()),
        _ => Err(format!(
            "the header promises {} elements of {} but the file holds only {present} bytes of data",
            shape.numel(),
            dtype_name(type_str)
        )),
    }
}

/// The data as f64, or `None` when the dtype is not a real number or bool.
fn values(npy: NpyFile<&[u8]>, t: &TypeStr) -> Option<io::Result<Vec<f64>>> {
    let values = match (t.type_char(), t.size_field()) {
        (TypeChar::Float, 4) => collect(npy, |x: f32| f64::from(x)),
        (TypeChar::Float, 8) => collect(npy, |x: f64| x),
        (TypeChar::Int, 1) => collect(npy, |x: i8| f64::from(x)),
        (TypeChar::Int, 2) => collect(npy, |x: i16| f64::from(x)),
        (TypeChar::Int, 4) => collect(npy, |x: i32| f64::from(x)),
        // Exact up to 2^53, which covers any label or index.
        (TypeChar::Int, 8) => collect(npy, |x: i64| x as f64),
        (TypeChar::Uint, 1) => collect(npy, |x: u8| f64::from(x)),
        (TypeChar::Uint, 2) => collect(npy, |x: u16| f64::from(x)),
        (TypeChar::Uint, 4) => collect(npy, |x: u32| f64::from(x)),
        (TypeChar::Uint, 8) => collect(npy, |x: u64| x as f64),
        (TypeChar::Bool, 1) => collect(npy, |x: bool| f64::from(u8::from(x))),
        _ => return None,
    };
    Some(values)
}

fn collect<T: Deserialize>(npy: NpyFile<&[u8]>, to_f64: fn(T) -> f64) -> io::Result<Vec<f64>> {
    let reader = npy
        .data::<T>()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    reader.map(|x| x.map(to_f64)).collect()
}

/// The numpy name of a dtype ("float16", "complex128"), or its type string ("<U5") for the others.
fn dtype_name(t: &TypeStr) -> String {
    let bits = t.size_field() * 8;
    match t.type_char() {
        TypeChar::Bool => "bool".into(),
        TypeChar::Int => format!("int{bits}"),
        TypeChar::Uint => format!("uint{bits}"),
        TypeChar::Float => format!("float{bits}"),
        TypeChar::Complex => format!("complex{bits}"),
        _ => format!("'{t}'"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tempfile::TempDir;

    /// A file with a hand-written header, to reach what our writer never produces.
    fn raw_npy(dir: &TempDir, header: &str, data: &[u8]) -> std::path::PathBuf {
        let mut text = header.to_string();
        // Magic (6) + version (2) + length (2) + text, padded to 64 bytes and ended by a newline.
        while !(10 + text.len() + 1).is_multiple_of(64) {
            text.push(' ');
        }
        text.push('\n');
        let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
        bytes.extend_from_slice(&(text.len() as u16).to_le_bytes());
        bytes.extend_from_slice(text.as_bytes());
        bytes.extend_from_slice(data);
        let path = dir.path().join("raw.npy");
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn round_trips_float64_and_float32() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("x.npy");
        let shape = Shape::from([2, 3]);
        let values = [0.1, -2.0, 3.5, 1e-3, 0.0, 7.25];
        write(&path, &values, &shape, Dtype::F64).unwrap();
        assert_eq!(read(&path).unwrap(), (values.to_vec(), shape.clone()));
        write(&path, &values, &shape, Dtype::F32).unwrap();
        let (read32, shape32) = read(&path).unwrap();
        let rounded: Vec<f64> = values.iter().map(|&v| f64::from(v as f32)).collect();
        assert_eq!((read32, shape32), (rounded, shape));
    }

    #[test]
    fn rank_zero_is_an_empty_shape() {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("s.npy");
        write(&path, &[4.5], &Shape::scalar(), Dtype::F64).unwrap();
        assert_eq!(read(&path).unwrap(), (vec![4.5], Shape::scalar()));
    }

    #[test]
    fn integer_and_bool_arrays_become_f64() {
        let dir = TempDir::new().unwrap();
        let labels = [-3i32, 0, 2]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect::<Vec<_>>();
        let path = raw_npy(
            &dir,
            "{'descr': '<i4', 'fortran_order': False, 'shape': (3,), }",
            &labels,
        );
        assert_eq!(
            read(&path).unwrap(),
            (vec![-3.0, 0.0, 2.0], Shape::from([3]))
        );
        let path = raw_npy(
            &dir,
            "{'descr': '|b1', 'fortran_order': False, 'shape': (2,), }",
            &[1, 0],
        );
        assert_eq!(read(&path).unwrap(), (vec![1.0, 0.0], Shape::from([2])));
    }

    fn read_error(header: &str, data: &[u8]) -> String {
        let dir = TempDir::new().unwrap();
        read(&raw_npy(&dir, header, data)).unwrap_err().to_string()
    }

    #[test]
    fn rejects_what_it_cannot_read_and_says_why() {
        let err = read_error(
            "{'descr': '<f8', 'fortran_order': True, 'shape': (1, 1), }",
            &[0; 8],
        );
        assert!(err.contains("raw.npy") && err.contains("Fortran"), "{err}");
        let err = read_error(
            "{'descr': '<c16', 'fortran_order': False, 'shape': (1,), }",
            &[0; 16],
        );
        assert!(err.contains("unsupported dtype complex128"), "{err}");
        let err = read_error(
            "{'descr': '<f8', 'fortran_order': False, 'shape': (4,), }",
            &[0; 8],
        );
        assert!(err.contains("promises 4 elements of float64"), "{err}");
        let err = read_error("{'descr': '<f8', 'shape': (1,), }", &[0; 8]);
        assert!(err.contains("not a valid .npy file"), "{err}");
        let huge =
            "{'descr': '<f8', 'fortran_order': False, 'shape': (4294967296, 4294967296, 16), }";
        assert!(read_error(huge, &[]).contains("not a valid .npy file"));
        let missing = read(Path::new("/nonexistent/x.npy"))
            .unwrap_err()
            .to_string();
        assert_eq!(missing, "/nonexistent/x.npy: file not found");
    }
}
