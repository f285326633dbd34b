#![no_main]
//! `cargo fuzz run image`: see diffuse_fuzz::image.
libfuzzer_sys::fuzz_target!(|data: &[u8]| diffuse_fuzz::image(data));
