//! Single-file checkpoints in the original layouts (CompVis LDM for SD 1.x/2.x, Stability's SGM
//! for SDXL): which tensor of the file each diffusers-named weight of a component comes from,
//! and how it is reshaped on the way. The maps are built from the file's keys and the
//! component's diffusers config, so a key that lands nowhere and a weight without a source can
//! both be named.

use crate::error::{Error, Result};
use crate::model::config::{ClipTextConfig, UNetConfig, VaeConfig};
use std::collections::BTreeMap;

/// How a stored tensor becomes the weight the model reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    Same,
    /// A 1x1 convolution kernel [out, in, 1, 1] read as a linear weight [out, in] (the VAE's
    /// attention projections; their biases pass unchanged).
    ConvToLinear,
    /// Rows `index * n .. (index + 1) * n` of a tensor of `parts * n` rows (OpenCLIP's fused
    /// `in_proj` holds q, k and v one after another).
    Rows {
        index: usize,
        parts: usize,
    },
    /// The transpose of a 2-D tensor (OpenCLIP's `text_projection` is applied as `x @ P`).
    Transpose,
}

impl Transform {
    /// The shape after the transform of a stored tensor of shape `stored`; None when the
    /// transform does not apply to that shape.
    pub fn shape(self, stored: &[usize]) -> Option<Vec<usize>> {
        match self {
            Transform::Same => Some(stored.to_vec()),
            Transform::ConvToLinear => match stored {
                [o, i, 1, 1] => Some(vec![*o, *i]),
                [o, i] => Some(vec![*o, *i]),
                [n] => Some(vec![*n]),
                _ => None,
            },
            Transform::Rows { parts, .. } => match stored.split_first() {
                Some((rows, rest)) if parts > 0 && rows % parts == 0 => {
                    let mut shape = vec![rows / parts];
                    shape.extend_from_slice(rest);
                    Some(shape)
                }
                _ => None,
            },
            Transform::Transpose => match stored {
                [a, b] => Some(vec![*b, *a]),
                _ => None,
            },
        }
    }

    pub fn apply(self, tensor: candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
        match self {
            Transform::Same => Ok(tensor),
            Transform::ConvToLinear => match tensor.dims() {
                [o, i, 1, 1] => {
                    let (o, i) = (*o, *i);
                    tensor.reshape((o, i))
                }
                _ => Ok(tensor),
            },
            Transform::Rows { index, parts } => {
                let n = tensor.dim(0)? / parts;
                tensor.narrow(0, index * n, n)?.contiguous()
            }
            Transform::Transpose => tensor.t()?.contiguous(),
        }
    }
}

/// Where one diffusers-named weight comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub key: String,
    pub transform: Transform,
}

/// A component's weights: diffusers name -> source in the file.
pub type NameMap = BTreeMap<String, Source>;

/// The diffusers names and transforms an original key (without its prefix) becomes.
type Renaming<'a> = &'a dyn Fn(&str) -> Option<Vec<(String, Transform)>>;

/// The resnet parameter names of the original U-Net and diffusers', dotted.
pub const UNET_RESNET_NAMES: [(&str, &str); 6] = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
];

/// Top-level modules of the original U-Net and their diffusers names, dotted.
pub const UNET_TOP_NAMES: [(&str, &str); 7] = [
    ("time_embed.0", "time_embedding.linear_1"),
    ("time_embed.2", "time_embedding.linear_2"),
    ("label_emb.0.0", "add_embedding.linear_1"),
    ("label_emb.0.2", "add_embedding.linear_2"),
    ("input_blocks.0.0", "conv_in"),
    ("out.0", "conv_norm_out"),
    ("out.2", "conv_out"),
];

/// What a numbered layer of the original U-Net is in diffusers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UNetLayer {
    /// A resnet at this diffusers prefix: its parameters are renamed by [`UNET_RESNET_NAMES`].
    Resnet(String),
    /// A transformer (attention) block at this prefix: parameter names are the same.
    Attention(String),
    /// A down- or upsampler's convolution at this prefix (`op` / `conv` in the original).
    Sampler(String),
}

