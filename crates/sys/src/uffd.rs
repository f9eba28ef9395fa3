//! A userfaultfd that serves *missing* pages of another process (lazy restore): its faults wait until we copy
//! the page in. Made inside the process by an injected `ioctl(USERFAULTFD_IOC_NEW)` on `/dev/userfaultfd`
//! (the device lets the context handle faults the kernel takes on the process's behalf — a `read(2)` into
//! lazy memory — which an unprivileged `userfaultfd()` cannot), then taken over with `pidfd_getfd`.
//!
//! The non-cooperative events keep us right about what a missing page means: a fork hands us the child's
//! context, `MADV_DONTNEED`/`munmap`/`mremap` tell us which addresses must now read as zero or moved.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::inject::{InjectError, Tracee};

const USERFAULTFD_IOC_NEW: u64 = 0xAA00;
const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_AA01;
const UFFDIO_WAKE: libc::c_ulong = 0x8010_AA02;
const UFFDIO_COPY: libc::c_ulong = 0xC028_AA03;
const UFFDIO_ZEROPAGE: libc::c_ulong = 0xC020_AA04;
const UFFD_API: u64 = 0xAA;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
/// Fork, mremap, madvise(DONTNEED/FREE/REMOVE) and munmap events.
const FEATURES: u64 = (1 << 1) | (1 << 2) | (1 << 3) | (1 << 6);

const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_FORK: u8 = 0x13;
const EVENT_REMAP: u8 = 0x14;
const EVENT_REMOVE: u8 = 0x15;
const EVENT_UNMAP: u8 = 0x16;

/// Page size.
pub const PAGE: u64 = 4096;

/// `UFFDIO_API` on `fd` with `features` (also for the write-protect tracker, `crate::dirty`).
pub(crate) fn api(fd: &impl AsRawFd, features: u64) -> std::io::Result<()> {
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes a struct uffdio_api, which `api` is (repr(C), same layout).
    if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) } != 0 {
        return Err(err("UFFDIO_API"));
    }
    Ok(())
}

/// `UFFDIO_REGISTER` of `[start, start+len)` on `fd` in `mode` (`MISSING` = 1, `WP` = 2).
pub(crate) fn register(fd: &impl AsRawFd, start: u64, len: u64, mode: u64) -> std::io::Result<()> {
    let mut r = UffdioRegister {
        start,
        len,
        mode,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes a struct uffdio_register, which `r` is.
    if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_REGISTER, &mut r) } != 0 {
        return Err(err("UFFDIO_REGISTER"));
    }
    Ok(())
}

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    start: u64,
    len: u64,
    mode: u64,
    zeropage: i64,
}

/// `struct uffd_msg`: an event byte, padding, three 64-bit words of arguments.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct RawMsg {
    event: u8,
    _r1: u8,
    _r2: u16,
    _r3: u32,
    arg: [u64; 3],
}

/// What a userfaultfd reports.
#[derive(Debug)]
pub enum Event {
    /// A thread waits for the page at `addr` (page-aligned).
    Fault { addr: u64, write: bool },
    /// The process forked: the child's memory is served through this new context.
    Fork(Uffd),
    /// `mremap` moved `[from, from+len)` to `to`.
    Remap { from: u64, to: u64, len: u64 },
    /// `[start, end)` was dropped (`MADV_DONTNEED`, `MADV_FREE`, `MADV_REMOVE`): missing pages there read zero.
    Remove { start: u64, end: u64 },
    /// `[start, end)` was unmapped.
    Unmap { start: u64, end: u64 },
}

/// Result of copying pages in.
#[derive(Debug, PartialEq, Eq)]
pub enum Copied {
    /// All of them.
    All,
    /// The first `n` bytes; the page after them is present already.
    UpToPresent(u64),
    /// The process (its memory) is gone.
    Gone,
    /// The first `n` bytes; the layout is changing (read the pending event, then retry the rest).
    Retry(u64),
    /// The first `n` bytes; the page after them is not registered with this context.
    Unregistered(u64),
}

/// A userfaultfd context of another process's memory.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

fn err(what: &'static str) -> std::io::Error {
    let e = std::io::Error::last_os_error();
    std::io::Error::new(e.kind(), format!("{what}: {e}"))
}

