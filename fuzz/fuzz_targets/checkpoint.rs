#![no_main]
//! `cargo fuzz run checkpoint`: see diffuse_fuzz::checkpoint.
libfuzzer_sys::fuzz_target!(|data: &[u8]| diffuse_fuzz::checkpoint(data));
