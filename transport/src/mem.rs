//! An in-memory connection pair for tests: frames travel through queues and
//! the link can delay, drop, reorder and disconnect them deterministically
//! (counters, not randomness, so a failing test fails the same way again).
//!
//! Readiness is an eventfd per direction, written whenever a frame becomes
//! deliverable, so a test can `poll` a `MemConn` together with a userfaultfd
//! exactly as the pager polls a TCP socket.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::eventfd::{EfdFlags, EventFd};
use parking_lot::{Condvar, Mutex};
use proto::wire::{self, FrameHeader, HEADER_LEN, Msg, PageKind, Tag};
use proto::{PageIdx, PageSize};

use crate::conn::{Conn, IoSpan, IoSpanMut, PagePlacer, Placed, TransportError, Wait, poll_fd};

/// Faults injected on one direction of the link. Control frames are never
/// dropped or reordered (a TCP connection cannot do that either); Pages
/// frames can be, since the protocol recovers from it.
#[derive(Clone, Debug, Default)]
pub struct MemLink {
    /// Each frame becomes deliverable this long after it was sent.
    pub delay: Duration,
    /// Pages frames are delayed this much more (so other frames overtake them).
    pub pages_delay: Duration,
    /// Drop every k-th Pages frame (k >= 1).
    pub drop_pages_every: Option<u64>,
    /// Hold back every k-th Pages frame and deliver it after the next Pages
    /// frame (a held frame that none follows is never delivered, like a drop).
    pub reorder_every: Option<u64>,
    /// Close the whole pair after this many frames were sent this way.
    pub disconnect_after: Option<u64>,
    /// Swallow every frame sent this way after this many, without closing:
    /// a link gone silent, which only liveness checks notice.
    pub blackhole_after: Option<u64>,
}

struct PipeState {
    /// Deliverable frames.
    ready: VecDeque<Vec<u8>>,
    /// Frames in flight by delivery time (then send order).
    delayed: BTreeMap<(Instant, u64), Vec<u8>>,
    /// A frame held back to be delivered after the next one.
    held: Option<Vec<u8>>,
    frames: u64,
    pages_frames: u64,
    /// Tie-break for frames due at the same instant: send order.
    seq: u64,
}

struct Pipe {
    st: Mutex<PipeState>,
    cv: Condvar,
    event: EventFd,
    link: MemLink,
    /// The sending end was dropped: deliver what is in flight, then EOF.
    writer_gone: AtomicBool,
    /// The receiving end was dropped: sends fail.
    reader_gone: AtomicBool,
}

struct Shared {
    pipes: [Pipe; 2],
    closed: AtomicBool,
}

impl Shared {
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        for p in &self.pipes {
            // Wake the receiver (poll) and the delay thread.
            let _ = p.event.write(1);
            let _lock = p.st.lock();
            p.cv.notify_all();
        }
    }
}

/// One end of an in-memory pair.
pub struct MemConn {
    shared: Arc<Shared>,
    /// Index of the pipe this end sends on; it receives on the other.
    tx: usize,
    cur: Vec<u8>,
    page_size: Option<PageSize>,
    sent: u64,
    received: u64,
    name: String,
}

impl std::fmt::Debug for MemConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemConn").field("name", &self.name).finish_non_exhaustive()
    }
}

