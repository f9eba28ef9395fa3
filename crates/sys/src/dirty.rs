//! Which pages of another process were written since a point in time: userfaultfd write protection in
//! asynchronous mode (`UFFD_FEATURE_WP_ASYNC`) plus the `PAGEMAP_SCAN` ioctl — what a stock kernel without
//! soft-dirty offers for incremental memory images. No fault is ever delivered to anyone: a write to a
//! protected page just drops the protection, and a scan lists the pages written since the previous scan and
//! protects them again, atomically.
//!
//! The userfaultfd must belong to the tracked process's memory, so it is created by an injected
//! `userfaultfd()` in the process (user-mode faults only, which needs no privilege) and taken over with
//! `pidfd_getfd`; the process keeps no descriptor of it.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};

use crate::inject::{InjectError, Tracee};

/// `_IOWR('f', 16, struct pm_scan_arg)` (`include/uapi/linux/fs.h`; not in `linux-raw-sys` yet).
const PAGEMAP_SCAN: libc::c_ulong = 0xC060_6610;
const UFFD_USER_MODE_ONLY: u64 = 1;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_REGISTER_MODE_WP: u64 = 2;
const PM_SCAN_WP_MATCHING: u64 = 1;
const PM_SCAN_CHECK_WPASYNC: u64 = 2;
const PAGE_IS_WRITTEN: u64 = 1 << 1;
const PAGE_SIZE: u64 = 4096;

#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// Why tracking failed.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// Injecting into the process failed.
    #[error(transparent)]
    Inject(#[from] InjectError),
    /// A system call or ioctl failed.
    #[error("dirty-page tracking of process {pid}: {what}: {source}")]
    Io {
        pid: i32,
        what: &'static str,
        source: std::io::Error,
    },
}

/// A range of addresses, `[start, end)`.
pub type Range = (u64, u64);

/// Tracks the pages another process writes (its private writable mappings).
#[derive(Debug)]
pub struct DirtyTracker {
    pid: i32,
    uffd: OwnedFd,
    pagemap: File,
    /// The mappings registered for write protection.
    tracked: Vec<Range>,
}

/// Private writable mappings of process `pid` (anonymous or file-backed: both get private copies when written).
fn writable_private(pid: i32) -> std::io::Result<Vec<Range>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    Ok(maps
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (range, perms) = (f.next()?, f.next()?);
            let name = f.nth(3).unwrap_or("");
            if !perms.starts_with("rw") || !perms.ends_with('p') || name == "[vsyscall]" {
                return None;
            }
            let (s, e) = range.split_once('-')?;
            Some((
                u64::from_str_radix(s, 16).ok()?,
                u64::from_str_radix(e, 16).ok()?,
            ))
        })
        .collect())
}

impl DirtyTracker {
    /// Starts tracking process `t` (held in a ptrace stop): from now on every page it writes is reported once by
    /// [`DirtyTracker::take_written`].
    pub fn start(t: &mut Tracee) -> Result<DirtyTracker, DirtyError> {
        let pid = t.tgid().as_raw();
        let io = |what: &'static str| move |source| DirtyError::Io { pid, what, source };
        let r = t.checked_syscall(
            "injected userfaultfd",
            libc::SYS_userfaultfd,
            &[(libc::O_CLOEXEC as u64) | (libc::O_NONBLOCK as u64) | UFFD_USER_MODE_ONLY],
        )?;
        let uffd = crate::pidfd::getfd(pid, r as i32);
        let _ = t.syscall(libc::SYS_close, &[r as u64]);
        let uffd = uffd.map_err(io("pidfd_getfd"))?;
        crate::uffd::api(&uffd, UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED)
            .map_err(io("UFFDIO_API (WP_ASYNC)"))?;
        let pagemap = File::open(format!("/proc/{pid}/pagemap")).map_err(io("open pagemap"))?;
        let mut tracker = DirtyTracker {
            pid,
            uffd,
            pagemap,
            tracked: Vec::new(),
        };
        tracker.track_new()?;
        Ok(tracker)
    }

