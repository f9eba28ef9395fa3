//! Templates of real processes (as root; one process per test with cargo-nextest): state comes back, blocking
//! calls resume, pids are reused, and what cannot be forked is refused.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use deltabox_cr::Template;
use deltabox_sys::inject::{find_syscall_insn, thread_state, Tracee};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

const T: Duration = Duration::from_secs(5);

struct Proc {
    child: Child,
    pid: Pid,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

fn spawn(script: &str) -> Proc {
    // Orphaned copies (a template's parent is killed on rollback) come to us, so that we can reap them.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let mut child = Command::new("python3")
        .args(["-u", "-c", script])
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
    fn say(&mut self, s: &str) -> String {
        writeln!(self.stdin, "{s}").unwrap();
        self.line()
    }
    fn line(&mut self) -> String {
        let mut l = String::new();
        self.stdout.read_line(&mut l).unwrap();
        l.trim().to_string()
    }
}

fn wait_blocked(pid: Pid) {
    let deadline = Instant::now() + T;
    while thread_state(pid) != Some('S') {
        assert!(Instant::now() < deadline, "{pid} never blocked");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn checkpoint(pid: Pid, sibling: bool) -> Template {
    wait_blocked(pid);
    let mut t = Tracee::seize(pid, pid, find_syscall_insn(pid).unwrap(), T).unwrap();
    let tpl = Template::capture(&mut t, sibling).unwrap();
    t.detach().unwrap();
    tpl
}

/// Kills `pid` and waits until it is reaped (it is our child, or was re-parented to us).
fn kill_and_reap(pid: Pid) {
    kill(pid, Signal::SIGKILL).unwrap();
    waitpid(pid, Some(WaitPidFlag::__WALL)).unwrap();
}

const ADDER: &str = "import sys\nx = 0\nfor line in sys.stdin:\n    x += int(line)\n    print(x)\n";

#[test]
fn rollback_restores_memory_and_pid_and_resumes_the_blocked_read() {
    let mut p = spawn(ADDER);
    assert_eq!(p.say("5"), "5");
    let mut tpl = checkpoint(p.pid, false);
    assert_eq!(tpl.identity().ns_pid, p.pid.as_raw());
    // The live process goes on after the checkpoint.
    assert_eq!(p.say("3"), "8");
    assert_eq!(p.say("1"), "9");
    let pid = p.pid;
    kill_and_reap(pid);
    let _ = p.child.try_wait();
    for round in 0..200 {
        let restored = tpl.spawn(true).unwrap();
        assert_eq!(restored.tgid(), pid, "round {round}: same pid");
        restored.detach().unwrap();
        // The restored process was blocked in read() at the checkpoint: x is 5 again.
        assert_eq!(p.say("1"), "6", "round {round}");
        assert_eq!(p.say("10"), "16", "round {round}");
        kill_and_reap(pid);
    }
    assert!(tpl.is_alive());
}

#[test]
fn sleeping_and_polling_processes_resume() {
    let script = "import select, sys, time\nn = 0\nwhile True:\n    r, _, _ = select.select([sys.stdin], [], [], 0.05)\n    if r:\n        n += int(sys.stdin.readline())\n        print(n)\n    time.sleep(0.01)\n";
    let mut p = spawn(script);
    assert_eq!(p.say("7"), "7");
    // Checkpoint it wherever it is: in select() or in nanosleep().
    let mut tpl = checkpoint(p.pid, false);
    assert_eq!(p.say("1"), "8");
    let pid = p.pid;
    kill_and_reap(pid);
    let _ = p.child.try_wait();
    for _ in 0..20 {
        tpl.spawn(true).unwrap().detach().unwrap();
        assert_eq!(p.say("2"), "9");
        kill_and_reap(pid);
    }
}

#[test]
fn multi_threaded_processes_are_refused_by_name() {
    let mut p = spawn(
        "import sys, threading, time\nthreading.Thread(target=time.sleep, args=(60,), daemon=True).start()\nprint('up')\nsys.stdin.readline()\n",
    );
    assert_eq!(p.line(), "up");
    wait_blocked(p.pid);
    let mut t = Tracee::seize(p.pid, p.pid, find_syscall_insn(p.pid).unwrap(), T).unwrap();
    let err = Template::capture(&mut t, false).unwrap_err().to_string();
    assert!(err.contains("2 threads"), "{err}");
    t.detach().unwrap();
    // Nothing changed: it still works.
    writeln!(p.stdin, "bye").unwrap();
    assert!(p.child.wait().unwrap().success());
}

#[test]
fn a_dead_template_says_so() {
    let mut p = spawn(ADDER);
    assert_eq!(p.say("1"), "1");
    let mut tpl = checkpoint(p.pid, false);
    // Something (in a sandbox: the agent's `kill -9 -1`) kills the template.
    kill(tpl.pid(), Signal::SIGKILL).unwrap();
    let _ = waitpid(tpl.pid(), Some(WaitPidFlag::__WALL));
    assert!(!tpl.is_alive());
    assert!(tpl.spawn(false).unwrap_err().to_string().contains("gone"));
    assert_eq!(p.say("1"), "2", "the live process is unaffected");
    kill_and_reap(p.pid);
}
