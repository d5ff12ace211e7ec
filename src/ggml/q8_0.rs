//! A batched CPU kernel for `W x` with Q8_0 weights, as a ggml custom op.
//!
//! ggml's own kernel computes every (row, column) dot product on its own:
//! one 256-bit accumulator whose fused multiply-adds wait on each other, a
//! horizontal sum, and the weight row loaded again for every column. Its
//! cost per column hardly falls with the batch. This kernel computes a tile
//! of 4 rows × 8 columns at once with AVX-512 VNNI, two columns per 512-bit
//! register, so each weight block is loaded and unpacked once per 8 columns
//! and 16 accumulators run side by side.
//!
//! It is bit-identical to ggml's: the activations are quantized exactly as
//! `quantize_row_q8_0` does, and every output is the same sequence of float
//! operations as `ggml_vec_dot_q8_0_q8_0` (per block: the exact integer dot
//! product of each group of 4 bytes in its lane, converted to float, fused
//! multiply-add with the product of the two scales; then ggml's horizontal
//! sum). So it changes speed only: the results equal llama.cpp's on a Q8_0
//! file, and a column's result does not depend on the other columns (batch
//! invariance).

use std::ptr::NonNull;

use super::context::{Context, Tensor};
use super::{sys, Backend, Type};

/// Bytes of one Q8_0 block: an f16 scale and 32 signed bytes.
const BLOCK_BYTES: usize = 34;
const QK: usize = 32;
/// Rows and column pairs of one tile.
const TILE_ROWS: usize = 4;
const TILE_PAIRS: usize = 4;
/// How far ahead in a weight row to prefetch, in bytes.
const PREFETCH: usize = 512;

/// Whether this CPU runs the kernel (AVX-512 F/BW/VL/VNNI and F16C).
/// Asked at run time, never by `cfg(target_feature)`: the detection reads
/// XCR0 too, so a CPU that reports AVX-512 to an OS that does not save its
/// registers does not run it. Whether it is wanted is the caller's option
/// (`model::LoadOptions::q8_0_kernel`).
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

/// Whether matrices on `backend` go through the kernel: a CPU backend on a
/// CPU that runs it.
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
        debug_assert!(fits(w, x));
        let mut args = vec![w.as_ptr(), self.packed(x).as_ptr()];
        args.extend(extra.iter().map(|t| t.as_ptr()));
        // SAFETY: the operands are live tensors; `fits` and the checks of
        // `then`'s sources hold (by the callers), so `compute` reads within
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
                Some(compute),
                -1,
                then as usize as *mut std::os::raw::c_void,
            )
        };
        self.wrap(raw)
    }

    /// `x` quantized and packed for the kernel: one node per input per
    /// graph, shared by every product of that input (q, k, v and the SVFit
    /// branch read the same one), packed by all threads.
    fn packed<'a>(&'a self, x: Tensor<'a>) -> Tensor<'a> {
        if let Some(&node) = self.packs.borrow().get(&(x.as_ptr() as usize)) {
            return Tensor::from_raw(node);
        }
        let (k, b) = (x.ne()[0] as usize, x.ne()[1] as usize);
        let mut args = [x.as_ptr()];
        // SAFETY: `x` is a live contiguous f32 `[k, b]` with k a multiple of
        // 32 (`fits`); the node holds exactly the pairs `pack` writes.
        let raw = unsafe {
            sys::ggml_custom_4d(
                self.as_ptr(),
                sys::GGML_TYPE_I8,
                (k / QK * PACKED_BLOCK) as i64,
                b.div_ceil(2) as i64,
                1,
                1,
                args.as_mut_ptr(),
                1,
                Some(pack),
                -1,
                std::ptr::null_mut(),
            )
        };
        let node = self.wrap(raw);
        self.packs.borrow_mut().insert(
            x.as_ptr() as usize,
            NonNull::new(node.as_ptr()).expect("non-null"),
        );
        node
    }
}

