//! The CLIP text encoder (Radford et al. 2021) as transformers' `CLIPTextModel`: token and
//! position embeddings, pre-norm transformer layers under a causal mask, a final layer norm;
//! with `text_projection` (`CLIPTextModelWithProjection`, SDXL's second encoder) also the
//! projected pooled output.

use super::blocks::LayerNorm;
use super::config::ClipTextConfig;
use super::dense::linear;
use super::dense::Dense;
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{embedding, Embedding, VarBuilder};

/// A layer of the encoder, whose inputs are at most 77 tokens a prompt.
fn short_linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Dense> {
    linear(in_dim, out_dim, vb)?.for_short_inputs()
}

#[derive(Debug, Clone)]
struct ClipAttention {
    q_proj: Dense,
    k_proj: Dense,
    v_proj: Dense,
    out_proj: Dense,
    heads: usize,
}

impl ClipAttention {
    fn new(c: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let d = c.hidden_size;
        Ok(Self {
            q_proj: short_linear(d, d, vb.pp("q_proj"))?,
            k_proj: short_linear(d, d, vb.pp("k_proj"))?,
            v_proj: short_linear(d, d, vb.pp("v_proj"))?,
            out_proj: short_linear(d, d, vb.pp("out_proj"))?,
            heads: c.num_attention_heads,
        })
    }

    /// `self_attn(x) + residual`, the residual joining the output projection's sums.
    fn forward_plus(&self, x: &Tensor, mask: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.out_proj
            .forward_plus(&self.heads_joined(x, mask)?, residual)
    }

    /// The heads' outputs side by side, (B, N, hidden), before the output projection.
    fn heads_joined(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let head_dim = d / self.heads;
        let split = |t: Tensor| -> Result<Tensor> {
            crate::ops::copy::contiguous(&t.reshape((b, n, self.heads, head_dim))?.transpose(1, 2)?)
        };
        let scale = 1.0 / (head_dim as f64).sqrt();
        let q = self.q_proj.forward(x)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        let per_head = if crate::ops::tensor::is_cpu_f32(&q) && v.dtype() == DType::F32 {
            // The mask is causal: the blocked kernel applies it without a score matrix.
            let heads = |t: &Tensor| t.reshape((b * self.heads, n, head_dim));
            let out = crate::ops::attention::causal_attention(
                &heads(&split(q)?)?,
                &heads(&k)?,
                &heads(&v)?,
                scale,
            )?;
            out.reshape((b, self.heads, n, head_dim))?
        } else {
            let scores = split((q * scale)?)?.matmul(&k.t()?)?.broadcast_add(mask)?;
            super::blocks::softmax_last_dim(&scores)?.matmul(&v)?
        };
        crate::ops::copy::contiguous(&per_head.transpose(1, 2)?)?.reshape((b, n, d))
    }
}

#[derive(Debug, Clone)]
struct ClipLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    fc1: Dense,
    fc2: Dense,
    quick_gelu: bool,
}

