//! Layers shared by the U-Net and the VAE, named as diffusers names them.

use super::dense::Dense;
use super::dense::{linear, linear_no_bias};
use super::lora::LoraLinear;
use crate::ops::copy::contiguous;
pub use crate::ops::norm::{group_norm, GroupNorm};
use crate::ops::planes;
use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{conv2d, Conv2dConfig, VarBuilder};

/// Layer normalisation over the last dimension (Ba et al. 2016): in training the fused op of
/// `ops::norm` on f32 CPU tensors, else composed from elementary ops so that it has a backward
/// pass (candle's fused `LayerNorm` has none).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        // Initialised to the identity for fresh models (a zero scale would block every
        // gradient behind it); loaded weights replace both.
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?,
            bias: vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.0))?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !(x.track_op() || self.weight.track_op() || self.bias.track_op()) {
            // Inference: candle's fused kernel (it has no backward, and none is needed).
            let to_x = |t: &Tensor| t.to_dtype(x.dtype());
            return candle_nn::ops::layer_norm(
                &x.contiguous()?,
                &to_x(&self.weight)?,
                &to_x(&self.bias)?,
                self.eps as f32,
            );
        }
        use crate::ops::tensor::is_cpu_f32;
        if is_cpu_f32(x) && is_cpu_f32(&self.weight) && is_cpu_f32(&self.bias) {
            return crate::ops::norm::layer_norm_rows(x, &self.weight, &self.bias, self.eps);
        }
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// Softmax over the last dimension: composed of elementary ops (with a backward pass) when a
/// gradient can flow, candle's fused kernel (which has none) in inference.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.track_op() {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// A 2-D convolution, routed around what candle 0.11 does slowly. On the CPU it is matrix
/// products in place (`conv_gemm`), forward and backward: candle re-lays out input and kernel on
/// one thread at every call, computes the input gradient with a direct transposed-convolution
/// loop, and has no bf16 kernel (bf16 is widened per call). A bf16 kernel of stride 1 on a CPU
/// with AVX512_BF16 is packed once for the pair-dot kernel (`ops::gemm_bf16`), in place of the
/// loaded one. On GPUs, training stacks shifted views (`im2col::conv2d_taps`, for the same input
/// gradient); inference is candle's own.
#[derive(Debug, Clone)]
pub enum Conv2d {
    Plain(candle_nn::Conv2d),
    PackedBf16(Box<PackedConv>),
    Quantized(Box<QuantizedConv>),
}

/// A convolution with a q8 kernel (`ops::q8`): offset bytes packed for the bf16 kernels where
/// the CPU has the pair dot product and the convolution is one they run (stride 1, one group),
/// else as loaded and dequantized per call.
#[derive(Debug, Clone)]
pub struct QuantizedConv {
    bytes: Tensor,
    packed: bool,
    scales: Tensor,
    scale_values: Vec<f32>,
    bias: Option<Tensor>,
    bias_values: Option<Vec<f32>>,
    channels: usize,
    kernel: (usize, usize),
    config: Conv2dConfig,
    /// The dtype of the model's other weights, which its activations follow.
    dtype: DType,
}

impl QuantizedConv {
    fn new(
        bytes: Tensor,
        scales: Tensor,
        bias: Option<Tensor>,
        config: Conv2dConfig,
        dtype: DType,
    ) -> Result<Self> {
        use crate::ops::gemm_bf16;
        let (_, channels, kh, kw) = bytes.dims4()?;
        let packed = bytes.device().is_cpu()
            && gemm_bf16::dot_available()
            && config.stride == 1
            && config.groups == 1
            && config.dilation == 1;
        Ok(Self {
            bytes: match packed {
                true => gemm_bf16::pack_conv_weight_q8(&bytes)?,
                false => bytes,
            },
            packed,
            scale_values: scales.to_dtype(DType::F32)?.to_vec1()?,
            scales,
            bias_values: gemm_bf16::bias_values(bias.as_ref())?,
            bias,
            channels,
            kernel: (kh, kw),
            config,
            dtype,
        })
    }

    /// The f32 kernel the bytes and scales stand for.
    fn dequantized(&self) -> Result<Tensor> {
        use crate::ops::{gemm_bf16, q8};
        if !self.packed {
            return q8::dequantize(&self.bytes, &self.scales);
        }
        let (kh, kw) = self.kernel;
        let words = gemm_bf16::widened(&self.bytes)?;
        let integers = gemm_bf16::unpack_conv_weight(&words, self.channels, kh, kw)?;
        q8::scale_rows(&integers, &self.scales)
    }
}

