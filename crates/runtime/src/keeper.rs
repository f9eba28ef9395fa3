//! The keeper: one single-threaded process per sandbox that holds its process checkpoints (templates).
//!
//! A template is a ptrace-stopped copy of a sandbox process, and only the thread that traces it may fork it again,
//! so the tracer has to live as long as the checkpoint: the zygote forks a keeper for a sandbox on its first
//! process checkpoint. It runs in the zygote's mount namespace (it sees the layer store and the host root) and
//! serves the daemon over a socket: checkpoint (a generation switch that captures a template of every process
//! first), rollback (kill the live processes, pivot onto a new generation over the checkpoint's layers, fork every
//! template back with its pid), and forget. Templates are traced with `PTRACE_O_EXITKILL`: if the keeper dies
//! (with the daemon, or killed), they die too and never run as duplicates.

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use deltabox_cr::Template;
use deltabox_sys::inject::Tracee;
use deltabox_sys::procfs;
use serde::{Deserialize, Serialize};

use crate::collapser::Collapser;
use crate::generation::{self, check, SwitchReport, SwitchSpec};
use crate::teardown::Teardown;

/// Daemon → keeper.
#[derive(Debug, Serialize, Deserialize)]
pub enum KeeperRequest {
    /// Switch generations as [`generation::switch`], capturing every process (but init) first.
    Checkpoint {
        /// Checkpoint id the templates are kept under.
        id: String,
        /// The switch.
        switch: SwitchSpec,
        /// Collapse the templates and processes into huge pages afterwards (see [`crate::collapser`]).
        huge_pages: bool,
    },
    /// Restore checkpoint `id`: its processes, on the new generation `switch.layers`.
    Rollback { id: String, switch: SwitchSpec },
    /// Roll the files back only (a checkpoint without kept templates): kill the processes but init and the
    /// templates, and move onto `switch.layers`. Every other checkpoint's templates stay.
    RollbackFiles { switch: SwitchSpec },
    /// Fork checkpoint `id`'s processes into a branch sandbox (see [`fork_branch`]). The reply carries the
    /// daemon's ends of the branch's session pipes.
    Fork { id: String, branch: BranchTarget },
    /// Describe the durable images of checkpoint `id`'s templates (see [`crate::durable::describe`]), with the
    /// daemon's record of its sessions. The reply carries each template's memory, for the daemon to write the
    /// pages off the keeper ([`crate::durable::store`]).
    DescribeImages {
        id: String,
        sessions: Vec<(String, i32, crate::SessionKind)>,
        /// The checkpoint the images will be deduplicated against: memory unchanged since its templates is
        /// found from the page tables.
        #[serde(default)]
        base: Option<String>,
    },
    /// Roll back to a checkpoint whose templates are gone, from its images in `dir`: the files first (as
    /// `RollbackFiles`), then its templates rebuilt from the images (kept as checkpoint `id` again), then its
    /// processes forked from them as by `Rollback`. Session interpreters (`sessions`) get new pipes: the
    /// reply carries the daemon's ends, four per session in [`RestoreReport::sessions`] order.
    RollbackImages {
        id: String,
        dir: PathBuf,
        switch: SwitchSpec,
        sessions: Vec<(i32, crate::SessionKind)>,
        /// Session interpreters whose existing pipes the request carries (their ends, four each in this order:
        /// command, stdout, stderr, status): they keep speaking over them, as their other copies do.
        reuse: Vec<(i32, crate::SessionKind)>,
        /// Large heaps copied in on demand and in the background (see `deltabox_cr::pager`), not before the
        /// processes run.
        #[serde(default)]
        lazy: bool,
    },
    /// Drop the templates of these checkpoints.
    Forget { ids: Vec<String> },
    /// What the templates of each kept checkpoint cost.
    Stats,
}

/// What one checkpoint's templates cost in memory (from `/proc/<pid>/smaps_rollup`): their page tables plus the
/// pages the live processes have rewritten since (until then a template shares every page).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TemplateCost {
    /// Templates (processes).
    pub processes: usize,
    /// Proportional set size, bytes.
    pub pss: u64,
    /// Pages only the templates hold, bytes.
    pub private_dirty: u64,
    /// Anonymous memory mapped by huge pages (collapsed in the background: cheap to fork), bytes.
    #[serde(default)]
    pub huge: u64,
    /// Some of its templates still wait for (or are in) the background huge-page collapse.
    #[serde(default)]
    pub collapsing: bool,
}

/// One kept checkpoint's templates.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KeptTemplates {
    /// Their host pids (reserved while the keeper holds them: a dead tracee stays a zombie until its tracer
    /// collects it).
    pub pids: Vec<i32>,
    /// Some wait for (or are in) the background huge-page collapse.
    pub collapsing: bool,
}

impl TemplateCost {
    /// Reads what `templates` cost now. It walks their page tables (`smaps_rollup`): about a millisecond per
    /// GiB mapped by small pages, so callers do it off any critical path.
    pub fn measure(templates: &KeptTemplates) -> TemplateCost {
        let mut cost = TemplateCost {
            processes: templates.pids.len(),
            collapsing: templates.collapsing,
            ..Default::default()
        };
        for &pid in &templates.pids {
            let text =
                std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
            cost.pss += procfs::kb_field(&text, "Pss:");
            cost.private_dirty += procfs::kb_field(&text, "Private_Dirty:");
            cost.huge += procfs::kb_field(&text, "AnonHugePages:");
        }
        cost
    }
}

