//! diffusers' `UNet2DConditionModel`: the SD 1.x/2.x and SDXL denoiser, and with no
//! cross-attention blocks (and optionally a class embedding) the pixel-space DDPM U-Net.

use super::blocks::Conv2d;
use super::blocks::{
    conv3x3_with, timestep_features, Downsample2D, Precision, ResnetBlock2D, ResnetSettings,
    Transformer2D, TransformerSettings, Upsample2D,
};
use super::config::UNetConfig;
use super::dense::linear;
use super::dense::Dense;
use crate::ops::norm::{group_norm, GroupNorm};
use candle_core::{Module, Result, Tensor};
use candle_nn::{embedding, Embedding, VarBuilder};

#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    downsampler: Option<Downsample2D>,
}

#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    upsampler: Option<Upsample2D>,
}

#[derive(Debug, Clone)]
struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attention: Option<Transformer2D>,
}

/// SDXL's micro-conditioning (Podell et al. 2023, section 2.2): the pooled text embedding and
/// the size and crop the image is asked to look like.
#[derive(Debug, Clone)]
pub struct TextTimeConditioning {
    /// (B, P): the second text encoder's projected pooled output.
    pub text_embeds: Tensor,
    /// (B, 6): original height and width, crop top and left, target height and width.
    pub time_ids: Tensor,
}

/// Everything the U-Net is conditioned on besides the noisy input and the time, batched like
/// the input: one value serves SD 1.x/2.x (text states), SDXL (text states and added
/// conditions) and the pixel models (class labels or nothing).
#[derive(Debug, Clone, Default)]
pub struct UNetConditioning {
    /// (B, tokens, cross_attention_dim): the text states cross-attention reads.
    pub context: Option<Tensor>,
    /// For `addition_embed_type: "text_time"` U-Nets.
    pub text_time: Option<TextTimeConditioning>,
    /// (B,): for class-conditional U-Nets.
    pub class_labels: Option<Tensor>,
}

impl UNetConditioning {
    /// Text states only (SD 1.x/2.x).
    pub fn text(context: Tensor) -> Self {
        Self {
            context: Some(context),
            ..Default::default()
        }
    }

    /// Class labels only, or nothing (pixel models).
    pub fn classes(class_labels: Option<Tensor>) -> Self {
        Self {
            class_labels,
            ..Default::default()
        }
    }

    /// `f` applied to every batched tensor.
    fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        Ok(Self {
            context: self.context.as_ref().map(&f).transpose()?,
            text_time: self
                .text_time
                .as_ref()
                .map(|c| -> Result<TextTimeConditioning> {
                    Ok(TextTimeConditioning {
                        text_embeds: f(&c.text_embeds)?,
                        time_ids: f(&c.time_ids)?,
                    })
                })
                .transpose()?,
            class_labels: self.class_labels.as_ref().map(&f).transpose()?,
        })
    }

    /// Rows `start..start + len` of every batched tensor.
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        self.map(|t| t.narrow(0, start, len))
    }

    /// The whole batch tiled `times` times (one prompt's conditioning for a batch of images).
    pub fn repeat(&self, times: usize) -> Result<Self> {
        self.map(|t| {
            let mut dims = vec![1; t.rank()];
            dims[0] = times;
            t.repeat(dims)
        })
    }

    /// `first` then `second` along the batch (classifier-free guidance's [uncond, cond]).
    pub fn concat(first: &Self, second: &Self) -> Result<Self> {
        let cat = |a: &Option<Tensor>, b: &Option<Tensor>| -> Result<Option<Tensor>> {
            match (a, b) {
                (Some(a), Some(b)) => Ok(Some(Tensor::cat(&[a, b], 0)?)),
                (None, None) => Ok(None),
                _ => candle_core::bail!("conditionings of different kinds cannot be batched"),
            }
        };
        let text_time = match (&first.text_time, &second.text_time) {
            (Some(a), Some(b)) => Some(TextTimeConditioning {
                text_embeds: Tensor::cat(&[&a.text_embeds, &b.text_embeds], 0)?,
                time_ids: Tensor::cat(&[&a.time_ids, &b.time_ids], 0)?,
            }),
            (None, None) => None,
            _ => candle_core::bail!("conditionings of different kinds cannot be batched"),
        };
        Ok(Self {
            context: cat(&first.context, &second.context)?,
            text_time,
            class_labels: cat(&first.class_labels, &second.class_labels)?,
        })
    }
}

/// SDXL's `add_embedding`: sinusoidal features of each time id, after the pooled text
/// embedding, through linear-SiLU-linear into the time embedding's width.
#[derive(Debug, Clone)]
struct TextTimeEmbedding {
    time_dim: usize,
    linear_1: Dense,
    linear_2: Dense,
}