impl ClipLayer {
    fn new(c: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            layer_norm1: LayerNorm::new(c.hidden_size, c.layer_norm_eps, vb.pp("layer_norm1"))?,
            self_attn: ClipAttention::new(c, vb.pp("self_attn"))?,
            layer_norm2: LayerNorm::new(c.hidden_size, c.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: short_linear(c.hidden_size, c.intermediate_size, vb.pp("mlp.fc1"))?,
            fc2: short_linear(c.intermediate_size, c.hidden_size, vb.pp("mlp.fc2"))?,
            quick_gelu: c.hidden_act == "quick_gelu",
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let x = self
            .self_attn
            .forward_plus(&self.layer_norm1.forward(x)?, mask, x)?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        // quick_gelu(x) = x sigmoid(1.702 x), CLIP's approximation of GELU.
        let h = if self.quick_gelu && crate::ops::pointwise::applies_to(&h) {
            crate::ops::pointwise::apply(&h, crate::ops::pointwise::QuickGelu)?
        } else if self.quick_gelu {
            (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?
        } else {
            h.gelu_erf()?
        };
        self.fc2.forward_plus(&h, &x)
    }
}

#[derive(Debug, Clone)]
pub struct ClipTextModel {
    pub config: ClipTextConfig,
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<ClipLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Dense>,
}

/// What SDXL reads from a text encoder.
pub struct TextStates {
    /// (B, N, hidden): the output of the second-to-last layer, without the final norm
    /// (transformers' `hidden_states[-2]`).
    pub penultimate: Tensor,
    /// (B, projection_dim): the final-normed state at each prompt's end token through
    /// `text_projection` (`text_embeds`), when the encoder has one.
    pub pooled: Option<Tensor>,
}

impl ClipTextModel {
    /// `vb` at the checkpoint root. transformers 4.x saves the weights under `text_model.`,
    /// 5.x at the root; both load.
    pub fn new(config: ClipTextConfig, root: VarBuilder) -> crate::Result<Self> {
        config.validate()?;
        let vb = if root.contains_tensor("text_model.embeddings.token_embedding.weight") {
            root.pp("text_model")
        } else {
            root.clone()
        };
        let text_projection = if root.contains_tensor("text_projection.weight") {
            let width = config.projection_dim.unwrap_or(config.hidden_size);
            Some(super::dense::linear_no_bias(
                config.hidden_size,
                width,
                root.pp("text_projection"),
            )?)
        } else {
            None
        };
        let c = &config;
        let layers = (0..c.num_hidden_layers)
            .map(|i| ClipLayer::new(c, vb.pp(format!("encoder.layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            token_embedding: embedding(
                c.vocab_size,
                c.hidden_size,
                vb.pp("embeddings.token_embedding"),
            )?,
            position_embedding: embedding(
                c.max_position_embeddings,
                c.hidden_size,
                vb.pp("embeddings.position_embedding"),
            )?,
            layers,
            final_layer_norm: LayerNorm::new(
                c.hidden_size,
                c.layer_norm_eps,
                vb.pp("final_layer_norm"),
            )?,
            text_projection,
            config,
        })
    }

    /// -inf above the diagonal: token i attends to tokens 0..=i only.
    fn causal_mask(n: usize, device: &Device) -> Result<Tensor> {
        let values: Vec<f32> = (0..n)
            .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Tensor::from_vec(values, (n, n), device)
    }

    /// Token ids (B, N) to `last_hidden_state` (B, N, hidden).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (x, mask) = self.embed(input_ids)?;
        let h = Self::run_layers(x, &mask, &self.layers)?;
        self.final_layer_norm.forward(&h)
    }

    /// Token embeddings plus positions, and the causal mask for them, in the dtype the layers
    /// keep activations in (`gemm_bf16::activation_dtype`: f32 between bf16 products where the
    /// CPU has the pair dot product, so that attention and the norms run in the f32 kernels).
    fn embed(&self, input_ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let (_, n) = input_ids.dims2()?;
        let positions = Tensor::arange(0u32, n as u32, input_ids.device())?;
        let tokens = self.token_embedding.forward(input_ids)?;
        let dtype = crate::ops::gemm_bf16::activation_dtype(tokens.dtype(), input_ids.device());
        let x = tokens.to_dtype(dtype)?.broadcast_add(
            &self
                .position_embedding
                .forward(&positions)?
                .to_dtype(dtype)?,
        )?;
        let mask = Self::causal_mask(n, input_ids.device())?.to_dtype(x.dtype())?;
        Ok((x, mask))
    }

    fn run_layers(mut h: Tensor, mask: &Tensor, layers: &[ClipLayer]) -> Result<Tensor> {
        for layer in layers {
            h = layer.forward(&h, mask)?;
        }
        Ok(h)
    }

    /// The states SDXL conditions on: the penultimate layer's output and, with a projection,
    /// the pooled output. The pooled position is each row's largest id, the end token in
    /// CLIP's vocabulary (transformers' pooling for configs with `eos_token_id: 2`).
    pub fn forward_states(&self, input_ids: &Tensor) -> Result<TextStates> {
        let n_layers = self.layers.len();
        if n_layers < 2 {
            candle_core::bail!("a text encoder needs two layers to have a penultimate one")
        }
        let (x, mask) = self.embed(input_ids)?;
        let penultimate = Self::run_layers(x, &mask, &self.layers[..n_layers - 1])?;
        let pooled = match &self.text_projection {
            Some(projection) => {
                let last = self.layers[n_layers - 1].forward(&penultimate, &mask)?;
                let normed = self.final_layer_norm.forward(&last)?;
                let ids: Vec<Vec<u32>> = input_ids.to_dtype(candle_core::DType::U32)?.to_vec2()?;
                let rows = ids
                    .iter()
                    .enumerate()
                    .map(|(row, ids)| {
                        // The first position of the largest id, as torch's argmax.
                        let max = ids.iter().copied().max().unwrap_or(0);
                        let end = ids.iter().position(|&id| id == max).unwrap_or(0);
                        normed.get(row)?.get(end)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Some(projection.forward(&Tensor::stack(&rows, 0)?)?)
            }
            None => None,
        };
        Ok(TextStates {
            penultimate,
            pooled,
        })
    }
}
