//! Element-wise functions and sums written as plain arithmetic that the compiler vectorises,
//! and [`with_wide_vectors`], which compiles a kernel for AVX-512 or AVX2 with FMA where the CPU
//! has them (the crate targets baseline x86-64, whose vectors are a quarter as wide and which
//! has no FMA).
//!
//! libm's expf is one call per value: perf showed it as most of a softmax, and as a tenth of a
//! pixel-DDPM training step through the SiLUs of group norm.

/// Runs `kernel` compiled for AVX-512 (16 f32 lanes) or else AVX2 with FMA (8 lanes) where the
/// CPU has them, else as it is. The features reach only code inlined into the dispatching
/// function, so the kernel closure must be marked `#[inline(always)]` as must its helpers: a
/// closure left to the inliner is called from every branch below, is too big to be copied into
/// each, and stays one baseline (SSE2, no FMA) function; perf showed the softmax running so, four
/// lanes wide. AVX-512 took 0.2 s off a 512x512 U-Net step (3.2 s in bf16) on a Zen 5.
#[inline(always)]
pub fn with_wide_vectors<R>(kernel: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2_fma = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        if avx2_fma && is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has all three features.
            return unsafe { avx512(kernel) };
        }
        if avx2_fma {
            // SAFETY: the CPU has both features.
            return unsafe { avx2_fma_kernel(kernel) };
        }
    }
    kernel()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f")]
unsafe fn avx512<R>(kernel: impl FnOnce() -> R) -> R {
    kernel()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_fma_kernel<R>(kernel: impl FnOnce() -> R) -> R {
    kernel()
}

/// e^x for x <= 0: x = n ln 2 + r with |r| <= ln 2 / 2, e^r by its Taylor polynomial to r^7
/// (relative error under 1e-7, f32's own), 2^n through the exponent bits. Below -87 (e^x under
/// f32's smallest normal) it is 0, and so for NaN.
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding 1.5 * 2^23 leaves round(x log2 e) in the low mantissa bits, read back as an
    // integer without a conversion (Rust's saturating float-to-int cast does not vectorize).
    const ROUND: f32 = 12_582_912.0;
    let clamped = if x > -87.0 { x } else { -87.0 };
    let shifted = clamped * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let two_to_n = f32::from_bits((n_bits.wrapping_add(127) as u32) << 23);
    if x > -87.0 {
        p * two_to_n
    } else {
        0.0
    }
}

/// Replaces a row of values s by exp(scale (s - max s)), the numerators of softmax(scale s), and
/// returns their sum; `scale` > 0. In AVX-512 where the CPU has it.
pub fn softmax_numerators(row: &mut [f32], scale: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512 Foundation.
        return unsafe { softmax_numerators_avx512(row, scale) };
    }
    softmax_numerators_portable(row, scale)
}

/// [`softmax_numerators`] in portable code (vectorised by the compiler).
fn softmax_numerators_portable(row: &mut [f32], scale: f32) -> f32 {
    // Running maxima and sums in four 16-lane registers: one register's chain of dependent
    // max or add instructions would wait out each one's latency.
    const LANES: usize = 64;
    with_wide_vectors(
        #[inline(always)]
        || {
            let mut maxima = [f32::NEG_INFINITY; LANES];
            let mut chunks = row.chunks_exact(LANES);
            for chunk in &mut chunks {
                for (lane, &value) in maxima.iter_mut().zip(chunk) {
                    *lane = if value > *lane { value } else { *lane };
                }
            }
            let max = maxima
                .iter()
                .chain(chunks.remainder())
                .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
            let mut sums = [0f32; LANES];
            let mut chunks = row.chunks_exact_mut(LANES);
            for chunk in &mut chunks {
                for (sum, value) in sums.iter_mut().zip(chunk.iter_mut()) {
                    *value = exp_nonpositive((*value - max) * scale);
                    *sum += *value;
                }
            }
            let mut total = sums.iter().sum::<f32>();
            for value in chunks.into_remainder() {
                *value = exp_nonpositive((*value - max) * scale);
                total += *value;
            }
            total
        },
    )
}

