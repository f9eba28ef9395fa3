//! The zygote: a single-threaded helper that creates sandboxes, so the multi-threaded daemon never forks.
//!
//! It runs in a private mount namespace of its own that holds the read-only, non-recursive bind of the host root
//! every default sandbox uses as its lowest layer: when the zygote dies, that mount goes with it.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rustix::mount::{mount_bind, mount_change, mount_remount, MountFlags, MountPropagationFlags};

use crate::protocol::{NetworkMode, SandboxSpec, ZygoteReply, ZygoteRequest};
use crate::{Error, Result};

/// The descriptor number the zygote finds its socket at.
pub const ZYGOTE_FD: i32 = 3;

fn send_reply(
    sock: &OwnedFd,
    reply: &ZygoteReply,
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> io::Result<()> {
    let payload = serde_json::to_vec(reply).map_err(io::Error::other)?;
    deltabox_sys::fdpass::send_frame(sock, &payload, fds)
}

/// Zygote entry point (the process must be single-threaded). Returns when the daemon closes the socket.
pub fn run(sock: OwnedFd, host_root: &Path) -> io::Result<()> {
    rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
    // A branch's init is forked by a helper inside its source's namespaces and handed to us when it exits.
    rustix::process::set_child_subreaper(Some(
        rustix::process::Pid::from_raw(std::process::id() as i32)
            .ok_or_else(|| io::Error::other("pid 0"))?,
    ))?;
    // Sandbox inits are our children; nobody waits for them individually (the daemon sees their sockets close).
    // SAFETY: SIG_IGN installs no handler code.
    unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGCHLD,
            nix::sys::signal::SigHandler::SigIgn,
        )
    }
    .map_err(io::Error::other)?;
    // SAFETY: single-threaded process; unsharing NEWNS changes no memory-safety invariant.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS) }?;
    // Host mounts still propagate in; ours never propagate out.
    mount_change(
        "/",
        MountPropagationFlags::REC | MountPropagationFlags::DOWNSTREAM,
    )?;
    std::fs::create_dir_all(host_root)?;
    mount_bind("/", host_root)?;
    mount_remount(host_root, MountFlags::BIND | MountFlags::RDONLY, c"")?;
    send_reply(&sock, &ZygoteReply::Ready, &[])?;
    while let Some((payload, _fds)) = deltabox_sys::fdpass::recv_frame(&sock)? {
        let req: ZygoteRequest = serde_json::from_slice(&payload).map_err(io::Error::other)?;
        match req {
            ZygoteRequest::Create(spec) => match create(&spec) {
                Ok((pid, ctrl)) => {
                    send_reply(&sock, &ZygoteReply::Created { pid }, &[ctrl.as_fd()])?
                }
                Err(error) => send_reply(&sock, &ZygoteReply::Failed { error }, &[])?,
            },
            ZygoteRequest::StartKeeper { init_pid } => match start_keeper(init_pid) {
                Ok((pid, sock_k)) => send_reply(
                    &sock,
                    &ZygoteReply::KeeperStarted { pid },
                    &[sock_k.as_fd()],
                )?,
                Err(error) => send_reply(&sock, &ZygoteReply::Failed { error }, &[])?,
            },
            ZygoteRequest::Diff(spec) => match in_helper(|| crate::diff::diff(&spec)) {
                Ok(d) => send_reply(&sock, &ZygoteReply::Diffed(d), &[])?,
                Err(error) => send_reply(&sock, &ZygoteReply::Failed { error }, &[])?,
            },
            ZygoteRequest::Switch(spec) => match in_helper(|| crate::generation::switch(&spec)) {
                Ok(report) => send_reply(&sock, &ZygoteReply::Switched(report), &[])?,
                Err(error) => send_reply(&sock, &ZygoteReply::Failed { error }, &[])?,
            },
        }
    }
    Ok(())
}

