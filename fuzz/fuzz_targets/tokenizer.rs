#![no_main]
//! `cargo fuzz run tokenizer`: see diffuse_fuzz::tokenizer.
libfuzzer_sys::fuzz_target!(|data: &[u8]| diffuse_fuzz::tokenizer(data));
