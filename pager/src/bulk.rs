//! The bulk receiver: precopy rounds and the background push, read from the
//! socket straight into guest memory (shared memory) or a scratch buffer
//! (anonymous memory) and installed as they arrive, on a thread of its own
//! so that large frames never delay the fault loop's demand replies.

use std::sync::Arc;
use std::time::Duration;

use proto::session::{BulkEvent, DestBulk};
use transport::{Conn, Placed, Wait};

use crate::install::{BulkPlacer, Installer};
use crate::metrics::PagerMetrics;
use crate::pager::{PagerError, Shared};

/// How often the receiver looks at the abort flag while the link is idle.
const IDLE_CHECK: Duration = Duration::from_millis(50);

/// Receive until PushDone, an abort, or an error (which it hands to the fault
/// loop through `shared`).
pub(crate) fn run(
    mut conn: Box<dyn Conn>,
    mut session: DestBulk,
    inst: Arc<Installer>,
    shared: Arc<Shared>,
    metrics: Arc<PagerMetrics>,
) {
    let mut placer = BulkPlacer::new(&inst, &mut session);
    if let Err(e) = receive(&mut *conn, &mut placer, &shared, &metrics) {
        shared.fail_bulk(e);
    }
}

fn receive(
    conn: &mut dyn Conn,
    placer: &mut BulkPlacer<'_>,
    shared: &Shared,
    metrics: &PagerMetrics,
) -> Result<(), PagerError> {
    let mut switched = false;
    let mut seen = conn.bytes_received();
    loop {
        if shared.aborted() {
            return Ok(());
        }
        if !switched && shared.switched() {
            placer.session().on_switchover();
            switched = true;
        }
        let got = conn.recv_placed(Wait::for_(IDLE_CHECK), placer)?;
        let event = match got {
            None => continue,
            Some(Placed::Pages { .. }) => BulkEvent::Pages,
            Some(Placed::Msg(msg)) => placer.session().on_recv(&msg)?,
        };
        shared.touch_bulk();
        let now = conn.bytes_received();
        PagerMetrics::add(&metrics.bytes_received, now - seen);
        seen = now;
        match event {
            BulkEvent::RoundEnd => shared.round_done(),
            BulkEvent::PushDone { lost } => {
                PagerMetrics::add(&metrics.pages_push_lost, lost);
                shared.set_push_done();
                return Ok(());
            }
            BulkEvent::Pages | BulkEvent::Bound => {}
        }
    }
}
