//! The engine's side of what a NIC leaves to its user: every request has
//! its own id and its completion is traced back to what it was for;
//! unsignaled requests are grouped behind a signaled one, and a slot counts
//! as free only once a completion at or after it was polled; the queue
//! never holds more than its depth; the last request of a batch is always
//! signaled (or its completion would never come).

use std::collections::VecDeque;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::verbs::{Completion, Op, QueuePair, SendWr, Sge, VerbsError, WcOp, WcStatus};

/// How [`SendQueue::wait_for`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitEnd {
    /// Nothing it waited for is in flight.
    Done,
    /// The stop flag was set.
    Stopped,
    /// The timeout passed first.
    TimedOut,
}

/// A send queue with its contexts: `T` says what each request was for.
pub struct SendQueue<T> {
    qp: Box<dyn QueuePair>,
    depth: u32,
    signal_every: u32,
    tag: u64,
    next: u64,
    /// Posted, not yet covered by a polled completion: (wr_id, signaled, context).
    inflight: VecDeque<(u64, bool, T)>,
    since_signal: u32,
    wc: Vec<Completion>,
    /// Requests posted, completions polled (for the report).
    pub posted: u64,
    /// Signaled completions polled.
    pub completions: u64,
}

/// Bits of a work request id that number requests; the rest tag the queue.
const SEQ_BITS: u32 = 48;

impl<T> SendQueue<T> {
    /// Wrap `qp` (created with `max_send_wr >= depth`): at most `depth`
    /// requests in flight, one in `signal_every` signaled; ids carry `tag`
    /// in their top bits so a completion names its queue too.
    pub fn new(qp: Box<dyn QueuePair>, depth: u32, signal_every: u32, tag: u16) -> Self {
        let depth = depth.max(1);
        SendQueue {
            qp,
            depth,
            signal_every: signal_every.clamp(1, depth),
            tag: u64::from(tag) << SEQ_BITS,
            next: 0,
            inflight: VecDeque::new(),
            since_signal: 0,
            wc: vec![Completion { wr_id: 0, status: WcStatus::Success, op: WcOp::Read, byte_len: 0 }; 64],
            posted: 0,
            completions: 0,
        }
    }

    /// Slots free for new requests.
    pub fn room(&self) -> u32 {
        self.depth.saturating_sub(u32::try_from(self.inflight.len()).unwrap_or(u32::MAX))
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    /// Post one request for `ctx`. `last` says no other request follows
    /// soon: it is signaled, so its completion (and those of the unsignaled
    /// ones before it) arrives. Returns its id.
    pub fn post(&mut self, op: Op, sge: Sge, ctx: T, last: bool) -> Result<u64, VerbsError> {
        if self.room() == 0 {
            return Err(VerbsError::SendQueueFull { depth: self.depth });
        }
        // The last free slot is signaled too: otherwise nothing could ever
        // reclaim the queue.
        let signaled = last || self.since_signal + 1 >= self.signal_every || self.room() == 1;
        let wr_id = self.tag | (self.next & ((1 << SEQ_BITS) - 1));
        self.qp.post_send(&SendWr { wr_id, op, sge, signaled })?;
        self.next += 1;
        self.posted += 1;
        self.since_signal = if signaled { 0 } else { self.since_signal + 1 };
        self.inflight.push_back((wr_id, signaled, ctx));
        Ok(wr_id)
    }

    /// Collect what finished: each request's context with its status (an
    /// unsignaled one finished successfully when a later signaled one did,
    /// since a queue pair completes in order). A completion that names no
    /// request in flight is an error: something else posted on this queue.
    pub fn poll(&mut self, done: &mut Vec<(T, WcStatus)>) -> Result<usize, VerbsError> {
        self.poll_with_recvs(done, None)
    }

    /// As [`SendQueue::poll`], on a queue pair that also receives: receive
    /// completions go to `recvs` (without one, a receive is an error).
    pub fn poll_with_recvs(
        &mut self,
        done: &mut Vec<(T, WcStatus)>,
        mut recvs: Option<&mut Vec<Completion>>,
    ) -> Result<usize, VerbsError> {
        let mut total = 0;
        loop {
            let n = self.qp.poll(&mut self.wc)?;
            for i in 0..n {
                let c = self.wc[i];
                if matches!(c.op, WcOp::Recv { .. }) {
                    match recvs.as_deref_mut() {
                        Some(r) => {
                            r.push(c);
                            total += 1;
                            continue;
                        }
                        None => {
                            return Err(VerbsError::QpError(format!(
                                "a receive completed on send queue {:#x}",
                                self.tag
                            )));
                        }
                    }
                }
                if !self.inflight.iter().any(|(id, _, _)| *id == c.wr_id) {
                    return Err(VerbsError::QpError(format!("completion for unknown work request {:#x}", c.wr_id)));
                }
                self.completions += 1;
                while let Some((id, _, ctx)) = self.inflight.pop_front() {
                    total += 1;
                    if id == c.wr_id {
                        done.push((ctx, c.status));
                        break;
                    }
                    // Before the request this completion names: a queue pair
                    // runs its requests in order, so these finished (a
                    // failed or flushed one has a completion of its own).
                    done.push((ctx, WcStatus::Success));
                }
            }
            if n < self.wc.len() {
                return Ok(total);
            }
        }
    }

    /// Arm the completion notification (poll again afterwards).
    pub fn arm(&mut self) -> Result<(), VerbsError> {
        self.qp.arm()
    }

    /// Polls readable after an armed completion.
    pub fn readiness(&self) -> BorrowedFd<'_> {
        self.qp.readiness()
    }

