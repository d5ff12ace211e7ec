//! safetensors files of svfit (factors, adapters): one writer and one f32
//! decoder, so both formats are written and read the same way.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

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

/// Where a safetensors file keeps one tensor: dtype as written (`F16`
/// ...), shape, and its bytes' range within the data section.
#[derive(Clone, Debug, PartialEq)]
pub struct Stored {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub range: std::ops::Range<u64>,
}

/// A safetensors file's header, read without its data: the metadata, the
/// tensors in data order, and where the data section starts.
#[derive(Debug)]
pub struct Header {
    pub metadata: HashMap<String, String>,
    pub tensors: Vec<Stored>,
    pub data_start: u64,
}

/// Headers larger than this are refused (safetensors' own limit).
const MAX_HEADER: u64 = 100_000_000;

/// Reads the header of the safetensors file at `path` and checks that its
/// tensors tile the data section, which ends where the file does.
pub fn read_header(path: &Path) -> Result<Header, String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let file_len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| e.to_string())?;
    let len = u64::from_le_bytes(len);
    if len > MAX_HEADER || 8 + len > file_len {
        return Err(format!("header of {len} bytes in a file of {file_len}"));
    }
    let mut json = vec![0u8; len as usize];
    file.read_exact(&mut json).map_err(|e| e.to_string())?;
    let json: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&json).map_err(|e| format!("header: {e}"))?;
    let mut header = Header {
        metadata: HashMap::new(),
        tensors: Vec::with_capacity(json.len()),
        data_start: 8 + len,
    };
    for (name, value) in json {
        if name == "__metadata__" {
            header.metadata = serde_json::from_value(value).map_err(|e| format!("{name}: {e}"))?;
            continue;
        }
        #[derive(serde::Deserialize)]
        struct Info {
            dtype: String,
            shape: Vec<usize>,
            data_offsets: (u64, u64),
        }
        let info: Info = serde_json::from_value(value).map_err(|e| format!("{name}: {e}"))?;
        let (begin, end) = info.data_offsets;
        header.tensors.push(Stored {
            name,
            dtype: info.dtype,
            shape: info.shape,
            range: begin..end,
        });
    }
    header.tensors.sort_by_key(|t| t.range.start);
    let mut at = 0;
    for t in &header.tensors {
        if t.range.start != at || t.range.end < at {
            return Err(format!(
                "tensor '{}' does not follow the one before",
                t.name
            ));
        }
        at = t.range.end;
    }
    if header.data_start + at != file_len {
        return Err(format!(
            "the tensors end at byte {}, the file at {file_len}",
            header.data_start + at
        ));
    }
    Ok(header)
}

/// Writes the tensors of the safetensors files `parts`, in order, as one
/// file at `path` with `metadata`, atomically. The data is copied file to
/// file: memory holds headers only.
pub fn concat(
    path: &Path,
    parts: &[(PathBuf, Header)],
    metadata: HashMap<String, String>,
) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut json = serde_json::Map::new();
    // Sorted: the same set gives the same bytes in every process.
    let metadata: std::collections::BTreeMap<_, _> = metadata.into_iter().collect();
    json.insert("__metadata__".into(), serde_json::json!(metadata));
    let mut base = 0;
    for (_, header) in parts {
        for t in &header.tensors {
            json.insert(
                t.name.clone(),
                serde_json::json!({
                    "dtype": t.dtype,
                    "shape": t.shape,
                    "data_offsets": [base + t.range.start, base + t.range.end],
                }),
            );
        }
        base += header.tensors.last().map_or(0, |t| t.range.end);
    }
    let mut json = serde_json::to_vec(&json).map_err(std::io::Error::other)?;
    // The data section starts 8-aligned, as safetensors writes it.
    json.resize(json.len().next_multiple_of(8), b' ');
    crate::home::write_atomic(path, |w| {
        w.write_all(&(json.len() as u64).to_le_bytes())?;
        w.write_all(&json)?;
        for (part, header) in parts {
            let mut file = std::fs::File::open(part)?;
            file.seek(SeekFrom::Start(header.data_start))?;
            let len = header.tensors.last().map_or(0, |t| t.range.end);
            let copied = std::io::copy(&mut Read::by_ref(&mut file).take(len), w)?;
            if copied != len {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("{} ended early", part.display()),
                ));
            }
        }
        Ok(())
    })
}
