//! The pager of lazily restored processes ([`crate::restore::Fill::Lazy`]): serves each missing page a process
//! touches from its image, copies the rest in the background, and follows the process's forks, `munmap`s,
//! `mremap`s and `MADV_DONTNEED`s so that a missing page always reads what it must — the image's byte where the
//! image has one and nothing has dropped it since, zero everywhere else.
//!
//! One pager serves the processes of one rollback; it runs in a process of its own (see the keeper) and ends
//! when every process it serves is fully copied.

use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use deltabox_sys::uffd::{Copied, Event, Uffd, PAGE};

use crate::restore::LazyMemory;

/// Pages copied per background step (between two looks at the faults).
const STEP: u64 = 128 << 10;
/// Pages copied around a faulting one (the neighbours are usually next).
const AROUND: u64 = 16 * PAGE;
/// How long a fully copied process's context stays open, for a fork that raced the end of the copy.
const GRACE: Duration = Duration::from_secs(1);
/// How long a memory whose copy failed (its sandbox out of memory, say) waits before the next try.
const BACKOFF: Duration = Duration::from_millis(50);
/// Sent on the control socket once every pages file is mapped: from then on the pager serves.
pub const READY: u8 = 0xFF;

/// A pages file mapped read-only: the source of every copy.
struct Source {
    base: *const u8,
    len: usize,
}

impl Source {
    fn map(f: &std::fs::File) -> std::io::Result<Source> {
        let len = f.metadata()?.len() as usize;
        if len == 0 {
            return Ok(Source {
                base: std::ptr::null(),
                len: 0,
            });
        }
        // SAFETY: a new read-only shared mapping of a file we hold; nothing else is mapped at its address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Source {
            base: p.cast(),
            len,
        })
    }
}

impl Drop for Source {
    fn drop(&mut self) {
        if !self.base.is_null() {
            // SAFETY: unmaps exactly the mapping made in `map`, used by nobody after this.
            unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
        }
    }
}

/// Address ranges, each with where its bytes are in the pages file: `(address, length, offset)`, sorted.
pub type Runs = Vec<(u64, u64, u64)>;

/// Removes `[start, end)` from `runs`.
pub fn subtract(runs: &mut Runs, start: u64, end: u64) {
    let mut out = Vec::with_capacity(runs.len() + 1);
    for &(a, l, o) in runs.iter() {
        let e = a + l;
        if e <= start || a >= end {
            out.push((a, l, o));
            continue;
        }
        if a < start {
            out.push((a, start - a, o));
        }
        if e > end {
            out.push((end, e - end, o + (end - a)));
        }
    }
    *runs = out;
}

/// Moves what `runs` has in `[from, from+len)` to `to` (after `mremap`); what was at the destination is gone.
pub fn remap(runs: &mut Runs, from: u64, to: u64, len: u64) {
    let mut moved = runs.clone();
    moved.retain(|&(a, l, _)| a < from + len && a + l > from);
    subtract(runs, from, from + len);
    subtract(runs, to, to + len);
    for (a, l, o) in moved {
        let s = a.max(from);
        let e = (a + l).min(from + len);
        runs.push((s - from + to, e - s, o + (s - a)));
    }
    runs.sort_unstable();
}

/// Where the image byte for `addr` is, if the image has one there.
fn lookup(runs: &Runs, addr: u64) -> Option<(u64, u64, u64)> {
    let i = runs.partition_point(|&(a, _, _)| a <= addr);
    let (a, l, o) = *runs.get(i.checked_sub(1)?)?;
    (addr < a + l).then_some((a, l, o))
}

/// The memory of one process being served.
struct Space {
    uffd: Uffd,
    source: Rc<Source>,
    /// What a missing page holds (image content); elsewhere a missing page is zero.
    runs: Runs,
    /// What is still to be copied in the background.
    todo: Runs,
    /// The mappings registered (to unregister once everything is in).
    registered: Runs,
    /// When everything was in (its context is kept a little while for racing forks).
    done_at: Option<Instant>,
    /// Faults to serve again once the layout change that made them fail is read.
    retry: Vec<u64>,
    gone: bool,
    /// After a failed copy: no new try before this (the process waits; it never reads a wrong byte).
    backoff: Option<Instant>,
    /// The last failure, reported once.
    failed: Option<String>,
}

impl Space {
    fn new(uffd: Uffd, source: Rc<Source>, runs: Runs, registered: Runs) -> Space {
        Space {
            uffd,
            source,
            todo: runs.clone(),
            runs,
            registered,
            done_at: None,
            retry: Vec::new(),
            gone: false,
            backoff: None,
            failed: None,
        }
    }