/// A matrix operand of `W x`: in ggml's layout, or (Q8_0 only) in the
/// kernel's, after [`interleave`].
#[derive(Clone, Copy)]
pub struct Matrix<'a> {
    pub tensor: Tensor<'a>,
    pub interleaved: bool,
}

impl<'a> Matrix<'a> {
    /// A matrix in ggml's own layout.
    pub fn plain(tensor: Tensor<'a>) -> Self {
        Matrix {
            tensor,
            interleaved: false,
        }
    }
}

impl Context {
    /// `w x`: through the batched kernel when `w` is in its layout (the
    /// input made contiguous if it is not), else ggml's product. The numbers
    /// are the same either way.
    pub fn product<'a>(&'a self, w: Matrix<'a>, x: Tensor<'a>) -> Tensor<'a> {
        if !w.interleaved {
            return self.mul_mat(w.tensor, x);
        }
        let x = if fits(w.tensor, x) { x } else { self.cont(x) };
        self.kernel_node(w.tensor, x, Then::Store, &[])
    }

    /// `(w x) ⊙ table[:, slots]`: each column of the product scaled by the
    /// column of `table` (f32 `[n, n_slots]`) its slot (i32 `[b]`) names,
    /// as `mul(product, get_rows(table, slots))` computes it, in one node
    /// when `w` is in the kernel's layout.
    pub fn product_scaled<'a>(
        &'a self,
        w: Matrix<'a>,
        x: Tensor<'a>,
        table: Tensor<'a>,
        slots: Tensor<'a>,
    ) -> Tensor<'a> {
        let fused = w.interleaved
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

    /// `y + w x`, as `add(y, product)` computes it, in one node when `w` is
    /// in the kernel's layout.
    pub fn product_added<'a>(&'a self, w: Matrix<'a>, x: Tensor<'a>, y: Tensor<'a>) -> Tensor<'a> {
        let fused =
            w.interleaved && fits(w.tensor, x) && is_f32_matrix(y, w.tensor.ne()[1], x.ne()[1]);
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

/// Whether the kernel takes these operands: a 2-D Q8_0 matrix of whole
/// row tiles and a contiguous 2-D f32 input of the same row length.
fn fits(w: Tensor<'_>, x: Tensor<'_>) -> bool {
    let wn = w.ne();
    w.ty() == Type::Q8_0
        && wn[0] % QK as i64 == 0
        && wn[1] % TILE_ROWS as i64 == 0
        && wn[2] == 1
        && wn[3] == 1
        && w.nb()[0] == BLOCK_BYTES
        && w.nb()[1] == BLOCK_BYTES * wn[0] as usize / QK
        && is_f32_matrix(x, wn[0], x.ne()[1])
}

/// Reorders the blocks of a Q8_0 matrix of `n` rows of `k` in place into
/// the kernel's layout: rows in tiles of 4, and within a tile block 0 of
/// each row, then block 1 of each, and so on, so that the kernel reads the
/// weights in order. Only the kernel ([`Context::product`]) reads a matrix after
/// this. Returns `false`, leaving `bytes` as they were, when the matrix does
/// not fit the layout.
pub fn interleave(bytes: &mut [u8], k: usize, n: usize) -> bool {
    let nb = k / QK;
    let row_bytes = nb * BLOCK_BYTES;
    if !k.is_multiple_of(QK) || !n.is_multiple_of(TILE_ROWS) || bytes.len() != n * row_bytes {
        return false;
    }
    let mut tile = vec![0u8; TILE_ROWS * row_bytes];
    for rows in bytes.chunks_exact_mut(TILE_ROWS * row_bytes) {
        for (i, row) in rows.chunks_exact(row_bytes).enumerate() {
            for (kb, block) in row.chunks_exact(BLOCK_BYTES).enumerate() {
                let at = (kb * TILE_ROWS + i) * BLOCK_BYTES;
                tile[at..at + BLOCK_BYTES].copy_from_slice(block);
            }
        }
        rows.copy_from_slice(&tile);
    }
    true
}

/// Bytes of one block of a column pair in a packed input: the two
/// columns' 32 quantized values, then 16 scales (each column's in 8 lanes).
const PACKED_BLOCK: usize = 2 * QK + 16 * 4;

/// The pack op: quantizes `x` (`[k, b]` f32) as ggml's `quantize_row_q8_0`
/// does into the kernel's input layout, columns in pairs (an odd last
/// column paired with zeros); thread `ith` of `nth` packs its share of the
/// pairs.
unsafe extern "C" fn pack(
    dst: *mut sys::ggml_tensor,
    ith: std::os::raw::c_int,
    nth: std::os::raw::c_int,
    _userdata: *mut std::os::raw::c_void,
) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: ggml calls us with a node made by `packed`: source 0 is a
        // contiguous f32 `[k, b]` with k a multiple of 32, and `dst` holds
        // `ceil(b / 2)` pairs of `k / 32` packed blocks; 0 <= ith < nth.
        unsafe {
            let dst = &*dst;
            let x = &*dst.src[0];
            let (k, b) = (x.ne[0] as usize, x.ne[1] as usize);
            let x = std::slice::from_raw_parts(x.data as *const f32, k * b);
            let nb = k / QK;
            let pairs = b.div_ceil(2);
            let out =
                std::slice::from_raw_parts_mut(dst.data as *mut u8, pairs * nb * PACKED_BLOCK);
            let (ith, nth) = (ith as usize, nth.max(1) as usize);
            let zeros = [0f32; QK];
            for pair in pairs * ith / nth..pairs * (ith + 1) / nth {
                for half in 0..2 {
                    let c = 2 * pair + half;
                    for kb in 0..nb {
                        let block = match x.get(c * k + kb * QK..c * k + (kb + 1) * QK) {
                            Some(block) => block.try_into().expect("32 values"),
                            None => &zeros,
                        };
                        let at = &mut out[(pair * nb + kb) * PACKED_BLOCK..][..PACKED_BLOCK];
                        let (q, d) = at.split_at_mut(2 * QK);
                        let q = (&mut q[half * QK..][..QK]).try_into().expect("32 bytes");
                        let scale = kernel::quantize_block(block, q);
                        for lane in d[half * 32..][..32].chunks_exact_mut(4) {
                            lane.copy_from_slice(&scale.to_ne_bytes());
                        }
                    }
                }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dst, ith, nth);
        unreachable!("the Q8_0 kernel is only built for x86-64");
    }
}

