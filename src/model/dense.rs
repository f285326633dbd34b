//! Linear layers, y = x W^T + b, holding their weight in the form the fastest product on this
//! machine reads: as loaded, transposed once for an f32 model's inference on the CPU (the gemm
//! crate reads it in place), or packed once for the bf16 pair-dot kernel (`ops::gemm_bf16`)
//! when a bf16 model runs on a CPU with AVX512_BF16, in place of the loaded weight; or as 8-bit
//! integers with a scale per output (`ops::q8`) where the weights offer them.

use crate::ops::linear::AffineF32;
use crate::ops::{gemm_bf16, q8};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

#[derive(Debug, Clone)]
pub enum Dense {
    Plain(Linear),
    TransposedF32(AffineF32),
    PackedBf16(PackedLinear),
    Quantized(QuantizedLinear),
}

/// A linear layer `in_dim -> out_dim` with a bias, read from `vb` (`weight`, `bias`): 8-bit
/// where `vb` offers `weight_scale` beside the weight (a q8 file, or any file loaded with
/// `--dtype q8`), else as stored.
/// A new layer's parameters (a training `VarMap`) start as `candle_nn::linear`'s do, drawn in
/// the same order: Kaiming normal weights, then biases uniform in +-1/sqrt(in_dim).
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Dense> {
    load(in_dim, out_dim, true, vb)
}

/// [`linear`] without a bias.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Dense> {
    load(in_dim, out_dim, false, vb)
}

fn load(in_dim: usize, out_dim: usize, with_bias: bool, vb: VarBuilder) -> Result<Dense> {
    let init = candle_nn::init::DEFAULT_KAIMING_NORMAL;
    let bound = 1.0 / (in_dim as f64).sqrt();
    let bias = |vb: &VarBuilder| -> Result<Option<Tensor>> {
        let init = candle_nn::Init::Uniform {
            lo: -bound,
            up: bound,
        };
        with_bias
            .then(|| vb.get_with_hints(out_dim, "bias", init))
            .transpose()
    };
    if vb.contains_tensor(q8::SCALE_NAME) {
        let bytes = vb.get_with_hints_dtype((out_dim, in_dim), "weight", init, DType::U8)?;
        let scales = vb.get_with_hints_dtype(out_dim, q8::SCALE_NAME, init, DType::F32)?;
        return QuantizedLinear::new(bytes, scales, bias(&vb)?).map(Dense::Quantized);
    }
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", init)?;
    Ok(Linear::new(weight, bias(&vb)?).into())
}

/// A linear layer with q8 weights: offset bytes, packed for the bf16 kernels where the CPU has
/// the pair dot product (widened per call), else as loaded (dequantized per call).
#[derive(Debug, Clone)]
pub struct QuantizedLinear {
    bytes: Tensor,
    packed: bool,
    scales: Tensor,
    scale_values: Vec<f32>,
    bias: Option<Tensor>,
    bias_values: Option<Vec<f32>>,
    in_features: usize,
    out_features: usize,
}

impl QuantizedLinear {
    /// From offset bytes (out, in) and their per-output scales.
    pub fn new(bytes: Tensor, scales: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = bytes.dims2()?;
        let packed = bytes.device().is_cpu() && gemm_bf16::dot_available();
        Ok(Self {
            bytes: match packed {
                true => gemm_bf16::pack_linear_weight_q8(&bytes)?,
                false => bytes,
            },
            packed,
            scale_values: scales.to_dtype(DType::F32)?.to_vec1()?,
            scales,
            bias_values: gemm_bf16::bias_values(bias.as_ref())?,
            bias,
            in_features,
            out_features,
        })
    }

    /// The f32 weight (out, in) the bytes and scales stand for.
    fn dequantized(&self) -> Result<Tensor> {
        if !self.packed {
            return q8::dequantize(&self.bytes, &self.scales);
        }
        let words = gemm_bf16::widened(&self.bytes)?;
        let integers =
            gemm_bf16::unpack_linear_weight(&words, self.in_features, self.out_features)?;
        q8::scale_rows(&integers, &self.scales)
    }
}

#[derive(Debug, Clone)]
pub struct PackedLinear {
    /// `gemm_bf16::pack_linear_weight` of the weight.
    words: Tensor,
    bias: Option<Tensor>,
    bias_values: Option<Vec<f32>>,
    in_features: usize,
    out_features: usize,
}

