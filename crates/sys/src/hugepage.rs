//! Collapsing another process's anonymous memory into transparent huge pages (`process_madvise(MADV_COLLAPSE)`).
//!
//! Forking copies page tables: one entry per 4 KiB page, so a 1 GiB heap costs ~9 ms to fork and as much to tear
//! down. Mapped by 2 MiB pages the same heap is 512 PMD entries, and fork and exit become sub-millisecond. The
//! collapse itself copies the memory once (seconds per GiB), so it runs in the background, on ranges that are
//! densely populated (collapsing a sparse range would fill it with zeroes and waste memory).

use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;

/// `MADV_COLLAPSE` (Linux 6.1), not in every libc.
const MADV_COLLAPSE: i32 = 25;
/// PMD-sized huge page on x86-64.
pub const HUGE: u64 = 2 << 20;
const PAGE: u64 = 4096;
/// A 2 MiB range is collapsed when at least this many of its 512 pages are present.
const MIN_PRESENT: usize = 256;

/// Anonymous memory of a process, in bytes (`/proc/PID/smaps_rollup`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AnonMemory {
    /// All anonymous memory.
    pub anon: u64,
    /// The part already mapped by PMD-sized huge pages.
    pub huge: u64,
}

impl AnonMemory {
    /// Anonymous memory still mapped by small pages.
    pub fn small(&self) -> u64 {
        self.anon.saturating_sub(self.huge)
    }
}

/// Reads a process's anonymous memory totals.
pub fn anon_memory(pid: i32) -> io::Result<AnonMemory> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    Ok(AnonMemory {
        anon: crate::procfs::kb_field(&text, "Anonymous:"),
        huge: crate::procfs::kb_field(&text, "AnonHugePages:"),
    })
}

/// What a collapse did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Collapsed {
    /// Bytes now mapped by huge pages that were not before (requested ranges that succeeded).
    pub bytes: u64,
    /// Ranges the kernel refused (no huge page free, pages pinned …); they stay as they were.
    pub failed: usize,
}

/// A private, writable, anonymous mapping from `/proc/PID/smaps` that holds small pages worth collapsing.
fn candidates(pid: i32) -> io::Result<Vec<(u64, u64)>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let mut out = Vec::new();
    let mut current: Option<(u64, u64, bool)> = None;
    let mut anon = 0u64;
    let mut huge = 0u64;
    let flush = |cur: Option<(u64, u64, bool)>, anon: u64, huge: u64, out: &mut Vec<(u64, u64)>| {
        if let Some((start, end, ok)) = cur {
            let (s, e) = (start.div_ceil(HUGE) * HUGE, end / HUGE * HUGE);
            if ok && e > s && anon.saturating_sub(huge) >= HUGE {
                out.push((s, e));
            }
        }
    };
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let first = parts.next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                flush(current.take(), anon, huge, &mut out);
                let perms = parts.next().unwrap_or("");
                let _offset = parts.next();
                let dev = parts.next().unwrap_or("");
                let inode = parts.next().unwrap_or("");
                let name = parts.next().unwrap_or("");
                // Heap and anonymous mmaps only: not files, stacks, vdso, shared memory.
                let anonymous =
                    dev == "00:00" && inode == "0" && (name.is_empty() || name == "[heap]");
                let ok = anonymous && perms.starts_with("rw") && perms.ends_with('p');
                current = Some((a, b, ok));
                anon = 0;
                huge = 0;
                continue;
            }
        }
        let kb = |v: Option<&str>| v.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) * 1024;
        match first {
            "Anonymous:" => anon = kb(parts.next()),
            "AnonHugePages:" => huge = kb(parts.next()),
            // Never touch what the program asked to keep small (`MADV_NOHUGEPAGE`) or special mappings.
            "VmFlags:"
                if line
                    .split_whitespace()
                    .any(|f| matches!(f, "nh" | "io" | "pf" | "dd")) =>
            {
                if let Some(c) = current.as_mut() {
                    c.2 = false;
                }
            }
            _ => {}
        }
    }
    flush(current.take(), anon, huge, &mut out);
    Ok(out)
}

