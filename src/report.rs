//! The JSON report of a run, written by each side and merged by `migrate`,
//! the pieces each side builds it from, and its human-readable summary.
//!
//! Every field has a default so that a report from an older build, or a
//! one-sided report, still reads back (`postcopy report`, `migrate`).

use std::collections::BTreeMap;
use std::path::Path;

use proto::wire::{GuestKind, Mode};
use proto::{LatencyHist, LatencySummary};
use serde::{Deserialize, Serialize};

use crate::adapters::GuestSummary;

/// Percentiles in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

impl From<LatencySummary> for Latency {
    fn from(s: LatencySummary) -> Self {
        Latency { count: s.count, p50: s.p50, p90: s.p90, p99: s.p99, p999: s.p999, max: s.max, mean: s.mean }
    }
}

/// The prefetch window in force.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PrefetchReport {
    /// Pages per fault.
    pub pages: u32,
    /// "after" or "around".
    pub mode: String,
}

/// Where the downtime went.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DowntimeParts {
    /// Source: pause to the last byte of state and outstanding set written.
    pub pause_to_sent_ms: f64,
    /// Destination: evicting outstanding pages held from precopy.
    pub dest_evict_ms: f64,
    /// Destination: restoring the guest and starting its vCPUs.
    pub dest_restore_ms: f64,
}

/// Precopy figures (hybrid and precopy modes).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PrecopyReport {
    /// Rounds sent, round 0 and any stop-and-copy included.
    pub rounds: u32,
    /// Pages sent in all rounds.
    pub pages_sent: u64,
    /// Bytes sent in all rounds.
    pub bytes: u64,
    /// Start of round 0 to the decision to stop.
    pub time_ms: f64,
    /// Pages sent in each round.
    pub round_pages: Vec<u64>,
    /// Dirty pages found by each scan after a round.
    pub dirty_pages: Vec<u64>,
    /// Why precopy ended.
    pub stop_reason: String,
    /// Precopy mode: pages sent with the guest paused.
    pub stop_and_copy_pages: u64,
    /// Destination: outstanding pages it held from precopy and dropped.
    pub pages_evicted: u64,
}

/// Postcopy figures.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PostcopyReport {
    /// Pages in the guest.
    pub pages_total: u64,
    /// Pages the guest's owner dropped (a VMM's balloon: REMOVE events);
    /// they read as zeros and are never sent.
    pub pages_removed: u64,
    /// Faults on dropped pages, answered with zeros without a request.
    pub faults_zero: u64,
    /// Pages that crossed the wire as Zeros frames (all-zero runs, no data).
    pub pages_zero: u64,
    /// Pages installed from the background push.
    pub pages_pushed: u64,
    /// Pages named in range requests.
    pub pages_requested: u64,
    /// Pages installed from demand replies.
    pub pages_demand: u64,
    /// Pages received twice (push and demand crossing).
    pub pages_duplicate: u64,
    /// Pages asked for again after a timeout or the end of the push.
    pub pages_rerequested: u64,
    /// Range requests sent.
    pub requests: u64,
    /// Fault events.
    pub faults: u64,
    /// Faults on pages held here from precopy, mapped without a round trip
    /// (counted in `faults`, timed apart from the network faults).
    pub faults_local: u64,
    /// Held precopy pages mapped after switchover.
    pub pages_mapped_local: u64,
    /// Fault events whose page was present by the time they were read.
    pub faults_resolved_early: u64,
    /// Guest resumed to all pages present.
    pub time_ms: f64,
    /// Source: first push frame to the end of the push.
    pub push_time_ms: f64,
    /// Bytes pushed over push time, GB/s.
    pub push_gbps: f64,
    /// Fault event read to page installed.
    pub fault_latency_us: Latency,
    /// The full latency distribution, (ns, count) pairs.
    pub fault_latency_hist: Vec<(u64, u64)>,
    /// Latency of the local faults.
    pub local_fault_latency_us: Latency,
    /// Total time faulting threads waited.
    pub blocktime_ms: f64,
    /// Waiting time per faulting thread (vCPU name or thread id).
    pub vcpu_blocktime_ms: BTreeMap<String, f64>,
    /// Broken links after switchover that the two sides restored.
    pub recoveries: u64,
    /// Time the migration spent paused on a broken link.
    pub paused_ms: f64,
    /// Destination: bulk connections (push streams) on the first link.
    pub push_streams: u64,
    /// Source: how often the push governor began pacing the push, to leave
    /// the bottleneck's queue to demand (0: it never did, or yielding is off).
    pub push_yields: u64,
}

