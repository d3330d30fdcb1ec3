//! Reading a worker's output line by line with bounded memory, and none while it is quiet.
//!
//! A daemon holds thousands of idle workers; a buffered reader per pipe would keep its buffer
//! the whole time. [`LazyBufReader`] waits for readability first and takes a buffer only while
//! there are bytes in it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, ReadBuf};
use tokio::net::unix::pipe;

/// Bytes read from a pipe at a time (a pipe holds 64 KiB; protocol lines are mostly short).
const READ_CHUNK: usize = 8 * 1024;
/// A line buffer keeps at most this much capacity between lines.
const RETAINED_LINE_CAPACITY: usize = 16 * 1024;

/// A buffered reader over a pipe whose buffer exists only while it holds unread bytes.
pub(super) struct LazyBufReader {
    pipe: pipe::Receiver,
    buf: Vec<u8>,
    pos: usize,
}

impl LazyBufReader {
    pub(super) fn new(pipe: pipe::Receiver) -> LazyBufReader {
        LazyBufReader { pipe, buf: Vec::new(), pos: 0 }
    }
}

impl AsyncRead for LazyBufReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let available = ready!(Pin::new(&mut *this).poll_fill_buf(cx))?;
        let n = available.len().min(out.remaining());
        out.put_slice(&available[..n]);
        Pin::new(this).consume(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncBufRead for LazyBufReader {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        if this.pos >= this.buf.len() {
            loop {
                ready!(this.pipe.poll_read_ready(cx))?;
                this.buf.resize(READ_CHUNK, 0);
                match this.pipe.try_read(&mut this.buf) {
                    Ok(n) => {
                        this.buf.truncate(n);
                        this.pos = 0;
                        break;
                    }
                    // Readiness was stale: poll_read_ready clears it and waits again.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => this.release(),
                    Err(e) => {
                        this.release();
                        return Poll::Ready(Err(e));
                    }
                }
            }
        }
        Poll::Ready(Ok(&this.buf[this.pos..]))
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        let this = self.get_mut();
        this.pos = (this.pos + amt).min(this.buf.len());
        if this.pos >= this.buf.len() {
            this.release();
        }
    }
}

impl LazyBufReader {
    fn release(&mut self) {
        self.buf = Vec::new();
        self.pos = 0;
    }
}

/// Reads one line into `buf` without ever holding more than `max` bytes. Returns
/// Some(Ok(line)) without the newline, Some(Err(len)) for an over-long line (skipped up to
/// its newline), None at EOF. A last line without a newline is returned at EOF.
pub(super) async fn read_line<'a, R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &'a mut Vec<u8>,
    max: usize,
) -> io::Result<Option<Result<&'a [u8], usize>>> {
    buf.clear();
    // One long line must not pin its size for the worker's life.
    if buf.capacity() > RETAINED_LINE_CAPACITY {
        buf.shrink_to(RETAINED_LINE_CAPACITY);
    }
    let mut overflow = 0usize;
    loop {
        let chunk = reader.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(if overflow > 0 {
                Some(Err(overflow))
            } else if buf.is_empty() {
                None
            } else {
                Some(Ok(&buf[..]))
            });
        }
        let (used, done) = match memchr(chunk) {
            Some(i) => (i + 1, Some(i)),
            None => (chunk.len(), None),
        };
        let take = done.unwrap_or(used);
        if overflow == 0 && buf.len() + take <= max {
            buf.extend_from_slice(&chunk[..take]);
        } else {
            overflow = overflow.max(buf.len()) + take;
            buf.clear();
        }
        reader.consume(used);
        if done.is_some() {
            if overflow > 0 {
                return Ok(Some(Err(overflow)));
            }
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            return Ok(Some(Ok(&buf[..])));
        }
    }
}

fn memchr(haystack: &[u8]) -> Option<usize> {
    haystack.iter().position(|&b| b == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncWriteExt, BufReader};

    #[tokio::test]
    async fn read_line_bounds_memory_and_skips_long_lines() {
        let data = b"short\nthis line is far too long\nok\nlast".to_vec();
        let mut reader = BufReader::with_capacity(4, &data[..]);
        let mut buf = Vec::new();
        let mut got = Vec::new();
        while let Some(line) = read_line(&mut reader, &mut buf, 8).await.unwrap() {
            got.push(line.map(|l| String::from_utf8_lossy(l).into_owned()));
        }
        // The over-long line's length excludes its newline, like the lines returned.
        assert_eq!(got, vec![Ok("short".into()), Err(25), Ok("ok".into()), Ok("last".into())]);
        assert!(buf.capacity() < 64);
    }

    #[tokio::test]
    async fn read_line_handles_exact_fits_crlf_binary_and_a_long_last_line() {
        let data = b"12345678\n123456789\nab\r\n\xff\xfe\x00\n0123456789abc".to_vec();
        let mut reader = BufReader::with_capacity(3, &data[..]);
        let mut buf = Vec::new();
        let mut got: Vec<Result<Vec<u8>, usize>> = Vec::new();
        while let Some(line) = read_line(&mut reader, &mut buf, 8).await.unwrap() {
            got.push(line.map(<[u8]>::to_vec));
        }
        let want: Vec<Result<Vec<u8>, usize>> = vec![
            Ok(b"12345678".to_vec()),
            Err(9),
            Ok(b"ab".to_vec()),
            Ok(b"\xff\xfe\x00".to_vec()),
            Err(13),
        ];
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn the_lazy_reader_holds_no_buffer_between_lines() {
        let (tx, rx) = pipe::pipe().unwrap();
        let mut tx = tx;
        let mut reader = LazyBufReader::new(rx);
        let mut buf = Vec::new();
        tx.write_all(b"one\ntwo\nthr").await.unwrap();
        let line = read_line(&mut reader, &mut buf, 64).await.unwrap().unwrap().unwrap();
        assert_eq!(line, b"one");
        assert!(reader.buf.capacity() > 0, "holds the unread rest");
        let line = read_line(&mut reader, &mut buf, 64).await.unwrap().unwrap().unwrap();
        assert_eq!(line, b"two");
        // The partial line moves into the line buffer and the reader lets its buffer go.
        let next = tokio::spawn(async move {
            let line =
                read_line(&mut reader, &mut buf, 64).await.unwrap().unwrap().unwrap().to_vec();
            (line, reader.buf.capacity())
        });
        tokio::task::yield_now().await;
        tx.write_all(b"ee\n").await.unwrap();
        let (line, capacity) = next.await.unwrap();
        assert_eq!(line, b"three");
        assert_eq!(capacity, 0, "nothing unread, no buffer");
    }

    #[tokio::test]
    async fn a_long_line_does_not_pin_its_capacity() {
        let data = [vec![b'x'; 100_000], b"\nshort\n".to_vec()].concat();
        let mut reader = BufReader::with_capacity(4096, &data[..]);
        let mut buf = Vec::new();
        assert_eq!(
            read_line(&mut reader, &mut buf, 200_000).await.unwrap().unwrap().unwrap().len(),
            100_000
        );
        assert_eq!(
            read_line(&mut reader, &mut buf, 200_000).await.unwrap().unwrap().unwrap(),
            b"short"
        );
        assert!(buf.capacity() <= RETAINED_LINE_CAPACITY, "{}", buf.capacity());
    }
}