    /// Registers (and write-protects) the private writable mappings not tracked yet; returns them.
    fn track_new(&mut self) -> Result<Vec<Range>, DirtyError> {
        let pid = self.pid;
        let now = writable_private(pid).map_err(|source| DirtyError::Io {
            pid,
            what: "read maps",
            source,
        })?;
        let new: Vec<Range> = now
            .iter()
            .copied()
            .filter(|r| !self.tracked.contains(r))
            .collect();
        self.tracked = now;
        let mut added = Vec::new();
        for &(start, end) in &new {
            if crate::uffd::register(&self.uffd, start, end - start, UFFDIO_REGISTER_MODE_WP)
                .is_err()
            {
                // A mapping write protection cannot apply to (or gone meanwhile): not tracked, so always
                // reported as written.
                self.tracked.retain(|r| *r != (start, end));
                added.push((start, end));
                continue;
            }
            self.scan(start, end, false)?;
            added.push((start, end));
        }
        Ok(added)
    }

    /// One `PAGEMAP_SCAN` over `[start, end)` that write-protects what it matches; with `written`, only the
    /// written pages, which it returns.
    fn scan(&self, start: u64, end: u64, written: bool) -> Result<Vec<Range>, DirtyError> {
        let mut out = Vec::new();
        let mut vec = vec![PageRegion::default(); 512];
        let mut at = start;
        while at < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                start: at,
                end,
                vec: if written { vec.as_mut_ptr() as u64 } else { 0 },
                vec_len: if written { vec.len() as u64 } else { 0 },
                category_mask: if written { PAGE_IS_WRITTEN } else { 0 },
                return_mask: if written { PAGE_IS_WRITTEN } else { 0 },
                ..Default::default()
            };
            // SAFETY: PAGEMAP_SCAN reads `arg` (a struct pm_scan_arg) and writes at most `vec_len` page_region
            // entries to `vec`, which has that many.
            let n = unsafe { libc::ioctl(self.pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
            if n < 0 {
                return Err(DirtyError::Io {
                    pid: self.pid,
                    what: "PAGEMAP_SCAN",
                    source: std::io::Error::last_os_error(),
                });
            }
            out.extend(vec[..n as usize].iter().map(|r| (r.start, r.end)));
            if arg.walk_end <= at {
                break;
            }
            at = arg.walk_end;
        }
        Ok(out)
    }

    /// The pages written since tracking started or since the previous call (page-aligned ranges, sorted), and
    /// protects them again. Mappings that appeared meanwhile are reported whole (their content is new) and
    /// tracked from now on.
    pub fn take_written(&mut self) -> Result<Vec<Range>, DirtyError> {
        let mut out = Vec::new();
        for &(start, end) in &self.tracked.clone() {
            match self.scan(start, end, true) {
                Ok(w) => out.extend(w),
                // Unmapped or changed meanwhile: re-read below, reported whole if it is still there.
                Err(_) => self.tracked.retain(|r| *r != (start, end)),
            }
        }
        out.extend(self.track_new()?);
        out.sort_unstable();
        // Adjacent ranges merge.
        let mut merged: Vec<Range> = Vec::with_capacity(out.len());
        for r in out {
            match merged.last_mut() {
                Some(last) if last.1 >= r.0 => last.1 = last.1.max(r.1),
                _ => merged.push(r),
            }
        }
        Ok(merged)
    }

