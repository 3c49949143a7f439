//! The conformance suite every [`Conn`] implementation runs, in the style of
//! rust-vmm's generic trait tests: one function per property, each taking a
//! factory of connected pairs, so TCP, the in-memory pair and (later) RDMA
//! are interchangeable by test rather than by hope.
//!
//! The functions panic on a violation (they are test code, compiled always
//! so that an implementation in another crate can run them too).

use std::time::{Duration, Instant};

use proto::wire::{ErrorCode, Msg, PageKind, ResumeState, encode_ranges, encode_words, range_list, word_list};
use proto::{PageIdx, PageRange, PageSize};

use crate::conn::poll_fd;
use crate::{Conn, IoSpan, IoSpanMut, PagePlacer, PlaceError, Placed, TransportError, Wait};

/// Makes a fresh connected pair (a, b), page size not yet set.
pub type PairFactory<'a> = dyn FnMut() -> (Box<dyn Conn>, Box<dyn Conn>) + 'a;

const LONG: Duration = Duration::from_secs(5);

/// Run every property against pairs from `make`.
pub fn run_all(make: &mut PairFactory<'_>) {
    every_message_crosses_both_ways(make);
    pages_are_gathered_and_placed(make);
    placer_refusal_is_an_error(make);
    waits_keep_their_deadlines(make);
    readiness_says_when_to_receive(make);
    close_is_seen_at_every_frame_boundary(make);
    counters_agree(make);
}

fn recv_one(c: &mut dyn Conn) -> Vec<u8> {
    match c.recv(Wait::for_(LONG)) {
        Ok(Some(m)) => m.to_frame(),
        Ok(None) => panic!("nothing arrived within {LONG:?}"),
        Err(e) => panic!("receive failed: {e}"),
    }
}

fn samples() -> Vec<Vec<u8>> {
    let mut rb = Vec::new();
    encode_ranges(&[PageRange::new(PageIdx(5), 3), PageRange::new(PageIdx(9), 1)], &mut rb);
    let mut wb = Vec::new();
    encode_words(&[1, u64::MAX, 0, 7], &mut wb);
    let data = vec![0xab; 2 * 4096];
    let state = vec![3u8; 100_000];
    [
        Msg::KeepAlive,
        Msg::HelloAck { session: 77, features: 1 },
        Msg::Error { code: ErrorCode::Aborted, message: "bye" },
        Msg::GuestState(&state),
        Msg::Outstanding { first_word: 0, words: word_list(&wb) },
        Msg::RangeRequest { req_id: 3, ranges: range_list(&rb) },
        Msg::Pages { first: PageIdx(4), n_pages: 2, kind: PageKind::Demand, data: &data },
        Msg::Have { first_word: 1, words: word_list(&wb) },
        Msg::ResumeAck { state: ResumeState::Running, n_have: 3 },
        Msg::Complete { n_present: 10 },
    ]
    .iter()
    .map(Msg::to_frame)
    .collect()
}

fn decode(f: &[u8]) -> Msg<'_> {
    proto::wire::decode_frame(f, Some(PageSize::Size4K)).expect("valid").expect("whole").0
}

/// Every kind of frame, small and large, arrives whole and in order, both ways.
pub fn every_message_crosses_both_ways(make: &mut PairFactory<'_>) {
    let (mut a, mut b) = make();
    a.set_page_size(PageSize::Size4K);
    b.set_page_size(PageSize::Size4K);
    let frames = samples();
    let cross = |tx: &mut dyn Conn, rx: &mut dyn Conn| {
        for f in &frames {
            tx.send(&decode(f)).expect("send");
        }
        for f in &frames {
            assert_eq!(&recv_one(rx), f, "a frame changed on the way");
        }
    };
    cross(&mut *a, &mut *b);
    cross(&mut *b, &mut *a);
}

struct Collect {
    pages: Vec<(u64, Vec<u8>)>,
    chunk: Vec<u8>,
    refuse: bool,
}

impl PagePlacer for Collect {
    fn max_pages(&self) -> u32 {
        3
    }

    fn place<'a>(
        &'a mut self,
        first: PageIdx,
        n_pages: u32,
        _kind: PageKind,
        spans: &mut Vec<IoSpanMut<'a>>,
    ) -> Result<(), PlaceError> {
        if self.refuse {
            return Err(PlaceError::refused(format!("refused {first:?}")));
        }
        self.chunk = vec![0; n_pages as usize * 4096];
        // Two spans per run: the placer may scatter.
        let (x, y) = self.chunk.split_at_mut(4096);
        spans.push(IoSpanMut::from_slice(x));
        spans.push(IoSpanMut::from_slice(y));
        Ok(())
    }

    fn placed(&mut self, first: PageIdx, _n: u32, _kind: PageKind, ok: bool) -> Result<(), PlaceError> {
        if ok {
            self.pages.push((first.0, std::mem::take(&mut self.chunk)));
        }
        Ok(())
    }
}

fn pattern(first: u64, n: u64) -> Vec<u8> {
    (0..n * 4096).map(|i| u8::try_from((first * 4096 + i) % 251).expect("< 251")).collect()
}

