//! System-call injection into processes that never agreed to it (ptrace).
//!
//! DeltaFS re-points the working directories and open files of live sandbox processes onto a new filesystem
//! generation, and DeltaCR forks processes into templates: both make the *target* execute system calls. The
//! sequence, measured in `shared/reference/probes/genprobe.c` and `ptfork.c`:
//! `PTRACE_SEIZE` + `PTRACE_INTERRUPT` → wait for the event stop → save registers → for each call: point `rip`
//! at a `syscall` instruction in the target's `[vdso]`, load `rax`/arguments, set `orig_rax = -1` (so the
//! kernel does not treat the injected call as a restart of whatever the target was blocked in), single-step,
//! read `rax`, restore the saved registers → detach. Because the target is resumed from an interrupt or
//! single-step stop, a blocking call it was interrupted in (`read`, `wait4`, `poll` …) is restarted by the
//! kernel exactly as if nothing had happened.
//!
//! Signals that arrive while we hold the target are not lost: a signal-delivery-stop during injection is
//! suppressed there (its handler must not run on our injected register state) and the signal is re-sent with
//! `tgkill` after detaching.

use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use std::os::fd::OwnedFd;

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// `PTRACE_EVENT_STOP` (group-stop or `PTRACE_INTERRUPT` under `PTRACE_SEIZE`).
const PTRACE_EVENT_STOP: i32 = 128;
/// `PTRACE_EVENT_FORK`, `_VFORK`, `_CLONE`: the tracee created a process; its pid is the event message.
const PTRACE_EVENT_FORK: i32 = 1;
const PTRACE_EVENT_VFORK: i32 = 2;
const PTRACE_EVENT_CLONE: i32 = 3;
/// `SYS_clone3`.
const SYS_CLONE3: i64 = 435;

/// `struct clone_args` of `clone3(2)` (`CLONE_ARGS_SIZE_VER2`, 88 bytes).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// How [`Tracee::fork`] creates the copy.
#[derive(Debug, Clone, Default)]
pub struct ForkSpec {
    /// `clone3` flags (e.g. `CLONE_PARENT`).
    pub flags: u64,
    /// Signal the parent gets when the copy exits (0: none, and invisible to a plain `wait`). Must be 0 with
    /// `CLONE_PARENT`, where the kernel gives the copy the caller's own.
    pub exit_signal: u64,
    /// Pids to give the copy, innermost pid namespace first (`set_tid`); empty: any.
    pub set_tid: Vec<i32>,
}
/// How far below the stack pointer scratch data goes (past the 128-byte red zone, with margin).
const SCRATCH_GAP: u64 = 1024;

/// Why an injection failed.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    /// A ptrace request failed.
    #[error("ptrace {what} on {tid}: {errno}")]
    Ptrace {
        what: &'static str,
        tid: i32,
        errno: Errno,
    },
    /// The target exited (or was killed) while we held it.
    #[error("process {0} exited during injection")]
    Exited(i32),
    /// The target did not reach the expected stop in time (e.g. it is frozen by the cgroup v1 freezer).
    #[error("process {tid} did not stop ({what}) within {timeout:?}")]
    Timeout {
        tid: i32,
        what: &'static str,
        timeout: Duration,
    },
    /// No `syscall` instruction found in the target's executable mappings.
    #[error("no syscall instruction in process {0}")]
    NoSyscallInstruction(i32),
    /// Reading `/proc` or the target's memory failed.
    #[error("{what} of {tid}: {source}")]
    Io {
        what: &'static str,
        tid: i32,
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, InjectError>;

fn pt(what: &'static str, tid: Pid) -> impl FnOnce(Errno) -> InjectError {
    move |errno| {
        if errno == Errno::ESRCH {
            InjectError::Exited(tid.as_raw())
        } else {
            InjectError::Ptrace {
                what,
                tid: tid.as_raw(),
                errno,
            }
        }
    }
}

/// How long [`wait_for`] spins before it sleeps.
const SPIN: Duration = Duration::from_micros(30);

/// SIGCHLD blocked in the calling thread (so it stays pending for `sigtimedwait` instead of being discarded),
/// unblocked again on drop if it was not blocked before.
struct SigchldWait {
    set: nix::sys::signal::SigSet,
    was_blocked: bool,
}

impl SigchldWait {
    fn new() -> SigchldWait {
        let mut set = nix::sys::signal::SigSet::empty();
        set.add(Signal::SIGCHLD);
        let mut old = nix::sys::signal::SigSet::empty();
        let _ = nix::sys::signal::pthread_sigmask(
            nix::sys::signal::SigmaskHow::SIG_BLOCK,
            Some(&set),
            Some(&mut old),
        );
        SigchldWait {
            set,
            was_blocked: old.contains(Signal::SIGCHLD),
        }
    }

    /// Returns when a SIGCHLD is pending (consuming it) or after `timeout`.
    fn wait(&self, timeout: Duration) {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: sigtimedwait(2) reads the set and the timespec we own; no siginfo is requested.
        unsafe { libc::sigtimedwait(self.set.as_ref(), std::ptr::null_mut(), &ts) };
    }
}

impl Drop for SigchldWait {
    fn drop(&mut self) {
        if !self.was_blocked {
            let _ = nix::sys::signal::pthread_sigmask(
                nix::sys::signal::SigmaskHow::SIG_UNBLOCK,
                Some(&self.set),
                None,
            );
        }
    }
}

/// Waits for a state change of a traced thread, without blocking forever.
fn wait_for(tid: Pid, what: &'static str, timeout: Duration) -> Result<WaitStatus> {
    let start = Instant::now();
    let sigchld = SigchldWait::new();
    loop {
        match waitpid(tid, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) => {
                return Err(InjectError::Exited(tid.as_raw()))
            }
            Ok(st) => return Ok(st),
            Err(Errno::EINTR) => {}
            Err(Errno::ECHILD) => return Err(InjectError::Exited(tid.as_raw())),
            Err(errno) => {
                return Err(InjectError::Ptrace {
                    what: "waitpid",
                    tid: tid.as_raw(),
                    errno,
                })
            }
        }
        if start.elapsed() > timeout {
            return Err(InjectError::Timeout {
                tid: tid.as_raw(),
                what,
                timeout,
            });
        }
        // Most stops arrive within microseconds: spin that long. Then sleep until a SIGCHLD (every ptrace stop
        // sends the tracer one) or 1 ms at most: spinning longer would take a CPU from the tracee (a fork of a
        // big process), and a SIGCHLD another thread swallowed costs at most the 1 ms.
        if start.elapsed() < SPIN {
            std::thread::yield_now();
        } else {
            sigchld.wait(Duration::from_millis(1));
        }
    }
}