/// Whether a convolution may hold 8-bit weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// 8-bit where the weights offer it (see [`conv`]).
    Quantizable,
    /// Always the model's float dtype: a convolution on the residual stream itself (the
    /// network's first and last, the resolution changes, the skips that change the channel
    /// count), whose rounding error reaches the output with no normalization to damp it. On
    /// random SD 1.5-shaped weights these 8% of the U-Net's weights take its output's error
    /// against f32 (relative L2, `diffuse bench unet --size 512 --error-against-f32`) from
    /// 3.6% to 4.7% when quantized.
    Float,
}

/// A convolution `cin -> cout` with a square kernel, read from `vb` (`weight`, `bias`): 8-bit
/// where `precision` allows and `vb` offers `weight_scale` beside the kernel (see
/// `dense::linear`), else as stored.
pub fn conv(
    cin: usize,
    cout: usize,
    kernel: usize,
    config: Conv2dConfig,
    bias: bool,
    precision: Precision,
    vb: VarBuilder,
) -> Result<Conv2d> {
    use crate::ops::q8::SCALE_NAME;
    if precision == Precision::Quantizable && vb.contains_tensor(SCALE_NAME) {
        let hints = candle_nn::init::DEFAULT_KAIMING_NORMAL;
        let shape = (cout, cin / config.groups, kernel, kernel);
        let bytes = vb.get_with_hints_dtype(shape, "weight", hints, DType::U8)?;
        let scales = vb.get_with_hints_dtype(cout, SCALE_NAME, hints, DType::F32)?;
        let bias = bias.then(|| vb.get(cout, "bias")).transpose()?;
        return QuantizedConv::new(bytes, scales, bias, config, vb.dtype())
            .map(|q| Conv2d::Quantized(Box::new(q)));
    }
    match bias {
        true => conv2d(cin, cout, kernel, config, vb),
        false => candle_nn::conv2d_no_bias(cin, cout, kernel, config, vb),
    }
    .map(Conv2d::from)
}

#[derive(Debug, Clone)]
pub struct PackedConv {
    /// The kernel as the bf16 products read it: `gemm_bf16::pack_conv_weight`'s words, or a
    /// Winograd convolution's transformed filters (`SameConv3x3::pack_filters_bf16`).
    words: Tensor,
    /// Whether `words` are Winograd filters (see [`runs_winograd`]).
    winograd: bool,
    out_channels: usize,
    bias: Option<Tensor>,
    bias_values: Option<Vec<f32>>,
    channels: usize,
    kernel: (usize, usize),
    config: Conv2dConfig,
}

impl From<candle_nn::Conv2d> for Conv2d {
    fn from(conv: candle_nn::Conv2d) -> Self {
        let (weight, config) = (conv.weight(), conv.config());
        let packable = crate::ops::gemm_bf16::packs_weight(weight)
            && config.stride == 1
            && config.groups == 1
            && config.dilation == 1;
        if !packable {
            return Self::Plain(conv);
        }
        let packed = (|| -> Result<PackedConv> {
            let (out_channels, channels, kh, kw) = weight.dims4()?;
            let winograd = runs_winograd((kh, kw), config);
            Ok(PackedConv {
                words: match winograd {
                    true => winograd_filters(weight)?,
                    false => crate::ops::gemm_bf16::pack_conv_weight(weight)?,
                },
                winograd,
                out_channels,
                bias: conv.bias().cloned(),
                bias_values: crate::ops::gemm_bf16::bias_values(conv.bias())?,
                channels,
                kernel: (kh, kw),
                config: *config,
            })
        })();
        match packed {
            Ok(packed) => Self::PackedBf16(Box::new(packed)),
            Err(_) => Self::Plain(conv),
        }
    }
}

/// Whether a packed bf16 convolution runs by Winograd's F(2x2, 3x3) (`ops::winograd`): a
/// "same" 3x3 one (stride 1, one pixel of padding) on a CPU with AMX tiles, whose sixteen
/// products then read every tile from aligned rows. Its kernel is then held as the transformed
/// filters alone (16 bf16 values a filter where the kernel has 9); on a 2-core Xeon with AMX the
/// SD 1.5 U-Net's and VAE's convolutions ran 1.3-2.5x faster than the direct products
/// (docs/performance.md).
fn runs_winograd(kernel: (usize, usize), config: &Conv2dConfig) -> bool {
    kernel == (3, 3) && config.padding == 1 && crate::ops::amx::tiles_available()
}

/// A "same" 3x3 kernel (O, C, 3, 3) as the Winograd filters of the bf16 products, a U32 tensor.
fn winograd_filters(weight: &Tensor) -> Result<Tensor> {
    let (out_channels, channels, _, _) = weight.dims4()?;
    let conv = crate::ops::winograd::SameConv3x3 {
        batch: 1,
        channels,
        out_channels,
        height: 1,
        width: 1,
    };
    let values = weight
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let words = conv.pack_filters_bf16(&values);
    let len = words.len();
    Tensor::from_vec(words, len, weight.device())
}

