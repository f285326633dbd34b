//! Pipelines: a Stable Diffusion model folder loaded as one bundle, classifier-free guidance,
//! and txt2img.

pub mod concepts;
pub mod convert;
pub mod guidance;
pub mod pixel;
pub mod pixel_config;
pub mod request;
pub mod source;
pub mod txt2img;

use crate::error::{file_error, Error, Result};
use crate::model::config::read_json;
use crate::model::lora::{add_deltas, Component, LoraFile};
use crate::model::taesd::TinyAutoencoder;
use crate::model::text::ClipTextModel;
use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::AutoencoderKL;
use crate::sampler::SchedulerConfig;
use crate::tokenizer::ClipTokenizer;
use crate::weights::{load_component, Attachments, ComponentWeights};
use candle_core::{DType, Device, Tensor};
use source::PipelineParts;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Dtype of the text encoder and U-Net.
    pub dtype: DType,
    /// Whether the text encoders' and U-Net's linear and convolution weights are held as 8-bit
    /// integers with a scale per output channel (`ops::q8`; `--dtype q8`), their other weights
    /// in `dtype`. A q8 file's layers are 8-bit either way.
    pub q8: bool,
    /// Dtype of the VAE: f32 unless asked, since f16 SD VAEs overflow to black images.
    pub vae_dtype: DType,
    pub device: Device,
    /// LoRA files merged into the text encoder and U-Net, each with its multiplier.
    pub loras: Vec<(PathBuf, f64)>,
    /// A TAESD (`AutoencoderTiny`) folder or hub id whose decoder turns latents into pictures
    /// instead of the VAE's (previews and final images); the VAE still encodes init images.
    pub vae_decoder: Option<String>,
    /// A TAESD folder or hub id for previews only ([`StableDiffusion::decode_preview`]); final
    /// images keep the VAE.
    pub preview_decoder: Option<String>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            q8: false,
            vae_dtype: DType::F32,
            device: Device::Cpu,
            loras: Vec::new(),
            vae_decoder: None,
            preview_decoder: None,
        }
    }
}

/// Estimated bytes of working memory of the two largest stages of a generation.
#[derive(Debug, Clone, Copy)]
pub struct WorkingMemory {
    pub unet_step: f64,
    pub vae_decode: f64,
}

impl WorkingMemory {
    /// The stages run one after the other, so the larger one sets the peak.
    pub fn peak(&self) -> f64 {
        self.unet_step.max(self.vae_decode)
    }
}

/// A prompt's text conditioning.
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    /// (1, 77, D): the states cross-attention reads.
    pub context: Tensor,
    /// (1, P): SDXL's pooled embedding.
    pub pooled: Option<Tensor>,
}

impl PromptEmbeds {
    /// Zeros of the same shapes: SDXL's negative conditioning when no negative prompt is given
    /// and `force_zeros_for_empty_prompt` is set.
    pub fn zeros_like(&self) -> Result<Self> {
        Ok(Self {
            context: self.context.zeros_like()?,
            pooled: self.pooled.as_ref().map(Tensor::zeros_like).transpose()?,
        })
    }
}

/// A Stable Diffusion pipeline folder in the diffusers layout, loaded. Cloning shares the
/// weights.
#[derive(Clone)]
pub struct StableDiffusion {
    pub root: PathBuf,
    pub kind: PipelineKind,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    /// SDXL's second tokenizer and text encoder (`CLIPTextModelWithProjection`).
    pub tokenizer_2: Option<ClipTokenizer>,
    pub text_encoder_2: Option<ClipTextModel>,
    /// With no negative prompt, guide against zero text states and a zero pooled embedding
    /// instead of the encoded empty string (SDXL's `force_zeros_for_empty_prompt`).
    pub force_zeros_for_empty_prompt: bool,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    /// TAESD's decoder: for every picture (`LoadOptions::vae_decoder`) or for previews only
    /// (`LoadOptions::preview_decoder`).
    pub tiny_vae: Option<TinyAutoencoder>,
    /// Final images come from `tiny_vae` too, not only previews.
    pub tiny_vae_for_images: bool,
    pub scheduler: SchedulerConfig,
    pub options: LoadOptions,
}

/// The pipeline families this crate runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipelineKind {
    /// SD 1.x, 2.x and Turbo: one CLIP text encoder.
    StableDiffusion,
    /// SDXL and SDXL-Turbo: two text encoders and added size conditions.
    StableDiffusionXl,
}