/// A branch sandbox a checkpoint's processes are forked into.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BranchTarget {
    /// Host pid of the branch's init (made with [`crate::SandboxSpec::branch_of`] this sandbox).
    pub init_pid: i32,
    /// The branch's cgroup: the copies move there before they run.
    pub cgroup: crate::Cgroup,
    /// Session interpreters (sandbox pids) that get pipes of their own, and their kind.
    pub sessions: Vec<(i32, crate::SessionKind)>,
}

/// What forking into a branch did, with phase timings in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ForkReport {
    /// The processes made (sandbox pids).
    pub pids: Vec<i32>,
    /// Sessions whose pipes are attached to the reply, in order, four descriptors each: command (write end),
    /// stdout, stderr, status (read ends).
    pub sessions: Vec<i32>,
    /// Fork the templates into the branch.
    pub fork_us: u64,
    /// Re-open files on the branch's generation, cut what is shared with the source, new session pipes.
    pub repoint_us: u64,
    /// Move the copies into the branch's cgroup.
    pub cgroup_us: u64,
    /// Everything.
    pub total_us: u64,
}

/// Keeper → daemon.
#[derive(Debug, Serialize, Deserialize)]
pub enum KeeperReply {
    /// Checkpoint taken: the switch report and the processes captured (sandbox pids).
    Checkpointed {
        report: SwitchReport,
        pids: Vec<i32>,
    },
    /// Rollback done.
    RolledBack(RestoreReport),
    /// Forked into a branch.
    Forked(ForkReport),
    /// Rollback failed; with `switched`, after the sandbox was already moved onto the new generation (its files
    /// are rolled back, its processes gone).
    RollbackFailed { error: String, switched: bool },
    /// Forgotten.
    Done,
    /// Per checkpoint id.
    Stats(HashMap<String, KeptTemplates>),
    /// Images described; one descriptor per process attached (its memory).
    ImagesDescribed(crate::durable::Described),
    /// The request failed; nothing changed unless the message says otherwise.
    Failed { error: String },
}

/// What a rollback did, with phase timings in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RestoreReport {
    /// Kill the live processes and wait until their pids are free.
    pub kill_us: u64,
    /// Mount the new generation and pivot.
    pub mount_us: u64,
    /// Fork the templates (page tables).
    pub fork_us: u64,
    /// Move the new processes onto the generation, re-open their files, let them run.
    pub repoint_us: u64,
    /// Everything.
    pub total_us: u64,
    /// The processes restored (sandbox pids).
    pub pids: Vec<i32>,
    /// What could only be restored approximately (see [`SwitchReport::notes`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// Rebuilding the templates from their images (slow path only).
    #[serde(default)]
    pub image_us: u64,
    /// Of the images' memory, bytes left to a pager (lazy fill): copied in as touched and in the background.
    #[serde(default)]
    pub lazy_bytes: u64,
    /// Session interpreters that got new pipes (slow path only; see `KeeperRequest::RollbackImages`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sessions: Vec<i32>,
}

impl Captured {
    /// The template's effective capabilities (read once).
    fn caps(&mut self) -> u64 {
        let pid = self.template.pid().as_raw();
        *self
            .caps
            .get_or_insert_with(|| procfs::effective_caps(pid).unwrap_or(0))
    }

    /// Whether its copies may get their pid with `clone3(set_tid)`: it needs `CAP_SYS_ADMIN` or
    /// `CAP_CHECKPOINT_RESTORE` in the sandbox's user namespace, which a process that dropped root has not.
    fn may_set_tid(&mut self) -> bool {
        self.caps() & ((1 << 21) | (1 << 40)) != 0
    }

    /// Descriptors of process `pid` (the template or a fresh copy of it) on the checkpoint's generations.
    pub(crate) fn files_to_reopen(&self, pid: i32) -> Result<Vec<procfs::OpenFile>, String> {
        Ok(procfs::open_files(pid)
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter(|f| self.generations.contains(&f.mnt_id))
            .collect())
    }
}

/// A captured process.
pub(crate) struct Captured {
    pub(crate) template: Template,
    /// Its working directory (a path on the checkpoint's generation).
    pub(crate) cwd: PathBuf,
    /// Mount ids of the generation(s) its descriptors may point into.
    pub(crate) generations: Vec<u64>,
    /// The template's descriptors on those generations, to re-open in a restored process: read once, after the
    /// checkpoint was answered (a template never runs, so they and their offsets stay as captured).
    pub(crate) reopen: Option<Vec<procfs::OpenFile>>,
    /// Descriptors the template dropped, to re-create in a restored process.
    pub(crate) fixups: Vec<crate::fd_fixup::Fixup>,
    /// The live process it was taken from (host pid; it may be gone).
    pub(crate) source: i32,
    /// It was stopped by a signal (SIGSTOP, ^Z) at the checkpoint: its copies come back stopped.
    pub(crate) stopped: bool,
    /// The template's effective capabilities (fixed: a template never runs), read after the checkpoint was
    /// answered; see [`Captured::caps`].
    pub(crate) caps: Option<u64>,
}

