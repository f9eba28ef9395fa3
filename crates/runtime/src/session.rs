//! Persistent sessions: long-lived `bash` and `python3` processes whose state (cwd, environment, variables,
//! functions, imported modules) survives between commands, as agent frameworks use them.
//!
//! Command boundaries never depend on what the program prints: each command carries a random nonce, and the
//! shell or interpreter reports `<nonce> <status>` on a private status pipe (fd 200). Output on stdout/stderr is
//! only ever data, so a program printing a marker cannot fool us.
//!
//! - bash runs interactive (`-i`, no readline) so that SIGINT aborts the whole command line and returns to the
//!   prompt, exactly like Ctrl-C in a terminal; `PROMPT_COMMAND` reports the status. Each command arrives as one
//!   line, `__dbx_run NONCE $'…'`, and is `eval`ed in the shell itself with stdin from `/dev/null`.
//! - python3 runs a small driver (`session_python.py`) that reads length-prefixed code from fd 201, executes it
//!   in one persistent `__main__` namespace, echoes a trailing expression's value like the REPL, and prints
//!   tracebacks to stderr.
//!
//! A timeout sends SIGINT to the session's process group; if the command is still running after a grace period,
//! SIGKILL to every group member except the shell itself, and only if that fails too is the session killed.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot};

use crate::exec::{dev_null, pipe_pair, push_bounded, receiver, sender};
use crate::protocol::ExitStatus;
use crate::{Error, Result, SandboxHandle};

/// The status pipe's descriptor in a session interpreter.
pub(crate) const STATUS_FD: i32 = 200;
/// Where the python driver reads code from.
pub(crate) const PY_CMD_FD: i32 = 201;
const PYTHON_DRIVER: &str = include_str!("session_python.py");
const BASH_SETUP: &str = concat!(
    "set +o history +H; unset HISTFILE MAILCHECK PROMPT_COMMAND; PS1=''; PS2=''; PS0=''\n",
    "__dbx_nonce=ready\n",
    "__dbx_done() { local rc=$?; printf '%s %s\\n' \"$__dbx_nonce\" \"$rc\" >&200; }\n",
    "__dbx_run() { __dbx_nonce=$1; eval \"$2\" </dev/null; }\n",
    "PROMPT_COMMAND=__dbx_done\n",
);
/// How long a session may take to start and report ready.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// After SIGINT (and after each SIGKILL round), how long to wait for the command to finish.
const GRACE: Duration = Duration::from_millis(1500);

/// Which interpreter a session runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionKind {
    /// GNU bash.
    Bash,
    /// CPython 3.
    Python3,
}

impl std::str::FromStr for SessionKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "bash" => Ok(SessionKind::Bash),
            "python3" | "python" => Ok(SessionKind::Python3),
            _ => Err(Error::Invalid(format!(
                "unknown session kind {s:?} (bash or python3)"
            ))),
        }
    }
}

impl std::fmt::Display for SessionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SessionKind::Bash => "bash",
            SessionKind::Python3 => "python3",
        })
    }
}

/// The result of one session command.
#[derive(Debug, Clone, Default)]
pub struct SessionOutput {
    /// Captured stdout.
    pub stdout: Vec<u8>,
    /// Captured stderr.
    pub stderr: Vec<u8>,
    /// stdout exceeded the bound.
    pub stdout_truncated: bool,
    /// stderr exceeded the bound.
    pub stderr_truncated: bool,
    /// Status: bash's `$?`; python 0, 1 on an exception, 130 when interrupted. For a session that ended during
    /// the command, the process's exit code. `None` if unknown.
    pub exit_code: Option<i32>,
    /// The timeout fired.
    pub timed_out: bool,
    /// Whether the session is still usable.
    pub alive: bool,
    /// Wall time.
    pub duration: Duration,
}

struct Command {
    text: String,
    timeout: Duration,
    max_output: usize,
    reply: oneshot::Sender<Result<SessionOutput>>,
}

/// What the session task is asked to do.
enum Msg {
    Run(Command),
    /// Stop watching the process (it is about to be killed and restored from a checkpoint) until told what
    /// became of it.
    Suspend {
        ack: oneshot::Sender<()>,
        resume: oneshot::Receiver<Resume>,
    },
}

