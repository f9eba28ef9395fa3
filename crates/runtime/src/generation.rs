//! Switching a running sandbox onto a new filesystem generation without stopping its processes.
//!
//! A generation is an overlay mount of a layer chain. To checkpoint, the current writable layer must become
//! read-only for good: the sandbox moves onto a new generation whose writable layer is fresh and whose lower
//! layers start with the old writable layer. Sequence (measured in `shared/reference/probes/genprobe.c`):
//!
//! 1. freeze the sandbox's cgroup;
//! 2. scan every process from the host's `/proc`: working directories and descriptors on the old generation
//!    must be re-pointed; a deleted-but-open file, a shared writable mapping, a chroot, or a process already
//!    being traced cannot be, so the switch is refused *before* anything changes, naming process, fd and path;
//! 3. `fsmount` the new generation (in the zygote's namespace; the mount fd carries over);
//! 4. `setns` into the sandbox's mount namespace for a moment (the caller is single-threaded): mount it at
//!    `/.deltabox`, move `/proc` and `/dev` onto it, `pivot_root` (which moves every root and every cwd equal to
//!    the old root), lazily detach the old root, re-cover the mountpoint, and come back;
//! 5. seize every thread of the processes to re-point, thaw (a v1-frozen task only traps after thaw), and inject
//!    `chdir` / `openat` + `lseek` + `dup3` + `close` so that they reference the same paths on the new generation;
//! 6. detach. Nothing can write through the old writable layer any more.
//!
//! A process checkpoint ([`switch_capturing`]) holds every process with ptrace alone instead of freezing (seize
//! and interrupt, again for processes that appeared meanwhile; freezing only a sandbox that keeps forking),
//! captures them all, then does 3–6 with everything still held.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use deltabox_fs::LayerStack;
use deltabox_sys::inject::{find_syscall_insn, Tracee};
use deltabox_sys::procfs;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::cgroup::Cgroup;

/// Longest a thread may take to reach its ptrace stop.
const TRAP_TIMEOUT: Duration = Duration::from_secs(5);

/// What the zygote needs to switch a sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SwitchSpec {
    /// Host pid of the sandbox's init.
    pub init_pid: i32,
    /// The sandbox's cgroup (freeze, list processes).
    pub cgroup: Cgroup,
    /// The new generation.
    pub layers: LayerStack,
    /// Host pid of the sandbox's keeper: processes it traces are templates (stopped copies living in the
    /// sandbox's cgroup), never scanned, moved or captured.
    #[serde(default)]
    pub keeper_pid: Option<i32>,
    /// The templates' host pids, when the keeper itself switches (it knows them: no `/proc` read per template).
    /// A template's pid cannot be reused while the keeper holds it: a dead tracee stays a zombie until its tracer
    /// collects it.
    #[serde(skip)]
    pub templates: Option<std::collections::HashSet<i32>>,
}

/// What a switch did, with phase timings in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SwitchReport {
    /// Freeze the cgroup.
    pub freeze_us: u64,
    /// Scan processes.
    pub scan_us: u64,
    /// fsmount + setns + move + pivot (the grandchild).
    pub mount_us: u64,
    /// Seize, thaw, inject, detach.
    pub repoint_us: u64,
    /// Hold every process and fork its template (process checkpoints only).
    #[serde(default)]
    pub capture_us: u64,
    /// Everything, as seen by the helper.
    pub total_us: u64,
    /// Processes of the sandbox, init included, templates not.
    pub processes: usize,
    /// Working directories re-pointed.
    pub cwds: usize,
    /// Descriptors re-pointed.
    pub fds: usize,
    /// Injected system calls.
    pub syscalls: usize,
    /// Processes that could not be re-pointed after the switch and were killed so that nothing writes through
    /// a frozen layer (should never happen; reported, never silent).
    pub killed: Vec<String>,
    /// What could only be re-pointed approximately (a working directory the process cannot search with its own
    /// credentials: it continues in `/`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

#[derive(Debug)]
struct ProcPlan {
    pid: i32,
    threads: Vec<i32>,
    syscall_insn: u64,
    /// (tid, path) of threads whose cwd is on the old generation and not its root.
    cwds: Vec<(i32, PathBuf)>,
    fds: Vec<procfs::OpenFile>,
}

