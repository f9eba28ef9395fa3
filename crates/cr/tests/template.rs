//! Templates of real processes (as root; one process per test with cargo-nextest): state comes back, blocking
//! calls resume, pids are reused, and what cannot be forked is refused.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use deltabox_cr::Template;
use deltabox_sys::inject::{find_syscall_insn, Tracee};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

mod common;
use common::*;

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

fn comm_of(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// NSpid of a process: its pid in every pid namespace from ours inwards.
fn ns_pids(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .unwrap()
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect()
}

fn descendants(root: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        for c in std::fs::read_to_string(format!("/proc/{p}/task/{p}/children"))
            .unwrap_or_default()
            .split_whitespace()
        {
            let c: i32 = c.parse().unwrap();
            out.push(c);
            todo.push(c);
        }
    }
    out
}

/// Fork ×N's mechanism: a template in pid namespace P forks into Q, a child of P with its own mount, network,
/// IPC and UTS namespaces (a branch sandbox), keeping its pid there; the template stays in P for later forks.
#[test]
fn a_template_forks_into_a_child_pid_namespace_with_its_pid() {
    // P's init is a shell; it runs the python and a `sleep` that is pid 1 of Q.
    let script = format!(
        // (A background job's stdin is /dev/null unless redirected.)
        "exec 3<&0; python3 -u -c '{}' <&3 & unshare --pid --fork --mount --uts --ipc --net sleep 1000 </dev/null & wait",
        ADDER.replace('\'', "'\\''")
    );
    let mut family = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "sh", "-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Talk to the python inside through the family's pipes.
    let root = family.id() as i32;
    let mut p = Proc {
        stdin: family.stdin.take().unwrap(),
        stdout: BufReader::new(family.stdout.take().unwrap()),
        pid: Pid::from_raw(root),
        child: family,
    };
    let (mut py, mut anchor) = (0, 0);
    let deadline = Instant::now() + T;
    while py == 0 || anchor == 0 {
        assert!(Instant::now() < deadline, "family never came up");
        for d in descendants(root) {
            match comm_of(d).as_str() {
                "python3" => py = d,
                "sleep" if ns_pids(d).len() == 3 => anchor = d,
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(p.say("5"), "5");
    let py_ns = *ns_pids(py).last().unwrap();
    let mut tpl = checkpoint(Pid::from_raw(py), false);
    assert_eq!(p.say("3"), "8");
    kill(Pid::from_raw(py), Signal::SIGKILL).unwrap();

    let branch = deltabox_cr::BranchNamespaces::open(anchor).unwrap();
    let copy = tpl.spawn_into(&branch, py_ns + 100).unwrap();
    let c = copy.tgid().as_raw();
    // A child of the branch's init (which reaps it), not of anything outside the branch.
    let ppid: i32 = std::fs::read_to_string(format!("/proc/{c}/stat"))
        .unwrap()
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(ppid, anchor, "parent of the copy");
    let pids = ns_pids(c);
    assert_eq!(pids.len(), 3, "host, P, Q: {pids:?}");
    assert_eq!(
        *pids.last().unwrap(),
        py_ns,
        "its own pid inside the branch"
    );
    for ns in ["mnt", "net", "ipc", "uts", "pid"] {
        assert_eq!(
            std::fs::read_link(format!("/proc/{c}/ns/{ns}")).unwrap(),
            std::fs::read_link(format!("/proc/{anchor}/ns/{ns}")).unwrap(),
            "{ns} namespace of the branch"
        );
    }
    copy.detach().unwrap();
    // The copy resumes the checkpointed read: x is 5 again.
    assert_eq!(p.say("1"), "6");
    // The template stayed in P: a plain fork lands there.
    let again = tpl.spawn(false).unwrap();
    assert_eq!(ns_pids(again.tgid().as_raw()).len(), 2, "back in P");
    let again_pid = again.tgid();
    drop(again.keep_stopped());
    kill(again_pid, Signal::SIGKILL).unwrap();
    let _ = waitpid(again_pid, Some(WaitPidFlag::__WALL));
    // A pid namespace the template cannot reach is refused with a reason, and the template survives it.
    let err = deltabox_cr::BranchNamespaces::open(999_999)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("open namespace pid of process 999999"),
        "{err}"
    );
    // A namespace the template may not enter (the host's) is refused with a reason, and the template survives.
    let host = deltabox_cr::BranchNamespaces::open(std::process::id() as i32).unwrap();
    let err = tpl.spawn_into(&host, 4242).unwrap_err().to_string();
    assert!(err.contains("setns"), "{err}");
    assert!(tpl.is_alive());
    drop(tpl);
    // Killing P's init ends the whole family (Q included).
    let sh = descendants(root)
        .into_iter()
        .find(|d| ns_pids(*d).last() == Some(&1) && ns_pids(*d).len() == 2)
        .unwrap();
    kill(Pid::from_raw(sh), Signal::SIGKILL).unwrap();
    let _ = p.child.wait();
}

/// Fork ×N's session rewiring: a copy of a process gets fresh pipes in place of the stdin/stdout it shares with
/// its source; each then talks only over its own.
#[test]
fn a_copy_gets_pipes_of_its_own() {
    let mut p = spawn(ADDER);
    assert_eq!(p.say("5"), "5");
    let mut tpl = checkpoint(p.pid, false);
    let mut copy = tpl.spawn(false).unwrap();
    let stdin = copy.replace_with_pipe(0, true).unwrap();
    let stdout = copy.replace_with_pipe(1, false).unwrap();
    let copy_pid = copy.tgid();
    copy.detach().unwrap();
    let mut copy_in = std::fs::File::from(stdin);
    let mut copy_out = BufReader::new(std::fs::File::from(stdout));
    // The original goes on over the old pipes …
    assert_eq!(p.say("3"), "8");
    // … the copy, from the checkpoint's state, over its own.
    writeln!(copy_in, "1").unwrap();
    let mut l = String::new();
    copy_out.read_line(&mut l).unwrap();
    assert_eq!(l.trim(), "6");
    assert_eq!(
        p.say("1"),
        "9",
        "nothing of the copy's reached the original"
    );
    // The copy is the python's child (its template's sibling): it goes with it.
    kill(copy_pid, Signal::SIGKILL).unwrap();
    kill_and_reap(p.pid);
    let _ = p.child.try_wait();
}
