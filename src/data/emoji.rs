//! The emoji set of `../shared/data/emoji`: RGBA pictures of everyday concepts in three drawing
//! styles, in the diffusers ImageFolder layout (`metadata.jsonl` beside `images/<style>/`), each
//! with its captions. Pictures are composited over a background colour, since the models here
//! draw opaque RGB.

use crate::error::{file_error, Result};
use serde::Deserialize;
use std::path::Path;

/// One line of `metadata.jsonl` (the fields used here; the others are ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct EmojiEntry {
    pub file_name: String,
    /// The plain caption ("cat face").
    pub text: String,
    /// 2-4 phrasings ("a cat face", "cat", "a cat face emoji").
    pub captions: Vec<String>,
    pub style: String,
}

/// What a caption calls a drawing style: "a cat face, twitter emoji".
pub fn style_word(style: &str) -> &str {
    match style {
        "fluent-3d" => "3d",
        other => other,
    }
}

/// The captions of one emoji picture: its own phrasings (no style named, so a prompt without a
/// style word may draw any), and the plain caption with ", emoji" and with the style's emoji.
pub fn captions_of(entry: &EmojiEntry) -> Vec<String> {
    let mut captions = entry.captions.clone();
    captions.push(format!("{}, emoji", entry.text));
    captions.push(format!(
        "{}, {} emoji",
        entry.text,
        style_word(&entry.style)
    ));
    let mut seen = std::collections::HashSet::new();
    captions.retain(|c| seen.insert(c.clone()));
    captions
}

/// Reads `metadata.jsonl` under `dir`; a line that is not an entry is named by its number.
pub fn read_metadata(dir: &Path) -> Result<Vec<EmojiEntry>> {
    let path = dir.join("metadata.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| file_error(&path, e.to_string()))?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str::<EmojiEntry>(line)
                .map_err(|e| file_error(&path, format!("line {}: {e}", i + 1)))
        })
        .collect()
}

/// The picture of `entry` as `size` x `size` RGB bytes (row-major, interleaved), composited over
/// `background`: colour x alpha + background x (1 - alpha), then box-averaged down by the whole
/// factor from its own size (64) when `size` is smaller.
pub fn composited_rgb(
    dir: &Path,
    entry: &EmojiEntry,
    size: usize,
    background: [u8; 3],
) -> Result<Vec<u8>> {
    let path = dir.join(&entry.file_name);
    let picture = crate::image_io::decode_image(&path)?.to_rgba8();
    let (w, h) = (picture.width() as usize, picture.height() as usize);
    if w != h || !w.is_multiple_of(size) {
        return Err(file_error(
            &path,
            format!("is {w}x{h}; expected a square whose side is a multiple of {size}"),
        ));
    }
    let factor = w / size;
    let mut out = vec![0u8; size * size * 3];
    for y in 0..size {
        for x in 0..size {
            let mut sum = [0f64; 3];
            for dy in 0..factor {
                for dx in 0..factor {
                    let p = picture.get_pixel((x * factor + dx) as u32, (y * factor + dy) as u32);
                    let alpha = p[3] as f64 / 255.0;
                    for c in 0..3 {
                        sum[c] += p[c] as f64 * alpha + background[c] as f64 * (1.0 - alpha);
                    }
                }
            }
            for c in 0..3 {
                out[(y * size + x) * 3 + c] = (sum[c] / (factor * factor) as f64).round() as u8;
            }
        }
    }
    Ok(out)
}

/// The concept of a picture: its file stem, the code point sequence shared by its styles.
pub fn concept_of(entry: &EmojiEntry) -> &str {
    let name = entry
        .file_name
        .rsplit('/')
        .next()
        .unwrap_or(&entry.file_name);
    name.strip_suffix(".png").unwrap_or(name)
}

/// The pictures of `styles`, labelled by concept: (entries, labels), labels numbering the
/// concepts of all the metadata in order of first appearance, so that every style split of one
/// folder numbers them alike; and the concepts' captions (`text`) by label.
pub fn by_concept<'a>(
    entries: &'a [EmojiEntry],
    styles: &[String],
) -> (Vec<(&'a EmojiEntry, usize)>, Vec<String>) {
    let mut index = std::collections::HashMap::new();
    let mut names = Vec::new();
    for entry in entries {
        index.entry(concept_of(entry)).or_insert_with(|| {
            names.push(entry.text.clone());
            names.len() - 1
        });
    }
    let picked = entries
        .iter()
        .filter(|e| styles.iter().any(|s| s == &e.style))
        .map(|e| (e, index[concept_of(e)]))
        .collect();
    (picked, names)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(style: &str) -> EmojiEntry {
        EmojiEntry {
            file_name: "images/x.png".into(),
            text: "cat face".into(),
            captions: vec!["a cat face".into(), "cat".into(), "a cat face emoji".into()],
            style: style.into(),
        }
    }

    #[test]
    fn captions_add_the_style_and_keep_the_plain_ones() {
        assert_eq!(
            captions_of(&entry("fluent-3d")),
            vec![
                "a cat face",
                "cat",
                "a cat face emoji",
                "cat face, emoji",
                "cat face, 3d emoji"
            ]
        );
        assert!(captions_of(&entry("twitter")).contains(&"cat face, twitter emoji".to_string()));
    }

    #[test]
    fn compositing_blends_over_the_background_and_averages_down() {
        let dir = std::env::temp_dir().join(format!("diffuse-emoji-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("images")).unwrap();
        // 2x2: opaque red, transparent, half-transparent blue, opaque black.
        let mut picture = image::RgbaImage::new(2, 2);
        picture.put_pixel(0, 0, image::Rgba([255, 0, 0, 255]));
        picture.put_pixel(1, 0, image::Rgba([0, 0, 0, 0]));
        picture.put_pixel(0, 1, image::Rgba([0, 0, 255, 128]));
        picture.put_pixel(1, 1, image::Rgba([0, 0, 0, 255]));
        picture.save(dir.join("images/x.png")).unwrap();
        let full = composited_rgb(&dir, &entry("google"), 2, [255, 255, 255]).unwrap();
        let half_blue = [127, 127, 255];
        assert_eq!(
            full,
            [[255, 0, 0], [255, 255, 255], half_blue, [0, 0, 0]].concat()
        );
        let one = composited_rgb(&dir, &entry("google"), 1, [255, 255, 255]).unwrap();
        let mean = |c: usize| {
            ((full[c] as f64 + full[3 + c] as f64 + full[6 + c] as f64 + full[9 + c] as f64) / 4.0)
                .round() as u8
        };
        // Averaged from the unrounded composite, so within one level of the rounded mean.
        for c in 0..3 {
            assert!((one[c] as i32 - mean(c) as i32).abs() <= 1, "{one:?}");
        }
        let err = composited_rgb(&dir, &entry("google"), 3, [0, 0, 0])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("x.png") && err.contains("multiple of 3"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