impl PackedConv {
    /// The convolution through the Winograd filters, in f32 (the input widened and the output
    /// narrowed back where it is bf16). Inference only: the filters are not the kernel, so no
    /// gradient can flow through them.
    fn winograd_forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.track_op() || !x.device().is_cpu() {
            candle_core::bail!(
                "conv2d: this 3x3 {} -> {} channel bf16 convolution holds Winograd filters for CPU inference, so no gradient can flow through it; load the model in f32 to train through it",
                self.channels,
                self.out_channels
            )
        }
        let op = crate::ops::winograd::WinogradBf16 {
            channels: self.channels,
            out_channels: self.out_channels,
            bias: (self.bias_values.clone()).unwrap_or_else(|| vec![0.0; self.out_channels]),
        };
        let y = x
            .to_dtype(DType::F32)?
            .contiguous()?
            .apply_op2_no_bwd(&self.words, &op)?;
        y.to_dtype(x.dtype())
    }
}

impl Conv2d {
    /// The kernel's dtype.
    pub fn dtype(&self) -> DType {
        match self {
            Self::Plain(conv) => conv.weight().dtype(),
            Self::PackedBf16(_) => DType::BF16,
            Self::Quantized(q) => q.dtype,
        }
    }

    /// The convolution with its kernel as loaded (unpacked where packed).
    fn plain(&self) -> Result<candle_nn::Conv2d> {
        match self {
            Self::Plain(conv) => Ok(conv.clone()),
            Self::PackedBf16(p) if p.winograd => {
                candle_core::bail!("conv2d: a kernel held as Winograd filters has no plain form")
            }
            Self::PackedBf16(p) => {
                let (kh, kw) = p.kernel;
                let weight =
                    crate::ops::gemm_bf16::unpack_conv_weight(&p.words, p.channels, kh, kw)?
                        .to_device(p.words.device())?;
                Ok(candle_nn::Conv2d::new(weight, p.bias.clone(), p.config))
            }
            Self::Quantized(q) => Ok(candle_nn::Conv2d::new(
                q.dequantized()?,
                q.bias.clone(),
                q.config,
            )),
        }
    }
}

impl Conv2d {
    /// The packed kernel and the bf16 kernels' op of a convolution whose products run there (a
    /// packed bf16 or q8 kernel).
    fn bf16_op(&self) -> Option<(&Tensor, crate::ops::gemm_bf16::Conv2dBf16)> {
        use crate::ops::gemm_bf16::Conv2dBf16;
        match self {
            Self::PackedBf16(p) if !p.winograd => Some((
                &p.words,
                Conv2dBf16 {
                    channels: p.channels,
                    kernel: p.kernel,
                    padding: p.config.padding,
                    bias: p.bias_values.clone(),
                    scales: None,
                },
            )),
            Self::Quantized(q) if q.packed => Some((
                &q.bytes,
                Conv2dBf16 {
                    channels: q.channels,
                    kernel: q.kernel,
                    padding: q.config.padding,
                    bias: q.bias_values.clone(),
                    scales: Some(q.scale_values.clone()),
                },
            )),
            _ => None,
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let bf16_input =
            x.device().is_cpu() && !x.track_op() && matches!(x.dtype(), DType::BF16 | DType::F32);
        if let Self::PackedBf16(p) = self {
            if p.winograd {
                return p.winograd_forward(x);
            }
        }
        if let Some((kernel, op)) = bf16_input.then(|| self.bf16_op()).flatten() {
            return x.contiguous()?.apply_op2_no_bwd(kernel, &op);
        }
        let conv = match self {
            Self::Plain(conv) => std::borrow::Cow::Borrowed(conv),
            // The dequantized kernel in the activations' dtype.
            Self::Quantized(_) => {
                let conv = self.plain()?;
                let to_x = |t: &Tensor| t.to_dtype(x.dtype());
                std::borrow::Cow::Owned(candle_nn::Conv2d::new(
                    to_x(conv.weight())?,
                    conv.bias().map(to_x).transpose()?,
                    *conv.config(),
                ))
            }
            Self::PackedBf16(_) => std::borrow::Cow::Owned(self.plain()?),
        };
        let config = conv.config();
        let training = x.track_op() || conv.weight().track_op();
        let (weight, bias) = (conv.weight(), conv.bias());
        let (stride, padding) = (config.stride, config.padding);
        if config.groups != 1 || config.dilation != 1 {
            return conv.forward(x);
        }
        match (x.device().is_cpu(), training, x.dtype(), weight.dtype()) {
            (true, _, DType::F32, DType::F32) => {
                crate::ops::conv_gemm::conv2d(x, weight, bias, stride, padding)
            }
            // bf16 kernels elsewhere: products in f32 (candle has no bf16 convolution kernel),
            // the output in the activations' dtype.
            (true, _, DType::BF16 | DType::F32, DType::BF16) => {
                let widen = |t: &Tensor| t.to_dtype(DType::F32);
                let bias = bias.map(widen).transpose()?;
                crate::ops::conv_gemm::conv2d(
                    &widen(x)?,
                    &widen(weight)?,
                    bias.as_ref(),
                    stride,
                    padding,
                )?
                .to_dtype(x.dtype())
            }
            (false, true, _, _) => {
                crate::ops::im2col::conv2d_taps(x, weight, bias, stride, padding)
            }
            _ => conv.forward(x),
        }
    }
}

pub fn conv3x3(
    cin: usize,
    cout: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    conv3x3_with(cin, cout, stride, padding, Precision::Quantizable, vb)
}

/// [`conv3x3`] of the given [`Precision`].
pub fn conv3x3_with(
    cin: usize,
    cout: usize,
    stride: usize,
    padding: usize,
    precision: Precision,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let config = Conv2dConfig {
        stride,
        padding,
        ..Default::default()
    };
    conv(cin, cout, 3, config, true, precision, vb)
}

pub fn conv1x1(cin: usize, cout: usize, vb: VarBuilder) -> Result<Conv2d> {
    conv(
        cin,
        cout,
        1,
        Default::default(),
        true,
        Precision::Quantizable,
        vb,
    )
}

/// softmax(scale q k^T) v for (heads, n, d) tensors, the probabilities in `dtype` before the
/// product with v: the blocked kernel (`ops::attention`, which never holds the scores) for f32
/// on the CPU, composed ops elsewhere.
pub fn attend(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, dtype: DType) -> Result<Tensor> {
    let all_f32 = [q, k, v].iter().all(|t| t.dtype() == DType::F32);
    if q.device().is_cpu() && all_f32 {
        return crate::ops::attention::memory_efficient_attention(q, k, v, scale);
    }
    let scores = (q.matmul(&k.t()?)? * scale)?;
    softmax_last_dim(&scores)?.to_dtype(dtype)?.matmul(v)
}

/// Multi-head scaled dot-product attention, softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017,
/// eq. 1), as diffusers' `Attention` with `to_q`, `to_k`, `to_v`, `to_out.0`. Each projection
/// takes a LoRA adapter when the weights offer one (see [`LoraLinear`]).
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: LoraLinear,
    to_k: LoraLinear,
    to_v: LoraLinear,
    to_out: LoraLinear,
    heads: usize,
    head_dim: usize,
    /// Compute scores in f32 even for half-precision weights (SD 2.x's `upcast_attention`).
    upcast: bool,
}