pub(crate) const TIMEOUT: Duration = Duration::from_secs(5);

fn us(t: Instant) -> u64 {
    t.elapsed().as_micros() as u64
}

fn send(sock: &OwnedFd, reply: &KeeperReply, fds: &[OwnedFd]) -> std::io::Result<()> {
    use std::os::fd::AsFd;
    let payload = serde_json::to_vec(reply).map_err(std::io::Error::other)?;
    let fds: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    deltabox_sys::fdpass::send_frame(sock, &payload, &fds)
}

/// Keeper entry point (single-threaded, forked from the zygote). Returns when the daemon closes the socket.
pub fn run(sock: OwnedFd, init_pid: i32) -> std::io::Result<()> {
    // Precise short sleeps while waiting for processes (the default slack is 50 µs).
    // SAFETY: prctl(2) with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000, 0, 0, 0) };
    let mut kept: HashMap<String, Vec<Captured>> = HashMap::new();
    let mut collapser = Collapser::default();
    let mut teardown = Teardown::default();
    let mut restored_from: HashMap<i32, i32> = HashMap::new();
    let mut pagers = crate::pagers::Pagers::default();
    while let Some((payload, received)) = deltabox_sys::fdpass::recv_frame(&sock)? {
        let req: KeeperRequest = serde_json::from_slice(&payload).map_err(std::io::Error::other)?;
        collapser.poll();
        pagers.poll();
        // Collapsed after the reply: (templates, then the live processes they were taken from).
        let mut collapse_next: Vec<i32> = Vec::new();
        // Checkpoints whose templates' descriptors are read after the reply.
        let mut learn_files: Vec<String> = Vec::new();
        let mut fds: Vec<OwnedFd> = Vec::new();
        let reply = match req {
            KeeperRequest::Checkpoint {
                id,
                mut switch,
                huge_pages,
            } => {
                switch.templates = Some(template_pids(&kept));
                match checkpoint(init_pid, &switch) {
                    Ok((report, captured)) => {
                        let pids = captured
                            .iter()
                            .map(|c| c.template.identity().ns_pid)
                            .collect();
                        if huge_pages {
                            collapse_next
                                .extend(captured.iter().map(|c| c.template.pid().as_raw()));
                            collapse_next.extend(captured.iter().map(|c| c.source));
                        }
                        learn_files.push(id.clone());
                        kept.insert(id, captured);
                        KeeperReply::Checkpointed { report, pids }
                    }
                    Err(error) => KeeperReply::Failed { error },
                }
            }
            KeeperRequest::Rollback { id, switch } => {
                let templates = template_pids(&kept);
                match kept.get_mut(&id) {
                    Some(captured) => rollback_reply(rollback(
                        RollbackCtx {
                            init_pid,
                            templates: &templates,
                            teardown: &mut teardown,
                            collapser: &mut collapser,
                            restored_from: &mut restored_from,
                        },
                        &switch,
                        true,
                        captured,
                    )),
                    None => KeeperReply::Failed {
                        error: format!("no process checkpoint {id} is kept"),
                    },
                }
            }
            KeeperRequest::RollbackFiles { switch } => rollback_reply(rollback(
                RollbackCtx {
                    init_pid,
                    templates: &template_pids(&kept),
                    teardown: &mut teardown,
                    collapser: &mut collapser,
                    restored_from: &mut restored_from,
                },
                &switch,
                true,
                &mut [],
            )),
            KeeperRequest::Fork { id, branch } => match kept.get_mut(&id) {
                Some(captured) => match fork_branch(captured, &branch) {
                    Ok((report, pipes)) => {
                        fds = pipes;
                        KeeperReply::Forked(report)
                    }
                    Err(error) => KeeperReply::Failed { error },
                },
                None => KeeperReply::Failed {
                    error: format!("no process checkpoint {id} is kept"),
                },
            },
            KeeperRequest::DescribeImages { id, sessions, base } => match kept.remove(&id) {
                // An image must hold every page: lazily restored memory must be all in first.
                Some(mut captured) => {
                    let base = base
                        .as_deref()
                        .and_then(|b| kept.get_mut(b).map(|t| (b, t.as_mut_slice())));
                    let described = pagers
                        .wait_all_in(Duration::from_secs(120))
                        .and_then(|_| crate::durable::describe(&mut captured, sessions, base));
                    kept.insert(id, captured);
                    match described {
                        Ok((described, mems)) => {
                            fds = mems;
                            KeeperReply::ImagesDescribed(described)
                        }
                        Err(error) => KeeperReply::Failed { error },
                    }
                }
                None => KeeperReply::Failed {
                    error: format!("no process checkpoint {id} is kept"),
                },
            },
            KeeperRequest::RollbackImages {
                id,
                dir,
                switch,
                sessions,
                reuse,
                lazy,
            } => {
                let start = Instant::now();
                let files = rollback(
                    RollbackCtx {
                        init_pid,
                        templates: &template_pids(&kept),
                        teardown: &mut teardown,
                        collapser: &mut collapser,
                        restored_from: &mut restored_from,
                    },
                    &switch,
                    true,
                    &mut [],
                );
                let t = Instant::now();
                let mut lazy_bytes = 0;
                let rebuilt = files.map_err(|e| e.0).and_then(|_| {
                    let mut r =
                        crate::durable::rebuild(init_pid, &dir, &sessions, &reuse, received, lazy)?;
                    lazy_bytes = r.lazy.iter().flat_map(|l| &l.runs).map(|x| x.1).sum();
                    // Before the templates are forked: a fork waits for the pager to take the copy's memory on.
                    pagers.start(std::mem::take(&mut r.lazy))?;
                    Ok(r)
                });
                let image_us = us(t);
                match rebuilt {
                    Err(error) => KeeperReply::RollbackFailed {
                        error: format!(
                            "{error} (the files were rolled back; no process was restored)"
                        ),
                        switched: true,
                    },
                    Ok(mut r) => {
                        let mut templates = template_pids(&kept);
                        templates.extend(r.captured.iter().map(|c| c.template.pid().as_raw()));
                        let done = rollback(
                            RollbackCtx {
                                init_pid,
                                templates: &templates,
                                teardown: &mut teardown,
                                collapser: &mut collapser,
                                restored_from: &mut restored_from,
                            },
                            &switch,
                            false,
                            &mut r.captured,
                        );
                        match done {
                            Ok(mut report) => {
                                report.image_us = image_us;
                                report.lazy_bytes = lazy_bytes;
                                report.sessions = r.sessions;
                                report.notes.extend(r.notes);
                                report.total_us = us(start);
                                fds = r.pipes;
                                kept.insert(id, r.captured);
                                KeeperReply::RolledBack(report)
                            }
                            Err((error, _)) => KeeperReply::RollbackFailed {
                                error,
                                switched: true,
                            },
                        }
                    }
                }
            }
            KeeperRequest::Forget { ids } => {
                for id in ids {
                    if let Some(caps) = kept.remove(&id) {
                        collapser.remove(
                            &caps
                                .iter()
                                .map(|c| c.template.pid().as_raw())
                                .collect::<Vec<_>>(),
                        );
                    }
                }
                KeeperReply::Done
            }
            // Cheap on purpose (no page-table walks here: the keeper must stay responsive); the caller measures.
            KeeperRequest::Stats => KeeperReply::Stats(
                kept.iter()
                    .map(|(id, caps)| {
                        let pids: Vec<i32> =
                            caps.iter().map(|c| c.template.pid().as_raw()).collect();
                        let collapsing = pids.iter().any(|p| collapser.pending(*p));
                        (id.clone(), KeptTemplates { pids, collapsing })
                    })
                    .collect(),
            ),
        };
        send(&sock, &reply, &fds)?;
        drop(fds);
        // Memory of the processes a rollback killed is torn down now, after the answer.
        teardown.release();
        for id in learn_files {
            for c in kept.get_mut(&id).into_iter().flatten() {
                c.reopen = c.files_to_reopen(c.template.pid().as_raw()).ok();
                c.caps();
            }
        }
        if !collapse_next.is_empty() {
            collapser.add(collapse_next);
        }
    }
    Ok(())
}

