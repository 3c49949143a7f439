//! The VM guest: a small KVM virtual machine (rust-vmm's `kvm-ioctls`)
//! whose vCPUs run the self-checking memory stress of [`program`] in 64-bit
//! long mode at CPL3, over the same [`GuestMemory`] regions as the workload
//! guest, so the pager and the sender cannot tell the two apart.
//!
//! * Boot: the VMM writes the boot area ([`boot`]) and the stamped pages,
//!   creates the vCPUs straight in long mode (no real-mode boot) and runs one
//!   thread per vCPU.
//! * Console: each vCPU writes its access count to its own port on a timer
//!   (the program reads the TSC); the vCPU thread answers the exit, reads the
//!   counters from the registers and records a heartbeat.
//! * Pause: a flag, then `immediate_exit` in the vCPU's `kvm_run` and a
//!   signal, so KVM_RUN returns EINTR even if the vCPU was blocked in a
//!   userfault; the thread captures its own state ([`VcpuSnapshot`]) and
//!   parks. Restore applies it to fresh vCPUs of a fresh VM in Firecracker's
//!   order.
//! * Dirty tracking: KVM's dirty log (KVM_MEM_LOG_DIRTY_PAGES on every slot,
//!   KVM_GET_DIRTY_LOG per scan, which returns and re-protects).
//! * Failures: a triple fault (the program has no IDT) ends that vCPU with a
//!   message naming the instruction, the vector and, for a page fault, CR2.
#![allow(unsafe_code)]