/// The pipeline family a `model_index.json` names, and its `force_zeros_for_empty_prompt`
/// (diffusers' default for SDXL: true).
pub fn check_model_index(index_path: &Path) -> Result<(PipelineKind, bool)> {
    let index: serde_json::Value = read_json(index_path)?;
    let class = index
        .get("_class_name")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let kind = match class {
        "StableDiffusionPipeline"
        | "StableDiffusionImg2ImgPipeline"
        | "StableDiffusionInpaintPipeline" => PipelineKind::StableDiffusion,
        "StableDiffusionXLPipeline"
        | "StableDiffusionXLImg2ImgPipeline"
        | "StableDiffusionXLInpaintPipeline" => PipelineKind::StableDiffusionXl,
        _ => {
            return Err(file_error(
                index_path,
                format!(
                    "_class_name = {class:?} is not a model type this crate runs; expected \
                     StableDiffusionPipeline (SD 1.x, 2.x, Turbo) or StableDiffusionXLPipeline \
                     (or their Img2Img and Inpaint variants)"
                ),
            ))
        }
    };
    let force_zeros = match index.get("force_zeros_for_empty_prompt") {
        None | Some(serde_json::Value::Null) => kind == PipelineKind::StableDiffusionXl,
        Some(serde_json::Value::Bool(b)) => *b,
        Some(other) => {
            return Err(file_error(
                index_path,
                format!(
                    "force_zeros_for_empty_prompt = {other} is not allowed; expected true or false"
                ),
            ))
        }
    };
    Ok((kind, force_zeros))
}

/// The weights file of a component folder: `<stem>.safetensors`, or the fp16 variant.
pub fn weights_file(dir: &Path, stem: &str) -> Result<PathBuf> {
    for name in [
        format!("{stem}.safetensors"),
        format!("{stem}.fp16.safetensors"),
    ] {
        let path = dir.join(&name);
        if path.exists() {
            return Ok(path);
        }
    }
    for pickle in [format!("{stem}.bin"), format!("{stem}.ckpt")] {
        let path = dir.join(&pickle);
        if path.exists() {
            return crate::weights::check_safetensors(&path).map(|_| path);
        }
    }
    Err(file_error(
        &dir.join(format!("{stem}.safetensors")),
        "missing: each component folder needs its safetensors weights",
    ))
}

/// The merged updates of `loras` for each of the model's `components` (with its weights
/// file). A file that adapts a component the model lacks (a second text encoder for an SD 1.x
/// model) is refused by name.
fn lora_updates(
    loras: &[(PathBuf, f64)],
    components: &[(Component, &ComponentWeights)],
) -> Result<HashMap<Component, Attachments>> {
    let mut updates: HashMap<Component, Attachments> = components
        .iter()
        .map(|(c, _)| (*c, Attachments::default()))
        .collect();
    if loras.is_empty() {
        return Ok(updates);
    }
    let shapes = components
        .iter()
        .map(|(c, weights)| Ok((*c, weights.shapes()?)))
        .collect::<Result<HashMap<_, _>>>()?;
    for (path, multiplier) in loras {
        let file = LoraFile::load(path)?;
        if let Some(pair) = file
            .pairs
            .iter()
            .find(|p| !shapes.contains_key(&p.component))
        {
            return Err(file_error(
                path,
                format!(
                    "adapts the {} (module {}), which this model does not have: is the file \
                     for another model?",
                    pair.component.name(),
                    pair.module
                ),
            ));
        }
        for (component, component_shapes) in &shapes {
            let deltas = file.deltas(*component, component_shapes, *multiplier)?;
            let entry = updates.entry(*component).or_default();
            add_deltas(&mut entry.deltas, deltas)?;
        }
    }
    Ok(updates)
}

