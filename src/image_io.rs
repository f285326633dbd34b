//! PNG output with the generation parameters in a `parameters` text chunk, as the AUTOMATIC1111
//! web UI writes them, and image input with limits on what a file may make us allocate.

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

/// Whether `text` fits a PNG `tEXt` chunk, whose text is Latin-1 without NUL (PNG spec 11.3.4.3).
fn fits_latin1(text: &str) -> bool {
    text.chars().all(|c| c != '\0' && (c as u32) <= 0xFF)
}

/// An image as PNG bytes; `parameters` goes into a text chunk named `parameters`: `tEXt` when
/// it is Latin-1, else UTF-8 `iTXt` (what PIL writes then, and what A1111-style readers take),
/// so any prompt can be stored.
pub fn encode_png(image: &Tensor, parameters: Option<&str>) -> Result<Vec<u8>> {
    let (w, h, bytes) = to_rgb8(image)?;
    let color = if image.dim(0)? == 1 {
        png::ColorType::Grayscale
    } else {
        png::ColorType::Rgb
    };
    let mut out = Vec::new();
    let encoded = (|| -> std::result::Result<(), png::EncodingError> {
        let mut encoder = png::Encoder::new(&mut out, w, h);
        encoder.set_color(color);
        encoder.set_depth(png::BitDepth::Eight);
        if let Some(text) = parameters {
            let (key, text) = ("parameters".to_string(), text.to_string());
            if fits_latin1(&text) {
                encoder.add_text_chunk(key, text)?;
            } else {
                encoder.add_itxt_chunk(key, text)?;
            }
        }
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&bytes)?;
        writer.finish()
    })();
    encoded.map_err(|e| Error::Msg(format!("encoding a PNG: {e}")))?;
    Ok(out)
}

/// Writes [`encode_png`]'s bytes to a temporary name and renames them into place, so a failure
/// or a kill never leaves half an image.
pub fn save_png(image: &Tensor, path: &Path, parameters: Option<&str>) -> Result<()> {
    let bytes = encode_png(image, parameters)?;
    let io_error = |e: &dyn std::fmt::Display| crate::error::file_error(path, e.to_string());
    let tmp = partial_path(path);
    if let Err(e) = std::fs::write(&tmp, &bytes) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_error(&e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_error(&e)
    })
}

/// The hidden name a PNG is written under before it is renamed into place.
fn partial_path(path: &Path) -> std::path::PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image.png".into());
    path.with_file_name(format!(".{name}.partial"))
}

/// The `parameters` text chunk of a PNG file (`tEXt`, `zTXt` or `iTXt`), if it has one.
pub fn read_png_parameters(path: &Path) -> Result<Option<String>> {
    let file_error = |message: String| Error::File {
        path: path.display().to_string(),
        message,
    };
    let file = std::fs::File::open(path).map_err(|e| file_error(e.to_string()))?;
    let reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .map_err(|e| file_error(format!("not a readable PNG: {e}")))?;
    let info = reader.info();
    if let Some(chunk) = info
        .uncompressed_latin1_text
        .iter()
        .find(|c| c.keyword == "parameters")
    {
        return Ok(Some(chunk.text.clone()));
    }
    if let Some(chunk) = info
        .compressed_latin1_text
        .iter()
        .find(|c| c.keyword == "parameters")
    {
        return chunk
            .get_text()
            .map(Some)
            .map_err(|e| file_error(format!("its parameters zTXt chunk does not decode: {e}")));
    }
    match info.utf8_text.iter().find(|c| c.keyword == "parameters") {
        Some(chunk) => chunk
            .get_text()
            .map(Some)
            .map_err(|e| file_error(format!("its parameters iTXt chunk does not decode: {e}"))),
        None => Ok(None),
    }
}

/// Checks before any work that PNGs can be written at `path`: its folder exists and takes a
/// new file, and the path is not a folder. A probe file is created and removed.
pub fn check_writable(path: &Path) -> Result<()> {
    let file_error = |message: String| Error::File {
        path: path.display().to_string(),
        message,
    };
    if path.is_dir() {
        return Err(file_error(
            "is a folder; expected the name of a PNG file to write".into(),
        ));
    }
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !folder.is_dir() {
        return Err(file_error(format!(
            "cannot be written: the folder {} does not exist",
            folder.display()
        )));
    }
    let probe = partial_path(path).with_extension("probe");
    std::fs::File::create(&probe).map_err(|e| file_error(format!("cannot be written: {e}")))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
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

/// Images larger than this on a side are refused before decoding: one would take gigabytes.
pub const MAX_SIDE: u32 = 16384;

/// The most memory one image may take to decode (a 16384 x 16384 RGBA image).
const MAX_DECODE_BYTES: u64 = 1 << 30;

/// Decodes an image file (the content decides the format) with limits on its declared size and
/// on what decoding may allocate, so a small file that declares a huge picture (a decompression
/// bomb) is refused before the memory is taken. Errors name the file.
pub fn decode_image(path: &Path) -> Result<image::DynamicImage> {
    let file_error = |message: String| Error::File {
        path: path.display().to_string(),
        message,
    };
    let reader = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| file_error(format!("cannot be read: {e}")))?;
    decode_limited(reader).map_err(file_error)
}