    /// Bytes in `ranges`.
    pub fn bytes(ranges: &[Range]) -> u64 {
        ranges.iter().map(|(s, e)| e - s).sum::<u64>() / PAGE_SIZE * PAGE_SIZE
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use nix::unistd::Pid;

    /// A python process with a 64 MiB buffer that writes a byte at the offsets it reads from stdin.
    const WRITER: &str = "import ctypes, sys\nb = bytearray(b'x') * (64 << 20)\nprint(ctypes.addressof((ctypes.c_char * len(b)).from_buffer(b)), flush=True)\nfor l in sys.stdin:\n    for o in l.split():\n        b[int(o)] = 1\n    print('ok', flush=True)\n";

    #[test]
    fn reports_exactly_the_pages_written_since_the_last_scan() {
        let mut child = Command::new("python3")
            .args(["-c", WRITER])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut stdin = child.stdin.take().unwrap();
        let mut l = String::new();
        out.read_line(&mut l).unwrap();
        let base: u64 = l.trim().parse().unwrap();
        let pid = Pid::from_raw(child.id() as i32);
        let deadline = Instant::now() + Duration::from_secs(5);
        while crate::inject::thread_state(pid) != Some('S') {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
        let insn = crate::inject::find_syscall_insn(pid).unwrap();
        let mut t = Tracee::seize(pid, pid, insn, Duration::from_secs(5)).unwrap();
        let mut tracker = DirtyTracker::start(&mut t).unwrap();
        t.detach().unwrap();
        // Absolute page numbers of the written pages inside the buffer.
        let end = base + (64 << 20);
        let in_buffer = |ranges: &[Range]| -> Vec<u64> {
            let mut pages = Vec::new();
            for &(s, e) in ranges {
                for p in s / PAGE_SIZE..e.div_ceil(PAGE_SIZE) {
                    if p * PAGE_SIZE + PAGE_SIZE > base && p * PAGE_SIZE < end {
                        pages.push(p);
                    }
                }
            }
            pages
        };
        // Whole pages of the buffer, one byte each, in different 2 MiB ranges.
        let first = base.div_ceil(PAGE_SIZE) * PAGE_SIZE - base;
        let offs = [first, first + (1 << 20), first + (5 << 20) + 17];
        let say = |stdin: &mut std::process::ChildStdin,
                   out: &mut BufReader<std::process::ChildStdout>,
                   o: &[u64]| {
            let s: Vec<String> = o.iter().map(|v| v.to_string()).collect();
            writeln!(stdin, "{}", s.join(" ")).unwrap();
            let mut l = String::new();
            out.read_line(&mut l).unwrap();
            assert_eq!(l.trim(), "ok");
        };
        // The first scan may include pages python itself wrote around the buffer; not inside it.
        say(&mut stdin, &mut out, &offs);
        let t0 = Instant::now();
        let w = tracker.take_written().unwrap();
        let took = t0.elapsed();
        let want: Vec<u64> = offs.iter().map(|o| (base + o) / PAGE_SIZE).collect();
        assert_eq!(
            in_buffer(&w),
            want,
            "written pages of the buffer ({took:?})"
        );
        // Nothing written since: nothing reported in the buffer; the same page written again is reported again.
        say(&mut stdin, &mut out, &[]);
        assert_eq!(
            in_buffer(&tracker.take_written().unwrap()),
            Vec::<u64>::new()
        );
        say(&mut stdin, &mut out, &offs[1..2]);
        assert_eq!(
            in_buffer(&tracker.take_written().unwrap()),
            want[1..2].to_vec()
        );
        // A template is forked from the process (as a process checkpoint does): writes after it are still
        // reported, in the process that made them.
        let mut t = Tracee::seize(pid, pid, insn, Duration::from_secs(5)).unwrap();
        let copy = t
            .fork(&crate::inject::ForkSpec {
                flags: 0,
                exit_signal: 0,
                set_tid: Vec::new(),
            })
            .unwrap();
        let copy_pid = copy.tgid();
        let held = copy.keep_stopped().unwrap();
        t.detach().unwrap();
        say(&mut stdin, &mut out, &offs);
        assert_eq!(
            in_buffer(&tracker.take_written().unwrap()),
            want,
            "after a fork"
        );
        crate::inject::kill_tracee(held.tid);
        assert_eq!(held.tid, copy_pid);
        child.kill().unwrap();
        let _ = child.wait();
    }
}
