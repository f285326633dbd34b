//! Group normalisation (Wu & He 2018, eq. 1-2 with groups of channels) and layer normalisation
//! (Ba et al. 2016, eq. 4, over the last dimension) as fused ops with hand-written backward
//! passes. candle-nn's GroupNorm is a chain of ten tensor ops, each a full pass
//! over the activation forward and two or more backward (its broadcast reductions are strided
//! sums); in the pixel-DDPM U-Net that chain cost more than the convolutions.

use super::vector_math::{self, silu, silu_derivative, with_wide_vectors};
use crate::ops::tensor::contiguous_f32;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

/// GroupNorm over (B, C, ...) with a per-channel scale and shift.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
    /// candle-nn's version, for dtypes and devices the fused op does not cover.
    fallback: candle_nn::GroupNorm,
}

/// Loads `weight` and `bias` (C,) as diffusers names them; a fresh (training) model starts at
/// scale 1 and shift 0.
pub fn group_norm(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<GroupNorm> {
    let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.0))?;
    let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.0))?;
    GroupNorm::new(weight, bias, groups, eps)
}

impl GroupNorm {
    pub fn new(weight: Tensor, bias: Tensor, groups: usize, eps: f64) -> Result<Self> {
        let channels = weight.dim(0)?;
        let fallback =
            candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
        Ok(Self {
            weight,
            bias,
            groups,
            eps,
            fallback,
        })
    }
}

impl GroupNorm {
    fn fused(&self, x: &Tensor) -> bool {
        x.device().is_cpu()
            && x.dtype() == DType::F32
            && matches!(self.weight.dtype(), DType::F32 | DType::BF16)
            && x.rank() >= 3
    }

    /// The fused op; bf16 parameters (a bf16 model keeping f32 activations) are widened.
    fn apply(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let widen = |t: &Tensor| t.to_dtype(DType::F32);
        x.contiguous()?.apply_op3(
            &widen(&self.weight)?,
            &widen(&self.bias)?,
            FusedGroupNorm {
                groups: self.groups,
                eps: self.eps,
                silu,
            },
        )
    }

