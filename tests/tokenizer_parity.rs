//! Token ids against the fixture's cases (transformers' CLIP tokenizer) and the padded,
//! truncated ids the SD pipeline fed its text encoder.

mod common;

use common::{fixture_path, Fixture};
use diffuse::tokenizer::ClipTokenizer;

fn tokenizer() -> ClipTokenizer {
    ClipTokenizer::from_dir(&fixture_path("tiny-sd").join("tokenizer")).unwrap()
}

#[test]
fn every_case_matches_the_fast_tokenizer() {
    let tok = tokenizer();
    let cases: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(fixture_path("tokenizer_cases.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cases.len(), 20);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let expected: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode_unpadded(text).unwrap(), expected, "{text:?}");
    }
}

#[test]
fn padded_ids_match_the_pipeline_inputs() {
    let tok = tokenizer();
    let fx = Fixture::load("model_reference.safetensors");
    let prompts: Vec<String> = serde_json::from_value(fx.meta["text/prompts"].clone())
        .or_else(|_| serde_json::from_str(fx.meta_str("text/prompts")))
        .unwrap();
    let ids = fx
        .tensor("text/input_ids")
        .to_dtype(candle_core::DType::U32)
        .unwrap();
    let rows: Vec<Vec<u32>> = ids.to_vec2().unwrap();
    let untruncated = [7, 21, 2, 21, 19, 16];
    for ((prompt, expected), len) in prompts.iter().zip(&rows).zip(untruncated) {
        let encoded = tok.encode(prompt).unwrap();
        assert_eq!(&encoded.ids, expected, "{prompt:?}");
        assert_eq!(encoded.untruncated_len, len, "{prompt:?}");
    }
}

#[test]
fn long_prompts_are_truncated_keeping_eos() {
    let tok = tokenizer();
    let long = "cat ".repeat(100);
    let encoded = tok.encode(&long).unwrap();
    assert_eq!(encoded.ids.len(), 77);
    assert_eq!(encoded.ids[76], 49407);
    assert_eq!(encoded.untruncated_len, 102);
}

#[test]
fn missing_tokenizer_file_is_named() {
    let dir = std::env::temp_dir();
    let err = ClipTokenizer::from_dir(&dir)
        .err()
        .expect("error")
        .to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
}

/// SD 1.x/2.x repos ship only vocab.json and merges.txt: the tokenizer built from them gives the
/// same ids as tokenizer.json on every case.
#[test]
fn slow_format_folder_matches_the_fast_tokenizer() {
    let fast = tokenizer();
    let slow = ClipTokenizer::from_dir(&fixture_path("clip-tokenizer-slow")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(fixture_path("tokenizer_cases.json")).unwrap(),
    )
    .unwrap();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            slow.encode(text).unwrap().ids,
            fast.encode(text).unwrap().ids,
            "{text:?}"
        );
    }
    assert_eq!(slow.pad_id, 49407);
}