#[derive(Debug)]
enum Resume {
    /// Restored: watch this exit from now on.
    Restored(oneshot::Receiver<ExitStatus>),
    /// Nothing happened to the process.
    Unchanged,
}

/// A session held still while its process is rolled back; see [`Session::suspend`].
#[derive(Debug)]
pub struct Suspended {
    resume: oneshot::Sender<Resume>,
}

impl Suspended {
    /// The process was restored (same pid, same pipes): go on, watching its exit through `exit`. Whatever the
    /// discarded branch printed is dropped before the next command.
    pub fn resume(self, exit: oneshot::Receiver<ExitStatus>) {
        let _ = self.resume.send(Resume::Restored(exit));
    }

    /// Nothing was done to the process after all: go on as before.
    pub fn cancel(self) {
        let _ = self.resume.send(Resume::Unchanged);
    }

    /// The process was not restored: the session ends (dropping the handle does the same).
    pub fn end(self) {}
}

/// Our ends of a session interpreter's pipes.
#[derive(Debug)]
pub struct SessionPipes {
    /// Write end of what the interpreter reads commands from (bash: stdin; python: fd 201).
    pub cmd: std::os::fd::OwnedFd,
    /// Read end of its stdout.
    pub out: std::os::fd::OwnedFd,
    /// Read end of its stderr.
    pub err: std::os::fd::OwnedFd,
    /// Read end of its status pipe (fd 200).
    pub status: std::os::fd::OwnedFd,
}

impl SessionPipes {
    /// Duplicates of our ends, kept for [`Session::interpreter_ends`].
    fn dups(&self) -> Result<SessionEnds> {
        let d = |f: &std::os::fd::OwnedFd| {
            f.try_clone()
                .map_err(|e| Error::Io("duplicate a session pipe", e))
        };
        Ok(SessionEnds([
            d(&self.cmd)?,
            d(&self.out)?,
            d(&self.err)?,
            d(&self.status)?,
        ]))
    }

    fn into_io(self, exit: oneshot::Receiver<ExitStatus>) -> Result<(SessionIo, pipe::Sender)> {
        let io = SessionIo {
            out: receiver(self.out)?,
            err: receiver(self.err)?,
            status: receiver(self.status)?,
            status_buf: Vec::new(),
            exit: Some(exit),
            status_open: true,
            out_open: true,
            err_open: true,
        };
        Ok((io, sender(self.cmd)?))
    }
}

/// Duplicates of our ends of a session's pipes (command, stdout, stderr, status), kept so that the
/// interpreter's ends can be opened again (see [`Session::interpreter_ends`]).
#[derive(Debug)]
struct SessionEnds([std::os::fd::OwnedFd; 4]);

/// A running session. Dropping it ends the process.
#[derive(Debug)]
pub struct Session {
    kind: SessionKind,
    pid: i32,
    tx: mpsc::Sender<Msg>,
    ends: SessionEnds,
}

