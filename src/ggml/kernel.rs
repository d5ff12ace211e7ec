//! Batched CPU kernels for `W x` with quantized weights, as ggml custom
//! ops: Q8_0, Q4_0, Q5_0 and Q4_1 (blocks of 32), Q4_K and Q6_K (blocks of
//! 256), read in the type the file stores.
//!
//! ggml's own kernels compute every (row, column) dot product on its own:
//! one 256-bit accumulator whose fused multiply-adds wait on each other, a
//! horizontal sum, and the weight row loaded and unpacked again for every
//! column. Their cost per column hardly falls with the batch. These
//! kernels compute a tile of 4 rows × 8 columns at once with AVX-512, two
//! columns per 512-bit register, so each weight block is loaded and
//! unpacked once per 8 columns and 16 accumulators run side by side.
//!
//! They are bit-identical to ggml's: the activations are quantized exactly
//! as ggml quantizes them for the weight's type (`quantize_row_q8_0`/`_q8_1`
//! for blocks of 32, `quantize_row_q8_K_ref` for K-quants), and every
//! output is the same sequence of float operations as ggml's AVX2
//! `ggml_vec_dot_*` for that type: the integer part of each block (exact,
//! in any order) lands in the same 8 lanes, then the same conversions,
//! multiplications, fused multiply-adds in block order and horizontal sums.
//! So they change speed only: the results equal llama.cpp's on the same
//! file, and a column's result does not depend on the other columns (batch
//! invariance). `ggml::kernel::tests` checks every type bit for bit.

use std::ptr::NonNull;

use super::context::{Context, Tensor};
use super::{sys, Backend, Type};

#[cfg(target_arch = "x86_64")]
mod quantize;
#[cfg(target_arch = "x86_64")]
mod x86;

/// Rows and column pairs of one tile.
const TILE_ROWS: usize = 4;
const TILE_PAIRS: usize = 4;

/// A weight type the kernels read (named as ggml names it).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Format {
    Q8_0,
    Q4_0,
    Q5_0,
    Q4_1,
    Q4_K,
    Q6_K,
}

impl Format {
    fn of(ty: Type) -> Option<Format> {
        Some(match ty {
            Type::Q8_0 => Format::Q8_0,
            Type::Q4_0 => Format::Q4_0,
            Type::Q5_0 => Format::Q5_0,
            Type::Q4_1 => Format::Q4_1,
            Type::Q4_K => Format::Q4_K,
            Type::Q6_K => Format::Q6_K,
            _ => return None,
        })
    }

    /// Weights and bytes of one block.
    const fn block(self) -> (usize, usize) {
        match self {
            Format::Q8_0 => (32, 34),
            Format::Q4_0 => (32, 18),
            Format::Q5_0 => (32, 22),
            Format::Q4_1 => (32, 20),
            Format::Q4_K => (256, 144),
            Format::Q6_K => (256, 210),
        }
    }

    /// How the input is quantized for it.
    const fn input(self) -> Input {
        match self {
            Format::Q4_K | Format::Q6_K => Input::Q8K,
            _ => Input::Q8,
        }
    }
}

/// An input quantized for a [`Format`], in column pairs: `Q8` as ggml's
/// Q8_0 (and Q8_1, whose sums it carries too), `Q8K` as its Q8_K.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(usize)]
enum Input {
    Q8 = 0,
    Q8K = 1,
}

impl Input {
    /// Values per block, and bytes of one block of a column pair (see
    /// `x86::pack_q8` and `x86::pack_q8k` for the layouts).
    const fn block(self) -> (usize, usize) {
        match self {
            Input::Q8 => (32, 2 * 32 + 16 * 4 + 2 * 4),
            Input::Q8K => (256, 2 * 256 + 16 * 4 + 2 * 32 + 2 * 16 + 8 * 4),
        }
    }
}