impl Attention {
    /// `context_dim` is the key/value input width (cross-attention), `None` for self-attention;
    /// `qkv_bias` is true for the VAE's attention, false in the U-Net's transformers.
    pub fn new(
        dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        head_dim: usize,
        qkv_bias: bool,
        upcast: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let kv_in = context_dim.unwrap_or(dim);
        // Cross-attention's keys and values come from the text tokens, a few hundred rows.
        let short_kv = context_dim.is_some();
        let proj = |i: usize, name: &str, short: bool| {
            let vb = vb.pp(name);
            let base = if qkv_bias {
                linear(i, inner, vb.clone())?
            } else {
                linear_no_bias(i, inner, vb.clone())?
            };
            let base = if short {
                base.for_short_inputs()?
            } else {
                base
            };
            LoraLinear::new(base, &vb)
        };
        let out_vb = vb.pp("to_out.0");
        Ok(Self {
            to_q: proj(dim, "to_q", false)?,
            to_k: proj(kv_in, "to_k", short_kv)?,
            to_v: proj(kv_in, "to_v", short_kv)?,
            to_out: LoraLinear::new(linear(inner, dim, out_vb.clone())?, &out_vb)?,
            heads,
            head_dim,
            upcast,
        })
    }

    /// (B, N, heads * d) -> (B * heads, N, d)
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        let heads = x
            .reshape((b, n, self.heads, self.head_dim))?
            .transpose(1, 2)?;
        contiguous(&heads)?.reshape((b * self.heads, n, self.head_dim))
    }

    /// `x`: (B, N, dim); `context`: (B, M, context_dim) or `None`.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        self.to_out.forward(&self.heads_joined(x, context)?)
    }

    /// `self.forward(x, context) + residual`, the residual joining the output projection's
    /// sums.
    pub fn forward_plus(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        residual: &Tensor,
    ) -> Result<Tensor> {
        self.to_out
            .forward_plus(&self.heads_joined(x, context)?, residual)
    }

    /// The heads' outputs side by side, (B, N, heads x head_dim), before the output projection.
    fn heads_joined(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(x);
        let (b, n, _) = x.dims3()?;
        let q = self.split_heads(&self.to_q.forward(x)?)?;
        let k = self.split_heads(&self.to_k.forward(context)?)?;
        let v = self.split_heads(&self.to_v.forward(context)?)?;
        let dtype = q.dtype();
        let (q, k) = if self.upcast {
            (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?)
        } else {
            (q, k)
        };
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let cpu_inference = q.device().is_cpu() && !(q.track_op() || k.track_op() || v.track_op());
        let all_f32 = q.dtype() == DType::F32 && k.dtype() == DType::F32 && v.dtype() == DType::F32;
        let per_head = if cpu_inference && all_f32 && self.to_q.bf16_products() {
            // A bf16 model keeping f32 activations: its attention products in bf16 as well.
            crate::ops::attention::attention_with_bf16_products(&q, &k, &v, scale)?
        } else if cpu_inference && v.dtype() == DType::BF16 {
            // candle's bf16 products widen element by element and its composed attention holds
            // the whole score matrix: the f32 blocked kernel is faster on both counts.
            let widen = |t: &Tensor| t.to_dtype(DType::F32);
            crate::ops::attention::memory_efficient_attention(
                &widen(&q)?,
                &widen(&k)?,
                &widen(&v)?,
                scale,
            )?
            .to_dtype(DType::BF16)?
        } else {
            attend(&q, &k, &v, scale, dtype)?
        };
        let tokens = per_head
            .reshape((b, self.heads, n, self.head_dim))?
            .transpose(1, 2)?;
        contiguous(&tokens)?.reshape((b, n, self.heads * self.head_dim))
    }
}

