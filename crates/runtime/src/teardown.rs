//! Keeping a rollback's memory teardown off its critical path.
//!
//! A killed process frees its pid only after its exit has torn its address space down: ~7 ms per GiB mapped by
//! small pages, and the rollback must wait for the pid (the restored copy takes it back). Before killing a
//! large process the keeper injects `clone(CLONE_VM)` into it: the *holder*, a stopped process sharing the
//! address space, never runs. The kill then only drops a reference to the memory and frees the pid at once; the
//! holder is killed after the rollback has been answered, and the teardown runs in its exit, in the background.

use std::time::{Duration, Instant};

use deltabox_sys::inject::{find_syscall_insn, kill_tracee, ForkSpec, Held, Tracee};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

/// Processes with smaller page tables than this (64 MiB mapped by small pages; any size in huge pages) tear
/// down faster than a holder is made (~0.2 ms).
const MIN_PAGE_TABLES: u64 = 128 << 10;

/// The holders made for one rollback.
#[derive(Debug, Default)]
pub struct Teardown {
    held: Vec<Held>,
}

/// Size of a process's page tables (`VmPTE`): what its teardown has to walk.
fn page_table_bytes(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| deltabox_sys::procfs::kb_field(&s, "VmPTE:"))
        .unwrap_or(0)
}

impl Teardown {
    /// If process `pid` (host pid) is large enough to be worth it, makes a holder for it and kills it. Best
    /// effort: a process that cannot be seized (exiting, traced by someone else) is left for the caller to kill
    /// the slow way.
    pub fn hold_and_kill(&mut self, pid: i32) {
        if page_table_bytes(pid) < MIN_PAGE_TABLES {
            return;
        }
        let p = Pid::from_raw(pid);
        let Ok(insn) = find_syscall_insn(p) else {
            return;
        };
        let Ok(mut t) = Tracee::seize(p, p, insn, Duration::from_secs(1)) else {
            return;
        };
        let spec = ForkSpec {
            flags: libc::CLONE_VM as u64,
            exit_signal: 0,
            set_tid: Vec::new(),
        };
        if let Ok(mut holder) = t.fork(&spec) {
            // Out of the process's session and group at once: as their id its pid would stay taken.
            let own_session = holder.syscall(libc::SYS_setsid, &[]).is_ok_and(|r| r >= 0);
            let hid = holder.tgid();
            match holder.keep_stopped() {
                Ok(held) if own_session => self.held.push(held),
                Ok(_) => kill_tracee(hid),
                Err(_) => {}
            }
        }
        // Killed while still held, so it never runs again; with a holder its exit leaves the memory alone.
        t.forget();
        kill_tracee(p);
    }

    /// Host pids of the holders (they live in the sandbox's cgroup: the kill must spare them).
    pub fn holders(&self) -> Vec<i32> {
        self.held.iter().map(|h| h.tid.as_raw()).collect()
    }

    /// Frees at once any holder whose pid in the sandbox is one of `wanted` (pids the rollback must give back),
    /// paying its teardown now: rare, the pids are fresh ones.
    pub fn release_pids(&mut self, wanted: &[i32]) {
        let (clash, keep): (Vec<Held>, Vec<Held>) =
            std::mem::take(&mut self.held).into_iter().partition(|h| {
                deltabox_sys::procfs::ns_pid(h.tid.as_raw()).is_some_and(|n| wanted.contains(&n))
            });
        self.held = keep;
        for h in clash {
            kill_tracee(h.tid);
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::path::Path::new(&format!("/proc/{}", h.tid)).exists()
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    /// Kills the holders and waits for them: their exits tear the memory down. Call after the rollback was
    /// answered.
    pub fn release(&mut self) {
        for h in &self.held {
            let _ = kill(h.tid, Signal::SIGKILL);
        }
        for h in self.held.drain(..) {
            let _ = waitpid(h.tid, Some(WaitPidFlag::__WALL));
        }
    }
}

impl Drop for Teardown {
    fn drop(&mut self) {
        self.release();
    }
}
