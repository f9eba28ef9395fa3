//! A template: a stopped copy of a process at a checkpoint, from which the process is forked again on rollback.

use std::time::Duration;

use deltabox_sys::inject::{kill_tracee, ForkSpec, Held, Tracee};
use nix::unistd::Pid;

use crate::{Error, Result};

/// Identity of a process that a restored copy must get back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// Its pid in its own (innermost) pid namespace.
    pub ns_pid: i32,
    /// Whether it led its session (`sid == pid`; then `pgid == pid` too).
    pub session_leader: bool,
}

/// A process's copy, held in a ptrace stop by the thread that created it (only that thread may use it).
///
/// The copy called `setsid()` right after the fork: it must not hold its source's session or process-group id,
/// or that pid could never be freed for a same-pid restore. A restored session leader gets its session back
/// (`setsid()` with its old pid); any other process comes back as the leader of a session of its own.
#[derive(Debug)]
pub struct Template {
    held: Held,
    identity: Identity,
    timeout: Duration,
    alive: bool,
}

fn ns_ids(pid: Pid) -> Option<(i32, i32, i32)> {
    use deltabox_sys::procfs::last_field;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some((
        last_field(&status, "NSpid:")?,
        last_field(&status, "NSpgid:")?,
        last_field(&status, "NSsid:")?,
    ))
}

fn threads(pid: Pid) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn check(pid: Pid, what: &'static str, r: i64) -> Result<i64> {
    if r < 0 {
        return Err(Error::Inject(deltabox_sys::inject::InjectError::Io {
            what,
            tid: pid.as_raw(),
            source: std::io::Error::from_raw_os_error(-r as i32),
        }));
    }
    Ok(r)
}

impl Template {
    /// Forks the stopped process `tracee` into a template. With `sibling`, the template becomes a child of the
    /// process's parent (`CLONE_PARENT`, for processes whose parent is the sandbox's init); otherwise a child of
    /// the process itself with no exit signal, which a plain `wait()` there never sees.
    pub fn capture(tracee: &mut Tracee, sibling: bool) -> Result<Template> {
        Template::start_capture(tracee, sibling)?.finish(tracee)
    }

    /// Starts [`Template::capture`]: the process forks on its own CPU while the caller starts others. Finish with
    /// [`PendingCapture::finish`] on the same tracee before doing anything else with it.
    pub fn start_capture(tracee: &mut Tracee, sibling: bool) -> Result<PendingCapture> {
        let pid = tracee.tgid();
        let n = threads(pid);
        if n != 1 {
            return Err(Error::Unsupported {
                pid: pid.as_raw(),
                reason: format!(
                    "it has {n} threads and forking copies only one (multi-threaded processes are not supported yet)"
                ),
            });
        }
        let (ns_pid, _pgid, sid) = ns_ids(pid).ok_or(Error::TemplateGone(pid.as_raw()))?;
        let spec = ForkSpec {
            flags: if sibling {
                libc::CLONE_PARENT as u64
            } else {
                0
            },
            exit_signal: 0,
            set_tid: Vec::new(),
        };
        tracee.start_fork(&spec)?;
        Ok(PendingCapture {
            identity: Identity {
                ns_pid,
                session_leader: sid == ns_pid,
            },
        })
    }
}

/// A capture in flight ([`Template::start_capture`]).
#[derive(Debug)]
#[must_use = "a started capture must be finished on its tracee"]
pub struct PendingCapture {
    identity: Identity,
}

impl PendingCapture {
    /// Collects the fork and makes the copy a template.
    pub fn finish(self, tracee: &mut Tracee) -> Result<Template> {
        let pid = tracee.tgid();
        let mut copy = tracee.finish_fork()?;
        let r = copy.syscall(libc::SYS_setsid, &[]);
        let held = match r
            .map_err(Error::from)
            .and_then(|r| check(pid, "setsid in template", r))
        {
            Ok(_) => copy.keep_stopped()?,
            Err(e) => {
                kill_tracee(copy.tgid());
                return Err(e);
            }
        };
        Ok(Template {
            held,
            identity: self.identity,
            timeout: Duration::from_secs(5),
            alive: true,
        })
    }
}