/// The transformer's feed-forward with a GELU-gated linear unit (Shazeer 2020), `ff.net.0.proj`
/// and `ff.net.2`; each takes a LoRA adapter when the weights offer one.
#[derive(Debug, Clone)]
pub struct GegluFeedForward {
    proj_in: LoraLinear,
    proj_out: LoraLinear,
}

impl GegluFeedForward {
    pub fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let inner = 4 * dim;
        let (in_vb, out_vb) = (vb.pp("net.0.proj"), vb.pp("net.2"));
        Ok(Self {
            proj_in: LoraLinear::new(linear(dim, 2 * inner, in_vb.clone())?, &in_vb)?,
            proj_out: LoraLinear::new(linear(inner, dim, out_vb.clone())?, &out_vb)?,
        })
    }
}

impl GegluFeedForward {
    /// `self.forward(x) + residual`, the residual joining the output projection's sums.
    pub fn forward_plus(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.proj_out.forward_plus(&self.gated(x)?, residual)
    }

    /// The gated hidden units, before the output projection.
    fn gated(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.proj_in.forward(x)?;
        let gated = if crate::ops::tensor::is_cpu_f32(&h) {
            h.contiguous()?.apply_op1(Geglu)?
        } else {
            let half = h.dim(D::Minus1)? / 2;
            let hidden = h.narrow(D::Minus1, 0, half)?;
            let gate = h.narrow(D::Minus1, half, half)?;
            (hidden * gate.gelu_erf()?)?
        };
        Ok(gated)
    }
}

impl Module for GegluFeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.proj_out.forward(&self.gated(x)?)
    }
}

/// GEGLU's gating (Shazeer 2020, eq. 5 with GELU), hidden * gelu(gate) on the two halves of the
/// last dimension, in one pass for f32 on the CPU, and its gradient in one more: composed, the
/// two halves are strided views that candle's GELU and product each walk element by element,
/// GELU through libm's erf, and its backward pass is a dozen more passes.
struct Geglu;

impl Geglu {
    /// The gated width, half the projection's last dimension, which must be even.
    fn half_width(dims: &[usize]) -> Result<usize> {
        let last = *dims.last().expect("a rank of at least 1");
        if !last.is_multiple_of(2) {
            candle_core::bail!("geglu: the last dimension ({last}) must be even")
        }
        Ok(last / 2)
    }
}

impl candle_core::CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use crate::ops::vector_math::{gelu, with_wide_vectors};
        use rayon::prelude::*;
        let h = crate::ops::tensor::contiguous_f32(storage, layout, "geglu", "the projection")?;
        let mut dims = layout.shape().dims().to_vec();
        let half = Self::half_width(&dims)?;
        *dims.last_mut().expect("a rank of at least 1") = half;
        // SAFETY: each row of `half` values is written from its row of `h` below.
        let mut out = unsafe { crate::ops::tensor::unwritten_f32(h.len() / 2) };
        out.par_chunks_mut(half)
            .zip(h.par_chunks(2 * half))
            .for_each(|(out, row)| {
                let (hidden, gate) = row.split_at(half);
                with_wide_vectors(
                    #[inline(always)]
                    || {
                        for ((value, hidden), gate) in out.iter_mut().zip(hidden).zip(gate) {
                            *value = hidden * gelu(*gate);
                        }
                    },
                )
            });
        Ok((candle_core::CpuStorage::F32(out), dims.into()))
    }

    /// d hidden = g gelu(gate), d gate = g hidden gelu'(gate), side by side as the projection.
    fn bwd(&self, h: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(h.apply_op2_no_bwd(&grad, &GegluGradient)?))
    }
}

