//! Raw client bytes through tokend's real accept loop and hyper connection to the dialect decision
//! (`tokend::fuzzing::request` says what is checked).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tokend::fuzzing::request(data));
