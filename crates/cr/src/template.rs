//! A template: a stopped copy of a process at a checkpoint, from which the process is forked again on rollback.

use std::time::Duration;

use deltabox_sys::inject::{kill_tracee, ForkSpec, Held, Tracee};
use nix::unistd::Pid;

use crate::{Error, Result};

/// Identity of a process that a restored copy must get back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
            match t.checked_syscall("close in template", libc::SYS_close, &[fd as u64]) {
                Ok(_) => {}
                // The call failed: noted, the others are still closed.
                Err(e @ deltabox_sys::inject::InjectError::Io { .. }) => result = Err(e.into()),
                // The injection itself failed: stop.
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
        if let Err(e) = child.checked_syscall("setsid in restored process", libc::SYS_setsid, &[]) {
            kill_tracee(child.tgid());
            return Err(e.into());
        }
        Ok(child)
    }
}

/// Namespaces a copy placed in another sandbox joins before it runs, besides the pid namespace (all but the user
/// namespace, which every branch of a sandbox shares).
const BRANCH_NAMESPACES: [(&str, i32); 5] = [
    ("mnt", libc::CLONE_NEWNS),
    ("net", libc::CLONE_NEWNET),
    ("ipc", libc::CLONE_NEWIPC),
    ("uts", libc::CLONE_NEWUTS),
    ("cgroup", libc::CLONE_NEWCGROUP),
];

/// The namespaces of a branch sandbox, opened from its init (`/proc/<pid>/ns/…`) by the caller.
///
/// Namespace files, not a pidfd of the init: `setns` through a pidfd needs ptrace access to that process, and a
/// sandbox's init is non-dumpable on purpose (its memory is a copy of the host-side zygote's).
#[derive(Debug)]
pub struct BranchNamespaces {
    /// Its pid namespace (children of the template are placed there).
    pid: std::os::fd::OwnedFd,
    /// The others, with their `CLONE_NEW*` type.
    others: Vec<(std::os::fd::OwnedFd, i32)>,
}

impl BranchNamespaces {
    /// Opens the namespaces of process `init` (host pid).
    pub fn open(init: i32) -> Result<BranchNamespaces> {
        let open = |ns: &str| {
            std::fs::File::open(format!("/proc/{init}/ns/{ns}"))
                .map(std::os::fd::OwnedFd::from)
                .map_err(|e| Error::Branch(format!("open namespace {ns} of process {init}: {e}")))
        };
        Ok(BranchNamespaces {
            pid: open("pid")?,
            others: BRANCH_NAMESPACES
                .iter()
                .map(|&(name, ty)| Ok((open(name)?, ty)))
                .collect::<Result<_>>()?,
        })
    }
}