/// Loads a TAESD folder (or hub id) to decode this model's latents, refusing one whose latent
/// channels or scale differ from the VAE's.
fn load_tiny_vae(
    spec: &str,
    vae: &AutoencoderKL,
    dtype: DType,
    device: &Device,
) -> Result<TinyAutoencoder> {
    let dir = crate::hub::resolve(spec, false)?;
    let (config, weights) = crate::model::taesd::folder_files(&dir)?;
    let vae_factor = 1 << (vae.config.block_out_channels.len() - 1);
    if config.latent_channels != vae.config.latent_channels || config.scale_factor() != vae_factor {
        return Err(crate::error::file_error(
            &dir,
            format!(
                "decodes {} latent channels at {}x; this model's VAE has {} at {}x (TAESD for \
                 SD 1.x/2.x is madebyollin/taesd, for SDXL madebyollin/taesdxl)",
                config.latent_channels,
                config.scale_factor(),
                vae.config.latent_channels,
                vae_factor
            ),
        ));
    }
    crate::weights::load_checked(&weights, dtype, device, |vb| {
        TinyAutoencoder::new(&config, vb)
    })
}

impl StableDiffusion {
    /// Loads `model_index.json`, `tokenizer/`, `text_encoder/`, `unet/`, `vae/`, `scheduler/`.
    pub fn load_dir(root: &Path, options: LoadOptions) -> Result<Self> {
        Self::from_parts(source::folder_parts(root)?, root, options)
    }

    /// Loads a single-file checkpoint in the original layout (see [`source`]); also says
    /// what it was recognised as.
    pub fn load_single_file(
        path: &Path,
        single_file: &source::SingleFileOptions,
        options: LoadOptions,
    ) -> Result<(Self, source::Recognised)> {
        let (parts, recognised) = source::single_file_parts(path, single_file)?;
        Ok((Self::from_parts(parts, path, options)?, recognised))
    }

    /// Loads what `--model` names (see [`source::model_parts`]); also says, for a single
    /// file, what it was recognised as.
    pub fn load_model(
        spec: &str,
        fp16: bool,
        single_file: &source::SingleFileOptions,
        options: LoadOptions,
    ) -> Result<(Self, Option<source::Recognised>)> {
        let model = source::model_parts(spec, fp16, single_file)?;
        let sd = Self::from_parts(model.parts, &model.location, options)?;
        Ok((sd, model.recognised))
    }

    /// A short name for the model (PNG metadata): a single file's stem, else the folder's name.
    pub fn name(&self) -> String {
        match self.root.is_file() {
            true => self.root.file_stem(),
            false => self.root.file_name(),
        }
        .and_then(|n| n.to_str())
        .unwrap_or("model")
        .to_string()
    }

    /// Builds the pipeline from its parts, merging `options.loras` as the weights load.
    pub fn from_parts(parts: PipelineParts, root: &Path, mut options: LoadOptions) -> Result<Self> {
        options.dtype = crate::ops::gemm_bf16::weight_dtype(options.dtype, &options.device);
        options.vae_dtype = crate::ops::gemm_bf16::weight_dtype(options.vae_dtype, &options.device);
        let device = &options.device;
        let kind = parts.kind;
        let (text_config, text_weights) = parts.text_encoder;
        let (unet_config, unet_weights) = parts.unet;
        let mut components = vec![
            (Component::TextEncoder, &text_weights),
            (Component::Unet, &unet_weights),
        ];
        if let Some((_, weights)) = &parts.text_encoder_2 {
            components.push((Component::TextEncoder2, weights));
        }
        let mut loras = lora_updates(&options.loras, &components)?;
        let mut take = |c: Component| loras.remove(&c).unwrap_or_default();
        let text_encoder = load_component(
            &text_weights,
            options.dtype,
            options.q8,
            device,
            take(Component::TextEncoder),
            |vb| ClipTextModel::new(text_config, vb),
        )?;
        let unet = load_component(
            &unet_weights,
            options.dtype,
            options.q8,
            device,
            take(Component::Unet),
            |vb| UNet2DConditionModel::new(unet_config, vb),
        )?;
        let (vae_config, vae_weights) = parts.vae;
        let upcast = kind == PipelineKind::StableDiffusionXl
            && vae_config.force_upcast
            && options.vae_dtype == DType::F16;
        let vae_dtype = if upcast {
            DType::F32
        } else {
            options.vae_dtype
        };
        let vae = load_component(
            &vae_weights,
            vae_dtype,
            false,
            device,
            Attachments::default(),
            |vb| AutoencoderKL::new(vae_config, vb),
        )?;
        let text_encoder_2 = match parts.text_encoder_2 {
            None => None,
            Some((config, weights)) => Some(load_component(
                &weights,
                options.dtype,
                options.q8,
                device,
                take(Component::TextEncoder2),
                |vb| ClipTextModel::new(config, vb),
            )?),
        };
        options.vae_dtype = vae_dtype;
        let tiny_spec = match (&options.vae_decoder, &options.preview_decoder) {
            (Some(_), Some(_)) => {
                return Err(Error::Msg(
                    "give a VAE decoder (used for previews too) or a preview decoder, not both"
                        .into(),
                ))
            }
            (spec, None) | (None, spec) => spec.as_deref(),
        };
        let tiny_vae = match tiny_spec {
            Some(spec) => Some(load_tiny_vae(spec, &vae, vae_dtype, device)?),
            None => None,
        };
        let tiny_vae_for_images = options.vae_decoder.is_some();
        Ok(Self {
            root: root.to_path_buf(),
            kind,
            tokenizer: parts.tokenizer,
            text_encoder,
            tokenizer_2: parts.tokenizer_2,
            text_encoder_2,
            force_zeros_for_empty_prompt: parts.force_zeros_for_empty_prompt,
            unet,
            vae,
            tiny_vae,
            tiny_vae_for_images,
            scheduler: parts.scheduler,
            options,
        })
    }

