//! What `llama-cpp-2` does not expose and the oracle needs: a llama.cpp
//! model loaded without ggml's repacked weight layouts.

use std::ffi::CString;
use std::path::Path;
use std::ptr::NonNull;

use llama_cpp_2::model::LlamaModel;

use super::sys;

/// `path` loaded by llama.cpp on the CPU as `llama-server --no-repack`
/// loads it (`use_extra_bufts = false`: every weight in the plain CPU
/// buffer); `None` when llama.cpp cannot load it. The caller has
/// initialised llama.cpp's backend.
pub fn load_model_without_repack(path: &Path) -> Option<LlamaModel> {
    let path = CString::new(path.to_str()?).ok()?;
    // SAFETY: plain-data defaults, then a load that returns null on failure.
    let raw = unsafe {
        let mut params = sys::llama_model_default_params();
        params.n_gpu_layers = 0;
        params.use_extra_bufts = false;
        sys::llama_model_load_from_file(path.as_ptr(), params)
    };
    let raw = NonNull::new(raw)?;
    // SAFETY: `LlamaModel` is `#[repr(transparent)]` over a
    // `#[repr(transparent)]` wrapper of `NonNull<llama_model>`, so the
    // layouts are one; it takes ownership and frees the model on drop with
    // `llama_model_free`, as for a model it loaded itself.
    Some(unsafe { std::mem::transmute::<NonNull<sys::llama_model>, LlamaModel>(raw) })
}