/// The custom op: thread `ith` of `nth` computes its share of the rows.
unsafe extern "C" fn compute(
    dst: *mut sys::ggml_tensor,
    ith: std::os::raw::c_int,
    nth: std::os::raw::c_int,
    userdata: *mut std::os::raw::c_void,
) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: ggml calls us with a node made by `kernel_node`: source 0
        // an interleaved Q8_0 `[k, n]`, source 1 its input packed by `pack`
        // (`dst` has one column per input column), the sources of its `Then`
        // checked; 0 <= ith < nth.
        unsafe {
            let dst = &*dst;
            let (w, packed) = (&*dst.src[0], &*dst.src[1]);
            let then = match userdata as usize {
                code if code == Then::ScaleBySlot as usize => {
                    let (table, slots) = (&*dst.src[2], &*dst.src[3]);
                    kernel::Then::ScaleBySlot {
                        table: table.data as *const f32,
                        slots: slots.data as *const i32,
                        n_slots: table.ne[1] as usize,
                    }
                }
                code if code == Then::AddTo as usize => kernel::Then::AddTo {
                    y: (*dst.src[2]).data as *const f32,
                },
                _ => kernel::Then::Store,
            };
            let k = w.ne[0] as usize;
            let (n, b) = (w.ne[1] as usize, dst.ne[1] as usize);
            let w = w.data as *const u8;
            let out = dst.data as *mut f32;
            // Rows in tiles, split evenly between the threads.
            let tiles = n.div_ceil(TILE_ROWS);
            let (ith, nth) = (ith as usize, nth.max(1) as usize);
            let first = tiles * ith / nth * TILE_ROWS;
            let last = (tiles * (ith + 1) / nth * TILE_ROWS).min(n);
            if first >= last {
                return;
            }
            let product = kernel::Product {
                w,
                k,
                n,
                b,
                packed: packed.data as *const u8,
                out,
                then,
            };
            kernel::rows(product, first, last);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dst, ith, nth, userdata);
        unreachable!("the Q8_0 kernel is only built for x86-64");
    }
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use std::arch::x86_64::*;

    use super::{BLOCK_BYTES, PACKED_BLOCK, PREFETCH, QK, TILE_PAIRS, TILE_ROWS};

    /// One block as `quantize_row_q8_0` quantizes it (the largest |value|
    /// maps to ±127, rounding half to even, saturating); returns the scale
    /// as the f16 that ggml stores, widened back to f32.
    #[target_feature(enable = "avx512f,f16c")]
    pub(super) fn quantize_block(block: &[f32; QK], q: &mut [u8; QK]) -> f32 {
        // SAFETY: both arrays hold 32 elements: two 16-lane loads, two
        // 16-byte stores.
        unsafe {
            let v0 = _mm512_loadu_ps(block.as_ptr());
            let v1 = _mm512_loadu_ps(block.as_ptr().add(16));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            let d = amax / 127.0;
            let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(
                _mm_set_ss(d),
            )));
            let id = _mm512_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
            // Conversion rounds half to even (the default rounding mode).
            let q0 = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v0, id)));
            let q1 = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v1, id)));
            _mm_storeu_si128(q.as_mut_ptr() as *mut __m128i, q0);
            _mm_storeu_si128(q.as_mut_ptr().add(16) as *mut __m128i, q1);
            d
        }
    }

    /// What happens to each result before it is stored (see `super::Then`).
    #[derive(Clone, Copy)]
    pub(super) enum Then {
        Store,
        ScaleBySlot {
            table: *const f32,
            slots: *const i32,
            n_slots: usize,
        },
        AddTo {
            y: *const f32,
        },
    }

    impl Then {
        /// The value stored for result `v` at row `r`, column `c` of an
        /// output with `n` rows.
        ///
        /// # Safety
        /// The pointers hold the sources checked by `kernel_node`.
        #[inline(always)]
        unsafe fn apply(self, v: f32, r: usize, c: usize, n: usize) -> f32 {
            // SAFETY: `slots` has an entry per column, `table` n_slots
            // columns of n rows, `y` n rows per column; a slot out of range
            // (never: batches are checked) is clamped, not read past.
            unsafe {
                match self {
                    Then::Store => v,
                    Then::ScaleBySlot {
                        table,
                        slots,
                        n_slots,
                    } => {
                        let slot = (*slots.add(c)).clamp(0, n_slots as i32 - 1) as usize;
                        v * *table.add(slot * n + r)
                    }
                    Then::AddTo { y } => *y.add(c * n + r) + v,
                }
            }
        }
    }

    /// One product `W x` as the kernel reads and writes it: `w` points at
    /// `n` rows of `k / 32` Q8_0 blocks in the layout of `interleave`,
    /// `packed` at `b` packed columns of `k`, `out` at room for the `[n, b]`
    /// result (column-major), and `then` says what happens to each result
    /// before it is stored. Passed by value: the tiles read it from registers.
    #[derive(Clone, Copy)]
    pub(super) struct Product {
        pub w: *const u8,
        pub k: usize,
        pub n: usize,
        pub b: usize,
        pub packed: *const u8,
        pub out: *mut f32,
        pub then: Then,
    }

    /// Rows `first..last` of `product`.
    ///
    /// # Safety
    /// The CPU has the features of `available()`; the pointers of `product`
    /// hold what its doc says; `first` and `last` are multiples of
    /// `TILE_ROWS` within its `n` rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")]
    pub(super) unsafe fn rows(product: Product, first: usize, last: usize) {
        let pairs = product.b.div_ceil(2);
        let mut r = first;
        while r < last {
            let mut p = 0;
            while p < pairs {
                let tile = (pairs - p).min(TILE_PAIRS);
                // SAFETY: rows r..r + TILE_ROWS and pairs p..p + tile are in range.
                unsafe {
                    match tile {
                        TILE_PAIRS => tile_of::<TILE_PAIRS>(product, r, p),
                        3 => tile_of::<3>(product, r, p),
                        2 => tile_of::<2>(product, r, p),
                        _ => tile_of::<1>(product, r, p),
                    }
                }
                p += tile;
            }
            r += TILE_ROWS;
        }
    }

    /// One tile of `product`: rows `r0..r0 + TILE_ROWS` times column pairs
    /// `p0..p0 + P`.
    // Indexing reads best for a register tile.
    #[allow(clippy::needless_range_loop)]
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")]
    unsafe fn tile_of<const P: usize>(product: Product, r0: usize, p0: usize) {
        const R: usize = TILE_ROWS;
        let Product {
            w: matrix,
            k,
            n,
            b,
            packed,
            out,
            then,
        } = product;
        let nb = k / QK;
        // SAFETY (whole body): the caller's ranges; loads are unaligned.
        unsafe {
            // The tile's rows' interleaved blocks.
            let w = matrix.add(r0 * nb * BLOCK_BYTES);
            let zero = _mm512_setzero_si512();
            let mut acc = [[_mm512_setzero_ps(); P]; R];
            for kb in 0..nb {
                let mut abs_w = [zero; R];
                let mut negative = [0u64; R];
                let mut scale_w = [_mm512_setzero_ps(); R];
                for i in 0..R {
                    let block = w.add((kb * R + i) * BLOCK_BYTES);
                    _mm_prefetch::<_MM_HINT_T0>(block.add(PREFETCH) as *const i8);
                    let bits = (block as *const u16).read_unaligned();
                    let wide = _mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32));
                    scale_w[i] = _mm512_set1_ps(_mm_cvtss_f32(wide));
                    // The block's 32 bytes in both halves (one per column).
                    let qs = _mm256_loadu_si256(block.add(2) as *const __m256i);
                    let both = _mm512_broadcast_i64x4(qs);
                    abs_w[i] = _mm512_abs_epi8(both);
                    negative[i] = _mm512_movepi8_mask(both);
                }
                for j in 0..P {
                    let block = packed.add(((p0 + j) * nb + kb) * PACKED_BLOCK);
                    let x = _mm512_loadu_si512(block as *const __m512i);
                    let scale_x = _mm512_loadu_ps(block.add(2 * QK) as *const f32);
                    for i in 0..R {
                        // x with the sign of w, times |w|: the products of
                        // ggml's mul_sum_i8_pairs_float, summed in 4s.
                        let signed = _mm512_mask_sub_epi8(x, negative[i], zero, x);
                        let dot = _mm512_dpbusd_epi32(zero, abs_w[i], signed);
                        let scale = _mm512_mul_ps(scale_w[i], scale_x);
                        acc[i][j] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot), acc[i][j]);
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                for (j, &acc) in acc.iter().enumerate() {
                    let c = 2 * (p0 + j);
                    let row = r0 + i;
                    let v = hsum(_mm512_castps512_ps256(acc));
                    *out.add(c * n + row) = then.apply(v, row, c, n);
                    if c + 1 < b {
                        let v = hsum(high_half(acc));
                        *out.add((c + 1) * n + row) = then.apply(v, row, c + 1, n);
                    }
                }
            }
        }
    }

    /// ggml's `hsum_float_8`, in its order.
    #[inline]
    #[target_feature(enable = "avx")]
    fn hsum(x: __m256) -> f32 {
        let mut res = _mm256_extractf128_ps::<1>(x);
        res = _mm_add_ps(res, _mm256_castps256_ps128(x));
        res = _mm_add_ps(res, _mm_movehl_ps(res, res));
        res = _mm_add_ss(res, _mm_movehdup_ps(res));
        _mm_cvtss_f32(res)
    }

    /// Lanes 8..16 of `x`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn high_half(x: __m512) -> __m256 {
        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(x)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ggml::{quantize, Backend, Scheduler, TensorSet};
    use crate::rng::Rng;

    /// The kernel, alone and with each `Then`, against ggml's own ops, bit
    /// for bit, for batch widths 1 to 9 (odd ones leave half a pair) on 2
    /// threads.
    #[test]
    fn kernel_equals_ggml_bit_for_bit() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 VNNI");
            return;
        }
        let (k, n, n_slots) = (96usize, 12usize, 3usize);
        let mut rng = Rng::new(3);
        let mut values = |len: usize, scale: f32| -> Vec<f32> {
            (0..len).map(|_| scale * rng.normal()).collect()
        };
        let plain = quantize(Type::Q8_0, &values(k * n, 1.0), k).unwrap();
        let mut interleaved = plain.clone();
        assert!(interleave(&mut interleaved, k, n));
        assert_ne!(plain, interleaved);
        for b in 1..=9usize {
            let ctx = Context::new(6, 0).unwrap();
            ctx.new_tensor(Type::Q8_0, &[k as i64, n as i64])
                .set_name("w");
            ctx.new_tensor(Type::Q8_0, &[k as i64, n as i64])
                .set_name("wi");
            ctx.new_tensor(Type::F32, &[k as i64, b as i64])
                .set_name("x");
            ctx.new_tensor(Type::F32, &[n as i64, n_slots as i64])
                .set_name("table");
            ctx.new_tensor(Type::I32, &[b as i64]).set_name("slots");
            ctx.new_tensor(Type::F32, &[n as i64, b as i64])
                .set_name("y");
            let backend = Backend::cpu(2).unwrap();
            let set = TensorSet::allocate(ctx, &backend).unwrap();
            let t = |name: &str| set.get(set.find(name).unwrap());
            t("w").write(&plain).unwrap();
            t("wi").write(&interleaved).unwrap();
            // Magnitudes from 1e-3 to 1e3, and one all-zero block.
            let mut x = values(k * b, 1.0);
            for (i, v) in x.iter_mut().enumerate() {
                *v *= 10f32.powi((i / QK % 7) as i32 - 3);
            }
            x[..QK].fill(0.0);
            t("x").write(&x).unwrap();
            t("table").write(&values(n * n_slots, 1.0)).unwrap();
            let slots: Vec<i32> = (0..b as i32).map(|c| c % n_slots as i32).collect();
            t("slots").write(&slots).unwrap();
            t("y").write(&values(n * b, 1.0)).unwrap();

            let g = Context::new(64, 64).unwrap();
            let mut graph = g.new_graph(64);
            let (w, x) = (t("w"), t("x"));
            let wi = Matrix {
                tensor: t("wi"),
                interleaved: true,
            };
            let (table, slots, y) = (t("table"), t("slots"), t("y"));
            let pairs = [
                (g.mul_mat(w, x), g.product(wi, x)),
                (
                    g.mul(g.mul_mat(w, x), g.get_rows(table, slots)),
                    g.product_scaled(wi, x, table, slots),
                ),
                (g.add(y, g.mul_mat(w, x)), g.product_added(wi, x, y)),
            ];
            for (a, b) in pairs {
                graph.expand(a.set_output());
                graph.expand(b.set_output());
            }
            let mut sched = Scheduler::new(vec![backend], 64).unwrap();
            sched.alloc(&mut graph).unwrap().compute().unwrap();
            for (i, (expected, ours)) in pairs.iter().enumerate() {
                let (mut e, mut o) = (vec![0f32; n * b], vec![0f32; n * b]);
                expected.read(&mut e).unwrap();
                ours.read(&mut o).unwrap();
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&o), bits(&e), "variant {i}, {b} columns");
            }
        }
    }
}