    /// The text conditioning of one prompt: (1, 77, D) states and, for SDXL, the (1, P)
    /// pooled embedding; also whether the prompt was truncated. SD 1.x/2.x use the first
    /// encoder's final states; SDXL the penultimate states of both encoders side by side and
    /// the second's projected pooled output.
    pub fn encode_prompt(&self, prompt: &str) -> Result<(PromptEmbeds, bool)> {
        let device = &self.options.device;
        let ids = |tokenizer: &ClipTokenizer| -> Result<(Tensor, bool)> {
            let encoded = tokenizer.encode(prompt)?;
            let truncated = encoded.untruncated_len > tokenizer.max_length;
            Ok((
                Tensor::new(encoded.ids.as_slice(), device)?.unsqueeze(0)?,
                truncated,
            ))
        };
        let (ids_1, truncated) = ids(&self.tokenizer)?;
        match (&self.tokenizer_2, &self.text_encoder_2) {
            (Some(tokenizer_2), Some(encoder_2)) => {
                let (ids_2, truncated_2) = ids(tokenizer_2)?;
                let states_1 = self.text_encoder.forward_states(&ids_1)?;
                let states_2 = encoder_2.forward_states(&ids_2)?;
                let context = Tensor::cat(&[&states_1.penultimate, &states_2.penultimate], 2)?;
                let pooled = states_2.pooled.ok_or_else(|| {
                    Error::Msg(
                        "text_encoder_2 has no text_projection; SDXL needs \
                         CLIPTextModelWithProjection weights"
                            .into(),
                    )
                })?;
                Ok((
                    PromptEmbeds {
                        context,
                        pooled: Some(pooled),
                    },
                    truncated || truncated_2,
                ))
            }
            _ => Ok((
                PromptEmbeds {
                    context: self.text_encoder.forward(&ids_1)?,
                    pooled: None,
                },
                truncated,
            )),
        }
    }

    /// Latent channels and the pixel-per-latent factor of the VAE.
    pub fn latent_shape(&self, width: usize, height: usize) -> (usize, usize, usize) {
        let factor = 1 << (self.vae.config.block_out_channels.len() - 1);
        (
            self.vae.config.latent_channels,
            height / factor,
            width / factor,
        )
    }

    /// The working memory (beyond the loaded weights) that generating `batch` images of
    /// `width` x `height` takes, estimated from the model's widths. Calibrated on SD 1.5 in f32
    /// on the CPU (`diffuse bench`, README): a CFG U-Net step took 309 MiB above its weights at
    /// 256x256 and 589 MiB at 512x512, so 216 MiB plus about 37 values per latent pixel per
    /// channel of the first block per batch row; the 512x512 VAE decode took 1167 MiB, of which
    /// the mid-block attention's (N x N) scores, softmax and product are about 3 N^2 values (N
    /// latent pixels; that attention is not blocked) and the rest about 7.6 values per pixel
    /// per channel of the decoder's widest-resolution block.
    pub fn working_memory_estimate(
        &self,
        width: usize,
        height: usize,
        batch: usize,
        guided: bool,
    ) -> WorkingMemory {
        let factor = self.vae_scale_factor() as f64;
        let pixels = width as f64 * height as f64;
        let latent_pixels = pixels / (factor * factor);
        let batch = batch as f64;
        let unet_rows = if guided { 2.0 * batch } else { batch };
        let unet_bytes = self.options.dtype.size_in_bytes() as f64;
        let vae_bytes = self.options.vae_dtype.size_in_bytes() as f64;
        let unet_channels = self
            .unet
            .config
            .block_out_channels
            .first()
            .copied()
            .unwrap_or(0);
        let vae_channels = self
            .vae
            .config
            .block_out_channels
            .first()
            .copied()
            .unwrap_or(0);
        let unet_step = 216.0 * (1 << 20) as f64
            + 37.0 * latent_pixels * unet_channels as f64 * unet_rows * unet_bytes;
        let mid_attention = 3.0 * batch * latent_pixels * latent_pixels * vae_bytes;
        let vae_decode = 7.6 * pixels * vae_channels as f64 * batch * vae_bytes + mid_attention;
        WorkingMemory {
            unet_step,
            vae_decode,
        }
    }

