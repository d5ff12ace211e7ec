//! GGUF files: a validating reader that loads tensors onto a backend, and a
//! writer (for merged models and test fixtures).

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use super::backend::{c_string, Backend, TensorSet};
use super::context::Context;
use super::{log, sys, GgmlError, Type};

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error(
        "{path}: truncated: tensor '{tensor}' needs bytes up to {end} but the file has {size}"
    )]
    Truncated {
        path: PathBuf,
        tensor: String,
        end: u64,
        size: u64,
    },
    #[error("{path}: metadata '{key}' has type {actual}, expected {expected}")]
    KeyType {
        path: PathBuf,
        key: String,
        expected: &'static str,
        actual: String,
    },
    #[error("{path}: {source}")]
    Ggml { path: PathBuf, source: GgmlError },
}

/// What the file says about one tensor.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub ty: Type,
    /// Elements per dimension, ggml order.
    pub ne: [i64; 4],
    /// Absolute byte offset of the data in the file.
    pub file_offset: u64,
    pub n_bytes: usize,
}

impl TensorInfo {
    /// The dimensions up to the last one above 1 (at least one), as a
    /// GGUF writer takes them.
    pub fn shape(&self) -> &[i64] {
        let dims = self.ne.iter().rposition(|&n| n != 1).unwrap_or(0) + 1;
        &self.ne[..dims]
    }
}

/// An open GGUF file: its metadata, and tensor descriptions that
/// [`GgufFile::load_tensors`] turns into backend tensors.
pub struct GgufFile {
    raw: NonNull<sys::gguf_context>,
    meta: Option<Context>,
    path: PathBuf,
    tensors: Vec<TensorInfo>,
}

// SAFETY: the gguf context is only read after construction and is owned here.
unsafe impl Send for GgufFile {}

const GGUF_MAGIC: &[u8; 4] = b"GGUF";

