//! The kernels' inputs on x86-64, quantized as ggml quantizes them for a
//! weight's type and packed in column pairs.

use std::arch::x86_64::*;

use super::Input;

/// Packs columns `[c, c + 1]` (a missing one as zeros) into `out` as ggml's
/// `quantize_row_q8_0` and `quantize_row_q8_1` quantize them, block by
/// block of 32: both columns' 32 values, then each column's scale in 8
/// lanes, then each column's Q8_1 sum (`s`, the f16 of `d · Σ q`).
pub(super) fn pack_q8(columns: [Option<&[f32]>; 2], out: &mut [u8]) {
    let (qk, bytes) = Input::Q8.block();
    let zeros = [0f32; 32];
    for (kb, at) in out.chunks_exact_mut(bytes).enumerate() {
        for (half, column) in columns.iter().enumerate() {
            let block = match column {
                Some(values) => values[kb * qk..][..qk].try_into().expect("32 values"),
                None => &zeros,
            };
            let q = (&mut at[half * qk..][..qk]).try_into().expect("32 bytes");
            // SAFETY: callers run only where `available()` holds.
            let (d, s) = unsafe { quantize_q8(block, q) };
            for lane in at[2 * qk + half * 32..][..32].chunks_exact_mut(4) {
                lane.copy_from_slice(&d.to_ne_bytes());
            }
            at[4 * qk + half * 4..][..4].copy_from_slice(&s.to_ne_bytes());
        }
    }
}

/// One block as `quantize_row_q8_1` quantizes it (the largest |value| maps
/// to ±127, rounding half to even, saturating; Q8_0 the same without the
/// sum); returns the scale and the sum as the f16s ggml stores, widened.
#[target_feature(enable = "avx512f,f16c")]
unsafe fn quantize_q8(block: &[f32; 32], q: &mut [u8; 32]) -> (f32, f32) {
    // SAFETY: both arrays hold 32 elements: two 16-lane loads, two 16-byte
    // stores.
    unsafe {
        let v0 = _mm512_loadu_ps(block.as_ptr());
        let v1 = _mm512_loadu_ps(block.as_ptr().add(16));
        let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        let d = amax / 127.0;
        let id = _mm512_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
        // Conversion rounds half to even (the default rounding mode).
        let i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, id));
        let i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, id));
        _mm_storeu_si128(q.as_mut_ptr() as *mut __m128i, _mm512_cvtsepi32_epi8(i0));
        _mm_storeu_si128(
            q.as_mut_ptr().add(16) as *mut __m128i,
            _mm512_cvtsepi32_epi8(i1),
        );
        let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
        (f16_round(d), f16_round(d * sum as f32))
    }
}

/// `v` rounded to the nearest f16 (ties to even), as f32.
#[target_feature(enable = "f16c")]
fn f16_round(v: f32) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(
        _mm_set_ss(v),
    )))
}

/// Packs columns `[c, c + 1]` (a missing one as zeros) into `out` as
/// ggml's `quantize_row_q8_K_ref` quantizes them, block by block of 256:
/// the 8 runs of 32 values of both columns in turn, each column's scale in
/// 8 lanes, each column's 16 sums of 16 (`bsums`), each column's 8 sums of
/// 32, each column's scale in 4 lanes.
pub(super) fn pack_q8k(columns: [Option<&[f32]>; 2], out: &mut [u8]) {
    let (qk, bytes) = Input::Q8K.block();
    let zeros = [0f32; 256];
    for (kb, at) in out.chunks_exact_mut(bytes).enumerate() {
        for (half, column) in columns.iter().enumerate() {
            let block = match column {
                Some(values) => &values[kb * qk..][..qk],
                None => &zeros[..],
            };
            let (d, q) = quantize_q8k(block);
            for (g, run) in q.chunks_exact(32).enumerate() {
                for (to, &v) in at[g * 64 + half * 32..][..32].iter_mut().zip(run) {
                    *to = v as u8;
                }
            }
            let mut bsums = [0i16; 16];
            for (sum, run) in bsums.iter_mut().zip(q.chunks_exact(16)) {
                *sum = run.iter().map(|&v| v as i16).sum();
            }
            let (scales, rest) = at[2 * qk..].split_at_mut(64);
            let (sums16, rest) = rest.split_at_mut(64);
            let (sums32, scales4) = rest.split_at_mut(32);
            for lane in scales[half * 32..][..32].chunks_exact_mut(4) {
                lane.copy_from_slice(&d.to_ne_bytes());
            }
            for (to, s) in sums16[half * 32..][..32].chunks_exact_mut(2).zip(&bsums) {
                to.copy_from_slice(&s.to_ne_bytes());
            }
            for (to, s) in sums32[half * 16..][..16]
                .chunks_exact_mut(2)
                .zip(bsums.chunks_exact(2))
            {
                to.copy_from_slice(&s[0].wrapping_add(s[1]).to_ne_bytes());
            }
            for lane in scales4[half * 16..][..16].chunks_exact_mut(4) {
                lane.copy_from_slice(&d.to_ne_bytes());
            }
        }
    }
}

/// One block of 256 as `quantize_row_q8_K_ref` quantizes it: the value of
/// largest magnitude (the first of equals) maps to -127, rounding half to
/// even; an all-zero block has scale 0.
fn quantize_q8k(block: &[f32]) -> (f32, [i8; 256]) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in block {
        if v.abs() > amax {
            (amax, max) = (v.abs(), v);
        }
    }
    let mut q = [0i8; 256];
    if amax == 0.0 {
        return (0.0, q);
    }
    let iscale = -127.0 / max;
    for (q, &v) in q.iter_mut().zip(block) {
        *q = ((iscale * v).round_ties_even() as i32).min(127) as i8;
    }
    (1.0 / iscale, q)
}