/// A connected pair: frames sent on `.0` arrive at `.1` through `a_to_b`, and
/// the reverse through `b_to_a`.
pub fn pair(a_to_b: MemLink, b_to_a: MemLink) -> (MemConn, MemConn) {
    let pipe = |link: MemLink| Pipe {
        st: Mutex::new(PipeState {
            ready: VecDeque::new(),
            delayed: BTreeMap::new(),
            held: None,
            frames: 0,
            pages_frames: 0,
            seq: 0,
        }),
        cv: Condvar::new(),
        event: EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC).expect("eventfd"),
        link,
        writer_gone: AtomicBool::new(false),
        reader_gone: AtomicBool::new(false),
    };
    let shared = Arc::new(Shared { pipes: [pipe(a_to_b), pipe(b_to_a)], closed: AtomicBool::new(false) });
    for i in 0..2 {
        let l = &shared.pipes[i].link;
        if l.delay > Duration::ZERO || l.pages_delay > Duration::ZERO {
            let s = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("memlink-{i}"))
                .spawn(move || deliver_delayed(&s, i))
                .expect("spawn");
        }
    }
    let end = |tx: usize, name: &str| MemConn {
        shared: Arc::clone(&shared),
        tx,
        cur: Vec::new(),
        page_size: None,
        sent: 0,
        received: 0,
        name: name.to_string(),
    };
    (end(0, "mem-a"), end(1, "mem-b"))
}

/// The delay thread of pipe `i`: moves frames to `ready` when their time comes.
fn deliver_delayed(s: &Shared, i: usize) {
    let p = &s.pipes[i];
    let mut st = p.st.lock();
    loop {
        if s.closed.load(Ordering::Acquire) || (p.writer_gone.load(Ordering::Acquire) && st.delayed.is_empty()) {
            return;
        }
        let now = Instant::now();
        let mut moved = false;
        while st.delayed.first_key_value().is_some_and(|((t, _), _)| *t <= now) {
            let (_, f) = st.delayed.pop_first().expect("first exists");
            st.ready.push_back(f);
            moved = true;
        }
        if moved {
            let _ = p.event.write(1);
        }
        match st.delayed.first_key_value() {
            Some(((t, _), _)) => {
                let t = *t;
                p.cv.wait_until(&mut st, t);
            }
            None => p.cv.wait(&mut st),
        }
    }
}

impl MemConn {
    /// Close the pair from this end (both ends see `Closed`).
    pub fn disconnect(&self) {
        self.shared.close();
    }

    fn closed_err(&self) -> TransportError {
        TransportError::Closed { peer: self.name.clone(), mid_frame: false }
    }

    fn push_frame(&mut self, frame: Vec<u8>) -> Result<(), TransportError> {
        if self.shared.closed.load(Ordering::Acquire) || self.shared.pipes[self.tx].reader_gone.load(Ordering::Acquire)
        {
            return Err(self.closed_err());
        }
        self.sent += frame.len() as u64;
        let p = &self.shared.pipes[self.tx];
        let is_pages = frame[0] == Tag::Pages as u8;
        let mut st = p.st.lock();
        st.frames += 1;
        let n = st.frames;
        if p.link.disconnect_after.is_some_and(|k| n > k) {
            drop(st);
            self.shared.close();
            return Err(self.closed_err());
        }
        if p.link.blackhole_after.is_some_and(|k| n > k) {
            return Ok(());
        }
        if is_pages {
            st.pages_frames += 1;
            if p.link.drop_pages_every.is_some_and(|k| st.pages_frames.is_multiple_of(k.max(1))) {
                return Ok(());
            }
        }
        let mut out = Vec::with_capacity(2);
        let k = st.pages_frames;
        if is_pages && p.link.reorder_every.is_some_and(|e| k.is_multiple_of(e.max(1))) && st.held.is_none() {
            st.held = Some(frame);
        } else {
            out.push(frame);
            if is_pages && let Some(h) = st.held.take() {
                out.push(h);
            }
        }
        let delay = p.link.delay + if is_pages { p.link.pages_delay } else { Duration::ZERO };
        if delay > Duration::ZERO {
            let at = Instant::now() + delay;
            for f in out {
                st.seq += 1;
                let seq = st.seq;
                st.delayed.insert((at, seq), f);
            }
            p.cv.notify_all();
        } else if !out.is_empty() {
            st.ready.extend(out);
            let _ = p.event.write(1);
        }
        Ok(())
    }
}

impl Conn for MemConn {
    fn send(&mut self, msg: &Msg<'_>) -> Result<(), TransportError> {
        self.push_frame(msg.to_frame())
    }

