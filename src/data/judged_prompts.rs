//! Prompt lists with the concept a judge should read in each picture drawn from them
//! (`prompts/everyday.tsv`): one prompt a line, tab-separated from the emoji concept (its
//! metadata `text`) and the Quick, Draw! class ('-' where the doodles have none); `#` starts a
//! comment line.

use crate::error::{file_error, Result};
use std::path::Path;

/// One line of a judged prompt list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JudgedPrompt {
    /// As a user types it ("a red car").
    pub prompt: String,
    /// The emoji concept an emoji-style picture of it should be read as ("automobile").
    pub emoji: String,
    /// The doodle class a doodle of it should be read as ("car"), where there is one.
    pub doodle: Option<String>,
}

/// Reads a judged prompt list; a line without its three fields, an empty field or a prompt
/// listed twice is named by its line number.
pub fn read_judged_prompts(path: &Path) -> Result<Vec<JudgedPrompt>> {
    let text = std::fs::read_to_string(path).map_err(|e| file_error(path, e.to_string()))?;
    parse_judged_prompts(&text).map_err(|message| file_error(path, message))
}

fn parse_judged_prompts(text: &str) -> std::result::Result<Vec<JudgedPrompt>, String> {
    let mut prompts: Vec<JudgedPrompt> = Vec::new();
    for (number, line) in text.lines().enumerate().map(|(i, l)| (i + 1, l)) {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').map(str::trim).collect();
        let [prompt, emoji, doodle] = fields[..] else {
            return Err(format!(
                "line {number}: {} tab-separated fields; expected 3 (prompt, emoji concept, doodle class or -)",
                fields.len()
            ));
        };
        if prompt.is_empty() || emoji.is_empty() || doodle.is_empty() {
            return Err(format!("line {number}: an empty field"));
        }
        if prompts.iter().any(|p| p.prompt == prompt) {
            return Err(format!("line {number}: \"{prompt}\" is listed twice"));
        }
        prompts.push(JudgedPrompt {
            prompt: prompt.to_string(),
            emoji: emoji.to_string(),
            doodle: (doodle != "-").then(|| doodle.to_string()),
        });
    }
    if prompts.is_empty() {
        return Err("lists no prompts".into());
    }
    Ok(prompts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_lines_and_names_bad_ones() {
        let list =
            parse_judged_prompts("# a comment\na cat\tcat face\tcat\n\nan owl\towl\t-\n").unwrap();
        assert_eq!(
            list,
            [
                JudgedPrompt {
                    prompt: "a cat".into(),
                    emoji: "cat face".into(),
                    doodle: Some("cat".into())
                },
                JudgedPrompt {
                    prompt: "an owl".into(),
                    emoji: "owl".into(),
                    doodle: None
                }
            ]
        );
        let error = parse_judged_prompts("a cat\tcat face\n").unwrap_err();
        assert!(
            error.contains("line 1") && error.contains("expected 3"),
            "{error}"
        );
        let error = parse_judged_prompts("a\tb\tc\n#\na\td\te\n").unwrap_err();
        assert!(
            error.contains("line 3") && error.contains("twice"),
            "{error}"
        );
        let error = parse_judged_prompts("a\t\tc\n").unwrap_err();
        assert!(error.contains("empty"), "{error}");
        assert!(parse_judged_prompts("# only a comment\n").is_err());
    }

    #[test]
    fn the_shipped_everyday_list_reads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("prompts/everyday.tsv");
        let list = read_judged_prompts(&path).unwrap();
        assert!(list.len() >= 100, "{} prompts", list.len());
        assert!(list.iter().any(|p| p.prompt == "a cat"));
    }
}
