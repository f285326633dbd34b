//! Low-rank adapters (LoRA, Hu et al. 2021, eq. 3): a frozen weight W plus a trainable update,
//! h = W x + (alpha / r) B A x, with A (r, in) and B (out, r).
//!
//! While training, [`LoraLinear`] applies the adapter on the fly, so only A and B get gradients.
//! For inference a LoRA file is merged into the weights it adapts ([`LoraFile::deltas`]), so
//! generation costs nothing extra. Files come in two key layouts:
//! - diffusers/PEFT: `unet.<module>.lora_A.weight` and `lora_B.weight` (older diffusers:
//!   `lora.down`/`lora.up`, `lora_linear_layer.down`/`.up`, `processor.to_q_lora.down`/`.up`);
//!   `text_encoder.` and SDXL's `text_encoder_2.` for the text encoders;
//! - kohya's sd-scripts: `lora_unet_<module, dots as underscores>.lora_down.weight`,
//!   `lora_up.weight` and `alpha` (`lora_te_`, or SDXL's `lora_te1_`/`lora_te2_`, for the text
//!   encoders), the layout of most SD LoRA files people download. SDXL files name U-Net modules
//!   as the original checkpoint does (`input_blocks_4_1_...`), renamed here to diffusers'. Its
//!   convolution adapters (LoCon) merge the same way.

use super::dense::Dense;
use crate::error::{file_error, Error, Result};
use candle_core::{DType, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// PEFT's names of an adapter's two matrices, relative to the adapted module.
pub const DOWN: &str = "lora_A.weight";
pub const UP: &str = "lora_B.weight";

/// Metadata keys of the files this crate writes: alpha and rank give the scale alpha / r.
pub const META_ALPHA: &str = "lora_alpha";
pub const META_RANK: &str = "lora_rank";

/// A linear layer with an optional low-rank adapter, taken from the [`VarBuilder`] at
/// `lora_A.weight` and `lora_B.weight` beside the layer's own weight when it offers them. The
/// adapter is used as given: a scale alpha / r other than 1 is folded into B by whoever supplies
/// it.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    base: Dense,
    adapter: Option<(Linear, Linear)>,
}

impl LoraLinear {
    pub fn new(base: Dense, vb: &VarBuilder) -> candle_core::Result<Self> {
        if !vb.contains_tensor(DOWN) {
            return Ok(Self {
                base,
                adapter: None,
            });
        }
        let down = vb.get_unchecked(DOWN)?;
        let up = vb.get_unchecked(UP)?;
        let (out_dim, in_dim) = base.dims()?;
        let fits = matches!(
            (down.dims(), up.dims()),
            ([rank, i], [o, r]) if *i == in_dim && *o == out_dim && r == rank
        );
        if !fits {
            candle_core::bail!(
                "LoRA adapter of {}: {DOWN} {:?} and {UP} {:?} do not fit its {out_dim}x{in_dim} weight",
                vb.prefix(),
                down.dims(),
                up.dims()
            )
        }
        Ok(Self {
            base,
            adapter: Some((Linear::new(down, None), Linear::new(up, None))),
        })
    }
}

impl LoraLinear {
    /// Whether the base layer's products run in the bf16 pair-dot kernels (a bf16 or q8 model on
    /// a CPU with AVX512_BF16), so that the attention around it may as well.
    pub fn bf16_products(&self) -> bool {
        self.base.bf16_products()
    }

    /// `self.forward(x) + residual`, the residual joining the base layer's sums
    /// ([`Dense::forward_plus`]).
    pub fn forward_plus(&self, x: &Tensor, residual: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.base.forward_plus(x, residual)?;
        match &self.adapter {
            Some((down, up)) => y + up.forward(&down.forward(x)?)?,
            None => Ok(y),
        }
    }
}

impl Module for LoraLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.base.forward(x)?;
        match &self.adapter {
            Some((down, up)) => y + up.forward(&down.forward(x)?)?,
            None => Ok(y),
        }
    }
}

/// The model part a LoRA entry adapts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    Unet,
    TextEncoder,
    /// SDXL's second text encoder.
    TextEncoder2,
}

impl Component {
    pub fn name(self) -> &'static str {
        match self {
            Self::Unet => "unet",
            Self::TextEncoder => "text_encoder",
            Self::TextEncoder2 => "text_encoder_2",
        }
    }
}

/// One adapted layer read from a file.
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub component: Component,
    /// The adapted module as the file names it: dotted (diffusers) or with underscores (kohya).
    pub module: String,
    pub kohya: bool,
    /// A: (r, in) or (r, in, kh, kw).
    pub down: Tensor,
    /// B: (out, r) or (out, r, 1, 1).
    pub up: Tensor,
    /// alpha / r (1 when the file gives no alpha, as diffusers assumes).
    pub scale: f64,
}

