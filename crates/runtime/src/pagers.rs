//! The keeper's pager processes: each serves the lazily restored processes of one rollback from images
//! ([`deltabox_cr::pager`]) and exits once they are fully copied in (a second or so after). A process of its
//! own because the processes it serves block on it — the keeper must stay free for the next request — and
//! because the keeper is single-threaded (it forks and injects).

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use deltabox_cr::restore::LazyMemory;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// A running pager.
struct Pager {
    pid: Pid,
    /// Asks "tell me when everything is in" (one byte), answered with one byte; end of file once it is gone.
    control: OwnedFd,
    /// Questions asked, answers read (an answer to an earlier question that timed out is not this one's).
    asked: u64,
    answered: u64,
}

/// The pagers the keeper started.
#[derive(Default)]
pub(crate) struct Pagers {
    running: Vec<Pager>,
}

impl Pagers {
    /// Starts a pager for `lazy`. Must run before anything forks the processes (a fork waits for the pager).
    pub(crate) fn start(&mut self, lazy: Vec<LazyMemory>) -> Result<(), String> {
        if lazy.is_empty() {
            return Ok(());
        }
        let (ours, theirs) = rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::STREAM,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .map_err(|e| format!("pager socket: {e}"))?;
        // SAFETY: the keeper is single-threaded; the child only serves pages and exits.
        match unsafe { deltabox_sys::clone_process(0) } {
            Ok(deltabox_sys::CloneResult::Child) => {
                drop(ours);
                let code = match run(lazy, theirs) {
                    Ok(()) => 0,
                    Err(e) => {
                        eprintln!("deltabox pager: {e}");
                        1
                    }
                };
                // SAFETY: leave without running the keeper's destructors (its templates are not ours).
                unsafe { libc::_exit(code) }
            }
            Ok(deltabox_sys::CloneResult::Parent(pid)) => {
                let pager = Pager {
                    pid: Pid::from_raw(pid.as_raw_nonzero().get()),
                    control: ours,
                    asked: 0,
                    answered: 0,
                };
                // It must be serving before anything forks or runs the processes.
                let mut b = [0u8; 1];
                let ready = wait_readable(&pager.control, Duration::from_secs(5))
                    && rustix::io::read(&pager.control, &mut b) == Ok(1)
                    && b[0] == deltabox_cr::pager::READY;
                if !ready {
                    let _ = nix::sys::signal::kill(pager.pid, nix::sys::signal::Signal::SIGKILL);
                    let _ = waitpid(pager.pid, None);
                    return Err("the pager for lazily restored memory did not start".into());
                }
                self.running.push(pager);
                Ok(())
            }
            Err(e) => Err(format!("fork a pager: {e}")),
        }
    }

    /// Reaps the pagers that finished.
    pub(crate) fn poll(&mut self) {
        self.running.retain(|p| {
            matches!(
                waitpid(p.pid, Some(WaitPidFlag::WNOHANG)),
                Ok(WaitStatus::StillAlive)
            )
        });
    }

    /// Waits (at most `timeout`) until every process any pager serves is fully copied in: until then their
    /// memory is not all in place (an image taken of them would miss pages).
    pub(crate) fn wait_all_in(&mut self, timeout: Duration) -> Result<(), String> {
        self.poll();
        let deadline = Instant::now() + timeout;
        for p in self.running.iter_mut() {
            if rustix::io::write(&p.control, &[1]).is_err() {
                continue; // gone
            }
            p.asked += 1;
            while p.answered < p.asked {
                if !wait_readable(
                    &p.control,
                    deadline.saturating_duration_since(Instant::now()),
                ) {
                    return Err(format!(
                        "the memory of processes restored lazily is still being copied in after {timeout:?}"
                    ));
                }
                let mut b = [0u8; 64];
                match rustix::io::read(&p.control, &mut b) {
                    Ok(0) | Err(_) => break, // end of file: the pager is done and gone
                    Ok(n) => p.answered += n as u64,
                }
            }
        }
        Ok(())
    }
}

/// Whether `fd` becomes readable (data or end of file) within `timeout`.
fn wait_readable(fd: &OwnedFd, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one pollfd we own.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if n > 0 {
            return true;
        }
        if n == 0 || Instant::now() >= deadline {
            return false;
        }
    }
}

/// The pager process: nothing of the keeper's but what it serves.
fn run(lazy: Vec<LazyMemory>, control: OwnedFd) -> std::io::Result<()> {
    let mut keep: Vec<i32> = lazy
        .iter()
        .flat_map(|l| [l.uffd.raw(), l.pages.as_raw_fd()])
        .collect();
    keep.push(control.as_raw_fd());
    keep.push(2);
    // The keeper's descriptors (session pipes, templates' pidfds) must not be held open by us.
    let open: Vec<i32> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .collect();
    for fd in open {
        if !keep.contains(&fd) {
            // SAFETY: closes a descriptor nothing in this process uses any more (the directory listing's
            // own is closed already and fails harmlessly).
            unsafe { libc::close(fd) };
        }
    }
    // The processes it serves wait on it: never the OOM killer's first choice (it holds almost no memory of
    // its own: the images are mapped from the page cache).
    let _ = std::fs::write("/proc/self/oom_score_adj", "-1000");
    deltabox_cr::pager::serve(lazy, control)
}
