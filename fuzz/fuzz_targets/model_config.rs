#![no_main]
//! `cargo fuzz run model_config`: see diffuse_fuzz::model_config.
libfuzzer_sys::fuzz_target!(|data: &[u8]| diffuse_fuzz::model_config(data));