/// The gradient of [`Geglu`]'s input from the input `h` and the output's gradient.
struct GegluGradient;

impl candle_core::CustomOp2 for GegluGradient {
    fn name(&self) -> &'static str {
        "geglu-gradient"
    }

    fn cpu_fwd(
        &self,
        h_storage: &candle_core::CpuStorage,
        h_layout: &candle_core::Layout,
        grad_storage: &candle_core::CpuStorage,
        grad_layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use crate::ops::tensor::contiguous_f32;
        use crate::ops::vector_math::{gelu, gelu_derivative, with_wide_vectors};
        use rayon::prelude::*;
        let h = contiguous_f32(h_storage, h_layout, "geglu", "the projection")?;
        let grad = contiguous_f32(grad_storage, grad_layout, "geglu", "the gradient")?;
        let half = Geglu::half_width(h_layout.shape().dims())?;
        if grad.len() * 2 != h.len() {
            candle_core::bail!(
                "geglu: gradient {:?} does not fit the projection {:?}",
                grad_layout.shape(),
                h_layout.shape()
            )
        }
        // SAFETY: every row's two halves are written below.
        let mut dh = unsafe { crate::ops::tensor::unwritten_f32(h.len()) };
        dh.par_chunks_mut(2 * half)
            .zip(h.par_chunks(2 * half))
            .zip(grad.par_chunks(half))
            .for_each(|((dh, row), grad)| {
                let (hidden, gate) = row.split_at(half);
                let (d_hidden, d_gate) = dh.split_at_mut(half);
                with_wide_vectors(
                    #[inline(always)]
                    || {
                        for ((((dh, dg), hidden), gate), g) in d_hidden
                            .iter_mut()
                            .zip(d_gate.iter_mut())
                            .zip(hidden)
                            .zip(gate)
                            .zip(grad)
                        {
                            *dh = g * gelu(*gate);
                            *dg = g * hidden * gelu_derivative(*gate);
                        }
                    },
                )
            });
        Ok((candle_core::CpuStorage::F32(dh), h_layout.shape().clone()))
    }
}

/// Self-attention, cross-attention and feed-forward, each pre-normed with a residual
/// (diffusers' `BasicTransformerBlock`).
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: GegluFeedForward,
}

