//! What fine-tuning trains on: every image of a folder encoded once by the frozen VAE (and its
//! mirror image, for flips), and every caption by the frozen text encoder.

use crate::data::folder::{load_square, ImageFolder, Skipped};
use crate::error::{Error, Result};
use crate::pipeline::StableDiffusion;
use candle_core::{DType, Tensor};

/// What the U-Net trains on, encoded once: (N, C, h, w) scaled latents (and those of the
/// mirrored images when flipping) and (N, 77, D) caption states.
pub struct TrainingData {
    pub latents: Tensor,
    pub latents_flipped: Option<Tensor>,
    pub text: Tensor,
}

impl TrainingData {
    pub fn len(&self) -> usize {
        self.latents.dim(0).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The image mirrored left-right: (C, H, W) with the last axis reversed.
pub fn mirror(image: &Tensor) -> Result<Tensor> {
    let width = image.dim(candle_core::D::Minus1)?;
    let reversed: Vec<u32> = (0..width as u32).rev().collect();
    let index = Tensor::from_vec(reversed, width, image.device())?;
    Ok(image.index_select(&index, image.rank() - 1)?)
}

impl TrainingData {
    /// Encodes every image of `folder` at `resolution` with the pipeline's VAE and text encoder;
    /// images that fail to decode are skipped and returned.
    pub fn encode(
        sd: &StableDiffusion,
        folder: &ImageFolder,
        resolution: u32,
        random_flip: bool,
    ) -> Result<(Self, Vec<Skipped>)> {
        let device = sd.options.device.clone();
        let factor = sd.vae_scale_factor() as u32;
        if resolution == 0 || !resolution.is_multiple_of(factor) {
            return Err(Error::bad_value(
                "--resolution",
                resolution,
                &format!("a positive multiple of {factor} (the VAE's downsampling)"),
            ));
        }
        let mut skipped = Vec::new();
        let (mut latents, mut flipped, mut text) = (Vec::new(), Vec::new(), Vec::new());
        for example in &folder.examples {
            let image = match load_square(&example.path, resolution, &device) {
                Ok(image) => image,
                Err(e) => {
                    skipped.push(Skipped {
                        path: example.path.clone(),
                        reason: e.to_string(),
                    });
                    continue;
                }
            };
            latents.push(sd.encode_image(&image.unsqueeze(0)?, None)?);
            if random_flip {
                flipped.push(sd.encode_image(&mirror(&image)?.unsqueeze(0)?, None)?);
            }
            text.push(sd.encode_prompt(&example.caption)?.0.context);
        }
        if latents.is_empty() {
            return Err(Error::File {
                path: folder.root.display().to_string(),
                message: "no image could be decoded".into(),
            });
        }
        let stack = |parts: &[Tensor]| -> Result<Tensor> {
            Ok(Tensor::cat(parts, 0)?.to_dtype(DType::F32)?.detach())
        };
        let data = Self {
            latents: stack(&latents)?,
            latents_flipped: if random_flip {
                Some(stack(&flipped)?)
            } else {
                None
            },
            text: stack(&text)?,
        };
        Ok((data, skipped))
    }
}