    /// Notes a failure: the work is retried after [`BACKOFF`]; the pager never gives up on a live process (its
    /// missing pages would read zero once our descriptor closed).
    fn fail(&mut self, e: std::io::Error) {
        let msg = e.to_string();
        if self.failed.as_deref() != Some(msg.as_str()) {
            eprintln!("deltabox pager: {msg} (retrying)");
            self.failed = Some(msg);
        }
        self.backoff = Some(Instant::now() + BACKOFF);
    }

    fn waiting(&self, now: Instant) -> bool {
        self.backoff.is_some_and(|t| now < t)
    }
}

impl Space {
    /// Copies `len` bytes of run `(a, _, o)` starting at `addr` in; returns what came back.
    fn copy(&self, addr: u64, len: u64, run: (u64, u64, u64)) -> std::io::Result<Copied> {
        let off = run.2 + (addr - run.0);
        if off + len > self.source.len as u64 {
            return Err(std::io::Error::other(format!(
                "the pages file ends before {:#x}",
                off + len
            )));
        }
        // SAFETY: `off + len` is inside the read-only mapping of the pages file (checked above).
        unsafe {
            self.uffd
                .copy(addr, self.source.base.add(off as usize), len)
        }
    }

    fn serve_fault(&mut self, addr: u64) -> std::io::Result<()> {
        match lookup(&self.runs, addr) {
            Some(run) => {
                let len = (run.0 + run.1 - addr).min(AROUND);
                match self.copy(addr, len, run)? {
                    Copied::All => {}
                    Copied::UpToPresent(0) | Copied::Unregistered(0) => {
                        // Copied in meanwhile: its waiters were woken then; wake any left anyway.
                        self.uffd.wake(addr, PAGE)?;
                    }
                    Copied::UpToPresent(_) | Copied::Unregistered(_) => {}
                    Copied::Retry(0) => self.retry.push(addr),
                    Copied::Retry(_) => {}
                    Copied::Gone => self.gone = true,
                }
            }
            None => match self.uffd.zeropage(addr, PAGE) {
                Ok(true) => {}
                Ok(false) => self.gone = true,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => self.retry.push(addr),
                Err(e) => return Err(e),
            },
        }
        Ok(())
    }

    /// One background step: copies up to [`STEP`] bytes of what is left.
    fn step(&mut self) -> std::io::Result<()> {
        let Some(&(a, l, o)) = self.todo.first() else {
            return Ok(());
        };
        let len = l.min(STEP);
        let advanced = match self.copy(a, len, (a, l, o))? {
            Copied::All => len,
            // The page after is there already (or not ours): skip it too.
            Copied::UpToPresent(n) | Copied::Unregistered(n) => n + PAGE,
            Copied::Retry(n) => n,
            Copied::Gone => {
                self.gone = true;
                return Ok(());
            }
        };
        subtract(&mut self.todo, a, a + advanced.min(l));
        Ok(())
    }
}

