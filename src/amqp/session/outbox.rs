//! Frames queued for one socket.

use std::collections::VecDeque;

use bytes::{Buf, BytesMut};

/// Frames queued for one socket, written in order with vectored writes.
///
/// Chunks cut from the same read buffer that follow each other in memory are joined back
/// into one (`BytesMut::unsplit`, no copy): a read full of publishes, whose method frames
/// are cut out while their content header is awaited, is queued as one chunk again and
/// written with one system call.
///
/// A chunk keeps the read buffer it was cut from alive, however few bytes it holds. So
/// besides its length the outbox keeps a [`Outbox::weight`]: every chunk counts at least
/// [`CHUNK_WEIGHT`] bytes. The relay stops reading a side while the weight queued for its
/// peer is high, which bounds the read buffers a stalled peer can keep alive however the
/// input is cut (bytes that are dropped take room in read buffers but none in the outbox).
#[derive(Default)]
pub struct Outbox {
    chunks: VecDeque<BytesMut>,
    len: usize,
    weight: usize,
    scratch: BytesMut,
}

/// The least a queued chunk counts for in [`Outbox::weight`].
pub const CHUNK_WEIGHT: usize = 16 * 1024;

fn weight(len: usize) -> usize {
    len.max(CHUNK_WEIGHT)
}

impl Outbox {
    pub fn push(&mut self, b: BytesMut) {
        if b.is_empty() {
            return;
        }
        self.len += b.len();
        if let Some(last) = self.chunks.back_mut()
            && last.as_ptr_range().end == b.as_ptr()
        {
            // O(1) when both come from the same allocation (the only way they can be
            // adjacent but for chance, where `unsplit` copies: still correct).
            self.weight -= weight(last.len());
            last.unsplit(b);
            self.weight += weight(last.len());
        } else {
            self.weight += weight(b.len());
            self.chunks.push_back(b);
        }
    }

    /// The queued bytes, with every chunk counted as at least [`CHUNK_WEIGHT`].
    pub fn weight(&self) -> usize {
        self.weight
    }

    /// Moves everything queued in `other` to the end of this outbox.
    pub fn append(&mut self, other: &mut Outbox) {
        while let Some(c) = other.chunks.pop_front() {
            self.push(c);
        }
        other.len = 0;
        other.weight = 0;
    }

    /// Appends a frame built by `f` (for frames the gateway writes itself).
    pub fn frame(&mut self, f: impl FnOnce(&mut BytesMut)) {
        f(&mut self.scratch);
        let b = self.scratch.split();
        self.push(b);
    }

    /// How many chunks are queued.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The queued chunks, oldest first.
    pub fn chunks(&self) -> impl Iterator<Item = &BytesMut> {
        self.chunks.iter()
    }

    /// Drops `n` written bytes from the front.
    pub fn consume(&mut self, mut n: usize) {
        self.len -= n;
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                return;
            };
            self.weight -= weight(front.len());
            if front.len() <= n {
                n -= front.len();
                self.chunks.pop_front();
            } else {
                front.advance(n);
                self.weight += weight(front.len());
                n = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_scattered_chunks_weigh_more_than_their_bytes() {
        let mut o = Outbox::default();
        let mut a = BytesMut::from(&[1u8; 100][..]);
        let b = a.split_off(50);
        o.push(a);
        o.push(b); // adjacent: joined
        assert_eq!(
            (o.len(), o.chunk_count(), o.weight()),
            (100, 1, CHUNK_WEIGHT)
        );
        o.push(BytesMut::from(&[2u8; 10][..]));
        assert_eq!((o.len(), o.weight()), (110, 2 * CHUNK_WEIGHT));
        o.push(BytesMut::from(&[3u8; 40_000][..]));
        assert_eq!(o.weight(), 2 * CHUNK_WEIGHT + 40_000);
        o.consume(105);
        assert_eq!((o.len(), o.weight()), (40_005, CHUNK_WEIGHT + 40_000));
        o.consume(20_000);
        assert_eq!(o.weight(), 20_005);
        o.consume(20_005);
        assert_eq!((o.len(), o.weight(), o.chunk_count()), (0, 0, 0));
    }
}
