//! The factor file (METHOD.md §2): written as safetensors, read one
//! matrix at a time.

use std::path::{Path, PathBuf};

use super::{Factor, FactorDtype, FactorError, FactorsKey, SingularValues, TargetMatrix};
use crate::ggml::{self, Type};

/// Writes the factors (U, S, Vt per matrix) as safetensors, atomically.
pub fn write_factors(
    path: &Path,
    key: &FactorsKey,
    factors: &[(TargetMatrix, Factor)],
) -> Result<(), FactorError> {
    use crate::tensorfile::Entry;
    let matrix = |name: String, shape: Vec<usize>, values: &[f32]| match key.dtype {
        FactorDtype::F32 => Entry::f32(name, shape, values),
        FactorDtype::F16 => Entry {
            name,
            dtype: safetensors::Dtype::F16,
            shape,
            bytes: ggml::quantize(Type::F16, values, values.len()).unwrap_or_default(),
        },
    };
    let mut entries = Vec::with_capacity(3 * factors.len());
    for (t, f) in factors {
        let (p, r) = (t.prefix(), f.rank());
        entries.push(matrix(format!("{p}.U"), vec![f.m, r], &f.u));
        entries.push(Entry::f32(format!("{p}.S"), vec![r], &f.s));
        entries.push(matrix(format!("{p}.Vt"), vec![r, f.n], &f.vt));
    }
    crate::tensorfile::write(path, &entries, key.metadata()).map_err(|e| match e {
        crate::tensorfile::WriteError::Io(source) => FactorError::Io {
            path: path.to_path_buf(),
            source,
        },
        other => FactorError::Invalid {
            path: path.to_path_buf(),
            reason: other.to_string(),
        },
    })
}

/// A factor file opened for reading one matrix at a time: its header is
/// checked against the key when opened, a matrix's values are read when
/// asked for, so memory never holds more than one matrix.
pub struct FactorFile {
    path: PathBuf,
    file: std::fs::File,
    header: crate::tensorfile::Header,
    matrices: Vec<Shape>,
}

/// A target matrix of a factor file: `[m, n]`, factored at rank `rank`.
#[derive(Clone, Debug)]
pub struct Shape {
    pub target: TargetMatrix,
    pub m: usize,
    pub n: usize,
    pub rank: usize,
}

