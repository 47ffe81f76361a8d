//! AMQP 0-9-1 framing: check-then-split over a byte buffer.
//!
//! A frame is `type:u8 channel:u16 size:u32 payload[size] 0xCE`. [`check`] looks at the
//! 7-byte header only and says whether a whole frame is buffered, so a hostile size is
//! refused before anything is allocated for it. "Not enough bytes yet" is not an error.
//! This module does no IO and never copies payloads: callers split frames off their
//! read buffer and forward them as they are.

use bytes::{BufMut, BytesMut};

/// Length of the frame header (type, channel, size).
pub const HEADER_LEN: usize = 7;
/// The frame-end octet.
pub const FRAME_END: u8 = 0xCE;
/// Frame type of a method frame.
pub const METHOD: u8 = 1;
/// Frame type of a content header frame.
pub const HEADER: u8 = 2;
/// Frame type of a content body frame.
pub const BODY: u8 = 3;
/// Frame type of a heartbeat frame.
pub const HEARTBEAT: u8 = 8;
/// The protocol header a 0-9-1 client sends first, and that RabbitMQ sends back to a
/// client that offered anything else.
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";

/// The fixed part of a frame, read before its payload is buffered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub frame_type: u8,
    pub channel: u16,
    pub size: u32,
}

impl FrameHeader {
    /// Total bytes of the frame on the wire, header and frame-end included.
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + self.size as usize + 1
    }
}

/// Malformed framing: legal AMQP never produces these, so the connection is closed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame type {0} is not a valid AMQP 0-9-1 frame type")]
    BadType(u8),
    #[error("frame of {size} bytes exceeds the negotiated frame_max of {max}")]
    TooLarge { size: usize, max: usize },
    #[error("frame end octet is {0:#04x}, expected 0xce")]
    BadFrameEnd(u8),
}

/// Reads the header at the start of `buf`, if 7 bytes are there.
pub fn peek_header(buf: &[u8]) -> Option<FrameHeader> {
    let h: &[u8; HEADER_LEN] = buf.get(..HEADER_LEN)?.try_into().ok()?;
    Some(FrameHeader {
        frame_type: h[0],
        channel: u16::from_be_bytes([h[1], h[2]]),
        size: u32::from_be_bytes([h[3], h[4], h[5], h[6]]),
    })
}

/// Checks the header against `frame_max` (the whole frame's size limit, as negotiated in
/// tune; 0 means RabbitMQ's "no limit" and is treated as `u32::MAX`).
pub fn check_header(h: &FrameHeader, frame_max: usize) -> Result<(), FrameError> {
    if !matches!(h.frame_type, METHOD | HEADER | BODY | HEARTBEAT) {
        return Err(FrameError::BadType(h.frame_type));
    }
    let max = if frame_max == 0 {
        u32::MAX as usize
    } else {
        frame_max
    };
    if h.wire_len() > max {
        return Err(FrameError::TooLarge {
            size: h.wire_len(),
            max,
        });
    }
    Ok(())
}

/// RabbitMQ's `?FRAME_SIZE_FUDGE` (`rabbit_reader`): the broker accepts frames from a
/// client up to `frame_max + 8` bytes on the wire, because many clients take `frame_max` as
/// the largest *payload* (rabbitmq-client, for one, cuts bodies into `frame_max`-byte
/// payloads). The gateway accepts the same from its clients; what it forwards is then still
/// accepted by RabbitMQ, which negotiated the same `frame_max`.
pub const CLIENT_FRAME_SIZE_FUDGE: usize = 8;

/// [`check_header`] for a frame from a client: `frame_max` plus RabbitMQ's fudge (a payload
/// of at most `frame_max` bytes). 0 stays "no limit".
pub fn check_client_header(h: &FrameHeader, frame_max: usize) -> Result<(), FrameError> {
    let limit = if frame_max == 0 {
        0
    } else {
        frame_max.saturating_add(CLIENT_FRAME_SIZE_FUDGE)
    };
    check_header(h, limit)
}

