//! 8-bit weights, one scale per output channel: `w[o][i] ~ scale[o] q[o][i]` with `q` an integer
//! in [-127, 127] and `scale[o] = max_i |w[o][i]| / 127` (symmetric, absmax). Per channel rather
//! than ggml's q8_0 blocks of 32 along the input: a per-channel scale factors out of the whole sum
//! `sum_i x[i] w[o][i] = scale[o] sum_i x[i] q[o][i]`, so the product runs over the bare integers
//! and the scale is one multiply per output, where a block scale would interrupt the reduction
//! every 32 terms; for SD's weights (no outlier input channels in convolution kernels, and
//! attention projections normed beforehand) the rounding error of either is about 0.4% of a
//! weight's channel maximum.
//!
//! The integers are exact in bf16 (8 significant bits), so the CPU product widens them to bf16
//! and runs the bf16 pair-dot kernels ([`super::gemm_bf16`]); the result equals an f32 product
//! with the dequantized weights up to the activations' rounding to bf16.
//!
//! In memory the integers are held as "offset bytes", `q + 128` in a u8 (candle has no i8
//! dtype; the offset keeps `u8 as f32 - 128` a plain affine map on any device). That is the two's
//! complement bit pattern with its top bit flipped, so files store plain i8.

use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

/// The largest integer magnitude: -128 is left out so that the range is symmetric.
const LEVELS: f32 = 127.0;

/// The name of a q8 layer's scales beside its `weight` (`<layer>.weight_scale`, F32, one per
/// output channel).
pub const SCALE_NAME: &str = "weight_scale";

/// Offset of the stored bytes: `byte = q + OFFSET`.
pub const OFFSET: f32 = 128.0;

/// Per-row absmax scales of a row-major (rows x len) matrix, `max |row| / 127` (1 for an
/// all-zero row, whose integers are then 0).
pub fn row_scales(values: &[f32], rows: usize, len: usize) -> Vec<f32> {
    values
        .par_chunks(len.max(1))
        .take(rows)
        .map(|row| {
            let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            if max > 0.0 && max.is_finite() {
                max / LEVELS
            } else {
                1.0
            }
        })
        .collect()
}

/// The offset bytes of `values` (rows x len) at the given per-row scales: round to nearest,
/// clamped to [-127, 127].
pub fn quantize_rows(values: &[f32], len: usize, scales: &[f32]) -> Vec<u8> {
    let mut bytes = vec![0u8; values.len()];
    bytes
        .par_chunks_mut(len.max(1))
        .zip(values.par_chunks(len.max(1)))
        .zip(scales.par_iter())
        .for_each(|((dst, src), &scale)| {
            let inverse = 1.0 / scale;
            for (d, &v) in dst.iter_mut().zip(src) {
                let q = (v * inverse).round().clamp(-LEVELS, LEVELS);
                *d = (q + OFFSET) as u8;
            }
        });
    bytes
}

/// The values of a float weight whose first dimension is the output channel, as (values,
/// rows, row length); a non-finite weight is refused, naming `what`.
fn finite_rows(weight: &Tensor, what: &str) -> Result<(Vec<f32>, usize, usize)> {
    let rows = weight.dim(0)?;
    let len = weight.elem_count() / rows.max(1);
    let values = weight
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
        candle_core::bail!(
            "{what}: element {bad} is {}; only finite weights can be quantized",
            values[bad]
        )
    }
    Ok((values, rows, len))
}

/// A float weight whose first dimension is the output channel, as (offset bytes, scales): U8
/// and F32 tensors on the weight's device. A non-finite weight is refused, naming `what`.
pub fn quantize(weight: &Tensor, what: &str) -> Result<(Tensor, Tensor)> {
    let (values, rows, len) = finite_rows(weight, what)?;
    let scales = row_scales(&values, rows, len);
    let bytes = quantize_rows(&values, len, &scales);
    let device = weight.device();
    Ok((
        Tensor::from_vec(bytes, weight.shape(), device)?,
        Tensor::from_vec(scales, rows, device)?,
    ))
}

/// The per-output scales [`quantize`] gives `weight`, without its bytes.
pub fn scales(weight: &Tensor, what: &str) -> Result<Tensor> {
    let (values, rows, len) = finite_rows(weight, what)?;
    Tensor::from_vec(row_scales(&values, rows, len), rows, weight.device())
}

/// The f32 weight that offset bytes (first dimension the output channel) and their per-row
/// scales stand for, on their device.
pub fn dequantize(bytes: &Tensor, scales: &Tensor) -> Result<Tensor> {
    scale_rows(&(bytes.to_dtype(DType::F32)? - f64::from(OFFSET))?, scales)
}

/// The integers (any float dtype, first dimension the output channel) times their row's scale,
/// in f32.
pub fn scale_rows(integers: &Tensor, scales: &Tensor) -> Result<Tensor> {
    let mut scale_shape = vec![integers.dim(0)?];
    scale_shape.resize(integers.rank(), 1);
    integers
        .to_dtype(DType::F32)?
        .broadcast_mul(&scales.to_dtype(DType::F32)?.reshape(scale_shape)?)
}