fn us(t: Instant) -> u64 {
    t.elapsed().as_micros() as u64
}

/// The process checkpoint hook, called with each process of the sandbox (but init) held in a ptrace stop,
/// before anything changes. In two passes, so that work injected into one process (a fork) runs while the next
/// starts: `start` for every process, then `finish` for every process `start` was called for, even when a
/// later `start` failed. An error aborts the whole switch, leaving everything as it was.
pub trait CaptureHook {
    /// Starts capturing process `pid`.
    fn start(&mut self, pid: i32, t: &mut Tracee) -> Result<(), String>;
    /// Finishes what `start` began for `pid` (same tracee).
    fn finish(&mut self, pid: i32, t: &mut Tracee) -> Result<(), String>;
}

/// See [`CaptureHook`].
pub type Capture<'a> = &'a mut dyn CaptureHook;

/// Runs the whole switch. Call only in a single-threaded process (the zygote's helper): it forks and ptraces.
pub fn switch(spec: &SwitchSpec) -> Result<SwitchReport, String> {
    switch_capturing(spec, None)
}

/// [`switch`], and with `capture`, a consistent cut of the processes too: every thread of every process is held
/// (none runs between the freeze and the pivot), `capture` sees each process, and only then does the
/// filesystem switch. Multi-threaded processes are refused in that mode, naming them.
pub fn switch_capturing(
    spec: &SwitchSpec,
    capture: Option<Capture<'_>>,
) -> Result<SwitchReport, String> {
    let start = Instant::now();
    let mut rep = SwitchReport::default();
    let mut capture = capture;
    if let Some(capture) = capture.as_mut() {
        // Without the freezer when every process can be held by ptrace alone (it saves the freeze and the thaw,
        // ~0.6 ms); a sandbox that keeps forking while we seize falls back to freezing.
        if let Some(held) = hold_seized(spec, &mut rep)? {
            capture_and_pivot(spec, &mut rep, held, &mut **capture)?;
            rep.total_us = us(start);
            return Ok(rep);
        }
        rep = SwitchReport::default();
    }
    let t = Instant::now();
    spec.cgroup.freeze().map_err(|e| format!("freeze: {e}"))?;
    rep.freeze_us = us(t);
    let result = switch_frozen(spec, &mut rep, capture);
    // Thaw whatever happened (a second thaw is harmless).
    let thawed = spec.cgroup.thaw();
    result?;
    thawed.map_err(|e| format!("thaw: {e}"))?;
    rep.total_us = us(start);
    Ok(rep)
}

fn switch_frozen(
    spec: &SwitchSpec,
    rep: &mut SwitchReport,
    mut capture: Option<Capture<'_>>,
) -> Result<(), String> {
    let t = Instant::now();
    let old = procfs::mnt_id(Path::new(&format!("/proc/{}/root", spec.init_pid)))
        .map_err(|e| format!("sandbox root: {e}"))?;
    let mnt_ns = |pid: i32| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    let sandbox_ns = mnt_ns(spec.init_pid).ok_or("sandbox init is gone")?;
    let pids = spec.cgroup.pids();
    let mut plans = Vec::new();
    for pid in pids {
        if spec.is_template(pid) {
            continue;
        }
        rep.processes += 1;
        // pivot_root moves only the sandbox's own mount namespace: a process in a nested one would keep writing
        // into the layer being frozen.
        if mnt_ns(pid).is_some_and(|ns| ns != sandbox_ns) {
            return Err(format!(
                "process {pid} ({}) is in a mount namespace of its own (unshare -m): DeltaFS cannot move it to the \
                 new generation",
                comm(pid)
            ));
        }
        if capture.is_some() && pid == spec.init_pid {
            continue;
        }
        match scan(pid, old, capture.is_some(), None) {
            Ok(Some(p)) => {
                if capture.is_some() && p.threads.len() > 1 {
                    return Err(multi_threaded(pid, p.threads.len()));
                }
                plans.push(p)
            }
            Ok(None) => {}
            Err(ScanError::Gone) => {}
            Err(ScanError::Refuse(msg)) => return Err(msg),
        }
    }
    rep.scan_us = us(t);

    if let Some(capture) = capture.as_mut() {
        return switch_held(spec, rep, plans, &mut **capture);
    }

    let t = Instant::now();
    mount_and_pivot(spec)?;
    rep.mount_us = us(t);

    let t = Instant::now();
    // Stop every thread of every process to re-point (so none writes through a descriptor mid-swap), thaw, and
    // fix them.
    let mut held: Vec<(ProcPlan, Vec<Tracee>)> = Vec::new();
    for plan in plans {
        match attach_all(&plan) {
            Ok(tracees) => held.push((plan, tracees)),
            Err(e) => kill(
                plan.pid,
                &format!("pid {}: cannot seize: {e}", plan.pid),
                rep,
            ),
        }
    }
    spec.cgroup.thaw().map_err(|e| format!("thaw: {e}"))?;
    repoint_all(held, rep);
    rep.repoint_us = us(t);
    Ok(())
}