/// A capture in flight.
struct Pending {
    pid: i32,
    capture: deltabox_cr::PendingCapture,
    cwd: PathBuf,
    fixups: Vec<crate::fd_fixup::Fixup>,
    stopped: bool,
}

/// The keeper's capture hook: a template of every held process, forks overlapped.
struct Capturer<'a> {
    init_pid: i32,
    switch: &'a SwitchSpec,
    templates: &'a HashSet<i32>,
    /// The generation the processes are on.
    generation: u64,
    /// Who holds which pipe end, read once every process is held (none can change its descriptors any more).
    pipes: Option<crate::fd_fixup::PipeHolders>,
    /// Captures in flight.
    pending: Vec<Pending>,
    captured: Vec<Captured>,
}

impl generation::CaptureHook for Capturer<'_> {
    fn start(&mut self, pid: i32, t: &mut Tracee) -> Result<(), String> {
        let (switch, templates) = (self.switch, self.templates);
        let holders = self.pipes.get_or_insert_with(|| {
            let live: Vec<i32> = switch
                .cgroup
                .pids()
                .into_iter()
                .filter(|p| !templates.contains(p))
                .collect();
            crate::fd_fixup::PipeHolders::scan(&live)
        });
        let fixups = crate::fd_fixup::plan(pid, holders);
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"))
            .map_err(|e| format!("cwd of {pid}: {e}"))?;
        // A child of init is captured as init's child; any other as a child of its process, invisible to `wait`.
        let pending = Template::start_capture(t, procfs::parent_of(pid) == Some(self.init_pid))
            .map_err(|e| e.to_string())?;
        self.pending.push(Pending {
            pid,
            capture: pending,
            cwd,
            fixups,
            stopped: t.was_group_stopped(),
        });
        Ok(())
    }

    fn finish(&mut self, pid: i32, t: &mut Tracee) -> Result<(), String> {
        let at = self
            .pending
            .iter()
            .position(|p| p.pid == pid)
            .ok_or_else(|| format!("process {pid}: no capture in flight"))?;
        let Pending {
            capture,
            cwd,
            fixups,
            stopped,
            ..
        } = self.pending.swap_remove(at);
        let mut template = capture.finish(t).map_err(|e| e.to_string())?;
        template
            .close_fds(&fixups.iter().map(|f| f.fd()).collect::<Vec<_>>())
            .map_err(|e| format!("process {pid}: {e}"))?;
        self.captured.push(Captured {
            template,
            cwd,
            generations: vec![self.generation],
            reopen: None,
            fixups,
            source: pid,
            stopped,
            caps: None,
        });
        Ok(())
    }
}