/// Scheduler state letter of a thread (`R`, `S`, `T`, `t` …) from `/proc/<tid>/stat`.
pub fn thread_state(tid: Pid) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{tid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Kills a process we trace and collects its exit as its tracer (its parent then reaps it, or we do if we are
/// the parent).
pub fn kill_tracee(pid: Pid) {
    let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
    let _ = waitpid(pid, Some(WaitPidFlag::__WALL));
}

/// Address of a `syscall` instruction (`0f 05`) in the process's `[vdso]`, else in any executable mapping.
/// Every thread of a process shares it, and it stays valid for the life of the process.
pub fn find_syscall_insn(pid: Pid) -> Result<u64> {
    use std::os::unix::fs::FileExt;
    let io = |what| {
        move |source| InjectError::Io {
            what,
            tid: pid.as_raw(),
            source,
        }
    };
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(io("read maps"))?;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).map_err(io("open mem"))?;
    for pass in 0..2 {
        for line in maps.lines() {
            let mut f = line.split_whitespace();
            let (Some(range), Some(perms)) = (f.next(), f.next()) else {
                continue;
            };
            let Some((s, e)) = range.split_once('-') else {
                continue;
            };
            let (Ok(start), Ok(end)) = (u64::from_str_radix(s, 16), u64::from_str_radix(e, 16))
            else {
                continue;
            };
            if start >= 0xffff_ffff_ff60_0000
                || (pass == 0 && !line.ends_with("[vdso]"))
                || !perms.contains('x')
            {
                continue;
            }
            let len = (end - start).min(8 << 20) as usize;
            let mut buf = vec![0u8; len];
            let Ok(n) = mem.read_at(&mut buf, start) else {
                continue;
            };
            if let Some(i) = buf[..n].windows(2).position(|w| w == [0x0f, 0x05]) {
                return Ok(start + i as u64);
            }
        }
    }
    Err(InjectError::NoSyscallInstruction(pid.as_raw()))
}

/// A thread held in a ptrace stop, ready to run injected system calls. Detach (or drop) to resume it exactly
/// where it was.
#[derive(Debug)]
pub struct Tracee {
    tid: Pid,
    tgid: Pid,
    saved: libc::user_regs_struct,
    syscall_insn: u64,
    timeout: Duration,
    stashed: Vec<Signal>,
    scratch_map: Option<(u64, u64)>,
    attached: bool,
    stopped: bool,
    /// It was in a group stop (SIGSTOP, ^Z) when seized.
    group_stopped: bool,
}

impl Tracee {
    /// Seizes thread `tid` (of process `tgid`) and stops it. `syscall_insn` comes from [`find_syscall_insn`].
    pub fn seize(tgid: Pid, tid: Pid, syscall_insn: u64, timeout: Duration) -> Result<Tracee> {
        let mut t = Self::attach(tgid, tid, syscall_insn, timeout)?;
        t.wait_stop()?;
        Ok(t)
    }

    /// Seizes and asks the thread to stop, without waiting for it. A thread frozen by the cgroup v1 freezer only
    /// reaches the stop after it is thawed: attach every thread while frozen, thaw, then [`Tracee::wait_stop`].
    pub fn attach(tgid: Pid, tid: Pid, syscall_insn: u64, timeout: Duration) -> Result<Tracee> {
        // Read before seizing: a seized task leaves its group stop for a ptrace stop at once.
        let group_stopped = thread_state(tid) == Some('T');
        ptrace::seize(tid, ptrace::Options::empty()).map_err(pt("seize", tid))?;
        let t = Tracee {
            tid,
            tgid,
            saved: zeroed_regs(),
            syscall_insn,
            timeout,
            stashed: Vec::new(),
            scratch_map: None,
            attached: true,
            stopped: false,
            group_stopped: false,
        };
        // Seizing a task already in group-stop (SIGSTOP) traps it by itself; an extra interrupt would leave a
        // second trap pending.
        let mut t = t;
        t.group_stopped = group_stopped;
        if !group_stopped && !matches!(thread_state(tid), Some('T' | 't')) {
            ptrace::interrupt(tid).map_err(pt("interrupt", tid))?;
        }
        Ok(t)
    }

    /// Waits until the thread is in its ptrace stop and saves its registers.
    pub fn wait_stop(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.wait_event_stop()?;
        self.saved = ptrace::getregs(self.tid).map_err(pt("getregs", self.tid))?;
        self.stopped = true;
        Ok(())
    }

    fn wait_event_stop(&mut self) -> Result<()> {
        loop {
            match wait_for(self.tid, "interrupt", self.timeout)? {
                WaitStatus::PtraceEvent(_, _, PTRACE_EVENT_STOP) => return Ok(()),
                // A signal was about to be delivered and consumed our stop request: let it be delivered (the
                // process would have got it anyway), then ask again.
                WaitStatus::Stopped(_, sig) => {
                    ptrace::cont(self.tid, sig).map_err(pt("cont", self.tid))?;
                    ptrace::interrupt(self.tid).map_err(pt("interrupt", self.tid))?;
                }
                _ => {
                    ptrace::cont(self.tid, None).map_err(pt("cont", self.tid))?;
                    ptrace::interrupt(self.tid).map_err(pt("interrupt", self.tid))?;
                }
            }
        }
    }

    /// Sets the `syscall` instruction injected calls go through (found again once the thread is stopped: a
    /// thread seized while running may have exec'd since, moving its vdso).
    pub fn set_syscall_insn(&mut self, insn: u64) {
        self.syscall_insn = insn;
    }

    /// Whether the thread was stopped by a signal (SIGSTOP, ^Z) when it was seized.
    pub fn was_group_stopped(&self) -> bool {
        self.group_stopped
    }

    /// The thread id.
    pub fn tid(&self) -> Pid {
        self.tid
    }

    /// Registers as they were when the thread stopped (and will be again when it resumes).
    pub fn saved_regs(&self) -> &libc::user_regs_struct {
        &self.saved
    }

    /// The `syscall` instruction injected calls go through.
    pub fn syscall_insn(&self) -> u64 {
        self.syscall_insn
    }

    /// Forgets the scratch page [`Tracee::write_scratch`] may have mapped, without unmapping it: for a caller that
    /// replaced the whole address space (the page is gone, and its range may hold something else now).
    pub fn forget_scratch_map(&mut self) {
        self.scratch_map = None;
    }

    /// Copies `data` into the tracee's memory at `addr` (which the caller knows to be writable and unused).
    pub fn write_scratch_at(&self, addr: u64, data: &[u8]) -> Result<()> {
        self.write_mem(addr, data)
    }

    /// Replaces the registers the thread resumes with: a process rebuilt from an image resumes with the image's.
    pub fn set_saved_regs(&mut self, regs: libc::user_regs_struct) {
        self.saved = regs;
    }

    /// The thread's extended processor state (`NT_X86_XSTATE`: x87, SSE, AVX … registers), as the kernel lays
    /// it out. Only meaningful on a CPU with the same features.
    pub fn xstate(&self) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; XSTATE_MAX];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: PTRACE_GETREGSET writes at most iov_len bytes into buf and shrinks iov_len to what it wrote.
        let r = unsafe {
            libc::ptrace(
                libc::PTRACE_GETREGSET,
                self.tid.as_raw(),
                NT_X86_XSTATE,
                &mut iov as *mut libc::iovec,
            )
        };
        if r < 0 {
            return Err(pt("getregset", self.tid)(Errno::last()));
        }
        buf.truncate(iov.iov_len);
        Ok(buf)
    }

    /// Sets the thread's extended processor state (see [`Tracee::xstate`]).
    pub fn set_xstate(&self, state: &[u8]) -> Result<()> {
        let mut buf = state.to_vec();
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: PTRACE_SETREGSET reads iov_len bytes from buf.
        let r = unsafe {
            libc::ptrace(
                libc::PTRACE_SETREGSET,
                self.tid.as_raw(),
                NT_X86_XSTATE,
                &mut iov as *mut libc::iovec,
            )
        };
        if r < 0 {
            return Err(pt("setregset", self.tid)(Errno::last()));
        }
        Ok(())
    }

    /// The thread's restartable-sequences registration (glibc registers one per thread): its area, size and
    /// signature; `None` if it has none.
    pub fn rseq(&self) -> Result<Option<Rseq>> {
        #[repr(C)]
        #[derive(Default)]
        struct Conf {
            ptr: u64,
            size: u32,
            signature: u32,
            flags: u32,
            pad: u32,
        }
        let mut c = Conf::default();
        // SAFETY: PTRACE_GET_RSEQ_CONFIGURATION writes at most `addr` (the size we pass) bytes into c.
        let r = unsafe {
            libc::ptrace(
                PTRACE_GET_RSEQ_CONFIGURATION,
                self.tid.as_raw(),
                std::mem::size_of::<Conf>(),
                &mut c as *mut Conf,
            )
        };
        if r < 0 {
            return Err(pt("get rseq configuration", self.tid)(Errno::last()));
        }
        Ok((c.ptr != 0).then_some(Rseq {
            area: c.ptr,
            size: c.size,
            signature: c.signature,
        }))
    }

    /// Makes the thread execute system call `nr` with up to six arguments; returns the raw result (`-errno` on
    /// failure, as the kernel returns it).
    pub fn syscall(&mut self, nr: i64, args: &[u64]) -> Result<i64> {
        self.syscall_noting_children(nr, args, &mut None)
    }

    /// [`Tracee::syscall`], recording the pid (in our pid namespace) of a process the call created.
    fn syscall_noting_children(
        &mut self,
        nr: i64,
        args: &[u64],
        child: &mut Option<Pid>,
    ) -> Result<i64> {
        self.start_syscall(nr, args)?;
        self.finish_syscall_noting(child)
    }

    /// Starts system call `nr` in the thread and returns at once: the thread runs it on its own CPU while we do
    /// other work (or start calls in other tracees). [`Tracee::finish_syscall`] collects the result.
    pub fn start_syscall(&mut self, nr: i64, args: &[u64]) -> Result<()> {
        self.wait_stop()?;
        let mut r = self.saved;
        r.rax = nr as u64;
        r.orig_rax = u64::MAX;
        let mut a = [0u64; 6];
        a[..args.len().min(6)].copy_from_slice(&args[..args.len().min(6)]);
        (r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9) = (a[0], a[1], a[2], a[3], a[4], a[5]);
        r.rip = self.syscall_insn;
        ptrace::setregs(self.tid, r).map_err(pt("setregs", self.tid))?;
        ptrace::step(self.tid, None).map_err(pt("singlestep", self.tid))
    }

    /// Waits for the call [`Tracee::start_syscall`] started; returns its raw result (`-errno` on failure).
    pub fn finish_syscall(&mut self) -> Result<i64> {
        self.finish_syscall_noting(&mut None)
    }

    /// [`Tracee::finish_syscall`], noting a process the call created.
    fn finish_syscall_noting(&mut self, child: &mut Option<Pid>) -> Result<i64> {
        loop {
            match wait_for(self.tid, "single-step", self.timeout)? {
                WaitStatus::Stopped(_, Signal::SIGTRAP) => break,
                WaitStatus::PtraceEvent(
                    _,
                    _,
                    PTRACE_EVENT_FORK | PTRACE_EVENT_VFORK | PTRACE_EVENT_CLONE,
                ) => {
                    let msg = ptrace::getevent(self.tid).map_err(pt("geteventmsg", self.tid))?;
                    *child = Some(Pid::from_raw(msg as i32));
                    ptrace::step(self.tid, None).map_err(pt("singlestep", self.tid))?;
                }
                WaitStatus::Stopped(_, sig) => {
                    // Keep it for after detach; delivering it now would run a handler on our register state.
                    self.stashed.push(sig);
                    ptrace::step(self.tid, None).map_err(pt("singlestep", self.tid))?;
                }
                _ => ptrace::step(self.tid, None).map_err(pt("singlestep", self.tid))?,
            }
        }
        let out = ptrace::getregs(self.tid).map_err(pt("getregs", self.tid))?;
        ptrace::setregs(self.tid, self.saved).map_err(pt("setregs", self.tid))?;
        Ok(out.rax as i64)
    }

    /// Copies `data` into the target's memory and returns its address there: below the stopped thread's stack
    /// pointer (past the red zone), or in a page mapped for the purpose when the stack has no room.
    pub fn write_scratch(&mut self, data: &[u8]) -> Result<u64> {
        let len = data.len() as u64;
        let on_stack = (self.saved.rsp.wrapping_sub(SCRATCH_GAP + len)) & !15;
        if self.write_mem(on_stack, data).is_ok() {
            return Ok(on_stack);
        }
        let need = (len + 4095) & !4095;
        if self.scratch_map.is_none_or(|(_, l)| l < need) {
            self.release_scratch_map()?;
            let addr = self.checked_syscall(
                "map scratch page",
                libc::SYS_mmap,
                &[
                    0,
                    need,
                    (libc::PROT_READ | libc::PROT_WRITE) as u64,
                    (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                    u64::MAX,
                    0,
                ],
            )?;
            self.scratch_map = Some((addr as u64, need));
        }
        let (addr, _) = self.scratch_map.unwrap_or_default();
        self.write_mem(addr, data)?;
        Ok(addr)
    }

    /// Reads `len` bytes of the tracee's memory at `addr`.
    pub fn read_mem(&self, addr: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let remote = [nix::sys::uio::RemoteIoVec {
            base: addr as usize,
            len,
        }];
        let mut local = [std::io::IoSliceMut::new(&mut buf)];
        match nix::sys::uio::process_vm_readv(self.tgid, &mut local, &remote) {
            Ok(n) if n == len => Ok(buf),
            Ok(_) => Err(InjectError::Io {
                what: "read memory",
                tid: self.tid.as_raw(),
                source: std::io::ErrorKind::UnexpectedEof.into(),
            }),
            Err(e) => Err(InjectError::Io {
                what: "read memory",
                tid: self.tid.as_raw(),
                source: e.into(),
            }),
        }
    }

    /// An injected system call's negative result (`-errno`) as an error naming `what`.
    fn failed(&self, what: &'static str, r: i64) -> Result<i64> {
        if r < 0 {
            return Err(InjectError::Io {
                what,
                tid: self.tid.as_raw(),
                source: std::io::Error::from_raw_os_error(-r as i32),
            });
        }
        Ok(r)
    }

    /// [`Tracee::syscall`], with a failing call (`-errno`) turned into an error naming `what`.
    pub fn checked_syscall(&mut self, what: &'static str, nr: i64, args: &[u64]) -> Result<i64> {
        let r = self.syscall(nr, args)?;
        self.failed(what, r)
    }

    /// Injects a call that writes two descriptors to an `int[2]` (`pipe2`, `socketpair`): `args` gets that
    /// array's address in the tracee. Returns both numbers there.
    pub fn fd_pair(
        &mut self,
        what: &'static str,
        nr: i64,
        args: impl FnOnce(u64) -> Vec<u64>,
    ) -> Result<(i32, i32)> {
        let addr = self.write_scratch(&[0u8; 8])?;
        self.checked_syscall(what, nr, &args(addr))?;
        let b = self.read_mem(addr, 8)?;
        Ok((
            i32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
            i32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        ))
    }

    /// Gives the stopped process a fresh pipe in place of its descriptor `fd` and returns the other end, ours: a
    /// copy forked into another sandbox must not share its source's session pipes. With `reads`, the process
    /// keeps the read end (its stdin) and we get the write end; otherwise the reverse. The descriptor number,
    /// and nothing else of the process, changes.
    pub fn replace_with_pipe(&mut self, fd: i32, reads: bool) -> Result<OwnedFd> {
        let tid = self.tid;
        let (rfd, wfd) = self.fd_pair("injected pipe2", libc::SYS_pipe2, |a| {
            vec![a, libc::O_CLOEXEC as u64]
        })?;
        let (keep, give) = if reads { (rfd, wfd) } else { (wfd, rfd) };
        let taken = (|| -> Result<OwnedFd> {
            self.checked_syscall(
                "injected dup3",
                libc::SYS_dup3,
                &[keep as u64, fd as u64, 0],
            )?;
            crate::pidfd::getfd(self.tgid.as_raw(), give).map_err(|source| InjectError::Io {
                what: "pidfd_getfd",
                tid: tid.as_raw(),
                source,
            })
        })();
        // Whatever happened, the temporary descriptors go.
        let _ = self.syscall(libc::SYS_close, &[keep as u64]);
        let _ = self.syscall(libc::SYS_close, &[give as u64]);
        taken
    }

    /// Gives the tracee copies of our descriptors `fds` (close-on-exec) and returns their numbers there: an
    /// injected `socketpair`, whose one end we take (`pidfd_getfd`) to send the descriptors over, and an injected
    /// `recvmsg` on the other. For objects the tracee could not open itself (a namespace it may not reach by
    /// path or pidfd).
    pub fn install_fds(&mut self, fds: &[std::os::fd::BorrowedFd<'_>]) -> Result<Vec<i32>> {
        use std::os::fd::AsRawFd;
        let tid = self.tid;
        let os = |what: &'static str| {
            move |source| InjectError::Io {
                what,
                tid: tid.as_raw(),
                source,
            }
        };
        let (theirs, ours_in_tracee) =
            self.fd_pair("injected socketpair", libc::SYS_socketpair, |a| {
                vec![
                    libc::AF_UNIX as u64,
                    (libc::SOCK_DGRAM | libc::SOCK_CLOEXEC) as u64,
                    0,
                    a,
                ]
            })?;
        let result = (|| -> Result<Vec<i32>> {
            let ours = crate::pidfd::getfd(self.tgid.as_raw(), ours_in_tracee)
                .map_err(os("pidfd_getfd"))?;
            // Our side: one byte with the descriptors attached.
            let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
            let space = std::mem::size_of_val(raw.as_slice());
            // SAFETY: CMSG_SPACE only computes a size.
            let cmsg_space = unsafe { libc::CMSG_SPACE(space as u32) } as usize;
            let mut control = vec![0u8; cmsg_space];
            let mut byte = [0u8; 1];
            let mut iov = libc::iovec {
                iov_base: byte.as_mut_ptr().cast(),
                iov_len: 1,
            };
            // SAFETY: all-zero is a valid msghdr.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = cmsg_space;
            // SAFETY: msg points at a control buffer of CMSG_SPACE(space) bytes, so the first header and its
            // data fit; we fill exactly that much.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(space as u32) as usize;
                std::ptr::copy_nonoverlapping(
                    raw.as_ptr().cast::<u8>(),
                    libc::CMSG_DATA(cmsg),
                    space,
                );
            }
            // SAFETY: msg and everything it points to live until the call returns.
            if unsafe { libc::sendmsg(ours.as_raw_fd(), &msg, 0) } != 1 {
                return Err(os("sendmsg")(std::io::Error::last_os_error()));
            }
            // Their side: a msghdr, its iovec, one byte and the control buffer in one scratch block.
            const HDR: usize = std::mem::size_of::<libc::msghdr>();
            const IOV: usize = std::mem::size_of::<libc::iovec>();
            let block_len = HDR + IOV + 8 + cmsg_space;
            let base = self.write_scratch(&vec![0u8; block_len])?;
            let iov_at = base + HDR as u64;
            let data_at = iov_at + IOV as u64;
            let control_at = data_at + 8;
            let mut block = Vec::with_capacity(block_len);
            // struct msghdr (x86-64): name, namelen (+pad), iov, iovlen, control, controllen, flags (+pad).
            block.extend_from_slice(&0u64.to_ne_bytes());
            block.extend_from_slice(&0u64.to_ne_bytes());
            block.extend_from_slice(&iov_at.to_ne_bytes());
            block.extend_from_slice(&1u64.to_ne_bytes());
            block.extend_from_slice(&control_at.to_ne_bytes());
            block.extend_from_slice(&(cmsg_space as u64).to_ne_bytes());
            block.extend_from_slice(&0u64.to_ne_bytes());
            block.extend_from_slice(&data_at.to_ne_bytes());
            block.extend_from_slice(&1u64.to_ne_bytes());
            block.resize(block_len, 0);
            self.write_mem(base, &block)?;
            self.checked_syscall(
                "injected recvmsg",
                libc::SYS_recvmsg,
                &[theirs as u64, base, libc::MSG_CMSG_CLOEXEC as u64],
            )?;
            let got = self.read_mem(control_at, cmsg_space)?;
            // struct cmsghdr: len (u64), level (i32), type (i32), then the descriptors.
            let len = u64::from_ne_bytes(got[0..8].try_into().unwrap_or_default()) as usize;
            let n = len.saturating_sub(16) / 4;
            if n != fds.len() {
                return Err(os("recvmsg")(std::io::Error::other(format!(
                    "{n} of {} descriptors arrived",
                    fds.len()
                ))));
            }
            Ok((0..n)
                .map(|i| {
                    let at = 16 + 4 * i;
                    i32::from_ne_bytes([got[at], got[at + 1], got[at + 2], got[at + 3]])
                })
                .collect())
        })();
        let _ = self.syscall(libc::SYS_close, &[theirs as u64]);
        let _ = self.syscall(libc::SYS_close, &[ours_in_tracee as u64]);
        result
    }

    fn write_mem(&self, addr: u64, data: &[u8]) -> Result<()> {
        let local = [std::io::IoSlice::new(data)];
        let remote = [nix::sys::uio::RemoteIoVec {
            base: addr as usize,
            len: data.len(),
        }];
        match nix::sys::uio::process_vm_writev(self.tgid, &local, &remote) {
            Ok(n) if n == data.len() => Ok(()),
            Ok(_) => Err(InjectError::Io {
                what: "write memory",
                tid: self.tid.as_raw(),
                source: std::io::ErrorKind::WriteZero.into(),
            }),
            Err(e) => Err(InjectError::Io {
                what: "write memory",
                tid: self.tid.as_raw(),
                source: e.into(),
            }),
        }
    }

    fn release_scratch_map(&mut self) -> Result<()> {
        if let Some((addr, len)) = self.scratch_map.take() {
            self.syscall(libc::SYS_munmap, &[addr, len])?;
        }
        Ok(())
    }

    /// `path` as a NUL-terminated string in the target's memory (for `chdir`, `openat` …).
    pub fn write_path(&mut self, path: &std::path::Path) -> Result<u64> {
        use std::os::unix::ffi::OsStrExt;
        let mut bytes = path.as_os_str().as_bytes().to_vec();
        bytes.push(0);
        self.write_scratch(&bytes)
    }

    /// Makes the process fork (an injected `clone3`) and returns the copy, held in its first stop with the
    /// registers this thread had when it stopped: a copy of the process at this instant, which resumes exactly
    /// where the process was (a blocking call it was in is restarted) once detached. Single-threaded processes
    /// only: the copy has just this thread. The copy is traced with `PTRACE_O_EXITKILL`: if we die, it dies
    /// rather than run as a duplicate.
    pub fn fork(&mut self, spec: &ForkSpec) -> Result<Tracee> {
        self.start_fork(spec)?;
        self.finish_fork()
    }

    /// Starts [`Tracee::fork`] and returns at once (the process forks on its own CPU); finish with
    /// [`Tracee::finish_fork`] before anything else is done with this tracee.
    pub fn start_fork(&mut self, spec: &ForkSpec) -> Result<()> {
        self.wait_stop()?;
        let opts = ptrace::Options::PTRACE_O_TRACECLONE
            | ptrace::Options::PTRACE_O_TRACEFORK
            | ptrace::Options::PTRACE_O_TRACEVFORK
            | ptrace::Options::PTRACE_O_EXITKILL;
        ptrace::setoptions(self.tid, opts).map_err(pt("setoptions", self.tid))?;
        let size = std::mem::size_of::<CloneArgs>();
        let mut args = CloneArgs {
            flags: spec.flags,
            exit_signal: spec.exit_signal,
            set_tid_size: spec.set_tid.len() as u64,
            ..Default::default()
        };
        // One scratch block: the arguments, then the set_tid array (its address is known once placed).
        let mut block = vec![0u8; size + 4 * spec.set_tid.len()];
        for (i, t) in spec.set_tid.iter().enumerate() {
            block[size + 4 * i..size + 4 * i + 4].copy_from_slice(&t.to_ne_bytes());
        }
        let addr = self.write_scratch(&block)?;
        if !spec.set_tid.is_empty() {
            args.set_tid = addr + size as u64;
        }
        // SAFETY: CloneArgs is repr(C) plain u64s; viewing it as bytes is sound.
        let raw =
            unsafe { std::slice::from_raw_parts((&args as *const CloneArgs).cast::<u8>(), size) };
        self.write_mem(addr, raw)?;
        self.start_syscall(SYS_CLONE3, &[addr, size as u64])
    }

    /// Collects the fork [`Tracee::start_fork`] started.
    pub fn finish_fork(&mut self) -> Result<Tracee> {
        let mut child = None;
        let r = self.finish_syscall_noting(&mut child)?;
        self.failed("injected clone3", r)?;
        let child = child.ok_or(InjectError::Ptrace {
            what: "clone3 (no fork event)",
            tid: self.tid.as_raw(),
            errno: Errno::ECHILD,
        })?;
        let mut copy = Tracee {
            tid: child,
            tgid: child,
            saved: self.saved,
            syscall_insn: self.syscall_insn,
            timeout: self.timeout,
            stashed: Vec::new(),
            // A scratch page mapped in the parent was copied too: the copy unmaps its own.
            scratch_map: self.scratch_map,
            attached: true,
            stopped: false,
            group_stopped: false,
        };
        let ready = copy
            .wait_event_stop()
            .and_then(|()| ptrace::setregs(child, self.saved).map_err(pt("setregs", child)));
        if let Err(e) = ready {
            // Never let a copy we could not set up run: it would resume with the injected call's registers.
            copy.attached = false;
            kill_tracee(child);
            return Err(e);
        }
        copy.stopped = true;
        Ok(copy)
    }

    /// Drops the tracee without touching it again (no register restore, no detach): for a thread about to be
    /// killed, which must not run a single instruction before it dies.
    pub fn forget(mut self) {
        self.attached = false;
    }

    /// The process id (thread-group leader).
    pub fn tgid(&self) -> Pid {
        self.tgid
    }

    /// Leaves the thread stopped and traced (registers restored, scratch memory released), for a tracer that
    /// keeps it, like a template that must never run. Returns what [`Tracee::adopt`] needs to take it up again.
    pub fn keep_stopped(mut self) -> Result<Held> {
        self.wait_stop()?;
        let unmapped = self.release_scratch_map();
        let restored = ptrace::setregs(self.tid, self.saved).map_err(pt("setregs", self.tid));
        self.attached = false;
        unmapped.and(restored)?;
        Ok(Held {
            tid: self.tid,
            saved: self.saved,
            syscall_insn: self.syscall_insn,
        })
    }

    /// Takes up a thread left by [`Tracee::keep_stopped`] (same tracer thread).
    pub fn adopt(held: &Held, timeout: Duration) -> Tracee {
        Tracee {
            tid: held.tid,
            tgid: held.tid,
            saved: held.saved,
            syscall_insn: held.syscall_insn,
            timeout,
            stashed: Vec::new(),
            scratch_map: None,
            attached: true,
            stopped: true,
            group_stopped: false,
        }
    }

    /// Restores the registers, lets the thread go, and re-sends signals that arrived meanwhile.
    pub fn detach(mut self) -> Result<()> {
        self.finish()
    }

    fn finish(&mut self) -> Result<()> {
        if !self.attached {
            return Ok(());
        }
        if !self.stopped {
            // Never reached its stop (e.g. it exited): nothing to restore.
            self.attached = false;
            return ptrace::detach(self.tid, None).map_err(pt("detach", self.tid));
        }
        let unmapped = self.release_scratch_map();
        let restored = ptrace::setregs(self.tid, self.saved).map_err(pt("setregs", self.tid));
        let detached = ptrace::detach(self.tid, None).map_err(pt("detach", self.tid));
        self.attached = false;
        for sig in self.stashed.drain(..) {
            // SAFETY: tgkill takes plain integers.
            unsafe {
                libc::syscall(
                    libc::SYS_tgkill,
                    self.tgid.as_raw(),
                    self.tid.as_raw(),
                    sig as i32,
                )
            };
        }
        unmapped.and(restored).and(detached)
    }
}

