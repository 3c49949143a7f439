//! Why a source run failed, and what became of the guest.

use std::time::Duration;

use proto::session::SessionError;
use transport::TransportError;

use crate::guest::GuestError;

/// Why the source's run failed.
#[derive(Debug, thiserror::Error)]
pub enum SenderError {
    /// A connection failed.
    #[error("connection to the destination failed")]
    Transport(#[from] TransportError),
    /// The destination broke the protocol or reported an error.
    #[error("session with the destination failed")]
    Session(#[from] SessionError),
    /// The guest failed.
    #[error("the guest failed")]
    Guest(#[source] GuestError),
    /// A thread could not be started.
    #[error("starting thread {what} failed")]
    Spawn {
        /// Which thread.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Nothing arrived from the destination for too long.
    #[error("no data from the destination for {0:?}: presumed dead")]
    PeerSilent(Duration),
    /// A step did not finish in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// The limit.
        after: Duration,
    },
    /// The pusher thread stopped with an error (reported separately).
    #[error("background push stopped")]
    PushStopped,
    /// Asked after a broken link, the destination said it never switched
    /// over: the guest was resumed here.
    #[error("the destination had not switched over when the link broke")]
    NotSwitched,
    /// The link broke and could not be restored within the recovery window.
    #[error("could not reconnect to the destination within {after:?} (link lost: {cause}; last attempt: {last})")]
    RecoveryTimeout {
        /// The window.
        after: Duration,
        /// What broke the link.
        cause: String,
        /// Why the last attempt failed.
        last: String,
    },
}

impl SenderError {
    /// Whether this is a broken, silent or stalled link, which recovery can
    /// survive (as opposed to a peer that broke the protocol or said it gives
    /// up, or a local failure).
    pub(crate) fn is_link_failure(&self) -> bool {
        match self {
            SenderError::Transport(t) => t.is_link_failure(),
            SenderError::PeerSilent(_) | SenderError::Timeout { .. } => true,
            _ => false,
        }
    }
}

/// The error and its causes on one line.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Where the run was when it failed: what became of the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailPhase {
    /// Before switchover: the guest was resumed and runs on the source.
    BeforeSwitchover,
    /// Switchover sent, not acknowledged, and not settled by a reconnection:
    /// the guest is paused here, memory kept.
    InDoubt,
    /// After switchover: the guest runs on the destination.
    AfterSwitchover,
}

/// A failed run.
#[derive(Debug, thiserror::Error)]
#[error("{}", match .phase {
    FailPhase::BeforeSwitchover => "migration failed before switchover; the guest keeps running on the source",
    FailPhase::InDoubt => "migration failed during switchover; the guest is paused on the source and its memory kept",
    FailPhase::AfterSwitchover => "migration failed after switchover; the guest was running on the destination",
})]
pub struct SendFailure {
    /// Where it failed.
    pub phase: FailPhase,
    /// Why.
    #[source]
    pub error: SenderError,
}

pub(crate) fn fail(phase: FailPhase) -> impl FnOnce(SenderError) -> SendFailure {
    move |error| SendFailure { phase, error }
}