impl Session {
    /// Starts a session in the sandbox.
    pub async fn start(
        h: &SandboxHandle,
        kind: SessionKind,
        env: Vec<String>,
        cwd: String,
    ) -> Result<Session> {
        let (out_r, out_w) = pipe_pair()?;
        let (err_r, err_w) = pipe_pair()?;
        let (st_r, st_w) = pipe_pair()?;
        let (cmd_r, cmd_w) = pipe_pair()?;
        let (argv, fds) = match kind {
            SessionKind::Bash => (
                vec![
                    "bash".into(),
                    "--noprofile".into(),
                    "--norc".into(),
                    "--noediting".into(),
                    "-i".into(),
                ],
                vec![(cmd_r, 0), (out_w, 1), (err_w, 2), (st_w, STATUS_FD)],
            ),
            SessionKind::Python3 => (
                vec![
                    "python3".into(),
                    "-u".into(),
                    "-c".into(),
                    PYTHON_DRIVER.into(),
                ],
                vec![
                    (dev_null()?, 0),
                    (out_w, 1),
                    (err_w, 2),
                    (st_w, STATUS_FD),
                    (cmd_r, PY_CMD_FD),
                ],
            ),
        };
        let p = h.spawn(argv, env, cwd, fds).await?;
        let pipes = SessionPipes {
            cmd: cmd_w,
            out: out_r,
            err: err_r,
            status: st_r,
        };
        let ends = pipes.dups()?;
        let (mut io, mut cmd) = pipes.into_io(p.exit)?;
        if kind == SessionKind::Bash {
            cmd.write_all(BASH_SETUP.as_bytes())
                .await
                .map_err(|_| Error::SessionDead)?;
        }
        // Wait for the interpreter to say it is ready; anything printed while starting is dropped.
        let ready = tokio::time::timeout(START_TIMEOUT, async {
            loop {
                match io.next().await {
                    Event::Status(nonce, _) if nonce == "ready" => return Ok(()),
                    Event::Exited(st) => {
                        return Err(Error::Spawn(format!(
                            "{kind} exited while starting (status {})",
                            st.shell_code()
                        )))
                    }
                    Event::Closed => return Err(Error::SessionDead),
                    _ => {}
                }
            }
        })
        .await;
        match ready {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                let _ = h.signal(p.pid, libc::SIGKILL).await;
                return Err(Error::Spawn(format!(
                    "{kind} did not start within {START_TIMEOUT:?}"
                )));
            }
        }
        Ok(Self::run_task(h, kind, p.pid, io, cmd, ends))
    }

    /// Takes over an interpreter that already speaks the session protocol and waits between commands — a
    /// copy of a session's interpreter forked into another sandbox, given pipes of its own — as a session.
    pub fn adopt(
        h: &SandboxHandle,
        kind: SessionKind,
        pid: i32,
        pipes: SessionPipes,
        exit: oneshot::Receiver<ExitStatus>,
    ) -> Result<Session> {
        let ends = pipes.dups()?;
        let (io, cmd) = pipes.into_io(exit)?;
        Ok(Self::run_task(h, kind, pid, io, cmd, ends))
    }

    fn run_task(
        h: &SandboxHandle,
        kind: SessionKind,
        pid: i32,
        io: SessionIo,
        cmd: pipe::Sender,
        ends: SessionEnds,
    ) -> Session {
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(session_task(h.clone(), kind, pid, io, cmd, rx));
        Session {
            kind,
            pid,
            tx,
            ends,
        }
    }

    /// The interpreter's ends of this session's pipes, opened again (through `/proc/self/fd`, which opens a
    /// pipe like a FIFO): command (read), stdout, stderr, status (write), blocking. A process rebuilt from a
    /// durable image gets these, so that it speaks over the very pipes the session (and every other
    /// checkpoint's copy of the interpreter) uses.
    pub fn interpreter_ends(&self) -> Result<Vec<std::os::fd::OwnedFd>> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let mut out = Vec::with_capacity(4);
        for (i, f) in self.ends.0.iter().enumerate() {
            let path = format!("/proc/self/fd/{}", f.as_raw_fd());
            // Non-blocking so that opening cannot wait (the other end is ours, open), then blocking again.
            let file = std::fs::OpenOptions::new()
                .read(i == 0)
                .write(i != 0)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(&path)
                .map_err(|e| Error::Io("reopen a session pipe", e))?;
            let fd = std::os::fd::OwnedFd::from(file);
            let flags = rustix::fs::fcntl_getfl(&fd).map_err(|e| Error::Io("fcntl", e.into()))?;
            rustix::fs::fcntl_setfl(&fd, flags - rustix::fs::OFlags::NONBLOCK)
                .map_err(|e| Error::Io("fcntl", e.into()))?;
            out.push(fd);
        }
        Ok(out)
    }

    /// Which interpreter.
    pub fn kind(&self) -> SessionKind {
        self.kind
    }

    /// The interpreter's pid inside the sandbox.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Whether the session still runs.
    pub fn is_alive(&self) -> bool {
        !self.tx.is_closed()
    }

    /// Runs one command and waits for it (commands on one session run one at a time, in order).
    pub async fn run(
        &self,
        text: String,
        timeout: Duration,
        max_output: usize,
    ) -> Result<SessionOutput> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Run(Command {
                text,
                timeout,
                max_output,
                reply,
            }))
            .await
            .map_err(|_| Error::SessionDead)?;
        rx.await.map_err(|_| Error::SessionDead)?
    }

    /// Holds the session still (after any command it is running) so that its process can be killed and
    /// restored from a checkpoint without the session ending; resume or end it with the returned handle.
    pub async fn suspend(&self) -> Result<Suspended> {
        let (ack, acked) = oneshot::channel();
        let (resume, resumed) = oneshot::channel();
        self.tx
            .send(Msg::Suspend {
                ack,
                resume: resumed,
            })
            .await
            .map_err(|_| Error::SessionDead)?;
        acked.await.map_err(|_| Error::SessionDead)?;
        Ok(Suspended { resume })
    }
}

