//! A thin, safe layer over the raw ggml API that `llama-cpp-sys-2` generates.
//!
//! Every `unsafe` block of the crate lives under this module. The rest of the
//! crate sees owned values: [`Context`] (tensor metadata and graph nodes),
//! [`Tensor`] (a handle valid while its context lives), [`Graph`],
//! [`Backend`], [`Buffer`], [`TensorSet`] (tensors allocated on a backend),
//! [`Scheduler`] (runs graphs over backends) and the GGUF reader and writer.

mod backend;
mod context;
pub mod gguf;
pub mod log;

pub use backend::{Backend, Buffer, Scheduler, TensorId, TensorSet};
pub use context::{Context, Graph, Tensor};

pub(crate) use llama_cpp_sys_2 as sys;

/// A ggml element type (`enum ggml_type`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Type(pub(crate) sys::ggml_type);

impl Type {
    pub const F32: Type = Type(sys::GGML_TYPE_F32);
    pub const F16: Type = Type(sys::GGML_TYPE_F16);
    pub const I32: Type = Type(sys::GGML_TYPE_I32);
    pub const I64: Type = Type(sys::GGML_TYPE_I64);
    pub const Q8_0: Type = Type(sys::GGML_TYPE_Q8_0);
    pub const Q4_0: Type = Type(sys::GGML_TYPE_Q4_0);
    pub const Q4_1: Type = Type(sys::GGML_TYPE_Q4_1);

    /// The type's name as ggml prints it ("f32", "q4_1", ...).
    pub fn name(self) -> &'static str {
        if self.0 >= sys::GGML_TYPE_COUNT {
            return "invalid";
        }
        // SAFETY: the type is in range; ggml returns a static C string.
        let ptr = unsafe { sys::ggml_type_name(self.0) };
        if ptr.is_null() {
            return "unknown";
        }
        // SAFETY: non-null, NUL-terminated, static lifetime.
        unsafe { std::ffi::CStr::from_ptr(ptr) }
            .to_str()
            .unwrap_or("unknown")
    }

    /// Bytes of one row of `n` elements of this type; `None` when `n` is not a
    /// multiple of the type's block size or the type is unknown.
    pub fn row_size(self, n: i64) -> Option<usize> {
        if self.0 >= sys::GGML_TYPE_COUNT || n < 0 {
            return None;
        }
        // SAFETY: the type is in range; these are pure lookups in ggml's type table.
        let (block, type_size) =
            unsafe { (sys::ggml_blck_size(self.0), sys::ggml_type_size(self.0)) };
        if block <= 0 || n % block != 0 {
            return None;
        }
        usize::try_from(n / block).ok()?.checked_mul(type_size)
    }
}

impl std::fmt::Debug for Type {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::fmt::Display for Type {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors of the ggml layer.
#[derive(Debug, thiserror::Error)]
pub enum GgmlError {
    #[error("ggml could not allocate {what}")]
    Alloc { what: String },
    #[error("tensor '{name}' holds {expected} bytes, got {actual}")]
    Size {
        name: String,
        expected: usize,
        actual: usize,
    },
    #[error("tensor '{name}' is not allocated on a backend")]
    Unallocated { name: String },
    #[error("graph computation failed on the backend (status {0})")]
    Compute(i32),
    #[error("no backend device named '{0}' is available")]
    NoDevice(String),
}

/// Plain element types that can be copied to and from tensor memory.
pub trait Element: Copy + Default + sealed::Sealed {}
impl Element for f32 {}
impl Element for i32 {}
impl Element for i64 {}
impl Element for u16 {}
impl Element for u8 {}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for i32 {}
    impl Sealed for i64 {}
    impl Sealed for u16 {}
    impl Sealed for u8 {}
}

fn as_bytes<T: Element>(values: &[T]) -> &[u8] {
    // SAFETY: `Element` is only implemented for plain integer and float types,
    // which have no padding and no invalid bit patterns.
    unsafe {
        std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
    }
}

fn as_bytes_mut<T: Element>(values: &mut [T]) -> &mut [u8] {
    // SAFETY: as in `as_bytes`; every bit pattern is a valid value of `T`.
    unsafe {
        std::slice::from_raw_parts_mut(
            values.as_mut_ptr().cast::<u8>(),
            std::mem::size_of_val(values),
        )
    }
}

/// Converts f16 values (as bits) to f32 with ggml's own conversion.
pub fn f16_to_f32(bits: &[u16], out: &mut [f32]) {
    let n = bits.len().min(out.len());
    // SAFETY: both slices hold at least `n` elements; ggml_fp16_t is u16.
    unsafe { sys::ggml_fp16_to_fp32_row(bits.as_ptr(), out.as_mut_ptr(), n as i64) }
}

/// Dequantizes `n` elements of `ty` stored in `data` to f32. Returns `None`
/// when the type has no conversion or `data` is too short.
pub fn dequantize(ty: Type, data: &[u8], n: usize) -> Option<Vec<f32>> {
    if ty == Type::F32 {
        let bytes = data.get(..n * 4)?;
        return Some(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        );
    }
    let needed = ty.row_size(n as i64)?;
    if data.len() < needed {
        return None;
    }
    // SAFETY: the type is in range (row_size checked it); ggml returns a pointer
    // to its static traits table.
    let traits = unsafe { sys::ggml_get_type_traits(ty.0) };
    // SAFETY: `traits` points to a static table entry.
    let to_float = unsafe { (*traits).to_float }?;
    let mut out = vec![0f32; n];
    // SAFETY: `data` holds `needed` bytes for `n` elements, `out` holds `n` floats.
    unsafe { to_float(data.as_ptr().cast(), out.as_mut_ptr(), n as i64) };
    Some(out)
}

/// Converts rows of f32 values (`n_per_row` each) to `ty` (f32, f16 or a
/// quantized type). Returns `None` for an unknown type or rows that do not
/// fit the type's block size.
pub fn quantize(ty: Type, data: &[f32], n_per_row: usize) -> Option<Vec<u8>> {
    if n_per_row == 0 || !data.len().is_multiple_of(n_per_row) {
        return None;
    }
    let n_rows = data.len() / n_per_row;
    let row_size = ty.row_size(n_per_row as i64)?;
    let mut out = vec![0u8; row_size * n_rows];
    match ty {
        Type::F32 => out
            .chunks_exact_mut(4)
            .zip(data)
            .for_each(|(o, v)| o.copy_from_slice(&v.to_le_bytes())),
        Type::F16 => {
            // SAFETY: `out` holds 2 bytes per element; ggml_fp16_t is u16.
            unsafe {
                sys::ggml_fp32_to_fp16_row(
                    data.as_ptr(),
                    out.as_mut_ptr().cast(),
                    data.len() as i64,
                )
            }
        }
        _ => {
            // SAFETY: `data` holds n_rows × n_per_row floats, `out` the
            // quantized size of as many rows; no importance matrix.
            unsafe {
                sys::ggml_quantize_chunk(
                    ty.0,
                    data.as_ptr(),
                    out.as_mut_ptr().cast(),
                    0,
                    n_rows as i64,
                    n_per_row as i64,
                    std::ptr::null(),
                )
            };
        }
    }
    Some(out)
}