/// Templates stay in the sandbox's cgroup: moving a process between cgroup v1 hierarchies waits for an RCU
/// grace period (~10 ms measured), which no checkpoint or rollback should pay. Everything that lists the
/// sandbox's processes (switch scans, rollback's kill) skips the ones the keeper traces.
fn checkpoint(init_pid: i32, switch: &SwitchSpec) -> Result<(SwitchReport, Vec<Captured>), String> {
    let no_templates = HashSet::new();
    let generation = procfs::mnt_id(Path::new(&format!("/proc/{init_pid}/root")))
        .map_err(|e| format!("sandbox root: {e}"))?;
    let mut capturer = Capturer {
        init_pid,
        switch,
        templates: switch.templates.as_ref().unwrap_or(&no_templates),
        generation,
        pipes: None,
        pending: Vec::new(),
        captured: Vec::new(),
    };
    // On failure the templates made so far are dropped with `capturer`, killing them: nothing changed.
    let report = generation::switch_capturing(switch, Some(&mut capturer))?;
    Ok((report, capturer.captured))
}

/// Sends SIGKILL to every process of the sandbox but init and the templates, noting them in `victims`; returns
/// how many were still there.
fn signal_live(
    init_pid: i32,
    switch: &SwitchSpec,
    templates: &HashSet<i32>,
    victims: &mut Vec<i32>,
) -> usize {
    let live: Vec<i32> = switch
        .cgroup
        .pids()
        .into_iter()
        .filter(|p| *p != init_pid && !templates.contains(p))
        .collect();
    for &p in &live {
        // SAFETY: kill(2) with plain integers.
        unsafe { libc::kill(p, libc::SIGKILL) };
        if !victims.contains(&p) {
            victims.push(p);
        }
    }
    live.len()
}

/// Kills every process of the sandbox but init (and any it forked meanwhile) and waits until their pids are free
/// (init reaped them). `victims` may hold processes already signalled by [`signal_live`].
fn kill_live(
    init_pid: i32,
    switch: &SwitchSpec,
    templates: &HashSet<i32>,
    victims: &mut Vec<i32>,
) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let live = signal_live(init_pid, switch, templates, victims);
        // Out of the cgroup is not enough: the pid stays taken until init reaps the zombie.
        if live == 0
            && victims
                .iter()
                .all(|p| !Path::new(&format!("/proc/{p}")).exists())
        {
            return Ok(());
        }
        if start.elapsed() > TIMEOUT {
            return Err(format!(
                "{live} processes of the sandbox did not die within {TIMEOUT:?}"
            ));
        }
        // Init reaps within microseconds of the exit. Short real sleeps (the keeper's timer slack is 1 µs), not
        // spinning: on two CPUs a spinning keeper would delay the very exits and the reaping it waits for.
        if start.elapsed() < Duration::from_millis(5) {
            std::thread::sleep(Duration::from_micros(20));
        } else {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

/// Moves a just-forked process onto the sandbox's current generation (mount `generation`): its root already is
/// there when the template's root was the sandbox's (`pivot_root` moves every such root); otherwise it joins its
/// own mount namespace again through a pidfd of itself (which sets root and cwd to the namespace's root; no
/// other process's permission is involved). Then `chdir` back and re-open files of the old generation by path.
fn repoint_restored(
    t: &mut Tracee,
    c: &Captured,
    generation: u64,
    rep: &mut SwitchReport,
) -> Result<(), String> {
    let sc = |t: &mut Tracee, nr: i64, args: &[u64]| t.syscall(nr, args).map_err(|e| e.to_string());
    let root = procfs::mnt_id(Path::new(&format!("/proc/{}/root", t.tgid())));
    if root.ok() != Some(generation) {
        let me = c.template.identity().ns_pid as u64;
        let pidfd = check("pidfd_open(self)", sc(t, libc::SYS_pidfd_open, &[me, 0])?)?;
        let joined = sc(
            t,
            libc::SYS_setns,
            &[pidfd as u64, libc::CLONE_NEWNS as u64],
        )?;
        sc(t, libc::SYS_close, &[pidfd as u64])?;
        check("setns to the new generation", joined)?;
    }
    if c.cwd != Path::new("/") {
        generation::chdir(t, &c.cwd, rep)?;
    }
    let read;
    let files = match &c.reopen {
        Some(files) => files,
        None => {
            read = c.files_to_reopen(t.tgid().as_raw())?;
            &read
        }
    };
    for f in files {
        generation::reopen(t, f, rep)?;
    }
    crate::fd_fixup::apply(t, &c.fixups)
}

/// Forks `template` with its original pid. The pid was seen free (its holder reaped), yet under load the kernel
/// has (about once in 2,000 rollbacks in the test suite) still refused it with `EEXIST` for a moment: retry
/// briefly before giving up.
fn spawn_same_pid(template: &mut Template) -> deltabox_cr::Result<Tracee> {
    let deadline = Instant::now() + Duration::from_millis(500);
    loop {
        match template.spawn(true) {
            Err(deltabox_cr::Error::Inject(deltabox_sys::inject::InjectError::Io {
                source,
                ..
            })) if source.raw_os_error() == Some(libc::EEXIST) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_micros(200));
            }
            other => return other,
        }
    }
}