/// Page data gathered from several spans arrives intact, unplaced as a
/// message and placed in runs of the placer's size.
pub fn pages_are_gathered_and_placed(make: &mut PairFactory<'_>) {
    let (mut a, mut b) = make();
    a.set_page_size(PageSize::Size4K);
    b.set_page_size(PageSize::Size4K);
    let data = pattern(10, 7);
    let spans =
        [IoSpan::from_slice(&data[..5000]), IoSpan::from_slice(&data[5000..9000]), IoSpan::from_slice(&data[9000..])];
    a.send_pages(PageIdx(10), 7, PageKind::Push, &spans).expect("send pages");
    a.send(&Msg::KeepAlive).expect("send");
    a.send_pages(PageIdx(10), 7, PageKind::Push, &spans).expect("send pages");
    match b.recv(Wait::for_(LONG)).expect("recv") {
        Some(Msg::Pages { first, n_pages: 7, kind: PageKind::Push, data: got }) => {
            assert_eq!(first, PageIdx(10));
            assert_eq!(got, &data[..], "gathered pages changed");
        }
        other => panic!("expected the pages, got {:?}", other.map(|m| m.tag())),
    }
    let mut placer = Collect { pages: Vec::new(), chunk: Vec::new(), refuse: false };
    let mut got = Vec::new();
    let t0 = Instant::now();
    while got.len() < 2 {
        assert!(t0.elapsed() < LONG, "placed frames did not arrive");
        match b.recv_placed(Wait::for_(LONG), &mut placer).expect("recv placed") {
            Some(Placed::Msg(m)) => got.push(m.tag() as u8),
            Some(Placed::Pages { first, n_pages, .. }) => {
                assert_eq!((first, n_pages), (PageIdx(10), 7));
                got.push(0);
            }
            None => {}
        }
    }
    assert_eq!(got, vec![proto::wire::Tag::KeepAlive as u8, 0]);
    let runs: Vec<u64> = placer.pages.iter().map(|(f, _)| *f).collect();
    assert_eq!(runs, vec![10, 13, 16], "placed in runs of max_pages");
    let joined: Vec<u8> = placer.pages.into_iter().flat_map(|(_, d)| d).collect();
    assert_eq!(joined, data, "placed pages changed");
}

/// A placer that refuses a frame makes the receive fail, not pass the data.
pub fn placer_refusal_is_an_error(make: &mut PairFactory<'_>) {
    let (mut a, mut b) = make();
    a.set_page_size(PageSize::Size4K);
    b.set_page_size(PageSize::Size4K);
    let data = pattern(0, 1);
    a.send_pages(PageIdx(0), 1, PageKind::Push, &[IoSpan::from_slice(&data)]).expect("send");
    let mut placer = Collect { pages: Vec::new(), chunk: Vec::new(), refuse: true };
    let t0 = Instant::now();
    loop {
        match b.recv_placed(Wait::for_(LONG), &mut placer) {
            Err(TransportError::Refused { .. }) => break,
            Ok(None) if t0.elapsed() < LONG => {}
            other => panic!("expected a refusal, got {:?}", other.map(|p| p.is_some())),
        }
    }
    assert!(placer.pages.is_empty());
}

/// `Wait::No` returns at once, a deadline is kept (not much early, not late).
pub fn waits_keep_their_deadlines(make: &mut PairFactory<'_>) {
    let (_a, mut b) = make();
    let t0 = Instant::now();
    assert!(b.recv(Wait::No).expect("recv").is_none());
    assert!(t0.elapsed() < Duration::from_millis(200), "Wait::No waited");
    let t0 = Instant::now();
    assert!(b.recv(Wait::for_(Duration::from_millis(60))).expect("recv").is_none());
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(55) && took < Duration::from_secs(2), "waited {took:?} for 60 ms");
}

/// The readiness descriptor polls readable once something can be received
/// (or the connection says it has a whole frame buffered).
pub fn readiness_says_when_to_receive(make: &mut PairFactory<'_>) {
    let (mut a, mut b) = make();
    a.send(&Msg::KeepAlive).expect("send");
    a.send(&Msg::Complete { n_present: 1 }).expect("send");
    assert!(b.has_buffered() || poll_fd(b.readiness(), false, Instant::now() + LONG).expect("poll"));
    assert_eq!(b.recv(Wait::for_(LONG)).expect("recv"), Some(Msg::KeepAlive));
    // The second frame: buffered already, or readable.
    assert!(b.has_buffered() || poll_fd(b.readiness(), false, Instant::now() + LONG).expect("poll"));
    assert_eq!(b.recv(Wait::for_(LONG)).expect("recv"), Some(Msg::Complete { n_present: 1 }));
}

/// A peer that goes away after k frames, for every k up to a few: exactly k
/// frames arrive, then `Closed`; sending to it fails, within a bound.
pub fn close_is_seen_at_every_frame_boundary(make: &mut PairFactory<'_>) {
    for k in 0..4u64 {
        let (mut a, mut b) = make();
        for i in 0..k {
            a.send(&Msg::Complete { n_present: i }).expect("send");
        }
        drop(a);
        for i in 0..k {
            assert_eq!(b.recv(Wait::for_(LONG)).expect("recv"), Some(Msg::Complete { n_present: i }));
        }
        let t0 = Instant::now();
        loop {
            match b.recv(Wait::for_(LONG)) {
                Err(TransportError::Closed { .. }) => break,
                Ok(None) if t0.elapsed() < LONG => {}
                other => panic!("after {k} frames: expected Closed, got {:?}", other.map(|m| m.map(|m| m.tag()))),
            }
        }
        let t0 = Instant::now();
        while b.send(&Msg::KeepAlive).is_ok() {
            assert!(t0.elapsed() < LONG, "sends to a closed peer keep succeeding");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// What one side counts as sent, the other counts as received.
pub fn counters_agree(make: &mut PairFactory<'_>) {
    let (mut a, mut b) = make();
    a.set_page_size(PageSize::Size4K);
    b.set_page_size(PageSize::Size4K);
    for f in samples() {
        a.send(&decode(&f)).expect("send");
        let _ = recv_one(&mut *b);
    }
    assert_eq!(a.bytes_sent(), b.bytes_received());
    let total: u64 = samples().iter().map(|f| f.len() as u64).sum();
    assert_eq!(a.bytes_sent(), total, "bytes_sent counts frames whole");
}
