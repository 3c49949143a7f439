//! Why a destination run failed, and what the source is told.

use std::time::Duration;

use proto::session::SessionError;
use proto::wire::ErrorCode;
use transport::TransportError;

use crate::guest::GuestError;
use crate::uffd::UffdError;

/// Why the destination's run failed.
#[derive(Debug, thiserror::Error)]
pub enum PagerError {
    /// A connection failed.
    #[error("connection to the source failed")]
    Transport(#[from] TransportError),
    /// The source broke the protocol, or reported an error.
    #[error("session with the source failed")]
    Session(#[from] SessionError),
    /// userfaultfd failed.
    #[error("userfaultfd failed")]
    Uffd(#[source] UffdError),
    /// The process that owns guest memory (a VMM that handed over its
    /// userfaultfd) exited: nothing is left to serve.
    #[error("the guest's memory is gone: the process that owns it (the VMM) exited")]
    GuestGone(#[source] Box<dyn std::error::Error + Send + Sync>),
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
    /// Nothing arrived from the source for too long.
    #[error("no data from the source for {0:?}: presumed dead")]
    PeerSilent(Duration),
    /// A step did not finish in time.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// The limit.
        after: Duration,
    },
    /// A fault arrived for memory that is not the guest's.
    #[error("fault at {0:#x}, outside guest memory")]
    StrayFault(usize),
    /// poll failed.
    /// An RDMA queue pair failed or stalled.
    #[error("RDMA failed: {0}")]
    Rdma(String),
    #[error("poll failed")]
    Poll(#[source] nix::Error),
    /// The bulk receiver failed.
    #[error("bulk connection failed")]
    Bulk(#[source] Box<PagerError>),
    /// The source hung up while this side waited on something else (guest
    /// memory being prepared, the bulk connection); the work stopped there.
    #[error("the source went away while {0}")]
    SourceGone(&'static str),
    /// The link broke before switchover and the migration was cancelled
    /// (the guest runs on, on the source).
    #[error("migration cancelled before switchover; the guest runs on the source")]
    Cancelled(#[source] Box<PagerError>),
    /// The link broke after switchover and the source did not come back.
    #[error(
        "the source did not reconnect within {after:?} (link lost: {cause}); {missing_pages} pages never arrived \
         and {waiting_faults} faults wait on them: the guest cannot continue"
    )]
    RecoveryTimeout {
        /// The recovery window.
        after: Duration,
        /// What broke the link.
        cause: String,
        /// Pages not present.
        missing_pages: u64,
        /// Faults blocked on them.
        waiting_faults: usize,
    },
}

impl From<UffdError> for PagerError {
    fn from(e: UffdError) -> Self {
        if e.owner_gone() { PagerError::GuestGone(Box::new(e)) } else { PagerError::Uffd(e) }
    }
}

impl PagerError {
    /// Whether the guest's owner exited (see [`PagerError::GuestGone`]):
    /// the session ends, and that is nobody's failure here.
    pub fn guest_gone(&self) -> bool {
        // The bulk receiver's install errors reach here wrapped in its
        // transport's placement error: look down the whole chain.
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = cur {
            if matches!(e.downcast_ref::<PagerError>(), Some(PagerError::GuestGone(_)))
                || e.downcast_ref::<UffdError>().is_some_and(UffdError::owner_gone)
            {
                return true;
            }
            cur = e.source();
        }
        false
    }

    /// The code the source is told.
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            PagerError::Session(e) => e.code(),
            _ => ErrorCode::Internal,
        }
    }

    /// Whether this is a broken or silent link, which recovery can survive
    /// (as opposed to a peer that broke the protocol or said it gives up,
    /// or a local failure).
    pub(crate) fn is_link_failure(&self) -> bool {
        match self {
            PagerError::Transport(t) => t.is_link_failure(),
            // Waiting on the source for a step (a precopy round, the
            // completion acknowledgement) is silence too.
            PagerError::PeerSilent(_) | PagerError::Timeout { .. } => true,
            PagerError::Bulk(inner) => inner.is_link_failure(),
            // A failed or stalled queue pair: the link is reconnected over
            // TCP (with recovery), as for a broken connection.
            PagerError::Rdma(_) => true,
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