enum Event {
    Out(Vec<u8>),
    Err(Vec<u8>),
    Status(String, i32),
    Exited(ExitStatus),
    /// Every stream closed and the exit already reported: nothing more will happen.
    Closed,
}

struct SessionIo {
    out: pipe::Receiver,
    err: pipe::Receiver,
    status: pipe::Receiver,
    status_buf: Vec<u8>,
    exit: Option<oneshot::Receiver<ExitStatus>>,
    status_open: bool,
    out_open: bool,
    err_open: bool,
}

impl SessionIo {
    /// Next thing that happened. Cancel-safe: every branch either completes or loses nothing.
    async fn next(&mut self) -> Event {
        loop {
            if let Some(pos) = self.status_buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.status_buf.drain(..=pos).collect();
                let line = String::from_utf8_lossy(&line);
                let mut it = line.split_whitespace();
                if let (Some(n), Some(rc)) = (it.next(), it.next().and_then(|r| r.parse().ok())) {
                    return Event::Status(n.to_string(), rc);
                }
                continue;
            }
            if !self.status_open && self.exit.is_none() {
                return Event::Closed;
            }
            let mut ob = [0u8; 16384];
            let mut eb = [0u8; 16384];
            let mut sb = [0u8; 512];
            tokio::select! {
                // EOF on stdout/stderr while alive is possible (the program closed it): stop reading that one.
                r = self.out.read(&mut ob), if self.out_open => match r {
                    Ok(n @ 1..) => return Event::Out(ob[..n].to_vec()),
                    _ => self.out_open = false,
                },
                r = self.err.read(&mut eb), if self.err_open => match r {
                    Ok(n @ 1..) => return Event::Err(eb[..n].to_vec()),
                    _ => self.err_open = false,
                },
                r = self.status.read(&mut sb), if self.status_open => match r {
                    Ok(n @ 1..) => self.status_buf.extend_from_slice(&sb[..n]),
                    _ => self.status_open = false,
                },
                r = async { self.exit.as_mut().expect("guarded").await }, if self.exit.is_some() => {
                    self.exit = None;
                    return match r { Ok(st) => Event::Exited(st), Err(_) => Event::Closed };
                },
            }
        }
    }

    /// Takes whatever output is already in the pipes without waiting. With real `read(2)` calls on the
    /// (non-blocking) pipes: tokio's `try_read` trusts the readiness its reactor last saw, and the reactor may
    /// not yet have seen the output a command wrote just before its status line (the output was then lost, and
    /// dropped as leftovers before the next command).
    fn drain_now(&mut self, res: &mut SessionOutput, max: usize) {
        use std::os::fd::AsFd;
        let mut buf = [0u8; 65536];
        while let Ok(n @ 1..) = rustix::io::read(self.out.as_fd(), &mut buf) {
            push_bounded(&mut res.stdout, &buf[..n], max, &mut res.stdout_truncated);
        }
        while let Ok(n @ 1..) = rustix::io::read(self.err.as_fd(), &mut buf) {
            push_bounded(&mut res.stderr, &buf[..n], max, &mut res.stderr_truncated);
        }
    }
}

fn nonce() -> String {
    let mut b = [0u8; 12];
    let _ = getrandom::fill(&mut b);
    hex::encode(b)
}

/// Bash ANSI-C quoting (`$'…'`) of arbitrary text: the command stays on one input line whatever it contains.
fn bash_quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 3);
    q.push_str("$'");
    for &b in s.as_bytes() {
        match b {
            b'\\' => q.push_str("\\\\"),
            b'\'' => q.push_str("\\'"),
            0x20..=0x7e => q.push(b as char),
            _ => q.push_str(&format!("\\x{b:02x}")),
        }
    }
    q.push('\'');
    q
}

