//! Captioned images from several datasets at one size and channel count: IDX folders with their
//! `classes.json` (digits, clothes, doodles) and emoji folders, pooled for the autoencoder and the
//! text-to-image trainer. Every image belongs to a caption set ("class"): an IDX label's class, or
//! for an emoji its own picture's phrasings.

use super::captions::{ClassCaptions, EXTRA_TEMPLATES};
use super::emoji;
use super::idx::{LabelledImages, Split};
use crate::error::{file_error, Error, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The datasets of a training config's `[data]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ImageSources {
    /// MNIST-layout IDX folders, each with a `classes.json`.
    pub idx: Vec<PathBuf>,
    /// Emoji folders (`metadata.jsonl`, RGBA pictures).
    pub emoji: Vec<PathBuf>,
    /// How many times each emoji picture is in the pool the training steps draw from (a few
    /// thousand pictures beside 150,000 grey ones would otherwise be one draw in forty).
    pub emoji_repeat: usize,
    /// At most this many images of each class of an IDX folder (the first ones), where a model
    /// needs fewer than a dataset has: 1,000 keeps every doodle (90 a class) and a sixth of the
    /// digits and clothes.
    pub per_class_limit: Option<usize>,
}

/// The pooled images, `channels` x `size` x `size` bytes each, with their caption sets.
#[derive(Debug, Clone)]
pub struct ImageSet {
    /// Image after image, channel planes in order, row-major.
    pub pixels: Vec<u8>,
    pub size: usize,
    pub channels: usize,
    /// Each image's caption set.
    pub classes: Vec<usize>,
    /// `captions[class]`: the phrasings of that caption set, the primary one first.
    pub captions: Vec<Vec<String>>,
    /// The pool training draws from: image indices, an emoji's `emoji_repeat` times. Indices
    /// given to [`ImageSet::batch`] and counted by [`ImageSet::len`] are positions in it.
    pub pool: Vec<usize>,
}

/// The emoji pictures a split holds: the training split all of them, the test split every 20th
/// (the set has no held-out pictures; the test figures of an emoji-trained autoencoder are
/// therefore on pictures it saw).
fn emoji_in_split(index: usize, split: Split) -> bool {
    match split {
        Split::Train => true,
        Split::Test => index.is_multiple_of(20),
    }
}

/// A grey `h` x `w` picture placed on a `size` x `size` canvas: enlarged by the whole factor
/// `size / max(h, w)` (nearest neighbour, at least 1), centred, the margin 0 (the datasets'
/// black), then repeated over `channels`.
pub fn place_grey(pixels: &[u8], h: usize, w: usize, size: usize, channels: usize) -> Vec<u8> {
    let factor = (size / h.max(w)).max(1);
    let (sh, sw) = (h * factor, w * factor);
    let (top, left) = (size.saturating_sub(sh) / 2, size.saturating_sub(sw) / 2);
    let mut plane = vec![0u8; size * size];
    for y in 0..sh.min(size) {
        for x in 0..sw.min(size) {
            plane[(top + y) * size + left + x] = pixels[(y / factor) * w + x / factor];
        }
    }
    plane.repeat(channels)
}

/// Interleaved RGB bytes as `channels` planes: the three planes, or their BT.601 luma.
fn planes_of_rgb(rgb: &[u8], channels: usize) -> Vec<u8> {
    let n = rgb.len() / 3;
    if channels == 1 {
        return rgb
            .chunks_exact(3)
            .map(|p| {
                (0.299 * p[0] as f64 + 0.587 * p[1] as f64 + 0.114 * p[2] as f64).round() as u8
            })
            .collect();
    }
    (0..3)
        .flat_map(|c| (0..n).map(move |i| rgb[3 * i + c]))
        .collect()
}

impl ImageSet {
    /// Reads `split` of every source at `size` x `size` and `channels` (1 or 3), emoji composited
    /// over `background`. Classes of later sources are numbered after earlier ones'. With
    /// `captions` false (an autoencoder needs none) an IDX folder may lack its `classes.json`, and
    /// its classes then have no captions.
    pub fn load(
        sources: &ImageSources,
        split: Split,
        size: usize,
        channels: usize,
        background: [u8; 3],
        captions: bool,
    ) -> Result<Self> {
        if channels != 1 && channels != 3 {
            return Err(Error::bad_value("channels", channels, "1 or 3"));
        }
        if sources.idx.is_empty() && sources.emoji.is_empty() {
            return Err(Error::bad_value(
                "data.paths / data.emoji",
                "[]",
                "at least one folder",
            ));
        }
        let mut set = Self {
            pixels: Vec::new(),
            size,
            channels,
            classes: Vec::new(),
            captions: Vec::new(),
            pool: Vec::new(),
        };
        for path in &sources.idx {
            let images = LabelledImages::load(path, split)?;
            let classes_file = path.join("classes.json");
            let own = if captions || classes_file.exists() {
                ClassCaptions::load(&classes_file, EXTRA_TEMPLATES)?
            } else {
                let count = images.labels.iter().max().map_or(0, |l| *l as usize + 1);
                ClassCaptions {
                    captions: vec![Vec::new(); count],
                }
            };
            if let Some(bad) = images
                .labels
                .iter()
                .find(|l| **l as usize >= own.num_classes())
            {
                return Err(file_error(
                    path,
                    format!(
                        "label {bad} has no class in classes.json ({} classes)",
                        own.num_classes()
                    ),
                ));
            }
            if images.height.max(images.width) > size {
                return Err(file_error(
                    path,
                    format!(
                        "images are {}x{}, larger than data.image_size = {size}",
                        images.height, images.width
                    ),
                ));
            }
            let offset = set.captions.len();
            let area = images.height * images.width;
            let limit = sources.per_class_limit.unwrap_or(usize::MAX);
            let mut taken = vec![0usize; own.num_classes()];
            for (i, label) in images.labels.iter().enumerate() {
                let count = &mut taken[*label as usize];
                if *count >= limit {
                    continue;
                }
                *count += 1;
                set.pixels.extend(place_grey(
                    &images.pixels[i * area..(i + 1) * area],
                    images.height,
                    images.width,
                    size,
                    channels,
                ));
                set.pool.push(set.classes.len());
                set.classes.push(offset + *label as usize);
            }
            set.captions.extend(own.captions);
        }
        for dir in &sources.emoji {
            for (i, entry) in emoji::read_metadata(dir)?.iter().enumerate() {
                if !emoji_in_split(i, split) {
                    continue;
                }
                let rgb = emoji::composited_rgb(dir, entry, size, background)?;
                set.pixels.extend(planes_of_rgb(&rgb, channels));
                let image = set.classes.len();
                set.pool
                    .extend(std::iter::repeat_n(image, sources.emoji_repeat.max(1)));
                set.classes.push(set.captions.len());
                set.captions.push(emoji::captions_of(entry));
            }
        }
        Ok(set)
    }

