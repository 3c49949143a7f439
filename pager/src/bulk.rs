//! The bulk receiver: precopy rounds and the background push, installed as
//! they arrive, on a thread of its own so that large frames never delay the
//! fault loop's demand replies.

use std::sync::Arc;
use std::time::Duration;

use proto::session::{BulkEvent, DestBulk};
use proto::wire::Msg;
use transport::{Conn, Wait};

use crate::install::Installer;
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
    let r = receive(&mut *conn, &mut session, &inst, &shared, &metrics);
    if let Err(e) = r {
        shared.fail_bulk(e);
    }
}

fn receive(
    conn: &mut dyn Conn,
    session: &mut DestBulk,
    inst: &Installer,
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
            session.on_switchover();
            switched = true;
        }
        let Some(msg) = conn.recv(Wait::for_(IDLE_CHECK))? else {
            continue;
        };
        shared.touch_bulk();
        let event = session.on_recv(&msg)?;
        if let (
            BulkEvent::Pages,
            Msg::Pages {
                first, kind, data, ..
            },
        ) = (&event, msg)
        {
            inst.install(first, data, kind)?;
        }
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
