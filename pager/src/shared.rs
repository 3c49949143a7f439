//! Flags the fault loop, the bulk receivers and the page mapper share for
//! the whole run (per-connection flags live in `bulk::BulkLink`).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use parking_lot::Mutex;

use crate::error::PagerError;

/// Run-wide flags.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    abort: AtomicBool,
    switched: AtomicBool,
    rounds_done: AtomicU32,
    failed: AtomicBool,
    error: Mutex<Option<PagerError>>,
}

impl Shared {
    /// A helper thread failed (not a link): the run must end.
    pub(crate) fn fail(&self, e: PagerError) {
        *self.error.lock() = Some(e);
        self.failed.store(true, Ordering::Release);
    }

    /// Surface a helper's failure in the caller's thread.
    pub(crate) fn check(&self) -> Result<(), PagerError> {
        if self.failed.load(Ordering::Acquire)
            && let Some(e) = self.error.lock().take()
        {
            return Err(e);
        }
        Ok(())
    }

    /// The run is ending: every helper thread stops.
    pub(crate) fn abort(&self) {
        self.abort.store(true, Ordering::Release);
    }
    pub(crate) fn aborted(&self) -> bool {
        self.abort.load(Ordering::Acquire)
    }
    /// The guest runs here from now on.
    pub(crate) fn set_switched(&self) {
        self.switched.store(true, Ordering::Release);
    }
    pub(crate) fn switched(&self) -> bool {
        self.switched.load(Ordering::Acquire)
    }
    pub(crate) fn round_done(&self) {
        self.rounds_done.fetch_add(1, Ordering::AcqRel);
    }
    pub(crate) fn rounds_done(&self) -> u32 {
        self.rounds_done.load(Ordering::Acquire)
    }
}
