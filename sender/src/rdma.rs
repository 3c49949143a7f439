//! The source's half of RDMA: guest memory registered once for remote
//! reads, two queue pairs (demand, background) the destination reads
//! through, and nothing else. After switchover the guest is paused and its
//! memory does not move, so the destination reads every page it needs
//! with one-sided READs: the source's CPU is not on the post-copy path at
//! all (its threads only keep the control connection alive).
//!
//! The exchange runs on the control connection right after the hello,
//! before the bulk connection opens: the offer (device, endpoints, where
//! each page is and its remote key), sealed with the session key like the
//! hello; the destination's answer (its endpoints); then both connect.
#![allow(unsafe_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use proto::PageBitmap;
use proto::session::{SessionError, SourceEvent, SourceSession};
use proto::wire::Msg;
use rdma::queue::{SendQueue, WaitEnd};
use rdma::setup::{Answer, HEADER_BYTES, Offer, RemoteRegion, Ring};
use rdma::{Access, Device, MemoryRegion, Op, QpCaps, QueuePair, RecvWr, Remote, Sge, WcStatus};
use transport::{Conn, Wait};

use crate::error::SenderError;
use crate::map::SourceMap;
use crate::metrics::SenderMetrics;

/// The source's registered memory and queue pairs, kept until completion.
pub struct SourceRdma {
    // The writer and the queue pairs first: gone before the regions they touch.
    running: Option<WriterHandle>,
    writer: Option<Writer>,
    _qps: Vec<Box<dyn QueuePair>>,
    _mrs: Vec<Box<dyn MemoryRegion>>,
    _dev: Arc<dyn Device>,
    /// Registering guest memory took this long.
    pub registration: Duration,
    /// The device used.
    pub device: String,
}

/// Queue pairs the destination reads through: demand, background.
pub const N_QPS: usize = 2;

fn rdma_err(what: &str, e: impl std::fmt::Display) -> SenderError {
    SenderError::Session(SessionError::Mismatch(format!("RDMA {what}: {e}")))
}