    fn send_pages(
        &mut self,
        first: PageIdx,
        n_pages: u32,
        kind: PageKind,
        data: &[IoSpan<'_>],
    ) -> Result<(), TransportError> {
        let ps = self.page_size.expect("page size set before pages are sent");
        let prefix = wire::pages_prefix(first, n_pages, kind, ps);
        let total: usize = data.iter().map(IoSpan::len).sum();
        let mut f = Vec::with_capacity(prefix.len() + total);
        f.extend_from_slice(&prefix);
        for s in data {
            let at = f.len();
            f.resize(at + s.len(), 0);
            // SAFETY: the span's constructor guarantees `len` readable bytes at
            // `ptr` for its lifetime; the destination was just sized for them
            // and cannot overlap guest memory.
            #[allow(unsafe_code)]
            unsafe {
                std::ptr::copy_nonoverlapping(s.ptr(), f[at..].as_mut_ptr(), s.len());
            }
        }
        self.push_frame(f)
    }

    fn recv(&mut self, wait: Wait) -> Result<Option<Msg<'_>>, TransportError> {
        let rx = 1 - self.tx;
        loop {
            // Drain the eventfd before looking, so a frame pushed after the
            // look re-arms it (no lost wake-up).
            let _ = self.shared.pipes[rx].event.read();
            let next = self.shared.pipes[rx].st.lock().ready.pop_front();
            if let Some(f) = next {
                self.received += f.len() as u64;
                self.cur = f;
                // More frames may be queued: keep the eventfd readable.
                if !self.shared.pipes[rx].st.lock().ready.is_empty() {
                    let _ = self.shared.pipes[rx].event.write(1);
                }
                break;
            }
            if self.shared.closed.load(Ordering::Acquire) {
                return Err(self.closed_err());
            }
            let rxp = &self.shared.pipes[rx];
            if rxp.writer_gone.load(Ordering::Acquire) {
                let st = rxp.st.lock();
                if st.ready.is_empty() && st.delayed.is_empty() {
                    return Err(self.closed_err());
                }
            }
            match wait {
                Wait::No => return Ok(None),
                Wait::Until(deadline) => {
                    let ready = poll_fd(self.shared.pipes[rx].event.as_fd(), false, deadline)
                        .map_err(|source| TransportError::Io { op: "poll", peer: self.name.clone(), source })?;
                    if !ready {
                        return Ok(None);
                    }
                }
            }
        }
        let peer = self.name.clone();
        let h =
            FrameHeader::decode(&self.cur).map_err(|source| TransportError::Decode { peer: peer.clone(), source })?;
        wire::decode(h, &self.cur[HEADER_LEN..], self.page_size)
            .map(Some)
            .map_err(|source| TransportError::Decode { peer, source })
    }

    fn recv_placed(&mut self, wait: Wait, placer: &mut dyn PagePlacer) -> Result<Option<Placed<'_>>, TransportError> {
        let peer = self.name.clone();
        let Some(msg) = self.recv(wait)? else { return Ok(None) };
        let Msg::Pages { first, n_pages, kind, data } = msg else { return Ok(Some(Placed::Msg(msg))) };
        let ps = data.len() / n_pages as usize;
        let step = placer.max_pages().max(1);
        let mut done = 0;
        while done < n_pages {
            let n = step.min(n_pages - done);
            let at = PageIdx(first.0 + u64::from(done));
            let chunk = &data[done as usize * ps..(done + n) as usize * ps];
            let mut spans: Vec<IoSpanMut<'_>> = Vec::with_capacity(8);
            placer
                .place(at, n, kind, &mut spans)
                .map_err(|source| TransportError::Refused { peer: peer.clone(), source })?;
            let given: usize = spans.iter().map(IoSpanMut::len).sum();
            if given != chunk.len() {
                drop(spans);
                let _ = placer.placed(at, n, kind, false);
                let source = crate::PlaceError::failed(format!("placer gave {given} bytes for {}", chunk.len()));
                return Err(TransportError::Refused { peer, source });
            }
            let mut off = 0;
            for s in &spans {
                // SAFETY: the span is writable for its length by the placer's
                // contract; the source lies in this connection's frame buffer.
                #[allow(unsafe_code)]
                unsafe {
                    std::ptr::copy_nonoverlapping(chunk[off..].as_ptr(), s.ptr(), s.len());
                }
                off += s.len();
            }
            drop(spans);
            placer
                .placed(at, n, kind, true)
                .map_err(|source| TransportError::Refused { peer: peer.clone(), source })?;
            done += n;
        }
        Ok(Some(Placed::Pages { first, n_pages, kind }))
    }

    fn set_page_size(&mut self, ps: PageSize) {
        self.page_size = Some(ps);
    }

    fn readiness(&self) -> BorrowedFd<'_> {
        self.shared.pipes[1 - self.tx].event.as_fd()
    }

    fn has_buffered(&self) -> bool {
        false
    }

    fn bytes_sent(&self) -> u64 {
        self.sent
    }

    fn bytes_received(&self) -> u64 {
        self.received
    }

    fn peer(&self) -> &str {
        &self.name
    }
}