impl Template {
    /// The template process's pid (in our pid namespace).
    pub fn pid(&self) -> Pid {
        self.held.tid
    }

    /// Who the restored process must be.
    pub fn identity(&self) -> Identity {
        self.identity
    }

    /// Whether the template process still exists (something in the sandbox may have killed it).
    pub fn is_alive(&mut self) -> bool {
        if self.alive {
            self.alive = matches!(
                deltabox_sys::inject::thread_state(self.held.tid),
                Some('t' | 'T')
            );
        }
        self.alive
    }

    /// Closes descriptors in the template itself: what it must not keep holding (a listening socket would keep
    /// its port taken, a pipe end would keep its peer from seeing end-of-file). Processes forked from it later
    /// find those numbers free, for the caller to re-create.
    pub fn close_fds(&mut self, fds: &[i32]) -> Result<()> {
        if fds.is_empty() {
            return Ok(());
        }
        let mut t = Tracee::adopt(&self.held, self.timeout);
        let mut result = Ok(());
        for &fd in fds {
            match t.syscall(libc::SYS_close, &[fd as u64]) {
                Ok(r) => {
                    if let Err(e) = check(self.held.tid, "close in template", r) {
                        result = Err(e);
                    }
                }
                Err(e) => {
                    result = Err(e.into());
                    break;
                }
            }
        }
        self.held = t.keep_stopped()?;
        result
    }

    /// Forks the template into a new live process, with the original's pid when `same_pid` (the old process must
    /// be dead and reaped), in the template's pid namespace and as a sibling of the template. Returns the
    /// process held in its first stop, for the caller to re-point and detach.
    pub fn spawn(&mut self, same_pid: bool) -> Result<Tracee> {
        let spawning = self.start_spawn(same_pid)?;
        self.finish_spawn(spawning)
    }

    /// Starts [`Template::spawn`]: the template forks on its own CPU while the caller does other work (starts
    /// other templates, pivots the sandbox). Finish with [`Template::finish_spawn`].
    pub fn start_spawn(&mut self, same_pid: bool) -> Result<Spawning> {
        if !self.is_alive() {
            return Err(Error::TemplateGone(self.held.tid.as_raw()));
        }
        let mut t = Tracee::adopt(&self.held, self.timeout);
        // With CLONE_PARENT the kernel requires exit_signal 0 and uses the template's own: SIGCHLD once the
        // template was re-parented (its source died), as on every rollback.
        let spec = ForkSpec {
            flags: libc::CLONE_PARENT as u64,
            exit_signal: 0,
            set_tid: if same_pid {
                vec![self.identity.ns_pid]
            } else {
                Vec::new()
            },
        };
        match t.start_fork(&spec) {
            Ok(()) => Ok(Spawning { template: Some(t) }),
            Err(e) => {
                // The template stays as it was.
                self.held = t.keep_stopped()?;
                Err(e.into())
            }
        }
    }

    /// Collects the fork [`Template::start_spawn`] started and finishes it as [`Template::spawn`] does.
    pub fn finish_spawn(&mut self, mut spawning: Spawning) -> Result<Tracee> {
        let Some(mut t) = spawning.template.take() else {
            return Err(Error::TemplateGone(self.held.tid.as_raw()));
        };
        let forked = t.finish_fork();
        // The template stays as it was, whatever happened.
        self.held = t.keep_stopped()?;
        let mut child = forked?;
        let r = child.syscall(libc::SYS_setsid, &[]);
        if let Err(e) = r
            .map_err(Error::from)
            .and_then(|r| check(child.tgid(), "setsid in restored process", r))
        {
            kill_tracee(child.tgid());
            return Err(e);
        }
        Ok(child)
    }
}

/// Namespaces a copy placed in another sandbox's namespaces joins before it runs (all but the user namespace,
/// which every branch of a sandbox shares).
const BRANCH_NAMESPACES: i32 = libc::CLONE_NEWNS
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWCGROUP;

