//! PNG output with the generation parameters in a `parameters` tEXt chunk, as the AUTOMATIC1111
//! web UI writes them.

use crate::error::{Error, Result};
use candle_core::{DType, Tensor};
use std::path::Path;

/// (3, H, W) or (1, H, W) in [0, 1] to 8-bit RGB or gray rows: round(255 x), as diffusers'
/// `numpy_to_pil`.
pub fn to_rgb8(image: &Tensor) -> Result<(u32, u32, Vec<u8>)> {
    let (c, h, w) = image.dims3()?;
    if c != 3 && c != 1 {
        return Err(Error::Msg(format!(
            "expected a (3, H, W) or (1, H, W) image, got {:?}",
            image.dims()
        )));
    }
    let hwc: Vec<f32> = image
        .to_dtype(DType::F32)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1()?;
    let bytes = hwc
        .iter()
        .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    Ok((w as u32, h as u32, bytes))
}

/// Writes a PNG; `parameters` goes into a tEXt chunk named `parameters`. The file is written
/// to a temporary name and renamed, so a failure never leaves half an image.
pub fn save_png(image: &Tensor, path: &Path, parameters: Option<&str>) -> Result<()> {
    let (w, h, bytes) = to_rgb8(image)?;
    let color = if image.dim(0)? == 1 {
        png::ColorType::Grayscale
    } else {
        png::ColorType::Rgb
    };
    let io_error = |e: &dyn std::fmt::Display| Error::File {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let tmp = path.with_extension("png.partial");
    {
        let file = std::fs::File::create(&tmp).map_err(|e| io_error(&e))?;
        let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), w, h);
        encoder.set_color(color);
        encoder.set_depth(png::BitDepth::Eight);
        if let Some(text) = parameters {
            encoder
                .add_text_chunk("parameters".to_string(), text.to_string())
                .map_err(|e| io_error(&e))?;
        }
        let mut writer = encoder.write_header().map_err(|e| io_error(&e))?;
        writer.write_image_data(&bytes).map_err(|e| io_error(&e))?;
        writer.finish().map_err(|e| io_error(&e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| io_error(&e))
}

/// The AUTOMATIC1111 `parameters` text: prompt, `Negative prompt: ...`, then one line of
/// `Key: value` pairs.
pub fn a1111_parameters(prompt: &str, negative: &str, settings: &[(&str, String)]) -> String {
    let mut text = prompt.to_string();
    if !negative.is_empty() {
        text.push_str(&format!("\nNegative prompt: {negative}"));
    }
    let pairs: Vec<String> = settings.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    text.push('\n');
    text.push_str(&pairs.join(", "));
    text
}

/// Reads an image (PNG, JPEG, WebP; gray, RGBA and 16-bit become 8-bit RGB) as (3, H, W) in
/// [0, 1], resized with Lanczos filtering to `size` when given. Errors name the file.
pub fn load_image(path: &Path, size: Option<(u32, u32)>) -> Result<Tensor> {
    let img = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| Error::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })?
        .decode()
        .map_err(|e| Error::File {
            path: path.display().to_string(),
            message: format!("not a readable image: {e}"),
        })?
        .to_rgb8();
    let img = match size {
        Some((w, h)) if (w, h) != img.dimensions() => {
            image::imageops::resize(&img, w, h, image::imageops::FilterType::Lanczos3)
        }
        _ => img,
    };
    let (w, h) = img.dimensions();
    let data: Vec<f32> = img.into_raw().iter().map(|v| *v as f32 / 255.0).collect();
    Ok(
        Tensor::from_vec(data, (h as usize, w as usize, 3), &candle_core::Device::Cpu)?
            .permute((2, 0, 1))?
            .contiguous()?,
    )
}
