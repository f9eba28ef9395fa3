//! The sandbox's pid 1: sets the sandbox up from inside, then forks programs on the daemon's request, reaps
//! every zombie, reports the exits of what it started, and ignores signals sent from inside.
//!
//! Init never execs: it is a fork of the single-threaded zygote, so it needs no binary inside the sandbox.

use std::collections::HashSet;
use std::ffi::CString;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use rustix::event::{poll, PollFd, PollFlags};

use crate::protocol::{ExitStatus, InitEvent, InitRequest, NetworkMode, SandboxSpec};

/// Descriptors installed in a child are first moved at or above this number so they cannot collide with targets.
const FD_STAGING: RawFd = 256;

/// Entry point of the cloned child. Never returns.
///
/// `go` is readable once the zygote has written our uid/gid maps and placed us in the cgroup; `report` gets
/// `OK` or the error that stopped the setup.
pub fn sandbox_main(
    spec: &SandboxSpec,
    root_mnt: OwnedFd,
    ctrl: OwnedFd,
    go: OwnedFd,
    report: OwnedFd,
) -> ! {
    let mut report = std::fs::File::from(report);
    let _ = rustix::thread::set_name(c"deltabox-init");
    hide_command_line();
    let mut b = [0u8; 1];
    if rustix::io::read(&go, &mut b) != Ok(1) {
        std::process::exit(1);
    }
    drop(go);
    // Die with the zygote (and so with the daemon) instead of lingering unowned. Set only now: a branch's init
    // is the zygote's child only from the go on (see `zygote::branch_init`).
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL));
    match setup(spec, root_mnt) {
        Ok(()) => {
            let _ = report.write_all(b"OK");
            drop(report);
            run(ctrl)
        }
        Err(e) => {
            let _ = report.write_all(e.to_string().as_bytes());
            std::process::exit(1)
        }
    }
}

/// Replaces the command line inherited from the zygote (it names the daemon's state directory) with
/// `deltabox-init`: everything in the sandbox can read `/proc/1/cmdline`.
fn hide_command_line() {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    // Fields after the command name (which may hold spaces) start at field 3; arg_start and arg_end are 48, 49.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<usize>().ok());
    let (Some(start), Some(end)) = (field(48), field(49)) else {
        return;
    };
    let name = b"deltabox-init";
    if end <= start + name.len() {
        return;
    }
    // SAFETY: [start, end) is this process's own argument area on its initial stack, as the kernel reports it:
    // mapped and writable. Init is single-threaded and nothing reads the area while we overwrite it.
    unsafe {
        std::ptr::write_bytes(start as *mut u8, 0, end - start);
        std::ptr::copy_nonoverlapping(name.as_ptr(), start as *mut u8, name.len());
    }
}

fn setup(spec: &SandboxSpec, root_mnt: OwnedFd) -> std::io::Result<()> {
    // The zygote ignores SIGCHLD (auto-reap); pid 1 must see its children's exits.
    // SAFETY: resetting a disposition to SIG_DFL installs no handler code.
    unsafe { nix::sys::signal::signal(Signal::SIGCHLD, nix::sys::signal::SigHandler::SigDfl) }
        .map_err(|e| std::io::Error::other(format!("reset SIGCHLD: {e}")))?;
    // SAFETY: single-threaded process; unsharing NEWCGROUP changes no memory-safety invariant.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWCGROUP) }
        .map_err(|e| std::io::Error::other(format!("new cgroup namespace: {e}")))?;
    crate::rootfs::setup(spec, root_mnt)?;
    rustix::system::sethostname(spec.hostname.as_bytes())
        .map_err(|e| std::io::Error::other(format!("sethostname: {e}")))?;
    if spec.network == NetworkMode::None {
        deltabox_sys::netdev::loopback_up()
            .map_err(|e| std::io::Error::other(format!("loopback up: {e}")))?;
    }
    crate::hardening::apply()
}

fn send(ctrl: &OwnedFd, ev: &InitEvent) {
    if let Ok(payload) = serde_json::to_vec(ev) {
        if deltabox_sys::fdpass::send_frame(ctrl, &payload, &[]).is_err() {
            // The daemon is gone; as pid 1, exiting takes every sandbox process with us.
            std::process::exit(0);
        }
    }
}