pub mod boot;
pub mod program;
pub mod state;

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, Msrs, kvm_dtable, kvm_msr_entry, kvm_regs, kvm_run,
};
use kvm_bindings::{kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use parking_lot::{Condvar, Mutex};
use proto::{PageBitmap, PageIdx, PageRange};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

pub use state::{VcpuSnapshot, VmConfig, VmState, VmStateError};

use crate::memory::GuestMemory;
use crate::stamp::{self, StampLayout, VerifyReport};

/// Why the VM could not boot, pause, restore or track.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A KVM call failed.
    #[error("{op} failed")]
    Kvm {
        /// Which call.
        op: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The guest or its state does not fit.
    #[error("VM guest: {0}")]
    Config(String),
    /// vCPUs did not pause in time.
    #[error("{parked} of {total} vCPUs paused within {after:?}")]
    PauseTimeout {
        /// Parked.
        parked: u32,
        /// All.
        total: u32,
        /// The limit.
        after: Duration,
    },
    /// A vCPU stopped on its own (triple fault, unexpected exit).
    #[error("vCPU failed: {0}")]
    Vcpu(String),
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

/// MSR the restore must skip: KVM_SET_MSRS rejects MSR_KVM_ASYNC_PF_INT = 0
/// on this host, and the batch stops at the first rejection.
const SKIP_MSR: u32 = 0x4b56_4d06;

const RUN: u32 = 0;
const PAUSE: u32 = 1;
const STOP: u32 = 2;

/// A vCPU's live figures, from its last heartbeat.
#[derive(Default)]
#[repr(align(64))]
struct Live {
    heartbeats: AtomicU64,
    accesses: AtomicU64,
    stores: AtomicU64,
    violations: AtomicU64,
}

struct Shared {
    control: AtomicU32,
    parked: Mutex<Vec<Option<VcpuSnapshot>>>,
    cv: Condvar,
    n_parked: AtomicU32,
    live: Vec<Live>,
    tids: Vec<AtomicU32>,
    error: Mutex<Option<String>>,
}

/// The KVM side: the VM, its memory slots, the MSRs to migrate.
struct Machine {
    vm: VmFd,
    kvm: Kvm,
    /// (slot, guest address, size, host address) per region.
    slots: Vec<(u32, u64, u64, u64)>,
    msr_index: Vec<u32>,
}

fn install_kick_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    ONCE.call_once(|| {
        // Without a handler the kick signal would kill the process.
        register_signal_handler(SIGRTMIN(), noop).expect("installing the vCPU kick handler");
    });
}

impl Machine {
    fn new(mem: &GuestMemory) -> Result<Machine, VmError> {
        let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let mut slots = Vec::new();
        for (i, (r, h)) in mem.layout().regions().iter().zip(mem.host_regions()).enumerate() {
            let slot = u32::try_from(i).expect("at most 64 regions");
            slots.push((slot, r.guest.0, r.len_bytes, h.host.0 as u64));
        }
        let m = Machine {
            vm,
            msr_index: kvm.get_msr_index_list().map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?.as_slice().to_vec(),
            kvm,
            slots,
        };
        m.set_slots(0)?;
        Ok(m)
    }

    fn set_slots(&self, flags: u32) -> Result<(), VmError> {
        for &(slot, guest_phys_addr, memory_size, userspace_addr) in &self.slots {
            let r = kvm_userspace_memory_region { slot, flags, guest_phys_addr, memory_size, userspace_addr };
            // SAFETY: the host range is one region of a GuestMemory that the
            // Vm keeps alive (Arc) for as long as the VM fd exists.
            unsafe { self.vm.set_user_memory_region(r) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    fn create_vcpu(&self, i: u32) -> Result<VcpuFd, VmError> {
        let v = self.vm.create_vcpu(u64::from(i)).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let cpuid = self.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        v.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        Ok(v)
    }

    fn snapshot(&self, v: &VcpuFd) -> Result<VcpuSnapshot, VmError> {
        let entries: Vec<kvm_msr_entry> =
            self.msr_index.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| VmError::Config(format!("MSR list: {e:?}")))?;
        let n = v.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        let msrs = msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)).collect();
        Ok(VcpuSnapshot {
            regs: v.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
            sregs: v.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
            xsave: v.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?,
            xcrs: v.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?,
            events: v.get_vcpu_events().map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?,
            mp_state: v.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?,
            debugregs: v.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?,
            msrs,
        })
    }

    fn restore(v: &VcpuFd, s: &VcpuSnapshot) -> Result<(), VmError> {
        v.set_mp_state(s.mp_state).map_err(kvm_err("KVM_SET_MP_STATE"))?;
        v.set_regs(&s.regs).map_err(kvm_err("KVM_SET_REGS"))?;
        v.set_sregs(&s.sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        // SAFETY: `kvm_xsave` is the legacy 4 KiB buffer; this host reports
        // KVM_CAP_XSAVE2 = 4096, so nothing lies beyond it.
        unsafe { v.set_xsave(&s.xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
        v.set_xcrs(&s.xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
        v.set_debug_regs(&s.debugregs).map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
        let keep: Vec<kvm_msr_entry> = s
            .msrs
            .iter()
            .filter(|(i, _)| *i != SKIP_MSR)
            .map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() })
            .collect();
        let msrs = Msrs::from_entries(&keep).map_err(|e| VmError::Config(format!("MSR list: {e:?}")))?;
        let n = v.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        if n != keep.len() {
            return Err(VmError::Config(format!("KVM_SET_MSRS refused MSR {:#x}", keep[n].index)));
        }
        v.set_vcpu_events(&s.events).map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// A running (or paused) VM guest.
pub struct Vm {
    mem: Arc<GuestMemory>,
    machine: Arc<Machine>,
    shared: Arc<Shared>,
    /// The threads return their VcpuFd: its kvm_run mapping (which a kick
    /// writes) then lives until the join, not just until the thread ends.
    threads: Vec<JoinHandle<(VcpuFd, Option<VcpuSnapshot>)>>,
    run_ptrs: Vec<usize>,
    config: VmConfig,
    stamp: StampLayout,
    /// Counters when this host started or resumed the guest.
    start: VmCounters,
}

/// Counters of the guest program.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmCounters {
    /// Accesses.
    pub accesses: u64,
    /// Stores.
    pub stores: u64,
    /// Violations.
    pub violations: u64,
    /// Heartbeats seen on the console.
    pub heartbeats: u64,
}

/// What a stopped VM reports.
#[derive(Debug)]
pub struct VmReport {
    /// Counters over the guest's life (from the vCPUs' registers).
    pub total: VmCounters,
    /// Counters since this host started or resumed it.
    pub here: VmCounters,
    /// Heartbeats per vCPU on this host.
    pub heartbeats: Vec<u64>,
    /// The final state, unless a vCPU failed.
    pub state: Option<VmState>,
    /// A vCPU's failure, if one failed.
    pub error: Option<String>,
}

fn layout_of(mem: &GuestMemory) -> Result<StampLayout, VmError> {
    let l = mem.layout();
    if l.regions().len() != 1 || l.regions()[0].guest.0 != 0 {
        return Err(VmError::Config("the VM guest uses one memory region at guest address 0".into()));
    }
    // The program stamps and strides 4 KiB units whatever the page size
    // behind them (2 MiB pages hold 512 units each).
    let s = StampLayout::new(boot::BOOT_END / 4096, l.len_bytes() / 4096, 4096);
    if s.data_first + 64 > s.n_pages {
        return Err(VmError::Config("guest memory too small for the VM guest (needs a few MiB)".into()));
    }
    Ok(s)
}

/// The boot registers of vCPU `i`.
fn boot_regs(i: u32, c: &VmConfig, s: &StampLayout) -> kvm_regs {
    let active = if c.active_pages == 0 { s.n_data() } else { c.active_pages };
    let n = u64::from(c.vcpus);
    let (lo, hi) = (active * u64::from(i) / n, active * (u64::from(i) + 1) / n);
    // A non-zero xorshift seed per vCPU.
    let mut x = c.seed ^ (u64::from(i) << 32) ^ 0x5eed_5eed_5eed_5eed;
    x = crate::rng::Rng::new(x).next_u64() | 1;
    kvm_regs {
        rip: boot::CODE,
        rflags: 0x2,
        rbx: x,
        r8: s.table_first * 4096 + s.data_first * 8,
        r9: s.data_first * 4096,
        r10: active,
        r11: lo,
        r12: hi - lo,
        r13: u64::from(c.store_threshold),
        r14: 0,
        r15: 0,
        rbp: 0,
        rsi: 1023,
        rdi: boot::ctl_block(i),
        // Not used (no stack), but canonical: see program.rs.
        rsp: boot::ctl_block(i) + 0x1000,
        ..Default::default()
    }
}

fn boot_sregs(v: &VcpuFd) -> Result<kvm_bindings::kvm_sregs, VmError> {
    let mut s = v.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let seg = |selector: u16, type_: u8, l: u8, db: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 3,
        db,
        s: 1,
        l,
        g: 1,
        ..Default::default()
    };
    s.cs = seg(boot::SEL_CODE3, 0xb, 1, 0);
    let data = seg(boot::SEL_DATA3, 0x3, 0, 1);
    (s.ds, s.es, s.fs, s.gs, s.ss) = (data, data, data, data, data);
    s.tr = kvm_segment {
        base: boot::TSS,
        limit: u32::try_from(boot::TSS_LIMIT).expect("small"),
        selector: boot::SEL_TSS,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    s.ldt = kvm_segment { type_: 2, unusable: 1, ..Default::default() };
    s.gdt = kvm_dtable { base: boot::GDT, limit: 7 * 8 - 1, ..Default::default() };
    s.idt = kvm_dtable::default();
    s.cr0 = 0x8001_0033; // PG WP NE ET MP PE
    s.cr3 = boot::PML4;
    s.cr4 = 0x620; // PAE OSFXSR OSXMMEXCPT; TSD clear: rdtsc allowed at CPL3
    s.efer = 0x500; // LME LMA
    Ok(s)
}

fn describe_shutdown(v: &VcpuFd) -> String {
    let rip = v.get_regs().map(|r| r.rip).unwrap_or(0);
    let vector = v.get_vcpu_events().map(|e| e.exception.nr).unwrap_or(0);
    let cr2 = v.get_sregs().map(|s| s.cr2).unwrap_or(0);
    if vector == 14 {
        format!("triple fault: page fault at rip {rip:#x}, address {cr2:#x}")
    } else {
        format!("triple fault: exception {vector} at rip {rip:#x}")
    }
}

fn vcpu_thread(mut v: VcpuFd, i: usize, shared: &Shared, machine: &Machine) -> (VcpuFd, Option<VcpuSnapshot>) {
    let snap = vcpu_loop(&mut v, i, shared, machine);
    (v, snap)
}

fn vcpu_loop(v: &mut VcpuFd, i: usize, shared: &Shared, machine: &Machine) -> Option<VcpuSnapshot> {
    shared.tids[i].store(u32::try_from(nix::unistd::gettid().as_raw()).unwrap_or(0), Ordering::Relaxed);
    let port = u16::try_from(boot::CONSOLE_PORT + i as u64).expect("small port");
    let quiesced = port + u16::try_from(program::QUIESCE_PORT_OFFSET).expect("small");
    let fail = |msg: String| {
        shared.error.lock().get_or_insert(format!("vCPU {i}: {msg}"));
        None
    };
    loop {
        let exit = match v.run() {
            Ok(VcpuExit::IoOut(p, _)) if p == port => None,
            Ok(VcpuExit::IoOut(p, _)) if p == quiesced => {
                // Stopped between two accesses, as asked: the final state.
                return match machine.snapshot(v) {
                    Ok(s) => Some(s),
                    Err(e) => fail(format!("capturing state: {e}")),
                };
            }
            Ok(VcpuExit::IoOut(p, _)) => Some(format!("write to unknown port {p:#x}")),
            Ok(VcpuExit::Shutdown) => Some(String::new()),
            Ok(e) => Some(format!("unexpected exit {e:?}")),
            Err(e) if e.errno() == libc::EINTR => {
                v.set_kvm_immediate_exit(0);
                match shared.control.load(Ordering::Acquire) {
                    RUN => continue,
                    ctl => {
                        let snap = match machine.snapshot(v) {
                            Ok(s) => s,
                            Err(e) => return fail(format!("capturing state: {e}")),
                        };
                        if ctl == STOP {
                            return Some(snap);
                        }
                        let mut parked = shared.parked.lock();
                        parked[i] = Some(snap);
                        shared.n_parked.fetch_add(1, Ordering::AcqRel);
                        shared.cv.notify_all();
                        while shared.control.load(Ordering::Acquire) == PAUSE {
                            shared.cv.wait(&mut parked);
                        }
                        let snap = parked[i].take();
                        shared.n_parked.fetch_sub(1, Ordering::AcqRel);
                        if shared.control.load(Ordering::Acquire) == STOP {
                            return snap;
                        }
                        continue;
                    }
                }
            }
            Err(e) => Some(format!("KVM_RUN: {e}")),
        };
        match exit {
            // A heartbeat: the counters are in the registers.
            None => {
                if let Ok(r) = v.get_regs() {
                    let l = &shared.live[i];
                    l.heartbeats.fetch_add(1, Ordering::Relaxed);
                    l.accesses.store(r.r14, Ordering::Relaxed);
                    l.stores.store(r.rbp, Ordering::Relaxed);
                    l.violations.store(r.r15, Ordering::Relaxed);
                }
            }
            Some(m) if m.is_empty() => return fail(describe_shutdown(v)),
            Some(m) => return fail(m),
        }
    }
}

impl Vm {
    /// Boot a fresh guest over `mem` (on the source).
    pub fn boot(mem: Arc<GuestMemory>, config: VmConfig) -> Result<Vm, VmError> {
        let s = layout_of(&mem)?;
        if config.active_pages > s.n_data() {
            return Err(VmError::Config(format!(
                "{} active pages, only {} data pages",
                config.active_pages,
                s.n_data()
            )));
        }
        let active = if config.active_pages == 0 { s.n_data() } else { config.active_pages };
        if active < u64::from(config.vcpus) {
            return Err(VmError::Config("fewer active pages than vCPUs".into()));
        }
        let machine = Machine::new(&mem)?;
        let v0 = machine.create_vcpu(0)?;
        let tsc_khz = v0.get_tsc_khz().map_err(kvm_err("KVM_GET_TSC_KHZ"))?;
        let ticks = u64::from(tsc_khz) * u64::from(config.heartbeat_ms.max(1));
        let image =
            boot::image(mem.layout().len_bytes(), config.vcpus, s.data_first, ticks).map_err(VmError::Config)?;
        boot::write(&mem, &image);
        stamp::initialize(&mem, s);
        let mut vcpus = vec![v0];
        for i in 1..config.vcpus {
            vcpus.push(machine.create_vcpu(i)?);
        }
        for (i, v) in vcpus.iter().enumerate() {
            let i = u32::try_from(i).expect("bounded by MAX_VCPUS");
            v.set_sregs(&boot_sregs(v)?).map_err(kvm_err("KVM_SET_SREGS"))?;
            v.set_regs(&boot_regs(i, &config, &s)).map_err(kvm_err("KVM_SET_REGS"))?;
        }
        Vm::start(mem, machine, vcpus, config, s, VmCounters::default())
    }

    /// Continue a guest from `state` over memory that holds (or will
    /// receive) its pages. The VMM does not touch guest memory here: on a
    /// destination it may still be missing.
    pub fn restore(mem: Arc<GuestMemory>, state: &VmState) -> Result<Vm, VmError> {
        let s = layout_of(&mem)?;
        if state.n_pages != s.n_pages || state.data_first != s.data_first {
            return Err(VmError::Config(format!(
                "state is for {} 4 KiB units (data from {}), memory has {} (data from {})",
                state.n_pages, state.data_first, s.n_pages, s.data_first
            )));
        }
        let machine = Machine::new(&mem)?;
        let mut vcpus = Vec::with_capacity(state.vcpus.len());
        for (i, snap) in state.vcpus.iter().enumerate() {
            let v = machine.create_vcpu(u32::try_from(i).expect("bounded by MAX_VCPUS"))?;
            Machine::restore(&v, snap)?;
            vcpus.push(v);
        }
        let start = VmCounters {
            accesses: state.total_accesses(),
            stores: state.total_stores(),
            violations: state.total_violations(),
            heartbeats: 0,
        };
        Vm::start(mem, machine, vcpus, state.config, s, start)
    }

    fn start(
        mem: Arc<GuestMemory>,
        machine: Machine,
        vcpus: Vec<VcpuFd>,
        config: VmConfig,
        stamp: StampLayout,
        start: VmCounters,
    ) -> Result<Vm, VmError> {
        install_kick_handler();
        let n = vcpus.len();
        let shared = Arc::new(Shared {
            control: AtomicU32::new(RUN),
            parked: Mutex::new(vec![None; n]),
            cv: Condvar::new(),
            n_parked: AtomicU32::new(0),
            live: (0..n).map(|_| Live::default()).collect(),
            tids: (0..n).map(|_| AtomicU32::new(0)).collect(),
            error: Mutex::new(None),
        });
        let machine = Arc::new(machine);
        let mut threads = Vec::with_capacity(n);
        let mut run_ptrs = Vec::with_capacity(n);
        for (i, mut v) in vcpus.into_iter().enumerate() {
            run_ptrs.push(std::ptr::from_mut::<kvm_run>(v.get_kvm_run()) as usize);
            let (sh, m) = (Arc::clone(&shared), Arc::clone(&machine));
            let t = std::thread::Builder::new()
                .name(format!("vcpu-{i}"))
                .spawn(move || vcpu_thread(v, i, &sh, &m))
                .map_err(|e| VmError::Config(format!("starting a vCPU thread: {e}")))?;
            threads.push(t);
        }
        Ok(Vm { mem, machine, shared, threads, run_ptrs, config, stamp, start })
    }

    fn kick_all(&self) {
        for (t, &p) in self.threads.iter().zip(&self.run_ptrs) {
            // SAFETY: `p` points at the vCPU's kvm_run mapping, alive while
            // its VcpuFd lives in the (not yet joined) thread; the byte is
            // written atomically and only read by KVM.
            let imm = unsafe { AtomicU8::from_ptr(std::ptr::addr_of_mut!((*(p as *mut kvm_run)).immediate_exit)) };
            imm.store(1, Ordering::SeqCst);
            let _ = t.kill(SIGRTMIN());
        }
    }

    /// Guest memory.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    /// Write every control block's quiesce request.
    fn set_quiesce(&self, v: u64) {
        for i in 0..self.config.vcpus {
            let gpa = boot::ctl_block(i) + program::CTL_QUIESCE;
            self.mem.word_at(gpa).store(v, Ordering::Release);
        }
    }

    /// The program's configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Thread ids of the vCPU threads (0 until a thread has started).
    pub fn vcpu_tids(&self) -> Vec<u32> {
        self.shared.tids.iter().map(|t| t.load(Ordering::Relaxed)).collect()
    }

    /// A vCPU's failure, if one failed.
    pub fn error(&self) -> Option<String> {
        self.shared.error.lock().clone()
    }

    /// Counters at the last heartbeats, over the guest's life.
    pub fn stats(&self) -> VmCounters {
        let mut c = VmCounters::default();
        for l in &self.shared.live {
            c.heartbeats += l.heartbeats.load(Ordering::Relaxed);
            c.accesses += l.accesses.load(Ordering::Relaxed);
            c.stores += l.stores.load(Ordering::Relaxed);
            c.violations += l.violations.load(Ordering::Relaxed);
        }
        c.accesses = c.accesses.max(self.start.accesses);
        c
    }

    /// Heartbeats per vCPU on this host.
    pub fn heartbeats(&self) -> Vec<u64> {
        self.shared.live.iter().map(|l| l.heartbeats.load(Ordering::Relaxed)).collect()
    }

    /// Stop every vCPU where it is and return the state; the vCPUs stay
    /// parked until [`Vm::unpause`] or [`Vm::stop`].
    pub fn pause(&self, timeout: Duration) -> Result<VmState, VmError> {
        let total = u32::try_from(self.threads.len()).expect("bounded");
        self.shared.control.store(PAUSE, Ordering::Release);
        self.kick_all();
        let deadline = Instant::now() + timeout;
        let mut parked = self.shared.parked.lock();
        while self.shared.n_parked.load(Ordering::Acquire) < total {
            if let Some(e) = self.error() {
                drop(parked);
                self.unpause();
                return Err(VmError::Vcpu(e));
            }
            if self
                .shared
                .cv
                .wait_until(&mut parked, deadline.min(Instant::now() + Duration::from_millis(5)))
                .timed_out()
                && Instant::now() >= deadline
            {
                let n = self.shared.n_parked.load(Ordering::Acquire);
                drop(parked);
                self.unpause();
                return Err(VmError::PauseTimeout { parked: n, total, after: timeout });
            }
        }
        let vcpus = parked.iter().map(|s| s.clone().expect("every vCPU parked with its state")).collect();
        Ok(VmState { config: self.config, n_pages: self.stamp.n_pages, data_first: self.stamp.data_first, vcpus })
    }

    /// Let paused vCPUs run on (a migration failed before switchover).
    pub fn unpause(&self) {
        let _p = self.shared.parked.lock();
        self.shared.control.store(RUN, Ordering::Release);
        self.shared.cv.notify_all();
    }

    /// Stop every vCPU between two accesses and report (so that memory and
    /// counters agree for verification). A vCPU that does not get there
    /// within `QUIESCE_WAIT` (blocked in a userfault whose page never comes)
    /// is kicked out wherever it is.
    pub fn stop(mut self) -> VmReport {
        const QUIESCE_WAIT: Duration = Duration::from_secs(5);
        {
            // Parked vCPUs (after a pause) run on to the next access boundary.
            let _p = self.shared.parked.lock();
            self.shared.control.store(RUN, Ordering::Release);
            self.shared.cv.notify_all();
        }
        self.set_quiesce(1);
        let deadline = Instant::now() + QUIESCE_WAIT;
        while self.threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        {
            let _p = self.shared.parked.lock();
            self.shared.control.store(STOP, Ordering::Release);
            self.shared.cv.notify_all();
        }
        self.kick_all();
        let snaps: Vec<Option<VcpuSnapshot>> =
            std::mem::take(&mut self.threads).into_iter().map(|t| t.join().ok().and_then(|(_, s)| s)).collect();
        // The state may run on elsewhere: leave no request behind.
        self.set_quiesce(0);
        let error = self.error();
        let heartbeats = self.heartbeats();
        let state = snaps.iter().all(Option::is_some).then(|| VmState {
            config: self.config,
            n_pages: self.stamp.n_pages,
            data_first: self.stamp.data_first,
            vcpus: snaps.into_iter().map(|s| s.expect("checked")).collect(),
        });
        let total = state.as_ref().map_or_else(
            || self.stats(),
            |s| VmCounters {
                accesses: s.total_accesses(),
                stores: s.total_stores(),
                violations: s.total_violations(),
                heartbeats: heartbeats.iter().sum(),
            },
        );
        let here = VmCounters {
            accesses: total.accesses.saturating_sub(self.start.accesses),
            stores: total.stores.saturating_sub(self.start.stores),
            violations: total.violations,
            heartbeats: total.heartbeats,
        };
        VmReport { total, here, heartbeats, state, error }
    }

    /// Start logging dirty pages (KVM_MEM_LOG_DIRTY_PAGES on every slot).
    pub fn start_dirty_log(&self) -> Result<(), VmError> {
        self.machine.set_slots(KVM_MEM_LOG_DIRTY_PAGES)
    }

    /// Add pages written by the vCPUs since the last call to `into`
    /// (KVM_GET_DIRTY_LOG returns and re-protects them). Writes by the VMM
    /// itself are not logged; this VMM writes guest memory only at boot.
    pub fn collect_dirty(&self, into: &mut PageBitmap) -> Result<u64, VmError> {
        let mut found = 0;
        for (i, &(slot, _, size, _)) in self.machine.slots.iter().enumerate() {
            let bits = self
                .machine
                .vm
                .get_dirty_log(slot, usize::try_from(size).expect("mapped"))
                .map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
            let first = self.mem.layout().region_pages(i).first.0;
            // One bit per 4 KiB frame, whatever the page size: a written
            // frame dirties the page that holds it.
            let shift = self.mem.page_size().shift() - 12;
            for (w, word) in bits.iter().enumerate() {
                let mut word = *word;
                while word != 0 {
                    let b = u64::from(word.trailing_zeros());
                    found += into.set_range(PageRange::new(PageIdx(first + ((w as u64 * 64 + b) >> shift)), 1));
                    word &= word - 1;
                }
            }
        }
        Ok(found)
    }

    /// Stop logging dirty pages.
    pub fn stop_dirty_log(&self) -> Result<(), VmError> {
        self.machine.set_slots(0)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            {
                let _p = self.shared.parked.lock();
                self.shared.control.store(STOP, Ordering::Release);
                self.shared.cv.notify_all();
            }
            self.kick_all();
        }
    }
}

/// Check vCPU `i`'s registers against a replay of its generator. At an
/// access boundary (`exact`) the generator is at step r14 and rbp counts
/// the stores among them. A kick can also land inside an access: after
/// part of the next xorshift step (rbx holds one of its two intermediate
/// values) or after all of it, with that access's store written or not.
/// A lost or repeated step fits none of these.
/// Where a vCPU's generator was last verified to be: after `n` accesses it
/// held `x`, and the vCPU had made `stores` stores. The next verification
/// replays only the accesses since (a guest migrated a thousand times would
/// otherwise replay its whole life every time).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GenCheckpoint {
    /// Accesses.
    pub n: u64,
    /// Generator state after them.
    pub x: u64,
    /// Stores among them.
    pub stores: u64,
}

#[cfg(test)]
fn check_position(i: u32, c: &VmConfig, s: &StampLayout, r: &kvm_regs, exact: bool) -> Result<(), String> {
    check_position_from(i, c, s, r, exact, None).map(drop)
}

/// Replay vCPU `i`'s generator from `from` (or from boot) to its `r14`
/// accesses and check `rbx`/`rbp` against it; returns the new checkpoint.
fn check_position_from(
    i: u32,
    c: &VmConfig,
    s: &StampLayout,
    r: &kvm_regs,
    exact: bool,
    from: Option<GenCheckpoint>,
) -> Result<GenCheckpoint, String> {
    let start = from.unwrap_or(GenCheckpoint { n: 0, x: boot_regs(i, c, s).rbx, stores: 0 });
    if r.r14 < start.n {
        return Err(format!("vCPU {i}: {} accesses, fewer than the {} verified before", r.r14, start.n));
    }
    let mut x = start.x;
    let mut stores = start.stores;
    let store = |x: u64| u64::from((x & 0xffff) < u64::from(c.store_threshold));
    let step = |x: u64| {
        let x1 = x ^ (x << 13);
        let x2 = x1 ^ (x1 >> 7);
        (x1, x2, x2 ^ (x2 << 17))
    };
    for _ in start.n..r.r14 {
        x = step(x).2;
        stores += store(x);
    }
    let here = GenCheckpoint { n: r.r14, x, stores };
    if r.rbx == x && r.rbp == stores {
        return Ok(here);
    }
    let (x1, x2, x3) = step(x);
    let inside = (r.rbx == x1 || r.rbx == x2) && r.rbp == stores
        || r.rbx == x3 && (r.rbp == stores || r.rbp == stores + store(x3));
    if !exact && inside {
        return Ok(here);
    }
    Err(format!(
        "vCPU {i}: rbx {:#x} rbp {} after {} accesses (violations {}, rip {:#x}) do not follow the generator ({stores} stores)",
        r.rbx, r.rbp, r.r14, r.r15, r.rip
    ))
}

/// Verify every page of a stopped VM guest whose final state is `state`: the
/// boot area against its image, the data pages and table by their stamps.
pub fn verify(mem: &GuestMemory, state: &VmState) -> Result<VerifyReport, VmError> {
    verify_from(mem, state, &[]).map(|(r, _)| r)
}

/// As [`verify`], replaying each vCPU's generator only from `from` (one
/// checkpoint per vCPU from an earlier verification of the same guest, or
/// none: from boot). Returns the report and the checkpoints to go on from.
pub fn verify_from(
    mem: &GuestMemory,
    state: &VmState,
    from: &[GenCheckpoint],
) -> Result<(VerifyReport, Vec<GenCheckpoint>), VmError> {
    let s = layout_of(mem)?;
    let mut r = stamp::verify(mem, s, state.total_stores());
    // The heartbeat interval depends on the host's TSC rate: take it from
    // memory (its value was written at boot), and check everything else.
    let hb_ticks = mem.word_at(boot::ctl_block(0) + program::CTL_HB_TICKS);
    let ticks = hb_ticks.load(Ordering::Relaxed);
    let image =
        boot::image(mem.layout().len_bytes(), state.config.vcpus, s.data_first, ticks).map_err(VmError::Config)?;
    let (ok, problems) = boot::verify(mem, &image, state.config.vcpus);
    let boot_pages = boot::BOOT_END / 4096;
    r.verified_pages += ok;
    r.bad_pages += boot_pages - ok;
    r.problems.extend(problems);
    // Each vCPU's counters follow its generator: no access was lost or
    // repeated across pauses, saves and restores (the state may have been
    // taken by a kick inside an access, hence not `exact`).
    let mut next = Vec::with_capacity(state.vcpus.len());
    for (i, v) in (0u32..).zip(&state.vcpus) {
        let from = from.get(i as usize).copied();
        match check_position_from(i, &state.config, &s, &v.regs, false, from) {
            Ok(c) => next.push(c),
            Err(e) => {
                r.problems.push(e);
                next.push(from.unwrap_or_default());
            }
        }
    }
    // Counted in 4 KiB units: say it in the memory's pages (exact when all
    // checked out).
    let units = mem.page_size().bytes() / 4096;
    r.verified_pages /= units;
    r.bad_pages = r.bad_pages.div_ceil(units);
    Ok((r, next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{MemLayout, PageSize};

    fn mem(mb: u64) -> Arc<GuestMemory> {
        Arc::new(GuestMemory::new(MemLayout::single(PageSize::Size4K, mb << 20).unwrap()).unwrap())
    }

    fn cfg(vcpus: u32, active_pages: u64) -> VmConfig {
        VmConfig { vcpus, active_pages, store_threshold: 49152, heartbeat_ms: 10, seed: 7 }
    }

    fn wait_for(vm: &Vm, what: &str, ok: impl Fn(&Vm) -> bool) {
        let t0 = Instant::now();
        while !ok(vm) {
            assert!(vm.error().is_none(), "{:?}", vm.error());
            assert!(t0.elapsed() < Duration::from_secs(20), "timed out waiting for {what}: {:?}", vm.stats());
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn boots_runs_heartbeats_and_verifies() {
        let m = mem(32);
        let vm = Vm::boot(Arc::clone(&m), cfg(2, 0)).unwrap();
        // Early accesses are slow: the first guest touch of each page is a
        // shadow-paging fault on this nested host.
        wait_for(&vm, "heartbeats", |v| v.heartbeats().iter().all(|&h| h >= 3) && v.stats().accesses > 2_000_000);
        assert_eq!(vm.vcpu_tids().iter().filter(|&&t| t != 0).count(), 2);
        let r = vm.stop();
        assert!(r.error.is_none(), "{:?}", r.error);
        assert_eq!(r.total.violations, 0);
        assert!(r.total.accesses > 2_000_000 && r.total.stores > 0, "{:?}", r.total);
        let v = verify(&m, r.state.as_ref().unwrap()).unwrap();
        assert!(v.ok(), "{:?}", v.problems);
        assert_eq!(v.verified_pages, m.layout().n_pages());
    }

    #[test]
    fn a_planted_stale_page_is_caught_by_the_guest() {
        let m = mem(16);
        let vm = Vm::boot(Arc::clone(&m), cfg(1, 16)).unwrap();
        wait_for(&vm, "stores", |v| v.stats().stores > 1000);
        let st = vm.pause(Duration::from_secs(5)).unwrap();
        let s = layout_of(&m).unwrap();
        // Roll the first active page back one version, as a stale copy would be.
        let p = s.data_first;
        let t = stamp::table_word(&m, s.table_first, p).load(Ordering::Relaxed);
        assert!(t > 1, "page {p} was written");
        m.word(PageIdx(p), 0).store(t - 1, Ordering::Relaxed);
        assert_eq!(st.total_violations(), 0);
        vm.unpause();
        wait_for(&vm, "the violation", |v| v.stats().violations > 0);
        let r = vm.stop();
        assert!(r.total.violations > 0);
    }

    #[test]
    fn save_and_restore_continue_exactly() {
        let m = mem(16);
        let c = cfg(1, 0);
        let vm = Vm::boot(Arc::clone(&m), c).unwrap();
        wait_for(&vm, "progress", |v| v.stats().accesses > 2_000_000);
        let st = vm.pause(Duration::from_secs(5)).unwrap();
        let bytes = st.encode();
        let s = layout_of(&m).unwrap();
        check_position(0, &c, &s, &st.vcpus[0].regs, false).unwrap();

        // A fresh VM over a copy of the memory as it was at the pause (the
        // first VM is dropped without running on), from the encoded state.
        let m2 = mem(16);
        for p in 0..m.layout().n_pages() {
            for w in 0..512 {
                let v = m.word(PageIdx(p), w).load(Ordering::Relaxed);
                if v != 0 {
                    m2.word(PageIdx(p), w).store(v, Ordering::Relaxed);
                }
            }
        }
        drop(vm);
        let st2 = VmState::decode(&bytes).unwrap();
        let vm2 = Vm::restore(Arc::clone(&m2), &st2).unwrap();
        wait_for(&vm2, "progress after restore", |v| v.stats().accesses > st.vcpus[0].regs.r14 + 2_000_000);
        let r2 = vm2.stop();
        let fin = r2.state.unwrap();
        let regs = fin.vcpus[0].regs;
        assert!(regs.r14 > st.vcpus[0].regs.r14);
        check_position(0, &c, &s, &regs, true).expect("continued exactly where it stopped");
        assert_eq!(regs.r15, 0);
        assert!(r2.heartbeats[0] > 0, "the console kept printing");
        let v = verify(&m2, &fin).unwrap();
        assert!(v.ok(), "{:?}", v.problems);
        // Replaying from the first pause's checkpoint agrees with replaying
        // from boot, and a checkpoint from a position the generator never
        // reached is caught.
        let (_, at_pause) = verify_from(&m, &st, &[]).unwrap();
        assert_eq!(at_pause[0].n, st.vcpus[0].regs.r14);
        let (v2, at_end) = verify_from(&m2, &fin, &at_pause).unwrap();
        assert!(v2.ok(), "{:?}", v2.problems);
        assert_eq!(at_end, verify_from(&m2, &fin, &[]).unwrap().1);
        let wrong = [GenCheckpoint { x: at_pause[0].x ^ 1, ..at_pause[0] }];
        assert!(!verify_from(&m2, &fin, &wrong).unwrap().0.ok(), "a wrong checkpoint must not pass");
        // The TSC went on from the saved value rather than restarting.
        let tsc = |s: &VcpuSnapshot| s.msrs.iter().find(|(i, _)| *i == 0x10).map(|(_, v)| *v).unwrap();
        assert!(tsc(&fin.vcpus[0]) > tsc(&st.vcpus[0]));
    }

    #[test]
    fn dirty_log_reports_what_the_program_writes() {
        let m = mem(32);
        let vm = Vm::boot(Arc::clone(&m), cfg(1, 64)).unwrap();
        let s = layout_of(&m).unwrap();
        vm.start_dirty_log().unwrap();
        let mut d = PageBitmap::new(m.layout().n_pages());
        wait_for(&vm, "stores", |v| v.stats().stores > 1_000_000);
        vm.collect_dirty(&mut d).unwrap();
        let active = PageRange::new(PageIdx(s.data_first), 64);
        let dirty: Vec<u64> = d.runs().flat_map(|r| r.first.0..r.end()).collect();
        assert!(dirty.iter().filter(|&&p| active.contains(PageIdx(p))).count() >= 60, "{dirty:?}");
        // Outside the active pages only the table and control blocks are written
        // (and the code page, read once after the VMM wrote it: a known superset).
        let ok = |p: u64| {
            active.contains(PageIdx(p))
                || (s.table_first..s.data_first).contains(&p)
                || (boot::CTL_BASE / 4096..boot::CODE.div_ceil(4096) + 1).contains(&p)
        };
        assert!(dirty.iter().all(|&p| ok(p)), "{dirty:?}");
        // Re-armed: pages written after the scan show up in the next one.
        d.clear_all();
        let s0 = vm.stats().stores;
        wait_for(&vm, "more stores", |v| v.stats().stores > s0 + 1_000_000);
        vm.collect_dirty(&mut d).unwrap();
        assert!(d.count_ones() >= 32);
        drop(vm.stop());
    }
}
