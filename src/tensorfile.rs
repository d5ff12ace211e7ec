//! safetensors files of svfit (factors, adapters): one writer and one f32
//! decoder, so both formats are written and read the same way.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// One tensor to write: name, dtype, shape, little-endian bytes.
pub struct Entry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl Entry {
    /// An f32 tensor.
    pub fn f32(name: String, shape: Vec<usize>, values: &[f32]) -> Self {
        Entry {
            name,
            dtype: Dtype::F32,
            shape,
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("tensor '{name}': {reason}")]
    Tensor { name: String, reason: String },
    #[error("{0}")]
    Serialize(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// `entries` and `metadata` as the bytes of a safetensors file.
pub fn serialize(
    entries: &[Entry],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>, WriteError> {
    let views = entries
        .iter()
        .map(|e| {
            TensorView::new(e.dtype, e.shape.clone(), &e.bytes)
                .map(|v| (e.name.clone(), v))
                .map_err(|err| WriteError::Tensor {
                    name: e.name.clone(),
                    reason: err.to_string(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, Some(metadata)).map_err(|e| WriteError::Serialize(e.to_string()))
}

/// Writes `entries` and `metadata` as a safetensors file, atomically.
pub fn write(
    path: &Path,
    entries: &[Entry],
    metadata: HashMap<String, String>,
) -> Result<(), WriteError> {
    let bytes = serialize(entries, metadata)?;
    crate::home::write_atomic(path, |w| std::io::Write::write_all(w, &bytes))?;
    Ok(())
}

/// Little-endian f32 values.
pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}