/// What the guest did and how it checked out.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GuestReport {
    /// Accesses on this host.
    pub accesses: u64,
    /// Accesses over the guest's life.
    pub accesses_total: u64,
    /// Loads on this host.
    pub loads: u64,
    /// Stores on this host.
    pub stores: u64,
    /// Violations over the guest's life.
    pub violations: u64,
    /// Accesses on this host slower than the stall threshold.
    pub stalls: u64,
    /// Guest-felt stalls.
    pub stall_latency_us: Latency,
    /// The full stall distribution, (ns, count) pairs.
    pub stall_latency_hist: Vec<(u64, u64)>,
    /// Heartbeats per vCPU on this host (VM guest: console lines; workload
    /// guest: 1 if the vCPU made progress).
    pub heartbeats: Vec<u64>,
    /// Whether every vCPU showed signs of life on this host (true when
    /// absent: reports from before the check was made).
    #[serde(default = "yes")]
    pub heartbeats_ok: bool,
    /// Pages that passed the final verification.
    pub verified_pages: u64,
    /// Whether the final verification passed.
    pub verify_ok: bool,
    /// The first problems found (violations, verification).
    pub problems: Vec<String>,
    /// Source only: the guest kept running here after a failed migration.
    pub running_on_source: bool,
}

/// The link a run crossed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LinkReport {
    /// As given: "loopback", or "veth[:RATE][:RTT]".
    pub name: String,
    /// Rate limit, Gbit/s (0: none).
    pub rate_gbit: f64,
    /// Round-trip delay asked for, microseconds (0: none); the relay's own
    /// delay is trimmed so that the measured round trip is the bare link's
    /// plus this (see `measured_rtt_us`).
    pub added_rtt_us: f64,
    /// Measured before the run: median TCP round trip of a small message
    /// between the two hosts, microseconds.
    pub measured_rtt_us: f64,
    /// Measured before the run: median round trip of small messages 10 ms
    /// apart, microseconds. Each finds the CPUs idle, as a guest's rare
    /// fault does; inside a virtual machine it pays their wake-ups, which
    /// back-to-back messages do not.
    pub measured_rtt_idle_us: f64,
    /// Measured before the run: one TCP stream's rate, Gbit/s.
    pub measured_gbit: f64,
    /// A `:prio` link: bytes the source's queue served in its urgent class
    /// (packets marked DSCP EF: the control connection, which carries the
    /// demand replies) during the run.
    pub urgent_bytes: Option<u64>,
}

/// What RDMA did (`transport: "rdma"`): work requests posted per operation,
/// bytes per operation, completions polled, registration time.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RdmaReport {
    /// The device (`sim`: the software device).
    pub device: String,
    /// Destination: RDMA READs posted for faults.
    pub demand_reads: u64,
    /// Their bytes.
    pub demand_bytes: u64,
    /// Completions polled for them.
    pub demand_completions: u64,
    /// Destination: RDMA READs posted for the background.
    pub background_reads: u64,
    /// Their bytes.
    pub background_bytes: u64,
    /// Completions polled for them (one per group of unsignaled READs).
    pub background_completions: u64,
    /// `--rdma-background write`, destination: ring slots the source wrote
    /// and this side installed (`background_bytes` counts their bytes).
    pub ring_slots_received: u64,
    /// Source: WRITEs posted into the destination's ring (data and header
    /// each count one), the page bytes they carried, completions polled,
    /// and slots the destination gave back.
    pub background_writes: u64,
    /// Their page bytes.
    pub background_write_bytes: u64,
    /// Completions polled for them.
    pub write_completions: u64,
    /// Slots given back.
    pub credits: u64,
    /// Registering memory: the destination's staging slots, or the
    /// source's guest memory.
    pub registration_ms: f64,
}