impl FactorFile {
    /// Opens the factor file at `path`, after checking its format, key and
    /// shapes: every target matrix, layer by layer, has U `[m, r]`, S `[r]`
    /// and Vt `[r, n]` (a file stops at the first layer without one).
    pub fn open(path: &Path, key: &FactorsKey) -> Result<Self, FactorError> {
        let invalid = |reason: String| FactorError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let header = read_header(path, key)?;
        let file = std::fs::File::open(path).map_err(|source| FactorError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut f = FactorFile {
            path: path.to_path_buf(),
            file,
            header,
            matrices: Vec::new(),
        };
        for layer in 0.. {
            let before = f.matrices.len();
            for &kind in key.targets.kinds() {
                let target = TargetMatrix { layer, kind };
                let p = target.prefix();
                let Ok(s) = f.stored(&format!("{p}.S"), 1) else {
                    continue;
                };
                let (u, vt) = (
                    f.stored(&format!("{p}.U"), 2)?,
                    f.stored(&format!("{p}.Vt"), 2)?,
                );
                let r = s.shape[0];
                if u.shape[1] != r || vt.shape[0] != r {
                    return Err(invalid(format!(
                        "{p}: U is {:?} and Vt {:?}, expected [m, {r}] and [{r}, n]",
                        u.shape, vt.shape
                    )));
                }
                let (m, n) = (u.shape[0], vt.shape[1]);
                f.matrices.push(Shape {
                    target,
                    m,
                    n,
                    rank: r,
                });
            }
            if f.matrices.len() == before {
                break;
            }
        }
        Ok(f)
    }

    /// Every target matrix of the file, in order.
    pub fn matrices(&self) -> &[Shape] {
        &self.matrices
    }

    /// The singular values `S` of every matrix.
    pub fn singular_values(&self) -> Result<SingularValues, FactorError> {
        self.matrices
            .iter()
            .map(|m| {
                Ok((
                    m.target.clone(),
                    self.values(&format!("{}.S", m.target.prefix()), 1)?,
                ))
            })
            .collect()
    }

    /// The factor (U, S, Vt as f32) of matrix `i` of [`Self::matrices`].
    pub fn factor(&self, i: usize) -> Result<Factor, FactorError> {
        let shape = &self.matrices[i];
        let p = shape.target.prefix();
        Ok(Factor {
            m: shape.m,
            n: shape.n,
            u: self.values(&format!("{p}.U"), 2)?,
            s: self.values(&format!("{p}.S"), 1)?,
            vt: self.values(&format!("{p}.Vt"), 2)?,
        })
    }

    fn invalid(&self, reason: String) -> FactorError {
        FactorError::Invalid {
            path: self.path.clone(),
            reason,
        }
    }

    /// The tensor `name`, checking its number of dimensions and that its
    /// bytes hold its shape in its dtype (f32 or f16).
    fn stored(&self, name: &str, dims: usize) -> Result<&crate::tensorfile::Stored, FactorError> {
        let t = self
            .header
            .tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| self.invalid(format!("tensor '{name}' is missing")))?;
        if t.shape.len() != dims {
            return Err(self.invalid(format!(
                "tensor '{name}' has shape {:?}, expected {dims} dimensions",
                t.shape
            )));
        }
        let width = match t.dtype.as_str() {
            "F32" => 4,
            "F16" => 2,
            other => {
                return Err(self.invalid(format!("tensor '{name}' is {other}, expected F32 or F16")))
            }
        };
        let want = t
            .shape
            .iter()
            .try_fold(width, |a: u64, &d| a.checked_mul(d as u64));
        if want != Some(t.range.end - t.range.start) {
            return Err(self.invalid(format!(
                "tensor '{name}' of shape {:?} has {} bytes",
                t.shape,
                t.range.end - t.range.start
            )));
        }
        Ok(t)
    }

    /// The values of tensor `name` as f32.
    fn values(&self, name: &str, dims: usize) -> Result<Vec<f32>, FactorError> {
        use std::os::unix::fs::FileExt;
        let t = self.stored(name, dims)?;
        let mut bytes = vec![0u8; (t.range.end - t.range.start) as usize];
        self.file
            .read_exact_at(&mut bytes, self.header.data_start + t.range.start)
            .map_err(|source| FactorError::Io {
                path: self.path.clone(),
                source,
            })?;
        Ok(if t.dtype == "F32" {
            crate::tensorfile::f32s(&bytes)
        } else {
            let bits: Vec<u16> = bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            let mut out = vec![0f32; bits.len()];
            ggml::f16_to_f32(&bits, &mut out);
            out
        })
    }
}

/// The singular values `S` of every matrix in a factor file, after checking
/// its format and key.
pub fn read_singular_values(path: &Path, key: &FactorsKey) -> Result<SingularValues, FactorError> {
    FactorFile::open(path, key)?.singular_values()
}

/// Every factor (U, S, Vt as f32) of a factor file, after checking its
/// format, key and shapes.
pub fn read_factors(
    path: &Path,
    key: &FactorsKey,
) -> Result<Vec<(TargetMatrix, Factor)>, FactorError> {
    let file = FactorFile::open(path, key)?;
    (0..file.matrices().len())
        .map(|i| Ok((file.matrices()[i].target.clone(), file.factor(i)?)))
        .collect()
}

/// The header of the safetensors file at `path`, after checking that it
/// is whole and that its metadata is `key`'s.
pub(super) fn read_header(
    path: &Path,
    key: &FactorsKey,
) -> Result<crate::tensorfile::Header, FactorError> {
    let invalid = |reason: String| FactorError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let header = crate::tensorfile::read_header(path).map_err(invalid)?;
    for (k, want) in key.metadata() {
        if header.metadata.get(&k) != Some(&want) {
            return Err(invalid(format!(
                "{k} is {:?}, expected '{want}'",
                header.metadata.get(&k)
            )));
        }
    }
    Ok(header)
}
