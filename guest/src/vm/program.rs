//! The VM guest's program: the workload guest's memory stress in x86-64
//! machine code, run at CPL3 (this host's nested KVM emulates CPL0 about
//! 7000 times slower), assembled at boot with `iced-x86`.
//!
//! It follows the same self-checking format as the workload guest
//! ([`crate::stamp`]): per-page version table, version words at both ends of
//! each page, a tag naming the page. Every access first checks the page
//! against the table; loads require `version >= table` (another vCPU may be
//! mid-store), stores go only to the vCPU's own partition of the active
//! pages and require `version == table` before writing `version + 1` to the
//! page, then the table. x86's total store order makes "page, then table"
//! visible in that order to every other vCPU.
//!
//! Registers are the program's whole state (they migrate with the vCPU):
//!
//! ```text
//! rbx  xorshift64 state          r8   &table[data_first]
//! r9   first data page address   r10  active data pages (loads)
//! r11  own partition start       r12  own partition size (stores)
//! r13  store threshold (0..=65536 on the generator's low 16 bits)
//! r14  accesses                  r15  violations
//! rbp  stores                    rsi  clock check mask (2^k - 1)
//! rdi  control block address     rsp  unused, but a canonical address: with
//!                                     a non-canonical rsp this host's KVM
//!                                     (PVM) emulated every instruction
//!                                     (measured: 30 k accesses/s)
//! rax rcx rdx  scratch
//! ```
//!
//! Control block (one page per vCPU, see `boot.rs`): +32 console port, +40
//! last page that failed a check, +48 TSC of the last heartbeat, +56
//! heartbeat interval in TSC ticks, +64 quiesce request, +72 the page TAG.
//! Every `rsi + 1`
//! accesses the program reads the TSC; when the interval has passed it
//! writes the access count to its console port (`out dx, eax`: a
//! KVM_EXIT_IO the VMM answers at once). Before every access it checks the
//! quiesce request and, if set, reports on port + 0x40: the VMM can then
//! stop it *between* accesses (a kick stops it anywhere, even inside a store,
//! which is fine to migrate but not to verify).

use iced_x86::code_asm::{
    CodeAssembler, CodeLabel, IcedError, dword_ptr, dx, eax, edx, qword_ptr, r8, r9, r10, r11, r12, r13,
};
use iced_x86::code_asm::{r14, r14d, r15, rax, rbp, rbx, rcx, rdi, rdx, rsi};

/// Control-block field offsets.
pub const CTL_PORT: u64 = 32;
/// Last page that failed a check.
pub const CTL_BAD_PAGE: u64 = 40;
/// TSC at the last heartbeat.
pub const CTL_LAST_HB: u64 = 48;
/// Heartbeat interval in TSC ticks.
pub const CTL_HB_TICKS: u64 = 56;
/// Set by the VMM to stop the program between two accesses.
pub const CTL_QUIESCE: u64 = 64;
/// The tag mixed into page word 1 (crate::stamp::TAG).
pub const CTL_TAG: u64 = 72;
/// The program reports "stopped between accesses" on its console port plus this.
pub const QUIESCE_PORT_OFFSET: u32 = 0x40;

/// A control-block offset as an instruction displacement.
const fn disp(off: u64) -> i32 {
    assert!(off < 4096);
    #[allow(clippy::cast_possible_truncation)]
    let d = off as i32;
    d
}

/// Assemble the program for a guest whose data pages start at page
/// `data_first`, to run at guest-virtual (= physical) address `at`.
pub fn assemble(at: u64, data_first: u64) -> Result<Vec<u8>, String> {
    let data_first = i32::try_from(data_first).map_err(|_| "data pages start beyond 8 TiB".to_string())?;
    emit(at, data_first).map_err(|e| e.to_string())
}

/// For data page `rdx`: its address into rcx, its tag checked (it never
/// changes; a mismatch jumps to `viol`), its table entry into rax. The
/// caller then compares the page's versions with rax.
fn page_and_table(a: &mut CodeAssembler, data_first: i32, viol: CodeLabel) -> Result<(), IcedError> {
    a.mov(rcx, rdx)?;
    a.shl(rcx, 12)?;
    a.add(rcx, r9)?;
    a.lea(rax, qword_ptr(rdx + data_first))?;
    a.xor(rax, qword_ptr(rdi + disp(CTL_TAG)))?;
    a.cmp(qword_ptr(rcx + 8), rax)?;
    a.jne(viol)?;
    a.mov(rax, qword_ptr(r8 + rdx * 8))
}

