//! The frame check over arbitrary bytes: never panics, and a frame it accepts fits.
#![no_main]
use amqp_iam_gateway::amqp::frame;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(Some(h)) = frame::check(data, 4096) {
        assert!(h.wire_len() <= data.len().min(4096));
        let _ = frame::payload(data, &h);
    }
});
