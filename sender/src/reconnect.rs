//! The source's half of recovery: reconnecting after a broken link, with
//! backoff, until the destination answers the resume handshake or the
//! recovery window closes.
//!
//! An attempt opens a control connection, answers the destination's
//! challenge with a Resume bound to the session (and the key), collects the
//! Have bitmap and the ResumeAck, and, when the guest runs there, opens a
//! bulk connection. A link failure during an attempt is retried; a
//! destination that refuses the resume (protocol, key, unknown session)
//! ends the run: it no longer knows this migration.

use std::time::{Duration, Instant};

use proto::PageBitmap;
use proto::session::{SessionError, SourceEvent, SourceSession};
use proto::wire::{self, Msg, ResumeState};
use transport::{Conn, TransportError, Wait};

use crate::config::SenderConfig;
use crate::error::{SenderError, error_chain};
use crate::metrics::SenderMetrics;

/// Which of the two connections to open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    /// Control: handshake, switchover, demand, completion.
    Control,
    /// Bulk: precopy rounds and the push.
    Bulk,
}

/// Opens connections to the destination (the first bulk connection, and
/// every pair after a broken link).
pub type Dial<'a> = dyn FnMut(Channel) -> Result<Box<dyn Conn>, TransportError> + 'a;

/// A restored link.
pub(crate) struct Reattached {
    pub(crate) state: ResumeState,
    pub(crate) have: PageBitmap,
    pub(crate) control: Box<dyn Conn>,
    /// Opened when the guest runs on the destination.
    pub(crate) bulk: Option<Box<dyn Conn>>,
}

/// First wait between attempts; doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Reconnect until the resume handshake succeeds or the recovery window
/// (from now) closes. The session must be reconnecting (`on_link_lost`).
pub(crate) fn reconnect(
    dial: &mut Dial<'_>,
    session: &mut SourceSession,
    cfg: &SenderConfig,
    metrics: &SenderMetrics,
    cause: &SenderError,
) -> Result<Reattached, SenderError> {
    let started = Instant::now();
    // After completion the destination waits only a grace for the
    // acknowledgement (at least 5 s, twice the peer timeout): no longer.
    let window = if session.completed() {
        cfg.recover_timeout.min((2 * cfg.peer_timeout).max(Duration::from_secs(5)))
    } else {
        cfg.recover_timeout
    };
    let deadline = started + window;
    let cause = error_chain(cause);
    tracing::warn!("link to the destination lost ({cause}); reconnecting for up to {window:?}");
    let mut backoff = FIRST_BACKOFF;
    let mut attempts = 0u32;
    let r = loop {
        attempts += 1;
        match attempt(dial, session, cfg, deadline) {
            Ok(r) => break Ok(r),
            Err(e) if e.is_link_failure() => {
                let now = Instant::now();
                if now + backoff >= deadline {
                    break Err(SenderError::RecoveryTimeout { after: window, cause, last: error_chain(&e) });
                }
                tracing::debug!(attempts, "reconnection attempt failed: {}", error_chain(&e));
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
                session.on_link_lost();
            }
            Err(e) => break Err(e),
        }
    };
    let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
    SenderMetrics::add(&metrics.paused_ns, ns);
    if let Ok(r) = &r {
        SenderMetrics::add(&metrics.recoveries, 1);
        tracing::warn!(attempts, "reconnected to the destination after {:?}: {:?}", started.elapsed(), r.state);
    }
    r
}

fn attempt(
    dial: &mut Dial<'_>,
    session: &mut SourceSession,
    cfg: &SenderConfig,
    window_end: Instant,
) -> Result<Reattached, SenderError> {
    let ps = session.page_size();
    let mut control = dial(Channel::Control)?;
    control.set_page_size(ps);
    // A destination notices a silent link only after its peer timeout, and
    // takes the new connection then: wait at least that long for an answer.
    let step = cfg.peer_timeout * 2 + Duration::from_secs(1);
    let deadline = (Instant::now() + step).min(window_end.max(Instant::now() + Duration::from_millis(100)));
    let (state, have) = loop {
        let Some(msg) = control.recv(Wait::Until(deadline))? else {
            return Err(SenderError::Timeout { what: "the destination's answer to a resume", after: step });
        };
        match session.on_recv(&msg)? {
            SourceEvent::SendResume { version, session, mac } => {
                control.send(&Msg::Resume { version, session, mac })?;
            }
            SourceEvent::Have | SourceEvent::KeepAlive => {}
            SourceEvent::Reattached { state, have } => break (state, have),
            _ => return Err(SessionError::Unexpected { tag: msg.tag(), phase: "resuming" }.into()),
        }
    };
    let bulk = if state == ResumeState::Running {
        let mut bulk = dial(Channel::Bulk)?;
        bulk.set_page_size(ps);
        bulk.send(&Msg::BulkHello { version: wire::VERSION, session: session.session_id(), streams: 1 })?;
        Some(bulk)
    } else {
        None
    };
    Ok(Reattached { state, have, control, bulk })
}
