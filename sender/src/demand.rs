//! The demand server: answers range requests from guest memory directly on
//! the control connection, in the order the destination listed them (its
//! faulting pages first), until the destination confirms completion.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use proto::session::{SessionError, SourceEvent, SourceSession};
use proto::wire::{self, Msg, PageKind, SourceStats};
use proto::{AtomicPageBitmap, PageIdx, PageRange};
use transport::{Conn, Wait};

use crate::config::SenderConfig;
use crate::error::SenderError;
use crate::map::SourceMap;
use crate::metrics::SenderMetrics;

/// Longest the demand loop sleeps without looking at its timers.
const TICK: Duration = Duration::from_millis(20);

pub(crate) struct Demand<'a> {
    pub(crate) conn: &'a mut dyn Conn,
    pub(crate) session: &'a mut SourceSession,
    pub(crate) map: &'a SourceMap,
    pub(crate) served: &'a AtomicPageBitmap,
    pub(crate) hints: &'a crate::push::Hints,
    pub(crate) cfg: &'a SenderConfig,
    pub(crate) metrics: &'a SenderMetrics,
    pub(crate) ranges: Vec<PageRange>,
}

/// Fill `stats` from the counters and acknowledge completion.
pub(crate) fn acknowledge(
    conn: &mut dyn Conn,
    stats: &mut SourceStats,
    metrics: &SenderMetrics,
) -> Result<(), SenderError> {
    stats.pages_pushed = SenderMetrics::get(&metrics.pages_pushed);
    stats.pages_demand = SenderMetrics::get(&metrics.pages_demand);
    stats.requests = SenderMetrics::get(&metrics.requests);
    stats.push_ns = SenderMetrics::get(&metrics.push_ns);
    // The acknowledgement's own bytes are not in its count.
    stats.bytes_sent = SenderMetrics::get(&metrics.bytes_sent);
    conn.send(&Msg::CompleteAck(*stats))?;
    Ok(())
}

impl Demand<'_> {
    /// Serve until the destination confirms completion.
    pub(crate) fn serve(&mut self, push_failed: &AtomicBool, stats: &mut SourceStats) -> Result<(), SenderError> {
        let mut last_rx = Instant::now();
        let mut last_tx = Instant::now();
        let mut sent_seen = self.conn.bytes_sent();
        loop {
            if push_failed.load(Ordering::Acquire) {
                return Err(SenderError::PushStopped);
            }
            let now = Instant::now();
            if now.duration_since(last_rx) > self.cfg.peer_timeout {
                return Err(SenderError::PeerSilent(self.cfg.peer_timeout));
            }
            if now.duration_since(last_tx) >= self.cfg.keepalive {
                self.conn.send(&Msg::KeepAlive)?;
                last_tx = now;
            }
            let wait = (last_tx + self.cfg.keepalive).min(now + TICK);
            let Some(msg) = self.conn.recv(Wait::Until(wait))? else {
                continue;
            };
            last_rx = Instant::now();
            let event = self.session.on_recv(&msg)?;
            let msg_tag = msg.tag();
            if let Msg::RangeRequest { ranges, .. } = msg {
                // Copy out: the ranges borrow the receive buffer, the replies
                // need the connection.
                self.ranges.clear();
                self.ranges.extend(ranges.iter());
            }
            match event {
                SourceEvent::Request => {
                    self.answer()?;
                    last_tx = Instant::now();
                }
                SourceEvent::Complete => {
                    SenderMetrics::add(&self.metrics.bytes_sent, self.conn.bytes_sent() - sent_seen);
                    return acknowledge(self.conn, stats, self.metrics);
                }
                SourceEvent::KeepAlive => {}
                // The session allows only postcopy events here. After
                // switchover the source holds the only copy of the
                // outstanding pages: an error here, never a panic.
                _ => return Err(SessionError::Unexpected { tag: msg_tag, phase: "in postcopy" }.into()),
            }
            let now_sent = self.conn.bytes_sent();
            SenderMetrics::add(&self.metrics.bytes_sent, now_sent - sent_seen);
            sent_seen = now_sent;
        }
    }

    /// Send every page of `self.ranges` (validated by the session), one frame
    /// per range (split to stay within a frame's limit).
    fn answer(&mut self) -> Result<(), SenderError> {
        SenderMetrics::add(&self.metrics.requests, 1);
        let max_run = wire::MAX_RUN_BYTES / self.map.layout().page_size().bytes();
        for r in &self.ranges {
            let mut first = r.first.0;
            while first < r.end() {
                let piece = PageRange::new(PageIdx(first), (r.end() - first).min(max_run));
                let zero = self.map.send_run(&mut *self.conn, piece, PageKind::Demand)?;
                SenderMetrics::add(&self.metrics.pages_zero, zero);
                self.served.set_range(piece);
                first = piece.end();
            }
            SenderMetrics::add(&self.metrics.pages_demand, r.n_pages);
        }
        if let Some(last) = self.ranges.last() {
            // The guest tends to want the neighbours of what it just asked for.
            self.hints.set(last.end());
        }
        Ok(())
    }
}
