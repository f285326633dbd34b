//! The IDX files of MNIST and Fashion-MNIST (big-endian header, then raw bytes), plain or gzipped.

use crate::error::{file_error, Error, Result};
use candle_core::{Device, Tensor};
use std::io::Read;
use std::path::{Path, PathBuf};

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;

/// A split of a labelled gray-image dataset, kept as the original bytes.
#[derive(Debug, Clone)]
pub struct LabelledImages {
    /// `count * height * width` bytes, image after image, row-major; 0 is background.
    pub pixels: Vec<u8>,
    pub labels: Vec<u8>,
    pub height: usize,
    pub width: usize,
}

/// Which split of a dataset folder to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

impl Split {
    pub fn stem(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Test => "t10k",
        }
    }
}

/// Reads a whole file, inflating it when the name ends in `.gz`.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| file_error(path, e.to_string()))?;
    if path.extension().is_some_and(|e| e == "gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| file_error(path, format!("not a valid gzip file: {e}")))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn header(bytes: &[u8], words: usize, path: &Path) -> Result<Vec<usize>> {
    if bytes.len() < 4 * words {
        return Err(file_error(
            path,
            format!(
                "{} bytes is shorter than the {}-byte IDX header",
                bytes.len(),
                4 * words
            ),
        ));
    }
    Ok((0..words)
        .map(|i| u32::from_be_bytes(bytes[4 * i..4 * i + 4].try_into().expect("4 bytes")) as usize)
        .collect())
}

/// An IDX image file (magic 0x803): returns (pixels, count, rows, cols).
pub fn read_images(path: &Path) -> Result<(Vec<u8>, usize, usize, usize)> {
    let bytes = read_maybe_gz(path)?;
    let h = header(&bytes, 4, path)?;
    if h[0] != IMAGES_MAGIC as usize {
        return Err(file_error(
            path,
            format!(
                "magic number {:#010x}, expected {IMAGES_MAGIC:#010x} (IDX images)",
                h[0]
            ),
        ));
    }
    let (count, rows, cols) = (h[1], h[2], h[3]);
    let expected = 16 + count * rows * cols;
    if bytes.len() != expected {
        return Err(file_error(
            path,
            format!(
                "{} bytes, expected {expected} for {count} images of {rows}x{cols} (truncated?)",
                bytes.len()
            ),
        ));
    }
    Ok((bytes[16..].to_vec(), count, rows, cols))
}

/// An IDX label file (magic 0x801).
pub fn read_labels(path: &Path) -> Result<Vec<u8>> {
    let bytes = read_maybe_gz(path)?;
    let h = header(&bytes, 2, path)?;
    if h[0] != LABELS_MAGIC as usize {
        return Err(file_error(
            path,
            format!(
                "magic number {:#010x}, expected {LABELS_MAGIC:#010x} (IDX labels)",
                h[0]
            ),
        ));
    }
    if bytes.len() != 8 + h[1] {
        return Err(file_error(
            path,
            format!(
                "{} bytes, expected {} for {} labels (truncated?)",
                bytes.len(),
                8 + h[1],
                h[1]
            ),
        ));
    }
    Ok(bytes[8..].to_vec())
}

/// `dir/<stem>-<kind>-idx<n>-ubyte`, with or without `.gz`.
fn find_file(dir: &Path, name: &str) -> Result<PathBuf> {
    let plain = dir.join(name);
    let gz = dir.join(format!("{name}.gz"));
    if gz.is_file() {
        Ok(gz)
    } else if plain.is_file() {
        Ok(plain)
    } else {
        Err(file_error(
            &gz,
            format!("missing (looked for {name} and {name}.gz in this folder)"),
        ))
    }
}

