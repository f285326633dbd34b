//! Captions for labelled image datasets (MNIST and Fashion-MNIST for the embedded text-to-image
//! model): a dataset's `classes.json` gives each class's words and caption templates, and a few
//! paraphrases of our own are added, so that the text encoder learns a class from varied
//! wordings ("a handwritten 7", "the digit seven", "a photo of a sneaker", "a sneaker").

use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// A dataset's `classes.json` (the fields this module uses; others are ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct ClassesFile {
    /// The class names, e.g. "7" or "Sneaker".
    pub classes: Vec<String>,
    /// What a caption calls each class, e.g. "seven" or "a sneaker".
    pub words: Vec<String>,
    pub caption_template: String,
    #[serde(default)]
    pub alternative_templates: Vec<String>,
}

impl ClassesFile {
    /// Reads a `classes.json`; errors name the file.
    pub fn read(path: &Path) -> Result<Self> {
        crate::model::config::read_json(path)
    }
}

/// Paraphrases added to every dataset's own templates. `{word}` is the class's word,
/// `{digit}` its name.
pub const EXTRA_TEMPLATES: &[&str] = &["{word}", "a picture of {word}"];

/// Every caption of every class: `captions[class]`, the dataset's caption first.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassCaptions {
    pub captions: Vec<Vec<String>>,
}

/// Fills `{word}` and `{digit}` in `template`; any other `{...}` is an error naming it.
fn fill(template: &str, word: &str, name: &str) -> Result<String> {
    let filled = template.replace("{word}", word).replace("{digit}", name);
    if let Some(start) = filled.find('{') {
        let end = filled[start..]
            .find('}')
            .map_or(filled.len(), |e| start + e + 1);
        return Err(Error::Msg(format!(
            "caption template {template:?} has the placeholder {}; expected {{word}} or {{digit}}",
            &filled[start..end]
        )));
    }
    Ok(filled)
}

impl ClassCaptions {
    /// The captions of `classes.json` at `path` with `extra` templates added; duplicates are
    /// dropped, so a template that reads the same for a class counts once.
    pub fn load(path: &Path, extra: &[&str]) -> Result<Self> {
        let file = ClassesFile::read(path)?;
        Self::from_file(&file, extra).map_err(|e| Error::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    pub fn from_file(file: &ClassesFile, extra: &[&str]) -> Result<Self> {
        if file.classes.len() != file.words.len() || file.classes.is_empty() {
            return Err(Error::Msg(format!(
                "{} classes but {} words; expected one word a class",
                file.classes.len(),
                file.words.len()
            )));
        }
        let templates: Vec<&str> = std::iter::once(file.caption_template.as_str())
            .chain(file.alternative_templates.iter().map(String::as_str))
            .chain(extra.iter().copied())
            .collect();
        let mut captions = Vec::with_capacity(file.classes.len());
        for (name, word) in file.classes.iter().zip(&file.words) {
            let mut own: Vec<String> = Vec::new();
            for template in &templates {
                let caption = fill(template, word, name)?;
                if !own.contains(&caption) {
                    own.push(caption);
                }
            }
            captions.push(own);
        }
        Ok(Self { captions })
    }

    pub fn num_classes(&self) -> usize {
        self.captions.len()
    }

    /// The dataset's own caption of `class` (the first one).
    pub fn primary(&self, class: usize) -> &str {
        &self.captions[class][0]
    }

    /// One of `class`'s captions, chosen by `draw` (any integer; taken modulo their number).
    pub fn pick(&self, class: usize, draw: u64) -> &str {
        let own = &self.captions[class];
        &own[(draw % own.len() as u64) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/classes")
            .join(format!("{name}.json"))
    }

    #[test]
    fn every_caption_names_its_class() {
        let digits = ClassCaptions::load(&fixture("mnist"), EXTRA_TEMPLATES).unwrap();
        assert_eq!(digits.num_classes(), 10);
        assert_eq!(digits.primary(7), "a handwritten digit seven");
        assert!(digits.captions[7].contains(&"a handwritten 7".to_string()));
        assert!(digits.captions[7].contains(&"seven".to_string()));
        for (class, own) in digits.captions.iter().enumerate() {
            let (name, word) = (
                class.to_string(),
                [
                    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                ][class],
            );
            for caption in own {
                assert!(
                    caption.contains(&name) || caption.contains(word),
                    "{caption}"
                );
            }
        }
        let clothes = ClassCaptions::load(&fixture("fashion-mnist"), EXTRA_TEMPLATES).unwrap();
        assert_eq!(clothes.primary(7), "a photo of a sneaker");
        assert!(clothes.captions[7].contains(&"a sneaker".to_string()));
        assert!(clothes.captions.iter().all(|own| own.len() >= 3));
        // Captions of different classes never coincide, within or across the two datasets.
        let mut all: Vec<&String> = digits
            .captions
            .iter()
            .chain(&clothes.captions)
            .flatten()
            .collect();
        let count = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), count);
    }

    #[test]
    fn pick_cycles_through_a_class_captions() {
        let digits = ClassCaptions::load(&fixture("mnist"), EXTRA_TEMPLATES).unwrap();
        let own = &digits.captions[3];
        let n = own.len() as u64;
        assert!(n > 1, "the class needs several captions to cycle through");
        // n consecutive draws give every caption of the class once, then the cycle repeats.
        let picked: std::collections::BTreeSet<&str> = (0..n).map(|d| digits.pick(3, d)).collect();
        let all: std::collections::BTreeSet<&str> = own.iter().map(String::as_str).collect();
        assert_eq!(picked, all);
        for d in 0..n {
            assert_eq!(digits.pick(3, d + n), digits.pick(3, d));
        }
    }

    #[test]
    fn an_unknown_placeholder_is_named() {
        let file = ClassesFile {
            classes: vec!["7".into()],
            words: vec!["seven".into()],
            caption_template: "a {colour} digit {word}".into(),
            alternative_templates: vec![],
        };
        let err = ClassCaptions::from_file(&file, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("{colour}"), "{err}");
        let file = ClassesFile {
            words: vec![],
            ..file
        };
        let err = ClassCaptions::from_file(&file, &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("1 classes but 0 words"), "{err}");
    }
}
