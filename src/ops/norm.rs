//! Group normalisation (Wu & He 2018, eq. 1-2 with groups of channels) as one fused op with a
//! hand-written backward. candle-nn's GroupNorm is a chain of ten tensor ops, each a full pass
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
        let mut out = vec![0f32; x.len()];
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
        let channels = weight.dim(0)?;
        let affine = Tensor::cat(&[weight, bias], 0)?;
        let grads = x.contiguous()?.apply_op3_no_bwd(
            &grad.contiguous()?,
            &affine,
            &GroupNormBackward { norm: *self },
        )?;
        let n = x.elem_count();
        let dx = grads.narrow(0, 0, n)?.reshape(x.shape())?;
        let dweight = grads.narrow(0, n, channels)?;
        let dbias = grads.narrow(0, n + channels, channels)?;
        Ok((Some(dx), Some(dweight), Some(dbias)))
    }
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
        let mut out = vec![0f32; n + 2 * g.channels];
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