/// The event loop: requests from the daemon, and SIGCHLD.
fn run(ctrl: OwnedFd) -> ! {
    let mut all = SigSet::all();
    all.remove(Signal::SIGSEGV);
    all.remove(Signal::SIGBUS);
    all.remove(Signal::SIGILL);
    all.remove(Signal::SIGFPE);
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&all), None);
    let mut chld = SigSet::empty();
    chld.add(Signal::SIGCHLD);
    let Ok(sfd) = SignalFd::with_flags(&chld, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
    else {
        std::process::exit(1)
    };
    let mut tracked: HashSet<i32> = HashSet::new();
    loop {
        let mut fds = [
            PollFd::new(&ctrl, PollFlags::IN),
            PollFd::new(&sfd, PollFlags::IN),
        ];
        match poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(_) => std::process::exit(1),
        }
        let ctrl_ready = !fds[0].revents().is_empty();
        let chld_ready = !fds[1].revents().is_empty();
        if chld_ready {
            while let Ok(Some(_)) = sfd.read_signal() {}
            reap(&ctrl, &mut tracked);
        }
        if ctrl_ready {
            match deltabox_sys::fdpass::recv_frame(&ctrl) {
                Ok(Some((payload, fds))) => match serde_json::from_slice::<InitRequest>(&payload) {
                    Ok(req) => handle(&ctrl, req, fds, &mut tracked),
                    Err(_) => continue,
                },
                _ => std::process::exit(0),
            }
        }
    }
}

fn reap(ctrl: &OwnedFd, tracked: &mut HashSet<i32>) {
    loop {
        let status = match waitpid(None, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
            Ok(WaitStatus::Exited(pid, code)) => (
                pid,
                ExitStatus {
                    code: Some(code),
                    signal: None,
                },
            ),
            Ok(WaitStatus::Signaled(pid, sig, _)) => (
                pid,
                ExitStatus {
                    code: None,
                    signal: Some(sig as i32),
                },
            ),
            Ok(WaitStatus::StillAlive) | Err(_) => return,
            Ok(_) => continue,
        };
        if tracked.remove(&status.0.as_raw()) {
            send(
                ctrl,
                &InitEvent::Exited {
                    pid: status.0.as_raw(),
                    status: status.1,
                },
            );
        }
    }
}

fn handle(ctrl: &OwnedFd, req: InitRequest, fds: Vec<OwnedFd>, tracked: &mut HashSet<i32>) {
    match req {
        InitRequest::Spawn {
            id,
            argv,
            env,
            cwd,
            fd_targets,
        } => {
            let ev = match spawn(&argv, &env, &cwd, &fds, &fd_targets) {
                Ok(pid) => {
                    tracked.insert(pid);
                    InitEvent::Spawned { id, pid }
                }
                Err(error) => InitEvent::SpawnFailed { id, error },
            };
            drop(fds);
            send(ctrl, &ev);
        }
        InitRequest::Track { id, pid } => {
            let ev = if pid > 1 && std::path::Path::new(&format!("/proc/{pid}")).exists() {
                tracked.insert(pid);
                InitEvent::Spawned { id, pid }
            } else {
                InitEvent::SpawnFailed {
                    id,
                    error: format!("process {pid} is gone"),
                }
            };
            send(ctrl, &ev);
        }
        InitRequest::Signal { pid, signal } => {
            if pid > 1 {
                // SAFETY: kill(2) takes plain integers.
                unsafe { libc::kill(pid, signal) };
            }
        }
        InitRequest::SignalGroup {
            pgid,
            signal,
            except,
        } => match except {
            None if pgid > 1 => {
                // SAFETY: kill(2) with a negative pid signals a process group; plain integers.
                unsafe { libc::kill(-pgid, signal) };
            }
            None => {}
            Some(keep) => {
                for pid in group_members(pgid) {
                    if pid != keep && pid > 1 {
                        // SAFETY: as above.
                        unsafe { libc::kill(pid, signal) };
                    }
                }
            }
        },
    }
}

/// Pids whose process group is `pgid`, from this pid namespace's `/proc`.
fn group_members(pgid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .map(|(_, rest)| rest.split_whitespace().nth(2).map(str::to_string))
                })
                .flatten()
                .and_then(|g| g.parse::<i32>().ok())
                == Some(pgid)
        })
        .collect()
}

/// Program paths to try: `argv[0]` itself if it has a slash, else each `PATH` entry of the *request's*
/// environment (not init's, which is the host daemon's).
fn candidates(argv0: &str, env: &[String]) -> Vec<CString> {
    if argv0.contains('/') {
        return CString::new(argv0).into_iter().collect();
    }
    let path = env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    path.split(':')
        .filter(|d| !d.is_empty())
        .filter_map(|d| {
            CString::new(std::path::Path::new(d).join(argv0).as_os_str().as_bytes()).ok()
        })
        .collect()
}