/// The diffusers module of the original U-Net's `section.i.k` (section `input_blocks`,
/// `middle_block` (k unused), `output_blocks`), for a U-Net with `layers` resnets per down
/// block whose up block b has attention when `up_attends(b)`. The original numbers its layers
/// in order: input block 0 is `conv_in`, then each down block's layers (resnet `.0`, attention
/// `.1`) and its downsampler; the middle block is resnet, attention, resnet; each up block has
/// layers + 1 layers, its upsampler last in the last layer.
pub fn unet_layer(
    section: &str,
    i: usize,
    k: usize,
    layers: usize,
    up_attends: &dyn Fn(usize) -> bool,
) -> Option<UNetLayer> {
    if layers == 0 {
        return None;
    }
    match section {
        "input_blocks" => {
            let (block, layer) = ((i.checked_sub(1)?) / (layers + 1), (i - 1) % (layers + 1));
            Some(match (layer == layers, k) {
                (true, 0) => UNetLayer::Sampler(format!("down_blocks.{block}.downsamplers.0")),
                (false, 0) => UNetLayer::Resnet(format!("down_blocks.{block}.resnets.{layer}")),
                (false, 1) => {
                    UNetLayer::Attention(format!("down_blocks.{block}.attentions.{layer}"))
                }
                _ => return None,
            })
        }
        "middle_block" => Some(match i {
            0 => UNetLayer::Resnet("mid_block.resnets.0".into()),
            1 => UNetLayer::Attention("mid_block.attentions.0".into()),
            2 => UNetLayer::Resnet("mid_block.resnets.1".into()),
            _ => return None,
        }),
        "output_blocks" => {
            let (block, layer) = (i / (layers + 1), i % (layers + 1));
            Some(match (k, up_attends(block)) {
                (0, _) => UNetLayer::Resnet(format!("up_blocks.{block}.resnets.{layer}")),
                (1, true) => UNetLayer::Attention(format!("up_blocks.{block}.attentions.{layer}")),
                (1, false) | (2, true) => {
                    UNetLayer::Sampler(format!("up_blocks.{block}.upsamplers.0"))
                }
                _ => return None,
            })
        }
        _ => None,
    }
}

/// The diffusers name of one original U-Net parameter (`input_blocks.4.1.proj_in.weight`,
/// without the `model.diffusion_model.` prefix).
fn unet_name(key: &str, config: &UNetConfig) -> Option<String> {
    for (original, diffusers) in UNET_TOP_NAMES {
        if let Some(param) = key.strip_prefix(original).and_then(|r| r.strip_prefix('.')) {
            return Some(format!("{diffusers}.{param}"));
        }
    }
    let (section, rest) = key.split_once('.')?;
    let mut parts = rest.splitn(3, '.');
    let i: usize = parts.next()?.parse().ok()?;
    let (k, tail) = if section == "middle_block" {
        (0, rest.split_once('.')?.1.to_string())
    } else {
        let k: usize = parts.next()?.parse().ok()?;
        (k, parts.next()?.to_string())
    };
    let up_attends = |b: usize| {
        config
            .up_block_types
            .get(b)
            .is_some_and(|t| t.contains("CrossAttn"))
    };
    Some(
        match unet_layer(section, i, k, config.layers_per_block, &up_attends)? {
            UNetLayer::Resnet(prefix) => {
                let renamed = UNET_RESNET_NAMES.iter().find_map(|(original, diffusers)| {
                    let param = tail.strip_prefix(original)?.strip_prefix('.')?;
                    Some(format!("{diffusers}.{param}"))
                })?;
                format!("{prefix}.{renamed}")
            }
            UNetLayer::Attention(prefix) => format!("{prefix}.{tail}"),
            UNetLayer::Sampler(prefix) => {
                let param = tail
                    .strip_prefix("op.")
                    .or_else(|| tail.strip_prefix("conv."))?;
                format!("{prefix}.conv.{param}")
            }
        },
    )
}