/// A LoRA safetensors file, read and grouped into adapted layers.
#[derive(Debug, Clone)]
pub struct LoraFile {
    pub path: PathBuf,
    pub pairs: Vec<LoraPair>,
}

/// Which matrix a tensor name holds, and of which module.
enum Part {
    Down,
    Up,
    Alpha,
}

/// Splits a LoRA tensor name into (component, module, kohya?, part), or `None` if it is not one.
fn parse_key(key: &str) -> Option<(Component, String, bool, Part)> {
    for (prefix, component) in [
        ("lora_unet_", Component::Unet),
        ("lora_te_", Component::TextEncoder),
        ("lora_te1_", Component::TextEncoder),
        ("lora_te2_", Component::TextEncoder2),
    ] {
        if let Some(rest) = key.strip_prefix(prefix) {
            for (suffix, part) in [
                (".lora_down.weight", Part::Down),
                (".lora_up.weight", Part::Up),
                (".alpha", Part::Alpha),
            ] {
                if let Some(module) = rest.strip_suffix(suffix) {
                    return Some((component, module.to_string(), true, part));
                }
            }
            return None;
        }
    }
    let (component, rest) = if let Some(rest) = key.strip_prefix("unet.") {
        (Component::Unet, rest)
    } else if let Some(rest) = key.strip_prefix("text_encoder_2.") {
        (Component::TextEncoder2, rest)
    } else if let Some(rest) = key.strip_prefix("text_encoder.") {
        (Component::TextEncoder, rest)
    } else {
        (Component::Unet, key)
    };
    for (suffix, part) in [
        (".lora_A.weight", Part::Down),
        (".lora_B.weight", Part::Up),
        (".lora.down.weight", Part::Down),
        (".lora.up.weight", Part::Up),
        (".lora_linear_layer.down.weight", Part::Down),
        (".lora_linear_layer.up.weight", Part::Up),
        (".alpha", Part::Alpha),
    ] {
        if let Some(module) = rest.strip_suffix(suffix) {
            return Some((component, module.to_string(), false, part));
        }
    }
    // diffusers' attention-processor layout: `attn1.processor.to_q_lora.down.weight`.
    for (suffix, part) in [(".down.weight", Part::Down), (".up.weight", Part::Up)] {
        if let Some(head) = rest.strip_suffix(suffix) {
            let (parent, projection) = head.rsplit_once(".processor.")?;
            let projection = projection.strip_suffix("_lora")?;
            let projection = if projection == "to_out" {
                "to_out.0"
            } else {
                projection
            };
            return Some((component, format!("{parent}.{projection}"), false, part));
        }
    }
    None
}

impl LoraFile {
    /// Reads every tensor of `path`; refuses names that are not LoRA entries and modules with
    /// only one of their two matrices, naming them.
    pub fn load(path: &Path) -> Result<Self> {
        let loaded = crate::checkpoint::load(path, &candle_core::Device::Cpu)?;
        let meta_scale = match (
            loaded.metadata.get(META_ALPHA),
            loaded.metadata.get(META_RANK),
        ) {
            (Some(alpha), Some(rank)) => {
                let parse = |key: &str, v: &str| {
                    v.parse::<f64>().map_err(|_| {
                        file_error(path, format!("metadata {key} = {v:?} is not a number"))
                    })
                };
                Some(parse(META_ALPHA, alpha)? / parse(META_RANK, rank)?)
            }
            _ => None,
        };
        type Entry = (Option<Tensor>, Option<Tensor>, Option<f64>, bool);
        let mut modules: BTreeMap<(Component, String), Entry> = BTreeMap::new();
        let mut names: Vec<&String> = loaded.tensors.keys().collect();
        names.sort();
        for name in names {
            let tensor = &loaded.tensors[name];
            let Some((component, module, kohya, part)) = parse_key(name) else {
                return Err(file_error(
                    path,
                    format!(
                        "tensor {name} is not a LoRA entry (expected diffusers/PEFT \
                         `<module>.lora_A.weight`/`lora_B.weight` or kohya \
                         `lora_unet_<module>.lora_down.weight`/`lora_up.weight`/`alpha`)"
                    ),
                ));
            };
            let entry = modules.entry((component, module)).or_default();
            entry.3 = kohya;
            match part {
                Part::Down => entry.0 = Some(tensor.to_dtype(DType::F32)?),
                Part::Up => entry.1 = Some(tensor.to_dtype(DType::F32)?),
                Part::Alpha => {
                    entry.2 = Some(
                        tensor
                            .to_dtype(DType::F64)?
                            .flatten_all()?
                            .get(0)?
                            .to_scalar()?,
                    )
                }
            }
        }
        if modules.is_empty() {
            return Err(file_error(path, "holds no LoRA tensors"));
        }
        let mut pairs = Vec::with_capacity(modules.len());
        for ((component, module), (down, up, alpha, kohya)) in modules {
            let (Some(down), Some(up)) = (down, up) else {
                return Err(file_error(
                    path,
                    format!("module {module} has only one of its down (A) and up (B) matrices"),
                ));
            };
            let rank = down.dim(0)?;
            if rank == 0 || up.dims().get(1) != Some(&rank) {
                return Err(file_error(
                    path,
                    format!(
                        "module {module}: down {:?} and up {:?} disagree on the rank",
                        down.dims(),
                        up.dims()
                    ),
                ));
            }
            let scale = match alpha {
                Some(alpha) => alpha / rank as f64,
                None => meta_scale.unwrap_or(1.0),
            };
            pairs.push(LoraPair {
                component,
                module,
                kohya,
                down,
                up,
                scale,
            });
        }
        Ok(Self {
            path: path.to_path_buf(),
            pairs,
        })
    }