impl SwitchSpec {
    /// Whether `pid` is one of the keeper's templates (stopped copies living in the sandbox's cgroup).
    fn is_template(&self, pid: i32) -> bool {
        match &self.templates {
            Some(set) => set.contains(&pid),
            None => self.keeper_pid.is_some_and(|k| traced_by(pid, k)),
        }
    }
}

/// Why a process checkpoint refuses a multi-threaded process.
fn multi_threaded(pid: i32, threads: usize) -> String {
    format!(
        "process {pid} ({}) has {threads} threads: process checkpoints support single-threaded processes only \
         (checkpoint files only instead)",
        comm(pid)
    )
}

/// Whether process `pid` is traced by `tracer` (a keeper's template).
pub fn traced_by(pid: i32, tracer: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("TracerPid:"))
                .and_then(|v| v.trim().parse::<i32>().ok())
        })
        == Some(tracer)
}

/// Mounts `spec.layers` and pivots the sandbox onto it.
pub(crate) fn mount_and_pivot(spec: &SwitchSpec) -> Result<(), String> {
    Prepared::mount(spec)?.pivot()
}

/// A new generation mounted (detached, invisible) and ready for the sandbox to pivot onto: the part of a switch
/// that needs no process of the sandbox stopped, so a rollback does it while the old processes die.
pub(crate) struct Prepared {
    mnt: OwnedFd,
    ns: std::fs::File,
}

impl Prepared {
    /// Mounts `spec.layers`.
    pub(crate) fn mount(spec: &SwitchSpec) -> Result<Prepared, String> {
        let mnt = spec
            .layers
            .fsmount()
            .map_err(|e| format!("mount new generation: {e}"))?;
        let ns = std::fs::File::open(format!("/proc/{}/ns/mnt", spec.init_pid))
            .map_err(|e| format!("sandbox mount namespace: {e}"))?;
        Ok(Prepared { mnt, ns })
    }

    /// Pivots the sandbox onto it (joining the sandbox's mount namespace for the moment).
    pub(crate) fn pivot(self) -> Result<(), String> {
        in_mount_ns(self.ns.as_fd(), || pivot_into(&self.mnt))
    }
}