/// Whether a loaded layer is held transposed: an f32 CPU weight that no optimiser updates.
fn transposes_weight(weight: &Tensor) -> bool {
    weight.dtype() == DType::F32
        && weight.device().is_cpu()
        && !weight.is_variable()
        && weight.rank() == 2
}

impl From<Linear> for Dense {
    /// Packs a bf16 CPU layer where the CPU has the pair dot product and transposes an f32 CPU
    /// inference layer; any other stays as it is.
    fn from(layer: Linear) -> Self {
        let weight = layer.weight();
        if transposes_weight(weight) {
            if let Ok(affine) = AffineF32::new(weight, layer.bias().cloned()) {
                return Self::TransposedF32(affine);
            }
        }
        if !gemm_bf16::packs_weight(weight) {
            return Self::Plain(layer);
        }
        let packed = (|| -> Result<PackedLinear> {
            let (out_features, in_features) = weight.dims2()?;
            Ok(PackedLinear {
                words: gemm_bf16::pack_linear_weight(weight)?,
                bias: layer.bias().cloned(),
                bias_values: gemm_bf16::bias_values(layer.bias())?,
                in_features,
                out_features,
            })
        })();
        match packed {
            Ok(packed) => Self::PackedBf16(packed),
            Err(_) => Self::Plain(layer),
        }
    }
}

impl Dense {
    /// (out features, in features).
    pub fn dims(&self) -> Result<(usize, usize)> {
        match self {
            Self::Plain(layer) => layer.weight().dims2(),
            Self::TransposedF32(t) => t.features().map(|(i, o)| (o, i)),
            Self::PackedBf16(p) => Ok((p.out_features, p.in_features)),
            Self::Quantized(q) => Ok((q.out_features, q.in_features)),
        }
    }

    /// Whether its products run in the bf16 pair-dot kernels (a packed bf16 or q8 weight).
    pub fn bf16_products(&self) -> bool {
        match self {
            Self::Plain(_) | Self::TransposedF32(_) => false,
            Self::PackedBf16(_) => true,
            Self::Quantized(q) => q.packed,
        }
    }

    /// The layer with its weight as loaded (unpacked where packed).
    fn plain(&self) -> Result<Linear> {
        match self {
            Self::Plain(layer) => Ok(layer.clone()),
            Self::TransposedF32(t) => Ok(Linear::new(t.weight()?, t.bias.clone())),
            Self::PackedBf16(p) => {
                let weight =
                    gemm_bf16::unpack_linear_weight(&p.words, p.in_features, p.out_features)?
                        .to_device(p.words.device())?;
                Ok(Linear::new(weight, p.bias.clone()))
            }
            Self::Quantized(q) => Ok(Linear::new(q.dequantized()?, q.bias.clone())),
        }
    }
}

impl Dense {
    /// The layer for inputs of a few hundred rows at most (a text encoder's tokens, the keys and
    /// values of cross-attention): an f32 inference layer's weight goes into strips for
    /// `ops::gemm_f32` where the CPU runs it ([`AffineF32::in_strips`]); others stay as they are.
    pub fn for_short_inputs(self) -> Result<Self> {
        match self {
            Self::TransposedF32(t) => Ok(Self::TransposedF32(t.in_strips()?)),
            other => Ok(other),
        }
    }

    /// The packed weight and the bf16 kernels' op of a layer whose products run there (a packed
    /// bf16 or q8 weight).
    fn bf16_op(&self) -> Option<(&Tensor, gemm_bf16::LinearBf16)> {
        match self {
            Self::PackedBf16(p) => Some((
                &p.words,
                gemm_bf16::LinearBf16 {
                    in_features: p.in_features,
                    out_features: p.out_features,
                    bias: p.bias_values.clone(),
                    scales: None,
                    residual: None,
                },
            )),
            Self::Quantized(q) if q.packed => Some((
                &q.bytes,
                gemm_bf16::LinearBf16 {
                    in_features: q.in_features,
                    out_features: q.out_features,
                    bias: q.bias_values.clone(),
                    scales: Some(q.scale_values.clone()),
                    residual: None,
                },
            )),
            _ => None,
        }
    }

    /// Whether `x` is an input the packed bf16 and q8 layers take: bf16 or f32 on the CPU,
    /// during inference.
    fn packed_input(x: &Tensor) -> bool {
        x.device().is_cpu() && !x.track_op() && matches!(x.dtype(), DType::BF16 | DType::F32)
    }

