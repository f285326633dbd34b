//! diffusers' `UNet2DConditionModel`: the SD 1.x/2.x denoiser, and with no cross-attention
//! blocks (and optionally a class embedding) the pixel-space DDPM U-Net.

use super::blocks::Conv2d;
use super::blocks::{
    conv3x3, timestep_features, Downsample2D, ResnetBlock2D, ResnetSettings, Transformer2D,
    TransformerSettings, Upsample2D,
};
use super::config::UNetConfig;
use super::norm::{group_norm, GroupNorm};
use candle_core::{Module, Result, Tensor};
use candle_nn::{embedding, linear, Embedding, Linear, VarBuilder};

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

#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    pub config: UNetConfig,
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    class_embedding: Option<Embedding>,
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

        let conv_in = conv3x3(config.in_channels, channels[0], 1, 1, vb.pp("conv_in"))?;
        let time_linear_1 = linear(channels[0], temb_dim, vb.pp("time_embedding.linear_1"))?;
        let time_linear_2 = linear(temb_dim, temb_dim, vb.pp("time_embedding.linear_2"))?;
        let class_embedding = config
            .num_class_embeds
            .map(|k| embedding(k, temb_dim, vb.pp("class_embedding")))
            .transpose()?;

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
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(
                groups,
                channels[0],
                config.norm_eps,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: conv3x3(channels[0], config.out_channels, 1, 1, vb.pp("conv_out"))?,
            config,
        })
    }

    /// The noise (or v, or x_0) prediction for latents `x` (B, C, H, W) at `timesteps` (B,),
    /// conditioned on `context` (B, tokens, cross_attention_dim) and, for class-conditional
    /// models, `class_labels` (B,).
    pub fn forward(
        &self,
        x: &Tensor,
        timesteps: &Tensor,
        context: Option<&Tensor>,
        class_labels: Option<&Tensor>,
    ) -> Result<Tensor> {
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
        match (&self.class_embedding, class_labels) {
            (Some(table), Some(labels)) => temb = (temb + table.forward(labels)?)?,
            (Some(_), None) => {
                candle_core::bail!("this U-Net is class-conditional: give class labels")
            }
            (None, Some(_)) => {
                candle_core::bail!("this U-Net has no class embedding (num_class_embeds)")
            }
            (None, None) => {}
        }
        let needs_context = self.mid_block.attention.is_some()
            || self.down_blocks.iter().any(|b| !b.attentions.is_empty());
        let empty = Tensor::zeros(1, x.dtype(), x.device())?;
        let context = match context {
            Some(c) => c,
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
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}