/// Runs `f` in a forked helper (it may ptrace, fork and setns without disturbing the zygote) and returns its
/// JSON-encoded result.
fn in_helper<T: serde::Serialize + serde::de::DeserializeOwned>(
    f: impl FnOnce() -> std::result::Result<T, String>,
) -> std::result::Result<T, String> {
    let (r, w) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    // SAFETY: the zygote is single-threaded.
    match unsafe { deltabox_sys::clone_process(0) }.map_err(|e| format!("fork: {e}"))? {
        deltabox_sys::CloneResult::Child => {
            drop(r);
            // The helper waits for its own children.
            // SAFETY: SIG_DFL installs no handler code.
            let _ = unsafe {
                nix::sys::signal::signal(
                    nix::sys::signal::Signal::SIGCHLD,
                    nix::sys::signal::SigHandler::SigDfl,
                )
            };
            let out = serde_json::to_vec(&f()).unwrap_or_default();
            let _ = deltabox_sys::fdpass::send_frame(&w, &out, &[]);
            // SAFETY: leave without running the zygote's destructors.
            unsafe { libc::_exit(0) }
        }
        deltabox_sys::CloneResult::Parent(_) => {
            drop(w);
            match deltabox_sys::fdpass::recv_frame(&r) {
                Ok(Some((payload, _))) => {
                    serde_json::from_slice::<std::result::Result<T, String>>(&payload)
                        .map_err(|e| format!("helper: {e}"))?
                }
                _ => Err("the helper died".into()),
            }
        }
    }
}

/// Forks the keeper of a sandbox (see [`crate::keeper`]); returns its pid and our end of its socket.
fn start_keeper(init_pid: i32) -> std::result::Result<(i32, OwnedFd), String> {
    let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    // SAFETY: the zygote is single-threaded.
    match unsafe { deltabox_sys::clone_process(0) }.map_err(|e| format!("fork: {e}"))? {
        deltabox_sys::CloneResult::Child => {
            drop(ours);
            // Dies with the zygote (and its templates with it: they are traced with EXITKILL).
            let _ = rustix::process::set_parent_process_death_signal(Some(
                rustix::process::Signal::KILL,
            ));
            // It waits for its own children (generation switch helpers) and tracees.
            // SAFETY: SIG_DFL installs no handler code.
            let _ = unsafe {
                nix::sys::signal::signal(
                    nix::sys::signal::Signal::SIGCHLD,
                    nix::sys::signal::SigHandler::SigDfl,
                )
            };
            let code = match crate::keeper::run(OwnedFd::from(theirs), init_pid) {
                Ok(()) => 0,
                Err(_) => 1,
            };
            // SAFETY: leave without running the zygote's destructors.
            unsafe { libc::_exit(code) }
        }
        deltabox_sys::CloneResult::Parent(pid) => {
            drop(theirs);
            Ok((pid.as_raw_nonzero().get(), OwnedFd::from(ours)))
        }
    }
}