impl Drop for MemConn {
    /// Like closing a socket: what was sent still arrives, then the peer
    /// reads EOF; the peer's further sends fail.
    fn drop(&mut self) {
        let tx = &self.shared.pipes[self.tx];
        tx.writer_gone.store(true, Ordering::Release);
        let _ = tx.event.write(1);
        {
            let _lock = tx.st.lock();
            tx.cv.notify_all();
        }
        self.shared.pipes[1 - self.tx].reader_gone.store(true, Ordering::Release);
    }
}

/// A listener handing out connections queued with [`MemListener::push`]
/// (the far ends of in-memory pairs), for tests of reconnection.
#[derive(Default)]
pub struct MemListener {
    queue: Mutex<VecDeque<Box<dyn Conn>>>,
}

impl MemListener {
    /// Queue a connection for the next `accept`.
    pub fn push(&self, c: Box<dyn Conn>) {
        self.queue.lock().push_back(c);
    }
}

impl crate::Listener for MemListener {
    fn accept(&self, deadline: Instant) -> Result<Box<dyn Conn>, TransportError> {
        let started = Instant::now();
        loop {
            if let Some(c) = self.queue.lock().pop_front() {
                return Ok(c);
            }
            if Instant::now() >= deadline {
                return Err(TransportError::Timeout {
                    what: "waiting for an in-memory connection".into(),
                    after: deadline.saturating_duration_since(started),
                });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn readiness(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_in_memory_pair_passes_the_conformance_suite() {
        crate::conformance::run_all(&mut || {
            let (a, b) = pair(MemLink::default(), MemLink::default());
            (Box::new(a) as Box<dyn Conn>, Box::new(b) as Box<dyn Conn>)
        });
    }

    use super::*;

    fn complete(n: u64) -> Msg<'static> {
        Msg::Complete { n_present: n }
    }

    fn recv_n(c: &mut MemConn) -> Option<u64> {
        match c.recv(Wait::for_(Duration::from_secs(2))).unwrap() {
            Some(Msg::Complete { n_present }) => Some(n_present),
            None => None,
            Some(m) => panic!("unexpected {:?}", m.tag()),
        }
    }

    #[test]
    fn in_order_delivery_and_readiness() {
        let (mut a, mut b) = pair(MemLink::default(), MemLink::default());
        assert_eq!(b.recv(Wait::No).unwrap(), None);
        for i in 0..5 {
            a.send(&complete(i)).unwrap();
        }
        assert!(poll_fd(b.readiness(), false, Instant::now() + Duration::from_secs(1)).unwrap());
        for i in 0..5 {
            assert_eq!(recv_n(&mut b), Some(i));
        }
        assert_eq!(b.recv(Wait::No).unwrap(), None);
    }

    #[test]
    fn pages_delay_lets_control_frames_overtake() {
        let link = MemLink { pages_delay: Duration::from_millis(50), ..Default::default() };
        let (mut a, mut b) = pair(link, MemLink::default());
        a.set_page_size(PageSize::Size4K);
        b.set_page_size(PageSize::Size4K);
        let page = vec![0u8; 4096];
        a.send_pages(PageIdx(0), 1, PageKind::Push, &[IoSpan::from_slice(&page)]).unwrap();
        a.send(&complete(7)).unwrap();
        assert_eq!(recv_n(&mut b), Some(7));
        assert!(matches!(b.recv(Wait::for_(Duration::from_secs(2))).unwrap(), Some(Msg::Pages { .. })));
    }

    #[test]
    fn delay_is_applied() {
        let link = MemLink { delay: Duration::from_millis(30), ..Default::default() };
        let (mut a, mut b) = pair(link, MemLink::default());
        let t0 = Instant::now();
        a.send(&complete(1)).unwrap();
        assert_eq!(b.recv(Wait::No).unwrap(), None);
        assert_eq!(recv_n(&mut b), Some(1));
        assert!(t0.elapsed() >= Duration::from_millis(30));
    }

    #[test]
    fn reorder_drop_and_disconnect() {
        let link = MemLink { reorder_every: Some(2), ..Default::default() };
        let (mut a, mut b) = pair(link, MemLink::default());
        a.set_page_size(PageSize::Size4K);
        b.set_page_size(PageSize::Size4K);
        let page = vec![0u8; 4096];
        for i in 1..=5 {
            a.send_pages(PageIdx(i), 1, PageKind::Push, &[IoSpan::from_slice(&page)]).unwrap();
            // Control frames are never reordered.
            a.send(&complete(i)).unwrap();
        }
        let mut pages = vec![];
        let mut ctl = vec![];
        for _ in 0..10 {
            match b.recv(Wait::for_(Duration::from_secs(1))).unwrap() {
                Some(Msg::Pages { first, .. }) => pages.push(first.0),
                Some(Msg::Complete { n_present }) => ctl.push(n_present),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(pages, vec![1, 3, 2, 5, 4]);
        assert_eq!(ctl, vec![1, 2, 3, 4, 5]);

        let link = MemLink { drop_pages_every: Some(2), ..Default::default() };
        let (mut a, mut b) = pair(link, MemLink::default());
        a.set_page_size(PageSize::Size4K);
        b.set_page_size(PageSize::Size4K);
        let page = vec![0u8; 4096];
        for i in 0..4 {
            a.send_pages(PageIdx(i), 1, PageKind::Push, &[IoSpan::from_slice(&page)]).unwrap();
        }
        let mut firsts = vec![];
        while let Some(Msg::Pages { first, .. }) = b.recv(Wait::for_(Duration::from_millis(50))).unwrap() {
            firsts.push(first.0);
        }
        assert_eq!(firsts, vec![0, 2]);

        let link = MemLink { disconnect_after: Some(2), ..Default::default() };
        let (mut a, mut b) = pair(link, MemLink::default());
        a.send(&complete(1)).unwrap();
        a.send(&complete(2)).unwrap();
        assert!(a.send(&complete(3)).is_err());
        assert!(matches!(b.recv(Wait::for_(Duration::from_secs(1))), Ok(Some(_)) | Err(TransportError::Closed { .. })));
        assert!(b.send(&complete(0)).is_err());
    }

    #[test]
    fn drop_delivers_in_flight_frames_then_eof() {
        let link = MemLink { delay: Duration::from_millis(20), ..Default::default() };
        let (mut a, mut b) = pair(link, MemLink::default());
        a.send(&complete(1)).unwrap();
        drop(a);
        assert_eq!(recv_n(&mut b), Some(1));
        assert!(matches!(b.recv(Wait::for_(Duration::from_secs(1))), Err(TransportError::Closed { .. })));
        assert!(b.send(&complete(2)).is_err(), "sending to a dropped end fails");
    }
}
