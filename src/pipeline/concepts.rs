//! What a model trained here knows: the caption sets it was trained on, written beside its
//! pipeline as `concepts.json`. A prompt none of whose words appears in them names something the
//! model never saw, and `txt2img` says so instead of silently drawing one of the things it knows.

use crate::error::{file_error, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The file name inside a pipeline folder.
pub const CONCEPTS_FILE: &str = "concepts.json";

/// A word in at least this share of the caption sets says how something is drawn or is a
/// function word ("a", "of", "photo", "emoji"), not what is drawn.
const GENERIC_SHARE: f64 = 0.25;

/// The caption sets a model was trained on, the primary caption of each first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Concepts {
    pub concepts: Vec<Vec<String>>,
}

/// The lower-case words of a text: runs of letters and digits.
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

impl Concepts {
    /// Reads `dir/concepts.json`; `None` when the folder has none (models not trained here).
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(CONCEPTS_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| file_error(&path, e.to_string()))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| file_error(&path, format!("not a concepts file: {e}")))
    }

    /// Writes `dir/concepts.json` atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self).expect("concepts serialise");
        crate::checkpoint::write_atomically(&dir.join(CONCEPTS_FILE), json.as_bytes())
    }

    /// Every word of the captions, with the number of caption sets it is in.
    fn word_counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for set in &self.concepts {
            let in_set: BTreeSet<String> = set.iter().flat_map(|c| words(c)).collect();
            for word in in_set {
                *counts.entry(word).or_insert(0) += 1;
            }
        }
        counts
    }

    /// The words of `prompt` that name something (not in a quarter or more of the caption sets),
    /// and whether any of them is in the captions. A prompt of generic words only counts as
    /// known: it asks for no particular thing.
    pub fn knows(&self, prompt: &str) -> bool {
        let counts = self.word_counts();
        let generic = GENERIC_SHARE * self.concepts.len() as f64;
        let content: Vec<String> = words(prompt)
            .into_iter()
            .filter(|w| counts.get(w).is_none_or(|&n| (n as f64) < generic))
            .collect();
        content.is_empty() || content.iter().any(|w| counts.contains_key(w))
    }

    /// The primary captions of the sets with a caption that contains `query` (case-insensitive;
    /// all of them for an empty query).
    pub fn search(&self, query: &str) -> Vec<&str> {
        let query = query.to_lowercase();
        self.concepts
            .iter()
            .filter(|set| set.iter().any(|c| c.to_lowercase().contains(&query)))
            .filter_map(|set| set.first().map(String::as_str))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Concepts {
        let mut concepts: Vec<Vec<String>> = ["zero", "one", "two", "three"]
            .iter()
            .map(|w| {
                vec![
                    format!("a handwritten digit {w}"),
                    w.to_string(),
                    format!("a picture of {w}"),
                ]
            })
            .collect();
        for thing in ["a sneaker", "a bag", "a coat", "a dress"] {
            concepts.push(vec![
                format!("a photo of {thing}"),
                thing.to_string(),
                format!("a picture of {thing}"),
            ]);
        }
        Concepts { concepts }
    }

    #[test]
    fn a_prompt_is_known_when_one_naming_word_was_trained() {
        let known = tiny();
        for prompt in ["a sneaker", "A photo of a BAG, please", "two", "a red coat"] {
            assert!(known.knows(prompt), "{prompt}");
        }
        // "photo", "a", "of", "picture", "handwritten" and "digit" are in a quarter or more of
        // the sets: they say how, not what.
        for prompt in [
            "a cat",
            "a photo of a cat",
            "a handwritten cat",
            "a picture of a dog",
        ] {
            assert!(!known.knows(prompt), "{prompt}");
        }
        assert!(
            known.knows("a photo"),
            "generic words only ask for nothing in particular"
        );
    }

    #[test]
    fn search_finds_sets_by_any_caption() {
        let known = tiny();
        assert_eq!(known.search("SNEAKER"), vec!["a photo of a sneaker"]);
        assert_eq!(known.search("two"), vec!["a handwritten digit two"]);
        assert_eq!(known.search("").len(), 8);
        assert!(known.search("cat").is_empty());
    }

    #[test]
    fn round_trips_through_its_file() {
        let dir = std::env::temp_dir().join(format!("diffuse-concepts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(Concepts::read(&dir).unwrap(), None);
        tiny().write(&dir).unwrap();
        assert_eq!(Concepts::read(&dir).unwrap(), Some(tiny()));
        std::fs::write(dir.join(CONCEPTS_FILE), "[1, 2]").unwrap();
        let err = Concepts::read(&dir).unwrap_err().to_string();
        assert!(err.contains("concepts.json"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