fn create(spec: &SandboxSpec) -> std::result::Result<(i32, OwnedFd), String> {
    let root_mnt = spec.layers.fsmount().map_err(|e| e.to_string())?;
    let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
    let (go_r, go_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| format!("pipe: {e}"))?;
    let (rep_r, rep_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| format!("pipe: {e}"))?;
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
    if spec.network == NetworkMode::None {
        flags |= libc::CLONE_NEWNET;
    }
    let pid = match spec.branch_of {
        None => {
            // SAFETY: the zygote is single-threaded (it is its own exec'd process and starts no threads).
            match unsafe {
                deltabox_sys::clone_process(flags | libc::CLONE_NEWUSER | libc::CLONE_NEWPID)
            }
            .map_err(|e| format!("clone: {e}"))?
            {
                deltabox_sys::CloneResult::Child => {
                    drop(ours);
                    drop(go_w);
                    drop(rep_r);
                    crate::init::sandbox_main(spec, root_mnt, OwnedFd::from(theirs), go_r, rep_w)
                }
                deltabox_sys::CloneResult::Parent(pid) => pid.as_raw_nonzero().get(),
            }
        }
        Some(source) => {
            let (pid_r, pid_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
                .map_err(|e| format!("pipe: {e}"))?;
            // SAFETY: the zygote is single-threaded.
            match unsafe { deltabox_sys::clone_process(0) }.map_err(|e| format!("fork: {e}"))? {
                deltabox_sys::CloneResult::Child => {
                    drop(pid_r);
                    let init = move || -> std::convert::Infallible {
                        drop(ours);
                        drop(go_w);
                        drop(rep_r);
                        crate::init::sandbox_main(
                            spec,
                            root_mnt,
                            OwnedFd::from(theirs),
                            go_r,
                            rep_w,
                        )
                    };
                    let msg = match branch_init(source, flags, init) {
                        Ok(pid) => pid.to_string(),
                        Err(e) => format!("E{e}"),
                    };
                    let _ = rustix::io::write(&pid_w, msg.as_bytes());
                    // SAFETY: leave without running the zygote's destructors.
                    unsafe { libc::_exit(0) }
                }
                deltabox_sys::CloneResult::Parent(_) => {}
            }
            drop(pid_w);
            let mut buf = [0u8; 512];
            let n = loop {
                match rustix::io::read(&pid_r, &mut buf) {
                    Err(rustix::io::Errno::INTR) => continue,
                    other => break other.map_err(|e| format!("read branch init pid: {e}"))?,
                }
            };
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let pid = match msg.strip_prefix('E') {
                Some(e) => return Err(e.to_string()),
                None => msg
                    .parse::<i32>()
                    .map_err(|_| "the branch helper died".to_string())?,
            };
            // The helper that forked it exits: the init becomes our child (we are a subreaper) before it runs.
            let me = std::process::id() as i32;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while deltabox_sys::procfs::parent_of(pid) != Some(me) {
                if std::time::Instant::now() > deadline {
                    // SAFETY: kill(2) with plain integers.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    return Err("the branch's init was not handed over to the zygote".into());
                }
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
            pid
        }
    };
    drop(theirs);
    drop(go_r);
    drop(rep_w);
    let kill = || {
        // SAFETY: kill(2) on our own child; plain integers.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    };
    // Identity map: sandbox root is uid 0 of its own user namespace (capabilities reach only its namespaces).
    let setup = || -> io::Result<()> {
        if spec.branch_of.is_none() {
            std::fs::write(format!("/proc/{pid}/uid_map"), "0 0 4294967295")?;
            std::fs::write(format!("/proc/{pid}/gid_map"), "0 0 4294967295")?;
        }
        for f in &spec.cgroup_procs {
            std::fs::write(f, pid.to_string())
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", f.display())))?;
        }
        rustix::io::write(&go_w, b"g")?;
        Ok(())
    };
    if let Err(e) = setup() {
        kill();
        return Err(format!("prepare sandbox init: {e}"));
    }
    drop(go_w);
    let mut report = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match rustix::io::read(&rep_r, &mut buf) {
            Ok(0) => break,
            Ok(n) => report.extend_from_slice(&buf[..n]),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                kill();
                return Err(format!("read setup report: {e}"));
            }
        }
        if report == b"OK" {
            break;
        }
    }
    if report != b"OK" {
        kill();
        let msg = String::from_utf8_lossy(&report).into_owned();
        return Err(if msg.is_empty() {
            "sandbox init died during setup".into()
        } else {
            msg
        });
    }
    Ok((pid, OwnedFd::from(ours)))
}

/// In a helper forked from the zygote: makes a branch's init, running `init`, and returns its host pid.
///
/// The init must lie in a new pid namespace one level below the source sandbox's (whose init is `source`), in
/// the source's user namespace, with new namespaces `flags`. The helper joins that user namespace (for good: so
/// not in the zygote itself) and makes the source's pid namespace the one for children; `CLONE_NEWPID` only
/// works where that is the caller's own, so a second helper (*maker*), born inside the source's pid namespace,
/// unshares the new one and clones the init (`CLONE_PARENT`: our child). When we exit, the init is handed to
/// the zygote, a child subreaper, like every sandbox's init.
fn branch_init(
    source: i32,
    flags: libc::c_int,
    init: impl FnOnce() -> std::convert::Infallible,
) -> std::result::Result<i32, String> {
    let pidfd = deltabox_sys::pidfd::open(source)
        .map_err(|e| format!("the source sandbox's init ({source}) is gone: {e}"))?;
    // (The helper is single-threaded, a fresh fork of the zygote: it may change its user namespace.)
    rustix::thread::move_into_thread_name_spaces(
        pidfd.as_fd(),
        rustix::thread::ThreadNameSpaceType::USER | rustix::thread::ThreadNameSpaceType::PROCESS_ID,
    )
    .map_err(|e| format!("join the source sandbox's namespaces: {e}"))?;
    drop(pidfd);
    let (made_r, made_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| format!("pipe: {e}"))?;
    // SAFETY: single-threaded (see above).
    let maker = match unsafe { deltabox_sys::clone_process(0) }.map_err(|e| format!("fork: {e}"))? {
        deltabox_sys::CloneResult::Child => {
            drop(made_r);
            // SAFETY: single-threaded; unsharing a pid namespace only affects later children.
            let r = unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWPID) }
                .map_err(|e| e.raw_os_error())
                .and_then(|()| {
                    // SAFETY: single-threaded.
                    match unsafe { deltabox_sys::clone_process(flags | libc::CLONE_PARENT) } {
                        Ok(deltabox_sys::CloneResult::Child) => match init() {},
                        Ok(deltabox_sys::CloneResult::Parent(_)) => Ok(()),
                        Err(e) => Err(e.raw_os_error().unwrap_or(libc::EIO)),
                    }
                });
            let msg = match r {
                Ok(()) => "ok".to_string(),
                Err(errno) => errno.to_string(),
            };
            let _ = rustix::io::write(&made_w, msg.as_bytes());
            // SAFETY: leave without running the zygote's destructors.
            unsafe { libc::_exit(0) }
        }
        deltabox_sys::CloneResult::Parent(pid) => pid.as_raw_nonzero().get(),
    };
    drop(made_w);
    let mut b = [0u8; 16];
    let n = rustix::io::read(&made_r, &mut b).unwrap_or(0);
    match std::str::from_utf8(&b[..n]) {
        Ok("ok") => {}
        // The kernel nests pid namespaces at most 32 deep.
        Ok(e) if e == libc::ENOSPC.to_string() => {
            return Err(
                "fork depth limit: pid namespaces nest at most 32 levels deep (fork an earlier \
                 checkpoint, or a checkpoint of a sandbox fewer forks down)"
                    .to_string(),
            )
        }
        Ok("") => return Err("make the branch's init: the helper died".into()),
        Ok(e) => {
            return Err(format!(
                "make the branch's init: {}",
                io::Error::from_raw_os_error(e.parse().unwrap_or(libc::EIO))
            ))
        }
        Err(_) => return Err("make the branch's init: garbled reply".into()),
    }
    // The maker exits right after saying so, and (SIGCHLD ignored, as in the zygote) is reaped at once: a child
    // leaving while `children` is read can make the read skip another one — the init ("died at once", seen
    // under load). So it must be gone first.
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(maker), None);
    // Our only child now.
    let me = std::process::id();
    let children = std::fs::read_to_string(format!("/proc/{me}/task/{me}/children"))
        .map_err(|e| format!("find the branch's init: {e}"))?;
    children
        .split_whitespace()
        .filter_map(|c| c.parse::<i32>().ok())
        .find(|c| *c != maker)
        .ok_or_else(|| "the branch's init died at once".to_string())
}

