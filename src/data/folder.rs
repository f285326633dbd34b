//! A folder of captioned images for fine-tuning, read the way kohya's sd-scripts and diffusers'
//! ImageFolder read them: images (PNG, JPEG, WebP; gray, RGB, RGBA, 16-bit; any size) anywhere
//! under the folder, each captioned by a `metadata.jsonl` line (`file_name`, `text`, relative to
//! the jsonl's folder) or else by a sidecar `<stem>.txt`, or all by one `--caption`.
//!
//! Scanning reads only image headers. Files that cannot be used are skipped with the reason and
//! reported; a `metadata.jsonl` that names a missing file or a path outside the folder, an image
//! without a caption (unless told to skip those) and a folder with nothing usable stop the scan
//! before any training work.

use crate::error::{file_error, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

/// File extensions read as images (case-insensitive); the content decides the decoder.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp"];

/// Images larger than this on a side are skipped: decoding one would take gigabytes.
pub use crate::image_io::MAX_SIDE;

/// What to do with an image that has no caption.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MissingCaption {
    /// Stop before any work, naming the image.
    #[default]
    Fail,
    /// Skip it and report it with the other skipped files.
    Skip,
}

#[derive(Debug, Clone, Default)]
pub struct FolderOptions {
    /// One caption for every image (DreamBooth's instance prompt), instead of their own.
    pub caption: Option<String>,
    pub missing_caption: MissingCaption,
}

/// One usable image and its caption.
#[derive(Debug, Clone)]
pub struct Example {
    pub path: PathBuf,
    pub caption: String,
    pub width: u32,
    pub height: u32,
}

/// A file that was left out, and why.
#[derive(Debug, Clone)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

#[derive(Debug, Clone)]
pub struct ImageFolder {
    pub root: PathBuf,
    pub examples: Vec<Example>,
    pub skipped: Vec<Skipped>,
    /// Files that are neither images nor captions (a README, say): not data, only counted.
    pub ignored: usize,
}

fn extension(path: &Path) -> String {
    path.extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase()
}

/// Every file under `dir`, sorted, following no symbolic link out of `root`.
fn walk(dir: &Path, root: &Path, files: &mut Vec<PathBuf>) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| file_error(dir, format!("cannot be listed: {e}")))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .map_err(|e| file_error(dir, format!("cannot be listed: {e}")))?;
    entries.sort();
    for path in entries {
        let Ok(real) = path.canonicalize() else {
            files.push(path); // a dangling link: reported when it is read
            continue;
        };
        if !real.starts_with(root) {
            continue; // a link out of the folder is never followed
        }
        if real.is_dir() {
            walk(&path, root, files)?;
        } else {
            files.push(path);
        }
    }
    Ok(())
}

/// The captions of one `metadata.jsonl`, keyed by the canonical image path. A line that names a
/// path outside `root`, or a file that does not exist, is an error naming the line.
fn read_metadata(jsonl: &Path, root: &Path) -> Result<HashMap<PathBuf, String>> {
    let text = std::fs::read_to_string(jsonl)
        .map_err(|e| file_error(jsonl, format!("cannot be read: {e}")))?;
    let dir = jsonl.parent().unwrap_or(root);
    let mut captions = HashMap::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = |message: String| file_error(jsonl, format!("line {}: {message}", index + 1));
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| at(format!("not JSON: {e}")))?;
        let field = |name: &str| -> Result<String> {
            value
                .get(name)
                .and_then(|v| v.as_str())
                .map(str::to_string)
                .ok_or_else(|| at(format!("no string field \"{name}\"")))
        };
        let file_name = field("file_name")?;
        let text = field("text")?;
        let relative = Path::new(&file_name);
        let escapes = relative.is_absolute()
            || relative
                .components()
                .any(|c| matches!(c, Component::ParentDir | Component::Prefix(_)));
        if escapes {
            return Err(at(format!(
                "file_name {file_name:?} points outside the folder; only paths inside it are read"
            )));
        }
        let path = dir.join(relative);
        let real = path
            .canonicalize()
            .map_err(|_| at(format!("file_name {file_name:?}: no such file")))?;
        if !real.starts_with(root) {
            return Err(at(format!(
                "file_name {file_name:?} resolves outside the folder (a link?); only paths inside it are read"
            )));
        }
        captions.insert(real, text);
    }
    Ok(captions)
}

/// The (width, height) of an image from its header, or why it cannot be used.
fn check_image(path: &Path) -> std::result::Result<(u32, u32), String> {
    let bytes = std::fs::metadata(path)
        .map_err(|e| format!("cannot be read: {e}"))?
        .len();
    if bytes == 0 {
        return Err("empty file (0 bytes)".into());
    }
    let (width, height) = image::ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| format!("cannot be read: {e}"))?
        .into_dimensions()
        .map_err(|e| format!("not a readable image: {e}"))?;
    if width == 0 || height == 0 {
        return Err(format!("has no pixels ({width}x{height})"));
    }
    if width > MAX_SIDE || height > MAX_SIDE {
        return Err(format!(
            "too large: {width}x{height} (at most {MAX_SIDE} pixels a side)"
        ));
    }
    Ok((width, height))
}