/// [`decode_image`] for an image held in memory (an upload); errors name it as `what`.
pub fn decode_image_bytes(bytes: &[u8], what: &str) -> Result<image::DynamicImage> {
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::Msg(format!("{what}: cannot be read: {e}")))?;
    decode_limited(reader).map_err(|message| Error::Msg(format!("{what}: {message}")))
}

fn decode_limited<R: std::io::BufRead + std::io::Seek>(
    mut reader: image::ImageReader<R>,
) -> std::result::Result<image::DynamicImage, String> {
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    reader
        .decode()
        .map_err(|e| format!("not a readable image: {e}"))
}

/// Reads an image (PNG, JPEG, WebP; gray, RGBA and 16-bit become 8-bit RGB) as (3, H, W) in
/// [0, 1], resized with Lanczos filtering to `size` when given. Errors name the file.
pub fn load_image(path: &Path, size: Option<(u32, u32)>) -> Result<Tensor> {
    rgb_to_tensor(&decode_image(path)?.to_rgb8(), size)
}

/// An 8-bit RGB image as (3, H, W) in [0, 1], resized with Lanczos filtering to `size` when
/// given.
pub fn rgb_to_tensor(img: &image::RgbImage, size: Option<(u32, u32)>) -> Result<Tensor> {
    let resized;
    let img = match size {
        Some((w, h)) if (w, h) != img.dimensions() => {
            resized = image::imageops::resize(img, w, h, image::imageops::FilterType::Lanczos3);
            &resized
        }
        _ => img,
    };
    let (w, h) = img.dimensions();
    let data: Vec<f32> = img.as_raw().iter().map(|v| *v as f32 / 255.0).collect();
    Ok(
        Tensor::from_vec(data, (h as usize, w as usize, 3), &candle_core::Device::Cpu)?
            .permute((2, 0, 1))?
            .contiguous()?,
    )
}

/// An inpainting mask (white = repaint) as diffusers prepares it: grey levels, resized with
/// Lanczos filtering to `size` when it differs, then binarised at half (values of 128 and up
/// become 1): (1, H, W) of 0 and 1.
pub fn mask_to_tensor(mask: &image::GrayImage, size: (u32, u32)) -> Result<Tensor> {
    let resized;
    let mask = match size {
        (w, h) if (w, h) != mask.dimensions() => {
            resized = image::imageops::resize(mask, w, h, image::imageops::FilterType::Lanczos3);
            &resized
        }
        _ => mask,
    };
    let (w, h) = mask.dimensions();
    let data: Vec<f32> = mask
        .as_raw()
        .iter()
        .map(|v| if *v as f32 / 255.0 >= 0.5 { 1.0 } else { 0.0 })
        .collect();
    Ok(Tensor::from_vec(
        data,
        (1, h as usize, w as usize),
        &candle_core::Device::Cpu,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CRC-32 (ISO-HDLC, as PNG chunks use).
    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let mut out = (data.len() as u32).to_be_bytes().to_vec();
        let body: Vec<u8> = kind.iter().chain(data).copied().collect();
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
        out
    }

    /// A 100-byte PNG that declares 100000 x 100000 pixels (30 GB of RGB) is refused from its
    /// header, before the decoder allocates.
    #[test]
    fn a_decompression_bomb_is_refused_from_its_header() {
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(&100_000u32.to_be_bytes());
        ihdr.extend_from_slice(&100_000u32.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
        let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
        bytes.extend(chunk(b"IHDR", &ihdr));
        bytes.extend(chunk(
            b"IDAT",
            &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
        ));
        bytes.extend(chunk(b"IEND", &[]));
        let path = std::env::temp_dir().join(format!("diffuse-bomb-{}.png", std::process::id()));
        std::fs::write(&path, &bytes).unwrap();
        let err = load_image(&path, Some((64, 64))).unwrap_err().to_string();
        std::fs::remove_file(&path).ok();
        assert!(err.contains("diffuse-bomb"), "{err}");
        assert!(err.to_lowercase().contains("limit"), "{err}");
    }

    /// Latin-1 text goes in `tEXt` (what every reader takes), anything else in UTF-8 `iTXt`;
    /// both read back exactly.
    #[test]
    fn parameters_round_trip_in_the_chunk_their_text_needs() {
        let dir = std::env::temp_dir().join(format!("diffuse-png-text-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = Tensor::zeros((3, 8, 8), DType::F32, &candle_core::Device::Cpu).unwrap();
        for (text, utf8) in [
            ("a café, naïve\nSteps: 4", false),
            ("東京の猫 🐈\nNegative prompt: ぼやけ\nSteps: 4", true),
            ("a NUL \0 inside", true),
        ] {
            let path = dir.join("p.png");
            save_png(&image, &path, Some(text)).unwrap();
            assert_eq!(read_png_parameters(&path).unwrap().as_deref(), Some(text));
            let reader =
                png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()))
                    .read_info()
                    .unwrap();
            assert_eq!(reader.info().utf8_text.len(), usize::from(utf8), "{text}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