/// Register guest memory, offer it, and connect the queue pairs.
pub(crate) fn set_up(
    control: &mut dyn Conn,
    session: &mut SourceSession,
    map: &SourceMap,
    cfg: &rdma::Config,
    key: Option<&[u8]>,
    session_id: u64,
    timeout: Duration,
) -> Result<SourceRdma, SenderError> {
    let bind = control.local_ip().unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    let dev = cfg.open(bind).map_err(|e| rdma_err("device", e))?;
    let layout = map.layout();
    let t = Instant::now();
    let mut mrs = Vec::new();
    let mut regions = Vec::new();
    for (i, base) in map.bases().iter().enumerate() {
        let pages = layout.region_pages(i);
        let len = usize::try_from(pages.n_pages * layout.page_size().bytes()).map_err(|e| rdma_err("region", e))?;
        // SAFETY: guest memory stays mapped for the whole migration, and the
        // queue pairs that may read it are dropped before the regions
        // (field order of `SourceRdma`).
        let mr = unsafe { dev.register(base.0 as *mut u8, len, Access::REMOTE_READ) }
            .map_err(|e| rdma_err("registering guest memory", e))?;
        regions.push(RemoteRegion {
            first_page: pages.first.0,
            n_pages: pages.n_pages,
            addr: mr.addr(),
            rkey: mr.rkey(),
        });
        mrs.push(mr);
    }
    let registration = t.elapsed();
    // The demand queue pair is only read through; the background one may
    // carry WRITEs into the destination's ring and its credits back.
    let slots = rdma::setup::MAX_RING_SLOTS;
    let caps = [
        QpCaps { max_send_wr: 1, max_recv_wr: 1, cq_depth: 4 },
        QpCaps { max_send_wr: 2 * slots, max_recv_wr: slots, cq_depth: 3 * slots + 4 },
    ];
    let mut qps =
        caps.iter().map(|c| dev.create_qp(*c)).collect::<Result<Vec<_>, _>>().map_err(|e| rdma_err("queue pair", e))?;
    let offer =
        Offer { device: dev.name().to_string(), endpoints: qps.iter().map(|q| q.endpoint()).collect(), regions };
    let sealed = proto::auth::seal_setup(key, session_id, 1, &offer.encode());
    control.send(&Msg::RdmaSetup(&sealed))?;
    let deadline = Instant::now() + timeout;
    let answer = loop {
        let Some(msg) = control.recv(Wait::Until(deadline))? else {
            return Err(SenderError::Timeout { what: "the destination's RDMA answer", after: timeout });
        };
        match session.on_recv(&msg)? {
            SourceEvent::KeepAlive => {}
            SourceEvent::RdmaSetup => {
                let Msg::RdmaSetup(b) = msg else { unreachable!("the session said RdmaSetup") };
                let body = proto::auth::open_setup(key, session_id, 2, b).map_err(|e| rdma_err("answer", e))?;
                break Answer::decode(body).map_err(|e| rdma_err("answer", e))?;
            }
            _ => return Err(SessionError::Unexpected { tag: msg.tag(), phase: "awaiting the RDMA answer" }.into()),
        }
    };
    if answer.endpoints.len() != qps.len() {
        return Err(rdma_err("answer", format!("{} endpoints for {} queue pairs", answer.endpoints.len(), qps.len())));
    }
    for (q, e) in qps.iter_mut().zip(&answer.endpoints) {
        q.connect(e, deadline).map_err(|e| rdma_err("connecting", e))?;
    }
    // The credits' receives are posted before the first WRITE, so before
    // the destination can send one.
    let writer = match answer.ring {
        Some(ring) => {
            let local =
                offer.regions.iter().zip(&mrs).map(|(r, m)| (r.first_page, r.n_pages, m.addr(), m.lkey())).collect();
            let qp = qps.pop().expect("two queue pairs");
            let mut w = Writer::new(&*dev, qp, ring, layout.page_size().bytes(), local)?;
            w.post_credit_receives()?;
            Some(w)
        }
        None => None,
    };
    tracing::info!(
        device = dev.name(),
        registration_us = u64::try_from(registration.as_micros()).unwrap_or(u64::MAX),
        background = if writer.is_some() { "written into the destination's ring" } else { "read by the destination" },
        "RDMA set up: guest memory registered for remote reads"
    );
    Ok(SourceRdma {
        running: None,
        writer,
        _qps: qps,
        _mrs: mrs,
        device: dev.name().to_string(),
        _dev: dev,
        registration,
    })
}

impl SourceRdma {
    /// Start WRITEing every page not in `done` into the destination's ring,
    /// if it asked for that (once: after the switchover is acknowledged,
    /// with the guest paused for good).
    pub(crate) fn start_writer(
        &mut self,
        done: PageBitmap,
        metrics: &Arc<SenderMetrics>,
        peer_timeout: Duration,
    ) -> Result<(), SenderError> {
        let Some(mut w) = self.writer.take() else { return Ok(()) };
        let abort = Arc::new(AtomicBool::new(false));
        let (a, m) = (Arc::clone(&abort), Arc::clone(metrics));
        let thread = std::thread::Builder::new()
            .name("sender-rdma-write".into())
            .spawn(move || {
                let r = w.run(&done, &a, &m, peer_timeout);
                if let Err(e) = &r {
                    tracing::warn!("background RDMA writes stopped: {}", crate::error::error_chain(e));
                }
                // The queue pair stays until the migration ends: the
                // destination may still be giving slots back.
                while !a.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                drop(w);
                r
            })
            .map_err(|e| SenderError::Spawn { what: "sender-rdma-write", source: e })?;
        self.running = Some(WriterHandle { abort, thread: Some(thread) });
        Ok(())
    }

    /// Stop the writer (at the end, or when the link broke: the rest goes
    /// over TCP then).
    pub(crate) fn stop_writer(&mut self) {
        self.running = None;
    }
}