/// A run's report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Report {
    /// "ok" or "failed".
    pub status: String,
    /// Why it failed.
    pub error: Option<String>,
    /// "destination", "source" or "migration".
    pub side: String,
    /// "postcopy", "hybrid" or "precopy".
    pub mode: String,
    /// "workload" or "vm".
    pub guest_kind: String,
    /// Guest memory size.
    pub mem_bytes: u64,
    /// Page size in bytes.
    pub page_size: u64,
    /// Memory regions.
    pub regions: usize,
    /// vCPUs.
    pub vcpus: u32,
    /// Access pattern.
    pub pattern: String,
    /// Share of stores.
    pub store_ratio: f64,
    /// Prefetch in force.
    pub prefetch: PrefetchReport,
    /// First handshake byte to completion.
    pub total_time_ms: f64,
    /// Destination: creating, populating and registering guest memory,
    /// before the source pauses the guest.
    pub setup_ms: f64,
    /// Destination: creating and populating guest memory ahead, started
    /// before the source connected (`dest --prepare-mem`; 0 if not): the
    /// part still running when the hello came is in `setup_ms`.
    pub prepare_ms: f64,
    /// Destination: whether the source acknowledged completion (false when
    /// the link broke after every page was here and it did not come back).
    pub completion_confirmed: bool,
    /// Source pause to destination resume (as the source saw the ack).
    pub downtime_ms: f64,
    /// Where the downtime went.
    pub downtime: DowntimeParts,
    /// Bytes sent by the source over both connections.
    pub bytes_transferred: u64,
    /// Pages outstanding at switchover (every page in pure postcopy, none
    /// in precopy mode).
    pub outstanding_pages: u64,
    /// Precopy figures.
    pub precopy: PrecopyReport,
    /// Postcopy figures.
    pub postcopy: PostcopyReport,
    /// Guest figures.
    pub guest: GuestReport,
    /// The link between the two sides.
    pub link: LinkReport,
    /// How post-copy pages moved: "tcp" or "rdma".
    pub transport: String,
    /// Destination: how pages were installed: "continue" (written into
    /// shared memory, mapped by UFFDIO_CONTINUE on minor faults) or "copy"
    /// (UFFDIO_COPY into anonymous memory).
    pub install: String,
    /// Destination: guest memory held in 2 MiB pages when the guest stopped
    /// (hugetlbfs pages, or transparent huge pages with `--memory thp`).
    pub memory_huge_bytes: u64,
    /// What RDMA did, when it was used.
    pub rdma: Option<RdmaReport>,
    /// Source: the bulk connection's pacing rate, Gbit/s (0: unpaced).
    pub push_rate_gbit: f64,
    /// Destination: the sampling tick of `timeline`.
    pub timeline_tick_ms: f64,
    /// Destination: its counters over time (see [`crate::timeline`]).
    pub timeline: Vec<crate::timeline::Sample>,
    /// In a merged report: the source's own report.
    pub source: Option<Box<Report>>,
}

fn yes() -> bool {
    true
}

/// Milliseconds of a duration, for reports.
pub fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Milliseconds of a nanosecond count.
pub fn ns_ms(ns: u64) -> f64 {
    std::time::Duration::from_nanos(ns).as_secs_f64() * 1000.0
}

/// A histogram as report fields.
pub fn latency_of(h: &LatencyHist) -> (Latency, Vec<(u64, u64)>) {
    (h.summary().into(), h.to_buckets())
}

impl Report {
    /// Read a report.
    pub fn read(path: &Path) -> anyhow::Result<Report> {
        let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("parsing {}: {e}", path.display()))
    }

    /// Write a report (pretty JSON).
    pub fn write(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        std::fs::write(path, text + "\n").map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
    }

    /// Whether the run succeeded and the guest checked out: no violations,
    /// every page verified, every vCPU alive after the migration.
    pub fn clean(&self) -> bool {
        self.status == "ok" && self.guest.violations == 0 && self.guest.verify_ok && self.guest.heartbeats_ok
    }
}

/// The mode as reports name it.
pub fn mode_name(m: Mode) -> String {
    m.name().to_string()
}

