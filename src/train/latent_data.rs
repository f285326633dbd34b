//! The training set of a latent run: every image of the captioned IDX folders encoded once by
//! the frozen autoencoder (and cached beside the run), with the token ids of every caption.

use super::config::LdmTrainConfig;
use crate::checkpoint;
use crate::data::idx::Split;
use crate::data::image_set::ImageSet;
use crate::error::{Error, Result};
use crate::model::config::{read_json, VaeConfig};
use crate::model::vae::AutoencoderKL;
use crate::pipeline::weights_file;
use crate::tokenizer::ClipTokenizer;
use crate::weights::load_checked;
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

/// The frozen parts and the cached training set: scaled latents of every image, each image's
/// class, and the token ids of every caption of every class.
pub struct LatentData {
    /// (N, C, h, w) posterior means times the VAE's scaling factor.
    pub latents: Tensor,
    /// Each image's caption set.
    pub classes: Vec<usize>,
    /// The images training draws from, an emoji `emoji_repeat` times (see `ImageSet::pool`).
    pub pool: Vec<usize>,
    /// `caption_ids[class][k]`: the `max_length` ids of the k-th caption of `class`.
    pub caption_ids: Vec<Vec<Vec<u32>>>,
    /// The captions themselves, for the pipeline's evaluation prompts.
    pub captions: Vec<Vec<String>>,
    /// The ids of the empty caption (the unconditional input).
    pub empty_ids: Vec<u32>,
}

impl LatentData {
    /// Reads every source's split (IDX folders with their `classes.json`, emoji folders) at the
    /// autoencoder's channel count, and encodes the images with the autoencoder in
    /// `config.model.vae` (posterior means, scaled), 500 at a time.
    ///
    /// With `cache`, the latents are read from that file when it was written for the same
    /// autoencoder (weights and config), folders, image size and split, and written there
    /// otherwise: encoding every image takes minutes on a CPU.
    pub fn load(
        config: &LdmTrainConfig,
        split: Split,
        cache: Option<&Path>,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        let vae_dir = &config.model.vae;
        let vae_config: VaeConfig = read_json(&vae_dir.join("config.json"))?;
        let vae_weights = weights_file(vae_dir, "diffusion_pytorch_model")?;
        let vae = load_checked(&vae_weights, DType::F32, &Device::Cpu, |vb| {
            AutoencoderKL::new(vae_config.clone(), vb)
        })?;
        let cache_key = latent_cache_key(config, split, &vae_weights)?;
        let cached = cache
            .filter(|path| path.exists())
            .and_then(|path| checkpoint::load(path, &Device::Cpu).ok())
            .filter(|loaded| loaded.metadata.get(CACHE_KEY) == Some(&cache_key))
            .and_then(|mut loaded| loaded.tensors.remove("latents"));
        let tokenizer = ClipTokenizer::from_dir(&config.model.tokenizer)?;
        let images = ImageSet::load(
            &config.data.sources(),
            split,
            config.data.image_size,
            vae_config.in_channels,
            config.data.background,
            true,
        )?;
        let total = images.classes.len();
        let latents = match cached.filter(|l| l.dim(0).ok() == Some(total)) {
            Some(latents) => latents,
            None => {
                let mut chunks = Vec::new();
                let all: Vec<usize> = (0..total).collect();
                for indices in all.chunks(500) {
                    let x = images.image_batch(indices, &Device::Cpu)?;
                    let mean = vae.encode(&x)?.mean;
                    chunks.push(mean.affine(vae_config.scaling_factor, 0.0)?);
                    progress(indices[indices.len() - 1] + 1, total);
                }
                let latents = Tensor::cat(&chunks, 0)?;
                if let Some(path) = cache {
                    checkpoint::save(
                        path,
                        &[("latents".to_string(), latents.clone())],
                        &BTreeMap::from([(CACHE_KEY.to_string(), cache_key)]),
                    )?;
                }
                latents
            }
        };
        let ImageSet {
            classes,
            captions,
            pool,
            ..
        } = images;
        let encode = |text: &str| tokenizer.encode(text).map(|e| e.ids);
        let caption_ids = captions
            .iter()
            .map(|own| own.iter().map(|c| encode(c)).collect::<Result<Vec<_>>>())
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            latents,
            classes,
            pool,
            caption_ids,
            captions,
            empty_ids: encode("")?,
        })
    }

    /// The size of the pool training draws from.
    pub fn len(&self) -> usize {
        self.pool.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pool.is_empty()
    }

    pub fn num_classes(&self) -> usize {
        self.caption_ids.len()
    }

    /// (C, h, w) of one latent.
    pub fn latent_dims(&self) -> Result<(usize, usize, usize)> {
        let (_, c, h, w) = self.latents.dims4()?;
        Ok((c, h, w))
    }
}

/// Metadata key of the latent cache: what the latents were computed from.
const CACHE_KEY: &str = "diffuse.latents_of";

/// A digest of everything the cached latents depend on.
fn latent_cache_key(config: &LdmTrainConfig, split: Split, vae_weights: &Path) -> Result<String> {
    use std::hash::{Hash, Hasher};
    let read = |path: &Path| {
        std::fs::read(path).map_err(|e| Error::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    };
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    read(vae_weights)?.hash(&mut hasher);
    read(&config.model.vae.join("config.json"))?.hash(&mut hasher);
    config.data.paths.hash(&mut hasher);
    config.data.image_size.hash(&mut hasher);
    if !config.data.emoji.is_empty() {
        config.data.emoji.hash(&mut hasher);
        config.data.background.hash(&mut hasher);
    }
    if let Some(limit) = config.data.per_class_limit {
        limit.hash(&mut hasher);
    }
    split.stem().hash(&mut hasher);
    Ok(format!("{:016x}", hasher.finish()))
}
