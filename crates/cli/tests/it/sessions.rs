//! Persistent bash and python3 sessions.

use std::time::{Duration, Instant};

use crate::common::*;

fn run(d: &TestDaemon, id: &str, s: &str, cmd: &str) -> serde_json::Value {
    d.json(&["session", "run", id, s, cmd])
}

#[test]
fn bash_state_survives_between_commands() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let s = d.ok(&["session", "start", &id, "bash"]).trim().to_string();
    assert!(s.starts_with("s-"));
    d.ok(&["session", "run", &id, &s, "mkdir -p /work/a && cd /work/a && export GREETING=hi && N=41 && add1() { echo $(( $1 + 1 )); }; alias ll='echo aliased'"]);
    let r = run(
        &d,
        &id,
        &s,
        "pwd; echo $GREETING; add1 $N; ll; shopt -s expand_aliases",
    );
    assert_eq!(r["stdout"], "/work/a\nhi\n42\naliased\n", "{r}");
    assert_eq!(r["exit_code"], 0);
    // Exit status of the last command, multi-line input, heredocs, quotes.
    let r = run(
        &d,
        &id,
        &s,
        "cat <<'EOF'\nline 'one'\n\"two\" $N\nEOF\nfalse",
    );
    assert_eq!(r["stdout"], "line 'one'\n\"two\" $N\n");
    assert_eq!(r["exit_code"], 1);
    // The CLI passes output through and exits with the status.
    let out = d.cli(&[
        "session",
        "run",
        &id,
        &s,
        "echo to-out; echo to-err >&2; (exit 7)",
    ]);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "to-out\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("to-err"));
    // Commands reading stdin get EOF instead of eating the next command.
    let r = run(&d, &id, &s, "cat; read x; echo read=$?");
    assert_eq!(r["stdout"], "read=1\n");
    d.stop_and_check(&[id]);
}

#[test]
fn printed_markers_cannot_fool_boundaries() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let s = d.ok(&["session", "start", &id, "bash"]).trim().to_string();
    let r = run(&d, &id, &s, "echo 'ready 0'; printf '%s 0\\n' \"$RANDOM\" 0123456789abcdef01234567; echo '__dbx_run x'; sleep 0.3; echo after");
    let out = r["stdout"].as_str().unwrap();
    assert!(out.ends_with("after\n"), "{out}");
    assert!(out.starts_with("ready 0\n"));
    let p = d
        .ok(&["session", "start", &id, "python3"])
        .trim()
        .to_string();
    let r = run(
        &d,
        &id,
        &p,
        "print('ready 0'); import time; time.sleep(0.3); print('after')",
    );
    assert_eq!(r["stdout"], "ready 0\nafter\n");
    d.stop_and_check(&[id]);
}

#[test]
fn python_state_survives_and_errors_are_reported() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let p = d
        .ok(&["session", "start", &id, "python3"])
        .trim()
        .to_string();
    let r = run(
        &d,
        &id,
        &p,
        "import json, os\ndata = list(range(1000))\ndef f(x):\n    return x * 2\nlen(data)",
    );
    assert_eq!(r["stdout"], "1000\n");
    let r = run(
        &d,
        &id,
        &p,
        "f(sum(data)), json.dumps({'a': 1}), os.getpid() > 1",
    );
    assert_eq!(r["stdout"], "(999000, '{\"a\": 1}', True)\n");
    let r = run(&d, &id, &p, "raise ValueError('boom')");
    assert_eq!(r["exit_code"], 1);
    assert!(r["stderr"].as_str().unwrap().contains("ValueError: boom"));
    assert!(
        !r["stderr"].as_str().unwrap().contains("_dbx_main"),
        "driver frames are hidden: {}",
        r["stderr"]
    );
    let r = run(&d, &id, &p, "def broken(:\n  pass");
    assert_eq!(r["exit_code"], 1);
    assert!(r["stderr"].as_str().unwrap().contains("SyntaxError"));
    let r = run(&d, &id, &p, "print(len(data)); input()");
    assert_eq!(r["exit_code"], 1, "stdin is /dev/null: EOFError");
    // Several sessions per sandbox, independent state.
    let p2 = d
        .ok(&["session", "start", &id, "python3"])
        .trim()
        .to_string();
    let r = run(&d, &id, &p2, "'data' in globals()");
    assert_eq!(r["stdout"], "False\n");
    let list = d.json(&["session", "ls", &id]);
    assert_eq!(list.as_array().unwrap().len(), 2);
    d.ok(&["session", "stop", &id, &p2]);
    assert_eq!(d.json(&["session", "ls", &id]).as_array().unwrap().len(), 1);
    d.stop_and_check(&[id]);
}

#[test]
fn timeouts_interrupt_without_killing_the_session() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let s = d.ok(&["session", "start", &id, "bash"]).trim().to_string();
    run(&d, &id, &s, "X=kept; cd /tmp");
    let t = Instant::now();
    let out = d.cli(&[
        "session",
        "run",
        "--timeout",
        "1",
        &id,
        &s,
        "sleep 30; echo never",
    ]);
    assert_eq!(out.status.code(), Some(124));
    assert!(t.elapsed() < Duration::from_secs(8));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("never"));
    let r = run(&d, &id, &s, "echo $X $(pwd)");
    assert_eq!(r["stdout"], "kept /tmp\n");
    // A command that ignores SIGINT is killed on the second stage; the shell survives.
    let r = d.json(&[
        "session",
        "run",
        "--timeout",
        "1",
        &id,
        &s,
        "trap '' INT; sleep 30",
    ]);
    assert_eq!(r["timed_out"], true);
    assert_eq!(r["session_alive"], true, "{r}");
    let r = run(&d, &id, &s, "trap - INT; echo $X");
    assert_eq!(r["stdout"], "kept\n");

    let p = d
        .ok(&["session", "start", &id, "python3"])
        .trim()
        .to_string();
    run(&d, &id, &p, "y = 5");
    let r = d.json(&[
        "session",
        "run",
        "--timeout",
        "1",
        &id,
        &p,
        "while True: pass",
    ]);
    assert_eq!(r["timed_out"], true);
    assert!(r["stderr"].as_str().unwrap().contains("KeyboardInterrupt"));
    let r = run(&d, &id, &p, "y + 1");
    assert_eq!(r["stdout"], "6\n");
    d.stop_and_check(&[id]);
}

#[test]
fn a_session_whose_shell_exits_is_reported() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let s = d.ok(&["session", "start", &id, "bash"]).trim().to_string();
    let r = run(&d, &id, &s, "echo bye; exit 3");
    assert_eq!(r["exit_code"], 3);
    assert_eq!(r["session_alive"], false);
    assert_eq!(r["stdout"], "bye\n");
    let out = d.cli(&["session", "run", &id, &s, "echo again"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("session has ended"));
    let p = d
        .ok(&["session", "start", &id, "python3"])
        .trim()
        .to_string();
    let r = run(&d, &id, &p, "import sys; sys.exit(4)");
    assert_eq!(
        (r["exit_code"].as_i64(), r["session_alive"].as_bool()),
        (Some(4), Some(false))
    );
    // Killing the interpreter from inside is noticed too.
    let b = d.ok(&["session", "start", &id, "bash"]).trim().to_string();
    let r = run(&d, &id, &b, "kill -9 $$");
    assert_eq!(r["session_alive"], false);
    let bad = d.cli(&["session", "start", &id, "fish"]);
    assert!(!bad.status.success());
    d.stop_and_check(&[id]);
}