    /// The size the model was trained at: its U-Net config's `sample_size` latents (64 when
    /// the config leaves it out, SD 1.x's) times the VAE's factor.
    pub fn native_size(&self) -> usize {
        self.unet.config.sample_size.unwrap_or(64) * self.vae_scale_factor()
    }

    pub fn vae_scale_factor(&self) -> usize {
        1 << (self.vae.config.block_out_channels.len() - 1)
    }

    /// Latents (scaled, as the U-Net sees them) to images in [0, 1], (B, 3, H, W), f32: by
    /// TAESD's decoder when it is loaded for images, else the VAE's.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        match &self.tiny_vae {
            Some(tiny) if self.tiny_vae_for_images => self.decode_tiny(tiny, latents),
            _ => self.decode_vae(latents),
        }
    }

    /// [`Self::decode`] for a progress preview: TAESD's decoder whenever one is loaded.
    pub fn decode_preview(&self, latents: &Tensor) -> Result<Tensor> {
        match &self.tiny_vae {
            Some(tiny) => self.decode_tiny(tiny, latents),
            None => self.decode_vae(latents),
        }
    }

    fn decode_tiny(&self, tiny: &TinyAutoencoder, latents: &Tensor) -> Result<Tensor> {
        let c = &tiny.config;
        let z = latents
            .to_dtype(self.options.vae_dtype)?
            .affine(1.0 / c.scaling_factor, c.shift_factor)?;
        let image = tiny.decode(&z)?.to_dtype(DType::F32)?;
        Ok(image.affine(0.5, 0.5)?.clamp(0.0, 1.0)?)
    }

    fn decode_vae(&self, latents: &Tensor) -> Result<Tensor> {
        let c = &self.vae.config;
        let mut z = latents
            .to_dtype(self.options.vae_dtype)?
            .affine(1.0 / c.scaling_factor, 0.0)?;
        if let Some(shift) = c.shift_factor {
            z = z.affine(1.0, shift)?;
        }
        let image = self.vae.decode(&z)?.to_dtype(DType::F32)?;
        Ok(image.affine(0.5, 0.5)?.clamp(0.0, 1.0)?)
    }

    /// Images in [0, 1] (B, 3, H, W) to scaled latents: the posterior mean, or a draw from it
    /// when `noise` is given.
    pub fn encode_image(&self, image: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let c = &self.vae.config;
        let image = match (image.dim(1)?, c.in_channels) {
            // A grey-level model (the embedded one) sees colour pictures as their luma
            // (ITU-R BT.601 weights, as PIL's convert("L")).
            (3, 1) => {
                let weights = Tensor::new(&[0.299f32, 0.587, 0.114], image.device())?
                    .to_dtype(image.dtype())?
                    .reshape((1, 3, 1, 1))?;
                image.broadcast_mul(&weights)?.sum_keepdim(1)?
            }
            _ => image.clone(),
        };
        let posterior = self
            .vae
            .encode(&image.to_dtype(self.options.vae_dtype)?.affine(2.0, -1.0)?)?;
        let mut z = match noise {
            Some(n) => posterior.sample(&n.to_dtype(self.options.vae_dtype)?)?,
            None => posterior.mean,
        };
        if let Some(shift) = c.shift_factor {
            z = z.affine(1.0, -shift)?;
        }
        Ok(z.affine(c.scaling_factor, 0.0)?
            .to_dtype(self.options.dtype)?)
    }
}
