//! `diffuse bench train-ops`: the op kinds of a pixel-DDPM training step, one at a time, at the
//! shape of the U-Net's first level (the largest activations), so that a slow kernel on a new
//! device shows up by name instead of inside one step time.

use crate::model::blocks::upsample_nearest_2x;
use crate::ops::im2col::conv2d_taps;
use crate::ops::norm::GroupNorm;
use crate::ops::planes;
use crate::sampler::SeededNoise;
use crate::train::config::TrainConfig;
use candle_core::{Device, Tensor, Var};
use std::time::Instant;

type Op<'a> = Box<dyn FnMut() -> candle_core::Result<()> + 'a>;

/// Median seconds of `runs` calls of `op` after one warm-up, each waited for on the device.
fn median_seconds(op: &mut Op, device: &Device, runs: usize) -> anyhow::Result<f64> {
    op()?;
    device.synchronize()?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        op()?;
        device.synchronize()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

/// Sums `y` and back-propagates, the cheapest way to run an op's backward pass.
fn backward(y: &Tensor) -> candle_core::Result<()> {
    y.sum_all()?.backward().map(|_| ())
}

/// Times each op kind at (batch, C, H, W) = (train.batch_size, first block's channels,
/// image_size, image_size) and prints one line each, then the JSON summary.
pub fn run(config: &TrainConfig, device: &Device, runs: usize, json: bool) -> anyhow::Result<()> {
    let batch = config.train.batch_size;
    let size = config.model.image_size;
    let channels = *config
        .model
        .block_out_channels
        .first()
        .ok_or_else(|| anyhow::anyhow!("model.block_out_channels is empty"))?;
    let groups = config.model.norm_num_groups;
    let mut noise = SeededNoise::new(0);
    let mut randn = |shape: &[usize], scale: f64| -> anyhow::Result<Tensor> {
        Ok(noise.randn(shape)?.to_device(device)?.affine(scale, 0.0)?)
    };
    let x = Var::from_tensor(&randn(&[batch, channels, size, size], 1.0)?)?;
    let weight = Var::from_tensor(&randn(&[channels, channels, 3, 3], 0.05)?)?;
    let bias = Var::from_tensor(&randn(&[channels], 1.0)?)?;
    let half = Var::from_tensor(&randn(&[batch, channels, size / 2, size / 2], 1.0)?)?;
    let shifts = Var::from_tensor(&randn(&[batch, channels], 1.0)?)?;
    let columns = randn(&[batch * size * size, 9 * channels], 1.0)?;
    let kernel = randn(&[9 * channels, channels], 0.05)?;
    let norm = GroupNorm::new(
        Var::ones(channels, candle_core::DType::F32, device)?
            .as_tensor()
            .clone(),
        Var::zeros(channels, candle_core::DType::F32, device)?
            .as_tensor()
            .clone(),
        groups,
        1e-5,
    )?;
    let as_training: fn(
        &Tensor,
        &Tensor,
        Option<&Tensor>,
        usize,
        usize,
    ) -> candle_core::Result<Tensor> = if device.is_cpu() {
        crate::ops::conv_gemm::conv2d
    } else {
        conv2d_taps
    };
    let plain = x.as_tensor().detach();
    let mut ops: Vec<(&str, Op)> = vec![
        (
            "conv3x3 forward (candle)",
            Box::new(|| {
                plain
                    .conv2d(&weight.as_tensor().detach(), 1, 1, 1, 1)
                    .map(|_| ())
            }),
        ),
        (
            "conv3x3 forward+backward (candle)",
            Box::new(|| backward(&x.conv2d(&weight, 1, 1, 1, 1)?)),
        ),
        (
            "conv3x3 forward (as training runs)",
            Box::new(|| {
                as_training(&plain, &weight.as_tensor().detach(), Some(&bias), 1, 1).map(|_| ())
            }),
        ),
        (
            "conv3x3 forward+backward (as training runs)",
            Box::new(|| backward(&as_training(&x, &weight, Some(&bias), 1, 1)?)),
        ),
        (
            "matmul (B H W, 9 C) x (9 C, C)",
            Box::new(|| columns.matmul(&kernel).map(|_| ())),
        ),
        (
            "group norm + SiLU forward+backward",
            Box::new(|| backward(&norm.forward_silu(&x)?)),
        ),
        (
            "bias broadcast add forward+backward",
            Box::new(|| backward(&x.broadcast_add(&bias.reshape((1, channels, 1, 1))?)?)),
        ),
        (
            "time-embedding shift forward+backward (as training runs)",
            Box::new(|| {
                let shifted = if planes::applies_to(&x) {
                    planes::add_plane_shifts(&x, &shifts)?
                } else {
                    x.broadcast_add(&shifts.unsqueeze(2)?.unsqueeze(3)?)?
                };
                backward(&shifted)
            }),
        ),
        ("SiLU forward+backward", Box::new(|| backward(&x.silu()?))),
        (
            "cat on channels (skip connection)",
            Box::new(|| Tensor::cat(&[&plain, &plain], 1).map(|_| ())),
        ),
        (
            "nearest upsample x2 forward+backward (as training runs)",
            Box::new(|| backward(&upsample_nearest_2x(&half)?)),
        ),
    ];
    eprintln!("training ops at ({batch}, {channels}, {size}, {size}) on {device:?}");
    let mut timings = serde_json::Map::new();
    for (name, op) in ops.iter_mut() {
        let seconds = median_seconds(op, device, runs)?;
        println!("{name}: {:.3} ms", seconds * 1e3);
        timings.insert(name.to_string(), (seconds * 1e3).into());
    }
    if json {
        println!(
            "{}",
            serde_json::json!({
                "component": "TrainOps",
                "batch": batch,
                "channels": channels,
                "size": size,
                "runs": runs,
                "median_ms": timings,
            })
        );
    }
    Ok(())
}
