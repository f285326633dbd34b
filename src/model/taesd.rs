//! diffusers' `AutoencoderTiny`: TAESD (Boer Bohan 2023), a small all-convolutional autoencoder
//! distilled from Stable Diffusion's VAE. Its decoder reads the diffusion model's (scaled)
//! latents directly and costs a small share of the KL decoder's work, which makes it the decoder
//! for previews and for fast final images.
//!
//! Weight names follow diffusers' `nn.Sequential` numbering, in which activations and upsampling
//! layers take an index without holding weights: `encoder.layers.{i}` and `decoder.layers.{i}`,
//! a block's convolutions at `conv.0`, `conv.2`, `conv.4`.

use super::blocks::{upsample_nearest_2x, Conv2d};
use crate::error::{Error, Result};
use candle_core::{Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use serde::Deserialize;
use std::path::Path;

/// `AutoencoderTiny`'s config.json.
#[derive(Debug, Clone, Deserialize)]
pub struct TinyAutoencoderConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    #[serde(default = "sixty_four_each")]
    pub encoder_block_out_channels: Vec<usize>,
    #[serde(default = "sixty_four_each")]
    pub decoder_block_out_channels: Vec<usize>,
    #[serde(default = "relu")]
    pub act_fn: String,
    #[serde(default = "nearest")]
    pub upsample_fn: String,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "two")]
    pub upsampling_scaling_factor: usize,
    #[serde(default = "encoder_blocks")]
    pub num_encoder_blocks: Vec<usize>,
    #[serde(default = "decoder_blocks")]
    pub num_decoder_blocks: Vec<usize>,
    #[serde(default = "one")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: f64,
}

fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn two() -> usize {
    2
}
fn one() -> f64 {
    1.0
}
fn relu() -> String {
    "relu".into()
}
fn nearest() -> String {
    "nearest".into()
}
fn sixty_four_each() -> Vec<usize> {
    vec![64; 4]
}
fn encoder_blocks() -> Vec<usize> {
    vec![1, 3, 3, 3]
}
fn decoder_blocks() -> Vec<usize> {
    vec![3, 3, 3, 1]
}

impl TinyAutoencoderConfig {
    pub fn read(path: &Path) -> Result<Self> {
        let config: Self = super::config::read_json(path)?;
        config.check(path)?;
        Ok(config)
    }

    /// What this implementation builds: ReLU, nearest 2x upsampling, and stages of one width
    /// (as diffusers itself requires, since its stage convolutions keep the width).
    fn check(&self, path: &Path) -> Result<()> {
        let bad = |key: &str, value: String, allowed: &str| {
            Err(crate::error::file_error(
                path,
                format!("{key} = {value} is not supported; expected {allowed}"),
            ))
        };
        if self.act_fn != "relu" {
            return bad("act_fn", self.act_fn.clone(), "relu");
        }
        if self.upsample_fn != "nearest" || self.upsampling_scaling_factor != 2 {
            return bad(
                "upsample_fn, upsampling_scaling_factor",
                format!("{}, {}", self.upsample_fn, self.upsampling_scaling_factor),
                "nearest, 2",
            );
        }
        for (key, widths, blocks) in [
            (
                "encoder_block_out_channels",
                &self.encoder_block_out_channels,
                &self.num_encoder_blocks,
            ),
            (
                "decoder_block_out_channels",
                &self.decoder_block_out_channels,
                &self.num_decoder_blocks,
            ),
        ] {
            if widths.is_empty() || widths.len() != blocks.len() {
                return bad(
                    key,
                    format!("{widths:?} with {blocks:?} blocks"),
                    "one width a stage, as many as the stages' block counts",
                );
            }
            if widths.iter().any(|w| *w != widths[0]) {
                return bad(key, format!("{widths:?}"), "one width for every stage");
            }
        }
        Ok(())
    }

    /// Pixels a latent cell covers: 2 to the number of stages less one.
    pub fn scale_factor(&self) -> usize {
        1 << (self.decoder_block_out_channels.len() - 1)
    }
}

fn conv3x3(cin: usize, cout: usize, stride: usize, bias: bool, vb: VarBuilder) -> Result<Conv2d> {
    let config = Conv2dConfig {
        stride,
        padding: 1,
        ..Default::default()
    };
    let conv = match bias {
        true => candle_nn::conv2d(cin, cout, 3, config, vb)?,
        false => candle_nn::conv2d_no_bias(cin, cout, 3, config, vb)?,
    };
    Ok(Conv2d::from(conv))
}

/// relu(conv(relu(conv(relu(conv(x))))) + x): diffusers' `AutoencoderTinyBlock` (its 1x1 skip
/// convolution exists only between widths, which one-width stages never have).
#[derive(Debug, Clone)]
struct TinyBlock {
    convs: [Conv2d; 3],
}