    /// The weight updates `multiplier * scale * B A` of every layer of `component`, keyed by the
    /// name of the weight they add to and shaped like it. `weights` holds the shapes of the
    /// component's weights; a module that matches none of them is an error that names it.
    pub fn deltas(
        &self,
        component: Component,
        weights: &HashMap<String, Vec<usize>>,
        multiplier: f64,
    ) -> Result<HashMap<String, Tensor>> {
        // Text-encoder files are saved with and without transformers' `text_model.` prefix;
        // a LoRA may name either.
        let aliases = |name: &str| -> Vec<String> {
            match name.strip_prefix("text_model.") {
                Some(short) => vec![name.to_string(), short.to_string()],
                None => vec![name.to_string(), format!("text_model.{name}")],
            }
        };
        // kohya writes the module path with underscores for dots.
        let underscored: HashMap<String, &String> = weights
            .keys()
            .filter_map(|name| {
                let module = name.strip_suffix(".weight")?;
                Some(
                    aliases(module)
                        .into_iter()
                        .map(move |m| (m.replace('.', "_"), name)),
                )
            })
            .flatten()
            .collect();
        let mut deltas = HashMap::new();
        for pair in self.pairs.iter().filter(|p| p.component == component) {
            let target = if pair.kohya {
                let module = match component {
                    Component::Unet => sgm_unet_module(&pair.module, weights)
                        .unwrap_or_else(|| pair.module.clone()),
                    _ => pair.module.clone(),
                };
                underscored.get(&module).map(|name| name.to_string())
            } else {
                aliases(&pair.module)
                    .into_iter()
                    .map(|module| format!("{module}.weight"))
                    .find(|name| weights.contains_key(name))
            };
            let Some(target) = target else {
                return Err(file_error(
                    &self.path,
                    format!(
                        "LoRA module {} matches no weight of the {}: is the file for another model?",
                        pair.module,
                        component.name()
                    ),
                ));
            };
            let shape = &weights[&target];
            let rank = pair.down.dim(0)?;
            let (rows, columns) = (pair.up.dim(0)?, pair.down.elem_count() / rank);
            // Checked before the product, which a hostile file could make any size.
            if rows.checked_mul(columns) != Some(shape.iter().product::<usize>()) {
                return Err(file_error(
                    &self.path,
                    format!(
                        "LoRA module {}: B A is [{rows}, {columns}], the weight {target} is {shape:?}",
                        pair.module
                    ),
                ));
            }
            let down = pair.down.reshape((rank, columns))?;
            let up = pair.up.reshape((rows, rank))?;
            let delta = up.matmul(&down)?;
            let delta = (delta.reshape(shape.as_slice())? * (multiplier * pair.scale))?;
            deltas.insert(target, delta);
        }
        Ok(deltas)
    }
}

