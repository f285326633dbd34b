//! Small tensor helpers shared by the samplers and the models' CPU ops.

use candle_core::{CpuStorage, Layout, Result, Tensor};

/// sum_i c_i x_i for scalar coefficients, the shape of every sampler update.
pub fn lincomb(terms: &[(f64, &Tensor)]) -> Result<Tensor> {
    let (first, rest) = terms
        .split_first()
        .expect("lincomb needs at least one term");
    let mut acc = first.1.affine(first.0, 0.0)?;
    for (coeff, x) in rest {
        if *coeff != 0.0 {
            acc = (acc + x.affine(*coeff, 0.0)?)?;
        }
    }
    Ok(acc)
}

/// Euclidean norm of each batch row, averaged over the batch (the `||.||` of Song et al. 2021,
/// Algorithm 4 and 5).
pub fn mean_row_norm(x: &Tensor) -> Result<f64> {
    let batch = x.dim(0)?;
    let rows = x.flatten_from(1)?.to_dtype(candle_core::DType::F64)?;
    let norms = rows.sqr()?.sum(1)?.sqrt()?;
    Ok(norms.sum_all()?.to_scalar::<f64>()? / batch as f64)
}

/// Largest absolute value of a tensor, as f64.
pub fn max_abs(x: &Tensor) -> Result<f64> {
    x.abs()?
        .flatten_all()?
        .max(0)?
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()
}

/// The f32 values of a custom op's contiguous CPU input; errors name the op and the input.
pub fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
    what: &str,
) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: {what} must be f32")
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: {what} must be contiguous"),
    }
}

/// The f32 values of a contiguous tensor's CPU storage, from `tensor.storage_and_layout()`;
/// errors name the op and the input.
pub fn storage_f32<'a>(
    storage: &'a candle_core::Storage,
    layout: &Layout,
    op: &str,
    what: &str,
) -> Result<&'a [f32]> {
    match storage {
        candle_core::Storage::Cpu(cpu) => contiguous_f32(cpu, layout, op, what),
        _ => candle_core::bail!("{op}: {what} must be on the CPU"),
    }
}

/// A buffer of `len` floats for an op that writes every element before anything reads it, not
/// zeroed first: zeroing is a pass over the whole output on the calling thread alone (tens of
/// megabytes a layer at 512x512) while the other cores wait. Unit tests get NaN in place of the
/// old contents, so that an element an op misses fails them.
///
/// # Safety
/// Every element must be written before it is read or the vector is handed on.
pub unsafe fn unwritten_f32(len: usize) -> Vec<f32> {
    // SAFETY: as the caller's.
    unsafe { unwritten(len, f32::NAN) }
}

/// [`unwritten_f32`] of any plain element type (words, bf16), with `poison` in every element
/// under unit tests.
///
/// # Safety
/// Every element must be written before it is read or the vector is handed on; `T` must have
/// no invalid bit patterns (u32, f32, bf16 and the like).
#[allow(clippy::uninit_vec)] // The point: the caller's kernel initialises it (as candle's own).
pub unsafe fn unwritten<T: Copy>(len: usize, poison: T) -> Vec<T> {
    if cfg!(test) {
        return vec![poison; len];
    }
    let mut values = Vec::with_capacity(len);
    // SAFETY: the capacity is `len`; the element type has no invalid bit patterns, and the
    // caller writes every element before reading it.
    unsafe { values.set_len(len) };
    values
}

/// Whether `tensor` is an f32 tensor on the CPU (what the fused CPU kernels take).
pub fn is_cpu_f32(tensor: &Tensor) -> bool {
    tensor.device().is_cpu() && tensor.dtype() == candle_core::DType::F32
}

/// The VarMap's variables sorted by name (a VarMap is a HashMap, whose order changes between
/// runs; every loop over parameters that touches an RNG or a file goes through this order).
pub fn named_vars(varmap: &candle_nn::VarMap) -> Vec<(String, candle_core::Var)> {
    let mut named: Vec<(String, candle_core::Var)> = varmap
        .data()
        .lock()
        .expect("VarMap lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// The gradient of sum(out * probe) with respect to `var` (tests comparing a fused op's backward
/// pass with composed ops').
#[cfg(test)]
pub fn probe_gradient(out: &Tensor, probe: &Tensor, var: &candle_core::Var) -> Tensor {
    let grads = (out * probe)
        .and_then(|product| product.sum_all())
        .and_then(|total| total.backward())
        .expect("backward pass");
    grads.get(var.as_tensor()).expect("a gradient").clone()
}

/// A standard-normal tensor of `shape` from `seed` (tests).
#[cfg(test)]
pub fn seeded_randn(shape: &[usize], seed: u64) -> Tensor {
    crate::sampler::noise::SeededNoise::new(seed)
        .randn(shape)
        .expect("seeded noise")
}

/// `dst (m x n, row stride dst_rs) = lhs (m x k) rhs (k x n)` on this thread (the tasks around
/// it are the parallel part: attention heads, convolution tile blocks), lhs and rhs given by
/// their (row, column) strides.
///
/// # Safety
/// Every matrix must hold the elements its shape and strides name.
pub unsafe fn single_thread_product(
    shape: (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
) {
    single_thread_product_into(
        shape,
        dst,
        dst_rs,
        lhs,
        lhs_strides,
        rhs,
        rhs_strides,
        false,
    )
}

/// [`single_thread_product`], adding the product to `dst` when `accumulate` (sums over blocks).
///
/// # Safety
/// Every matrix must hold the elements its shape and strides name.
#[allow(clippy::too_many_arguments)]
pub unsafe fn single_thread_product_into(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    dst_rs: usize,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
    accumulate: bool,
) {
    matrix_product(
        (m, n, k),
        dst.as_mut_ptr(),
        (dst_rs, 1),
        accumulate,
        lhs.as_ptr(),
        (lhs_rs, lhs_cs),
        rhs.as_ptr(),
        (rhs_rs, rhs_cs),
        gemm::Parallelism::None,
    )
}

/// gemm's parallelism for a product shared by every thread candle uses (none on one thread).
pub fn all_threads() -> gemm::Parallelism {
    match candle_core::utils::get_num_threads() {
        threads if threads > 1 => gemm::Parallelism::Rayon(threads),
        _ => gemm::Parallelism::None,
    }
}

/// `dst (m x n) = [dst +] lhs (m x k) rhs (k x n)` through the gemm crate, every matrix given by
/// its data and (row, column) strides, adding to `dst` when `accumulate`.
///
/// # Safety
/// Every matrix must hold its elements at those strides, and nothing else may touch `dst`
/// meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matrix_product(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    (dst_rs, dst_cs): (usize, usize),
    accumulate: bool,
    lhs: *const f32,
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: *const f32,
    (rhs_rs, rhs_cs): (usize, usize),
    parallelism: gemm::Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs as isize,
        dst_rs as isize,
        accumulate,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        if accumulate { 1.0 } else { 0.0 },
        1.0,
        false,
        false,
        false,
        parallelism,
    )
}

/// Values in [-0.5, 0.5) from a multiplicative hash of the index and `seed`: test operands that
/// need no random number generator.
#[cfg(test)]
pub fn hashed_values(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            let h = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
            h as f32 / (1 << 24) as f32 - 0.5
        })
        .collect()
}