/// The offset byte of a stored i8 (its bit pattern with the top bit flipped), and back.
pub fn offset_byte(stored: u8) -> u8 {
    stored ^ 0x80
}

/// The bf16 bits of the integer an offset byte holds (exact: |q| <= 128 has 8 significant bits).
#[inline(always)]
fn bf16_bits(byte: u8) -> u16 {
    ((f32::from(byte) - OFFSET).to_bits() >> 16) as u16
}

/// Offset bytes laid out as the bf16 values of packed pair words (`gemm_bf16`'s layouts, one
/// byte per bf16) widened into those words: word `w` is bytes `2w` (low half) and `2w + 1`.
pub fn widen_to_pair_words(bytes: &[u8]) -> Vec<u32> {
    let len = bytes.len().div_ceil(2);
    let mut words: Vec<u32> = Vec::with_capacity(len);
    // Little-endian words are their halves in order, so each byte maps to one u16 on its own: a
    // plain map the compiler vectorizes (16 values an instruction with AVX-512). The buffer is
    // not zeroed first, every half being written (a weight's worth of memset was a few percent
    // of a q8 U-Net step).
    let halves: &mut [std::mem::MaybeUninit<u16>] = {
        let spare = &mut words.spare_capacity_mut()[..len];
        // SAFETY: `len` u32 slots are `2 len` u16 slots of the same memory, u16's alignment
        // dividing u32's.
        unsafe { std::slice::from_raw_parts_mut(spare.as_mut_ptr().cast(), 2 * len) }
    };
    if let Some(last) = halves.get_mut(bytes.len()) {
        // An odd count's last word pairs its value with bf16 zero.
        last.write(0);
    }
    const CHUNK: usize = 1 << 15;
    halves[..bytes.len()]
        .par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(CHUNK))
        .for_each(|(dst, src)| {
            super::vector_math::with_wide_vectors(
                #[inline(always)]
                || {
                    for (d, &b) in dst.iter_mut().zip(src) {
                        d.write(bf16_bits(b));
                    }
                },
            )
        });
    // SAFETY: all `2 len` halves were written above.
    unsafe { words.set_len(len) };
    words
}

/// The offset bytes of pair words whose bf16 values are all integers in [-128, 127] (packed
/// from a quantized weight): the inverse of [`widen_to_pair_words`].
pub fn narrow_pair_words(words: &[u32]) -> Vec<u8> {
    words
        .iter()
        .flat_map(|&w| [w as u16, (w >> 16) as u16])
        .map(|bits| (half::bf16::from_bits(bits).to_f32() + OFFSET) as u8)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tensor::seeded_randn;

    /// Every weight is within half a step (scale / 2) of its dequantized value, each row's
    /// largest magnitude is exact, and a zero row stays zero.
    #[test]
    fn rounding_error_is_half_a_step_per_row() {
        let mut weight = seeded_randn(&[6, 50], 7);
        weight = weight
            .slice_assign(
                &[5..6, 0..50],
                &Tensor::zeros((1, 50), DType::F32, &candle_core::Device::Cpu).unwrap(),
            )
            .unwrap();
        let (bytes, scales) = quantize(&weight, "w").unwrap();
        let back = dequantize(&bytes, &scales).unwrap();
        let scales = scales.to_vec1::<f32>().unwrap();
        let w = weight.to_vec2::<f32>().unwrap();
        let b = back.to_vec2::<f32>().unwrap();
        for (row, (wr, br)) in w.iter().zip(&b).enumerate() {
            let max = wr.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (x, y) in wr.iter().zip(br) {
                assert!(
                    (x - y).abs() <= scales[row] / 2.0 + 1e-6,
                    "row {row}: {x} vs {y}"
                );
            }
            let at = wr.iter().position(|v| v.abs() == max).unwrap();
            assert!((wr[at] - br[at]).abs() < 1e-6 * max.max(1.0));
        }
        assert!(b[5].iter().all(|&v| v == 0.0));
    }

    /// Offset bytes survive the trip through bf16 pair words, and i8 bit patterns map to them.
    #[test]
    fn pair_words_round_trip() {
        let bytes: Vec<u8> = (1..=255u8).collect();
        let words = widen_to_pair_words(&bytes);
        let back = narrow_pair_words(&words);
        assert_eq!(&back[..bytes.len()], &bytes[..]);
        assert_eq!(back[bytes.len()], 128, "the odd byte's partner is zero");
        for q in [-127i8, -1, 0, 1, 127] {
            assert_eq!(f32::from(offset_byte(q as u8)) - OFFSET, f32::from(q));
        }
    }

    #[test]
    fn non_finite_weights_are_refused_by_name() {
        let weight = Tensor::new(&[[1f32, f32::NAN]], &candle_core::Device::Cpu).unwrap();
        let err = quantize(&weight, "unet.conv_in.weight")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unet.conv_in.weight") && err.contains("NaN"),
            "{err}"
        );
    }
}
