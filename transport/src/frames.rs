//! The receive buffer that turns a byte stream into whole frames.
//!
//! Invariants: `start <= end <= buf.len()`; `buf[start..end]` holds bytes
//! received but not yet handed out; a frame handed out is consumed (start moves
//! past it) before its borrow is returned, so the next call may move or grow
//! the buffer freely. The buffer only grows to fit a frame whose header passed
//! the per-tag length check, so a peer cannot make it exceed
//! `HEADER_LEN + MAX_BODY_LEN`.

use proto::wire::{DecodeError, FrameHeader, HEADER_LEN};

/// Below this much free space the buffer compacts before reading, so reads
/// stay large.
const MIN_READ_SPACE: usize = 64 * 1024;

pub(crate) struct RecvBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl RecvBuf {
    pub(crate) fn new(capacity: usize) -> Self {
        RecvBuf { buf: vec![0; capacity.max(MIN_READ_SPACE)], start: 0, end: 0 }
    }

    /// Whether unconsumed bytes are pending.
    pub(crate) fn pending(&self) -> usize {
        self.end - self.start
    }

    /// If a whole frame is buffered, consume it and return its byte range.
    pub(crate) fn take_frame(&mut self) -> Result<Option<std::ops::Range<usize>>, DecodeError> {
        if self.pending() < HEADER_LEN {
            return Ok(None);
        }
        let h = FrameHeader::decode(&self.buf[self.start..self.end])?;
        let len = h.frame_len();
        if self.pending() < len {
            return Ok(None);
        }
        let r = self.start..self.start + len;
        self.start += len;
        Ok(Some(r))
    }

    /// Whether a whole frame is buffered (without consuming it).
    pub(crate) fn has_frame(&self) -> bool {
        if self.pending() < HEADER_LEN {
            return false;
        }
        match FrameHeader::decode(&self.buf[self.start..self.end]) {
            Ok(h) => self.pending() >= h.frame_len(),
            // A bad header is "something to report": let recv surface it.
            Err(_) => true,
        }
    }

    /// The frame bytes of a range returned by `take_frame`.
    pub(crate) fn bytes(&self, r: std::ops::Range<usize>) -> &[u8] {
        &self.buf[r]
    }

    /// Free space to read into, made large enough for the frame being
    /// assembled (its header was validated by `take_frame` returning `None`).
    pub(crate) fn space(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        let need = if self.pending() >= HEADER_LEN {
            // Validated already by take_frame; a bad header never gets here.
            FrameHeader::decode(&self.buf[self.start..self.end]).map_or(HEADER_LEN, |h| h.frame_len())
        } else {
            HEADER_LEN
        };
        let free = self.buf.len() - self.end;
        if free < MIN_READ_SPACE.min(need) || self.start + need > self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if need > self.buf.len() {
            self.buf.resize(need, 0);
        }
        &mut self.buf[self.end..]
    }

    /// The unconsumed bytes.
    pub(crate) fn peek(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Drop `n` unconsumed bytes from the front.
    pub(crate) fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.pending());
        self.start += n;
    }

    /// Record `n` bytes read into `space()`.
    pub(crate) fn commit(&mut self, n: usize) {
        debug_assert!(self.end + n <= self.buf.len());
        self.end += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::wire::Msg;

    #[test]
    fn reassembles_frames_split_anywhere() {
        let mut stream = Vec::new();
        let data = vec![3u8; 4096 * 40];
        for i in 0..50u64 {
            Msg::Complete { n_present: i }.encode(&mut stream);
            Msg::GuestState(&data[..usize::try_from(i).unwrap() * 3000]).encode(&mut stream);
        }
        for chunk in [1usize, 7, 4096, 100_000] {
            let mut rb = RecvBuf::new(1);
            let mut got = 0;
            let mut at = 0;
            while at < stream.len() || rb.pending() > 0 {
                while let Some(r) = rb.take_frame().unwrap() {
                    let (m, _) = proto::wire::decode_frame(rb.bytes(r), None).unwrap().unwrap();
                    if let Msg::Complete { n_present } = m {
                        assert_eq!(n_present, got / 2);
                    }
                    got += 1;
                }
                if at == stream.len() {
                    break;
                }
                let space = rb.space();
                let n = space.len().min(chunk).min(stream.len() - at);
                space[..n].copy_from_slice(&stream[at..at + n]);
                rb.commit(n);
                at += n;
            }
            assert_eq!(got, 100, "chunk {chunk}");
            assert_eq!(rb.pending(), 0);
        }
    }

    #[test]
    fn bad_header_is_reported_not_buffered() {
        let mut rb = RecvBuf::new(1);
        let space = rb.space();
        space[..8].copy_from_slice(&[11, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        rb.commit(8);
        assert!(rb.has_frame());
        assert!(matches!(rb.take_frame(), Err(DecodeError::TooLarge { .. })));
    }
}