/// [`softmax_numerators`] written in AVX-512 intrinsics: the same reduction of x to
/// n ln 2 + r and polynomial as [`exp_nonpositive`], each step one fused multiply-add (Rust
/// does not fuse a multiply and an add on its own, so the portable kernel spends two
/// instructions on each), and 2^n applied by `vscalefps`. Attention's softmax is 8% of SD 1.5's
/// f32 U-Net step at 512x512 (4096 x 4096 scores a head).
///
/// # Safety
/// The CPU must have AVX-512 Foundation.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn softmax_numerators_avx512(row: &mut [f32], scale: f32) -> f32 {
    use std::arch::x86_64::*;
    let len = row.len();
    let data = row.as_mut_ptr();
    let tail_mask = |i: usize| -> __mmask16 { ((1u32 << (len - i).min(16)) - 1) as __mmask16 };
    let (max, scale) = (_mm512_set1_ps(row_max_avx512(row)), _mm512_set1_ps(scale));
    let exp =
        |values: __m512| exp_nonpositive_avx512(_mm512_mul_ps(_mm512_sub_ps(values, max), scale));
    let mut sums = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 64 <= len {
        for (j, sum) in sums.iter_mut().enumerate() {
            let numerators = exp(_mm512_loadu_ps(data.add(i + 16 * j)));
            _mm512_storeu_ps(data.add(i + 16 * j), numerators);
            *sum = _mm512_add_ps(*sum, numerators);
        }
        i += 64;
    }
    while i < len {
        let mask = tail_mask(i);
        let numerators = _mm512_maskz_mov_ps(mask, exp(_mm512_maskz_loadu_ps(mask, data.add(i))));
        _mm512_mask_storeu_ps(data.add(i), mask, numerators);
        sums[0] = _mm512_add_ps(sums[0], numerators);
        i += 16;
    }
    _mm512_reduce_add_ps(_mm512_add_ps(
        _mm512_add_ps(sums[0], sums[1]),
        _mm512_add_ps(sums[2], sums[3]),
    ))
}

/// [`softmax_numerators_avx512`] that leaves the row as it is and writes the numerators rounded
/// to bf16 (nearest even, `vcvtne2ps2bf16`) to `dst`, for a product that reads them as bf16:
/// one pass over the row fewer than the numerators in place and their conversion after. The
/// exponential is [`exp2_nonpositive_bf16_avx512`]'s (7.5e-5 relative); the sum is of the
/// numerators before their rounding.
///
/// # Safety
/// The CPU must have AVX-512 Foundation and AVX512_BF16; `dst` must hold `row.len()` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn softmax_numerators_bf16_avx512(row: &[f32], scale: f32, dst: *mut u16) -> f32 {
    use std::arch::x86_64::*;
    let len = row.len();
    let data = row.as_ptr();
    // exp(scale (s - max)) = 2^t with t = s a - max a, a = scale log2(e): one fused op a value.
    let a = scale * std::f32::consts::LOG2_E;
    let (a, b) = (_mm512_set1_ps(a), _mm512_set1_ps(row_max_avx512(row) * a));
    let exp = |values: __m512| exp2_nonpositive_bf16_avx512(_mm512_fmsub_ps(values, a, b));
    let mut sums = [_mm512_setzero_ps(); 2];
    let mut i = 0;
    while i + 32 <= len {
        let low = exp(_mm512_loadu_ps(data.add(i)));
        let high = exp(_mm512_loadu_ps(data.add(i + 16)));
        sums[0] = _mm512_add_ps(sums[0], low);
        sums[1] = _mm512_add_ps(sums[1], high);
        // The second operand fills the low 16 values.
        let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(high, low));
        _mm512_storeu_si512(dst.add(i).cast(), both);
        i += 32;
    }
    while i < len {
        let count = (len - i).min(16);
        let mask = ((1u32 << count) - 1) as __mmask16;
        let numerators = _mm512_maskz_mov_ps(mask, exp(_mm512_maskz_loadu_ps(mask, data.add(i))));
        sums[0] = _mm512_add_ps(sums[0], numerators);
        let mut values = [0f32; 16];
        _mm512_storeu_ps(values.as_mut_ptr(), numerators);
        for (k, value) in values[..count].iter().enumerate() {
            *dst.add(i + k) = half::bf16::from_f32(*value).to_bits();
        }
        i += 16;
    }
    _mm512_reduce_add_ps(_mm512_add_ps(sums[0], sums[1]))
}

