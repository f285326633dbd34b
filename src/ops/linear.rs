//! `y = x W^T + b (+ r)` for f32 CPU inference layers (`model::dense`'s transposed layers): the
//! bias, and the residual the layer's output joins, are written into the output first and the
//! product (the gemm crate's, or `gemm_f32`'s strips) is added to them. Composed ops would run
//! the product into a fresh buffer and then one or two element-wise passes over it, each a new
//! buffer and each a wake-up of candle's worker pool, whose spinning afterwards takes a core
//! from the next product (11-12% of the CLIP text encoder's profile on two cores).

use super::gemm_f32::StripsF32;
use super::tensor::{contiguous_f32, storage_f32};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// An f32 inference layer: its weight in the form its product reads, and its bias (out).
#[derive(Debug, Clone)]
pub struct AffineF32 {
    weight: AffineWeight,
    pub bias: Option<Tensor>,
}

#[derive(Debug, Clone)]
enum AffineWeight {
    /// `W^T` (in x out, contiguous), read by the gemm crate where it lies, where the loaded
    /// (out, in) weight would be copied into panels at every call: for a short sequence (the
    /// text encoder's 2 x 77 tokens) that copy was a quarter of the time (a 154 x 3072 by
    /// 3072 x 768 product 6.4 ms, 3.3 ms transposed).
    Transposed(Tensor),
    /// `W^T` in strips for `ops::gemm_f32`, which reads the input in place.
    Strips(Arc<StripsF32>),
}