/// The guest section of a report.
pub fn guest_report(g: &GuestSummary, running_on_source: bool) -> GuestReport {
    let (stall_lat, stall_hist) = latency_of(&g.stalls);
    GuestReport {
        accesses: g.accesses_here,
        accesses_total: g.accesses_total,
        loads: g.loads_here,
        stores: g.stores_here,
        violations: g.violations,
        stalls: g.stalls.count(),
        stall_latency_us: stall_lat,
        stall_latency_hist: stall_hist,
        heartbeats: g.heartbeats.clone(),
        heartbeats_ok: !g.heartbeats.is_empty() && g.heartbeats.iter().all(|&h| h > 0),
        verified_pages: g.verified_pages,
        verify_ok: g.verify_ok,
        problems: g.problems.clone(),
        running_on_source,
    }
}

/// The guest kind as reports name it.
pub fn guest_name(k: GuestKind) -> String {
    match k {
        GuestKind::Workload => "workload".into(),
        GuestKind::Vm => "vm".into(),
        GuestKind::Snapshot => "snapshot".into(),
    }
}

/// GB/s of `bytes` moved in `ns`.
pub fn gbps(bytes: u64, ns: u64) -> f64 {
    if ns == 0 { 0.0 } else { bytes as f64 / ns as f64 }
}

/// A human-readable summary of a report.
pub fn summary(r: &Report) -> String {
    let mut s = String::new();
    let gib = r.mem_bytes as f64 / f64::from(1u32 << 30);
    s += &format!(
        "postcopy {}: {} guest, {gib:.2} GiB in {} KiB pages{}, {} vCPU, {}, prefetch {} ({})\n",
        r.mode,
        r.guest_kind,
        r.page_size / 1024,
        if r.install.is_empty() { String::new() } else { format!(", UFFDIO_{}", r.install.to_uppercase()) },
        r.vcpus,
        r.pattern,
        r.prefetch.pages,
        r.prefetch.mode
    );
    s += &format!("  status       {}{}\n", r.status, r.error.as_ref().map(|e| format!(": {e}")).unwrap_or_default());
    s += &format!(
        "  time         total {:.1} ms (setup {:.1} ms{}), postcopy {:.1} ms, downtime {:.2} ms (pause to sent {:.2} ms, evict {:.2} ms, restore {:.2} ms)\n",
        r.total_time_ms,
        r.setup_ms,
        if r.prepare_ms > 0.0 { format!("; memory prepared ahead in {:.1} ms", r.prepare_ms) } else { String::new() },
        r.postcopy.time_ms,
        r.downtime_ms,
        r.downtime.pause_to_sent_ms,
        r.downtime.dest_evict_ms,
        r.downtime.dest_restore_ms
    );
    if r.precopy.rounds > 0 {
        s += &format!(
            "  precopy      {} rounds, {} pages, {:.1} ms, dirty per round {:?}, stopped: {}; {} pages outstanding\n",
            r.precopy.rounds,
            r.precopy.pages_sent,
            r.precopy.time_ms,
            r.precopy.dirty_pages,
            r.precopy.stop_reason,
            r.outstanding_pages
        );
    }
    s += &format!(
        "  transferred  {:.3} GB; pushed {} pages ({:.2} GB/s), demand {} pages in {} requests, duplicates {}\n",
        r.bytes_transferred as f64 / 1e9,
        r.postcopy.pages_pushed,
        r.postcopy.push_gbps,
        r.postcopy.pages_demand,
        r.postcopy.requests,
        r.postcopy.pages_duplicate
    );
    if let Some(x) = &r.rdma {
        let background = if x.ring_slots_received > 0 {
            format!(
                "{} ring slots written by the source ({:.3} GB)",
                x.ring_slots_received,
                x.background_bytes as f64 / 1e9
            )
        } else {
            format!(
                "{} background READs ({:.3} GB, {} completions)",
                x.background_reads,
                x.background_bytes as f64 / 1e9,
                x.background_completions
            )
        };
        s += &format!(
            "  rdma         device {}: {} demand READs ({:.3} GB), {background}, registration {:.2} ms\n",
            x.device,
            x.demand_reads,
            x.demand_bytes as f64 / 1e9,
            x.registration_ms
        );
    }
    let f = &r.postcopy.fault_latency_us;
    s += &format!(
        "  faults       {} over the network (latency p50 {:.1} us, p90 {:.1} us, p99 {:.1} us, max {:.1} us)",
        r.postcopy.faults.saturating_sub(r.postcopy.faults_local),
        f.p50,
        f.p90,
        f.p99,
        f.max
    );
    if r.postcopy.faults_local > 0 {
        let l = &r.postcopy.local_fault_latency_us;
        s += &format!("; {} on held pages (p50 {:.1} us, p99 {:.1} us)", r.postcopy.faults_local, l.p50, l.p99);
    }
    s += "\n";
    if !r.postcopy.vcpu_blocktime_ms.is_empty() {
        let per: Vec<String> = r.postcopy.vcpu_blocktime_ms.iter().map(|(k, v)| format!("{k} {v:.1}")).collect();
        s += &format!("  blocked      {:.1} ms in all ({} ms)\n", r.postcopy.blocktime_ms, per.join(", "));
    }
    s += &format!(
        "  guest        {} accesses here, {} violations, {} pages verified ({})",
        r.guest.accesses,
        r.guest.violations,
        r.guest.verified_pages,
        if r.guest.verify_ok { "ok" } else { "FAILED" },
    );
    if r.guest_kind == "vm" {
        s += &format!(", heartbeats per vCPU {:?}", r.guest.heartbeats);
    } else {
        let g = &r.guest.stall_latency_us;
        s += &format!(", stalls {} (p50 {:.1} us, p99 {:.1} us)", r.guest.stalls, g.p50, g.p99);
    }
    s
}

