#![no_main]
//! `cargo fuzz run train_config`: see diffuse_fuzz::train_config.
libfuzzer_sys::fuzz_target!(|data: &[u8]| diffuse_fuzz::train_config(data));