impl LabelledImages {
    /// Reads one split of an MNIST-layout folder.
    pub fn load(dir: &Path, split: Split) -> Result<Self> {
        let images_path = find_file(dir, &format!("{}-images-idx3-ubyte", split.stem()))?;
        let labels_path = find_file(dir, &format!("{}-labels-idx1-ubyte", split.stem()))?;
        let (pixels, count, height, width) = read_images(&images_path)?;
        let labels = read_labels(&labels_path)?;
        if labels.len() != count {
            return Err(file_error(
                &labels_path,
                format!(
                    "{} labels but {} has {count} images",
                    labels.len(),
                    images_path.display()
                ),
            ));
        }
        Ok(Self {
            pixels,
            labels,
            height,
            width,
        })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The images at `indices` as a (B, 1, H, W) f32 tensor scaled to [-1, 1] (`u8 / 127.5 - 1`,
    /// the range of the diffusion models and of the judges).
    pub fn batch(&self, indices: &[usize], device: &Device) -> Result<Tensor> {
        let size = self.height * self.width;
        let mut values = Vec::with_capacity(indices.len() * size);
        for &i in indices {
            values.extend(
                self.pixels[i * size..(i + 1) * size]
                    .iter()
                    .map(|&p| p as f32 / 127.5 - 1.0),
            );
        }
        Ok(Tensor::from_vec(
            values,
            (indices.len(), 1, self.height, self.width),
            device,
        )?)
    }

    /// The labels at `indices` as a (B,) u32 tensor.
    pub fn label_batch(&self, indices: &[usize], device: &Device) -> Result<Tensor> {
        let labels: Vec<u32> = indices.iter().map(|&i| self.labels[i] as u32).collect();
        Ok(Tensor::from_vec(labels, indices.len(), device)?)
    }
}

/// The training images of every folder, pooled; all must share one size.
pub fn load_pooled(paths: &[PathBuf], split: Split) -> Result<LabelledImages> {
    let mut pooled: Option<LabelledImages> = None;
    for path in paths {
        let part = LabelledImages::load(path, split)?;
        pooled = Some(match pooled {
            None => part,
            Some(mut all) => {
                if (all.height, all.width) != (part.height, part.width) {
                    return Err(Error::File {
                        path: path.display().to_string(),
                        message: format!(
                            "images are {}x{}, but the folders before have {}x{}",
                            part.height, part.width, all.height, all.width
                        ),
                    });
                }
                all.pixels.extend_from_slice(&part.pixels);
                all.labels.extend_from_slice(&part.labels);
                all
            }
        });
    }
    pooled.ok_or_else(|| Error::bad_value("data.paths", "[]", "at least one folder"))
}

/// (B, C, h, w) images in [-1, 1] padded with black (-1) to `size` x `size`, centred.
pub fn pad_to(images: &Tensor, size: usize) -> Result<Tensor> {
    let (_, _, h, w) = images.dims4()?;
    if h > size || w > size {
        return Err(Error::Msg(format!(
            "images are {h}x{w}, larger than data.image_size = {size}"
        )));
    }
    let (top, left) = ((size - h) / 2, (size - w) / 2);
    let shifted = (images + 1.0)?
        .pad_with_zeros(2, top, size - h - top)?
        .pad_with_zeros(3, left, size - w - left)?;
    Ok((shifted - 1.0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write_idx(path: &Path, magic: u32, dims: &[u32], body: &[u8], gz: bool) {
        let mut bytes = magic.to_be_bytes().to_vec();
        for d in dims {
            bytes.extend(d.to_be_bytes());
        }
        bytes.extend(body);
        let file = std::fs::File::create(path).unwrap();
        if gz {
            let mut enc = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
            enc.write_all(&bytes).unwrap();
            enc.finish().unwrap();
        } else {
            let mut file = file;
            file.write_all(&bytes).unwrap();
        }
    }

    #[test]
    fn reads_plain_and_gzipped_and_names_bad_files() {
        let dir = std::env::temp_dir().join(format!("diffuse-idx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pixels: Vec<u8> = (0..2 * 3 * 2).map(|i| i as u8 * 20).collect();
        write_idx(
            &dir.join("train-images-idx3-ubyte.gz"),
            IMAGES_MAGIC,
            &[2, 3, 2],
            &pixels,
            true,
        );
        write_idx(
            &dir.join("train-labels-idx1-ubyte"),
            LABELS_MAGIC,
            &[2],
            &[7, 1],
            false,
        );
        let data = LabelledImages::load(&dir, Split::Train).unwrap();
        assert_eq!((data.len(), data.height, data.width), (2, 3, 2));
        assert_eq!(data.pixels, pixels);
        let batch = data.batch(&[1], &Device::Cpu).unwrap();
        let values = batch.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(values[0], 120.0 / 127.5 - 1.0);
        assert_eq!(
            data.label_batch(&[1, 0], &Device::Cpu)
                .unwrap()
                .to_vec1::<u32>()
                .unwrap(),
            vec![1, 7]
        );

        // Truncated body, wrong magic, missing split: each error names the file.
        write_idx(
            &dir.join("t10k-images-idx3-ubyte"),
            IMAGES_MAGIC,
            &[2, 3, 2],
            &pixels[..5],
            false,
        );
        write_idx(
            &dir.join("t10k-labels-idx1-ubyte"),
            IMAGES_MAGIC,
            &[2],
            &[0, 1],
            false,
        );
        let err = LabelledImages::load(&dir, Split::Test)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("t10k-images-idx3-ubyte") && err.contains("truncated"),
            "{err}"
        );
        let err = read_labels(&dir.join("t10k-labels-idx1-ubyte"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("magic"), "{err}");
        std::fs::write(dir.join("train-images-idx3-ubyte.gz"), b"not gzip").unwrap();
        let err = LabelledImages::load(&dir, Split::Train)
            .unwrap_err()
            .to_string();
        assert!(err.contains("gzip"), "{err}");
        let err = LabelledImages::load(&dir.join("nowhere"), Split::Train)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