/// The original VAE's parameter names and diffusers', for the parts that are renamed one to one.
const VAE_NAMES: [(&str, &str); 5] = [
    ("nin_shortcut", "conv_shortcut"),
    ("norm_out", "conv_norm_out"),
    ("mid.block_1", "mid_block.resnets.0"),
    ("mid.block_2", "mid_block.resnets.1"),
    ("mid.attn_1", "mid_block.attentions.0"),
];

/// The diffusers name of one original VAE parameter (without `first_stage_model.`), and its
/// transform.
fn vae_name(key: &str, config: &VaeConfig) -> Option<(String, Transform)> {
    let levels = config.block_out_channels.len();
    let mut name = key.to_string();
    for (original, diffusers) in VAE_NAMES {
        name = name.replace(original, diffusers);
    }
    let parts: Vec<&str> = name.split('.').collect();
    let renamed = match parts.as_slice() {
        [coder @ ("encoder" | "decoder"), level @ ("down" | "up"), i, "block", j, rest @ ..] => {
            let i: usize = i.parse().ok()?;
            // The decoder's `up` levels count from the deepest; diffusers' from the first
            // applied.
            let (kind, block) = match *level {
                "down" => ("down_blocks", i),
                _ => ("up_blocks", levels.checked_sub(i + 1)?),
            };
            format!("{coder}.{kind}.{block}.resnets.{j}.{}", rest.join("."))
        }
        [coder @ ("encoder" | "decoder"), "down", i, "downsample", rest @ ..] => {
            format!("{coder}.down_blocks.{i}.downsamplers.0.{}", rest.join("."))
        }
        [coder @ ("encoder" | "decoder"), "up", i, "upsample", rest @ ..] => {
            let block = levels.checked_sub(i.parse::<usize>().ok()? + 1)?;
            format!("{coder}.up_blocks.{block}.upsamplers.0.{}", rest.join("."))
        }
        _ => name.clone(),
    };
    let attention = [
        ("attentions.0.norm.", "attentions.0.group_norm."),
        ("attentions.0.q.", "attentions.0.to_q."),
        ("attentions.0.k.", "attentions.0.to_k."),
        ("attentions.0.v.", "attentions.0.to_v."),
        ("attentions.0.proj_out.", "attentions.0.to_out.0."),
    ];
    for (original, diffusers) in attention {
        if renamed.contains(original) {
            let transform = if original.ends_with("norm.") {
                Transform::Same
            } else {
                Transform::ConvToLinear
            };
            return Some((renamed.replace(original, diffusers), transform));
        }
    }
    Some((renamed, Transform::Same))
}

/// The diffusers name of one OpenCLIP text-model parameter (without its prefix), for a model
/// of `config` (layers beyond its `num_hidden_layers` are left out, as diffusers leaves out
/// SD 2.x's last layer); None for what diffusers does not load.
fn open_clip_names(
    key: &str,
    config: &ClipTextConfig,
    with_projection: bool,
) -> Option<Vec<(String, Transform)>> {
    let one = |name: &str, transform| Some(vec![(name.to_string(), transform)]);
    match key {
        "token_embedding.weight" => {
            return one(
                "text_model.embeddings.token_embedding.weight",
                Transform::Same,
            )
        }
        "positional_embedding" => {
            return one(
                "text_model.embeddings.position_embedding.weight",
                Transform::Same,
            )
        }
        "ln_final.weight" | "ln_final.bias" => {
            let param = key.rsplit('.').next()?;
            return one(
                &format!("text_model.final_layer_norm.{param}"),
                Transform::Same,
            );
        }
        "text_projection" if with_projection => {
            return one("text_projection.weight", Transform::Transpose)
        }
        _ => {}
    }
    let rest = key.strip_prefix("transformer.resblocks.")?;
    let (layer, param) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    if layer >= config.num_hidden_layers {
        return None;
    }
    let prefix = format!("text_model.encoder.layers.{layer}");
    let fused = |suffix: &str| {
        Some(
            ["q_proj", "k_proj", "v_proj"]
                .iter()
                .enumerate()
                .map(|(index, proj)| {
                    (
                        format!("{prefix}.self_attn.{proj}.{suffix}"),
                        Transform::Rows { index, parts: 3 },
                    )
                })
                .collect(),
        )
    };
    match param {
        "attn.in_proj_weight" => fused("weight"),
        "attn.in_proj_bias" => fused("bias"),
        _ => {
            let (module, leaf) = param.rsplit_once('.')?;
            let renamed = match module {
                "ln_1" => "layer_norm1",
                "ln_2" => "layer_norm2",
                "attn.out_proj" => "self_attn.out_proj",
                "mlp.c_fc" => "mlp.fc1",
                "mlp.c_proj" => "mlp.fc2",
                _ => return None,
            };
            one(&format!("{prefix}.{renamed}.{leaf}"), Transform::Same)
        }
    }
}

