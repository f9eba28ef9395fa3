//! Background huge-page collapse of a sandbox's large processes and templates, for the keeper.
//!
//! Fork and exit cost one page-table entry per 4 KiB page (a 1 GiB heap: ~9 ms to fork, as much to tear down);
//! mapped by 2 MiB pages they cost 512 entries. After a process checkpoint the keeper queues every template and
//! live process with enough small-page anonymous memory; one low-priority helper process at a time collapses
//! them (`process_madvise(MADV_COLLAPSE)`, a one-time copy of about 2 s per GiB), so later rollbacks to that
//! checkpoint fork and tear down in well under a millisecond, and later checkpoints of the live process too. The
//! price: a collapsed template no longer shares its pages with the live process it was taken from (its memory
//! cost becomes its full size, reported and budgeted like any other template), and the first write to a huge
//! page after a rollback splits its mapping (bench cr measures it).
//!
//! The helper is a child of the keeper (the keeper is single-threaded and must stay so: it forks switch helpers
//! and pivots), dies with it, and is reaped whenever the keeper handles a request.

use std::collections::{HashSet, VecDeque};
use std::os::fd::OwnedFd;

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Processes with less small-page anonymous memory than this fork fast enough as they are.
const MIN_SMALL_BYTES: u64 = 32 << 20;

/// The keeper's collapse queue and its running helper.
#[derive(Debug, Default)]
pub struct Collapser {
    queue: VecDeque<i32>,
    running: Option<(Pid, Vec<i32>)>,
    /// The running helper writes the pid of every process it left cheap to tear down (collapsed, or with little
    /// small-page memory anyway), one per line.
    results: Option<OwnedFd>,
    partial: Vec<u8>,
    cheap: HashSet<i32>,
}

impl Collapser {
    /// Queues processes (host pids) and starts a helper if none runs. The helper skips those with too little
    /// small-page memory to be worth it (finding out walks page tables: not the keeper's job).
    pub fn add(&mut self, pids: impl IntoIterator<Item = i32>) {
        for pid in pids {
            if !self.pending(pid) {
                self.queue.push_back(pid);
            }
        }
        self.poll();
    }

    /// Drops processes that went away (templates forgotten, processes killed).
    pub fn remove(&mut self, pids: &[i32]) {
        self.queue.retain(|p| !pids.contains(p));
        for p in pids {
            self.cheap.remove(p);
        }
    }

    /// Whether the helper found `pid` (a template or a live process) mapped mostly by huge pages or small
    /// anyway: its exit is cheap.
    pub fn is_cheap(&self, pid: i32) -> bool {
        self.cheap.contains(&pid)
    }

    fn read_results(&mut self) {
        let Some(fd) = &self.results else { return };
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = rustix::io::read(fd, &mut buf) {
            self.partial.extend_from_slice(&buf[..n]);
        }
        while let Some(nl) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=nl).collect();
            if let Some(pid) = std::str::from_utf8(&line)
                .ok()
                .and_then(|l| l.trim().parse().ok())
            {
                self.cheap.insert(pid);
            }
        }
    }

    /// Whether `pid` waits for or is in a collapse.
    pub fn pending(&self, pid: i32) -> bool {
        self.queue.contains(&pid) || self.running.as_ref().is_some_and(|(_, b)| b.contains(&pid))
    }

    /// Reaps a finished helper and starts the next batch.
    pub fn poll(&mut self) {
        self.read_results();
        if let Some((helper, _)) = &self.running {
            match waitpid(*helper, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => return,
                _ => {
                    self.running = None;
                    self.read_results();
                    self.results = None;
                }
            }
        }
        if self.queue.is_empty() {
            return;
        }
        let Ok((r, w)) = rustix::pipe::pipe_with(
            rustix::pipe::PipeFlags::CLOEXEC | rustix::pipe::PipeFlags::NONBLOCK,
        ) else {
            return;
        };
        let batch: Vec<i32> = self.queue.drain(..).collect();
        // SAFETY: the keeper is single-threaded; the child only runs `collapse_all` and exits.
        match unsafe { deltabox_sys::clone_process(0) } {
            Ok(deltabox_sys::CloneResult::Child) => {
                drop(r);
                collapse_all(&batch, &w);
                // SAFETY: leave without running the keeper's destructors (its templates are not ours).
                unsafe { libc::_exit(0) }
            }
            Ok(deltabox_sys::CloneResult::Parent(pid)) => {
                self.running = Some((Pid::from_raw(pid.as_raw_nonzero().get()), batch));
                self.results = Some(r);
            }
            // No helper now: the processes simply stay as they are.
            Err(_) => {}
        }
    }
}

impl Drop for Collapser {
    fn drop(&mut self) {
        if let Some((helper, _)) = self.running.take() {
            let _ = nix::sys::signal::kill(helper, nix::sys::signal::Signal::SIGKILL);
            let _ = waitpid(helper, None);
        }
    }
}

fn collapse_all(pids: &[i32], results: &OwnedFd) {
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    // Background work: yield to the sandbox and everything else.
    // SAFETY: setpriority(2) on ourselves with plain integers.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
    for &pid in pids {
        let Ok(mem) = deltabox_sys::hugepage::anon_memory(pid) else {
            continue;
        };
        let cheap = mem.small() < MIN_SMALL_BYTES
            || deltabox_sys::hugepage::collapse(pid).is_ok_and(|c| c.failed == 0)
                && deltabox_sys::hugepage::anon_memory(pid)
                    .is_ok_and(|m| m.small() < MIN_SMALL_BYTES);
        if cheap {
            // The pipe holds far more than a batch's worth of lines; a full pipe only loses the hint.
            let _ = rustix::io::write(results, format!("{pid}\n").as_bytes());
        }
    }
}
