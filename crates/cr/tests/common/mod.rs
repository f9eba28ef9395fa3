//! What the process tests share: a child program we talk to over pipes, checkpoints of it, and reaping.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use deltabox_cr::Template;
use deltabox_sys::inject::{find_syscall_insn, thread_state, Tracee};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

pub const T: Duration = Duration::from_secs(5);

/// A child program: its stdin and (line-buffered) stdout are ours.
pub struct Proc {
    pub child: Child,
    pub pid: Pid,
    pub stdin: ChildStdin,
    pub stdout: BufReader<ChildStdout>,
}

/// `python3 -u -c script`.
pub fn spawn(script: &str) -> Proc {
    spawn_cmd("python3", &["-u", "-c", script])
}

/// Any program, with piped stdin and stdout.
pub fn spawn_cmd(prog: &str, args: &[&str]) -> Proc {
    // Orphaned copies (a template's parent is killed on rollback) come to us, so that we can reap them.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = Pid::from_raw(child.id() as i32);
    let stdin = child.stdin.take().unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    Proc {
        child,
        pid,
        stdin,
        stdout,
    }
}

impl Proc {
    /// Writes a line, returns the line it answers.
    pub fn say(&mut self, s: &str) -> String {
        writeln!(self.stdin, "{s}").unwrap();
        self.line()
    }

    /// The next line it prints.
    pub fn line(&mut self) -> String {
        let mut l = String::new();
        self.stdout.read_line(&mut l).unwrap();
        l.trim().to_string()
    }
}

/// Waits until `pid` is in scheduler state `want`.
pub fn wait_state(pid: Pid, want: char) {
    let deadline = Instant::now() + T;
    while thread_state(pid) != Some(want) {
        assert!(
            Instant::now() < deadline,
            "{pid} never reached state {want}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits until `pid` blocks (state `S`).
pub fn wait_blocked(pid: Pid) {
    wait_state(pid, 'S');
}

/// A template of `pid`, once it is blocked (see [`Template::capture`] for `sibling`).
pub fn checkpoint(pid: Pid, sibling: bool) -> Template {
    wait_blocked(pid);
    let mut t = Tracee::seize(pid, pid, find_syscall_insn(pid).unwrap(), T).unwrap();
    let tpl = Template::capture(&mut t, sibling).unwrap();
    t.detach().unwrap();
    tpl
}

/// Kills `pid` and waits until it is reaped (it is our child, or was re-parented to us).
pub fn kill_and_reap(pid: Pid) {
    kill(pid, Signal::SIGKILL).unwrap();
    waitpid(pid, Some(WaitPidFlag::__WALL)).unwrap();
}