/// The 2 MiB-aligned sub-ranges of `[start, end)` whose pages are mostly present, merged into runs.
fn dense_runs(pagemap: &mut std::fs::File, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut buf = vec![0u8; (HUGE / PAGE) as usize * 8];
    let mut at = start;
    while at < end {
        pagemap.seek(SeekFrom::Start(at / PAGE * 8))?;
        pagemap.read_exact(&mut buf)?;
        let present = buf
            .chunks_exact(8)
            .filter(|e| {
                let v = u64::from_ne_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
                v >> 63 & 1 == 1
            })
            .count();
        if present >= MIN_PRESENT {
            match runs.last_mut() {
                Some(last) if last.1 == at => last.1 = at + HUGE,
                _ => runs.push((at, at + HUGE)),
            }
        }
        at += HUGE;
    }
    Ok(runs)
}

/// Collapses the densely populated anonymous memory of process `pid` into huge pages, range by range. The
/// process may keep running meanwhile (the kernel's khugepaged does the same); a process that exits midway ends
/// the work early without error.
pub fn collapse(pid: i32) -> io::Result<Collapsed> {
    // The pidfd pins the process's identity: every madvise below goes to this process even if `pid` is reused.
    let pidfd = crate::pidfd::open(pid)?;
    let mut pagemap = std::fs::File::open(format!("/proc/{pid}/pagemap"))?;
    let mut done = Collapsed::default();
    for (start, end) in candidates(pid)? {
        let runs = match dense_runs(&mut pagemap, start, end) {
            Ok(r) => r,
            // The mapping went away while we read.
            Err(_) => continue,
        };
        for (s, e) in runs {
            let iov = libc::iovec {
                iov_base: s as *mut libc::c_void,
                iov_len: (e - s) as usize,
            };
            // SAFETY: process_madvise(2) only reads the one iovec we pass (addresses in the *target's* address
            // space, never dereferenced here) and the pidfd we own.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_process_madvise,
                    pidfd.as_raw_fd(),
                    &iov as *const libc::iovec,
                    1usize,
                    MADV_COLLAPSE,
                    0u32,
                )
            };
            if r >= 0 {
                done.bytes += r as u64;
            } else {
                match io::Error::last_os_error().raw_os_error() {
                    Some(libc::ESRCH) => return Ok(done),
                    _ => done.failed += 1,
                }
            }
        }
    }
    Ok(done)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn collapses_a_dense_heap_and_leaves_a_sparse_one() {
        let len = 64 << 20;
        // SAFETY: a fresh private anonymous mapping, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: p..p+len is ours; keep the kernel from using huge pages on its own.
        unsafe { libc::madvise(p, len, libc::MADV_NOHUGEPAGE) };
        // First half dense, second half one page per 2 MiB.
        for off in (0..len).step_by(4096) {
            if off < len / 2 || off % (2 << 20) == 0 {
                // SAFETY: inside the mapping.
                unsafe { *(p as *mut u8).add(off) = 1 };
            }
        }
        let me = std::process::id() as i32;
        let before = anon_memory(me).unwrap();
        // SAFETY: same range; allow huge pages again so the collapse may act.
        unsafe { libc::madvise(p, len, libc::MADV_HUGEPAGE) };
        // khugepaged may collapse some of it on its own from here on; what it did first is not ours to do.
        let by_khugepaged = anon_memory(me).unwrap().huge.saturating_sub(before.huge);
        let done = collapse(me).unwrap();
        let after = anon_memory(me).unwrap();
        let dense = (len / 2 - (2 << 20)) as u64;
        assert!(
            done.bytes + by_khugepaged >= dense,
            "{done:?}, {by_khugepaged} by khugepaged"
        );
        assert!(after.huge >= before.huge + dense, "{before:?} {after:?}");
        // The sparse half was not filled in.
        assert!(after.anon < before.anon + (4 << 20), "{before:?} {after:?}");
        // SAFETY: still ours; the data survived the collapse.
        unsafe {
            assert_eq!(*(p as *const u8).add(4096), 1);
            assert_eq!(*(p as *const u8).add(len / 2 + (2 << 20)), 1);
            libc::munmap(p, len);
        }
    }
}
