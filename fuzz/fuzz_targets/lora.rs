#![no_main]
//! `cargo fuzz run lora`: see diffuse_fuzz::lora.
libfuzzer_sys::fuzz_target!(|data: &[u8]| diffuse_fuzz::lora(data));
