//! The real SD 1.5, SD 2.1 and SDXL single-file layouts map completely: the original key lists
//! are written here from the published module structure (CompVis LDM's `openaimodel.UNetModel`
//! and `Encoder`/`Decoder`, transformers' CLIP text model, OpenCLIP's text tower, SGM's
//! conditioner), for the real configs; every original key must have exactly one destination
//! (OpenCLIP's fused `in_proj` three: q, k, v), and every weight the model built from the
//! config reads must have a source. Shapes only: nothing the size of the real models is made.

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use diffuse::model::config::{ClipTextConfig, UNetConfig, VaeConfig};
use diffuse::model::text::ClipTextModel;
use diffuse::model::unet::UNet2DConditionModel;
use diffuse::model::vae::AutoencoderKL;
use diffuse::single_file::{
    clip_map, open_clip_destination, open_clip_map, unet_map, unet_original_name, vae_map,
    vae_original_name, Destination, NameMap, Transform,
};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

/// Records the name of every weight a model asks for; the weights are stride-0 views of one
/// zero. The weights that exist are the mapped names.
#[derive(Clone)]
struct NameRecorder {
    asked: Arc<Mutex<BTreeSet<String>>>,
    available: Arc<BTreeSet<String>>,
}

impl SimpleBackend for NameRecorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if !self.available.contains(name) {
            candle_core::bail!("the model reads {name}, which no original key maps to")
        }
        self.asked.lock().unwrap().insert(name.to_string());
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("unexpected unchecked get of {name}")
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.available.contains(name)
    }
}

/// Builds a model over `map`'s names and checks that it reads exactly those.
fn assert_model_reads_exactly<T>(
    label: &str,
    map: &NameMap,
    build: impl FnOnce(VarBuilder) -> diffuse::Result<T>,
) {
    let recorder = NameRecorder {
        asked: Arc::default(),
        available: Arc::new(map.keys().cloned().collect()),
    };
    let vb = VarBuilder::from_backend(Box::new(recorder.clone()), DType::F32, Device::Cpu);
    build(vb).unwrap_or_else(|e| panic!("{label}: {e}"));
    let asked = recorder.asked.lock().unwrap();
    let unread: Vec<&String> = map.keys().filter(|k| !asked.contains(*k)).collect();
    assert!(
        unread.is_empty(),
        "{label}: mapped but never read: {unread:?}"
    );
}

/// Checks that each original key has one destination: three for OpenCLIP's fused q, k, v, none
/// for keys containing one of `skipped`.
fn assert_one_destination_each(label: &str, keys: &[String], map: &NameMap, skipped: &[&str]) {
    let mut destinations: BTreeMap<&str, usize> = BTreeMap::new();
    for source in map.values() {
        *destinations.entry(source.key.as_str()).or_default() += 1;
    }
    for key in keys {
        let expected = if skipped.iter().any(|s| key.contains(s)) {
            0
        } else if key.ends_with("in_proj_weight") || key.ends_with("in_proj_bias") {
            3
        } else {
            1
        };
        let found = destinations.get(key.as_str()).copied().unwrap_or(0);
        assert_eq!(found, expected, "{label}: {key} has {found} destinations");
    }
}

fn with_bias(keys: &mut Vec<String>, module: &str) {
    keys.push(format!("{module}.weight"));
    keys.push(format!("{module}.bias"));
}

