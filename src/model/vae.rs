//! diffusers' `AutoencoderKL` (Rombach et al. 2022, section 3 and appendix G): a convolutional
//! encoder to a diagonal Gaussian over latents, and a decoder back to pixels.

use super::blocks::Conv2d;
use super::blocks::{conv1x1, conv3x3, Downsample2D, ResnetBlock2D, ResnetSettings, Upsample2D};
use super::config::VaeConfig;
use super::dense::linear;
use super::dense::Dense;
use crate::ops::gemm_bf16::activation_dtype;
use crate::ops::norm::{group_norm, GroupNorm};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

/// The VAE's mid-block attention: one head over all channels, with biases and a group norm
/// (`attentions.0.{group_norm, to_q, to_k, to_v, to_out.0}`).
#[derive(Debug, Clone)]
struct VaeAttention {
    group_norm: GroupNorm,
    to_q: Dense,
    to_k: Dense,
    to_v: Dense,
    to_out: Dense,
}

impl VaeAttention {
    fn new(channels: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            group_norm: group_norm(groups, channels, 1e-6, vb.pp("group_norm"))?,
            to_q: linear(channels, channels, vb.pp("to_q"))?,
            to_k: linear(channels, channels, vb.pp("to_k"))?,
            to_v: linear(channels, channels, vb.pp("to_v"))?,
            to_out: linear(channels, channels, vb.pp("to_out.0"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?;
        let q = self.to_q.forward(&tokens)?;
        let k = self.to_k.forward(&tokens)?;
        let v = self.to_v.forward(&tokens)?;
        let scale = 1.0 / (c as f64).sqrt();
        let attended = super::blocks::attend(&q, &k, &v, scale, v.dtype())?;
        let out = self
            .to_out
            .forward(&attended)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        out + x
    }
}

#[derive(Debug, Clone)]
struct VaeMidBlock {
    resnet_0: ResnetBlock2D,
    attention: Option<VaeAttention>,
    resnet_1: ResnetBlock2D,
}

impl VaeMidBlock {
    fn new(channels: usize, groups: usize, with_attention: bool, vb: VarBuilder) -> Result<Self> {
        let s = vae_resnet(groups);
        Ok(Self {
            resnet_0: ResnetBlock2D::new(channels, channels, &s, vb.pp("resnets.0"))?,
            attention: if with_attention {
                Some(VaeAttention::new(channels, groups, vb.pp("attentions.0"))?)
            } else {
                None
            },
            resnet_1: ResnetBlock2D::new(channels, channels, &s, vb.pp("resnets.1"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnet_0.forward(x, None)?;
        if let Some(attn) = &self.attention {
            h = attn.forward(&h)?;
        }
        self.resnet_1.forward(&h, None)
    }
}

fn vae_resnet(groups: usize) -> ResnetSettings {
    ResnetSettings {
        groups,
        eps: 1e-6,
        temb_channels: None,
        output_scale_factor: 1.0,
    }
}

#[derive(Debug, Clone)]
pub struct Encoder {
    conv_in: Conv2d,
    down: Vec<(Vec<ResnetBlock2D>, Option<Downsample2D>)>,
    mid: VaeMidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(c: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let ch = &c.block_out_channels;
        let groups = c.norm_num_groups;
        let mut down = Vec::new();
        let mut cin = ch[0];
        for (i, cout) in ch.iter().enumerate() {
            let vb_block = vb.pp(format!("down_blocks.{i}"));
            let resnets = (0..c.layers_per_block)
                .map(|j| {
                    ResnetBlock2D::new(
                        if j == 0 { cin } else { *cout },
                        *cout,
                        &vae_resnet(groups),
                        vb_block.pp(format!("resnets.{j}")),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let downsampler = if i + 1 < ch.len() {
                Some(Downsample2D::new(*cout, 0, vb_block.pp("downsamplers.0"))?)
            } else {
                None
            };
            down.push((resnets, downsampler));
            cin = *cout;
        }
        let last = ch[ch.len() - 1];
        Ok(Self {
            conv_in: conv3x3(c.in_channels, ch[0], 1, 1, vb.pp("conv_in"))?,
            down,
            mid: VaeMidBlock::new(last, groups, c.mid_block_add_attention, vb.pp("mid_block"))?,
            conv_norm_out: group_norm(groups, last, 1e-6, vb.pp("conv_norm_out"))?,
            conv_out: conv3x3(last, 2 * c.latent_channels, 1, 1, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for (resnets, downsampler) in &self.down {
            for r in resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(d) = downsampler {
                h = d.forward(&h)?;
            }
        }
        let h = self.mid.forward(&h)?;
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}

#[derive(Debug, Clone)]
pub struct Decoder {
    conv_in: Conv2d,
    mid: VaeMidBlock,
    up: Vec<(Vec<ResnetBlock2D>, Option<Upsample2D>)>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(c: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let reversed: Vec<usize> = c.block_out_channels.iter().rev().cloned().collect();
        let groups = c.norm_num_groups;
        let mut up = Vec::new();
        let mut prev = reversed[0];
        for (i, cout) in reversed.iter().enumerate() {
            let vb_block = vb.pp(format!("up_blocks.{i}"));
            let resnets = (0..c.layers_per_block + 1)
                .map(|j| {
                    ResnetBlock2D::new(
                        if j == 0 { prev } else { *cout },
                        *cout,
                        &vae_resnet(groups),
                        vb_block.pp(format!("resnets.{j}")),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let upsampler = if i + 1 < reversed.len() {
                Some(Upsample2D::new(*cout, vb_block.pp("upsamplers.0"))?)
            } else {
                None
            };
            up.push((resnets, upsampler));
            prev = *cout;
        }
        let first = c.block_out_channels[0];
        Ok(Self {
            conv_in: conv3x3(c.latent_channels, reversed[0], 1, 1, vb.pp("conv_in"))?,
            mid: VaeMidBlock::new(
                reversed[0],
                groups,
                c.mid_block_add_attention,
                vb.pp("mid_block"),
            )?,
            up,
            conv_norm_out: group_norm(groups, first, 1e-6, vb.pp("conv_norm_out"))?,
            conv_out: conv3x3(first, c.out_channels, 1, 1, vb.pp("conv_out"))?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.mid.forward(&self.conv_in.forward(z)?)?;
        for (resnets, upsampler) in &self.up {
            for r in resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(u) = upsampler {
                h = u.forward(&h, None)?;
            }
        }
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&h)?)
    }
}

/// The encoder's posterior q(z | x) = N(mean, exp(logvar)), logvar clamped to [-30, 20].
pub struct DiagonalGaussian {
    pub mean: Tensor,
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// A draw mean + exp(logvar / 2) * noise.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        &self.mean + (self.logvar.affine(0.5, 0.0)?.exp()? * noise)?
    }
}

#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    pub config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
}

impl AutoencoderKL {
    pub fn new(config: VaeConfig, vb: VarBuilder) -> crate::Result<Self> {
        config.validate()?;
        let latent = config.latent_channels;
        Ok(Self {
            encoder: Encoder::new(&config, vb.pp("encoder"))?,
            decoder: Decoder::new(&config, vb.pp("decoder"))?,
            quant_conv: if config.use_quant_conv {
                Some(conv1x1(2 * latent, 2 * latent, vb.pp("quant_conv"))?)
            } else {
                None
            },
            post_quant_conv: if config.use_post_quant_conv {
                Some(conv1x1(latent, latent, vb.pp("post_quant_conv"))?)
            } else {
                None
            },
            config,
        })
    }

    /// Images in [-1, 1] (B, 3, H, W) to the latent posterior (unscaled).
    pub fn encode(&self, x: &Tensor) -> Result<DiagonalGaussian> {
        let dtype = activation_dtype(self.encoder.conv_in.dtype(), x.device());
        let mut moments = self.encoder.forward(&x.to_dtype(dtype)?)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        let latent = self.config.latent_channels;
        let moments = moments.to_dtype(x.dtype())?;
        Ok(DiagonalGaussian {
            mean: moments.narrow(1, 0, latent)?,
            logvar: moments.narrow(1, latent, latent)?.clamp(-30.0, 20.0)?,
        })
    }

    /// Raw latents (already divided by the scaling factor) to images, unclamped.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let output_dtype = z.dtype();
        let z = z.to_dtype(activation_dtype(self.decoder.conv_in.dtype(), z.device()))?;
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(&z)?,
            None => z,
        };
        self.decoder.forward(&z)?.to_dtype(output_dtype)
    }
}
