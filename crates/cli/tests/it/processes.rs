//! DeltaCR through the daemon: `checkpoint --processes` keeps a template of every process; rollback restores
//! them with their pids, and sessions go on with the restored interpreters.

use crate::common::*;

fn out(d: &TestDaemon, id: &str, s: &str, cmd: &str) -> String {
    let r = d.json(&["session", "run", id, s, cmd]);
    assert_eq!(r["exit_code"], 0, "{cmd}: {r}");
    r["stdout"].as_str().unwrap().to_string()
}

fn checkpoint(d: &TestDaemon, id: &str) -> String {
    let c = d.json(&["checkpoint", id, "--processes", "--json"]);
    assert!(c["with_processes"].as_bool().unwrap(), "{c}");
    c["id"].as_str().unwrap().to_string()
}

#[test]
fn sessions_come_back_with_their_state_and_pids() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let py = d
        .ok(&["session", "start", &id, "python3"])
        .trim()
        .to_string();
    let sh = d.session(&id, "bash");
    out(&d, &id, &py, "import os\ndata = list(range(10**6))\nx = 41");
    let py_pid = out(&d, &id, &py, "os.getpid()");
    out(
        &d,
        &id,
        &sh,
        "mkdir -p /work/deep/dir && cd /work/deep/dir && export FOO=bar && greet() { echo hi $1; }; alias ll='echo aliased'; echo v1 > /work/file",
    );
    let sh_pid = out(&d, &id, &sh, "echo $$");
    let c = checkpoint(&d, &id);
    // The agent goes on and breaks things.
    out(&d, &id, &py, "x = 1000\ndel data");
    out(
        &d,
        &id,
        &sh,
        "cd / && unset FOO && unset -f greet && echo v2 > /work/file && rm -rf /work/deep",
    );
    for round in 0..20 {
        let r = d.json(&["rollback", &id, &c, "--json"]);
        assert_eq!(r["processes_restarted"], false, "{r}");
        assert_eq!(
            out(&d, &id, &py, "x + 1, len(data)"),
            "(42, 1000000)\n",
            "round {round}"
        );
        assert_eq!(out(&d, &id, &py, "os.getpid()"), py_pid, "same pid");
        assert_eq!(
            out(
                &d,
                &id,
                &sh,
                "shopt -s expand_aliases; pwd; echo $FOO; greet you; cat /work/file; echo $$"
            ),
            format!("/work/deep/dir\nbar\nhi you\nv1\n{sh_pid}"),
            "round {round}"
        );
        // Each round changes things again before rolling back.
        out(&d, &id, &py, "x = -1");
        out(&d, &id, &sh, "cd /; echo v3 > /work/file; unset FOO");
    }
    d.stop_and_check(&[id]);
}

#[test]
fn a_background_server_is_reachable_after_rollback() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let sh = d.session(&id, "bash");
    out(
        &d,
        &id,
        &sh,
        "mkdir -p /srv/www && cd /srv/www && echo hello > index.html && (python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 &) && sleep 1",
    );
    let fetch = "python3 -c \"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8000/index.html').read().decode().strip())\"";
    assert_eq!(d.sh(&id, fetch).1, "hello\n");
    let c = checkpoint(&d, &id);
    let (code, _, err) = d.sh(&id, "pkill -f 'http[.]server'; sleep 0.2");
    assert_eq!(code, 0, "{err}");
    // The template does not hold the listening socket: the port is free, and a new server can take it.
    let fetch_or_fail = format!("timeout 5 {fetch}");
    assert_ne!(
        d.sh(&id, &fetch_or_fail).0,
        0,
        "the server is down: connection refused"
    );
    out(
        &d,
        &id,
        &sh,
        "cd /srv/www && echo other > index.html && (python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 &) && sleep 1",
    );
    assert_eq!(d.sh(&id, fetch).1, "other\n", "a new server took the port");
    d.ok(&["rollback", &id, &c]);
    assert_eq!(
        d.sh(&id, &fetch_or_fail).1,
        "hello\n",
        "the checkpoint's server is back, listening on its port again"
    );
    d.stop_and_check(&[id]);
}

#[test]
fn a_pipe_reader_sees_end_of_file_when_the_writer_exits_after_a_checkpoint() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let sh = d.session(&id, "bash");
    out(
        &d,
        &id,
        &sh,
        "mkdir -p /work && printf 'import time\nwhile True:\n    print(1, flush=True)\n    time.sleep(0.05)\n' > /work/w.py && printf 'import sys\nn = sum(1 for _ in sys.stdin)\nopen(\"/work/eof\", \"w\").write(\"eof\")\n' > /work/r.py && (python3 /work/w.py | python3 /work/r.py &) && sleep 0.5",
    );
    checkpoint(&d, &id);
    // The writer exits: the reader must see end-of-file although the writer's template lives on.
    d.sh(&id, "pkill -f 'w[.]py'");
    eventually("the reader sees end-of-file", || {
        d.sh(&id, "cat /work/eof").1 == "eof"
    });
    d.stop_and_check(&[id]);
}

#[test]
fn multi_threaded_processes_refuse_a_process_checkpoint_by_name() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let py = d
        .ok(&["session", "start", &id, "python3"])
        .trim()
        .to_string();
    out(&d, &id, &py, "import threading, time\nt = threading.Thread(target=time.sleep, args=(600,), daemon=True)\nt.start()");
    let r = d.cli(&["checkpoint", &id, "--processes"]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("threads") && err.contains("python3"), "{err}");
    // Nothing changed; a files-only checkpoint works.
    assert_eq!(out(&d, &id, &py, "t.is_alive()"), "True\n");
    d.ok(&["checkpoint", &id]);
    d.stop_and_check(&[id]);
}

#[test]
fn killed_templates_and_daemon_restarts_fall_back_to_restarting_processes() {
    let mut d = TestDaemon::start();
    let id = d.create(&[]);
    let py = d
        .ok(&["session", "start", &id, "python3"])
        .trim()
        .to_string();
    out(&d, &id, &py, "x = 1");
    let c = checkpoint(&d, &id);
    // The agent kills everything it can see, templates included.
    let _ = d.sh(&id, "kill -9 -1; true");
    let r = d.json(&["rollback", &id, &c, "--json"]);
    assert_eq!(r["processes_restarted"], true, "{r}");
    assert!(r["note"].as_str().unwrap().contains("gone"), "{r}");
    // Templates do not survive the daemon either: the rollback says so and restarts the processes.
    let py = d
        .ok(&["session", "start", &id, "python3"])
        .trim()
        .to_string();
    out(&d, &id, &py, "x = 2");
    let c2 = checkpoint(&d, &id);
    d.stop();
    d.spawn();
    let r = d.json(&["rollback", &id, &c2, "--json"]);
    assert_eq!(r["processes_restarted"], true, "{r}");
    assert!(
        r["note"].as_str().unwrap().contains("templates are gone"),
        "{r}"
    );
    let (_, files, _) = d.sh(&id, "echo ok");
    assert_eq!(files, "ok\n");
    d.stop_and_check(&[id]);
}