fn spawn(
    argv: &[String],
    env: &[String],
    cwd: &str,
    fds: &[OwnedFd],
    targets: &[i32],
) -> Result<i32, String> {
    if argv.is_empty() {
        return Err("empty argv".into());
    }
    if fds.len() != targets.len() || targets.iter().any(|&t| !(0..FD_STAGING).contains(&t)) {
        return Err("bad descriptor mapping".into());
    }
    let to_c = |v: &[String]| {
        v.iter()
            .map(|s| CString::new(s.as_bytes()))
            .collect::<Result<Vec<_>, _>>()
    };
    let (c_argv, c_env) = match (to_c(argv), to_c(env)) {
        (Ok(a), Ok(e)) => (a, e),
        _ => return Err("argument or environment contains a NUL byte".into()),
    };
    let c_cwd = CString::new(cwd).map_err(|_| "cwd contains a NUL byte".to_string())?;
    let progs = candidates(&argv[0], env);
    let mut argv_ptrs: Vec<*const libc::c_char> = c_argv.iter().map(|s| s.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut env_ptrs: Vec<*const libc::c_char> = c_env.iter().map(|s| s.as_ptr()).collect();
    env_ptrs.push(std::ptr::null());
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let (err_r, err_w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| format!("pipe: {e}"))?;

    // SAFETY: init is single-threaded, so the child may run arbitrary code; it only makes system calls and
    // then execs or `_exit`s.
    match unsafe { nix::unistd::fork() } {
        Err(e) => Err(format!("fork: {e}")),
        Ok(nix::unistd::ForkResult::Child) => {
            drop(err_r);
            exec_child(
                &raw,
                targets,
                &c_cwd,
                &progs,
                &argv_ptrs,
                &env_ptrs,
                err_w.as_fd().as_raw_fd(),
            )
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            drop(err_w);
            let mut buf = [0u8; 5];
            let mut got = 0;
            while got < buf.len() {
                match rustix::io::read(&err_r, &mut buf[got..]) {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(_) => break,
                }
            }
            if got == 0 {
                return Ok(child.as_raw());
            }
            let errno = i32::from_le_bytes([buf[1], buf[2], buf[3], buf[4]]);
            let msg = std::io::Error::from_raw_os_error(errno);
            // The child exits 127; reap() collects it as an untracked pid.
            Err(match buf[0] {
                0 => format!("cannot change directory to {cwd}: {msg}"),
                1 => format!("cannot run {}: {msg}", argv[0]),
                _ => format!("cannot set up descriptors: {msg}"),
            })
        }
    }
}

/// In the forked child: reset signals, new session, install descriptors, chdir, exec. Reports failure as
/// `[stage, errno (LE)]` on `err_fd`.
fn exec_child(
    fds: &[RawFd],
    targets: &[i32],
    cwd: &CString,
    progs: &[CString],
    argv: &[*const libc::c_char],
    env: &[*const libc::c_char],
    err_fd: RawFd,
) -> ! {
    let fail = |stage: u8, errno: i32| -> ! {
        let mut msg = [stage, 0, 0, 0, 0];
        msg[1..].copy_from_slice(&errno.to_le_bytes());
        // SAFETY: writes 5 bytes from a live stack buffer, then exits without running destructors.
        unsafe {
            libc::write(err_fd, msg.as_ptr().cast(), msg.len());
            libc::_exit(127)
        }
    };
    let errno = || {
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    };
    // SAFETY: everything below is plain system calls on integers and on pointers to live, NUL-terminated
    // buffers prepared by the parent before fork; we exec or _exit at the end.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        // Rust's runtime ignores SIGPIPE; ignored dispositions survive exec, so reset every signal.
        for sig in 1..libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        libc::setsid();
        let mut staged = Vec::with_capacity(fds.len());
        for &fd in fds {
            let s = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, FD_STAGING);
            if s < 0 {
                fail(2, errno());
            }
            staged.push(s);
        }
        // Everything else we hold (control socket, signalfd …) must not leak into the program.
        libc::syscall(
            libc::SYS_close_range,
            3u32,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        );
        for (&s, &t) in staged.iter().zip(targets) {
            if libc::dup2(s, t) < 0 {
                fail(2, errno());
            }
        }
        if libc::chdir(cwd.as_ptr()) < 0 {
            fail(0, errno());
        }
        let mut last = libc::ENOENT;
        for p in progs {
            libc::execve(p.as_ptr(), argv.as_ptr(), env.as_ptr());
            let e = errno();
            // Like execvp: remember a permission problem over a plain miss.
            if e != libc::ENOENT && e != libc::ENOTDIR || last == libc::ENOENT {
                last = e;
            }
        }
        fail(1, last)
    }
}