fn emit(at: u64, data_first: i32) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut top = a.create_label();
    let mut store = a.create_label();
    let mut viol = a.create_label();
    let mut done = a.create_label();
    let mut quiesce = a.create_label();

    a.set_label(&mut top)?;
    a.cmp(qword_ptr(rdi + disp(CTL_QUIESCE)), 0)?;
    a.jne(quiesce)?;
    // xorshift64: x ^= x << 13; x ^= x >> 7; x ^= x << 17.
    for (left, n) in [(true, 13u32), (false, 7), (true, 17)] {
        a.mov(rax, rbx)?;
        if left {
            a.shl(rax, n)?;
        } else {
            a.shr(rax, n)?;
        }
        a.xor(rbx, rax)?;
    }
    // A store if the low 16 bits fall under the threshold.
    a.mov(rax, rbx)?;
    a.and(rax, 0xffff)?;
    a.cmp(rax, r13)?;
    a.jb(store)?;

    // Load: d = (x * active) >> 64, any page of the active set.
    a.mov(rax, rbx)?;
    a.mul(r10)?;
    page_and_table(&mut a, data_first, viol)?;
    a.cmp(qword_ptr(rcx), rax)?;
    a.jb(viol)?;
    a.cmp(qword_ptr(rcx + 4088), rax)?;
    a.jb(viol)?;
    a.jmp(done)?;

    // Store: d = start + (x * size) >> 64, within the own partition.
    a.set_label(&mut store)?;
    a.mov(rax, rbx)?;
    a.mul(r12)?;
    a.add(rdx, r11)?;
    page_and_table(&mut a, data_first, viol)?;
    a.cmp(qword_ptr(rcx), rax)?;
    a.jne(viol)?;
    a.cmp(qword_ptr(rcx + 4088), rax)?;
    a.jne(viol)?;
    a.inc(rax)?;
    a.mov(qword_ptr(rcx), rax)?;
    a.mov(qword_ptr(rcx + 4088), rax)?;
    a.mov(qword_ptr(r8 + rdx * 8), rax)?;
    a.inc(rbp)?;
    a.jmp(done)?;

    a.set_label(&mut viol)?;
    a.inc(r15)?;
    a.mov(qword_ptr(rdi + disp(CTL_BAD_PAGE)), rdx)?;

    a.set_label(&mut done)?;
    a.inc(r14)?;
    a.test(r14, rsi)?;
    a.jnz(top)?;
    // Every rsi + 1 accesses: has a heartbeat interval passed?
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.mov(rcx, rax)?;
    a.sub(rax, qword_ptr(rdi + disp(CTL_LAST_HB)))?;
    a.cmp(rax, qword_ptr(rdi + disp(CTL_HB_TICKS)))?;
    a.jb(top)?;
    a.mov(qword_ptr(rdi + disp(CTL_LAST_HB)), rcx)?;
    a.mov(edx, dword_ptr(rdi + disp(CTL_PORT)))?;
    a.mov(eax, r14d)?;
    a.out(dx, eax)?;
    a.jmp(top)?;

    a.set_label(&mut quiesce)?;
    a.mov(edx, dword_ptr(rdi + disp(CTL_PORT)))?;
    a.add(edx, QUIESCE_PORT_OFFSET)?;
    a.mov(eax, r14d)?;
    a.out(dx, eax)?;
    a.jmp(top)?;

    a.assemble(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assembles_small_and_position_dependent() {
        let code = assemble(0x88000, 300).unwrap();
        assert!(code.len() < 512, "{} bytes", code.len());
        // Ends with `out dx, eax; jmp top`.
        assert!(code.windows(1).any(|w| w == [0xef]));
        assert_ne!(assemble(0x88000, 300).unwrap(), assemble(0x88000, 301).unwrap());
    }
}