    /// silu(group_norm(x)), the pre-activation of every resnet conv, in one pass (and one pass
    /// backward) where the op is fused.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        if self.fused(x) {
            self.apply(x, true)
        } else {
            self.fallback.forward(x)?.silu()
        }
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.fused(x) {
            self.apply(x, false)
        } else {
            self.fallback.forward(x)
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct FusedGroupNorm {
    groups: usize,
    eps: f64,
    /// Apply SiLU to the normalised output.
    silu: bool,
}

/// The shape of one call: batch, channels, values per channel.
struct Geometry {
    batch: usize,
    channels: usize,
    spatial: usize,
}

impl FusedGroupNorm {
    fn geometry(&self, shape: &Shape) -> Result<Geometry> {
        let dims = shape.dims();
        let (batch, channels) = (dims[0], dims[1]);
        if channels % self.groups != 0 {
            candle_core::bail!(
                "group norm: {} groups do not divide {channels} channels",
                self.groups
            )
        }
        Ok(Geometry {
            batch,
            channels,
            spatial: dims[2..].iter().product(),
        })
    }

    /// Mean and 1/sqrt(var + eps) of one group's values (biased variance, as PyTorch).
    #[inline(always)]
    fn moments(&self, values: &[f32]) -> (f32, f32) {
        let n = values.len() as f64;
        let mean = vector_math::sum(values) / n;
        let var = vector_math::sum_squared_deviations(values, mean) / n;
        (mean as f32, (1.0 / (var + self.eps).sqrt()) as f32)
    }
}

impl CustomOp3 for FusedGroupNorm {
    fn name(&self) -> &'static str {
        "group-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.geometry(x_layout.shape())?;
        let x = contiguous_f32(x, x_layout, "group norm", "the input")?;
        let weight = contiguous_f32(weight, weight_layout, "group norm", "the weight")?;
        let bias = contiguous_f32(bias, bias_layout, "group norm", "the bias")?;
        let per_group = g.channels / self.groups;
        let group_len = per_group * g.spatial;
        // SAFETY: each group's chunk is written channel by channel below.
        let mut out = unsafe { super::tensor::unwritten_f32(x.len()) };
        out.par_chunks_mut(group_len)
            .zip(x.par_chunks(group_len))
            .enumerate()
            .for_each(|(index, (y, values))| {
                with_wide_vectors(
                    #[inline(always)]
                    || {
                        let (mean, rstd) = self.moments(values);
                        let first_channel = (index % self.groups) * per_group;
                        for (k, (y, v)) in y
                            .chunks_mut(g.spatial)
                            .zip(values.chunks(g.spatial))
                            .enumerate()
                        {
                            let scale = rstd * weight[first_channel + k];
                            let shift = bias[first_channel + k] - mean * scale;
                            if self.silu {
                                for (y, v) in y.iter_mut().zip(v) {
                                    *y = silu(v * scale + shift);
                                }
                            } else {
                                for (y, v) in y.iter_mut().zip(v) {
                                    *y = v * scale + shift;
                                }
                            }
                        }
                    },
                )
            });
        Ok((CpuStorage::F32(out), x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let affine = Tensor::cat(&[weight, bias], 0)?;
        let grads = x.contiguous()?.apply_op3_no_bwd(
            &grad.contiguous()?,
            &affine,
            &GroupNormBackward { norm: *self },
        )?;
        split_gradients(&grads, x, weight, bias)
    }
}

/// The three gradients of a norm from its backward op's flat [dx, dweight, dbias], each shaped
/// as its tensor.
fn split_gradients(
    grads: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let (n, width) = (x.elem_count(), weight.elem_count());
    let dx = grads.narrow(0, 0, n)?.reshape(x.shape())?;
    let dweight = grads.narrow(0, n, width)?.reshape(weight.shape())?;
    let dbias = grads.narrow(0, n + width, width)?.reshape(bias.shape())?;
    Ok((Some(dx), Some(dweight), Some(dbias)))
}

/// The backward pass on (x, dy, [weight, bias]); returns [dx, dweight, dbias] flat. With SiLU
/// fused, dy is first multiplied by silu'(xhat weight + bias). Then with xhat = (x - mean) rstd
/// and g = dy * weight: dx = rstd (g - mean(g) - xhat mean(g xhat)) over each group,
/// dweight = sum dy xhat, dbias = sum dy over batch and positions.
struct GroupNormBackward {
    norm: FusedGroupNorm,
}

impl CustomOp3 for GroupNormBackward {
    fn name(&self) -> &'static str {
        "group-norm-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        dy: &CpuStorage,
        dy_layout: &Layout,
        affine: &CpuStorage,
        affine_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.norm.geometry(x_layout.shape())?;
        let x = contiguous_f32(x, x_layout, "group norm", "the input")?;
        let dy = contiguous_f32(dy, dy_layout, "group norm", "the output gradient")?;
        let affine = contiguous_f32(affine, affine_layout, "group norm", "weight and bias")?;
        let (weight, bias) = affine.split_at(g.channels);
        let n = x.len();
        let groups = self.norm.groups;
        let per_group = g.channels / groups;
        let group_len = per_group * g.spatial;
        // Per (batch, channel): sum dy and sum dy xhat, reduced over the batch afterwards.
        let mut partial = vec![0f64; 2 * g.batch * g.channels];
        // SAFETY: every group's dx is written below, and both affine gradients after it.
        let mut out = unsafe { super::tensor::unwritten_f32(n + 2 * g.channels) };
        out[..n]
            .par_chunks_mut(group_len)
            .zip(partial.par_chunks_mut(2 * per_group))
            .enumerate()
            .for_each_init(Vec::new, |through_silu, (index, (dx, sums))| {
                with_wide_vectors(
                    #[inline(always)]
                    || {
                        let values = &x[index * group_len..][..group_len];
                        let incoming = &dy[index * group_len..][..group_len];
                        let (mean, rstd) = self.norm.moments(values);
                        let first_channel = (index % groups) * per_group;
                        let channel_range = |k: usize| k * g.spatial..(k + 1) * g.spatial;
                        // Through the SiLU first: dL/dh with h = xhat weight + bias.
                        let grads: &[f32] = if self.norm.silu {
                            through_silu.resize(group_len, 0.0);
                            for k in 0..per_group {
                                let scale = rstd * weight[first_channel + k];
                                let shift = bias[first_channel + k] - mean * scale;
                                let range = channel_range(k);
                                for ((d, dh), v) in through_silu[range.clone()]
                                    .iter_mut()
                                    .zip(&incoming[range.clone()])
                                    .zip(&values[range])
                                {
                                    *d = dh * silu_derivative(v * scale + shift);
                                }
                            }
                            through_silu
                        } else {
                            incoming
                        };
                        let (mut sum_g, mut sum_g_xhat) = (0f64, 0f64);
                        for k in 0..per_group {
                            let range = channel_range(k);
                            let (s_dy, s_dy_x) =
                                vector_math::sum_and_dot(&grads[range.clone()], &values[range]);
                            // sum dy xhat = rstd (sum dy x - mean sum dy).
                            let s_dy_xhat = rstd as f64 * (s_dy_x - mean as f64 * s_dy);
                            sums[2 * k] = s_dy;
                            sums[2 * k + 1] = s_dy_xhat;
                            let w = weight[first_channel + k] as f64;
                            sum_g += w * s_dy;
                            sum_g_xhat += w * s_dy_xhat;
                        }
                        let mean_g = (sum_g / group_len as f64) as f32;
                        let mean_g_xhat = (sum_g_xhat / group_len as f64) as f32;
                        // dx = rstd (dy w - mean_g - (x - mean) rstd mean_g_xhat), as dy a + x b + c.
                        let per_x = -rstd * rstd * mean_g_xhat;
                        let constant = rstd * (mean * rstd * mean_g_xhat - mean_g);
                        for k in 0..per_group {
                            let per_dy = rstd * weight[first_channel + k];
                            let range = channel_range(k);
                            for ((dx, d), v) in dx[range.clone()]
                                .iter_mut()
                                .zip(&grads[range.clone()])
                                .zip(&values[range])
                            {
                                *dx = d * per_dy + v * per_x + constant;
                            }
                        }
                    },
                )
            });
        let (dweight, dbias) = out[n..].split_at_mut(g.channels);
        for c in 0..g.channels {
            let (mut total_dy, mut total_dy_xhat) = (0f64, 0f64);
            for b in 0..g.batch {
                let at = 2 * (b * g.channels + c);
                total_dy += partial[at];
                total_dy_xhat += partial[at + 1];
            }
            dbias[c] = total_dy as f32;
            dweight[c] = total_dy_xhat as f32;
        }
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

/// Layer normalisation of f32 CPU rows (the last dimension) with a per-feature scale and shift,
/// y = (x - mean) rstd weight + bias, and its backward pass: composed from candle's ops it is
/// seven passes forward and more than a dozen backward, two of them strided sums over the rows.
pub fn layer_norm_rows(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(weight, bias, FusedLayerNorm { eps })
}

#[derive(Debug, Clone, Copy)]
struct FusedLayerNorm {
    eps: f64,
}

/// Rows per task of the layer norm's backward pass, each task with its own partial sums of the
/// weight and bias gradients.
const LAYER_NORM_ROWS: usize = 64;

impl FusedLayerNorm {
    /// Mean and 1/sqrt(var + eps) of one row (biased variance, as PyTorch).
    #[inline(always)]
    fn moments(&self, row: &[f32]) -> (f32, f32) {
        let n = row.len() as f64;
        let mean = vector_math::sum(row) / n;
        let var = vector_math::sum_squared_deviations(row, mean) / n;
        (mean as f32, (1.0 / (var + self.eps).sqrt()) as f32)
    }

    /// The row width, which the weight and bias must match.
    fn width(x: &Layout, weight: &Layout, bias: &Layout) -> Result<usize> {
        let width = *x.shape().dims().last().unwrap_or(&1);
        if weight.shape().elem_count() != width || bias.shape().elem_count() != width {
            candle_core::bail!(
                "layer norm: weight {:?} and bias {:?} must have the input's last dimension {width}",
                weight.shape(),
                bias.shape()
            )
        }
        Ok(width)
    }
}

impl CustomOp3 for FusedLayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let width = Self::width(x_layout, weight_layout, bias_layout)?;
        let x = contiguous_f32(x, x_layout, "layer norm", "the input")?;
        let weight = contiguous_f32(weight, weight_layout, "layer norm", "the weight")?;
        let bias = contiguous_f32(bias, bias_layout, "layer norm", "the bias")?;
        // SAFETY: each row of `width` values is written below (no rows when `width` is 0).
        let mut out = unsafe { super::tensor::unwritten_f32(x.len()) };
        if width > 0 {
            out.par_chunks_mut(width)
                .zip(x.par_chunks(width))
                .for_each(|(y, row)| {
                    with_wide_vectors(
                        #[inline(always)]
                        || {
                            let (mean, rstd) = self.moments(row);
                            for (((y, v), w), b) in y.iter_mut().zip(row).zip(weight).zip(bias) {
                                *y = (v - mean) * rstd * w + b;
                            }
                        },
                    )
                });
        }
        Ok((CpuStorage::F32(out), x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grads = x.contiguous()?.apply_op3_no_bwd(
            &grad.contiguous()?,
            &weight.contiguous()?,
            &LayerNormBackward { norm: *self },
        )?;
        split_gradients(&grads, x, weight, bias)
    }
}

/// The layer norm's backward pass on (x, dy, weight); returns [dx, dweight, dbias] flat. With
/// xhat = (x - mean) rstd and g = dy weight over a row: dx = rstd (g - mean(g) - xhat
/// mean(g xhat)); dweight = sum dy xhat and dbias = sum dy over the rows.
struct LayerNormBackward {
    norm: FusedLayerNorm,
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        dy: &CpuStorage,
        dy_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let width = FusedLayerNorm::width(x_layout, weight_layout, weight_layout)?;
        let x = contiguous_f32(x, x_layout, "layer norm", "the input")?;
        let dy = contiguous_f32(dy, dy_layout, "layer norm", "the output gradient")?;
        let weight = contiguous_f32(weight, weight_layout, "layer norm", "the weight")?;
        if dy.len() != x.len() {
            candle_core::bail!(
                "layer norm: output gradient {:?} does not fit the input {:?}",
                dy_layout.shape(),
                x_layout.shape()
            )
        }
        let n = x.len();
        if width == 0 {
            return Ok((CpuStorage::F32(Vec::new()), Shape::from(n)));
        }
        // SAFETY: every row's dx is written below; the affine gradients are zeroed here and
        // summed into.
        let mut out = unsafe { super::tensor::unwritten_f32(n + 2 * width) };
        out[n..].fill(0.0);
        let block = LAYER_NORM_ROWS * width;
        // Per task: sum dy xhat and sum dy for each feature, added up afterwards.
        let partials: Vec<Vec<f32>> = out[..n]
            .par_chunks_mut(block)
            .zip(x.par_chunks(block).zip(dy.par_chunks(block)))
            .map(|(dx_block, (x_block, dy_block))| {
                let mut sums = vec![0f32; 2 * width];
                with_wide_vectors(
                    #[inline(always)]
                    || {
                        let (dweight, dbias) = sums.split_at_mut(width);
                        for ((dx, row), incoming) in dx_block
                            .chunks_exact_mut(width)
                            .zip(x_block.chunks_exact(width))
                            .zip(dy_block.chunks_exact(width))
                        {
                            let (mean, rstd) = self.norm.moments(row);
                            let (mut sum_g, mut sum_g_xhat) = (0f32, 0f32);
                            for ((((v, d), w), dw), db) in row
                                .iter()
                                .zip(incoming)
                                .zip(weight)
                                .zip(dweight.iter_mut())
                                .zip(dbias.iter_mut())
                            {
                                let xhat = (v - mean) * rstd;
                                let g = d * w;
                                sum_g += g;
                                sum_g_xhat += g * xhat;
                                *dw += d * xhat;
                                *db += d;
                            }
                            let mean_g = sum_g / width as f32;
                            let mean_g_xhat = sum_g_xhat / width as f32;
                            for (((dx, v), d), w) in
                                dx.iter_mut().zip(row).zip(incoming).zip(weight)
                            {
                                let xhat = (v - mean) * rstd;
                                *dx = rstd * (d * w - mean_g - xhat * mean_g_xhat);
                            }
                        }
                    },
                );
                sums
            })
            .collect();
        let (dweight, dbias) = out[n..].split_at_mut(width);
        for sums in &partials {
            for (total, part) in dweight.iter_mut().zip(&sums[..width]) {
                *total += part;
            }
            for (total, part) in dbias.iter_mut().zip(&sums[width..]) {
                *total += part;
            }
        }
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn seeded(shape: &[usize], seed: u64) -> Tensor {
        crate::sampler::noise::SeededNoise::new(seed)
            .randn(shape)
            .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        crate::ops::tensor::max_abs(&(a - b).unwrap()).unwrap()
    }

    /// Forward values and all three gradients equal layer normalisation composed from candle's
    /// ops, over rows wider than a vector with a tail and over more rows than one task.
    #[test]
    fn layer_norm_matches_composed_ops_forward_and_backward() {
        for (shape, seed) in [(vec![2, 3, 21], 10u64), (vec![150, 9], 20)] {
            let width = *shape.last().unwrap();
            let x = Var::from_tensor(&seeded(&shape, seed).affine(3.0, 1.0).unwrap()).unwrap();
            let weight = Var::from_tensor(&seeded(&[width], seed + 1)).unwrap();
            let bias = Var::from_tensor(&seeded(&[width], seed + 2)).unwrap();
            let eps = 1e-5;
            let composed = {
                let mean = x.mean_keepdim(candle_core::D::Minus1).unwrap();
                let centred = x.broadcast_sub(&mean).unwrap();
                let var = centred
                    .sqr()
                    .unwrap()
                    .mean_keepdim(candle_core::D::Minus1)
                    .unwrap();
                centred
                    .broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
                    .unwrap()
                    .broadcast_mul(&weight)
                    .unwrap()
                    .broadcast_add(&bias)
                    .unwrap()
            };
            let fused = layer_norm_rows(&x, &weight, &bias, eps).unwrap();
            assert!(max_diff(&fused, &composed) < 1e-5);
            let probe = seeded(&shape, seed + 3);
            let grads = |out: &Tensor| {
                (out * &probe)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap()
            };
            let (g_fused, g_composed) = (grads(&fused), grads(&composed));
            for (name, var) in [("x", &x), ("weight", &weight), ("bias", &bias)] {
                let d = max_diff(g_fused.get(var).unwrap(), g_composed.get(var).unwrap());
                assert!(d < 1e-4, "d{name} differs by {d} for {shape:?}");
            }
        }
    }

    /// Forward values and all three gradients equal candle-nn's composed GroupNorm.
    #[test]
    fn matches_candle_nn_forward_and_backward() {
        let x = Var::from_tensor(&seeded(&[3, 8, 5, 4], 1).affine(2.0, 0.5).unwrap()).unwrap();
        let weight = Var::from_tensor(&seeded(&[8], 2)).unwrap();
        let bias = Var::from_tensor(&seeded(&[8], 3)).unwrap();
        let reference = candle_nn::GroupNorm::new(
            weight.as_tensor().clone(),
            bias.as_tensor().clone(),
            8,
            4,
            1e-5,
        )
        .unwrap()
        .forward(&x)
        .unwrap();
        let ours = GroupNorm::new(
            weight.as_tensor().clone(),
            bias.as_tensor().clone(),
            4,
            1e-5,
        )
        .unwrap()
        .forward(&x)
        .unwrap();
        assert!(max_diff(&ours, &reference) < 1e-5);
        let probe = seeded(&[3, 8, 5, 4], 4);
        let g_ref = (&reference * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_ours = (&ours * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for var in [&x, &weight, &bias] {
            let d = max_diff(g_ours.get(var).unwrap(), g_ref.get(var).unwrap());
            assert!(d < 1e-4, "{d}");
        }
        // With SiLU fused: the same as candle-nn's GroupNorm followed by candle's silu.
        let reference = reference.silu().unwrap();
        let ours = GroupNorm::new(
            weight.as_tensor().clone(),
            bias.as_tensor().clone(),
            4,
            1e-5,
        )
        .unwrap()
        .forward_silu(&x)
        .unwrap();
        assert!(max_diff(&ours, &reference) < 1e-5);
        let g_ref = (&reference * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_ours = (&ours * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for var in [&x, &weight, &bias] {
            let d = max_diff(g_ours.get(var).unwrap(), g_ref.get(var).unwrap());
            assert!(d < 1e-4, "silu: {d}");
        }
        let _ = Device::Cpu;
    }
}