/// A U-Net module named as the original (SGM) SDXL checkpoint names it, as kohya's SDXL LoRAs
/// do (`input_blocks_4_1_transformer_blocks_0_attn1_to_q`), renamed to diffusers' module with
/// underscores (`down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`); None when the
/// name is not in that layout. The layout numbers its blocks in order: input block 0 is
/// `conv_in`, then each down block's L layers (resnet `.0`, attention `.1`) and its
/// downsampler; the middle block is resnet, attention, resnet; each up block has L + 1 layers,
/// its upsampler last in the last layer. L comes from the model's own weights.
fn sgm_unet_module(module: &str, weights: &HashMap<String, Vec<usize>>) -> Option<String> {
    use crate::single_file::{unet_layer, UNetLayer, UNET_RESNET_NAMES, UNET_TOP_NAMES};
    let underscored = |name: &str| name.replace('.', "_");
    for (sgm, diffusers) in UNET_TOP_NAMES {
        if module == underscored(sgm) {
            return Some(underscored(diffusers));
        }
    }
    let layers = (0..)
        .take_while(|j| weights.contains_key(&format!("down_blocks.0.resnets.{j}.conv1.weight")))
        .count();
    let up_attends = |block: usize| {
        weights
            .keys()
            .any(|name| name.starts_with(&format!("up_blocks.{block}.attentions.")))
    };
    let (section, text) = ["input_blocks", "middle_block", "output_blocks"]
        .iter()
        .find_map(|s| Some((*s, module.strip_prefix(s)?.strip_prefix('_')?)))?;
    // "<i>_<k>_<rest>" (the middle block: "<i>_<rest>").
    let mut parts = text.splitn(3, '_');
    let i: usize = parts.next()?.parse().ok()?;
    let (k, rest) = if section == "middle_block" {
        (0, text.split_once('_')?.1.to_string())
    } else {
        (
            parts.next()?.parse().ok()?,
            parts.next().unwrap_or("").to_string(),
        )
    };
    Some(match unet_layer(section, i, k, layers, &up_attends)? {
        UNetLayer::Resnet(prefix) => {
            let renamed = UNET_RESNET_NAMES
                .iter()
                .find_map(|(sgm, diffusers)| {
                    let tail = rest.strip_prefix(&underscored(sgm))?;
                    Some(format!("{diffusers}{tail}"))
                })
                .unwrap_or(rest);
            format!("{}_{renamed}", underscored(&prefix))
        }
        UNetLayer::Attention(prefix) => format!("{}_{rest}", underscored(&prefix)),
        UNetLayer::Sampler(prefix) => format!("{}_conv", underscored(&prefix)),
    })
}

/// Adds `more` into `into`, summing the updates of weights that several files adapt.
pub fn add_deltas(into: &mut HashMap<String, Tensor>, more: HashMap<String, Tensor>) -> Result<()> {
    for (name, delta) in more {
        let sum = match into.remove(&name) {
            Some(existing) => (existing + delta)?,
            None => delta,
        };
        into.insert(name, sum);
    }
    Ok(())
}

/// Parses `FILE[:SCALE]` (scale 1 when absent).
pub fn parse_lora_arg(arg: &str) -> Result<(PathBuf, f64)> {
    if let Some((file, scale)) = arg.rsplit_once(':') {
        if let Ok(scale) = scale.parse::<f64>() {
            if !scale.is_finite() {
                return Err(Error::bad_value("--lora scale", scale, "a finite number"));
            }
            return Ok((PathBuf::from(file), scale));
        }
    }
    Ok((PathBuf::from(arg), 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_layouts_name_the_same_module() {
        let module = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
        for key in [
            format!("unet.{module}.lora_A.weight"),
            format!("{module}.lora.down.weight"),
            format!("unet.{module}.lora_linear_layer.down.weight"),
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight"
                .to_string(),
        ] {
            let (component, parsed, kohya, part) = parse_key(&key).unwrap();
            assert_eq!(component, Component::Unet);
            assert_eq!(parsed, module, "{key}");
            assert!(!kohya);
            assert!(matches!(part, Part::Down));
        }
        let (component, parsed, kohya, part) =
            parse_key("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha").unwrap();
        assert_eq!(component, Component::TextEncoder);
        assert_eq!(parsed, "text_model_encoder_layers_0_self_attn_q_proj");
        assert!(kohya && matches!(part, Part::Alpha));
        let (_, parsed, _, _) =
            parse_key("unet.mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_out_lora.up.weight")
                .unwrap();
        assert_eq!(
            parsed,
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0"
        );
        assert!(parse_key("unet.conv_in.weight").is_none());
    }

    #[test]
    fn lora_argument_takes_an_optional_scale() {
        assert_eq!(
            parse_lora_arg("style.safetensors:0.7").unwrap(),
            (PathBuf::from("style.safetensors"), 0.7)
        );
        assert_eq!(
            parse_lora_arg("dir:with:colons/style.safetensors").unwrap(),
            (PathBuf::from("dir:with:colons/style.safetensors"), 1.0)
        );
        assert!(parse_lora_arg("a.safetensors:inf").is_err());
    }
}
