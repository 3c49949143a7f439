//! Flags the fault loop, the bulk receivers and the page mapper share for
//! the whole run (per-connection flags live in `bulk::BulkLink`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use crate::error::PagerError;

/// Run-wide flags.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    abort: AtomicBool,
    switched: AtomicBool,
    rounds_done: Mutex<u32>,
    round_cv: Condvar,
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
        *self.rounds_done.lock() += 1;
        self.round_cv.notify_all();
    }
    /// Wait until `rounds` precopy rounds are installed or `until` passes;
    /// returns whether they are. Woken by the receiver, not by polling: the
    /// wait is inside the downtime.
    pub(crate) fn wait_rounds(&self, rounds: u32, until: Instant) -> bool {
        let mut done = self.rounds_done.lock();
        while *done < rounds {
            if self.round_cv.wait_until(&mut done, until).timed_out() {
                return *done >= rounds;
            }
        }
        true
    }
}