/// Seizes every thread of a planned process (without waiting for the stops); threads that exited are skipped.
fn attach_all(plan: &ProcPlan) -> Result<Vec<Tracee>, deltabox_sys::inject::InjectError> {
    let mut tracees = Vec::new();
    for &tid in &plan.threads {
        match Tracee::attach(
            Pid::from_raw(plan.pid),
            Pid::from_raw(tid),
            plan.syscall_insn,
            TRAP_TIMEOUT,
        ) {
            Ok(tr) => tracees.push(tr),
            Err(deltabox_sys::inject::InjectError::Exited(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(tracees)
}

/// Every process held, with its plan.
type Held = Vec<(ProcPlan, Vec<Tracee>)>;

/// Most rounds of seizing newly appeared processes before falling back to the freezer.
const SEIZE_ROUNDS: usize = 8;

/// [`SEIZE_ROUNDS`], unless `DELTABOX_SEIZE_ROUNDS` says otherwise (0: always freeze; the tests use it to cover
/// the freezer path of process checkpoints, which only a sandbox that keeps forking reaches otherwise).
fn seize_rounds() -> usize {
    std::env::var("DELTABOX_SEIZE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(SEIZE_ROUNDS)
}

/// Holds every process of the sandbox but init and the templates in a ptrace stop, without the freezer: seize
/// and interrupt each, wait for the stops, and repeat for processes that appeared meanwhile (a process can fork
/// until it stops) until a round finds none. `None` if the sandbox kept forking for [`SEIZE_ROUNDS`] rounds
/// (everything is let go again). Then plans every held process as the frozen path does.
fn hold_seized(spec: &SwitchSpec, rep: &mut SwitchReport) -> Result<Option<Held>, String> {
    let t = Instant::now();
    let mut held: Vec<(i32, u64, Vec<Tracee>)> = Vec::new();
    let mut converged = false;
    for _ in 0..seize_rounds() {
        let new: Vec<i32> = spec
            .cgroup
            .pids()
            .into_iter()
            .filter(|p| {
                *p != spec.init_pid && !spec.is_template(*p) && !held.iter().any(|(h, _, _)| h == p)
            })
            .collect();
        if new.is_empty() {
            converged = true;
            break;
        }
        let mut round = Vec::new();
        for pid in new {
            let threads = match procfs::threads(pid) {
                Ok(t) => t,
                Err(_) => continue,
            };
            if threads.len() > 1 {
                return Err(multi_threaded(pid, threads.len()));
            }
            let Ok(insn) = find_syscall_insn(Pid::from_raw(pid)) else {
                // Exited meanwhile (or mid-exec: the next round sees it again).
                continue;
            };
            match Tracee::attach(Pid::from_raw(pid), Pid::from_raw(pid), insn, TRAP_TIMEOUT) {
                Ok(tr) => round.push((pid, insn, vec![tr])),
                Err(deltabox_sys::inject::InjectError::Exited(_)) => {}
                Err(_)
                    if matches!(
                        deltabox_sys::inject::thread_state(Pid::from_raw(pid)),
                        None | Some('Z' | 'X')
                    ) => {}
                Err(e) => return Err(format!("process {pid} ({}): {e}", comm(pid))),
            }
        }
        for (pid, insn, mut tracees) in round {
            match tracees[0].wait_stop() {
                Ok(()) => {
                    // It ran until it stopped: it may have exec'd (a new vdso) or started a thread.
                    let insn = find_syscall_insn(Pid::from_raw(pid)).unwrap_or(insn);
                    tracees[0].set_syscall_insn(insn);
                    let threads = procfs::threads(pid).map(|t| t.len()).unwrap_or(1);
                    if threads > 1 {
                        return Err(multi_threaded(pid, threads));
                    }
                    held.push((pid, insn, tracees))
                }
                Err(deltabox_sys::inject::InjectError::Exited(_)) => {}
                Err(e) => return Err(format!("process {pid} ({}): {e}", comm(pid))),
            }
        }
    }
    if !converged {
        return Ok(None);
    }
    rep.freeze_us = us(t);
    let t = Instant::now();
    let old = procfs::mnt_id(Path::new(&format!("/proc/{}/root", spec.init_pid)))
        .map_err(|e| format!("sandbox root: {e}"))?;
    let mnt_ns = |pid: i32| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    let sandbox_ns = mnt_ns(spec.init_pid).ok_or("sandbox init is gone")?;
    let me = std::process::id() as i32;
    let mut plans = Vec::new();
    for (pid, _, tracees) in held {
        if mnt_ns(pid).is_some_and(|ns| ns != sandbox_ns) {
            return Err(format!(
                "process {pid} ({}) is in a mount namespace of its own (unshare -m): DeltaFS cannot move it to the                  new generation",
                comm(pid)
            ));
        }
        match scan(pid, old, true, Some(me)) {
            Ok(Some(plan)) => plans.push((plan, tracees)),
            Ok(None) | Err(ScanError::Gone) => {}
            Err(ScanError::Refuse(msg)) => return Err(msg),
        }
    }
    // The held processes and init.
    rep.processes = plans.len() + 1;
    rep.scan_us = us(t);
    Ok(Some(plans))
}

/// The capturing switch, still frozen: hold every thread, thaw, then capture, pivot and re-point.
fn switch_held(
    spec: &SwitchSpec,
    rep: &mut SwitchReport,
    plans: Vec<ProcPlan>,
    capture: &mut dyn CaptureHook,
) -> Result<(), String> {
    let t = Instant::now();
    let mut held: Vec<(ProcPlan, Vec<Tracee>)> = Vec::new();
    for plan in plans {
        let tracees = attach_all(&plan)
            .map_err(|e| format!("process {} ({}): {e}", plan.pid, comm(plan.pid)))?;
        held.push((plan, tracees));
    }
    spec.cgroup.thaw().map_err(|e| format!("thaw: {e}"))?;
    for (plan, tracees) in &mut held {
        for tr in tracees.iter_mut() {
            match tr.wait_stop() {
                Ok(()) => {}
                Err(deltabox_sys::inject::InjectError::Exited(_)) => {}
                Err(e) => return Err(format!("process {} ({}): {e}", plan.pid, comm(plan.pid))),
            }
        }
    }
    rep.capture_us = us(t);
    capture_and_pivot(spec, rep, held, capture)
}

/// Every process is held: capture each, then switch the filesystem and re-point them. Nothing ran since they
/// were stopped.
fn capture_and_pivot(
    spec: &SwitchSpec,
    rep: &mut SwitchReport,
    mut held: Vec<(ProcPlan, Vec<Tracee>)>,
    capture: &mut dyn CaptureHook,
) -> Result<(), String> {
    let t = Instant::now();
    let mut started = Vec::new();
    let mut failed = None;
    for (i, (plan, tracees)) in held.iter_mut().enumerate() {
        if let Some(main) = tracees.iter_mut().find(|t| t.tid().as_raw() == plan.pid) {
            match capture.start(plan.pid, main) {
                Ok(()) => started.push(i),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
    }
    for i in started {
        let (plan, tracees) = &mut held[i];
        if let Some(main) = tracees.iter_mut().find(|t| t.tid().as_raw() == plan.pid) {
            if let Err(e) = capture.finish(plan.pid, main) {
                failed = failed.or(Some(e));
            }
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    rep.capture_us += us(t);
    // Every process is held: the filesystem can switch now, and nothing ran since the freeze.
    let t = Instant::now();
    mount_and_pivot(spec)?;
    rep.mount_us = us(t);
    let t = Instant::now();
    repoint_all(held, rep);
    rep.repoint_us = us(t);
    Ok(())
}

/// Re-points every held process onto the new generation, then lets them go. A process that cannot be re-pointed
/// is killed (and reported) rather than left writing through a frozen layer.
fn repoint_all(mut held: Vec<(ProcPlan, Vec<Tracee>)>, rep: &mut SwitchReport) {
    for (plan, tracees) in &mut held {
        if let Err(e) = repoint(plan, tracees, rep) {
            tracees.clear();
            kill(plan.pid, &format!("pid {}: {e}", plan.pid), rep);
        }
    }
}

fn kill(pid: i32, why: &str, rep: &mut SwitchReport) {
    // SAFETY: kill(2) with plain integers.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    rep.killed.push(why.to_string());
}

enum ScanError {
    Gone,
    Refuse(String),
}

fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// What must be re-pointed in `pid`; `None` if nothing (unless `always`).
fn scan(
    pid: i32,
    old: u64,
    always: bool,
    tracer_ok: Option<i32>,
) -> Result<Option<ProcPlan>, ScanError> {
    let gone = |_| ScanError::Gone;
    let who = || format!("process {pid} ({})", comm(pid));
    let root = std::fs::read_link(format!("/proc/{pid}/root")).map_err(gone)?;
    let root_mnt = procfs::mnt_id(Path::new(&format!("/proc/{pid}/root"))).map_err(gone)?;
    if root_mnt != old || root != Path::new("/") {
        return Err(ScanError::Refuse(format!(
            "{} has its own root directory ({}): cannot move it to the new generation",
            who(),
            root.display()
        )));
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(gone)?;
    let traced = status
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .and_then(|v| v.trim().parse::<i32>().ok())
        .is_some_and(|t| t != 0 && Some(t) != tracer_ok);
    let threads = procfs::threads(pid).map_err(gone)?;
    let mut cwds = Vec::new();
    for &tid in &threads {
        let link = format!("/proc/{pid}/task/{tid}/cwd");
        let Ok(mnt) = procfs::mnt_id(Path::new(&link)) else {
            continue;
        };
        if mnt != old {
            continue;
        }
        let path = std::fs::read_link(&link).map_err(gone)?;
        let s = path.to_string_lossy();
        if s.ends_with(" (deleted)") {
            return Err(ScanError::Refuse(format!(
                "{} works in a deleted directory ({s})",
                who()
            )));
        }
        if path != Path::new("/") {
            cwds.push((tid, path));
        }
    }
    let mut fds = Vec::new();
    for f in procfs::open_files(pid).map_err(gone)? {
        if f.mnt_id != old {
            continue;
        }
        if f.deleted {
            return Err(ScanError::Refuse(format!(
                "{} fd {} holds a deleted file open ({})",
                who(),
                f.fd,
                f.target.display()
            )));
        }
        fds.push(f);
    }
    for m in procfs::shared_writable_mappings(pid).map_err(gone)? {
        if m.mnt_id == old {
            return Err(ScanError::Refuse(format!(
                "{} has a shared writable mapping of {} ({})",
                who(),
                m.path,
                m.range
            )));
        }
    }
    if cwds.is_empty() && fds.is_empty() && !always {
        return Ok(None);
    }
    if traced {
        return Err(ScanError::Refuse(format!(
            "{} is being traced by another process: cannot re-point it",
            who()
        )));
    }
    let syscall_insn = find_syscall_insn(Pid::from_raw(pid))
        .map_err(|e| ScanError::Refuse(format!("{}: {e}", who())))?;
    Ok(Some(ProcPlan {
        pid,
        threads,
        syscall_insn,
        cwds,
        fds,
    }))
}

/// The raw result of an injected system call, or an error naming `what` failed and why.
pub(crate) fn check(what: &str, r: i64) -> Result<i64, String> {
    if r < 0 {
        return Err(format!(
            "{what}: {}",
            std::io::Error::from_raw_os_error(-r as i32)
        ));
    }
    Ok(r)
}

fn repoint(plan: &ProcPlan, tracees: &mut [Tracee], rep: &mut SwitchReport) -> Result<(), String> {
    for t in tracees.iter_mut() {
        t.wait_stop().map_err(|e| e.to_string())?;
    }
    let Some(main) = tracees
        .iter()
        .position(|t| t.tid().as_raw() == plan.pid)
        .or(if tracees.is_empty() { None } else { Some(0) })
    else {
        return Ok(());
    };
    for f in &plan.fds {
        reopen(&mut tracees[main], f, rep)?;
    }
    // A chdir moves every thread sharing the fs_struct; threads that unshared theirs get their own.
    let mut done: Vec<&Path> = Vec::new();
    for (tid, path) in &plan.cwds {
        if done.contains(&path.as_path()) && !unshared_fs(plan.pid, *tid) {
            continue;
        }
        let Some(t) = tracees.iter_mut().find(|t| t.tid().as_raw() == *tid) else {
            continue;
        };
        chdir(t, path, rep)?;
        done.push(path);
    }
    Ok(())
}

/// Moves `t`'s working directory to `path` on the generation its root is now on. A directory the process may
/// not search with its own credentials (it dropped root while in `/root`) cannot be entered again — and it could
/// not resolve a relative path through it either — so it continues in `/`, noted in the report.
pub(crate) fn chdir(t: &mut Tracee, path: &Path, rep: &mut SwitchReport) -> Result<(), String> {
    let p = t.write_path(path).map_err(|e| e.to_string())?;
    let r = t
        .syscall(libc::SYS_chdir, &[p])
        .map_err(|e| e.to_string())?;
    rep.syscalls += 1;
    rep.cwds += 1;
    if r == -i64::from(libc::EACCES) {
        let root = t.write_path(Path::new("/")).map_err(|e| e.to_string())?;
        check(
            &format!("cwd {} (then /)", path.display()),
            t.syscall(libc::SYS_chdir, &[root])
                .map_err(|e| e.to_string())?,
        )?;
        rep.syscalls += 1;
        rep.notes.push(format!(
            "process {}: working directory {} is not searchable with its own credentials: it continues in /",
            t.tgid(),
            path.display()
        ));
        return Ok(());
    }
    check(&format!("cwd {}", path.display()), r)?;
    Ok(())
}

/// Opens `target` (a path inside `t`'s root) with our own credentials, through `/proc/<pid>/root`, and gives
/// `t` the descriptor: for a file the process may no longer open itself (it dropped root after opening it).
fn open_for(t: &mut Tracee, target: &Path, flags: i32) -> Result<i64, String> {
    let file = open_in_root(t.tgid().as_raw(), target, flags)
        .map_err(|e| format!("open {} for it: {e}", target.display()))?;
    let fds = t
        .install_fds(&[std::os::fd::AsFd::as_fd(&file)])
        .map_err(|e| e.to_string())?;
    fds.first()
        .map(|&fd| i64::from(fd))
        .ok_or_else(|| "no descriptor installed".to_string())
}

/// Opens `target`, a path inside the root of process `pid` (host pid), with our own credentials: resolved in that
/// root as the process would (`RESOLVE_IN_ROOT`: the sandbox's symlinks never lead out of it). Close-on-exec.
pub(crate) fn open_in_root(pid: i32, target: &Path, flags: i32) -> std::io::Result<OwnedFd> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let root = rustix::fs::open(
        format!("/proc/{pid}/root").as_str(),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let rel = target.strip_prefix("/").map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{}: not an absolute path", target.display()),
        )
    })?;
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let fd = rustix::fs::openat2(
        &root,
        rel,
        OFlags::from_bits_retain(flags as u32 & !(libc::O_CLOEXEC as u32)) | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )?;
    // Opened by us, a file of proc or sys would act in our context (the host's), not the sandbox's: never
    // handed to a sandbox process.
    if crate::files::on_kernel_fs(&fd)? {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{}: on a kernel filesystem (proc, sys …)", target.display()),
        ));
    }
    Ok(fd)
}

/// Re-opens descriptor `f` in `t` by path (same flags, offset and close-on-exec), over the same number: from then
/// on it refers to that path on the generation the process's root is now on.
pub(crate) fn reopen(
    t: &mut Tracee,
    f: &procfs::OpenFile,
    rep: &mut SwitchReport,
) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    let p = t.write_path(&f.target).map_err(|e| e.to_string())?;
    let mut flags = (f.flags as i32 & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC))
        | libc::O_NOCTTY
        | libc::O_CLOEXEC;
    let what = format!("fd {} ({})", f.fd, f.target.display());
    // Opening a FIFO blocks until the other side opens it, and nothing would: open it non-blocking (a writer
    // with no reader cannot open it at all then; read-write never waits), and restore the flag afterwards.
    let fifo = std::fs::metadata(format!("/proc/{}/fd/{}", t.tgid(), f.fd))
        .is_ok_and(|m| m.file_type().is_fifo());
    if fifo {
        flags |= libc::O_NONBLOCK;
        if flags & libc::O_ACCMODE == libc::O_WRONLY {
            flags = (flags & !libc::O_ACCMODE) | libc::O_RDWR;
        }
    }
    let r = t
        .syscall(
            libc::SYS_openat,
            &[libc::AT_FDCWD as u64, p, flags as u64, 0],
        )
        .map_err(|e| e.to_string())?;
    // A file it opened before dropping root: opened for it.
    let r = if r == -i64::from(libc::EACCES) {
        open_for(t, &f.target, flags).map_err(|e| format!("{what}: {e}"))?
    } else {
        r
    };
    let nfd = check(&what, r)?;
    rep.syscalls += 1;
    if fifo && f.flags as i32 & libc::O_NONBLOCK == 0 {
        let back = (flags & !libc::O_NONBLOCK) as u64;
        check(
            &what,
            t.syscall(libc::SYS_fcntl, &[nfd as u64, libc::F_SETFL as u64, back])
                .map_err(|e| e.to_string())?,
        )?;
        rep.syscalls += 1;
    }
    if f.pos > 0 {
        check(
            &what,
            t.syscall(libc::SYS_lseek, &[nfd as u64, f.pos, libc::SEEK_SET as u64])
                .map_err(|e| e.to_string())?,
        )?;
        rep.syscalls += 1;
    }
    let cloexec = (f.flags as i32 & libc::O_CLOEXEC) as u64;
    check(
        &what,
        t.syscall(libc::SYS_dup3, &[nfd as u64, f.fd as u64, cloexec])
            .map_err(|e| e.to_string())?,
    )?;
    check(
        &what,
        t.syscall(libc::SYS_close, &[nfd as u64])
            .map_err(|e| e.to_string())?,
    )?;
    rep.syscalls += 2;
    rep.fds += 1;

    Ok(())
}

/// Whether thread `tid` may have its own fs_struct (then its cwd must be fixed on its own). Conservative: any
/// non-main thread whose cwd still differs after the main chdir counts.
fn unshared_fs(pid: i32, tid: i32) -> bool {
    tid != pid
}

/// Inside the sandbox's mount namespace: mount the generation, move the submounts, pivot.
fn pivot_into(mnt: &OwnedFd) -> Result<(), String> {
    use rustix::mount::{mount_move, move_mount, unmount, MoveMountFlags, UnmountFlags};
    let e = |what: &str| {
        let what = what.to_string();
        move |err: rustix::io::Errno| format!("{what}: {err}")
    };
    rustix::process::chdir("/").map_err(e("chdir /"))?;
    let mp = format!("/{}", deltabox_fs::GENERATION_MOUNTPOINT);
    move_mount(
        mnt.as_fd(),
        "",
        rustix::fs::CWD,
        mp.as_str(),
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(e("mount new generation"))?;
    for sub in ["proc", "dev"] {
        mount_move(format!("/{sub}"), format!("{mp}/{sub}")).map_err(e(&format!("move /{sub}")))?;
    }
    rustix::process::pivot_root(mp.as_str(), format!("{mp}{mp}").as_str())
        .map_err(e("pivot_root"))?;
    rustix::process::chdir("/").map_err(e("chdir /"))?;
    unmount(mp.as_str(), UnmountFlags::DETACH).map_err(e("detach old generation"))?;
    crate::rootfs::mount_generation_guard(Path::new("/")).map_err(|err| err.to_string())
}

/// Runs `f` inside mount namespace `ns` and comes back to ours, with our root and working directory as they
/// were (joining a mount namespace resets both). No child process: a fork costs more than the switch. The caller
/// must be single-threaded (`setns(CLONE_NEWNS)` refuses otherwise): the zygote and the keepers are.
fn in_mount_ns(
    ns: std::os::fd::BorrowedFd<'_>,
    f: impl FnOnce() -> Result<(), String>,
) -> Result<(), String> {
    use rustix::fs::{open, Mode, OFlags};
    use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};
    let dir = |p: &str| {
        open(
            p,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| format!("open {p}: {e}"))
    };
    let own = std::fs::File::open("/proc/self/ns/mnt")
        .map_err(|e| format!("our mount namespace: {e}"))?;
    let (root, cwd) = (dir("/")?, dir(".")?);
    let result = move_into_link_name_space(ns, Some(LinkNameSpaceType::Mount))
        .map_err(|e| format!("setns: {e}"))
        .and_then(|()| f());
    let back = move_into_link_name_space(own.as_fd(), Some(LinkNameSpaceType::Mount))
        .and_then(|()| rustix::process::fchdir(&root))
        .and_then(|()| rustix::process::chroot("."))
        .and_then(|()| rustix::process::fchdir(&cwd));
    if let Err(e) = back {
        // Carrying on inside a sandbox's mount namespace would be unsafe; dying takes our templates along
        // (PTRACE_O_EXITKILL) and the daemon reports it.
        eprintln!("deltabox: cannot return to our own mount namespace ({e}): exiting");
        std::process::abort();
    }
    result
}
