#![no_main]
//! `cargo fuzz run captions`: see diffuse_fuzz::captions.
libfuzzer_sys::fuzz_target!(|data: &[u8]| diffuse_fuzz::captions(data));