/// Forks `template` (a process that may not use `set_tid`) at its original pid the old way: the pid
/// namespace's last allocated pid is set to the one before it (`ns_last_pid`, written by a short-lived child of
/// ours inside that namespace, with our credentials), and the next fork there gets it. The sandbox's other
/// processes are dead or held, so nothing else allocates a pid in between.
fn spawn_at_last_pid(template: &mut Template, init_pid: i32) -> deltabox_cr::Result<Tracee> {
    let want = template.identity().ns_pid;
    set_last_pid(init_pid, want - 1).map_err(deltabox_cr::Error::Branch)?;
    let child = template.spawn(false)?;
    let got = procfs::ns_pid(child.tgid().as_raw());
    if got != Some(want) {
        let pid = child.tgid();
        child.forget();
        deltabox_sys::inject::kill_tracee(pid);
        return Err(deltabox_cr::Error::Branch(format!(
            "process {want} came back as {got:?}: another process took its pid"
        )));
    }
    Ok(child)
}

/// Sets `ns_last_pid` of the pid namespace of `init_pid` (host pid): the file acts on the writer's own pid
/// namespace, so a child of ours made there writes it.
fn set_last_pid(init_pid: i32, last: i32) -> Result<(), String> {
    use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};
    use std::os::fd::AsFd;
    let own =
        std::fs::File::open("/proc/self/ns/pid").map_err(|e| format!("own pid namespace: {e}"))?;
    let target = std::fs::File::open(format!("/proc/{init_pid}/ns/pid"))
        .map_err(|e| format!("the sandbox's pid namespace: {e}"))?;
    let setns = |f: &std::fs::File| {
        move_into_link_name_space(f.as_fd(), Some(LinkNameSpaceType::ProcessID))
            .map_err(|e| format!("setns: {e}"))
    };
    setns(&target)?;
    // SAFETY: the keeper is single-threaded.
    let forked = unsafe { deltabox_sys::clone_process(0) };
    let back = setns(&own);
    let child = match forked {
        Ok(deltabox_sys::CloneResult::Child) => {
            let ok = std::fs::write("/proc/sys/kernel/ns_last_pid", last.to_string()).is_ok();
            // SAFETY: leave without running the keeper's destructors.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) }
        }
        Ok(deltabox_sys::CloneResult::Parent(pid)) => pid.as_raw_nonzero().get(),
        Err(e) => return Err(format!("fork: {e}")),
    };
    let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(child), None);
    back?;
    match status {
        Ok(nix::sys::wait::WaitStatus::Exited(_, 0)) => Ok(()),
        other => Err(format!("write ns_last_pid: {other:?}")),
    }
}

fn rollback_reply(r: Result<RestoreReport, (String, bool)>) -> KeeperReply {
    match r {
        Ok(r) => KeeperReply::RolledBack(r),
        Err((error, switched)) => KeeperReply::RollbackFailed { error, switched },
    }
}

/// Host pids of every template the keeper holds.
fn template_pids(kept: &HashMap<String, Vec<Captured>>) -> HashSet<i32> {
    kept.values()
        .flatten()
        .map(|c| c.template.pid().as_raw())
        .collect()
}

/// What a rollback needs of the keeper's state besides the checkpoint.
struct RollbackCtx<'a> {
    init_pid: i32,
    templates: &'a HashSet<i32>,
    teardown: &'a mut Teardown,
    collapser: &'a mut Collapser,
    /// Live process (host pid) → the template it was restored from.
    restored_from: &'a mut HashMap<i32, i32>,
}