/// `openaimodel.UNetModel`'s keys for a diffusers U-Net config (under `model.diffusion_model.`).
fn ldm_unet_keys(c: &UNetConfig) -> Vec<String> {
    let p = "model.diffusion_model.";
    let mut keys = Vec::new();
    let resblock = |keys: &mut Vec<String>, at: &str, shortcut: bool| {
        for m in [
            "in_layers.0",
            "in_layers.2",
            "emb_layers.1",
            "out_layers.0",
            "out_layers.3",
        ] {
            with_bias(keys, &format!("{at}.{m}"));
        }
        if shortcut {
            with_bias(keys, &format!("{at}.skip_connection"));
        }
    };
    let transformer = |keys: &mut Vec<String>, at: &str, depth: usize| {
        with_bias(keys, &format!("{at}.norm"));
        with_bias(keys, &format!("{at}.proj_in"));
        for t in 0..depth {
            let b = format!("{at}.transformer_blocks.{t}");
            for attn in ["attn1", "attn2"] {
                for qkv in ["to_q", "to_k", "to_v"] {
                    keys.push(format!("{b}.{attn}.{qkv}.weight"));
                }
                with_bias(keys, &format!("{b}.{attn}.to_out.0"));
            }
            with_bias(keys, &format!("{b}.ff.net.0.proj"));
            with_bias(keys, &format!("{b}.ff.net.2"));
            for norm in ["norm1", "norm2", "norm3"] {
                with_bias(keys, &format!("{b}.{norm}"));
            }
        }
        with_bias(keys, &format!("{at}.proj_out"));
    };
    with_bias(&mut keys, &format!("{p}time_embed.0"));
    with_bias(&mut keys, &format!("{p}time_embed.2"));
    if c.addition_embed_type.is_some() {
        with_bias(&mut keys, &format!("{p}label_emb.0.0"));
        with_bias(&mut keys, &format!("{p}label_emb.0.2"));
    }
    with_bias(&mut keys, &format!("{p}input_blocks.0.0"));
    let channels = &c.block_out_channels;
    let levels = channels.len();
    let depths = c
        .transformer_layers_per_block
        .expand(levels, "transformer_layers_per_block")
        .unwrap();
    let depth = |level: usize| depths[level];
    let mut ch = channels[0];
    let mut skips = vec![ch];
    let mut n = 1;
    for (level, &cout) in channels.iter().enumerate() {
        let attends = c.down_block_types[level].contains("CrossAttn");
        for _ in 0..c.layers_per_block {
            resblock(&mut keys, &format!("{p}input_blocks.{n}.0"), ch != cout);
            ch = cout;
            if attends {
                transformer(&mut keys, &format!("{p}input_blocks.{n}.1"), depth(level));
            }
            skips.push(ch);
            n += 1;
        }
        if level + 1 < levels {
            with_bias(&mut keys, &format!("{p}input_blocks.{n}.0.op"));
            skips.push(ch);
            n += 1;
        }
    }
    resblock(&mut keys, &format!("{p}middle_block.0"), false);
    transformer(&mut keys, &format!("{p}middle_block.1"), depth(levels - 1));
    resblock(&mut keys, &format!("{p}middle_block.2"), false);
    let mut n = 0;
    for level in (0..levels).rev() {
        let cout = channels[level];
        let attends = c.up_block_types[levels - 1 - level].contains("CrossAttn");
        for j in 0..=c.layers_per_block {
            let skip = skips.pop().unwrap();
            resblock(
                &mut keys,
                &format!("{p}output_blocks.{n}.0"),
                ch + skip != cout,
            );
            ch = cout;
            let mut k = 1;
            if attends {
                transformer(&mut keys, &format!("{p}output_blocks.{n}.1"), depth(level));
                k = 2;
            }
            if level > 0 && j == c.layers_per_block {
                with_bias(&mut keys, &format!("{p}output_blocks.{n}.{k}.conv"));
            }
            n += 1;
        }
    }
    with_bias(&mut keys, &format!("{p}out.0"));
    with_bias(&mut keys, &format!("{p}out.2"));
    keys
}