impl GgufFile {
    /// Opens and validates `path`: magic, header, and that every tensor's data
    /// lies inside the file.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        log::install();
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let invalid = |reason: String| GgufError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let mut file = File::open(path).map_err(io)?;
        let size = file.metadata().map_err(io)?.len();
        let mut magic = [0u8; 4];
        if file.read_exact(&mut magic).is_err() || &magic != GGUF_MAGIC {
            return Err(invalid("missing the GGUF magic bytes".into()));
        }
        let c_path = c_string(&path.to_string_lossy())
            .ok_or_else(|| invalid("path holds a NUL byte".into()))?;
        let mut meta: *mut sys::ggml_context = std::ptr::null_mut();
        let params = sys::gguf_init_params {
            no_alloc: true,
            ctx: &mut meta,
        };
        log::take_last_error();
        // SAFETY: valid C path; `meta` receives a new context or stays null.
        let raw = unsafe { sys::gguf_init_from_file(c_path.as_ptr(), params) };
        let Some(raw) = NonNull::new(raw) else {
            let reason = log::take_last_error().unwrap_or_else(|| "malformed header".into());
            return Err(invalid(reason));
        };
        let meta = NonNull::new(meta).map(Context::from_raw);
        let mut gguf = GgufFile {
            raw,
            meta,
            path: path.to_path_buf(),
            tensors: Vec::new(),
        };
        gguf.tensors = gguf.read_tensor_infos();
        for t in &gguf.tensors {
            let end = t.file_offset + t.n_bytes as u64;
            if end > size {
                return Err(GgufError::Truncated {
                    path: path.to_path_buf(),
                    tensor: t.name.clone(),
                    end,
                    size,
                });
            }
        }
        Ok(gguf)
    }

    fn read_tensor_infos(&self) -> Vec<TensorInfo> {
        let ctx = self.raw.as_ptr();
        // SAFETY: the gguf context is live; ids are in range.
        unsafe {
            let data_offset = sys::gguf_get_data_offset(ctx) as u64;
            (0..sys::gguf_get_n_tensors(ctx))
                .map(|i| {
                    let ne_ptr = sys::gguf_get_tensor_ne(ctx, i);
                    let mut ne = [1i64; 4];
                    ne.copy_from_slice(std::slice::from_raw_parts(ne_ptr, 4));
                    TensorInfo {
                        name: std::ffi::CStr::from_ptr(sys::gguf_get_tensor_name(ctx, i))
                            .to_string_lossy()
                            .into_owned(),
                        ty: Type(sys::gguf_get_tensor_type(ctx, i)),
                        ne,
                        file_offset: data_offset + sys::gguf_get_tensor_offset(ctx, i) as u64,
                        n_bytes: sys::gguf_get_tensor_size(ctx, i),
                    }
                })
                .collect()
        }
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    fn key_id(&self, key: &str) -> Option<i64> {
        let c = c_string(key)?;
        // SAFETY: live context, valid C string.
        let id = unsafe { sys::gguf_find_key(self.raw.as_ptr(), c.as_ptr()) };
        (id >= 0).then_some(id)
    }

    fn kv_type(&self, id: i64) -> sys::gguf_type {
        // SAFETY: id came from gguf_find_key.
        unsafe { sys::gguf_get_kv_type(self.raw.as_ptr(), id) }
    }

    fn type_error(&self, key: &str, expected: &'static str, id: i64) -> GgufError {
        // SAFETY: gguf_type_name returns a static string.
        let actual = unsafe { std::ffi::CStr::from_ptr(sys::gguf_type_name(self.kv_type(id))) }
            .to_string_lossy()
            .into_owned();
        GgufError::KeyType {
            path: self.path.clone(),
            key: key.to_string(),
            expected,
            actual,
        }
    }

    /// Every metadata key, in the file's order.
    pub fn keys(&self) -> Vec<String> {
        let ctx = self.raw.as_ptr();
        // SAFETY: live context; ids below gguf_get_n_kv; each key is a
        // NUL-terminated string the context owns, copied before it returns.
        unsafe {
            (0..sys::gguf_get_n_kv(ctx))
                .map(|id| {
                    std::ffi::CStr::from_ptr(sys::gguf_get_key(ctx, id))
                        .to_string_lossy()
                        .into_owned()
                })
                .collect()
        }
    }

    /// A string value, `Ok(None)` when the key is absent.
    pub fn get_str(&self, key: &str) -> Result<Option<String>, GgufError> {
        let Some(id) = self.key_id(key) else {
            return Ok(None);
        };
        if self.kv_type(id) != sys::GGUF_TYPE_STRING {
            return Err(self.type_error(key, "string", id));
        }
        // SAFETY: the key holds a string.
        let s = unsafe { std::ffi::CStr::from_ptr(sys::gguf_get_val_str(self.raw.as_ptr(), id)) };
        Ok(Some(s.to_string_lossy().into_owned()))
    }

    /// An integer value of any GGUF integer type, `Ok(None)` when absent.
    pub fn get_int(&self, key: &str) -> Result<Option<i64>, GgufError> {
        let Some(id) = self.key_id(key) else {
            return Ok(None);
        };
        let ctx = self.raw.as_ptr();
        // SAFETY: each getter matches the key's stored type.
        let value = unsafe {
            match self.kv_type(id) {
                sys::GGUF_TYPE_UINT8 => sys::gguf_get_val_u8(ctx, id) as i64,
                sys::GGUF_TYPE_INT8 => sys::gguf_get_val_i8(ctx, id) as i64,
                sys::GGUF_TYPE_UINT16 => sys::gguf_get_val_u16(ctx, id) as i64,
                sys::GGUF_TYPE_INT16 => sys::gguf_get_val_i16(ctx, id) as i64,
                sys::GGUF_TYPE_UINT32 => sys::gguf_get_val_u32(ctx, id) as i64,
                sys::GGUF_TYPE_INT32 => sys::gguf_get_val_i32(ctx, id) as i64,
                sys::GGUF_TYPE_UINT64 => sys::gguf_get_val_u64(ctx, id) as i64,
                sys::GGUF_TYPE_INT64 => sys::gguf_get_val_i64(ctx, id),
                _ => return Err(self.type_error(key, "integer", id)),
            }
        };
        Ok(Some(value))
    }

    /// A float value (f32 or f64), `Ok(None)` when absent.
    pub fn get_f32(&self, key: &str) -> Result<Option<f32>, GgufError> {
        let Some(id) = self.key_id(key) else {
            return Ok(None);
        };
        let ctx = self.raw.as_ptr();
        // SAFETY: each getter matches the key's stored type.
        let value = unsafe {
            match self.kv_type(id) {
                sys::GGUF_TYPE_FLOAT32 => sys::gguf_get_val_f32(ctx, id),
                sys::GGUF_TYPE_FLOAT64 => sys::gguf_get_val_f64(ctx, id) as f32,
                _ => return Err(self.type_error(key, "float", id)),
            }
        };
        Ok(Some(value))
    }

    /// A boolean value, `Ok(None)` when absent.
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        let Some(id) = self.key_id(key) else {
            return Ok(None);
        };
        if self.kv_type(id) != sys::GGUF_TYPE_BOOL {
            return Err(self.type_error(key, "bool", id));
        }
        // SAFETY: the key holds a bool.
        Ok(Some(unsafe {
            sys::gguf_get_val_bool(self.raw.as_ptr(), id)
        }))
    }

    /// The length of an array value, `Ok(None)` when absent.
    pub fn get_arr_len(&self, key: &str) -> Result<Option<usize>, GgufError> {
        let Some(id) = self.key_id(key) else {
            return Ok(None);
        };
        if self.kv_type(id) != sys::GGUF_TYPE_ARRAY {
            return Err(self.type_error(key, "array", id));
        }
        // SAFETY: the key holds an array.
        Ok(Some(unsafe { sys::gguf_get_arr_n(self.raw.as_ptr(), id) }))
    }

    /// Reads one tensor's raw bytes (in its stored type) from the file.
    pub fn read_tensor_bytes(&self, info: &TensorInfo) -> Result<Vec<u8>, GgufError> {
        let mut out = vec![0u8; info.n_bytes];
        self.read_at(info.file_offset, &mut out)?;
        Ok(out)
    }

    fn read_at(&self, offset: u64, out: &mut [u8]) -> Result<(), GgufError> {
        let io = |source| GgufError::Io {
            path: self.path.clone(),
            source,
        };
        let mut file = File::open(&self.path).map_err(io)?;
        file.seek(SeekFrom::Start(offset)).map_err(io)?;
        file.read_exact(out).map_err(io)
    }

    /// Allocates every tensor of the file on `backend` and reads its data;
    /// on the CPU, the tensors are the file's own bytes, mapped (where the
    /// file places every tensor 32-aligned, as GGUF writers do). Can be
    /// called once; the tensor metadata moves into the result.
    pub fn load_tensors(&mut self, backend: &Backend) -> Result<TensorSet, GgufError> {
        let ggml = |source| GgufError::Ggml {
            path: self.path.clone(),
            source,
        };
        let meta = self.meta.take().ok_or_else(|| GgufError::Invalid {
            path: self.path.clone(),
            reason: "tensors already loaded".into(),
        })?;
        let io = |source| GgufError::Io {
            path: self.path.clone(),
            source,
        };
        let mut file = File::open(&self.path).map_err(io)?;
        if backend.is_cpu() {
            // SAFETY: the map is read-only; a file replaced by rename keeps
            // its pages (one truncated in place while served would fault,
            // as it would for llama.cpp).
            if let Ok(map) = unsafe { memmap2::Mmap::map(&file) } {
                let offsets: HashMap<&str, usize> = self
                    .tensors
                    .iter()
                    .map(|t| (t.name.as_str(), t.file_offset as usize))
                    .collect();
                let offset = |name: &str| offsets.get(name).copied();
                if let Some(places) = TensorSet::placements(&meta, map.len(), offset) {
                    return TensorSet::map_cpu(meta, map, &places).map_err(ggml);
                }
            }
        }
        let mut set = TensorSet::allocate(meta, backend).map_err(ggml)?;
        let mut staging = Vec::new();
        for info in &self.tensors {
            let Some(id) = set.find(&info.name) else {
                continue;
            };
            file.seek(SeekFrom::Start(info.file_offset)).map_err(io)?;
            match set.host_bytes_mut(id) {
                Some(dst) => file.read_exact(dst).map_err(io)?,
                None => {
                    staging.resize(info.n_bytes, 0);
                    file.read_exact(&mut staging).map_err(io)?;
                    set.get(id)
                        .write(&staging)
                        .map_err(|source| GgufError::Ggml {
                            path: self.path.clone(),
                            source,
                        })?;
                }
            }
        }
        Ok(set)
    }

    /// Like [`GgufFile::load_tensors`], but each tensor is held in the type
    /// `type_of` picks for it, converted on the way through f32 when that is
    /// not its stored type (training dequantizes the frozen weights; serving
    /// may re-quantize them into a layout that batches better).
    pub fn load_tensors_as(
        &mut self,
        backend: &Backend,
        type_of: impl Fn(&TensorInfo) -> Type,
    ) -> Result<TensorSet, GgufError> {
        let ggml = |path: &Path, source| GgufError::Ggml {
            path: path.to_path_buf(),
            source,
        };
        let ctx = Context::new(self.tensors.len(), 0).map_err(|e| ggml(&self.path, e))?;
        for info in &self.tensors {
            ctx.new_tensor(type_of(info), &info.ne).set_name(&info.name);
        }
        let set = TensorSet::allocate(ctx, backend).map_err(|e| ggml(&self.path, e))?;
        for info in &self.tensors {
            let Some(id) = set.find(&info.name) else {
                continue;
            };
            let tensor = set.get(id);
            let bytes = self.read_tensor_bytes(info)?;
            let bytes = if tensor.ty() == info.ty {
                bytes
            } else {
                self.convert(info, &bytes, tensor.ty())?
            };
            tensor.write(&bytes).map_err(|e| ggml(&self.path, e))?;
        }
        Ok(set)
    }

    /// `bytes` of the tensor `info` converted to `ty`, row by row.
    pub fn convert(&self, info: &TensorInfo, bytes: &[u8], ty: Type) -> Result<Vec<u8>, GgufError> {
        let invalid = || GgufError::Invalid {
            path: self.path.clone(),
            reason: format!(
                "tensor '{}': no conversion from {} to {ty}",
                info.name, info.ty
            ),
        };
        let n = info.ne.iter().product::<i64>() as usize;
        let values = super::dequantize(info.ty, bytes, n).ok_or_else(invalid)?;
        super::quantize(ty, &values, info.ne[0] as usize).ok_or_else(invalid)
    }

    pub(crate) fn as_ptr(&self) -> *mut sys::gguf_context {
        self.raw.as_ptr()
    }
}

