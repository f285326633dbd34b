#![no_main]
//! `cargo fuzz run weights`: see diffuse_fuzz::weights.
libfuzzer_sys::fuzz_target!(|data: &[u8]| diffuse_fuzz::weights(data));