/// Whether this CPU runs the kernels (AVX-512 F/BW/VL/VNNI and F16C).
/// Asked at run time, never by `cfg(target_feature)`: the detection reads
/// XCR0 too, so a CPU that reports AVX-512 to an OS that does not save its
/// registers does not run it. Whether it is wanted is the caller's option
/// (`model::LoadOptions::batch_kernels`).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx512vnni")
            && std::is_x86_feature_detected!("f16c")
            && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether matrices on `backend` go through the kernels: a CPU backend on a
/// CPU that runs them.
pub fn available_on(backend: &Backend) -> bool {
    backend.is_cpu() && available()
}

/// What the kernel does with each result `v` of row `r`, column `c`
/// before storing it (passed to the op as its user data).
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
enum Then {
    /// `v`
    Store = 0,
    /// `v * table[r, slots[c]]`: sources 2 (table) and 3 (slots).
    ScaleBySlot = 1,
    /// `y[r, c] + v`: source 2 (y).
    AddTo = 2,
}

impl Context {
    /// The kernel's node: `then` applied to every result, with its extra
    /// sources (checked by the caller).
    fn kernel_node<'a>(
        &'a self,
        w: Tensor<'a>,
        x: Tensor<'a>,
        then: Then,
        extra: &[Tensor<'a>],
    ) -> Tensor<'a> {
        debug_assert!(kernel_reads(w, x.ne()[1]) && fits(w, x));
        let input = Format::of(w.ty()).expect("fits").input();
        let mut args = vec![w.as_ptr(), self.packed(x, input).as_ptr()];
        args.extend(extra.iter().map(|t| t.as_ptr()));
        // SAFETY: the operands are live tensors; `fits` and the checks of
        // `then`'s sources hold (by the callers), so `product` reads within
        // them and writes the whole `[n, b]` result. All threads take part.
        let raw = unsafe {
            sys::ggml_custom_4d(
                self.as_ptr(),
                sys::GGML_TYPE_F32,
                w.ne()[1],
                x.ne()[1],
                1,
                1,
                args.as_mut_ptr(),
                args.len() as i32,
                Some(op),
                -1,
                then as usize as *mut std::os::raw::c_void,
            )
        };
        self.wrap(raw)
    }

    /// `x` quantized as `input` and packed for the kernels: one node per
    /// input and quantization per graph, shared by every product of that
    /// input (q, k, v and the SVFit branch read the same one), packed by
    /// all threads.
    fn packed<'a>(&'a self, x: Tensor<'a>, input: Input) -> Tensor<'a> {
        let key = (x.as_ptr() as usize, input as usize);
        if let Some(&node) = self.packs.borrow().get(&key) {
            return Tensor::from_raw(node);
        }
        let (k, b) = (x.ne()[0] as usize, x.ne()[1] as usize);
        let (qk, bytes) = input.block();
        let mut args = [x.as_ptr()];
        // SAFETY: `x` is a live contiguous f32 `[k, b]` with k a multiple of
        // the input's block (`fits`); the node holds exactly the pairs
        // `pack` writes.
        let raw = unsafe {
            sys::ggml_custom_4d(
                self.as_ptr(),
                sys::GGML_TYPE_I8,
                (k / qk * bytes) as i64,
                b.div_ceil(2) as i64,
                1,
                1,
                args.as_mut_ptr(),
                1,
                Some(op),
                -1,
                (PACK + input as usize) as *mut std::os::raw::c_void,
            )
        };
        let node = self.wrap(raw);
        self.packs
            .borrow_mut()
            .insert(key, NonNull::new(node.as_ptr()).expect("non-null"));
        node
    }
}

/// A matrix operand of `W x`, as ggml stores it, and whether the batched
/// kernels may compute its products (on a CPU backend that runs them).
#[derive(Clone, Copy)]
pub struct Matrix<'a> {
    pub tensor: Tensor<'a>,
    pub batched: bool,
}

impl<'a> Matrix<'a> {
    /// A matrix whose products ggml computes.
    pub fn plain(tensor: Tensor<'a>) -> Self {
        Matrix {
            tensor,
            batched: false,
        }
    }

    /// Whether a kernel computes its products with `columns` columns.
    fn kernel_takes(self, columns: i64) -> bool {
        self.batched && kernel_reads(self.tensor, columns)
    }
}