    /// `self.forward(x) + residual`: one pass for a layer held transposed (the residual and
    /// bias are the sums gemm adds the product to) or packed (the residual added where the
    /// sums are written out), else the composed ops.
    pub fn forward_plus(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        match self {
            Self::TransposedF32(t) if x.dtype() == DType::F32 && residual.dtype() == DType::F32 => {
                t.forward_plus(x, residual)
            }
            _ if Self::packed_input(x) && !residual.track_op() && residual.dtype() == x.dtype() => {
                match self.bf16_op() {
                    Some((weight, mut op)) => {
                        op.residual = Some(residual.contiguous()?);
                        x.contiguous()?.apply_op2_no_bwd(weight, &op)
                    }
                    None => self.forward(x)? + residual,
                }
            }
            _ => self.forward(x)? + residual,
        }
    }
}

impl Module for Dense {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some((weight, op)) = Self::packed_input(x).then(|| self.bf16_op()).flatten() {
            return x.contiguous()?.apply_op2_no_bwd(weight, &op);
        }
        match self {
            Self::Plain(layer) if layer.weight().dtype() == x.dtype() => layer.forward(x),
            Self::TransposedF32(t) if x.dtype() == DType::F32 => t.forward(x),
            // Weights of another dtype than the activations (a bf16 model keeping f32
            // activations, or a packed layer asked for a gradient): widened to theirs.
            _ => {
                let layer = self.plain()?;
                let to_x = |t: &Tensor| t.to_dtype(x.dtype());
                Linear::new(to_x(layer.weight())?, layer.bias().map(to_x).transpose()?).forward(x)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tensor::seeded_randn;

    /// An f32 inference layer is held transposed and computes what the loaded layer computes
    /// for inputs of rank 2 to 4, passing gradients to a tracked input; a training variable
    /// stays as it is.
    #[test]
    fn transposed_f32_layers_compute_what_the_loaded_layer_computes() {
        let weight = seeded_randn(&[24, 40], 6);
        let bias = seeded_randn(&[24], 7);
        let layer = Linear::new(weight.clone(), Some(bias.clone()));
        let dense = Dense::from(layer.clone());
        assert!(matches!(dense, Dense::TransposedF32(_)));
        assert_eq!(dense.dims().unwrap(), (24, 40));
        for shape in [vec![5, 40], vec![3, 7, 40], vec![2, 3, 5, 40]] {
            let x = seeded_randn(&shape, 8);
            let (got, want) = (dense.forward(&x).unwrap(), layer.forward(&x).unwrap());
            assert_eq!(got.dims(), want.dims());
            let err = crate::ops::tensor::max_abs(&(got - &want).unwrap()).unwrap();
            assert!(err < 1e-5, "{shape:?}: {err}");
        }
        let x = candle_core::Var::from_tensor(&seeded_randn(&[3, 40], 9)).unwrap();
        let grads = dense
            .forward(x.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let want = weight
            .sum(0)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .broadcast_as((3, 40))
            .unwrap();
        let err = crate::ops::tensor::max_abs(&(grads.get(&x).unwrap() - want).unwrap()).unwrap();
        assert!(err < 1e-5, "input gradient off by {err}");
        let trained = candle_core::Var::from_tensor(&weight).unwrap();
        let trained = Dense::from(Linear::new(trained.as_tensor().clone(), None));
        assert!(matches!(trained, Dense::Plain(_)));
    }

    /// A bf16 layer gives the same outputs however it is held: packed (CPU with AVX512_BF16),
    /// unpacked again for an input that asks for a gradient, or as loaded.
    #[test]
    fn packed_layers_compute_what_the_loaded_layer_computes() {
        let weight = seeded_randn(&[40, 96], 1).to_dtype(DType::BF16).unwrap();
        let bias = seeded_randn(&[40], 2).to_dtype(DType::BF16).unwrap();
        let layer = Linear::new(weight.clone(), Some(bias.clone()));
        let dense = Dense::from(layer.clone());
        assert_eq!(
            matches!(dense, Dense::PackedBf16(_)),
            gemm_bf16::dot_available()
        );
        assert_eq!(dense.dims().unwrap(), (40, 96));
        let x = seeded_randn(&[3, 7, 96], 3);
        let widened = Linear::new(
            weight.to_dtype(DType::F32).unwrap(),
            Some(bias.to_dtype(DType::F32).unwrap()),
        );
        let want = widened.forward(&x).unwrap();
        let scale = crate::ops::tensor::max_abs(&want).unwrap();
        let tracked = candle_core::Var::from_tensor(&x).unwrap();
        for (what, got) in [
            ("f32 input", dense.forward(&x).unwrap()),
            ("tracked input", dense.forward(tracked.as_tensor()).unwrap()),
        ] {
            assert_eq!(got.dtype(), DType::F32, "{what}");
            let err = crate::ops::tensor::max_abs(&(got - &want).unwrap()).unwrap() / scale;
            // The packed product rounds x to bf16 (2^-9 relative per element).
            assert!(err < 1e-2, "{what}: {err}");
        }
        let bf16_out = dense.forward(&x.to_dtype(DType::BF16).unwrap()).unwrap();
        assert_eq!(bf16_out.dtype(), DType::BF16);
    }

    /// `forward_plus` adds the residual as `forward` and an add do, for every way a layer is
    /// held: transposed f32, packed bf16 (f32 and bf16 activations), q8, and a trained layer.
    #[test]
    fn residuals_join_every_kind_of_layer() {
        let weight = seeded_randn(&[40, 96], 11);
        let bias = seeded_randn(&[40], 12);
        let (bytes, scales) = q8::quantize(&weight, "weight").unwrap();
        let to_bf16 = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
        let trained = candle_core::Var::from_tensor(&weight).unwrap();
        let layers = [
            Dense::from(Linear::new(weight.clone(), Some(bias.clone()))),
            Dense::from(Linear::new(to_bf16(&weight), Some(to_bf16(&bias)))),
            Dense::Quantized(QuantizedLinear::new(bytes, scales, Some(bias.clone())).unwrap()),
            Dense::from(Linear::new(trained.as_tensor().clone(), Some(bias.clone()))),
        ];
        let x = seeded_randn(&[3, 7, 96], 13);
        let residual = seeded_randn(&[3, 7, 40], 14);
        for (index, layer) in layers.iter().enumerate() {
            for dtype in [DType::F32, DType::BF16] {
                if dtype == DType::BF16 && index != 1 {
                    continue;
                }
                let (x, residual) = (
                    x.to_dtype(dtype).unwrap(),
                    residual.to_dtype(dtype).unwrap(),
                );
                let want = (layer.forward(&x).unwrap() + &residual).unwrap();
                let got = layer.forward_plus(&x, &residual).unwrap();
                assert_eq!(got.dtype(), dtype);
                let want = want.to_dtype(DType::F32).unwrap();
                let err = crate::ops::tensor::max_abs(
                    &(got.to_dtype(DType::F32).unwrap() - &want).unwrap(),
                )
                .unwrap()
                    / crate::ops::tensor::max_abs(&want).unwrap();
                // bf16 outputs round once where the composed ops round twice.
                let tolerance = if dtype == DType::BF16 { 1e-2 } else { 1e-5 };
                assert!(err < tolerance, "layer {index} {dtype:?}: {err}");
            }
        }
        for layer in &layers[..3] {
            let err = layer
                .forward_plus(&x, &seeded_randn(&[3, 7, 41], 15))
                .unwrap_err();
            assert!(err.to_string().contains("residual"), "{err}");
        }
    }

    /// A q8 layer computes x W_q^T + b with its dequantized weight W_q, whether through the
    /// packed bf16 kernels (CPUs with AVX512_BF16) or dequantized per call (an input that asks
    /// for a gradient; every input on other CPUs).
    #[test]
    fn quantized_layers_compute_with_their_dequantized_weight() {
        let weight = seeded_randn(&[40, 96], 4);
        let bias = seeded_randn(&[40], 5);
        let (bytes, scales) = q8::quantize(&weight, "weight").unwrap();
        let layer = QuantizedLinear::new(bytes.clone(), scales.clone(), Some(bias.clone()));
        let dense = Dense::Quantized(layer.unwrap());
        assert_eq!(dense.bf16_products(), gemm_bf16::dot_available());
        assert_eq!(dense.dims().unwrap(), (40, 96));
        let dequantized = q8::dequantize(&bytes, &scales).unwrap();
        let x = seeded_randn(&[3, 7, 96], 6);
        let want = Linear::new(dequantized, Some(bias)).forward(&x).unwrap();
        let scale = crate::ops::tensor::max_abs(&want).unwrap();
        let tracked = candle_core::Var::from_tensor(&x).unwrap();
        for (what, got, tolerance) in [
            ("f32 input", dense.forward(&x).unwrap(), 1e-2),
            (
                "tracked input",
                dense.forward(tracked.as_tensor()).unwrap(),
                1e-5,
            ),
        ] {
            let err = crate::ops::tensor::max_abs(&(got - &want).unwrap()).unwrap() / scale;
            assert!(err < tolerance, "{what}: {err}");
        }
    }
}