async fn session_task(
    h: SandboxHandle,
    kind: SessionKind,
    pid: i32,
    mut io: SessionIo,
    mut cmd: pipe::Sender,
    mut rx: mpsc::Receiver<Msg>,
) {
    let mut dead = false;
    while !dead {
        tokio::select! {
            m = rx.recv() => match m {
                None => break,
                Some(Msg::Run(c)) => {
                    let (res, alive) = run_one(&h, kind, pid, &mut io, &mut cmd, &c).await;
                    dead = !alive;
                    let _ = c.reply.send(res);
                }
                Some(Msg::Suspend { ack, resume }) => {
                    let _ = ack.send(());
                    match resume.await {
                        Ok(Resume::Restored(exit)) => {
                            io.exit = Some(exit);
                            io.status_buf.clear();
                            // The restored process writes to these pipes again, even if they saw end-of-file
                            // meanwhile (its old copy and every template holding them had died: a process
                            // rebuilt from an image got its ends reopened).
                            io.out_open = true;
                            io.err_open = true;
                            io.status_open = true;
                        }
                        Ok(Resume::Unchanged) => {}
                        // Not restored: the pid is nobody's now, so signal nothing.
                        _ => return,
                    }
                }
            },
            ev = io.next() => match ev {
                // Output between commands (background jobs) is dropped.
                Event::Out(_) | Event::Err(_) | Event::Status(..) => {}
                Event::Exited(_) | Event::Closed => dead = true,
            },
        }
    }
    // Dropping `rx` tells callers the session is gone; make sure the process is too.
    drop(rx);
    let _ = h.signal_group(pid, libc::SIGKILL, None).await;
}

async fn run_one(
    h: &SandboxHandle,
    kind: SessionKind,
    pid: i32,
    io: &mut SessionIo,
    cmd: &mut pipe::Sender,
    c: &Command,
) -> (Result<SessionOutput>, bool) {
    let start = Instant::now();
    let mut res = SessionOutput {
        alive: true,
        ..Default::default()
    };
    // Drop leftovers from background jobs so they are not attributed to this command.
    let mut scratch = SessionOutput::default();
    io.drain_now(&mut scratch, 0);
    let n = nonce();
    let frame = match kind {
        SessionKind::Bash => format!("__dbx_run {n} {}\n", bash_quote(&c.text)).into_bytes(),
        SessionKind::Python3 => {
            let mut f = format!("{n} {}\n", c.text.len()).into_bytes();
            f.extend_from_slice(c.text.as_bytes());
            f
        }
    };
    if cmd.write_all(&frame).await.is_err() {
        return (Err(Error::SessionDead), false);
    }
    let mut deadline = tokio::time::Instant::now() + c.timeout;
    // 0: running; 1: SIGINT sent; 2..: SIGKILL rounds to the group (shell spared).
    let mut stage = 0u32;
    loop {
        tokio::select! {
            ev = io.next() => match ev {
                Event::Out(d) => push_bounded(&mut res.stdout, &d, c.max_output, &mut res.stdout_truncated),
                Event::Err(d) => push_bounded(&mut res.stderr, &d, c.max_output, &mut res.stderr_truncated),
                Event::Status(nonce, rc) if nonce == n => {
                    io.drain_now(&mut res, c.max_output);
                    res.exit_code = Some(rc);
                    break;
                }
                Event::Status(..) => {}
                Event::Exited(st) => {
                    io.drain_now(&mut res, c.max_output);
                    res.exit_code = Some(st.shell_code());
                    res.alive = false;
                    break;
                }
                Event::Closed => {
                    io.drain_now(&mut res, c.max_output);
                    res.alive = false;
                    break;
                }
            },
            _ = tokio::time::sleep_until(deadline) => {
                res.timed_out = true;
                stage += 1;
                deadline = tokio::time::Instant::now() + GRACE;
                let r = match stage {
                    1 => h.signal_group(pid, libc::SIGINT, None).await,
                    2..=4 => h.signal_group(pid, libc::SIGKILL, Some(pid)).await,
                    _ => h.signal_group(pid, libc::SIGKILL, None).await,
                };
                if r.is_err() {
                    res.alive = false;
                    break;
                }
            }
        }
    }
    res.duration = start.elapsed();
    let alive = res.alive;
    (Ok(res), alive)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn quoting_keeps_one_line() {
        let q = bash_quote("echo 'hi'\nprintf \"\\t%s\" x\u{e9}");
        assert!(!q.contains('\n'));
        assert_eq!(q, "$'echo \\'hi\\'\\x0aprintf \"\\\\t%s\" x\\xc3\\xa9'");
    }
}