impl BasicTransformerBlock {
    pub fn new(
        dim: usize,
        heads: usize,
        context_dim: usize,
        upcast: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let head_dim = dim / heads;
        Ok(Self {
            norm1: LayerNorm::new(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(dim, None, heads, head_dim, false, upcast, vb.pp("attn1"))?,
            norm2: LayerNorm::new(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(
                dim,
                Some(context_dim),
                heads,
                head_dim,
                false,
                upcast,
                vb.pp("attn2"),
            )?,
            norm3: LayerNorm::new(dim, 1e-5, vb.pp("norm3"))?,
            ff: GegluFeedForward::new(dim, vb.pp("ff"))?,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = self.attn1.forward_plus(&self.norm1.forward(x)?, None, x)?;
        let x = self
            .attn2
            .forward_plus(&self.norm2.forward(&x)?, Some(context), &x)?;
        self.ff.forward_plus(&self.norm3.forward(&x)?, &x)
    }
}

/// Input and output projections of a `Transformer2DModel`: 1x1 convolutions, or linear layers
/// on the flattened pixels (`use_linear_projection`, SD 2.x).
#[derive(Debug, Clone)]
enum Projection {
    Conv(Conv2d),
    Linear(Dense),
}

/// diffusers' `Transformer2DModel`: group norm, projection in, transformer blocks over the
/// pixels as tokens, projection out, residual.
#[derive(Debug, Clone)]
pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

pub struct TransformerSettings {
    pub heads: usize,
    pub layers: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub linear_projection: bool,
    pub upcast: bool,
}

impl Transformer2D {
    pub fn new(channels: usize, s: &TransformerSettings, vb: VarBuilder) -> Result<Self> {
        let projection = |name: &str| -> Result<Projection> {
            Ok(if s.linear_projection {
                Projection::Linear(linear(channels, channels, vb.pp(name))?)
            } else {
                Projection::Conv(conv1x1(channels, channels, vb.pp(name))?)
            })
        };
        let blocks = (0..s.layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    channels,
                    s.heads,
                    s.context_dim,
                    s.upcast,
                    vb.pp(format!("transformer_blocks.{i}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: group_norm(s.groups, channels, 1e-6, vb.pp("norm"))?,
            proj_in: projection("proj_in")?,
            blocks,
            proj_out: projection("proj_out")?,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let residual = x;
        let normed = self.norm.forward(x)?;
        let to_tokens = |t: &Tensor| -> Result<Tensor> {
            contiguous(&t.permute((0, 2, 3, 1))?)?.reshape((b, h * w, c))
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(&normed)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let to_image =
            |t: &Tensor| -> Result<Tensor> { t.reshape((b, h, w, c))?.permute((0, 3, 1, 2)) };
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&contiguous(&to_image(&tokens)?)?)?,
            Projection::Linear(lin) => to_image(&lin.forward(&tokens)?)?,
        };
        out + residual
    }
}

/// diffusers' `ResnetBlock2D` (DDPM's residual block, Ho et al. 2020, appendix B): two
/// GroupNorm-SiLU-conv stages with the time embedding added between them.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Dense>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

pub struct ResnetSettings {
    pub groups: usize,
    pub eps: f64,
    pub temb_channels: Option<usize>,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(cin: usize, cout: usize, s: &ResnetSettings, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            norm1: group_norm(s.groups, cin, s.eps, vb.pp("norm1"))?,
            conv1: conv3x3(cin, cout, 1, 1, vb.pp("conv1"))?,
            time_emb_proj: s
                .temb_channels
                .map(|t| linear(t, cout, vb.pp("time_emb_proj")))
                .transpose()?,
            norm2: group_norm(s.groups, cout, s.eps, vb.pp("norm2"))?,
            conv2: conv3x3(cout, cout, 1, 1, vb.pp("conv2"))?,
            conv_shortcut: if cin != cout {
                let config = Default::default();
                let vb = vb.pp("conv_shortcut");
                Some(conv(cin, cout, 1, config, true, Precision::Float, vb)?)
            } else {
                None
            },
            output_scale_factor: s.output_scale_factor,
        })
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&temb.silu()?)?;
            h = if planes::applies_to(&h) && t.rank() == 2 {
                planes::add_plane_shifts(&h, &t)?
            } else {
                h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?
            };
        }
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        let out = (shortcut + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out.affine(1.0 / self.output_scale_factor, 0.0)
        }
    }
}

/// Stride-2 3x3 convolution (`downsamplers.0.conv`). With padding 0 (the VAE) diffusers pads
/// one pixel on the right and bottom only.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    asymmetric_pad: bool,
}

impl Downsample2D {
    pub fn new(channels: usize, padding: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv3x3_with(
                channels,
                channels,
                2,
                padding,
                Precision::Float,
                vb.pp("conv"),
            )?,
            asymmetric_pad: padding == 0,
        })
    }
}

impl Module for Downsample2D {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.asymmetric_pad {
            let x = x
                .pad_with_zeros(D::Minus1, 0, 1)?
                .pad_with_zeros(D::Minus2, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// Nearest-neighbour 2x upsampling for (B, C, H, W). In training its gradient sums each 2x2
/// block: one pass on an f32 CPU tensor (`ops::planes`), a reshape and broadcast elsewhere
/// (candle's own op has a grouped convolution for its backward pass).
pub fn upsample_nearest_2x(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if !x.track_op() {
        // Inference: candle's kernel writes the output in one pass.
        return x.upsample_nearest2d(2 * h, 2 * w);
    }
    if planes::applies_to(x) {
        return planes::upsample_nearest_2x(x);
    }
    x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .reshape((b, c, 2 * h, 2 * w))
}

/// Nearest-neighbour resize to (out_h, out_w), index = floor(i * in / out) as PyTorch's
/// `interpolate(mode="nearest")`.
pub fn upsample_nearest_to(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if out_h == 2 * h && out_w == 2 * w {
        return upsample_nearest_2x(x);
    }
    let rows: Vec<u32> = (0..out_h).map(|i| (i * h / out_h) as u32).collect();
    let cols: Vec<u32> = (0..out_w).map(|i| (i * w / out_w) as u32).collect();
    let rows = Tensor::new(rows.as_slice(), x.device())?;
    let cols = Tensor::new(cols.as_slice(), x.device())?;
    x.index_select(&rows, 2)?.index_select(&cols, 3)
}

/// Nearest 2x upsampling then a 3x3 convolution (`upsamplers.0.conv`).
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: conv3x3_with(channels, channels, 1, 1, Precision::Float, vb.pp("conv"))?,
        })
    }

    /// `size`: the spatial size to reach when it is not exactly double (odd skip sizes).
    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (oh, ow) = size.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&upsample_nearest_to(x, oh, ow)?)
    }
}