/// The daemon's side of the zygote.
#[derive(Debug)]
pub struct Zygote {
    sock: Mutex<UnixStream>,
    child: Mutex<std::process::Child>,
    host_root: PathBuf,
}

impl Zygote {
    /// Starts `exe __zygote --host-root HOST_ROOT` and waits until it is ready.
    ///
    /// Call this from a thread that lives as long as the daemon (the main thread): the zygote's parent-death
    /// signal fires when the *thread* that spawned it exits.
    pub fn spawn(exe: &Path, host_root: &Path) -> Result<Zygote> {
        use std::os::unix::process::CommandExt;
        let (ours, theirs) = UnixStream::pair().map_err(Error::io("socketpair"))?;
        let theirs_fd = theirs.as_raw_fd();
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("__zygote")
            .arg("--host-root")
            .arg(host_root)
            .stdin(std::process::Stdio::null());
        // SAFETY: the closure runs between fork and exec and only calls dup2, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(theirs_fd, ZYGOTE_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(Error::io("start zygote"))?;
        drop(theirs);
        let z = Zygote {
            sock: Mutex::new(ours),
            child: Mutex::new(child),
            host_root: host_root.to_path_buf(),
        };
        match z.recv()? {
            (ZygoteReply::Ready, _) => Ok(z),
            (other, _) => Err(Error::Zygote(format!("unexpected first message {other:?}"))),
        }
    }