impl AffineF32 {
    /// The layer `x W^T + b` of a weight (out, in), held transposed.
    pub fn new(weight: &Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self {
            weight: AffineWeight::Transposed(weight.t()?.contiguous()?),
            bias,
        })
    }

    /// The same layer with its weight in strips for `ops::gemm_f32` where the CPU runs that
    /// kernel, else as it is. For inputs of a few hundred rows (text tokens) the strip kernel
    /// runs 10-25% faster than the gemm crate, which copies such an input into panels with a
    /// strided gather at every call; over thousands of rows (an image's tokens) gemm is faster
    /// (2-core Xeon with AVX-512: 154 x 768 by 768 x 3072 2.19 ms against 2.34 ms, 8192 x 320
    /// by 320 x 1280 20.4 ms against 18.1 ms).
    pub fn in_strips(self) -> Result<Self> {
        let AffineWeight::Transposed(weight_t) = &self.weight else {
            return Ok(self);
        };
        if !super::gemm_f32::available() {
            return Ok(self);
        }
        let (in_features, out_features) = weight_t.dims2()?;
        let (storage, layout) = weight_t.storage_and_layout();
        let values = storage_f32(&storage, layout, "affine-f32", "the weight")?;
        let strips = StripsF32::new(values, in_features, out_features)?;
        Ok(Self {
            weight: AffineWeight::Strips(Arc::new(strips)),
            bias: self.bias,
        })
    }

    /// The weight (out, in).
    pub fn weight(&self) -> Result<Tensor> {
        match &self.weight {
            AffineWeight::Transposed(weight_t) => weight_t.t()?.contiguous(),
            AffineWeight::Strips(strips) => {
                let (in_features, out_features) = strips.dims();
                Tensor::from_vec(
                    strips.weight(),
                    (out_features, in_features),
                    &candle_core::Device::Cpu,
                )
            }
        }
    }

    /// `x W^T + b` for `x` (..., in) f32 on the CPU, with its gradient for `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.contiguous()?.apply_op1(self.clone())
    }

    /// `x W^T + b + residual`, `residual` of the output's shape, with gradients for both.
    pub fn forward_plus(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        x.contiguous()?
            .apply_op2(&residual.contiguous()?, ResidualAffineF32(self.clone()))
    }

    /// (in features, out features).
    pub fn features(&self) -> Result<(usize, usize)> {
        match &self.weight {
            AffineWeight::Transposed(weight_t) => weight_t.dims2(),
            AffineWeight::Strips(strips) => Ok(strips.dims()),
        }
    }

    /// The output shape for an input of `shape`, checked against the layer.
    fn output_shape(&self, shape: &Shape, op: &str) -> Result<(usize, Shape)> {
        let (in_features, out_features) = self.features()?;
        let mut dims = shape.dims().to_vec();
        match dims.last_mut() {
            Some(last) if *last == in_features => *last = out_features,
            _ => candle_core::bail!(
                "{op}: input {:?} does not end in the layer's {in_features} features",
                shape.dims()
            ),
        }
        let rows = shape.elem_count() / in_features.max(1);
        Ok((rows, Shape::from(dims)))
    }

    /// The output rows: the bias (plus the residual's row) with the product added by gemm.
    fn compute(
        &self,
        x: &[f32],
        rows: usize,
        residual: Option<&[f32]>,
        op: &str,
    ) -> Result<Vec<f32>> {
        let (in_features, out_features) = self.features()?;
        let bias_storage = self.bias.as_ref().map(|b| b.storage_and_layout());
        let bias = match &bias_storage {
            Some((storage, layout)) => Some(storage_f32(storage, layout, op, "the bias")?),
            None => None,
        };
        if bias.as_ref().is_some_and(|b| b.len() != out_features) {
            candle_core::bail!("{op}: the bias does not have the layer's {out_features} outputs")
        }
        // SAFETY: every row is written below (residual plus bias, either alone, or zeros when
        // there is no product), or else by gemm, which writes every element when it does not
        // add to them and k > 0.
        let mut y = unsafe { super::tensor::unwritten_f32(rows * out_features) };
        let accumulate = residual.is_some() || bias.is_some();
        if accumulate || in_features == 0 {
            y.par_chunks_mut(out_features.max(1))
                .enumerate()
                .for_each(|(r, row)| {
                    let residual_row =
                        residual.map(|values| &values[r * out_features..][..row.len()]);
                    match (residual_row, bias) {
                        (Some(values), Some(bias)) => {
                            for ((y, value), b) in row.iter_mut().zip(values).zip(bias.iter()) {
                                *y = value + b;
                            }
                        }
                        (Some(values), None) => row.copy_from_slice(values),
                        (None, Some(bias)) => row.copy_from_slice(bias),
                        (None, None) => row.fill(0.0),
                    }
                });
        }
        match &self.weight {
            AffineWeight::Strips(strips) => strips.product(x, rows, &mut y, accumulate)?,
            AffineWeight::Transposed(weight_t) => {
                let (w_storage, w_layout) = weight_t.storage_and_layout();
                let weight_t = storage_f32(&w_storage, w_layout, op, "the weight")?;
                // SAFETY: x holds rows x in_features, weight_t in_features x out_features and y
                // rows x out_features floats, all row-major; y is borrowed mutably for the call.
                unsafe {
                    super::tensor::matrix_product(
                        (rows, out_features, in_features),
                        y.as_mut_ptr(),
                        (out_features, 1),
                        accumulate,
                        x.as_ptr(),
                        (in_features, 1),
                        weight_t.as_ptr(),
                        (out_features, 1),
                        super::tensor::all_threads(),
                    )
                };
            }
        }
        Ok(y)
    }

    /// The input gradient `dy W` (the weight is not trained: layers held transposed are
    /// inference layers, a frozen base under LoRA included).
    fn input_gradient(&self, grad: &Tensor) -> Result<Tensor> {
        let (in_features, out_features) = self.features()?;
        let mut dims = grad.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = in_features;
        }
        let rows = grad.elem_count() / out_features.max(1);
        let weight = match &self.weight {
            AffineWeight::Transposed(weight_t) => weight_t.t()?,
            AffineWeight::Strips(_) => self.weight()?,
        };
        grad.reshape((rows, out_features))?
            .matmul(&weight)?
            .reshape(dims)
    }
}

impl CustomOp1 for AffineF32 {
    fn name(&self) -> &'static str {
        "affine-f32"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, shape) = self.output_shape(layout.shape(), self.name())?;
        let x = contiguous_f32(storage, layout, self.name(), "the input")?;
        let y = self.compute(x, rows, None, self.name())?;
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        self.input_gradient(grad).map(Some)
    }
}

/// [`AffineF32`] with a residual added: `(x, residual) -> x W^T + b + residual`.
struct ResidualAffineF32(AffineF32);

