//! A read-ahead buffer between a client's TCP socket and rustls.
//!
//! rustls asks its transport for at most 4 KiB at a time, so without this a 64 KiB
//! message arriving over TLS costs sixteen `read` system calls. [`ReadAhead`] reads up to
//! [`READ_AHEAD`] bytes per call and serves rustls's small reads from memory. The buffer is
//! allocated when the socket becomes readable and freed when it is drained and the socket
//! has nothing more, so an idle connection holds none. Writes pass straight through.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Bytes read from the socket per system call, at most.
pub const READ_AHEAD: usize = 64 * 1024;

/// A TCP stream whose reads go through a lazily allocated read-ahead buffer.
pub struct ReadAhead {
    io: TcpStream,
    buf: BytesMut,
}

impl ReadAhead {
    pub fn new(io: TcpStream) -> ReadAhead {
        ReadAhead {
            io,
            buf: BytesMut::new(),
        }
    }

    fn release_if_drained(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
    }

    /// Hands out buffered bytes; false when there are none.
    fn serve(&mut self, dst: &mut ReadBuf<'_>) -> bool {
        let n = self.buf.len().min(dst.remaining());
        if n == 0 {
            return false;
        }
        dst.put_slice(&self.buf[..n]);
        self.buf.advance(n);
        true
    }
}

impl AsyncRead for ReadAhead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if dst.remaining() == 0 || this.serve(dst) {
            return Poll::Ready(Ok(()));
        }
        // A caller with room for a whole read-ahead reads directly.
        if dst.remaining() >= READ_AHEAD {
            return Pin::new(&mut this.io).poll_read(cx, dst);
        }
        // Readiness first, so a socket with nothing to read costs no buffer.
        match this.io.poll_read_ready(cx) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {
                this.release_if_drained();
                return Poll::Pending;
            }
        }
        // Empty here: `reserve` reuses the whole allocation while data flows.
        this.buf.reserve(READ_AHEAD);
        // Through the stream's own `poll_read`, which notes a short read as "drained"
        // and so spares the next call a read that would only say EAGAIN.
        match tokio_util::io::poll_read_buf(Pin::new(&mut this.io), cx, &mut this.buf) {
            // End of stream: `dst` stays empty.
            Poll::Ready(Ok(0)) => Poll::Ready(Ok(())),
            Poll::Ready(Ok(_)) => {
                this.serve(dst);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                this.release_if_drained();
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for ReadAhead {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (ReadAhead, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) =
            tokio::join!(TcpStream::connect(addr), async { listener.accept().await });
        (ReadAhead::new(accepted.unwrap().0), client.unwrap())
    }

    #[tokio::test]
    async fn small_reads_are_served_from_one_read_ahead_and_the_buffer_is_freed_when_idle() {
        let (mut ra, mut peer) = pair().await;
        let data: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        peer.write_all(&data).await.unwrap();
        let mut got = Vec::new();
        let mut small = [0u8; 4096];
        while got.len() < data.len() {
            let n = ra.read(&mut small).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&small[..n]);
        }
        assert_eq!(got, data);
        // Drained, and the socket has nothing more: a pending read frees the buffer.
        let pending =
            tokio::time::timeout(std::time::Duration::from_millis(50), ra.read(&mut small)).await;
        assert!(pending.is_err(), "no data yet");
        assert_eq!(ra.buf.capacity(), 0, "an idle connection holds no buffer");

        // Writes pass through; EOF reads as 0.
        ra.write_all(b"pong").await.unwrap();
        let mut four = [0u8; 4];
        peer.read_exact(&mut four).await.unwrap();
        assert_eq!(&four, b"pong");
        drop(peer);
        assert_eq!(ra.read(&mut small).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_large_read_bypasses_the_buffer() {
        let (mut ra, mut peer) = pair().await;
        peer.write_all(&[7u8; 1000]).await.unwrap();
        let mut big = vec![0u8; READ_AHEAD];
        let n = ra.read(&mut big).await.unwrap();
        assert!(n > 0 && big[..n].iter().all(|&b| b == 7));
        assert_eq!(ra.buf.capacity(), 0);
    }
}