    /// The zygote's bind mount of the host root (the default image's lowest layer).
    pub fn host_root(&self) -> &Path {
        &self.host_root
    }

    fn recv(&self) -> Result<(ZygoteReply, Vec<OwnedFd>)> {
        let sock = self
            .sock
            .lock()
            .map_err(|_| Error::Zygote("lock poisoned".into()))?;
        Self::recv_locked(&sock)
    }

    fn recv_locked(sock: &UnixStream) -> Result<(ZygoteReply, Vec<OwnedFd>)> {
        let (payload, fds) = deltabox_sys::fdpass::recv_frame(sock)
            .map_err(|e| Error::Zygote(e.to_string()))?
            .ok_or_else(|| Error::Zygote("exited".into()))?;
        let reply = serde_json::from_slice(&payload).map_err(|e| Error::Zygote(e.to_string()))?;
        Ok((reply, fds))
    }

    /// Sends one request and waits for its reply (blocking; requests are serialised).
    fn request(&self, req: ZygoteRequest) -> Result<(ZygoteReply, Vec<OwnedFd>)> {
        let sock = self
            .sock
            .lock()
            .map_err(|_| Error::Zygote("lock poisoned".into()))?;
        let payload = serde_json::to_vec(&req).map_err(|e| Error::Zygote(e.to_string()))?;
        deltabox_sys::fdpass::send_frame(&*sock, &payload, &[])
            .map_err(|e| Error::Zygote(format!("exited? {e}")))?;
        Self::recv_locked(&sock)
    }

    /// Creates a sandbox (blocking). Returns init's host pid and its control socket.
    pub fn create(&self, spec: &SandboxSpec) -> Result<(i32, UnixStream)> {
        match self.request(ZygoteRequest::Create(spec.clone()))? {
            (ZygoteReply::Created { pid }, mut fds) if fds.len() == 1 => {
                let fd = fds.remove(0);
                Ok((pid, UnixStream::from(fd)))
            }
            (ZygoteReply::Failed { error }, _) => Err(Error::Setup(error)),
            (other, _) => Err(Error::Zygote(format!("unexpected reply {other:?}"))),
        }
    }

    /// Moves a running sandbox onto a new generation (blocking). See [`crate::generation`].
    pub fn switch(
        &self,
        spec: &crate::generation::SwitchSpec,
    ) -> Result<crate::generation::SwitchReport> {
        match self.request(ZygoteRequest::Switch(spec.clone()))? {
            (ZygoteReply::Switched(report), _) => Ok(report),
            (ZygoteReply::Failed { error }, _) => Err(Error::Checkpoint(error)),
            (other, _) => Err(Error::Zygote(format!("unexpected reply {other:?}"))),
        }
    }

