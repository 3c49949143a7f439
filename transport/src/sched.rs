//! Scheduling of the threads that move bulk data.
//!
//! On two CPUs the background push, its receiver and the destination's page
//! mapper are CPU-bound while the guest also runs; the demand path (fault
//! thread, the source's demand thread) must not queue behind them for a
//! scheduler slice. Raising the bulk threads' nice value makes a waking
//! demand-path thread preempt them at once, at little cost to the push when
//! nothing else wants the CPU.
#![allow(unsafe_code)]

/// Give the calling thread nice value `nice` (0 leaves it alone). Failure
/// (no permission to go below 0) is ignored: priority is a preference.
pub fn set_thread_nice(nice: i32) {
    if nice == 0 {
        return;
    }
    // SAFETY: gettid takes no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    let Ok(tid) = libc::id_t::try_from(tid) else { return };
    // SAFETY: setpriority on our own thread id with a plain integer; the
    // result is deliberately ignored (see above).
    let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) };
}