impl CustomOp2 for ResidualAffineF32 {
    fn name(&self) -> &'static str {
        "residual-affine-f32"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        residual: &CpuStorage,
        residual_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, shape) = self.0.output_shape(x_layout.shape(), self.name())?;
        if residual_layout.shape() != &shape {
            candle_core::bail!(
                "{}: the residual {:?} is not the output's shape {:?}",
                self.name(),
                residual_layout.shape().dims(),
                shape.dims()
            )
        }
        let x = contiguous_f32(x, x_layout, self.name(), "the input")?;
        let residual = contiguous_f32(residual, residual_layout, self.name(), "the residual")?;
        let y = self.0.compute(x, rows, Some(residual), self.name())?;
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _residual: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(self.0.input_gradient(grad)?), Some(grad.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tensor::{probe_gradient, seeded_randn};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .expect("difference")
    }

    /// Output and gradients of the fused layer, its weight transposed or in strips, against the
    /// composed `x.matmul(W^T) + b (+ r)`, with and without a bias, for inputs of rank 2 and 3.
    #[test]
    fn matches_the_composed_layer_and_its_gradients() {
        let weight_t = seeded_randn(&[40, 24], 1);
        let weight = weight_t.t().and_then(|w| w.contiguous()).expect("weight");
        let layers = [Some(seeded_randn(&[24], 2)), None]
            .into_iter()
            .flat_map(|bias| {
                let layer = AffineF32::new(&weight, bias.clone()).expect("layer");
                let strips = layer.clone().in_strips().expect("strips");
                [(layer, bias.clone()), (strips, bias)]
            });
        for (layer, bias) in layers {
            assert_eq!(layer.features().expect("dims"), (40, 24));
            assert!(max_diff(&layer.weight().expect("weight"), &weight) == 0.0);
            for shape in [vec![5, 40], vec![3, 7, 40]] {
                let x = candle_core::Var::from_tensor(&seeded_randn(&shape, 3)).expect("var");
                let mut out_shape = shape.clone();
                out_shape[shape.len() - 1] = 24;
                let r = candle_core::Var::from_tensor(&seeded_randn(&out_shape, 4)).expect("var");
                let composed = |x: &Tensor| -> Tensor {
                    let rows = x.elem_count() / 40;
                    let y = x
                        .reshape((rows, 40))
                        .and_then(|x| x.matmul(&weight_t))
                        .and_then(|y| y.reshape(out_shape.as_slice()))
                        .expect("product");
                    match &bias {
                        Some(b) => y.broadcast_add(b).expect("bias"),
                        None => y,
                    }
                };
                let probe = seeded_randn(&out_shape, 5);
                let want = composed(x.as_tensor());
                let got = layer.forward(x.as_tensor()).expect("fused");
                assert!(max_diff(&got, &want) < 1e-4, "{shape:?}");
                let (dx_got, dx_want) = (
                    probe_gradient(&got, &probe, &x),
                    probe_gradient(&want, &probe, &x),
                );
                assert!(max_diff(&dx_got, &dx_want) < 1e-4, "{shape:?} dx");

                let want = (composed(x.as_tensor()) + r.as_tensor()).expect("sum");
                let got = layer
                    .forward_plus(x.as_tensor(), r.as_tensor())
                    .expect("fused with residual");
                assert!(max_diff(&got, &want) < 1e-4, "{shape:?} residual");
                for var in [&x, &r] {
                    let (g_got, g_want) = (
                        probe_gradient(&got, &probe, var),
                        probe_gradient(&want, &probe, var),
                    );
                    assert!(
                        max_diff(&g_got, &g_want) < 1e-4,
                        "{shape:?} residual gradient"
                    );
                }
            }
        }
    }

    /// An input whose last dimension is not the layer's, or a residual of another shape, is an
    /// error naming what was expected.
    #[test]
    fn names_mismatched_inputs() {
        let layer = AffineF32::new(&seeded_randn(&[4, 8], 1), None).expect("layer");
        let err = layer.forward(&seeded_randn(&[2, 7], 2)).unwrap_err();
        assert!(err.to_string().contains("8 features"), "{err}");
        let err = layer
            .forward_plus(&seeded_randn(&[2, 8], 2), &seeded_randn(&[2, 5], 3))
            .unwrap_err();
        assert!(err.to_string().contains("residual"), "{err}");
    }
}