/// Serves `lazy` until every process is fully copied in (or gone). `control` (a stream socket to the keeper):
/// [`READY`] is sent once serving starts; then each byte read asks for one byte back once nothing is left to
/// copy. A failed copy (the sandbox at its memory limit, say) is retried, never given up while the process
/// lives: its missing pages would read zero once our descriptor closed. Returns early only when it cannot start.
pub fn serve(lazy: Vec<LazyMemory>, control: OwnedFd) -> std::io::Result<()> {
    let mut spaces = Vec::new();
    for l in lazy {
        let source = Rc::new(Source::map(&l.pages)?);
        let mut runs = l.runs;
        runs.sort_unstable();
        let registered = l.registered.iter().map(|&(a, n)| (a, n, 0)).collect();
        spaces.push(Space::new(l.uffd, source, runs, registered));
    }
    rustix::io::write(&control, &[READY])?;
    let mut asked = 0usize;
    let mut control_open = true;
    loop {
        // Events first: a fault waits on us; a fork's parent waits until we read it.
        let mut pfds: Vec<libc::pollfd> = spaces
            .iter()
            .map(|s| libc::pollfd {
                fd: s.uffd.raw(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        if control_open {
            pfds.push(libc::pollfd {
                fd: control.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let now = Instant::now();
        let busy = spaces
            .iter()
            .any(|s| !s.waiting(now) && (!s.todo.is_empty() || !s.retry.is_empty()));
        let timeout = if busy {
            0
        } else if spaces.iter().any(|s| s.backoff.is_some()) {
            BACKOFF.as_millis() as i32
        } else {
            100
        };
        // SAFETY: poll(2) on `pfds.len()` pollfd structs we own.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            // (EINTR, or no memory for the poll table: look again shortly; never leave the processes.)
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut born = Vec::new();
        for i in 0..spaces.len() {
            if pfds[i].revents == 0 {
                continue;
            }
            loop {
                let s = &mut spaces[i];
                let ev = match s.uffd.read_event() {
                    Ok(Some(ev)) => ev,
                    Ok(None) => break,
                    Err(e) => {
                        s.fail(e);
                        break;
                    }
                };
                match ev {
                    Event::Fault { addr, .. } => {
                        if s.waiting(Instant::now()) {
                            s.retry.push(addr);
                        } else if let Err(e) = s.serve_fault(addr) {
                            s.retry.push(addr);
                            s.fail(e);
                        }
                    }
                    // What the parent had copied may not be in the child: it tries all of it (present pages
                    // are skipped by the kernel).
                    Event::Fork(uffd) => born.push(Space::new(
                        uffd,
                        s.source.clone(),
                        s.runs.clone(),
                        s.registered.clone(),
                    )),
                    Event::Remap { from, to, len } => {
                        remap(&mut s.runs, from, to, len);
                        remap(&mut s.todo, from, to, len);
                        remap(&mut s.registered, from, to, len);
                    }
                    Event::Remove { start, end } => {
                        subtract(&mut s.runs, start, end);
                        subtract(&mut s.todo, start, end);
                    }
                    Event::Unmap { start, end } => {
                        subtract(&mut s.runs, start, end);
                        subtract(&mut s.todo, start, end);
                        subtract(&mut s.registered, start, end);
                    }
                }
            }
        }
        spaces.extend(born);
        if control_open && pfds.last().is_some_and(|p| p.revents != 0) {
            let mut b = [0u8; 64];
            match rustix::io::read(&control, &mut b) {
                Ok(0) | Err(_) => control_open = false,
                Ok(k) => asked += k,
            }
        }
        let now = Instant::now();
        for s in spaces.iter_mut().filter(|s| !s.waiting(now)) {
            let retry = std::mem::take(&mut s.retry);
            for (k, &addr) in retry.iter().enumerate() {
                if let Err(e) = s.serve_fault(addr) {
                    s.retry.extend_from_slice(&retry[k..]);
                    s.fail(e);
                    break;
                }
            }
        }
        // Background copying, the running processes first (a new space is a fork: usually the live copy).
        if let Some(s) = spaces
            .iter_mut()
            .rev()
            .find(|s| !s.todo.is_empty() && !s.gone && !s.waiting(now))
        {
            if let Err(e) = s.step() {
                s.fail(e);
            }
        }
        let now = Instant::now();
        for s in spaces.iter_mut() {
            if s.todo.is_empty() && s.done_at.is_none() && !s.gone {
                // Everything is in: a missing page now only ever reads zero, which the kernel does itself.
                for &(a, l, _) in &s.registered {
                    let _ = s.uffd.unregister(a, l);
                }
                s.done_at = Some(now);
            }
        }
        spaces.retain(|s| !s.gone && s.done_at.is_none_or(|t| now - t < GRACE));
        let copying = spaces.iter().any(|s| s.done_at.is_none());
        if asked > 0 && !copying {
            let reply = vec![1u8; asked];
            if rustix::io::write(&control, &reply).is_err() {
                control_open = false;
            }
            asked = 0;
        }
        if spaces.is_empty() {
            return Ok(());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The byte source of every page in `[0, 64)` pages, as a plain map: None = zero.
    fn model(runs: &Runs) -> Vec<Option<u64>> {
        (0..64u64)
            .map(|p| lookup(runs, p * PAGE).map(|(a, _, o)| o + (p * PAGE - a)))
            .collect()
    }

    #[test]
    fn subtract_and_remap_agree_with_a_page_model() {
        let mut seed = 7u64;
        let mut rnd = |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        for _ in 0..300 {
            let mut runs: Runs = vec![(2 * PAGE, 10 * PAGE, 0), (20 * PAGE, 20 * PAGE, 10 * PAGE)];
            let mut pages = model(&runs);
            for _ in 0..8 {
                let s = rnd(48);
                let l = 1 + rnd(12);
                if rnd(2) == 0 {
                    subtract(&mut runs, s * PAGE, (s + l) * PAGE);
                    for p in s..(s + l).min(64) {
                        pages[p as usize] = None;
                    }
                } else {
                    let to = rnd(48);
                    let l = l.min(64 - to).min(64 - s);
                    remap(&mut runs, s * PAGE, to * PAGE, l * PAGE);
                    let moved: Vec<_> = (s..s + l).map(|p| pages[p as usize]).collect();
                    for p in s..s + l {
                        pages[p as usize] = None;
                    }
                    for (i, v) in moved.into_iter().enumerate() {
                        pages[(to + i as u64) as usize] = v;
                    }
                }
                assert_eq!(model(&runs), pages);
                assert!(runs.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0));
            }
        }
    }
}