/// Keys real checkpoints carry that are not weights of any component.
pub fn is_ignored(key: &str) -> bool {
    key.ends_with("position_ids") || key.ends_with("logit_scale")
}

/// The map of the keys under `prefix`: `names` gives each key's (without the prefix)
/// diffusers names and transforms (none: left in the file), or None for a key this layout
/// does not have, an error naming it as a `component` weight.
fn build_map<'a>(
    keys: impl IntoIterator<Item = &'a str>,
    prefix: &str,
    component: &str,
    names: Renaming,
) -> Result<NameMap> {
    let mut map = NameMap::new();
    for key in keys {
        let Some(rest) = key.strip_prefix(prefix) else {
            continue;
        };
        if is_ignored(key) {
            continue;
        }
        let found = names(rest).ok_or_else(|| {
            Error::Msg(format!(
                "tensor {key} is not a {component} weight of the original layout this crate maps"
            ))
        })?;
        for (name, transform) in found {
            let source = Source {
                key: key.to_string(),
                transform,
            };
            if let Some(first) = map.get(&name) {
                return Err(Error::Msg(format!(
                    "two tensors of the checkpoint, {} and {key}, map to the same weight {name}",
                    first.key
                )));
            }
            map.insert(name, source);
        }
    }
    Ok(map)
}

/// The U-Net's weights among `keys` under `prefix` (`model.diffusion_model.`); a key under the
/// prefix that maps nowhere is an error naming it.
pub fn unet_map<'a>(
    keys: impl IntoIterator<Item = &'a str>,
    prefix: &str,
    config: &UNetConfig,
) -> Result<NameMap> {
    build_map(keys, prefix, "U-Net", &|rest| {
        Some(vec![(unet_name(rest, config)?, Transform::Same)])
    })
}

/// The VAE's weights among `keys` under `prefix` (`first_stage_model.`).
pub fn vae_map<'a>(
    keys: impl IntoIterator<Item = &'a str>,
    prefix: &str,
    config: &VaeConfig,
) -> Result<NameMap> {
    build_map(keys, prefix, "VAE", &|rest| {
        Some(vec![vae_name(rest, config)?])
    })
}

/// A CLIP text model stored in transformers' naming under `prefix`
/// (`cond_stage_model.transformer.`): the names are diffusers' own.
pub fn clip_map<'a>(keys: impl IntoIterator<Item = &'a str>, prefix: &str) -> Result<NameMap> {
    build_map(keys, prefix, "CLIP text encoder", &|rest| {
        Some(vec![(rest.to_string(), Transform::Same)])
    })
}

/// An OpenCLIP text model under `prefix` (`cond_stage_model.model.`,
/// `conditioner.embedders.1.model.`) as the diffusers text encoder of `config`; with
/// `with_projection` its `text_projection` too (SDXL's second encoder).
pub fn open_clip_map<'a>(
    keys: impl IntoIterator<Item = &'a str>,
    prefix: &str,
    config: &ClipTextConfig,
    with_projection: bool,
) -> Result<NameMap> {
    build_map(keys, prefix, "OpenCLIP text encoder", &|rest| {
        match open_clip_names(rest, config, with_projection) {
            Some(names) => Some(names),
            // Layers past the model's depth and a projection the model has no use for are
            // left in the file, as diffusers leaves them.
            None if rest.starts_with("transformer.resblocks.") || rest == "text_projection" => {
                Some(Vec::new())
            }
            None => None,
        }
    })
}