/// Sinusoidal timestep features (DDPM, after Vaswani et al. 2017, section 3.5), as diffusers'
/// `Timesteps`: exponent -ln(10000) i / (half - freq_shift), [sin, cos] or flipped.
pub fn timestep_features(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(10000f64.ln()) * i as f64 / (half as f64 - freq_shift)).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), timesteps.device())?;
    let args = timesteps
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], D::Minus1)?
    } else {
        Tensor::cat(&[sin, cos], D::Minus1)?
    };
    if dim % 2 == 1 {
        emb.pad_with_zeros(D::Minus1, 0, 1)
    } else {
        Ok(emb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::tensor::{max_abs, seeded_randn};

    /// A packed bf16 "same" 3x3 convolution (Winograd's on a CPU with AMX, the direct products
    /// elsewhere) against candle's f32 convolution of the same bf16 kernel, for f32 and bf16
    /// inputs; where it holds Winograd filters, a tracked input is refused with a message that
    /// names the layer and the way out.
    #[test]
    fn packed_bf16_same_convolution_matches_f32() {
        if !crate::ops::gemm_bf16::packs_weight(
            &Tensor::zeros(1, DType::BF16, &candle_core::Device::Cpu).unwrap(),
        ) {
            return;
        }
        let weight = (seeded_randn(&[32, 64, 3, 3], 1) * 0.05)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let bias = seeded_randn(&[32], 2).to_dtype(DType::BF16).unwrap();
        let config = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv = Conv2d::from(candle_nn::Conv2d::new(
            weight.clone(),
            Some(bias.clone()),
            config,
        ));
        let x = seeded_randn(&[2, 64, 9, 12], 3);
        let want = x
            .conv2d(&weight.to_dtype(DType::F32).unwrap(), 1, 1, 1, 1)
            .unwrap()
            .broadcast_add(
                &bias
                    .to_dtype(DType::F32)
                    .unwrap()
                    .reshape((1, 32, 1, 1))
                    .unwrap(),
            )
            .unwrap();
        let scale = max_abs(&want).unwrap();
        for input in [x.clone(), x.to_dtype(DType::BF16).unwrap()] {
            let got = conv.forward(&input).unwrap();
            assert_eq!(got.dtype(), input.dtype());
            let error = max_abs(&(got.to_dtype(DType::F32).unwrap() - &want).unwrap()).unwrap();
            assert!(
                error < 0.02 * scale,
                "{:?} input: max error {error} of {scale}",
                input.dtype()
            );
        }
        if crate::ops::amx::tiles_available() {
            let tracked = candle_core::Var::from_tensor(&x).unwrap();
            let error = conv.forward(tracked.as_tensor()).unwrap_err().to_string();
            assert!(
                error.contains("64 -> 32") && error.contains("f32"),
                "{error}"
            );
        }
    }

    /// The fused gating equals hidden * gelu(gate) composed from candle's ops (libm's erf), and
    /// an odd last dimension is refused.
    #[test]
    fn fused_geglu_matches_composed_ops() {
        let h = (seeded_randn(&[2, 5, 2 * 37], 1) * 3.0).unwrap();
        let fused = h.apply_op1_no_bwd(&Geglu).unwrap();
        let hidden = h.narrow(D::Minus1, 0, 37).unwrap();
        let gate = h.narrow(D::Minus1, 37, 37).unwrap();
        let composed = (hidden * gate.gelu_erf().unwrap()).unwrap();
        assert_eq!(fused.dims(), &[2, 5, 37]);
        let scale = max_abs(&composed).unwrap();
        assert!(max_abs(&(fused - composed).unwrap()).unwrap() < 1e-6 * scale.max(1.0));
        let odd = seeded_randn(&[3, 5], 2);
        let err = odd.apply_op1_no_bwd(&Geglu).unwrap_err().to_string();
        assert!(err.contains("must be even"), "{err}");
    }

    /// The fused gating's gradient equals the composed ops' (candle's backward of narrow, GELU
    /// and product) for a probe through both, over gates from -9 to 9.
    #[test]
    fn fused_geglu_gradient_matches_composed_ops() {
        let values = (seeded_randn(&[3, 4, 2 * 29], 3) * 3.0).unwrap();
        let h = candle_core::Var::from_tensor(&values).unwrap();
        let probe = seeded_randn(&[3, 4, 29], 4);
        let fused = h.as_tensor().apply_op1(Geglu).unwrap();
        let hidden = h.narrow(D::Minus1, 0, 29).unwrap();
        let gate = h.narrow(D::Minus1, 29, 29).unwrap();
        let composed = (hidden * gate.gelu_erf().unwrap()).unwrap();
        let gradient = |out: &Tensor| crate::ops::tensor::probe_gradient(out, &probe, &h);
        let (fused, composed) = (gradient(&fused), gradient(&composed));
        let scale = max_abs(&composed).unwrap();
        let diff = max_abs(&(fused - composed).unwrap()).unwrap();
        assert!(diff < 2e-6 * scale.max(1.0), "gradient differs by {diff}");
    }
}