impl Drop for GgufFile {
    fn drop(&mut self) {
        // SAFETY: we own the gguf context.
        unsafe { sys::gguf_free(self.raw.as_ptr()) }
    }
}

/// Builds a GGUF file in memory and writes it.
pub struct GgufWriter {
    raw: NonNull<sys::gguf_context>,
    ctx: Context,
    // Tensor bytes stay here until `write`; gguf holds pointers into them.
    data: Vec<Vec<u8>>,
}

#[derive(Debug, thiserror::Error)]
pub enum GgufWriteError {
    #[error("tensor '{name}': {reason}")]
    Tensor { name: String, reason: String },
    #[error("metadata key '{0}' holds a NUL byte")]
    Key(String),
    #[error("{path}: ggml could not write the file")]
    Write { path: PathBuf },
    #[error(transparent)]
    Ggml(#[from] GgmlError),
}

impl GgufWriter {
    /// An empty file with room for `max_tensors` tensors.
    pub fn new(max_tensors: usize) -> Result<Self, GgufWriteError> {
        log::install();
        // SAFETY: allocates a new empty context.
        let raw = NonNull::new(unsafe { sys::gguf_init_empty() }).ok_or(GgmlError::Alloc {
            what: "a gguf context".into(),
        })?;
        Ok(GgufWriter {
            raw,
            ctx: Context::new(max_tensors, 0)?,
            data: Vec::new(),
        })
    }