/// Whether a kernel reads `w`'s type and shape, for a product of `columns`
/// columns: 2 or more. A single column goes to ggml's own kernel, faster
/// alone than ours, which computes columns in pairs (1B-shaped Q4_K, one
/// sequence: 37.1 tok/s against 26.3).
fn kernel_reads(w: Tensor<'_>, columns: i64) -> bool {
    let Some(format) = Format::of(w.ty()) else {
        return false;
    };
    let (qk, bytes) = format.block();
    let wn = w.ne();
    columns > 1
        && wn[0] % qk as i64 == 0
        && wn[1] % TILE_ROWS as i64 == 0
        && wn[2] == 1
        && wn[3] == 1
        && w.nb()[0] == bytes
        && w.nb()[1] == bytes * wn[0] as usize / qk
}

impl Context {
    /// `w x`: through a batched kernel where one takes `w` (the input made
    /// contiguous if it is not), else ggml's product. The numbers are the
    /// same either way.
    pub fn product<'a>(&'a self, w: Matrix<'a>, x: Tensor<'a>) -> Tensor<'a> {
        if !w.kernel_takes(x.ne()[1]) {
            return self.mul_mat(w.tensor, x);
        }
        let x = if fits(w.tensor, x) { x } else { self.cont(x) };
        self.kernel_node(w.tensor, x, Then::Store, &[])
    }

    /// `(w x) ⊙ table[:, slots]`: each column of the product scaled by the
    /// column of `table` (f32 `[n, n_slots]`) its slot (i32 `[b]`) names,
    /// as `mul(product, get_rows(table, slots))` computes it, in one node
    /// when a kernel takes `w`.
    pub fn product_scaled<'a>(
        &'a self,
        w: Matrix<'a>,
        x: Tensor<'a>,
        table: Tensor<'a>,
        slots: Tensor<'a>,
    ) -> Tensor<'a> {
        let fused = w.kernel_takes(x.ne()[1])
            && fits(w.tensor, x)
            && is_f32_matrix(table, w.tensor.ne()[1], table.ne()[1])
            && slots.ty() == Type::I32
            && slots.ne() == [x.ne()[1], 1, 1, 1]
            && slots.nb()[0] == 4;
        if fused {
            return self.kernel_node(w.tensor, x, Then::ScaleBySlot, &[table, slots]);
        }
        self.mul(self.product(w, x), self.get_rows(table, slots))
    }

    /// `y + w x`, as `add(y, product)` computes it, in one node when a
    /// kernel takes `w`.
    pub fn product_added<'a>(&'a self, w: Matrix<'a>, x: Tensor<'a>, y: Tensor<'a>) -> Tensor<'a> {
        let fused = w.kernel_takes(x.ne()[1])
            && fits(w.tensor, x)
            && is_f32_matrix(y, w.tensor.ne()[1], x.ne()[1]);
        if fused {
            return self.kernel_node(w.tensor, x, Then::AddTo, &[y]);
        }
        self.add(y, self.product(w, x))
    }
}

/// Whether `t` is a contiguous f32 `[rows, cols]`.
fn is_f32_matrix(t: Tensor<'_>, rows: i64, cols: i64) -> bool {
    t.ty() == Type::F32
        && t.ne() == [rows, cols, 1, 1]
        && t.nb()[0] == 4
        && t.nb()[1] == 4 * rows as usize
}

/// Whether the input `x` of a product with `w` (which a kernel takes) is
/// a contiguous 2-D f32 of `w`'s row length.
fn fits(w: Tensor<'_>, x: Tensor<'_>) -> bool {
    is_f32_matrix(x, w.ne()[0], x.ne()[1])
}

/// A pack node's user data: `PACK` + its `Input`; a product's is its
/// `Then`.
const PACK: usize = 8;