impl Template {
    /// Forks the template into another sandbox: the pid namespace whose pid 1 the template sees as `anchor` (it
    /// must lie below the template's own: the kernel places children nowhere else), with the original pid
    /// there, and moves the copy into that init's mount, network, IPC, UTS and cgroup namespaces before it
    /// runs. The calls are injected into the template and the copy, so they run with the sandbox's own
    /// credentials (root of its user namespace); a template without them gets a clear error, and nothing is
    /// shared. The template keeps its own pid namespace for later forks. Returns the copy held in its first
    /// stop, with root and working directory at the new mount namespace's root, for the caller to re-point.
    pub fn spawn_into(&mut self, anchor: i32) -> Result<Tracee> {
        if !self.is_alive() {
            return Err(Error::TemplateGone(self.held.tid.as_raw()));
        }
        let me = self.held.tid;
        let mut t = Tracee::adopt(&self.held, self.timeout);
        let forked = (|| -> Result<Tracee> {
            let sc = |t: &mut Tracee, what: &'static str, nr: i64, args: &[u64]| -> Result<i64> {
                check(me, what, t.syscall(nr, args)?)
            };
            let target = sc(
                &mut t,
                "pidfd_open(branch init)",
                libc::SYS_pidfd_open,
                &[anchor as u64, 0],
            )?;
            let own_pid = sc(&mut t, "getpid in template", libc::SYS_getpid, &[])?;
            let own = match sc(
                &mut t,
                "pidfd_open(self)",
                libc::SYS_pidfd_open,
                &[own_pid as u64, 0],
            ) {
                Ok(fd) => fd,
                Err(e) => {
                    let _ = t.syscall(libc::SYS_close, &[target as u64]);
                    return Err(e);
                }
            };
            let close_both = |t: &mut Tracee| {
                let _ = t.syscall(libc::SYS_close, &[target as u64]);
                let _ = t.syscall(libc::SYS_close, &[own as u64]);
            };
            if let Err(e) = sc(
                &mut t,
                "setns to the branch's pid namespace",
                libc::SYS_setns,
                &[target as u64, libc::CLONE_NEWPID as u64],
            ) {
                close_both(&mut t);
                return Err(e);
            }
            let spec = ForkSpec {
                flags: libc::CLONE_PARENT as u64,
                exit_signal: 0,
                set_tid: vec![self.identity.ns_pid],
            };
            let child = t.fork(&spec);
            // Back to its own pid namespace whatever happened: once the branch's init died, every later fork
            // from a template still pointing there would fail.
            let back = sc(
                &mut t,
                "setns back to the template's pid namespace",
                libc::SYS_setns,
                &[own as u64, libc::CLONE_NEWPID as u64],
            );
            close_both(&mut t);
            let mut child = child?;
            let joined = back.and_then(|_| {
                let r = child.syscall(libc::SYS_setns, &[target as u64, BRANCH_NAMESPACES as u64]);
                // The copy inherited both descriptors.
                let _ = child.syscall(libc::SYS_close, &[target as u64]);
                let _ = child.syscall(libc::SYS_close, &[own as u64]);
                check(child.tgid(), "setns to the branch's namespaces", r?)
            });
            let sid = joined.and_then(|_| {
                check(
                    child.tgid(),
                    "setsid in branch process",
                    child.syscall(libc::SYS_setsid, &[])?,
                )
            });
            match sid {
                Ok(_) => Ok(child),
                Err(e) => {
                    let pid = child.tgid();
                    drop(child.keep_stopped());
                    kill_tracee(pid);
                    Err(e)
                }
            }
        })();
        // The template stays as it was, whatever happened.
        self.held = t.keep_stopped()?;
        forked
    }
}

/// A fork of a template in flight ([`Template::start_spawn`]). Dropped unfinished, it waits for the fork, kills
/// the copy and leaves the template stopped: a template never runs.
#[derive(Debug)]
pub struct Spawning {
    template: Option<Tracee>,
}

impl Drop for Spawning {
    fn drop(&mut self) {
        if let Some(mut t) = self.template.take() {
            if let Ok(child) = t.finish_fork() {
                let pid = child.tgid();
                drop(child.keep_stopped());
                kill_tracee(pid);
            }
            let _ = t.keep_stopped();
        }
    }
}

impl Drop for Template {
    fn drop(&mut self) {
        kill_tracee(self.held.tid);
    }
}