/// 2^t of 16 lanes with t <= 0 (0 below -126, for -inf and for NaN), to within 7.5e-5
/// relative, for values rounded to bf16 after (up to 2^-9 = 2.0e-3 relative): 2^t = 2^n 2^f
/// with n = round(t) and f in [-1/2, 1/2], 2^f by a cubic fitted to minimise the largest
/// relative error on that interval (Lawson's iteration; a Taylor series needs the fifth power
/// for 3e-6, which the rounding to bf16 does not keep).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn exp2_nonpositive_bf16_avx512(t: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let kept = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(t, _mm512_set1_ps(-126.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
    let f = _mm512_sub_ps(t, n);
    // Highest power first.
    let mut p = _mm512_set1_ps(0.055_171_665);
    for c in [0.242_611_12, 0.693_260_99, 0.999_928_07] {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
    }
    _mm512_maskz_scalef_ps(kept, p, n)
}

/// The largest value of `row` (-inf when empty), in four running maxima.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn row_max_avx512(row: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let len = row.len();
    let data = row.as_ptr();
    let mut maxima = [_mm512_set1_ps(f32::NEG_INFINITY); 4];
    let mut i = 0;
    while i + 64 <= len {
        for (j, lane) in maxima.iter_mut().enumerate() {
            *lane = _mm512_max_ps(*lane, _mm512_loadu_ps(data.add(i + 16 * j)));
        }
        i += 64;
    }
    while i < len {
        let mask = ((1u32 << (len - i).min(16)) - 1) as __mmask16;
        let values = _mm512_mask_loadu_ps(maxima[0], mask, data.add(i));
        maxima[0] = _mm512_max_ps(maxima[0], values);
        i += 16;
    }
    _mm512_reduce_max_ps(_mm512_max_ps(
        _mm512_max_ps(maxima[0], maxima[1]),
        _mm512_max_ps(maxima[2], maxima[3]),
    ))
}

/// [`exp_nonpositive`] of 16 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn exp_nonpositive_avx512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Below -87 (e^x under f32's smallest normal) the result is 0, as is NaN's.
    let kept = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, _mm512_set1_ps(-87.0));
    let x = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    let mut p = _mm512_set1_ps(1.0 / 5040.0);
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    _mm512_maskz_scalef_ps(kept, p, n)
}

/// Columns of softmax numerators: `block` holds `keys` rows of 64 scores, one column per
/// query (attention's scores transposed, `ops::attention`); each column s becomes
/// exp(scale (s - max s)) as in [`softmax_numerators_avx512`], and the column sums are returned.
///
/// # Safety
/// The CPU must have AVX-512 Foundation.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub unsafe fn softmax_columns_avx512(block: &mut [f32], keys: usize, scale: f32) -> [f32; 64] {
    use std::arch::x86_64::*;
    let mut maxima = [_mm512_set1_ps(f32::NEG_INFINITY); 4];
    for row in block[..keys * 64].chunks_exact(64) {
        for (j, lane) in maxima.iter_mut().enumerate() {
            *lane = _mm512_max_ps(*lane, _mm512_loadu_ps(row.as_ptr().add(16 * j)));
        }
    }
    let scale = _mm512_set1_ps(scale);
    let mut sums = [_mm512_setzero_ps(); 4];
    for row in block[..keys * 64].chunks_exact_mut(64) {
        for (j, (sum, &max)) in sums.iter_mut().zip(&maxima).enumerate() {
            let at = row.as_mut_ptr().add(16 * j);
            let x = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(at), max), scale);
            let numerators = exp_nonpositive_avx512(x);
            _mm512_storeu_ps(at, numerators);
            *sum = _mm512_add_ps(*sum, numerators);
        }
    }
    let mut out = [0f32; 64];
    for (j, sum) in sums.iter().enumerate() {
        _mm512_storeu_ps(out.as_mut_ptr().add(16 * j), *sum);
    }
    out
}

/// The logistic function 1 / (1 + e^-h), through e^-|h| so that the exponential never
/// overflows: sigma(h) = 1 / (1 + e^-|h|) for h >= 0 and e^-|h| / (1 + e^-|h|) below.
#[inline(always)]
pub fn sigmoid(h: f32) -> f32 {
    let decay = exp_nonpositive(-h.abs());
    let upper = 1.0 / (1.0 + decay);
    if h >= 0.0 {
        upper
    } else {
        decay * upper
    }
}

/// SiLU (swish), h sigma(h).
#[inline(always)]
pub fn silu(h: f32) -> f32 {
    h * sigmoid(h)
}