    /// Wait at most `ms` milliseconds for an armed completion.
    pub fn wait(&self, ms: u8) {
        let mut fds = [nix::poll::PollFd::new(self.qp.readiness(), nix::poll::PollFlags::POLLIN)];
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms));
    }

    /// Post a receive on the queue pair.
    pub fn post_recv(&mut self, wr: &crate::verbs::RecvWr) -> Result<(), VerbsError> {
        self.qp.post_recv(wr)
    }

    /// Whether a request for `pred`'s context is still in flight.
    pub fn any_in_flight(&self, mut pred: impl FnMut(&T) -> bool) -> bool {
        self.inflight.iter().any(|(_, _, c)| pred(c))
    }

    /// Poll until no request whose context `pred` names is in flight (a
    /// buffer it reads may be reused then). Receives polled meanwhile are
    /// appended to `recvs`; a request that failed is an error. RDMA never
    /// times out, so the caller bounds the wait: `stop`, and `timeout`.
    pub fn wait_for(
        &mut self,
        mut pred: impl FnMut(&T) -> bool,
        recvs: &mut Vec<Completion>,
        stop: &AtomicBool,
        timeout: Duration,
    ) -> Result<WaitEnd, VerbsError>
    where
        T: std::fmt::Debug,
    {
        let since = Instant::now();
        let mut done = Vec::new();
        while self.any_in_flight(&mut pred) {
            done.clear();
            if self.poll_with_recvs(&mut done, Some(&mut *recvs))? == 0 {
                if stop.load(Ordering::Acquire) {
                    return Ok(WaitEnd::Stopped);
                }
                if since.elapsed() > timeout {
                    return Ok(WaitEnd::TimedOut);
                }
                self.arm()?;
                self.wait(1);
            }
            if let Some((c, st)) = done.iter().find(|(_, st)| *st != WcStatus::Success) {
                return Err(VerbsError::QpError(format!("{c:?}: {st}")));
            }
        }
        Ok(WaitEnd::Done)
    }

    /// Whether an unsignaled request waits for a signaled one behind it.
    pub fn needs_signal(&self) -> bool {
        self.inflight.back().is_some_and(|(_, s, _)| !s)
    }
}
