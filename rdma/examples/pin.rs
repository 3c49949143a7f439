//! What registering memory costs the host, as far as this machine can
//! show it: `ibv_reg_mr` pins the pages (pin_user_pages with FOLL_LONGTERM)
//! and then has the NIC build its translation table. There is no NIC here,
//! but io_uring's fixed buffers pin through the same kernel path, so their
//! registration times the host's share: all of a guest at once, against
//! the same memory in chunks registered on demand (the first fault in a
//! chunk would wait for it).
//!
//!   cargo run --release -p rdma --example pin -- [MiB] [chunk MiB]
#![allow(unsafe_code)]

use std::time::Instant;

const IORING_REGISTER_BUFFERS: libc::c_uint = 0;
const IORING_UNREGISTER_BUFFERS: libc::c_uint = 1;

fn ring() -> i32 {
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup reads and writes a struct io_uring_params (120 bytes).
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    assert!(fd >= 0, "io_uring_setup: {}", std::io::Error::last_os_error());
    i32::try_from(fd).expect("a descriptor")
}

/// Pin `[addr, addr + len)` as one fixed buffer per `chunk` bytes; returns seconds.
fn pin(fd: i32, addr: *mut u8, len: usize, chunk: usize) -> f64 {
    let iov: Vec<libc::iovec> = (0..len / chunk)
        // SAFETY: every chunk lies inside the mapping.
        .map(|i| libc::iovec { iov_base: unsafe { addr.add(i * chunk) }.cast(), iov_len: chunk })
        .collect();
    let t = Instant::now();
    for v in &iov {
        // One registration per chunk, as on-demand registration would do.
        // SAFETY: one valid iovec; the memory stays mapped until unregistered.
        let r = unsafe {
            libc::syscall(libc::SYS_io_uring_register, fd, IORING_REGISTER_BUFFERS, v as *const libc::iovec, 1u32)
        };
        assert!(r == 0, "io_uring_register: {}", std::io::Error::last_os_error());
        if iov.len() > 1 {
            // SAFETY: unregistering what was just registered (a ring holds one set).
            let _ = unsafe {
                libc::syscall(libc::SYS_io_uring_register, fd, IORING_UNREGISTER_BUFFERS, std::ptr::null::<u8>(), 0u32)
            };
        }
    }
    let s = t.elapsed().as_secs_f64();
    // SAFETY: as above.
    let _ = unsafe {
        libc::syscall(libc::SYS_io_uring_register, fd, IORING_UNREGISTER_BUFFERS, std::ptr::null::<u8>(), 0u32)
    };
    s
}

fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>().expect("MiB"));
    let mib = args.next().unwrap_or(1024).min(1024);
    let chunk_mib = args.next().unwrap_or(64).clamp(1, mib);
    let len = mib << 20;
    // SAFETY: a fresh private anonymous mapping.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert!(addr != libc::MAP_FAILED);
    let addr = addr.cast::<u8>();
    // A guest's memory is populated: write every page first.
    for p in (0..len).step_by(4096) {
        // SAFETY: inside the mapping.
        unsafe { addr.add(p).write_volatile(1) };
    }
    let fd = ring();
    for round in 0..3 {
        let once = pin(fd, addr, len, len);
        let chunked = pin(fd, addr, len, chunk_mib << 20);
        let per_chunk = chunked / (mib / chunk_mib) as f64;
        println!(
            "round {round}: {mib} MiB at once {:.1} ms ({:.0} ms/GiB); in {chunk_mib} MiB chunks {:.1} ms total, {:.2} ms per chunk (what the first fault in a chunk would wait)",
            once * 1e3,
            once * 1e3 * 1024.0 / mib as f64,
            chunked * 1e3,
            per_chunk * 1e3
        );
    }
}
