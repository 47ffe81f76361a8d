//! The STS Query API form parser and request rules on arbitrary bytes. Never panics.
#![no_main]
use amqp_iam_gateway::sts::request;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(params) = request::parse_form(data) {
        let _ = request::parse_request(&params);
    }
});