#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    pub config: UNetConfig,
    conv_in: Conv2d,
    time_linear_1: Dense,
    time_linear_2: Dense,
    class_embedding: Option<Embedding>,
    text_time_embedding: Option<TextTimeEmbedding>,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet2DConditionModel {
    pub fn new(config: UNetConfig, vb: VarBuilder) -> crate::Result<Self> {
        config.validate()?;
        let channels = &config.block_out_channels;
        let n = channels.len();
        let heads = config.heads()?;
        let transformer_layers = config
            .transformer_layers_per_block
            .expand(n, "transformer_layers_per_block")?;
        let temb_dim = channels[0] * 4;
        let groups = config.norm_num_groups;
        let context_dim = config.cross_attention_dim.unwrap_or(0);
        let resnet = |scale: f64| ResnetSettings {
            groups,
            eps: config.norm_eps,
            temb_channels: Some(temb_dim),
            output_scale_factor: scale,
        };
        let transformer = |heads: usize, layers: usize| TransformerSettings {
            heads,
            layers,
            context_dim,
            groups,
            linear_projection: config.use_linear_projection,
            upcast: config.upcast_attention,
        };

        let conv_in = conv3x3_with(
            config.in_channels,
            channels[0],
            1,
            1,
            Precision::Float,
            vb.pp("conv_in"),
        )?;
        let time_linear_1 = linear(channels[0], temb_dim, vb.pp("time_embedding.linear_1"))?;
        let time_linear_2 = linear(temb_dim, temb_dim, vb.pp("time_embedding.linear_2"))?;
        let class_embedding = config
            .num_class_embeds
            .map(|k| embedding(k, temb_dim, vb.pp("class_embedding")))
            .transpose()?;
        let text_time_embedding = match (
            config.addition_embed_type.as_deref(),
            config.addition_time_embed_dim,
            config.projection_class_embeddings_input_dim,
        ) {
            (Some("text_time"), Some(time_dim), Some(input_dim)) => Some(TextTimeEmbedding {
                time_dim,
                linear_1: linear(input_dim, temb_dim, vb.pp("add_embedding.linear_1"))?,
                linear_2: linear(temb_dim, temb_dim, vb.pp("add_embedding.linear_2"))?,
            }),
            _ => None,
        };

        let mut down_blocks = Vec::with_capacity(n);
        let mut cin = channels[0];
        for (i, kind) in config.down_block_types.iter().enumerate() {
            let cout = channels[i];
            let vb_block = vb.pp(format!("down_blocks.{i}"));
            let cross = kind == "CrossAttnDownBlock2D";
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..config.layers_per_block {
                let rin = if j == 0 { cin } else { cout };
                resnets.push(ResnetBlock2D::new(
                    rin,
                    cout,
                    &resnet(1.0),
                    vb_block.pp(format!("resnets.{j}")),
                )?);
                if cross {
                    attentions.push(Transformer2D::new(
                        cout,
                        &transformer(heads[i], transformer_layers[i]),
                        vb_block.pp(format!("attentions.{j}")),
                    )?);
                }
            }
            let downsampler = if i + 1 < n {
                Some(Downsample2D::new(
                    cout,
                    config.downsample_padding,
                    vb_block.pp("downsamplers.0"),
                )?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                attentions,
                downsampler,
            });
            cin = cout;
        }

        let last = channels[n - 1];
        let vb_mid = vb.pp("mid_block");
        let mid_cross = config.mid_block_type.as_deref() != Some("UNetMidBlock2D")
            && config
                .down_block_types
                .iter()
                .any(|t| t == "CrossAttnDownBlock2D");
        let mid_scale = config.mid_block_scale_factor;
        let mid_block = MidBlock {
            resnets: vec![
                ResnetBlock2D::new(last, last, &resnet(mid_scale), vb_mid.pp("resnets.0"))?,
                ResnetBlock2D::new(last, last, &resnet(mid_scale), vb_mid.pp("resnets.1"))?,
            ],
            attention: if mid_cross {
                Some(Transformer2D::new(
                    last,
                    &transformer(heads[n - 1], transformer_layers[n - 1]),
                    vb_mid.pp("attentions.0"),
                )?)
            } else {
                None
            },
        };

        let reversed: Vec<usize> = channels.iter().rev().cloned().collect();
        let reversed_heads: Vec<usize> = heads.iter().rev().cloned().collect();
        let reversed_layers: Vec<usize> = transformer_layers.iter().rev().cloned().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut prev_out = reversed[0];
        for (i, kind) in config.up_block_types.iter().enumerate() {
            let cout = reversed[i];
            let skip_in = reversed[(i + 1).min(n - 1)];
            let vb_block = vb.pp(format!("up_blocks.{i}"));
            let cross = kind == "CrossAttnUpBlock2D";
            let layers = config.layers_per_block + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers {
                let skip = if j == layers - 1 { skip_in } else { cout };
                let rin = if j == 0 { prev_out } else { cout };
                resnets.push(ResnetBlock2D::new(
                    rin + skip,
                    cout,
                    &resnet(1.0),
                    vb_block.pp(format!("resnets.{j}")),
                )?);
                if cross {
                    attentions.push(Transformer2D::new(
                        cout,
                        &transformer(reversed_heads[i], reversed_layers[i]),
                        vb_block.pp(format!("attentions.{j}")),
                    )?);
                }
            }
            let upsampler = if i + 1 < n {
                Some(Upsample2D::new(cout, vb_block.pp("upsamplers.0"))?)
            } else {
                None
            };
            up_blocks.push(UpBlock {
                resnets,
                attentions,
                upsampler,
            });
            prev_out = cout;
        }

        Ok(Self {
            conv_in,
            time_linear_1,
            time_linear_2,
            class_embedding,
            text_time_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(
                groups,
                channels[0],
                config.norm_eps,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: conv3x3_with(
                channels[0],
                config.out_channels,
                1,
                1,
                Precision::Float,
                vb.pp("conv_out"),
            )?,
            config,
        })
    }

    /// The noise (or v, or x_0) prediction for latents `x` (B, C, H, W) at `timesteps` (B,),
    /// under `conditioning` (text states, SDXL's added conditions, class labels: what the
    /// model was built to take, batched like `x`).
    pub fn forward(
        &self,
        x: &Tensor,
        timesteps: &Tensor,
        conditioning: &UNetConditioning,
    ) -> Result<Tensor> {
        let output_dtype = x.dtype();
        let dtype = crate::ops::gemm_bf16::activation_dtype(self.conv_in.dtype(), x.device());
        let x = &x.to_dtype(dtype)?;
        let c0 = self.config.block_out_channels[0];
        let features = timestep_features(
            timesteps,
            c0,
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        )?
        .to_dtype(x.dtype())?;
        let mut temb = self
            .time_linear_2
            .forward(&self.time_linear_1.forward(&features)?.silu()?)?;
        match (&self.class_embedding, &conditioning.class_labels) {
            (Some(table), Some(labels)) => {
                temb = (temb + table.forward(labels)?.to_dtype(dtype)?)?
            }
            (Some(_), None) => {
                candle_core::bail!("this U-Net is class-conditional: give class labels")
            }
            (None, Some(_)) => {
                candle_core::bail!("this U-Net has no class embedding (num_class_embeds)")
            }
            (None, None) => {}
        }
        match (&self.text_time_embedding, &conditioning.text_time) {
            (Some(embedding), Some(added)) => {
                temb = (temb + self.text_time(embedding, added, x.dtype())?)?
            }
            (Some(_), None) => candle_core::bail!(
                "this U-Net (addition_embed_type text_time) needs pooled text embeddings and time ids"
            ),
            (None, Some(_)) => {
                candle_core::bail!("this U-Net takes no added text and time conditions")
            }
            (None, None) => {}
        }
        let needs_context = self.mid_block.attention.is_some()
            || self.down_blocks.iter().any(|b| !b.attentions.is_empty());
        let empty = Tensor::zeros(1, x.dtype(), x.device())?;
        let context = match &conditioning.context {
            Some(c) => &c.to_dtype(dtype)?,
            None if needs_context => {
                candle_core::bail!("this U-Net has cross-attention: give encoder hidden states")
            }
            None => &empty,
        };

        let x = if self.config.center_input_sample {
            x.affine(2.0, -1.0)?
        } else {
            x.clone()
        };
        let mut h = self.conv_in.forward(&x)?;
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                h = resnet.forward(&h, Some(&temb))?;
                if let Some(attn) = block.attentions.get(j) {
                    h = attn.forward(&h, context)?;
                }
                skips.push(h.clone());
            }
            if let Some(down) = &block.downsampler {
                h = down.forward(&h)?;
                skips.push(h.clone());
            }
        }

        h = self.mid_block.resnets[0].forward(&h, Some(&temb))?;
        if let Some(attn) = &self.mid_block.attention {
            h = attn.forward(&h, context)?;
        }
        h = self.mid_block.resnets[1].forward(&h, Some(&temb))?;

        for block in &self.up_blocks {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().expect("one skip per up-block resnet");
                h = resnet.forward(&Tensor::cat(&[&h, &skip], 1)?, Some(&temb))?;
                if let Some(attn) = block.attentions.get(j) {
                    h = attn.forward(&h, context)?;
                }
            }
            if let Some(up) = &block.upsampler {
                // Upsample to the next skip's size, which is not double when a size was odd.
                let size = skips
                    .last()
                    .map(|s| (s.dim(2).unwrap_or(0), s.dim(3).unwrap_or(0)));
                h = up.forward(&h, size)?;
            }
        }
        self.conv_out
            .forward(&self.conv_norm_out.forward_silu(&h)?)?
            .to_dtype(output_dtype)
    }

    /// diffusers' `add_embedding(cat(text_embeds, flatten(add_time_proj(time_ids))))`.
    fn text_time(
        &self,
        embedding: &TextTimeEmbedding,
        added: &TextTimeConditioning,
        dtype: candle_core::DType,
    ) -> Result<Tensor> {
        let (b, n) = added.time_ids.dims2()?;
        let time_features = timestep_features(
            &added.time_ids.flatten_all()?,
            embedding.time_dim,
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        )?
        .reshape((b, n * embedding.time_dim))?;
        let input = Tensor::cat(
            &[
                added.text_embeds.to_dtype(dtype)?,
                time_features.to_dtype(dtype)?,
            ],
            1,
        )?;
        embedding
            .linear_2
            .forward(&embedding.linear_1.forward(&input)?.silu()?)
    }
}