impl Uffd {
    /// Makes a context for the memory of the stopped process `t` through `dev` (`/dev/userfaultfd`, opened by
    /// us) and enables the events lazy restore needs (the fork event needs `CAP_SYS_PTRACE`, which we have and
    /// the process may not). `dev_in_t` is `dev`'s number inside `t` (installed by the caller).
    pub fn new_in(t: &mut Tracee, dev_in_t: i32) -> Result<Uffd, InjectError> {
        let pid = t.tgid().as_raw();
        let r = t.checked_syscall(
            "ioctl(USERFAULTFD_IOC_NEW)",
            libc::SYS_ioctl,
            &[
                dev_in_t as u64,
                USERFAULTFD_IOC_NEW,
                (libc::O_CLOEXEC | libc::O_NONBLOCK) as u64,
            ],
        )?;
        let taken = crate::pidfd::getfd(pid, r as i32);
        let _ = t.syscall(libc::SYS_close, &[r as u64]);
        let io = |what: &'static str| {
            move |source| InjectError::Io {
                what,
                tid: pid,
                source,
            }
        };
        let u = Uffd {
            fd: taken.map_err(io("pidfd_getfd (userfaultfd)"))?,
        };
        api(&u.fd, FEATURES).map_err(io("UFFDIO_API"))?;
        Ok(u)
    }

    /// Missing pages of `[start, start+len)` (whole mappings) are ours to serve from now on.
    pub fn register(&self, start: u64, len: u64) -> std::io::Result<()> {
        register(&self.fd, start, len, UFFDIO_REGISTER_MODE_MISSING)
    }

    /// Stops serving `[start, start+len)`: missing pages there are zero-filled by the kernel again.
    pub fn unregister(&self, start: u64, len: u64) -> std::io::Result<()> {
        let mut r = UffdioRange { start, len };
        // SAFETY: UFFDIO_UNREGISTER reads a struct uffdio_range, which `r` is.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER, &mut r) } != 0 {
            return Err(err("UFFDIO_UNREGISTER"));
        }
        Ok(())
    }

    /// Wakes threads waiting on faults in `[start, start+len)` (whose pages are there already).
    pub fn wake(&self, start: u64, len: u64) -> std::io::Result<()> {
        let mut r = UffdioRange { start, len };
        // SAFETY: UFFDIO_WAKE reads a struct uffdio_range, which `r` is.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE, &mut r) } != 0 {
            return Err(err("UFFDIO_WAKE"));
        }
        Ok(())
    }

    /// Copies `len` bytes at `src` (ours) to `dst` (page-aligned, in the process), waking threads waiting there.
    ///
    /// # Safety
    /// `src..src+len` must be readable memory of ours.
    pub unsafe fn copy(&self, dst: u64, src: *const u8, len: u64) -> std::io::Result<Copied> {
        let mut c = UffdioCopy {
            dst,
            src: src as u64,
            len,
            mode: 0,
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads and writes a struct uffdio_copy and reads `len` bytes at `src` (the caller's
        // promise).
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut c) } == 0 {
            return Ok(Copied::All);
        }
        let e = std::io::Error::last_os_error();
        let done = c.copy.max(0) as u64;
        match e.raw_os_error() {
            Some(libc::EEXIST) => Ok(Copied::UpToPresent(done)),
            Some(libc::ESRCH) => Ok(Copied::Gone),
            // The layout is changing (a fork or mremap in flight): read its event, then try again.
            Some(libc::EAGAIN) => Ok(Copied::Retry(done)),
            // Not (or no longer) registered here: nothing of ours to fill.
            Some(libc::ENOENT) => Ok(Copied::Unregistered(done)),
            _ => Err(std::io::Error::new(e.kind(), format!("UFFDIO_COPY: {e}"))),
        }
    }

    /// Maps zero pages at `[start, start+len)`, waking threads waiting there; `Ok(false)` when the process is
    /// gone. A page present already is left alone.
    pub fn zeropage(&self, start: u64, len: u64) -> std::io::Result<bool> {
        let mut z = UffdioZeropage {
            start,
            len,
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE reads and writes a struct uffdio_zeropage, which `z` is.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut z) } == 0 {
            return Ok(true);
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ESRCH) => Ok(false),
            Some(libc::EEXIST) | Some(libc::ENOENT) => Ok(true),
            _ => Err(std::io::Error::new(
                e.kind(),
                format!("UFFDIO_ZEROPAGE: {e}"),
            )),
        }
    }

    /// The next event, or `None` when there is none now.
    pub fn read_event(&self) -> std::io::Result<Option<Event>> {
        let mut m = RawMsg::default();
        // SAFETY: reads at most one struct uffd_msg into `m`, which is one.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut m as *mut RawMsg).cast(),
                std::mem::size_of::<RawMsg>(),
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) => Ok(None),
                _ => Err(e),
            };
        }
        if n as usize != std::mem::size_of::<RawMsg>() {
            return Err(std::io::Error::other("short userfaultfd message"));
        }
        Ok(Some(match m.event {
            EVENT_PAGEFAULT => Event::Fault {
                addr: m.arg[1] & !(PAGE - 1),
                write: m.arg[0] & 1 != 0,
            },
            EVENT_FORK => {
                let raw = m.arg[0] as u32 as i32;
                // SAFETY: the kernel installed a new descriptor with this number in our table for us.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                Event::Fork(Uffd { fd })
            }
            EVENT_REMAP => Event::Remap {
                from: m.arg[0],
                to: m.arg[1],
                len: m.arg[2],
            },
            EVENT_REMOVE => Event::Remove {
                start: m.arg[0],
                end: m.arg[1],
            },
            EVENT_UNMAP => Event::Unmap {
                start: m.arg[0],
                end: m.arg[1],
            },
            other => {
                return Err(std::io::Error::other(format!(
                    "unknown userfaultfd event {other:#x}"
                )))
            }
        }))
    }

    /// The descriptor (to poll on).
    pub fn raw(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// A second descriptor of the same context: while any is open, the process's missing pages wait for us
    /// instead of silently reading zero.
    pub fn try_clone(&self) -> std::io::Result<Uffd> {
        Ok(Uffd {
            fd: self.fd.try_clone()?,
        })
    }
}
