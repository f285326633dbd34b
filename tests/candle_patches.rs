//! The patched parts of vendor/candle-core (PATCHED.md) against plain loops: sums over any set
//! of dimensions (walked in runs since the patch) and matrix products into buffers that are no
//! longer zeroed first.

use candle_core::{Device, Tensor};

/// Pseudo-random values with a fixed seed, so a failure names one reproducible case.
fn values(count: usize, seed: u64) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..count)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// The sum of `data` (row-major, `dims`) over `reduced`, keeping those dimensions as 1, by
/// visiting every element in f64.
fn naive_sum(data: &[f32], dims: &[usize], reduced: &[usize]) -> Vec<f64> {
    let out_dims: Vec<usize> = dims
        .iter()
        .enumerate()
        .map(|(dim, &size)| if reduced.contains(&dim) { 1 } else { size })
        .collect();
    let mut out = vec![0f64; out_dims.iter().product()];
    let mut index = vec![0usize; dims.len()];
    for &value in data {
        let mut flat = 0;
        for (dim, &position) in index.iter().enumerate() {
            let position = if reduced.contains(&dim) { 0 } else { position };
            flat = flat * out_dims[dim] + position;
        }
        out[flat] += value as f64;
        for dim in (0..dims.len()).rev() {
            index[dim] += 1;
            if index[dim] < dims[dim] {
                break;
            }
            index[dim] = 0;
        }
    }
    out
}

/// Every subset of the dimensions of several shapes, the shapes of broadcast gradients among
/// them: a linear bias (rows, features) summed over rows, a channel bias (B, C, H, W) summed
/// over (0, 2, 3), a layer norm's weight (B, T, D) summed over (0, 1).
#[test]
fn sums_over_any_dimensions_match_a_plain_loop() -> candle_core::Result<()> {
    let shapes: [&[usize]; 6] = [
        &[7],
        &[5, 9],
        &[3, 4, 17],
        &[2, 3, 5, 6],
        &[4, 1, 3, 8],
        &[2, 0, 3],
    ];
    for (case, dims) in shapes.iter().enumerate() {
        let count: usize = dims.iter().product();
        let data = values(count, case as u64);
        let tensor = Tensor::from_vec(data.clone(), *dims, &Device::Cpu)?;
        for mask in 0u32..(1 << dims.len()) {
            let reduced: Vec<usize> = (0..dims.len()).filter(|d| mask & (1 << d) != 0).collect();
            if reduced.is_empty() {
                continue;
            }
            let got = tensor
                .sum_keepdim(reduced.clone())?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let want = naive_sum(&data, dims, &reduced);
            assert_eq!(got.len(), want.len(), "shape {dims:?} over {reduced:?}");
            for (index, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (*g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "shape {dims:?} over {reduced:?}, element {index}: {g} against {w}"
                );
            }
        }
    }
    Ok(())
}

/// A transposed (strided) source keeps candle's element-by-element path; it must agree with
/// the contiguous copy, which takes the run-wise one.
#[test]
fn strided_and_contiguous_sums_agree() -> candle_core::Result<()> {
    let tensor = Tensor::from_vec(values(6 * 10 * 4, 9), (6, 10, 4), &Device::Cpu)?;
    let strided = tensor.transpose(0, 2)?;
    let contiguous = strided.contiguous()?;
    for reduced in [
        vec![0],
        vec![1],
        vec![2],
        vec![0, 1],
        vec![0, 2],
        vec![1, 2],
    ] {
        let a = strided
            .sum_keepdim(reduced.clone())?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let b = contiguous
            .sum_keepdim(reduced.clone())?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-5, "over {reduced:?}: {x} against {y}");
        }
    }
    Ok(())
}

/// Products of every kind of shape the gemm crate routes differently (a row, a column, an
/// outer product, a small and a large block, batches, an empty inner dimension) equal an f64
/// loop, and a product whose output buffer was not zeroed holds no stale value.
#[test]
fn matrix_products_into_unzeroed_buffers_match_a_plain_loop() -> candle_core::Result<()> {
    let shapes = [
        (1, 1, 7, 5),
        (1, 9, 1, 6),
        (1, 6, 8, 1),
        (1, 3, 4, 5),
        (2, 33, 47, 70),
        (3, 130, 20, 260),
        (2, 4, 5, 0),
    ];
    for (case, &(batch, m, n, k)) in shapes.iter().enumerate() {
        // Fill and free buffers of the same size first, so a fresh allocation is likely to reuse
        // memory that holds something other than zero.
        for _ in 0..3 {
            let junk = Tensor::full(f32::NAN, (batch, m, n), &Device::Cpu)?;
            drop(junk);
        }
        let lhs_data = values(batch * m * k, 2 * case as u64);
        let rhs_data = values(batch * k * n, 2 * case as u64 + 1);
        let lhs = Tensor::from_vec(lhs_data.clone(), (batch, m, k), &Device::Cpu)?;
        let rhs = Tensor::from_vec(rhs_data.clone(), (batch, k, n), &Device::Cpu)?;
        let got = lhs.matmul(&rhs)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(got.len(), batch * m * n);
        for b in 0..batch {
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|p| {
                            lhs_data[(b * m + i) * k + p] as f64
                                * rhs_data[(b * k + p) * n + j] as f64
                        })
                        .sum();
                    let g = got[(b * m + i) * n + j] as f64;
                    assert!(
                        (g - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "product {batch}x{m}x{n}x{k}, ({b}, {i}, {j}): {g} against {want}"
                    );
                }
            }
        }
    }
    Ok(())
}