/// d silu / dh = sigma(h) (1 + h (1 - sigma(h))).
#[inline(always)]
pub fn silu_derivative(h: f32) -> f32 {
    let sigma = sigmoid(h);
    sigma * (1.0 + h * (1.0 - sigma))
}

/// The error function, odd: below |x| = 1/2 its Maclaurin series to x^13 (truncation under
/// 1e-9), beyond it Abramowitz & Stegun 7.1.26 (absolute error under 1.5e-7),
/// erf |x| = 1 - t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) e^-x^2 with t = 1 / (1 + p |x|),
/// whose 1 - ... would lose f32 digits near 0; in f32 arithmetic the absolute error stays
/// under 4e-7. Both are computed and one chosen, which
/// vectorises where a branch would not.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_72,
        1.421_413_8,
        -1.453_152_1,
        1.061_405_4,
    ];
    // 2 / sqrt(pi) times (-1)^n / (n! (2n + 1)).
    const SERIES: [f32; 7] = [
        std::f32::consts::FRAC_2_SQRT_PI,
        -0.376_126_4,
        0.112_837_92,
        -0.026_866_17,
        0.005_223_977,
        -0.000_854_832,
        0.000_120_553_3,
    ];
    let magnitude = x.abs();
    let square = x * x;
    let near_zero = x
        * (SERIES[0]
            + square
                * (SERIES[1]
                    + square
                        * (SERIES[2]
                            + square
                                * (SERIES[3]
                                    + square
                                        * (SERIES[4]
                                            + square * (SERIES[5] + square * SERIES[6]))))));
    let t = 1.0 / (1.0 + P * magnitude);
    let polynomial = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let tail = 1.0 - polynomial * exp_nonpositive(-square);
    let tail = if x < 0.0 { -tail } else { tail };
    if magnitude < 0.5 {
        near_zero
    } else {
        tail
    }
}

/// GELU with the exact (erf) form, x Phi(x) = x (1 + erf(x / sqrt 2)) / 2 (Hendrycks & Gimpel
/// 2016), as PyTorch's default `gelu`.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// d gelu / dx = Phi(x) + x phi(x), phi(x) = e^(-x^2 / 2) / sqrt(2 pi).
#[inline(always)]
pub fn gelu_derivative(x: f32) -> f32 {
    const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
    let cdf = 0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2));
    cdf + x * FRAC_1_SQRT_2PI * exp_nonpositive(-0.5 * x * x)
}

/// The sum in f64 (eight running partial sums, which the compiler keeps in vector registers; a
/// single running sum is one dependent addition per value).
#[inline(always)]
pub fn sum(values: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let mut chunks = values.chunks_exact(8);
    for chunk in &mut chunks {
        for (lane, value) in lanes.iter_mut().zip(chunk) {
            *lane += *value as f64;
        }
    }
    lanes.iter().sum::<f64>() + chunks.remainder().iter().map(|v| *v as f64).sum::<f64>()
}

/// The sum of (value - center)^2 in f64, vectorised as [`sum`].
#[inline(always)]
pub fn sum_squared_deviations(values: &[f32], center: f64) -> f64 {
    let mut lanes = [0f64; 8];
    let mut chunks = values.chunks_exact(8);
    for chunk in &mut chunks {
        for (lane, value) in lanes.iter_mut().zip(chunk) {
            let deviation = *value as f64 - center;
            *lane += deviation * deviation;
        }
    }
    let rest = chunks
        .remainder()
        .iter()
        .map(|v| (*v as f64 - center).powi(2));
    lanes.iter().sum::<f64>() + rest.sum::<f64>()
}

