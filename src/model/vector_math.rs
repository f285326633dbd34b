//! Element-wise functions and sums written as plain arithmetic that the compiler vectorises,
//! and [`with_avx2_fma`], which compiles a kernel for AVX2 with FMA where the CPU has them (the
//! crate targets baseline x86-64, whose vectors are half as wide and which has no FMA).
//!
//! libm's expf is one call per value: perf showed it as most of a softmax, and as a tenth of a
//! pixel-DDPM training step through the SiLUs of group norm.

/// Runs `kernel` compiled for AVX2 and FMA where the CPU has both, else as it is. The kernel's
/// helpers must be `#[inline(always)]` for the features to reach them.
#[inline(always)]
pub fn with_avx2_fma<R>(kernel: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has both features.
        return unsafe { avx2_fma(kernel) };
    }
    kernel()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_fma<R>(kernel: impl FnOnce() -> R) -> R {
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
                    + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r / 5040.0))))));
    let two_to_n = f32::from_bits((n_bits.wrapping_add(127) as u32) << 23);
    if x > -87.0 {
        p * two_to_n
    } else {
        0.0
    }
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