impl Report {
    /// The destination's report of a finished run: what the pager measured
    /// (`pr`, `metrics`), and the guest as it was stopped and verified (`g`).
    /// The time series is the caller's to add.
    pub fn destination(
        pr: &pager::PagerReport,
        metrics: &pager::PagerMetrics,
        g: &GuestSummary,
        kind: GuestKind,
        vcpu_failure: Option<String>,
    ) -> Report {
        let layout = &pr.accepted.layout;
        let (fault_lat, fault_hist) = latency_of(&pr.fault_latency);
        let blocktime: u64 = pr.blocktime_ns.iter().map(|(_, ns)| ns).sum();
        let vcpu_name = |tid: u32| {
            g.vcpu_tids.iter().position(|&t| t == tid).map_or_else(|| format!("tid-{tid}"), |i| format!("vcpu{i}"))
        };
        Report {
            status: "ok".into(),
            error: vcpu_failure,
            side: "destination".into(),
            mode: mode_name(pr.accepted.mode),
            guest_kind: guest_name(kind),
            mem_bytes: layout.len_bytes(),
            page_size: layout.page_size().bytes(),
            regions: layout.regions().len(),
            vcpus: g.vcpus,
            pattern: g.pattern.clone(),
            store_ratio: g.store_ratio,
            prefetch: PrefetchReport {
                pages: pr.prefetch.pages,
                mode: match pr.prefetch.mode {
                    pager::PrefetchMode::After => "after".into(),
                    pager::PrefetchMode::Around => "around".into(),
                },
            },
            total_time_ms: ms(pr.total_time),
            setup_ms: ms(pr.setup_time),
            completion_confirmed: pr.completion_confirmed,
            downtime_ms: ns_ms(pr.source.downtime_ns),
            downtime: DowntimeParts {
                pause_to_sent_ms: ns_ms(pr.source.pause_to_sent_ns),
                dest_evict_ms: ns_ms(pr.resume.evict_ns),
                dest_restore_ms: ns_ms(pr.resume.restore_ns),
            },
            bytes_transferred: pr.source.bytes_sent,
            outstanding_pages: pr.outstanding_pages,
            precopy: PrecopyReport {
                pages_sent: pager::PagerMetrics::get(&metrics.pages_precopy),
                pages_evicted: pager::PagerMetrics::get(&metrics.pages_evicted),
                ..PrecopyReport::default()
            },
            postcopy: PostcopyReport {
                pages_total: layout.n_pages(),
                pages_pushed: pager::PagerMetrics::get(&metrics.pages_push),
                pages_requested: pager::PagerMetrics::get(&metrics.pages_requested),
                pages_demand: pager::PagerMetrics::get(&metrics.pages_demand),
                pages_duplicate: pager::PagerMetrics::get(&metrics.pages_duplicate),
                pages_rerequested: pager::PagerMetrics::get(&metrics.pages_rerequested),
                requests: pager::PagerMetrics::get(&metrics.requests),
                faults: pager::PagerMetrics::get(&metrics.faults),
                faults_local: pager::PagerMetrics::get(&metrics.faults_local),
                pages_mapped_local: pager::PagerMetrics::get(&metrics.pages_mapped_local),
                local_fault_latency_us: latency_of(&pr.fault_latency_local).0,
                faults_resolved_early: pager::PagerMetrics::get(&metrics.faults_resolved_early),
                pages_removed: pager::PagerMetrics::get(&metrics.pages_removed),
                faults_zero: pager::PagerMetrics::get(&metrics.faults_zero),
                pages_zero: pager::PagerMetrics::get(&metrics.pages_zero),
                time_ms: ms(pr.postcopy_time),
                push_time_ms: ns_ms(pr.source.push_ns),
                push_gbps: gbps(pr.source.pages_pushed * layout.page_size().bytes(), pr.source.push_ns),
                fault_latency_us: fault_lat,
                fault_latency_hist: fault_hist,
                blocktime_ms: ns_ms(blocktime),
                vcpu_blocktime_ms: pr.blocktime_ns.iter().map(|(tid, ns)| (vcpu_name(*tid), ns_ms(*ns))).collect(),
                recoveries: pager::PagerMetrics::get(&metrics.recoveries),
                paused_ms: ns_ms(pager::PagerMetrics::get(&metrics.paused_ns)),
                push_streams: pager::PagerMetrics::get(&metrics.push_streams),
                // The source's figure: `migrate` takes it from its report.
                push_yields: 0,
            },
            guest: guest_report(g, false),
            transport: if pr.rdma_device.is_some() { "rdma" } else { "tcp" }.into(),
            install: if pr.minor_faults { "continue" } else { "copy" }.into(),
            memory_huge_bytes: g.huge_bytes,
            rdma: pr.rdma_device.as_ref().map(|d| {
                let get = |c: &std::sync::atomic::AtomicU64| pager::PagerMetrics::get(c);
                RdmaReport {
                    device: d.clone(),
                    demand_reads: get(&metrics.rdma_demand_reads),
                    demand_bytes: get(&metrics.rdma_demand_bytes),
                    demand_completions: get(&metrics.rdma_demand_wc),
                    background_reads: get(&metrics.rdma_bg_reads),
                    background_bytes: get(&metrics.rdma_bg_bytes),
                    background_completions: get(&metrics.rdma_bg_wc),
                    ring_slots_received: get(&metrics.rdma_ring_receives),
                    registration_ms: ms(pr.rdma_registration),
                    ..RdmaReport::default()
                }
            }),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_tolerates_missing_fields() {
        let mut h = LatencyHist::new();
        for v in [1_000, 5_000, 90_000] {
            h.record_ns(v);
        }
        let (lat, hist) = latency_of(&h);
        let r = Report {
            status: "ok".into(),
            mode: "postcopy".into(),
            mem_bytes: 1 << 30,
            postcopy: PostcopyReport { fault_latency_us: lat, fault_latency_hist: hist, ..Default::default() },
            source: Some(Box::new(Report { side: "source".into(), ..Default::default() })),
            link: LinkReport {
                name: "veth:10gbit:100us".into(),
                rate_gbit: 10.0,
                measured_rtt_us: 131.5,
                ..Default::default()
            },
            timeline_tick_ms: 10.0,
            timeline: vec![
                crate::timeline::Sample { t_ms: -3.5, pages_precopy: 7, ..Default::default() },
                crate::timeline::Sample { t_ms: 6.5, pages_present: 9, faults: 2, ..Default::default() },
            ],
            ..Default::default()
        };
        let text = serde_json::to_string(&r).unwrap();
        let back: Report = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
        let partial: Report = serde_json::from_str(r#"{"status":"failed","postcopy":{"faults":3}}"#).unwrap();
        assert_eq!(partial.postcopy.faults, 3);
        assert!(!partial.clean());
        // A report from before the heartbeat check still reads as clean.
        let old: Report = serde_json::from_str(r#"{"status":"ok","guest":{"verify_ok":true}}"#).unwrap();
        assert!(old.clean());
        let h2 = LatencyHist::from_buckets(&back.postcopy.fault_latency_hist);
        assert_eq!(h2.summary(), h.summary());
    }
}
