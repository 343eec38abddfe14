//! An identity provider's answer (status, `Retry-After`, content type, body) through the token response
//! parser (`tokend::fuzzing::idp_response` says what is checked).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tokend::fuzzing::idp_response(data));