/// The op of every kernel node (see [`PACK`]); thread `ith` of `nth` does
/// its share.
unsafe extern "C" fn op(
    dst: *mut sys::ggml_tensor,
    ith: std::os::raw::c_int,
    nth: std::os::raw::c_int,
    userdata: *mut std::os::raw::c_void,
) {
    #[cfg(target_arch = "x86_64")]
    {
        let (ith, nth) = (ith as usize, nth.max(1) as usize);
        // SAFETY: ggml calls us with a node made by `packed` (user data
        // PACK and up) or by `kernel_node`, and 0 <= ith < nth.
        unsafe {
            match userdata as usize {
                code if code >= PACK => pack(&*dst, ith, nth, code - PACK),
                code => product(&*dst, ith, nth, code),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dst, ith, nth, userdata);
        unreachable!("the batched kernels are only built for x86-64");
    }
}

/// Quantizes `x` (`[k, b]` f32) as ggml does for the `Input` coded
/// `input`, into the kernels' input layout, columns in pairs (an odd last
/// column paired with zeros): thread `ith` of `nth` packs its share.
///
/// # Safety
/// `dst` was made by `packed`: source 0 is a contiguous f32 `[k, b]` with
/// k a multiple of the input's block, and `dst` holds `ceil(b / 2)` pairs
/// of its packed blocks.
#[cfg(target_arch = "x86_64")]
unsafe fn pack(dst: &sys::ggml_tensor, ith: usize, nth: usize, input: usize) {
    // SAFETY: the caller's.
    unsafe {
        let x = &*dst.src[0];
        let (k, b) = (x.ne[0] as usize, x.ne[1] as usize);
        let x = std::slice::from_raw_parts(x.data as *const f32, k * b);
        let input = if input == Input::Q8K as usize {
            Input::Q8K
        } else {
            Input::Q8
        };
        let (qk, bytes) = input.block();
        let pairs = b.div_ceil(2);
        let out = std::slice::from_raw_parts_mut(dst.data as *mut u8, pairs * k / qk * bytes);
        let column = |c: usize| x.get(c * k..(c + 1) * k);
        for pair in pairs * ith / nth..pairs * (ith + 1) / nth {
            let out = &mut out[pair * k / qk * bytes..][..k / qk * bytes];
            let columns = [column(2 * pair), column(2 * pair + 1)];
            match input {
                Input::Q8 => quantize::pack_q8(columns, out),
                Input::Q8K => quantize::pack_q8k(columns, out),
            }
        }
    }
}

/// Computes the rows of the product `dst` that fall to thread `ith` of
/// `nth`, then applies the `Then` coded `then`.
///
/// # Safety
/// `dst` was made by `kernel_node`: source 0 a `[k, n]` of a `Format`,
/// source 1 its input packed by `pack` (`dst` has one column per input
/// column), the sources of its `Then` checked.
#[cfg(target_arch = "x86_64")]
unsafe fn product(dst: &sys::ggml_tensor, ith: usize, nth: usize, then: usize) {
    // SAFETY: the caller's.
    unsafe {
        let (w, packed) = (&*dst.src[0], &*dst.src[1]);
        let then = match then {
            code if code == Then::ScaleBySlot as usize => {
                let (table, slots) = (&*dst.src[2], &*dst.src[3]);
                x86::Then::ScaleBySlot {
                    table: table.data as *const f32,
                    slots: slots.data as *const i32,
                    n_slots: table.ne[1] as usize,
                }
            }
            code if code == Then::AddTo as usize => x86::Then::AddTo {
                y: (*dst.src[2]).data as *const f32,
            },
            _ => x86::Then::Store,
        };
        let format = Format::of(Type(w.type_)).expect("made by kernel_node");
        let (k, n, b) = (w.ne[0] as usize, w.ne[1] as usize, dst.ne[1] as usize);
        // Rows in tiles, split evenly between the threads.
        let tiles = n.div_ceil(TILE_ROWS);
        let first = tiles * ith / nth * TILE_ROWS;
        let last = (tiles * (ith + 1) / nth * TILE_ROWS).min(n);
        if first >= last {
            return;
        }
        let product = x86::Product {
            w: w.data as *const u8,
            k,
            n,
            b,
            packed: packed.data as *const u8,
            out: dst.data as *mut f32,
            then,
        };
        x86::rows(format, product, first, last);
    }
}

#[cfg(test)]
mod tests;