/// Rolls back onto `switch.layers` (with `mount`; without, the sandbox already is on the checkpoint's files: a
/// slow-path rollback did that first) and forks `captured` back.
fn rollback(
    ctx: RollbackCtx<'_>,
    switch: &SwitchSpec,
    mount: bool,
    captured: &mut [Captured],
) -> Result<RestoreReport, (String, bool)> {
    let RollbackCtx {
        init_pid,
        templates,
        teardown,
        collapser,
        restored_from,
    } = ctx;
    let start = Instant::now();
    let mut r = RestoreReport::default();
    for c in captured.iter_mut() {
        if !c.template.is_alive() {
            return Err((
                format!(
                    "the template of process {} is gone (killed from inside the sandbox?): this checkpoint's \
                     processes cannot be restored",
                    c.template.identity().ns_pid
                ),
                false,
            ));
        }
    }
    // Overlapped: the live processes die (their memory torn down, init reaping them) while the keeper mounts
    // the generation and pivots the sandbox onto it (pivot_root moves the templates' roots too, so their copies
    // start on it); then the templates fork, each on its own CPU.
    let t = Instant::now();
    // Large processes first get a holder of their memory (see `teardown`): killing them then frees their pids
    // at once, and the teardown happens after the reply.
    // (Not those in huge pages, or forked from a template in huge pages: they tear down fast anyway.)
    for pid in switch.cgroup.pids() {
        let cheap = collapser.is_cheap(pid)
            || restored_from
                .get(&pid)
                .is_some_and(|t| collapser.is_cheap(*t));
        if pid != init_pid && !templates.contains(&pid) && !cheap {
            teardown.hold_and_kill(pid);
        }
    }
    let mut spared = templates.clone();
    spared.extend(teardown.holders());
    let templates = &spared;
    let mut victims = Vec::new();
    signal_live(init_pid, switch, templates, &mut victims);
    r.kill_us = us(t);
    let t = Instant::now();
    // The pivot moves the templates' roots (and so their copies') along with the sandbox's.
    if mount {
        generation::Prepared::mount(switch)
            .and_then(|prepared| prepared.pivot())
            .map_err(|e| (e, false))?;
    }
    r.mount_us = us(t);
    let t = Instant::now();
    kill_live(init_pid, switch, templates, &mut victims).map_err(|e| (e, true))?;
    teardown.release_pids(
        &captured
            .iter()
            .map(|c| c.template.identity().ns_pid)
            .collect::<Vec<_>>(),
    );
    r.kill_us += us(t);
    let t = Instant::now();
    // A process without the sandbox's root capabilities cannot choose its copy's pid (`set_tid`); its copy is
    // made after the others, at a pid set up through `ns_last_pid`.
    let spawning: Vec<_> = captured
        .iter_mut()
        .map(|c| c.may_set_tid().then(|| c.template.start_spawn(true)))
        .collect();
    let mut forked = Vec::new();
    for (c, s) in captured.iter_mut().zip(spawning) {
        let child = match s {
            Some(Ok(s)) => c.template.finish_spawn(s),
            Some(Err(e)) => Err(e),
            None => spawn_at_last_pid(&mut c.template, init_pid),
        };
        let child = match child {
            // The pid was not free yet (see spawn_same_pid): once more, patiently.
            Err(deltabox_cr::Error::Inject(deltabox_sys::inject::InjectError::Io {
                source,
                ..
            })) if source.raw_os_error() == Some(libc::EEXIST) => spawn_same_pid(&mut c.template),
            other => other,
        };
        forked.push(
            child.map_err(|e| format!("restore process {}: {e}", c.template.identity().ns_pid)),
        );
    }
    r.fork_us += us(t);
    let generation = procfs::mnt_id(Path::new(&format!("/proc/{init_pid}/root")))
        .map_err(|e| format!("sandbox root: {e}"));
    // Every copy is held from here on; on any failure all of them are killed.
    let mut started: Vec<Tracee> = Vec::new();
    let mut failed = None;
    for child in forked {
        match child {
            Ok(c) => started.push(c),
            Err(e) => failed = failed.or(Some(e)),
        }
    }
    let mut rep = SwitchReport::default();
    let result = (|| -> Result<(), String> {
        if let Some(e) = failed {
            return Err(e);
        }
        let generation = generation?;
        for (c, child) in captured.iter().zip(started.iter_mut()) {
            let t = Instant::now();
            repoint_restored(child, c, generation, &mut rep)
                .map_err(|e| format!("restore process {}: {e}", c.template.identity().ns_pid))?;
            if c.stopped {
                // Queued while it is held: it stops again before running an instruction.
                let _ = nix::sys::signal::kill(child.tgid(), nix::sys::signal::Signal::SIGSTOP);
            }
            r.repoint_us += us(t);
            r.pids.push(c.template.identity().ns_pid);
        }
        Ok(())
    })();
    if let Err(e) = result {
        for child in &started {
            // SAFETY: kill(2) with plain integers.
            unsafe { libc::kill(child.tgid().as_raw(), libc::SIGKILL) };
        }
        return Err((
            format!("{e} (the files were rolled back; no process was restored)"),
            true,
        ));
    }
    r.notes = rep.notes;
    collapser.remove(&victims);
    restored_from.clear();
    for (c, child) in captured.iter().zip(&started) {
        restored_from.insert(child.tgid().as_raw(), c.template.pid().as_raw());
    }
    let t = Instant::now();
    for child in started {
        child.detach().map_err(|e| (e.to_string(), true))?;
    }
    r.repoint_us += us(t);
    r.total_us = us(start);
    Ok(r)
}