/// (sum a, sum a b) in f64, vectorised as [`sum`].
#[inline(always)]
pub fn sum_and_dot(a: &[f32], b: &[f32]) -> (f64, f64) {
    let (mut sums, mut dots) = ([0f64; 8], [0f64; 8]);
    let (mut a_chunks, mut b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    for (a_chunk, b_chunk) in (&mut a_chunks).zip(&mut b_chunks) {
        for lane in 0..8 {
            sums[lane] += a_chunk[lane] as f64;
            dots[lane] += a_chunk[lane] as f64 * b_chunk[lane] as f64;
        }
    }
    let rest = a_chunks.remainder().iter().zip(b_chunks.remainder());
    let (rest_sum, rest_dot) = rest.fold((0f64, 0f64), |(s, d), (a, b)| {
        (s + *a as f64, d + *a as f64 * *b as f64)
    });
    (
        sums.iter().sum::<f64>() + rest_sum,
        dots.iter().sum::<f64>() + rest_dot,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorizable exponential is within two f32 roundings of libm's over f32's normal
    /// range below 0, and exactly 0 far below it.
    #[test]
    fn exp_nonpositive_matches_libm() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -86.9 * i as f32 / 200_000.0;
            let (ours, libm) = (exp_nonpositive(x), x.exp());
            worst = worst.max((ours - libm).abs() / libm);
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-1000.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
    }

    /// Both softmax kernels give the numerators exp(scale (s - max s)) within two roundings of
    /// the exponential of that f32 argument, and their sum, for rows with tails, ties,
    /// far-below-max values and -inf (masked scores).
    #[test]
    fn softmax_numerators_match_libm() {
        for len in [1, 15, 16, 17, 64, 100, 4096] {
            let row: Vec<f32> = (0..len)
                .map(|i| match i % 11 {
                    3 => f32::NEG_INFINITY,
                    7 => -2000.0,
                    _ => ((i * 37) % 101) as f32 / 3.0 - 10.0,
                })
                .collect();
            let scale = 0.37;
            let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let want: Vec<f64> = row
                .iter()
                .map(|&s| (((s - max) * scale) as f64).exp())
                .collect();
            let want_sum: f64 = want.iter().sum();
            let mut kernels: Vec<(&str, Vec<f32>, f32)> = Vec::new();
            let mut portable = row.clone();
            let sum = softmax_numerators_portable(&mut portable, scale);
            kernels.push(("portable", portable, sum));
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx512f") {
                let mut wide = row.clone();
                // SAFETY: the CPU has AVX-512 Foundation.
                let sum = unsafe { softmax_numerators_avx512(&mut wide, scale) };
                kernels.push(("avx512", wide, sum));
            }
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16") {
                let mut bits = vec![0u16; len];
                // SAFETY: the CPU has AVX512F and AVX512_BF16; `bits` holds a value per score.
                let sum = unsafe { softmax_numerators_bf16_avx512(&row, scale, bits.as_mut_ptr()) };
                let rounded: Vec<f32> = bits
                    .iter()
                    .map(|&b| half::bf16::from_bits(b).to_f32())
                    .collect();
                // Each value rounded to bf16 as well: the nearest of its two neighbours.
                for (r, w) in rounded.iter().zip(&want) {
                    let err = (*r as f64 - w).abs();
                    assert!(
                        err <= 2f64.powi(-8) * w + 1e-37,
                        "bf16 {len}: {r} against {w}"
                    );
                }
                // Its exponential is exact to 7.5e-5, not f32's rounding.
                let err = (sum as f64 - want_sum).abs() / want_sum;
                assert!(err < 8e-5, "bf16 {len}: sum {sum} against {want_sum}");
            }
            for (name, got, sum) in kernels {
                for (g, w) in got.iter().zip(&want) {
                    let err = (*g as f64 - w).abs();
                    assert!(err <= 3e-7 * w + 1e-37, "{name} {len}: {g} against {w}");
                }
                let err = (sum as f64 - want_sum).abs() / want_sum;
                assert!(err < 1e-6, "{name} {len}: sum {sum} against {want_sum}");
            }
        }
    }

    /// Column softmax numerators equal the row kernel's on the transposed scores.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn softmax_columns_match_the_rows() {
        if !is_x86_feature_detected!("avx512f") {
            return;
        }
        let keys = 77;
        let scores: Vec<f32> = (0..keys * 64)
            .map(|i| ((i * 53) % 97) as f32 / 5.0 - 9.0)
            .collect();
        let mut block = scores.clone();
        // SAFETY: the CPU has AVX-512 Foundation.
        let sums = unsafe { softmax_columns_avx512(&mut block, keys, 0.3) };
        for column in 0..64 {
            let mut row: Vec<f32> = (0..keys).map(|k| scores[k * 64 + column]).collect();
            // SAFETY: as above.
            let sum = unsafe { softmax_numerators_avx512(&mut row, 0.3) };
            assert!(
                (sum - sums[column]).abs() <= 1e-6 * sum,
                "column {column} sum"
            );
            for (k, value) in row.iter().enumerate() {
                assert_eq!(*value, block[k * 64 + column], "column {column}, key {k}");
            }
        }
    }

    /// SiLU and its derivative against the textbook formulas in f64, over both signs and far
    /// into the tails, where 1 + e^-h overflows f32 for very negative h; NaN stays NaN (a
    /// diverged training step must still be seen).
    #[test]
    fn silu_and_derivative_match_f64_formulas() {
        let (mut worst_value, mut worst_slope) = (0f64, 0f64);
        for i in 0..=40_000 {
            let h = (-100.0 + 200.0 * i as f64 / 40_000.0) as f32;
            let exact = h as f64;
            let sigma = 1.0 / (1.0 + (-exact).exp());
            let value = exact * sigma;
            let slope = sigma * (1.0 + exact * (1.0 - sigma));
            // Relative, except where e^h is below f32's normal range and silu is 0
            // instead of about -1e-36.
            let relative = (silu(h) as f64 - value).abs() / (value.abs() + 1e-20);
            worst_value = worst_value.max(relative);
            worst_slope = worst_slope.max((silu_derivative(h) as f64 - slope).abs());
        }
        assert!(worst_value < 1e-6, "silu relative error {worst_value}");
        assert!(worst_slope < 1e-6, "silu' absolute error {worst_slope}");
        assert!(silu(f32::NAN).is_nan() && silu_derivative(f32::NAN).is_nan());
        assert_eq!(silu(f32::INFINITY), f32::INFINITY);
    }

    /// erf within 4e-7 of the f64 reference over both signs and into the flat tails; GELU
    /// then within a few f32 roundings of x Phi(x).
    #[test]
    fn erf_and_gelu_match_f64_references() {
        // erf in f64 by its Maclaurin series near 0 and the continued fraction of erfc beyond.
        fn erf64(x: f64) -> f64 {
            let a = x.abs();
            let value = if a < 2.5 {
                let (mut term, mut total, mut n) = (a, a, 0.0);
                while term.abs() > 1e-17 * total.abs() {
                    n += 1.0;
                    term *= -a * a / n;
                    total += term / (2.0 * n + 1.0);
                }
                total * 2.0 / std::f64::consts::PI.sqrt()
            } else {
                let mut fraction = 0.0;
                for k in (1..60).rev() {
                    fraction = k as f64 / 2.0 / (a + fraction);
                }
                1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + fraction)
            };
            value.copysign(x)
        }
        let (mut worst_erf, mut worst_gelu) = (0f64, 0f64);
        for i in 0..=60_000 {
            let x = (-12.0 + 24.0 * i as f64 / 60_000.0) as f32;
            let exact = x as f64;
            let e = (erf(x) as f64 - erf64(exact)).abs();
            worst_erf = worst_erf.max(e);
            let phi = 0.5 * exact * (1.0 + erf64(exact / std::f64::consts::SQRT_2));
            worst_gelu = worst_gelu.max((gelu(x) as f64 - phi).abs() / (1.0 + exact.abs()));
        }
        assert!(worst_erf < 4e-7, "erf absolute error {worst_erf}");
        assert!(worst_gelu < 2e-7, "gelu error {worst_gelu}");
        assert!(gelu(f32::NAN).is_nan());
    }

    /// The lane-wise sums equal the sequential f64 ones (within reordering) for lengths that
    /// do and do not fill the last eight lanes.
    #[test]
    fn lane_sums_match_sequential_sums() {
        for len in [0, 1, 7, 8, 9, 100, 1027] {
            let a: Vec<f32> = (0..len)
                .map(|i| ((i * 37) % 101) as f32 / 7.0 - 5.0)
                .collect();
            let b: Vec<f32> = (0..len)
                .map(|i| ((i * 53) % 89) as f32 / 11.0 - 3.0)
                .collect();
            let total: f64 = a.iter().map(|v| *v as f64).sum();
            let dot: f64 = a.iter().zip(&b).map(|(a, b)| *a as f64 * *b as f64).sum();
            let squares: f64 = a.iter().map(|v| (*v as f64 - 0.5).powi(2)).sum();
            assert!((sum(&a) - total).abs() < 1e-9, "{len}");
            assert!(
                (sum_squared_deviations(&a, 0.5) - squares).abs() < 1e-9,
                "{len}"
            );
            let (s, d) = sum_and_dot(&a, &b);
            assert!((s - total).abs() < 1e-9 && (d - dot).abs() < 1e-9, "{len}");
        }
    }
}