/// LDM `Encoder`/`Decoder` keys (under `first_stage_model.`).
fn ldm_vae_keys(c: &VaeConfig) -> Vec<String> {
    let p = "first_stage_model.";
    let mut keys = Vec::new();
    let resblock = |keys: &mut Vec<String>, at: &str, shortcut: bool| {
        for m in ["norm1", "conv1", "norm2", "conv2"] {
            with_bias(keys, &format!("{at}.{m}"));
        }
        if shortcut {
            with_bias(keys, &format!("{at}.nin_shortcut"));
        }
    };
    let mid = |keys: &mut Vec<String>, coder: &str| {
        resblock(keys, &format!("{p}{coder}.mid.block_1"), false);
        for m in ["norm", "q", "k", "v", "proj_out"] {
            with_bias(keys, &format!("{p}{coder}.mid.attn_1.{m}"));
        }
        resblock(keys, &format!("{p}{coder}.mid.block_2"), false);
    };
    let ch = &c.block_out_channels;
    let levels = ch.len();
    with_bias(&mut keys, &format!("{p}encoder.conv_in"));
    let mut cin = ch[0];
    for (i, &cout) in ch.iter().enumerate() {
        for j in 0..c.layers_per_block {
            resblock(
                &mut keys,
                &format!("{p}encoder.down.{i}.block.{j}"),
                cin != cout,
            );
            cin = cout;
        }
        if i + 1 < levels {
            with_bias(&mut keys, &format!("{p}encoder.down.{i}.downsample.conv"));
        }
    }
    mid(&mut keys, "encoder");
    with_bias(&mut keys, &format!("{p}encoder.norm_out"));
    with_bias(&mut keys, &format!("{p}encoder.conv_out"));
    with_bias(&mut keys, &format!("{p}quant_conv"));
    with_bias(&mut keys, &format!("{p}post_quant_conv"));
    with_bias(&mut keys, &format!("{p}decoder.conv_in"));
    mid(&mut keys, "decoder");
    let mut cin = ch[levels - 1];
    for i in (0..levels).rev() {
        for j in 0..=c.layers_per_block {
            resblock(
                &mut keys,
                &format!("{p}decoder.up.{i}.block.{j}"),
                cin != ch[i],
            );
            cin = ch[i];
        }
        if i > 0 {
            with_bias(&mut keys, &format!("{p}decoder.up.{i}.upsample.conv"));
        }
    }
    with_bias(&mut keys, &format!("{p}decoder.norm_out"));
    with_bias(&mut keys, &format!("{p}decoder.conv_out"));
    keys
}

/// transformers' `CLIPTextModel` keys under `prefix`, with `position_ids` as real files have.
fn hf_clip_keys(prefix: &str, layers: usize) -> Vec<String> {
    let p = format!("{prefix}text_model.");
    let mut keys = vec![
        format!("{p}embeddings.token_embedding.weight"),
        format!("{p}embeddings.position_embedding.weight"),
        format!("{p}embeddings.position_ids"),
    ];
    for l in 0..layers {
        let at = format!("{p}encoder.layers.{l}");
        for m in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.out_proj",
            "layer_norm1",
            "layer_norm2",
            "mlp.fc1",
            "mlp.fc2",
        ] {
            with_bias(&mut keys, &format!("{at}.{m}"));
        }
    }
    with_bias(&mut keys, &format!("{p}final_layer_norm"));
    keys
}

/// OpenCLIP's text tower keys under `prefix` (`layers` residual blocks in the file).
fn open_clip_keys(prefix: &str, layers: usize) -> Vec<String> {
    let mut keys = vec![
        format!("{prefix}token_embedding.weight"),
        format!("{prefix}positional_embedding"),
        format!("{prefix}text_projection"),
        format!("{prefix}logit_scale"),
    ];
    for l in 0..layers {
        let at = format!("{prefix}transformer.resblocks.{l}");
        keys.push(format!("{at}.attn.in_proj_weight"));
        keys.push(format!("{at}.attn.in_proj_bias"));
        for m in ["attn.out_proj", "ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj"] {
            with_bias(&mut keys, &format!("{at}.{m}"));
        }
    }
    with_bias(&mut keys, &format!("{prefix}ln_final"));
    keys
}