impl Drop for Tracee {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// A thread's `rseq(2)` registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rseq {
    /// Address of its `struct rseq`.
    pub area: u64,
    /// Its registered size.
    pub size: u32,
    /// The signature abort handlers carry.
    pub signature: u32,
}

/// `NT_X86_XSTATE` regset.
const NT_X86_XSTATE: usize = 0x202;
/// Largest xstate buffer we accept (AVX-512 needs ~2.7 KiB; AMX more).
const XSTATE_MAX: usize = 16 << 10;
/// `PTRACE_GET_RSEQ_CONFIGURATION` (Linux 5.13).
const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;

/// A single-threaded process kept in a ptrace stop by [`Tracee::keep_stopped`], with the registers it resumes with.
#[derive(Debug, Clone)]
pub struct Held {
    /// Its pid (in our pid namespace).
    pub tid: Pid,
    /// The registers it resumes with.
    pub saved: libc::user_regs_struct,
    /// A `syscall` instruction in it.
    pub syscall_insn: u64,
}

fn zeroed_regs() -> libc::user_regs_struct {
    // SAFETY: user_regs_struct is plain integers; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::process::{Child, Command, Stdio};

    const T: Duration = Duration::from_secs(5);

    fn spawn(argv: &[&str]) -> (Child, Pid) {
        let child = Command::new(argv[0])
            .args(&argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let pid = Pid::from_raw(child.id() as i32);
        // Wait until it blocks (S): injecting into a process before or inside execve is not allowed.
        let deadline = Instant::now() + T;
        while thread_state(pid) != Some('S') {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(50));
        (child, pid)
    }

    fn line(r: &mut BufReader<std::process::ChildStdout>) -> String {
        let mut s = String::new();
        r.read_line(&mut s).unwrap();
        s
    }

    #[test]
    fn injected_syscalls_run_in_the_target() {
        let (mut child, pid) = spawn(&["sleep", "30"]);
        let sc = find_syscall_insn(pid).unwrap();
        let mut t = Tracee::seize(pid, pid, sc, T).unwrap();
        assert_eq!(
            t.syscall(libc::SYS_getpid, &[]).unwrap(),
            pid.as_raw() as i64
        );
        assert_eq!(
            t.syscall(libc::SYS_close, &[999]).unwrap(),
            -(libc::EBADF as i64)
        );
        t.detach().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            child.try_wait().unwrap().is_none(),
            "still sleeping after detach"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn large_scratch_data_goes_to_a_mapped_page_that_is_unmapped_on_detach() {
        use std::os::unix::fs::FileExt;
        let (mut child, pid) = spawn(&["sleep", "30"]);
        let mut t = Tracee::seize(pid, pid, find_syscall_insn(pid).unwrap(), T).unwrap();
        let big: Vec<u8> = (0..(4 << 20)).map(|i| (i % 251) as u8).collect();
        let addr = t.write_scratch(&big).unwrap();
        assert!(
            t.scratch_map.is_some(),
            "4 MiB does not fit below the stack pointer"
        );
        let mut back = vec![0u8; big.len()];
        std::fs::File::open(format!("/proc/{pid}/mem"))
            .unwrap()
            .read_exact_at(&mut back, addr)
            .unwrap();
        assert!(back == big);
        t.detach().unwrap();
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        assert!(
            !maps.lines().any(|l| l.starts_with(&format!("{addr:x}-"))),
            "scratch page unmapped"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn chdir_into_a_shell_blocked_in_read_resumes_the_read() {
        let (mut child, pid) = spawn(&[
            "sh",
            "-c",
            "read x; /bin/pwd; read y; echo \"$x$y\"; /bin/pwd",
        ]);
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut stdin = child.stdin.take().unwrap();
        let sc = find_syscall_insn(pid).unwrap();
        let mut t = Tracee::seize(pid, pid, sc, T).unwrap();
        let p = t.write_path(std::path::Path::new("/usr/share")).unwrap();
        assert_eq!(t.syscall(libc::SYS_chdir, &[p]).unwrap(), 0);
        t.detach().unwrap();
        stdin.write_all(b"a\n").unwrap();
        assert_eq!(line(&mut out), "/usr/share\n");
        stdin.write_all(b"b\n").unwrap();
        assert_eq!(line(&mut out), "ab\n", "the interrupted read lost nothing");
        assert_eq!(line(&mut out), "/usr/share\n");
        child.wait().unwrap();
    }

    #[test]
    fn an_open_descriptor_is_repointed_to_another_file() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let f = std::fs::File::create(&a).unwrap();
        let mut child = Command::new("sh")
            .args(["-c", "read x; echo one; read y; echo two"])
            .stdin(Stdio::piped())
            .stdout(f)
            .spawn()
            .unwrap();
        let pid = Pid::from_raw(child.id() as i32);
        while thread_state(pid) != Some('S') {
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(50));
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"x\n").unwrap();
        let deadline = Instant::now() + T;
        while std::fs::read_to_string(&a).unwrap() != "one\n" {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(50));
        let mut t = Tracee::seize(pid, pid, find_syscall_insn(pid).unwrap(), T).unwrap();
        let p = t.write_path(&b).unwrap();
        let flags = (libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND | libc::O_CLOEXEC) as u64;
        let fd = t
            .syscall(libc::SYS_openat, &[libc::AT_FDCWD as u64, p, flags, 0o644])
            .unwrap();
        assert!(fd > 2, "openat: {fd}");
        assert_eq!(t.syscall(libc::SYS_dup3, &[fd as u64, 1, 0]).unwrap(), 1);
        assert_eq!(t.syscall(libc::SYS_close, &[fd as u64]).unwrap(), 0);
        t.detach().unwrap();
        stdin.write_all(b"y\n").unwrap();
        child.wait().unwrap();
        assert_eq!(std::fs::read_to_string(&a).unwrap(), "one\n");
        assert_eq!(std::fs::read_to_string(&b).unwrap(), "two\n");
    }

    #[test]
    fn signals_arriving_during_injection_are_not_lost() {
        let py = "import signal, sys\ngot = []\nsignal.signal(signal.SIGUSR1, lambda *a: got.append(1))\nprint('ready', flush=True)\nsys.stdin.readline()\nprint('got', len(got), flush=True)";
        let (mut child, pid) = spawn(&["python3", "-c", py]);
        let mut out = BufReader::new(child.stdout.take().unwrap());
        assert_eq!(line(&mut out), "ready\n");
        let mut t = Tracee::seize(pid, pid, find_syscall_insn(pid).unwrap(), T).unwrap();
        nix::sys::signal::kill(pid, Signal::SIGUSR1).unwrap();
        for _ in 0..3 {
            assert_eq!(
                t.syscall(libc::SYS_getpid, &[]).unwrap(),
                pid.as_raw() as i64
            );
        }
        t.detach().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        child.stdin.take().unwrap().write_all(b"\n").unwrap();
        assert_eq!(line(&mut out), "got 1\n");
        child.wait().unwrap();
    }

    #[test]
    fn chdir_in_one_thread_moves_every_thread() {
        let py = "import os, sys, threading\nev = threading.Event()\nts = [threading.Thread(target=ev.wait) for _ in range(3)]\n[t.start() for t in ts]\nprint('ready', flush=True)\nsys.stdin.readline()\nprint(os.getcwd(), flush=True)\nev.set()";
        let (mut child, pid) = spawn(&["python3", "-c", py]);
        let mut out = BufReader::new(child.stdout.take().unwrap());
        assert_eq!(line(&mut out), "ready\n");
        let tids: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
            .collect();
        assert!(tids.len() >= 4);
        let worker = Pid::from_raw(*tids.iter().max().unwrap());
        let mut t = Tracee::seize(pid, worker, find_syscall_insn(pid).unwrap(), T).unwrap();
        let p = t.write_path(std::path::Path::new("/usr/lib")).unwrap();
        assert_eq!(t.syscall(libc::SYS_chdir, &[p]).unwrap(), 0);
        t.detach().unwrap();
        child.stdin.take().unwrap().write_all(b"\n").unwrap();
        assert_eq!(line(&mut out), "/usr/lib\n");
        child.wait().unwrap();
    }
}