    /// Starts from all metadata of `src` (architecture, tokenizer, ...).
    pub fn copy_metadata_from(&mut self, src: &GgufFile) {
        // SAFETY: both contexts are live; gguf copies every key/value.
        unsafe { sys::gguf_set_kv(self.raw.as_ptr(), src.as_ptr()) }
    }

    fn key(key: &str) -> Result<std::ffi::CString, GgufWriteError> {
        c_string(key).ok_or_else(|| GgufWriteError::Key(key.to_string()))
    }

    /// Removes `key` (nothing when the file has no such key).
    pub fn remove_key(&mut self, key: &str) -> Result<(), GgufWriteError> {
        let k = Self::key(key)?;
        // SAFETY: valid C string; gguf frees the key's copy.
        unsafe { sys::gguf_remove_key(self.raw.as_ptr(), k.as_ptr()) };
        Ok(())
    }

    pub fn set_str(&mut self, key: &str, value: &str) -> Result<(), GgufWriteError> {
        let k = Self::key(key)?;
        let v = Self::key(value)?;
        // SAFETY: valid C strings; gguf copies them.
        unsafe { sys::gguf_set_val_str(self.raw.as_ptr(), k.as_ptr(), v.as_ptr()) };
        Ok(())
    }

    pub fn set_u32(&mut self, key: &str, value: u32) -> Result<(), GgufWriteError> {
        let k = Self::key(key)?;
        // SAFETY: valid C string.
        unsafe { sys::gguf_set_val_u32(self.raw.as_ptr(), k.as_ptr(), value) };
        Ok(())
    }

    pub fn set_f32(&mut self, key: &str, value: f32) -> Result<(), GgufWriteError> {
        let k = Self::key(key)?;
        // SAFETY: valid C string.
        unsafe { sys::gguf_set_val_f32(self.raw.as_ptr(), k.as_ptr(), value) };
        Ok(())
    }