impl Template {
    /// Forks the template into another sandbox, whose namespaces are `ns`: into its pid namespace (it must lie
    /// below the template's own: the kernel places children nowhere else) with the original pid there, and into
    /// its mount, network, IPC, UTS and cgroup namespaces before the copy runs. The calls are injected into the
    /// template and the copy, so they run with the sandbox's own credentials (root of its user namespace); a
    /// template without them gets a clear error, and nothing is shared. The template keeps its own pid namespace
    /// for later forks.
    ///
    /// The copy must be a child of the branch's init (which reaps it and reports its exit), yet a fork's parent
    /// is the forking process or, with `CLONE_PARENT`, its parent — both outside the branch. So the template
    /// first makes an *intermediate*, `clone(CLONE_VM)` (no page tables copied), inside the branch with pid
    /// `scratch_pid` (one the branch does not use); the intermediate forks the copy and is killed, and the
    /// kernel re-parents the copy to the init of the intermediate's pid namespace: the branch's. Returns the copy
    /// held in its first stop, with root and working directory at the new mount namespace's root, for the
    /// caller to re-point.
    pub fn spawn_into(&mut self, ns: &BranchNamespaces, scratch_pid: i32) -> Result<Tracee> {
        use std::os::fd::AsFd;
        if !self.is_alive() {
            return Err(Error::TemplateGone(self.held.tid.as_raw()));
        }
        let mut t = Tracee::adopt(&self.held, self.timeout);
        let forked = (|| -> Result<Tracee> {
            let sc = |t: &mut Tracee, what: &'static str, nr: i64, args: &[u64]| -> Result<i64> {
                Ok(t.checked_syscall(what, nr, args)?)
            };
            let mut give = vec![ns.pid.as_fd()];
            give.extend(ns.others.iter().map(|(fd, _)| fd.as_fd()));
            // Their numbers in the template (and in the intermediate and the copy, which inherit them).
            let nums = t.install_fds(&give)?;
            let own_pid = sc(&mut t, "getpid in template", libc::SYS_getpid, &[]);
            let own = own_pid.and_then(|p| {
                sc(
                    &mut t,
                    "pidfd_open(self)",
                    libc::SYS_pidfd_open,
                    &[p as u64, 0],
                )
            });
            let close_all = |t: &mut Tracee, own: Option<i64>| {
                for &n in nums.iter() {
                    let _ = t.syscall(libc::SYS_close, &[n as u64]);
                }
                if let Some(o) = own {
                    let _ = t.syscall(libc::SYS_close, &[o as u64]);
                }
            };
            let own = match own {
                Ok(o) => o,
                Err(e) => {
                    close_all(&mut t, None);
                    return Err(e);
                }
            };
            if let Err(e) = sc(
                &mut t,
                "setns to the branch's pid namespace",
                libc::SYS_setns,
                &[nums[0] as u64, libc::CLONE_NEWPID as u64],
            ) {
                close_all(&mut t, Some(own));
                return Err(e);
            }
            // The intermediate shares the template's memory; with CLONE_PARENT the template's parent reaps it.
            let spec = ForkSpec {
                flags: (libc::CLONE_VM | libc::CLONE_PARENT) as u64,
                exit_signal: 0,
                set_tid: vec![scratch_pid],
            };
            let intermediate = t.fork(&spec);
            // Back to its own pid namespace whatever happened: once the branch's init died, every later fork
            // from a template still pointing there would fail.
            let back = sc(
                &mut t,
                "setns back to the template's pid namespace",
                libc::SYS_setns,
                &[own as u64, libc::CLONE_NEWPID as u64],
            );
            close_all(&mut t, Some(own));
            let mut intermediate = intermediate?;
            let child = back.and_then(|_| {
                intermediate
                    .fork(&ForkSpec {
                        flags: 0,
                        exit_signal: libc::SIGCHLD as u64,
                        set_tid: vec![self.identity.ns_pid],
                    })
                    .map_err(Error::from)
            });
            // The intermediate never runs: killed as it is (its memory is the template's; nothing to undo).
            // Collecting its exit means it has exited, so the copy now is the branch init's child.
            let ipid = intermediate.tgid();
            intermediate.forget();
            kill_tracee(ipid);
            let mut child = child?;
            let joined = (|| {
                for (i, (_, ty)) in ns.others.iter().enumerate() {
                    child.checked_syscall(
                        "setns to the branch's namespaces",
                        libc::SYS_setns,
                        &[nums[i + 1] as u64, *ty as u64],
                    )?;
                }
                Ok(())
            })();
            // The copy inherited the descriptors.
            for &n in nums.iter() {
                let _ = child.syscall(libc::SYS_close, &[n as u64]);
            }
            let _ = child.syscall(libc::SYS_close, &[own as u64]);
            let sid = joined.and_then(|_| {
                Ok(child.checked_syscall("setsid in branch process", libc::SYS_setsid, &[])?)
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

impl Template {
    /// Writes the template's durable image into directory `dir` (which must not exist; it appears complete or
    /// not at all). The template is untouched: it never runs, so the image can be taken at any time after the
    /// checkpoint.
    pub fn write_image(&mut self, dir: &std::path::Path) -> Result<crate::image::ProcessImage> {
        if !self.is_alive() {
            return Err(Error::TemplateGone(self.held.tid.as_raw()));
        }
        let mut t = Tracee::adopt(&self.held, self.timeout);
        let identity = self.identity;
        let written = crate::image::ImageDir::write(&mut t, dir, Some(identity));
        self.held = t.keep_stopped()?;
        written
    }

    /// Gives the template new pipes in place of descriptors `fds` (number, whether it reads from it) and returns
    /// the other ends: a template rebuilt from an image holds placeholders where its session pipes were, and
    /// its copies inherit these instead.
    pub fn replace_with_pipes(&mut self, fds: &[(i32, bool)]) -> Result<Vec<std::os::fd::OwnedFd>> {
        let mut t = Tracee::adopt(&self.held, self.timeout);
        let mut out = Vec::new();
        let mut result = Ok(());
        for &(fd, reads) in fds {
            match t.replace_with_pipe(fd, reads) {
                Ok(f) => out.push(f),
                Err(e) => {
                    result = Err(e.into());
                    break;
                }
            }
        }
        self.held = t.keep_stopped()?;
        result.map(|()| out)
    }

    /// Describes the template for a durable image ([`crate::image::describe`], a few injected calls) and opens
    /// its memory: the pages can then be written by anyone, off the tracer ([`crate::image::ImageDir::store`]).
    pub fn describe_image(&mut self) -> Result<(crate::image::ProcessImage, std::fs::File)> {
        if !self.is_alive() {
            return Err(Error::TemplateGone(self.held.tid.as_raw()));
        }
        let mut t = Tracee::adopt(&self.held, self.timeout);
        let described = crate::image::describe(&mut t);
        self.held = t.keep_stopped()?;
        let mut img = described?;
        img.identity = Some(self.identity);
        let mem = crate::image::open_mem(self.held.tid.as_raw())?;
        Ok((img, mem))
    }

    /// Makes descriptor `to` a duplicate of `from` in the template, for each pair (`dup2`).
    pub fn dup_fds(&mut self, pairs: &[(i32, i32)]) -> Result<()> {
        let mut t = Tracee::adopt(&self.held, self.timeout);
        let mut result = Ok(());
        for &(from, to) in pairs {
            if let Err(e) = t.checked_syscall(
                "dup3 in template",
                libc::SYS_dup3,
                &[from as u64, to as u64, 0],
            ) {
                result = Err(e.into());
                break;
            }
        }
        self.held = t.keep_stopped()?;
        result
    }

    /// Rebuilds a template from the image in `dir` inside `host` (a stopped blank process: see
    /// [`crate::restore::restore`]), which then *is* the template: stopped for good, its copies forked on
    /// rollback as from the original one.
    pub fn from_image(
        host: Tracee,
        dir: &std::path::Path,
        open: &mut crate::restore::Opener<'_>,
        given: &[(i32, std::os::fd::BorrowedFd<'_>)],
    ) -> Result<Template> {
        Template::from_image_filled(host, dir, open, given, crate::restore::Fill::Eager)
            .map(|(t, _)| t)
    }

    /// [`Template::from_image`], filling memory as `fill` says: with [`crate::restore::Fill::Lazy`], what is
    /// left to copy comes back, and the template and every copy forked from it wait on each missing page they
    /// touch until a pager serves it.
    pub fn from_image_filled(
        mut host: Tracee,
        dir: &std::path::Path,
        open: &mut crate::restore::Opener<'_>,
        given: &[(i32, std::os::fd::BorrowedFd<'_>)],
        fill: crate::restore::Fill<'_>,
    ) -> Result<(Template, Option<crate::restore::LazyMemory>)> {
        let pid = host.tgid();
        let rebuilt = crate::image::ImageDir::read(dir).and_then(|(img, pages)| {
            let identity = img.identity.ok_or_else(|| {
                Error::Image(format!(
                    "{}: not the image of a template (no identity)",
                    dir.display()
                ))
            })?;
            let lazy = crate::restore::restore(&mut host, &img, &pages, open, given, fill)?;
            Ok((identity, lazy))
        });
        let (identity, lazy) = match rebuilt {
            Ok(i) => i,
            Err(e) => {
                // Possibly half-rebuilt: it must never run.
                host.forget();
                kill_tracee(pid);
                return Err(e);
            }
        };
        let held = host.keep_stopped()?;
        Ok((
            Template {
                held,
                identity,
                timeout: Duration::from_secs(5),
                alive: true,
            },
            lazy,
        ))
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