    /// The emoji pictures of `styles` in `dir`, labelled by concept (the class of each picture is
    /// its concept, whose one caption is its `text`): what an emoji judge trains and is tested on.
    pub fn emoji_concepts(
        dir: &std::path::Path,
        styles: &[String],
        size: usize,
        channels: usize,
        background: [u8; 3],
    ) -> Result<Self> {
        let entries = emoji::read_metadata(dir)?;
        let (picked, names) = emoji::by_concept(&entries, styles);
        if picked.is_empty() {
            return Err(file_error(
                dir,
                format!("has no pictures of the styles {styles:?}"),
            ));
        }
        let mut set = Self {
            pixels: Vec::with_capacity(picked.len() * channels * size * size),
            size,
            channels,
            classes: Vec::with_capacity(picked.len()),
            captions: names.into_iter().map(|n| vec![n]).collect(),
            pool: (0..picked.len()).collect(),
        };
        for (entry, concept) in picked {
            let rgb = emoji::composited_rgb(dir, entry, size, background)?;
            set.pixels.extend(planes_of_rgb(&rgb, channels));
            set.classes.push(concept);
        }
        Ok(set)
    }

    /// The size of the pool (each emoji counted `emoji_repeat` times).
    pub fn len(&self) -> usize {
        self.pool.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pool.is_empty()
    }

    /// The caption set of pool position `index`.
    pub fn class_of(&self, index: usize) -> usize {
        self.classes[self.pool[index]]
    }

    /// The images at pool positions `indices` as a (B, C, size, size) f32 tensor in [-1, 1]
    /// (`u8 / 127.5 - 1`).
    pub fn batch(&self, indices: &[usize], device: &Device) -> Result<Tensor> {
        let images: Vec<usize> = indices.iter().map(|&i| self.pool[i]).collect();
        self.image_batch(&images, device)
    }

    /// The images `images` (indices into the images, not the pool), as [`ImageSet::batch`].
    pub fn image_batch(&self, images: &[usize], device: &Device) -> Result<Tensor> {
        let indices = images;
        let each = self.channels * self.size * self.size;
        let mut values = Vec::with_capacity(indices.len() * each);
        for &i in indices {
            values.extend(
                self.pixels[i * each..(i + 1) * each]
                    .iter()
                    .map(|&p| p as f32 / 127.5 - 1.0),
            );
        }
        Ok(Tensor::from_vec(
            values,
            (indices.len(), self.channels, self.size, self.size),
            device,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grey_pictures_are_enlarged_centred_and_repeated() {
        // 2x2 on a 5x5 canvas: factor 2, a 4x4 block from (0, 0), one column and row of margin.
        let placed = place_grey(&[1, 2, 3, 4], 2, 2, 5, 1);
        assert_eq!(
            placed,
            vec![
                1, 1, 2, 2, 0, //
                1, 1, 2, 2, 0, //
                3, 3, 4, 4, 0, //
                3, 3, 4, 4, 0, //
                0, 0, 0, 0, 0,
            ]
        );
        // 28x28 digits on 32: factor 1, 2 pixels of margin each side, as the 32x32 models pad.
        let digit: Vec<u8> = (0..28 * 28).map(|i| (i % 251) as u8).collect();
        let on_32 = place_grey(&digit, 28, 28, 32, 3);
        assert_eq!(on_32.len(), 3 * 32 * 32);
        assert_eq!(on_32[2 * 32 + 2], digit[0]);
        assert_eq!(
            on_32[32 * 32 + 2 * 32 + 2],
            digit[0],
            "the green plane repeats it"
        );
        assert_eq!(on_32[0], 0);
    }

    #[test]
    fn rgb_becomes_planes_or_luma() {
        let rgb = [10, 20, 30, 200, 100, 50];
        assert_eq!(planes_of_rgb(&rgb, 3), vec![10, 200, 20, 100, 30, 50]);
        assert_eq!(planes_of_rgb(&rgb, 1), vec![18, 124]);
    }
}