impl TinyBlock {
    fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        let conv = |k: usize| conv3x3(channels, channels, 1, true, vb.pp(format!("conv.{k}")));
        Ok(Self {
            convs: [conv(0)?, conv(2)?, conv(4)?],
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.convs[0].forward(x)?.relu()?;
        let h = self.convs[1].forward(&h)?.relu()?;
        let h = self.convs[2].forward(&h)?;
        Ok((h + x)?.relu()?)
    }
}

/// One entry of the encoder's or decoder's layer list.
#[derive(Debug, Clone)]
enum Layer {
    Conv(Conv2d),
    Relu,
    Block(TinyBlock),
    Upsample,
}

impl Layer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Layer::Conv(conv) => conv.forward(x)?,
            Layer::Relu => x.relu()?,
            Layer::Block(block) => block.forward(x)?,
            Layer::Upsample => upsample_nearest_2x(x)?,
        })
    }
}

/// The layers applied to `x`, in the dtype the first convolution's weights keep their
/// activations in (`gemm_bf16::activation_dtype`: f32 between bf16 products on a CPU with the
/// pair dot product, where candle's bf16 element-wise kernels took half a bf16 decode), the
/// result in `x`'s dtype.
fn run(layers: &[Layer], x: Tensor) -> Result<Tensor> {
    let weights = layers.iter().find_map(|layer| match layer {
        Layer::Conv(conv) => Some(conv.dtype()),
        _ => None,
    });
    let dtype = x.dtype();
    let activations = weights.map_or(dtype, |w| {
        crate::ops::gemm_bf16::activation_dtype(w, x.device())
    });
    let out = layers
        .iter()
        .try_fold(x.to_dtype(activations)?, |h, layer| layer.forward(&h))?;
    Ok(out.to_dtype(dtype)?)
}

#[derive(Debug, Clone)]
pub struct TinyAutoencoder {
    pub config: TinyAutoencoderConfig,
    encoder: Vec<Layer>,
    decoder: Vec<Layer>,
}

impl TinyAutoencoder {
    pub fn new(config: &TinyAutoencoderConfig, vb: VarBuilder) -> Result<Self> {
        let mut encoder = Vec::new();
        let evb = vb.pp("encoder.layers");
        let width = config.encoder_block_out_channels[0];
        for (stage, blocks) in config.num_encoder_blocks.iter().enumerate() {
            let vb = evb.pp(encoder.len().to_string());
            encoder.push(Layer::Conv(match stage {
                0 => conv3x3(config.in_channels, width, 1, true, vb)?,
                _ => conv3x3(width, width, 2, false, vb)?,
            }));
            for _ in 0..*blocks {
                let vb = evb.pp(encoder.len().to_string());
                encoder.push(Layer::Block(TinyBlock::new(width, vb)?));
            }
        }
        let vb_out = evb.pp(encoder.len().to_string());
        encoder.push(Layer::Conv(conv3x3(
            width,
            config.latent_channels,
            1,
            true,
            vb_out,
        )?));

        let dvb = vb.pp("decoder.layers");
        let width = config.decoder_block_out_channels[0];
        let mut decoder = vec![
            Layer::Conv(conv3x3(
                config.latent_channels,
                width,
                1,
                true,
                dvb.pp("0"),
            )?),
            Layer::Relu,
        ];
        let stages = config.num_decoder_blocks.len();
        for (stage, blocks) in config.num_decoder_blocks.iter().enumerate() {
            let last = stage + 1 == stages;
            for _ in 0..*blocks {
                let vb = dvb.pp(decoder.len().to_string());
                decoder.push(Layer::Block(TinyBlock::new(width, vb)?));
            }
            if !last {
                decoder.push(Layer::Upsample);
            }
            let vb = dvb.pp(decoder.len().to_string());
            let out = if last { config.out_channels } else { width };
            decoder.push(Layer::Conv(conv3x3(width, out, 1, last, vb)?));
        }
        Ok(Self {
            config: config.clone(),
            encoder,
            decoder,
        })
    }

    /// Images in [-1, 1] to latents (the encoder sees them in [0, 1]).
    pub fn encode(&self, image: &Tensor) -> Result<Tensor> {
        run(&self.encoder, image.affine(0.5, 0.5)?)
    }

    /// Latents to images in about [-1, 1]: the latents are first bounded softly to (-3, 3) by
    /// 3 tanh(z / 3), as TAESD was trained.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let bounded = (latents.affine(1.0 / 3.0, 0.0)?.tanh()? * 3.0)?;
        Ok(run(&self.decoder, bounded)?.affine(2.0, -1.0)?)
    }
}

/// A TAESD folder's config and weights file (`config.json`, `diffusion_pytorch_model.safetensors`).
pub fn folder_files(dir: &Path) -> Result<(TinyAutoencoderConfig, std::path::PathBuf)> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(Error::File {
            path: dir.display().to_string(),
            message: "is not an AutoencoderTiny (TAESD) folder: it has no config.json".into(),
        });
    }
    let config = TinyAutoencoderConfig::read(&config_path)?;
    let weights = dir.join("diffusion_pytorch_model.safetensors");
    if !weights.is_file() {
        return Err(Error::File {
            path: dir.display().to_string(),
            message: "has no diffusion_pytorch_model.safetensors".into(),
        });
    }
    Ok((config, weights))
}