/// The running writer; stops it when dropped.
struct WriterHandle {
    abort: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), SenderError>>>,
}

impl Drop for WriterHandle {
    fn drop(&mut self) {
        self.abort.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What each WRITE was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wr {
    Data(u32),
    Header(u32),
}

/// The source's side of `--rdma-background write`: runs of outstanding
/// pages written from guest memory into the destination's ring slots, each
/// followed by a WRITE with immediate of its header (a queue pair keeps
/// them in order: the destination's receive for the header means the data
/// is there). A slot is written only while this side holds it; the
/// destination gives it back with a SEND once it installed the pages.
pub(crate) struct Writer {
    // The queue first: gone before the buffers it reads and writes.
    sq: SendQueue<Wr>,
    /// Per guest region: first page, pages, address, lkey.
    local: Vec<(u64, u64, u64, u32)>,
    ring: Ring,
    page_bytes: u64,
    /// A 16-byte header per slot, then a 16-byte credit receive buffer per slot.
    bufs: Box<dyn MemoryRegion>,
    bufs_base: usize,
    _bufs_mem: Vec<u8>,
}

impl Writer {
    fn new(
        dev: &dyn Device,
        qp: Box<dyn QueuePair>,
        ring: Ring,
        page_bytes: u64,
        local: Vec<(u64, u64, u64, u32)>,
    ) -> Result<Writer, SenderError> {
        if ring.slot_bytes < page_bytes {
            return Err(rdma_err("ring", format!("slots of {} bytes hold no page of {page_bytes}", ring.slot_bytes)));
        }
        let len = usize::try_from(u64::from(ring.slots) * 32).map_err(|e| rdma_err("ring", e))?;
        let mut mem = vec![0u8; len];
        let bufs_base = mem.as_mut_ptr() as usize;
        // SAFETY: `mem` lives in the writer next to its region (its heap
        // buffer does not move with the Vec); the queue pair that reads and
        // writes it is dropped first (field order).
        let bufs = unsafe { dev.register(mem.as_mut_ptr(), len, Access::LOCAL) }
            .map_err(|e| rdma_err("registering ring buffers", e))?;
        let sq = SendQueue::new(qp, 2 * ring.slots, 8, 3);
        Ok(Writer { sq, local, ring, page_bytes, bufs, bufs_base, _bufs_mem: mem })
    }

    fn header_sge(&self, slot: u32) -> Sge {
        Sge { addr: self.bufs.addr() + u64::from(slot) * 16, len: 16, lkey: self.bufs.lkey() }
    }

    fn credit_at(&self, b: u32) -> u64 {
        u64::from(self.ring.slots) * 16 + u64::from(b) * 16
    }

    fn credit_wr(&self, b: u32) -> RecvWr {
        RecvWr {
            wr_id: u64::from(b),
            sge: Sge { addr: self.bufs.addr() + self.credit_at(b), len: 16, lkey: self.bufs.lkey() },
        }
    }

    fn post_credit_receives(&mut self) -> Result<(), SenderError> {
        for b in 0..self.ring.slots {
            let wr = self.credit_wr(b);
            self.sq.post_recv(&wr).map_err(|e| rdma_err("posting a receive", e))?;
        }
        Ok(())
    }

    /// The next run of pages not in `done` from `at`, inside one region and
    /// one slot: (first page, pages, its address here, lkey).
    fn next_run(&self, done: &PageBitmap, at: u64) -> Option<(u64, u64, u64, u32)> {
        let n = done.len();
        let p = done.next_with(at, false)?.0;
        let &(first, pages, addr, lkey) = self.local.iter().find(|(f, k, _, _)| p >= *f && p < f + k)?;
        let cap = (self.ring.slot_bytes / self.page_bytes).max(1);
        let mut end = (p + cap).min(first + pages).min(n);
        if let Some(q) = done.next_with_below(p, end, true) {
            end = q.0;
        }
        Some((p, end - p, addr + (p - first) * self.page_bytes, lkey))
    }

    fn run(
        &mut self,
        done_pages: &PageBitmap,
        abort: &AtomicBool,
        metrics: &SenderMetrics,
        peer_timeout: Duration,
    ) -> Result<(), SenderError> {
        let slots = self.ring.slots;
        let mut free: Vec<u32> = (0..slots).rev().collect();
        let mut cursor = 0u64;
        let n = done_pages.len();
        let mut done = Vec::new();
        let mut recvs = Vec::new();
        let mut last_credit = Instant::now();
        loop {
            if abort.load(Ordering::Acquire) {
                return Ok(());
            }
            // Write while this side holds slots (two requests each).
            while cursor < n && self.sq.room() >= 2 {
                let Some(&slot) = free.last() else { break };
                let Some((first, pages, addr, lkey)) = self.next_run(done_pages, cursor) else {
                    cursor = n;
                    break;
                };
                // The slot's header buffer may be read by the NIC until its
                // last WRITE completed (every header is signaled, so that
                // completion comes). Credits polled meanwhile are kept.
                let end = self
                    .sq
                    .wait_for(|w| *w == Wr::Header(slot), &mut recvs, abort, peer_timeout)
                    .map_err(|e| rdma_err("writing", e))?;
                match end {
                    WaitEnd::Done => {}
                    WaitEnd::Stopped => return Ok(()),
                    WaitEnd::TimedOut => {
                        return Err(rdma_err("ring", format!("a header WRITE had no completion for {peer_timeout:?}")));
                    }
                }
                free.pop();
                cursor = first + pages;
                let h = Ring::header(first, u32::try_from(pages).unwrap_or(u32::MAX));
                let at = self.bufs_base + usize::try_from(u64::from(slot) * 16).unwrap_or(0);
                // SAFETY: inside the buffers' mapping; no request reads this
                // header now (checked just above).
                unsafe { std::ptr::write_unaligned(at as *mut [u8; 16], h) };
                let len = pages * self.page_bytes;
                let data = Sge { addr, len: u32::try_from(len).unwrap_or(u32::MAX), lkey };
                let remote =
                    Remote { addr: self.ring.addr + u64::from(slot) * self.ring.slot_bytes, rkey: self.ring.rkey };
                self.sq.post(Op::Write(remote), data, Wr::Data(slot), false).map_err(|e| rdma_err("writing", e))?;
                let hdr = Remote { addr: self.ring.headers + u64::from(slot) * HEADER_BYTES, rkey: self.ring.rkey };
                // Signaled: one completion per run (it covers the data WRITE
                // before it), and the header buffer's reuse waits for it.
                self.sq
                    .post(Op::WriteImm(hdr, slot), self.header_sge(slot), Wr::Header(slot), true)
                    .map_err(|e| rdma_err("writing", e))?;
                SenderMetrics::add(&metrics.rdma_writes, 2);
                SenderMetrics::add(&metrics.rdma_write_bytes, len);
            }
            if cursor >= n && free.len() == slots as usize {
                // Every page written and every slot given back.
                return Ok(());
            }
            done.clear();
            // (Credits polled while waiting for a header stay in `recvs`.)
            let before = self.sq.completions;
            let mut k = self.sq.poll_with_recvs(&mut done, Some(&mut recvs)).map_err(|e| rdma_err("ring", e))?;
            k += recvs.len();
            if k == 0 {
                self.sq.arm().map_err(|e| rdma_err("arming", e))?;
                k = self.sq.poll_with_recvs(&mut done, Some(&mut recvs)).map_err(|e| rdma_err("ring", e))?;
            }
            SenderMetrics::add(&metrics.rdma_write_wc, self.sq.completions - before);
            if k == 0 {
                self.sq.wait(20);
                if last_credit.elapsed() > peer_timeout {
                    return Err(rdma_err("ring", format!("no slot given back for {peer_timeout:?}")));
                }
                continue;
            }
            for (w, st) in &done {
                if *st != WcStatus::Success {
                    return Err(rdma_err("writing", format!("{w:?}: {st}")));
                }
            }
            for c in &recvs {
                if c.status != WcStatus::Success {
                    return Err(rdma_err("credit", c.status));
                }
                let b = u32::try_from(c.wr_id).unwrap_or(u32::MAX);
                if b >= slots {
                    return Err(rdma_err("credit", format!("receive {b} of {slots}")));
                }
                let at = self.bufs_base + usize::try_from(self.credit_at(b)).unwrap_or(0);
                // SAFETY: the receive completed: the NIC is done with the buffer.
                let v: [u8; 4] = unsafe { std::ptr::read_unaligned(at as *const [u8; 4]) };
                let slot = u32::from_le_bytes(v);
                if slot >= slots || free.contains(&slot) {
                    return Err(rdma_err("credit", format!("the destination gave back slot {slot}, not ours to take")));
                }
                free.push(slot);
                last_credit = Instant::now();
                SenderMetrics::add(&metrics.rdma_credits, 1);
                let wr = self.credit_wr(b);
                self.sq.post_recv(&wr).map_err(|e| rdma_err("posting a receive", e))?;
            }
            recvs.clear();
        }
    }
}

/// With RDMA the destination reads pages itself, so the ones that read as
/// zero would cross as data: once the guest is paused for good, find the
/// outstanding pages (not in `done`) that read as zero (never populated,
/// by the guest's scan, or all-zero words, read as the pusher reads them)
/// and send them as data-less Zeros frames on the control connection, in
/// address order, as the destination's background reads go; it installs
/// them as zero pages and its readers skip them once present. Returns
/// `done` with those pages added (for the ring writer) and the number sent.
pub(crate) fn send_zero_runs(
    control: &mut dyn Conn,
    map: &SourceMap,
    scan: Option<crate::guest::ZeroScan>,
    done: &PageBitmap,
    metrics: &SenderMetrics,
) -> Result<(PageBitmap, u64), SenderError> {
    let n = map.layout().n_pages();
    let mut never = PageBitmap::new(n);
    if let Some(scan) = scan {
        scan(&mut never);
    }
    map.set_known_zero(never);
    let mut covered = done.clone();
    let mut sent = 0;
    let mut run: Option<(u64, u64)> = None;
    // A Zeros frame names at most a Pages frame's worth of pages.
    let most = (proto::wire::MAX_RUN_BYTES / map.layout().page_size().bytes()).max(1);
    let flush = |control: &mut dyn Conn, r: (u64, u64), covered: &mut PageBitmap| -> Result<u64, SenderError> {
        let (first, len) = r;
        let mut at = first;
        while at < first + len {
            let k = (first + len - at).min(most);
            let n_pages = u32::try_from(k).unwrap_or(u32::MAX);
            control.send(&Msg::Zeros { first: proto::PageIdx(at), n_pages, kind: proto::wire::PageKind::Demand })?;
            at += k;
        }
        covered.set_range(proto::PageRange::new(proto::PageIdx(first), len));
        Ok(len)
    };
    let mut at = 0;
    while let Some(p) = done.next_with(at, false) {
        let end = done.next_with_below(p.0, n, true).map_or(n, |q| q.0);
        for q in p.0..end {
            if map.is_zero(proto::PageIdx(q)) {
                run = match run {
                    // A frame's worth goes at once: the destination hears
                    // from us while a large zero stretch is scanned, and
                    // its readers skip those pages sooner.
                    Some((f, l)) if f + l == q && l + 1 >= most => {
                        sent += flush(control, (f, l + 1), &mut covered)?;
                        None
                    }
                    Some((f, l)) if f + l == q => Some((f, l + 1)),
                    Some(r) => {
                        sent += flush(control, r, &mut covered)?;
                        Some((q, 1))
                    }
                    None => Some((q, 1)),
                };
            }
        }
        at = end;
    }
    if let Some(r) = run {
        sent += flush(control, r, &mut covered)?;
    }
    SenderMetrics::add(&metrics.pages_zero, sent);
    Ok((covered, sent))
}