/// Where a diffusers-named weight goes in the original layout: a whole tensor (with the inverse
/// of its transform) or one of the parts of a fused one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// The original key and the transform that reads it (its inverse is applied on writing).
    Whole(String, Transform),
    /// Rows `index` of `parts` of the original key (OpenCLIP's q, k, v in `in_proj`).
    Part(String, usize, usize),
}

/// The original name of a diffusers U-Net weight (without `model.diffusion_model.`): the
/// inverse of [`unet_map`]'s renaming.
pub fn unet_original_name(name: &str, config: &UNetConfig) -> Option<String> {
    for (original, diffusers) in UNET_TOP_NAMES {
        if let Some(param) = name
            .strip_prefix(diffusers)
            .and_then(|r| r.strip_prefix('.'))
        {
            return Some(format!("{original}.{param}"));
        }
    }
    let per_block = config.layers_per_block + 1;
    let resnet = |param: &str| -> Option<String> {
        UNET_RESNET_NAMES.iter().find_map(|(original, diffusers)| {
            let tail = param.strip_prefix(diffusers)?.strip_prefix('.')?;
            Some(format!("{original}.{tail}"))
        })
    };
    let parts: Vec<&str> = name.splitn(5, '.').collect();
    match parts.as_slice() {
        ["mid_block", kind, j, rest @ ..] => {
            let rest = rest.join(".");
            match (*kind, *j) {
                ("resnets", "0") => Some(format!("middle_block.0.{}", resnet(&rest)?)),
                ("attentions", "0") => Some(format!("middle_block.1.{rest}")),
                ("resnets", "1") => Some(format!("middle_block.2.{}", resnet(&rest)?)),
                _ => None,
            }
        }
        [blocks @ ("down_blocks" | "up_blocks"), b, kind, j, rest] => {
            let (b, j): (usize, usize) = (b.parse().ok()?, j.parse().ok()?);
            let down = *blocks == "down_blocks";
            let (section, i) = match down {
                true => (
                    "input_blocks",
                    1 + b * config.layers_per_block.checked_add(1)?,
                ),
                false => ("output_blocks", b * per_block),
            };
            match *kind {
                "resnets" => Some(format!("{section}.{}.0.{}", i + j, resnet(rest)?)),
                "attentions" => Some(format!("{section}.{}.1.{rest}", i + j)),
                "downsamplers" | "upsamplers" if j == 0 => {
                    let param = rest.strip_prefix("conv.")?;
                    let last = i + config.layers_per_block;
                    Some(match down {
                        true => format!("{section}.{last}.0.op.{param}"),
                        false => {
                            let attends = config
                                .up_block_types
                                .get(b)
                                .is_some_and(|t| t.contains("CrossAttn"));
                            let k = if attends { 2 } else { 1 };
                            format!("{section}.{last}.{k}.conv.{param}")
                        }
                    })
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// The original name and transform of a diffusers VAE weight (without `first_stage_model.`):
/// the inverse of [`vae_map`]'s renaming.
pub fn vae_original_name(name: &str, config: &VaeConfig) -> Option<(String, Transform)> {
    let levels = config.block_out_channels.len();
    let parts: Vec<&str> = name.split('.').collect();
    let mut renamed = match parts.as_slice() {
        [coder, "down_blocks", i, "resnets", j, rest @ ..] => {
            format!("{coder}.down.{i}.block.{j}.{}", rest.join("."))
        }
        [coder, "down_blocks", i, "downsamplers", "0", rest @ ..] => {
            format!("{coder}.down.{i}.downsample.{}", rest.join("."))
        }
        [coder, "up_blocks", b, "resnets", j, rest @ ..] => {
            let level = levels.checked_sub(b.parse::<usize>().ok()? + 1)?;
            format!("{coder}.up.{level}.block.{j}.{}", rest.join("."))
        }
        [coder, "up_blocks", b, "upsamplers", "0", rest @ ..] => {
            let level = levels.checked_sub(b.parse::<usize>().ok()? + 1)?;
            format!("{coder}.up.{level}.upsample.{}", rest.join("."))
        }
        _ => name.to_string(),
    };
    let mut transform = Transform::Same;
    for (original, diffusers) in [
        ("attentions.0.norm.", "attentions.0.group_norm."),
        ("attentions.0.q.", "attentions.0.to_q."),
        ("attentions.0.k.", "attentions.0.to_k."),
        ("attentions.0.v.", "attentions.0.to_v."),
        ("attentions.0.proj_out.", "attentions.0.to_out.0."),
    ] {
        if renamed.contains(diffusers) {
            renamed = renamed.replace(diffusers, original);
            if !original.ends_with("norm.") {
                transform = Transform::ConvToLinear;
            }
        }
    }
    for (original, diffusers) in VAE_NAMES {
        renamed = renamed.replace(diffusers, original);
    }
    Some((renamed, transform))
}

/// Where a weight of a diffusers OpenCLIP-style text encoder goes under `prefix`: the inverse
/// of [`open_clip_map`].
pub fn open_clip_destination(name: &str, prefix: &str) -> Option<Destination> {
    let whole =
        |key: &str, transform| Some(Destination::Whole(format!("{prefix}{key}"), transform));
    let rest = name.strip_prefix("text_model.").unwrap_or(name);
    match rest {
        "embeddings.token_embedding.weight" => {
            return whole("token_embedding.weight", Transform::Same)
        }
        "embeddings.position_embedding.weight" => {
            return whole("positional_embedding", Transform::Same)
        }
        "final_layer_norm.weight" => return whole("ln_final.weight", Transform::Same),
        "final_layer_norm.bias" => return whole("ln_final.bias", Transform::Same),
        "text_projection.weight" => return whole("text_projection", Transform::Transpose),
        _ => {}
    }
    let rest = rest.strip_prefix("encoder.layers.")?;
    let (layer, param) = rest.split_once('.')?;
    let at = format!("transformer.resblocks.{layer}");
    for (index, proj) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
        if let Some(leaf) = param
            .strip_prefix("self_attn.")
            .and_then(|p| p.strip_prefix(proj))
            .and_then(|p| p.strip_prefix('.'))
        {
            return Some(Destination::Part(
                format!("{prefix}{at}.attn.in_proj_{leaf}"),
                index,
                3,
            ));
        }
    }
    let (module, leaf) = param.rsplit_once('.')?;
    let original = match module {
        "layer_norm1" => "ln_1",
        "layer_norm2" => "ln_2",
        "self_attn.out_proj" => "attn.out_proj",
        "mlp.fc1" => "mlp.c_fc",
        "mlp.fc2" => "mlp.c_proj",
        _ => return None,
    };
    whole(&format!("{at}.{original}.{leaf}"), Transform::Same)
}

/// A stored tensor as the original layout holds it: the inverse of `transform`, given the
/// original's shape for a 1x1 convolution.
pub fn unapply(
    transform: Transform,
    tensor: candle_core::Tensor,
) -> candle_core::Result<candle_core::Tensor> {
    match transform {
        Transform::Same | Transform::Rows { .. } => Ok(tensor),
        Transform::ConvToLinear => match tensor.dims() {
            [o, i] => {
                let (o, i) = (*o, *i);
                tensor.reshape((o, i, 1, 1))
            }
            _ => Ok(tensor),
        },
        Transform::Transpose => tensor.t()?.contiguous(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transforms_reshape_as_the_layouts_differ() {
        assert_eq!(
            Transform::ConvToLinear.shape(&[8, 8, 1, 1]),
            Some(vec![8, 8])
        );
        assert_eq!(
            Transform::Rows { index: 1, parts: 3 }.shape(&[36, 12]),
            Some(vec![12, 12])
        );
        assert_eq!(Transform::Rows { index: 0, parts: 3 }.shape(&[10]), None);
        assert_eq!(Transform::Transpose.shape(&[12, 10]), Some(vec![10, 12]));
        let fused = candle_core::Tensor::arange(0f32, 6., &candle_core::Device::Cpu)
            .unwrap()
            .reshape((6, 1))
            .unwrap();
        let k = Transform::Rows { index: 1, parts: 3 }.apply(fused).unwrap();
        assert_eq!(k.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [2., 3.]);
    }
}