/// Checks whether a whole frame is buffered at the start of `buf`.
/// `Ok(None)`: more bytes are needed. `Ok(Some(header))`: `header.wire_len()` bytes hold
/// a complete frame with a valid frame-end octet.
pub fn check(buf: &[u8], frame_max: usize) -> Result<Option<FrameHeader>, FrameError> {
    let Some(h) = peek_header(buf) else {
        return Ok(None);
    };
    check_header(&h, frame_max)?;
    let len = h.wire_len();
    if buf.len() < len {
        return Ok(None);
    }
    match buf[len - 1] {
        FRAME_END => Ok(Some(h)),
        other => Err(FrameError::BadFrameEnd(other)),
    }
}

/// The payload of a complete frame that starts at `buf[0]`.
pub fn payload<'a>(buf: &'a [u8], h: &FrameHeader) -> &'a [u8] {
    &buf[HEADER_LEN..HEADER_LEN + h.size as usize]
}

/// Appends a frame with the given payload to `out`.
pub fn write_frame(out: &mut BytesMut, frame_type: u8, channel: u16, payload: &[u8]) {
    out.reserve(HEADER_LEN + payload.len() + 1);
    out.put_u8(frame_type);
    out.put_u16(channel);
    out.put_u32(payload.len() as u32);
    out.put_slice(payload);
    out.put_u8(FRAME_END);
}

/// Appends a heartbeat frame.
pub fn write_heartbeat(out: &mut BytesMut) {
    write_frame(out, HEARTBEAT, 0, &[]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(t: u8, ch: u16, payload: &[u8]) -> Vec<u8> {
        let mut b = BytesMut::new();
        write_frame(&mut b, t, ch, payload);
        b.to_vec()
    }

    #[test]
    fn incomplete_is_not_an_error() {
        let f = frame(METHOD, 1, b"abcdef");
        for cut in 0..f.len() {
            assert_eq!(check(&f[..cut], 4096), Ok(None), "cut at {cut}");
        }
        let h = check(&f, 4096).unwrap().unwrap();
        assert_eq!((h.frame_type, h.channel, h.size), (METHOD, 1, 6));
        assert_eq!(payload(&f, &h), b"abcdef");
    }

    #[test]
    fn oversized_frame_refused_from_header_alone() {
        let header = [METHOD, 0, 1, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            check(&header, 131_072),
            Err(FrameError::TooLarge { .. })
        ));
        // Exactly frame_max bytes on the wire is allowed.
        let f = frame(BODY, 1, &[0u8; 4088]);
        assert_eq!(f.len(), 4096);
        assert!(check(&f, 4096).unwrap().is_some());
        assert!(check(&f, 4095).is_err());
    }

    #[test]
    fn client_frames_get_rabbitmqs_fudge() {
        // A payload of frame_max bytes (frame_max + 8 on the wire) passes, one more fails.
        let ok = peek_header(&frame(BODY, 1, &[0u8; 4096])).unwrap();
        assert_eq!(check_client_header(&ok, 4096), Ok(()));
        assert!(check_header(&ok, 4096).is_err());
        let over = peek_header(&frame(BODY, 1, &[0u8; 4097])).unwrap();
        assert_eq!(
            check_client_header(&over, 4096),
            Err(FrameError::TooLarge {
                size: 4105,
                max: 4104
            })
        );
        let huge = FrameHeader {
            frame_type: BODY,
            channel: 1,
            size: u32::MAX - 8,
        };
        assert_eq!(check_client_header(&huge, 0), Ok(()));
    }

    #[test]
    fn bad_type_and_bad_end() {
        assert_eq!(
            check(&[9, 0, 0, 0, 0, 0, 0, 0xCE], 4096),
            Err(FrameError::BadType(9))
        );
        let mut f = frame(HEARTBEAT, 0, &[]);
        *f.last_mut().unwrap() = 0;
        assert_eq!(check(&f, 4096), Err(FrameError::BadFrameEnd(0)));
    }
}