    /// Starts the keeper of the sandbox whose init is `init_pid` (blocking). See [`crate::keeper`].
    pub fn start_keeper(&self, init_pid: i32) -> Result<Keeper> {
        match self.request(ZygoteRequest::StartKeeper { init_pid })? {
            (ZygoteReply::KeeperStarted { pid }, mut fds) if fds.len() == 1 => Ok(Keeper {
                pid,
                sock: Mutex::new(UnixStream::from(fds.remove(0))),
            }),
            (ZygoteReply::Failed { error }, _) => Err(Error::Zygote(format!("keeper: {error}"))),
            (other, _) => Err(Error::Zygote(format!("unexpected reply {other:?}"))),
        }
    }

    /// Compares two checkpoints' layers (blocking). See [`crate::diff`].
    pub fn diff(&self, spec: &crate::diff::DiffSpec) -> Result<crate::diff::DiffResult> {
        match self.request(ZygoteRequest::Diff(spec.clone()))? {
            (ZygoteReply::Diffed(d), _) => Ok(d),
            (ZygoteReply::Failed { error }, _) => Err(Error::Zygote(format!("diff: {error}"))),
            (other, _) => Err(Error::Zygote(format!("unexpected reply {other:?}"))),
        }
    }

    /// Whether the zygote process is still running.
    pub fn is_alive(&self) -> bool {
        self.child
            .lock()
            .map(|mut c| matches!(c.try_wait(), Ok(None)))
            .unwrap_or(false)
    }
}

/// The daemon's side of a sandbox's keeper. Dropping it closes the socket, which ends the keeper and with it
/// every template it holds.
#[derive(Debug)]
pub struct Keeper {
    pid: i32,
    sock: Mutex<UnixStream>,
}

impl Keeper {
    /// Host pid of the keeper.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends one request and waits for the reply (blocking).
    pub fn request(
        &self,
        req: &crate::keeper::KeeperRequest,
    ) -> Result<crate::keeper::KeeperReply> {
        self.request_with_fds(req).map(|(reply, _)| reply)
    }

    /// [`Keeper::request`] for replies that carry descriptors ([`crate::keeper::KeeperReply::Forked`]).
    pub fn request_with_fds(
        &self,
        req: &crate::keeper::KeeperRequest,
    ) -> Result<(crate::keeper::KeeperReply, Vec<OwnedFd>)> {
        self.request_sending(req, &[])
    }

    /// [`Keeper::request_with_fds`] for requests that carry descriptors too
    /// ([`crate::keeper::KeeperRequest::RollbackImages`]).
    pub fn request_sending(
        &self,
        req: &crate::keeper::KeeperRequest,
        send: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<(crate::keeper::KeeperReply, Vec<OwnedFd>)> {
        let sock = self
            .sock
            .lock()
            .map_err(|_| Error::Zygote("keeper lock poisoned".into()))?;
        let payload = serde_json::to_vec(req).map_err(|e| Error::Zygote(e.to_string()))?;
        deltabox_sys::fdpass::send_frame(&*sock, &payload, send)
            .map_err(|e| Error::Zygote(format!("keeper exited? {e}")))?;
        let (payload, fds) = deltabox_sys::fdpass::recv_frame(&*sock)
            .map_err(|e| Error::Zygote(format!("keeper: {e}")))?
            .ok_or_else(|| Error::Zygote("the keeper exited".into()))?;
        let reply = serde_json::from_slice(&payload).map_err(|e| Error::Zygote(e.to_string()))?;
        Ok((reply, fds))
    }
}

/// Takes the zygote socket the daemon passed at [`ZYGOTE_FD`].
///
/// # Safety
/// Call once, in the zygote process, before anything else could have claimed descriptor 3.
pub unsafe fn inherited_socket() -> OwnedFd {
    // SAFETY: the daemon installed the socket at ZYGOTE_FD before exec; the caller guarantees single ownership.
    unsafe { OwnedFd::from_raw_fd(ZYGOTE_FD) }
}
