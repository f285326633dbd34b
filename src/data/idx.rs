//! The IDX files of MNIST, Fashion-MNIST and the Quick, Draw! doodles (big-endian header, then
//! raw values), plain or gzipped. Labels are bytes (magic 0x801, `*-labels-idx1-ubyte`) or, for
//! more than 256 classes, 16-bit big-endian integers (magic 0xB01, `*-labels-idx1-short`).

use crate::error::{file_error, Error, Result};
use candle_core::{Device, Tensor};
use std::io::Read;
use std::path::{Path, PathBuf};

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;
const SHORT_LABELS_MAGIC: u32 = 0x0000_0B01;

/// A split of a labelled gray-image dataset, kept as the original bytes.
#[derive(Debug, Clone)]
pub struct LabelledImages {
    /// `count * height * width` bytes, image after image, row-major; 0 is background.
    pub pixels: Vec<u8>,
    pub labels: Vec<u16>,
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

/// An IDX label file: bytes (magic 0x801) or 16-bit big-endian integers (magic 0xB01).
pub fn read_labels(path: &Path) -> Result<Vec<u16>> {
    let bytes = read_maybe_gz(path)?;
    let h = header(&bytes, 2, path)?;
    let width = match h[0] as u32 {
        LABELS_MAGIC => 1,
        SHORT_LABELS_MAGIC => 2,
        other => {
            return Err(file_error(
                path,
                format!(
                    "magic number {other:#010x}, expected {LABELS_MAGIC:#010x} (IDX byte labels) \
                     or {SHORT_LABELS_MAGIC:#010x} (IDX 16-bit labels)"
                ),
            ))
        }
    };
    let expected = h[1].checked_mul(width).and_then(|n| n.checked_add(8));
    if Some(bytes.len()) != expected {
        return Err(file_error(
            path,
            format!(
                "{} bytes, expected 8 + {width} x {} for {} labels (truncated?)",
                bytes.len(),
                h[1],
                h[1]
            ),
        ));
    }
    Ok(match width {
        1 => bytes[8..].iter().map(|&b| b as u16).collect(),
        _ => bytes[8..]
            .chunks_exact(2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .collect(),
    })
}

/// The first of `dir/<name>.gz` and `dir/<name>` for each of `names` that exists.
fn find_file(dir: &Path, names: &[&str]) -> Result<PathBuf> {
    let candidates: Vec<PathBuf> = names
        .iter()
        .flat_map(|name| [dir.join(format!("{name}.gz")), dir.join(name)])
        .collect();
    candidates
        .iter()
        .find(|path| path.is_file())
        .cloned()
        .ok_or_else(|| {
            let looked: Vec<String> = names
                .iter()
                .flat_map(|name| [name.to_string(), format!("{name}.gz")])
                .collect();
            file_error(
                &candidates[0],
                format!("missing (looked for {} in this folder)", looked.join(", ")),
            )
        })
}

impl LabelledImages {
    /// Reads one split of an MNIST-layout folder.
    pub fn load(dir: &Path, split: Split) -> Result<Self> {
        let stem = split.stem();
        let images_path = find_file(dir, &[&format!("{stem}-images-idx3-ubyte")])?;
        let labels_path = find_file(
            dir,
            &[
                &format!("{stem}-labels-idx1-ubyte"),
                &format!("{stem}-labels-idx1-short"),
            ],
        )?;
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

    /// The Quick, Draw! layout: 16-bit labels (magic 0xB01) in `*-labels-idx1-short`, values
    /// past 255 kept; a count that does not match the bytes is named.
    #[test]
    fn reads_sixteen_bit_labels() {
        let dir = std::env::temp_dir().join(format!("diffuse-idx16-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write_idx(
            &dir.join("t10k-images-idx3-ubyte.gz"),
            IMAGES_MAGIC,
            &[3, 1, 1],
            &[0, 128, 255],
            true,
        );
        let labels: Vec<u8> = [0u16, 344, 300]
            .iter()
            .flat_map(|l| l.to_be_bytes())
            .collect();
        write_idx(
            &dir.join("t10k-labels-idx1-short.gz"),
            SHORT_LABELS_MAGIC,
            &[3],
            &labels,
            true,
        );
        let data = LabelledImages::load(&dir, Split::Test).unwrap();
        assert_eq!(data.labels, vec![0, 344, 300]);
        write_idx(
            &dir.join("t10k-labels-idx1-short.gz"),
            SHORT_LABELS_MAGIC,
            &[3],
            &labels[..5],
            true,
        );
        let err = LabelledImages::load(&dir, Split::Test)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("t10k-labels-idx1-short.gz") && err.contains("truncated"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
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