/// Descriptors of a session interpreter that get pipes of their own in a branch, in [`ForkReport::sessions`]
/// order (command, stdout, stderr, status), with whether the interpreter reads from it.
pub(crate) fn session_fds(kind: crate::SessionKind) -> [(i32, bool); 4] {
    let cmd = match kind {
        crate::SessionKind::Bash => 0,
        crate::SessionKind::Python3 => crate::session::PY_CMD_FD,
    };
    [
        (cmd, true),
        (1, false),
        (2, false),
        (crate::session::STATUS_FD, false),
    ]
}

/// Forks every template of a checkpoint into the branch `b` (see [`Template::spawn_into`]): same pids there,
/// files re-opened on the branch's generation, descriptors shared with the source cut (session pipes replaced by
/// new ones, returned), moved into the branch's cgroup, then let go. All or nothing: on failure every copy made
/// is killed and the templates stay as they were.
fn fork_branch(
    captured: &mut [Captured],
    b: &BranchTarget,
) -> Result<(ForkReport, Vec<OwnedFd>), String> {
    let start = Instant::now();
    let mut r = ForkReport::default();
    if captured.is_empty() {
        return Ok((r, Vec::new()));
    }
    // The injected setns calls run with each process's own credentials: root of the sandbox's user namespace.
    for c in captured.iter_mut() {
        let pid = c.template.pid().as_raw();
        // CAP_SYS_ADMIN (21) for setns, CAP_SYS_CHROOT (18) for a mount namespace.
        let needed = (1u64 << 21) | (1u64 << 18);
        match c.caps() {
            _ if !c.template.is_alive() => {
                return Err(format!(
                    "the template of process {} is gone (killed from inside the sandbox?): this checkpoint's \
                     processes cannot be forked",
                    c.template.identity().ns_pid
                ))
            }
            caps if caps & needed == needed => {}
            _ => {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                return Err(format!(
                    "process {} ({}) runs without the sandbox's root capabilities (it dropped them, e.g. with \
                     setpriv or su): it cannot move itself into a branch's namespaces, so this checkpoint's \
                     processes cannot be forked",
                    c.template.identity().ns_pid,
                    comm.trim()
                ));
            }
        }
    }
    let ns = deltabox_cr::BranchNamespaces::open(b.init_pid)
        .map_err(|e| format!("the branch's init is gone? {e}"))?;
    let generation = procfs::mnt_id(Path::new(&format!("/proc/{}/root", b.init_pid)))
        .map_err(|e| format!("branch root: {e}"))?;
    // Intermediates take pids above every pid the copies need.
    let top = captured
        .iter()
        .map(|c| c.template.identity().ns_pid)
        .max()
        .unwrap_or(1);
    let mut made: Vec<(usize, Tracee)> = Vec::new();
    let mut pipes = Vec::new();
    let result = (|| -> Result<(), String> {
        let t = Instant::now();
        for (i, c) in captured.iter_mut().enumerate() {
            let child = c
                .template
                .spawn_into(&ns, top + 1 + i as i32)
                .map_err(|e| format!("fork process {}: {e}", c.template.identity().ns_pid))?;
            made.push((i, child));
        }
        r.fork_us = us(t);
        let t = Instant::now();
        let mut rep = SwitchReport::default();
        for (i, child) in made.iter_mut() {
            let c = &captured[*i];
            let pid = c.template.identity().ns_pid;
            let what = |e: String| format!("process {pid} in the branch: {e}");
            // Cut first: what the copy's fixups re-create (sockets, epoll instances) is its own.
            let session = b.sessions.iter().find(|(p, _)| *p == pid).map(|(_, k)| *k);
            let keep: Vec<i32> = session
                .map(|kind| session_fds(kind).iter().map(|(fd, _)| *fd).collect())
                .unwrap_or_default();
            let cut = crate::fd_fixup::plan_branch(child.tgid().as_raw(), &keep);
            crate::fd_fixup::apply(child, &cut).map_err(what)?;
            repoint_restored(child, c, generation, &mut rep).map_err(what)?;
            if let Some(kind) = session {
                for (fd, reads) in session_fds(kind) {
                    pipes.push(
                        child
                            .replace_with_pipe(fd, reads)
                            .map_err(|e| what(format!("session pipe {fd}: {e}")))?,
                    );
                }
                r.sessions.push(pid);
            }
            if c.stopped {
                let _ = nix::sys::signal::kill(child.tgid(), nix::sys::signal::Signal::SIGSTOP);
            }
        }
        r.repoint_us = us(t);
        let t = Instant::now();
        for (_, child) in &made {
            for f in b.cgroup.procs_files() {
                std::fs::write(&f, child.tgid().as_raw().to_string())
                    .map_err(|e| format!("move into the branch's cgroup ({}): {e}", f.display()))?;
            }
        }
        r.cgroup_us = us(t);
        Ok(())
    })();
    if let Err(e) = result {
        for (_, child) in made {
            let pid = child.tgid();
            child.forget();
            deltabox_sys::inject::kill_tracee(pid);
        }
        return Err(e);
    }
    for (i, child) in made {
        r.pids.push(captured[i].template.identity().ns_pid);
        child.detach().map_err(|e| e.to_string())?;
    }
    r.total_us = us(start);
    Ok((r, pipes))
}