fn config<T: serde::de::DeserializeOwned>(path: &str) -> T {
    let text =
        std::fs::read_to_string(format!("{}/configs/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// `diffuse convert`'s way back names each weight's original key.
fn assert_inverse(label: &str, map: &NameMap, back: &dyn Fn(&str) -> Option<Destination>) {
    for (name, source) in map {
        let expected = match source.transform {
            Transform::Rows { index, parts } => Destination::Part(source.key.clone(), index, parts),
            transform => Destination::Whole(source.key.clone(), transform),
        };
        assert_eq!(back(name), Some(expected), "{label}: {name}");
    }
}

fn check_unet(label: &str, c: UNetConfig, expected_tensors: usize) {
    let keys = ldm_unet_keys(&c);
    let map = unet_map(
        keys.iter().map(String::as_str),
        "model.diffusion_model.",
        &c,
    )
    .unwrap();
    assert_eq!(map.len(), expected_tensors, "{label}: U-Net tensors");
    assert_one_destination_each(label, &keys, &map, &[]);
    assert_inverse(label, &map, &|name| {
        let key = unet_original_name(name, &c)?;
        Some(Destination::Whole(
            format!("model.diffusion_model.{key}"),
            Transform::Same,
        ))
    });
    assert_model_reads_exactly(label, &map, |vb| UNet2DConditionModel::new(c, vb));
}

fn check_vae(label: &str, c: VaeConfig) {
    let keys = ldm_vae_keys(&c);
    let map = vae_map(keys.iter().map(String::as_str), "first_stage_model.", &c).unwrap();
    assert_eq!(map.len(), 248, "{label}: VAE tensors");
    assert_one_destination_each(label, &keys, &map, &[]);
    assert_inverse(label, &map, &|name| {
        let (key, transform) = vae_original_name(name, &c)?;
        Some(Destination::Whole(
            format!("first_stage_model.{key}"),
            transform,
        ))
    });
    assert_model_reads_exactly(label, &map, |vb| AutoencoderKL::new(c, vb));
}

#[test]
fn sd15_layout_maps_completely() {
    check_unet("SD 1.5", config("sd15/unet.json"), 686);
    check_vae("SD 1.5", config("sd15/vae.json"));
    let text: ClipTextConfig = config("sd15/text_encoder.json");
    let keys = hf_clip_keys("cond_stage_model.transformer.", text.num_hidden_layers);
    let map = clip_map(
        keys.iter().map(String::as_str),
        "cond_stage_model.transformer.",
    )
    .unwrap();
    assert_one_destination_each("SD 1.5 text", &keys, &map, &["position_ids"]);
    assert_model_reads_exactly("SD 1.5 text", &map, |vb| ClipTextModel::new(text, vb));
}

#[test]
fn sd21_layout_maps_completely() {
    check_unet("SD 2.1", config("sd21/unet.json"), 686);
    check_vae("SD 2.1", config("sd21/vae.json"));
    let text: ClipTextConfig = config("sd21/text_encoder.json");
    assert_eq!(text.num_hidden_layers, 23);
    // The checkpoint has all 24 OpenCLIP blocks; SD 2.x reads the penultimate layer's output,
    // so diffusers (and this crate) leave the last block and the projection in the file.
    let keys = open_clip_keys("cond_stage_model.model.", 24);
    let map = open_clip_map(
        keys.iter().map(String::as_str),
        "cond_stage_model.model.",
        &text,
        false,
    )
    .unwrap();
    assert_one_destination_each(
        "SD 2.1 text",
        &keys,
        &map,
        &["resblocks.23.", "text_projection", "logit_scale"],
    );
    assert_inverse("SD 2.1 text", &map, &|name| {
        open_clip_destination(name, "cond_stage_model.model.")
    });
    assert_model_reads_exactly("SD 2.1 text", &map, |vb| ClipTextModel::new(text, vb));
}

#[test]
fn sdxl_layout_maps_completely() {
    check_unet("SDXL", config("sdxl/unet.json"), 1680);
    check_vae("SDXL", config("sdxl/vae.json"));
    let text: ClipTextConfig = config("sdxl/text_encoder.json");
    let prefix = "conditioner.embedders.0.transformer.";
    let keys = hf_clip_keys(prefix, text.num_hidden_layers);
    let map = clip_map(keys.iter().map(String::as_str), prefix).unwrap();
    assert_one_destination_each("SDXL text", &keys, &map, &["position_ids"]);
    assert_model_reads_exactly("SDXL text", &map, |vb| ClipTextModel::new(text, vb));
    let text_2: ClipTextConfig = config("sdxl/text_encoder_2.json");
    let prefix = "conditioner.embedders.1.model.";
    let keys = open_clip_keys(prefix, text_2.num_hidden_layers);
    let map = open_clip_map(keys.iter().map(String::as_str), prefix, &text_2, true).unwrap();
    assert_one_destination_each("SDXL text 2", &keys, &map, &["logit_scale"]);
    assert!(map.contains_key("text_projection.weight"));
    assert_inverse("SDXL text 2", &map, &|name| {
        open_clip_destination(name, prefix)
    });
    assert_model_reads_exactly("SDXL text 2", &map, |vb| ClipTextModel::new(text_2, vb));
}
