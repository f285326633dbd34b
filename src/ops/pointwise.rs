//! Element-wise activations as single-pass ops with their derivative for the backward pass:
//! composed from candle's ops, CLIP's quick GELU is three passes forward (a scale, a sigmoid
//! through libm's expf, a product) and more than that backward. f32 or bf16 values (a bf16
//! model's activations), computed in f32.

use super::tensor::contiguous_f32;
use super::vector_math::{sigmoid, with_wide_vectors};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

/// Values per task.
const CHUNK: usize = 1 << 14;

/// An element-wise function and its derivative, both inlined into the vectorised loops.
pub trait Activation: Send + Sync + Copy + 'static {
    const NAME: &'static str;
    fn value(x: f32) -> f32;
    fn derivative(x: f32) -> f32;
}

/// CLIP's quick GELU, x sigma(1.702 x) (Hendrycks & Gimpel 2016, section 2's sigmoid
/// approximation), with derivative sigma(1.702 x) (1 + 1.702 x (1 - sigma(1.702 x))).
#[derive(Debug, Clone, Copy)]
pub struct QuickGelu;

impl Activation for QuickGelu {
    const NAME: &'static str = "quick-gelu";

    #[inline(always)]
    fn value(x: f32) -> f32 {
        x * sigmoid(1.702 * x)
    }

    #[inline(always)]
    fn derivative(x: f32) -> f32 {
        let s = sigmoid(1.702 * x);
        s * (1.0 + 1.702 * x * (1.0 - s))
    }
}

/// Whether [`apply`] takes `x`: f32 or bf16 on the CPU.
pub fn applies_to(x: &Tensor) -> bool {
    x.device().is_cpu()
        && matches!(
            x.dtype(),
            candle_core::DType::F32 | candle_core::DType::BF16
        )
}

/// `A` applied to every value of an f32 or bf16 CPU tensor ([`applies_to`]), with a backward
/// pass.
pub fn apply<A: Activation>(x: &Tensor, activation: A) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Forward(activation))
}

struct Forward<A>(A);

/// The incoming gradient times the derivative at the input: (x, grad) -> grad A'(x).
struct Backward<A>(A);

impl<A: Activation> CustomOp1 for Forward<A> {
    fn name(&self) -> &'static str {
        A::NAME
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match storage {
            CpuStorage::BF16(values) => {
                let Some((start, end)) = layout.contiguous_offsets() else {
                    candle_core::bail!("{}: the input must be contiguous", A::NAME)
                };
                CpuStorage::BF16(map_values(&values[start..end], |x: bf16| {
                    bf16::from_f32(A::value(x.to_f32()))
                }))
            }
            _ => {
                let x = contiguous_f32(storage, layout, A::NAME, "the input")?;
                CpuStorage::F32(map_values(x, A::value))
            }
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.contiguous()?.apply_op2_no_bwd(
            &grad.contiguous()?,
            &Backward(self.0),
        )?))
    }
}

impl<A: Activation> CustomOp2 for Backward<A> {
    fn name(&self) -> &'static str {
        A::NAME
    }

    fn cpu_fwd(
        &self,
        x_storage: &CpuStorage,
        x_layout: &Layout,
        grad_storage: &CpuStorage,
        grad_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(x_storage, x_layout, A::NAME, "the input")?;
        let grad = contiguous_f32(grad_storage, grad_layout, A::NAME, "the gradient")?;
        if grad.len() != x.len() {
            candle_core::bail!(
                "{}: gradient {:?} does not fit the input {:?}",
                A::NAME,
                grad_layout.shape(),
                x_layout.shape()
            )
        }
        // SAFETY: every value is written below.
        let mut dx = unsafe { super::tensor::unwritten_f32(x.len()) };
        dx.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK).zip(grad.par_chunks(CHUNK)))
            .for_each(|(dx, (x, grad))| {
                with_wide_vectors(
                    #[inline(always)]
                    || {
                        for ((d, x), g) in dx.iter_mut().zip(x).zip(grad) {
                            *d = g * A::derivative(*x);
                        }
                    },
                )
            });
        Ok((CpuStorage::F32(dx), x_layout.shape().clone()))
    }
}

/// `f` of every value, in parallel chunks, each compiled for the CPU's widest vectors.
fn map_values<T: Copy + Send + Sync>(values: &[T], f: impl Fn(T) -> T + Send + Sync) -> Vec<T> {
    let mut out = values.to_vec();
    out.par_chunks_mut(CHUNK).for_each(|chunk| {
        with_wide_vectors(
            #[inline(always)]
            || chunk.iter_mut().for_each(|value| *value = f(*value)),
        )
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tensor::{max_abs, probe_gradient, seeded_randn};
    use candle_core::Var;

    /// Quick GELU and its gradient equal the composed x sigmoid(1.702 x) of candle's ops, over
    /// values from about -12 to 12 and more of them than one task.
    #[test]
    fn quick_gelu_matches_composed_ops() {
        let x = Var::from_tensor(&(seeded_randn(&[3, CHUNK + 5], 1) * 4.0).unwrap()).unwrap();
        let probe = seeded_randn(&[3, CHUNK + 5], 2);
        let fused = apply(&x, QuickGelu).unwrap();
        let composed = (x.as_tensor()
            * candle_nn::ops::sigmoid(&(x.as_tensor() * 1.702).unwrap()).unwrap())
        .unwrap();
        let scale = max_abs(&composed).unwrap();
        assert!(max_abs(&(&fused - &composed).unwrap()).unwrap() < 1e-6 * scale);
        let gradient = |out: &Tensor| probe_gradient(out, &probe, &x);
        let (fused, composed) = (gradient(&fused), gradient(&composed));
        let scale = max_abs(&composed).unwrap();
        let diff = max_abs(&(fused - composed).unwrap()).unwrap();
        assert!(diff < 1e-5 * scale, "gradient differs by {diff}");
    }

    /// bf16 values give the f32 result rounded to bf16 (within one bf16 rounding).
    #[test]
    fn quick_gelu_of_bf16_values_is_the_f32_result_rounded() {
        let x = (seeded_randn(&[4, 301], 3) * 4.0).unwrap();
        let x16 = x.to_dtype(candle_core::DType::BF16).unwrap();
        let from_f32 = apply(&x16.to_dtype(candle_core::DType::F32).unwrap(), QuickGelu).unwrap();
        let from_bf16 = apply(&x16, QuickGelu).unwrap();
        assert_eq!(from_bf16.dtype(), candle_core::DType::BF16);
        let from_bf16 = from_bf16.to_dtype(candle_core::DType::F32).unwrap();
        let diff = (&from_bf16 - &from_f32).unwrap().abs().unwrap();
        let bound = (from_f32.abs().unwrap() * (1.0 / 256.0)).unwrap();
        let over = diff
            .gt(&bound)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<u8>()
            .unwrap();
        assert_eq!(
            over, 0,
            "values further than one bf16 rounding from the f32 result"
        );
    }
}