impl ImageFolder {
    /// Lists the usable images under `root` with their captions; see the module doc for what is
    /// skipped and what stops the scan.
    pub fn scan(root: &Path, options: &FolderOptions) -> Result<Self> {
        let real_root = root
            .canonicalize()
            .map_err(|e| file_error(root, format!("cannot be opened: {e}")))?;
        if !real_root.is_dir() {
            return Err(file_error(root, "is not a folder"));
        }
        let mut files = Vec::new();
        walk(root, &real_root, &mut files)?;
        let mut metadata = HashMap::new();
        for jsonl in files
            .iter()
            .filter(|p| p.file_name().is_some_and(|n| n == "metadata.jsonl"))
        {
            metadata.extend(read_metadata(jsonl, &real_root)?);
        }
        let is_image = |p: &Path| IMAGE_EXTENSIONS.contains(&extension(p).as_str());
        let image_stems: std::collections::HashSet<PathBuf> = files
            .iter()
            .filter(|p| is_image(p))
            .map(|p| p.with_extension(""))
            .collect();
        let mut folder = Self {
            root: root.to_path_buf(),
            examples: Vec::new(),
            skipped: Vec::new(),
            ignored: 0,
        };
        let mut uncaptioned = Vec::new();
        for path in &files {
            if path.file_name().is_some_and(|n| n == "metadata.jsonl") {
                continue;
            }
            if extension(path) == "txt" {
                if !image_stems.contains(&path.with_extension("")) {
                    folder.skipped.push(Skipped {
                        path: path.clone(),
                        reason: "caption file without an image of the same name".into(),
                    });
                }
                continue;
            }
            if !is_image(path) {
                folder.ignored += 1;
                continue;
            }
            let (width, height) = match check_image(path) {
                Ok(size) => size,
                Err(reason) => {
                    folder.skipped.push(Skipped {
                        path: path.clone(),
                        reason,
                    });
                    continue;
                }
            };
            let sidecar = || -> Option<String> {
                let text = std::fs::read_to_string(path.with_extension("txt")).ok()?;
                let text = text.trim();
                (!text.is_empty()).then(|| text.to_string())
            };
            let caption = options
                .caption
                .clone()
                .or_else(|| {
                    path.canonicalize()
                        .ok()
                        .and_then(|real| metadata.get(&real).cloned())
                })
                .or_else(sidecar);
            match caption {
                Some(caption) => folder.examples.push(Example {
                    path: path.clone(),
                    caption,
                    width,
                    height,
                }),
                None => uncaptioned.push(path.clone()),
            }
        }
        match (options.missing_caption, uncaptioned.first()) {
            (MissingCaption::Fail, Some(first)) => {
                return Err(file_error(
                    first,
                    format!(
                        "has no caption (no metadata.jsonl line, no non-empty {}; {} such images \
                         in all): give --caption \"...\" for all images, or skip them with \
                         --skip-uncaptioned",
                        first.with_extension("txt").display(),
                        uncaptioned.len()
                    ),
                ))
            }
            _ => folder
                .skipped
                .extend(uncaptioned.into_iter().map(|path| Skipped {
                    path,
                    reason: "no caption".into(),
                })),
        }
        if folder.examples.is_empty() {
            let why = if folder.skipped.is_empty() {
                format!("no images ({}) in it", IMAGE_EXTENSIONS.join(", "))
            } else {
                let first = &folder.skipped[0];
                format!(
                    "no usable images: {} files skipped, e.g. {}: {}",
                    folder.skipped.len(),
                    first.path.display(),
                    first.reason
                )
            };
            return Err(file_error(root, why));
        }
        Ok(folder)
    }
}

/// Decodes an image and scales its shorter side to `resolution`, centre-cropping the longer side
/// (diffusers' Resize + CenterCrop): (3, R, R) in [0, 1]. Gray is repeated to RGB, alpha
/// dropped, 16 bits rounded to 8.
pub fn load_square(path: &Path, resolution: u32, device: &Device) -> Result<Tensor> {
    let rgb = crate::image_io::decode_image(path)?.to_rgb8();
    let (width, height) = rgb.dimensions();
    let scale = resolution as f64 / width.min(height) as f64;
    let scaled_w = ((width as f64 * scale).round() as u32).max(resolution);
    let scaled_h = ((height as f64 * scale).round() as u32).max(resolution);
    let scaled = image::imageops::resize(
        &rgb,
        scaled_w,
        scaled_h,
        image::imageops::FilterType::CatmullRom,
    );
    let left = (scaled_w - resolution) / 2;
    let top = (scaled_h - resolution) / 2;
    let square = image::imageops::crop_imm(&scaled, left, top, resolution, resolution).to_image();
    let r = resolution as usize;
    let hwc: Vec<f32> = square
        .into_raw()
        .iter()
        .map(|v| *v as f32 / 255.0)
        .collect();
    Ok(Tensor::from_vec(hwc, (r, r, 3), device)?
        .permute((2, 0, 1))?
        .contiguous()?)
}