    pub fn set_i64(&mut self, key: &str, value: i64) -> Result<(), GgufWriteError> {
        let k = Self::key(key)?;
        // SAFETY: valid C string.
        unsafe { sys::gguf_set_val_i64(self.raw.as_ptr(), k.as_ptr(), value) };
        Ok(())
    }

    pub fn set_u64(&mut self, key: &str, value: u64) -> Result<(), GgufWriteError> {
        let k = Self::key(key)?;
        // SAFETY: valid C string.
        unsafe { sys::gguf_set_val_u64(self.raw.as_ptr(), k.as_ptr(), value) };
        Ok(())
    }

    /// An array of booleans (as llama.cpp writes per-layer flags).
    pub fn set_bool_array(&mut self, key: &str, values: &[bool]) -> Result<(), GgufWriteError> {
        let k = Self::key(key)?;
        // SAFETY: valid C string; `values` holds `values.len()` one-byte
        // bools, which gguf copies.
        unsafe {
            sys::gguf_set_arr_data(
                self.raw.as_ptr(),
                k.as_ptr(),
                sys::GGUF_TYPE_BOOL,
                values.as_ptr().cast(),
                values.len(),
            )
        };
        Ok(())
    }

    pub fn set_bool(&mut self, key: &str, value: bool) -> Result<(), GgufWriteError> {
        let k = Self::key(key)?;
        // SAFETY: valid C string.
        unsafe { sys::gguf_set_val_bool(self.raw.as_ptr(), k.as_ptr(), value) };
        Ok(())
    }

    /// Adds (or replaces the data of) a tensor with `shape` in ggml order.
    /// `bytes` must hold exactly the tensor's size in `ty`.
    pub fn add_tensor(
        &mut self,
        name: &str,
        ty: Type,
        shape: &[i64],
        bytes: Vec<u8>,
    ) -> Result<(), GgufWriteError> {
        let err = |reason: String| GgufWriteError::Tensor {
            name: name.to_string(),
            reason,
        };
        let c_name = c_string(name).ok_or_else(|| err("name holds a NUL byte".into()))?;
        if shape.is_empty() || shape.len() > 4 || shape.iter().any(|&n| n <= 0) {
            return Err(err(format!("invalid shape {shape:?}")));
        }
        let row = ty
            .row_size(shape[0])
            .ok_or_else(|| err(format!("a row of {} does not fit type {ty}", shape[0])))?;
        let expected = row * shape[1..].iter().product::<i64>() as usize;
        if bytes.len() != expected {
            return Err(err(format!(
                "expected {expected} bytes, got {}",
                bytes.len()
            )));
        }
        // SAFETY: live context, valid C string.
        if unsafe { sys::gguf_find_tensor(self.raw.as_ptr(), c_name.as_ptr()) } >= 0 {
            return Err(err("duplicate tensor name".into()));
        }
        let t = self.ctx.new_tensor(ty, shape).set_name(name);
        // SAFETY: `t` is a live tensor; gguf copies its description. The data
        // pointer stays valid: `bytes` moves into `self.data` (its heap buffer
        // does not move) and lives until `self` is dropped.
        unsafe {
            sys::gguf_add_tensor(self.raw.as_ptr(), t.as_ptr());
            sys::gguf_set_tensor_data(self.raw.as_ptr(), c_name.as_ptr(), bytes.as_ptr().cast());
        }
        self.data.push(bytes);
        Ok(())
    }

    /// Writes the file (metadata, then tensor data aligned as GGUF requires)
    /// atomically: to a temporary file beside `path`, renamed when complete.
    pub fn write(&self, path: &Path) -> Result<(), GgufWriteError> {
        let failed = || GgufWriteError::Write {
            path: path.to_path_buf(),
        };
        let name = path.file_name().ok_or_else(failed)?.to_string_lossy();
        let tmp = path.with_file_name(format!(".{name}.tmp.{}", std::process::id()));
        let c_tmp = c_string(&tmp.to_string_lossy()).ok_or_else(failed)?;
        // SAFETY: live context; every tensor has data (see `add_tensor`).
        let ok = unsafe { sys::gguf_write_to_file(self.raw.as_ptr(), c_tmp.as_ptr(), false) };
        if ok && std::fs::rename(&tmp, path).is_ok() {
            return Ok(());
        }
        let _ = std::fs::remove_file(&tmp);
        Err(failed())
    }
}

impl Drop for GgufWriter {
    fn drop(&mut self) {
        // SAFETY: we own the gguf context.
        unsafe { sys::gguf_free(self.raw.as_ptr()) }
    }
}
