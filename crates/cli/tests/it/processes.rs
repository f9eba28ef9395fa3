//! DeltaCR through the daemon: `checkpoint --processes` keeps a template of every process; rollback restores
//! them with their pids, and sessions go on with the restored interpreters.

use crate::common::*;

/// Rolls back to process checkpoint `c`, asserting the processes were restored (not restarted).
fn restore(d: &TestDaemon, id: &str, c: &str) {
    let r = d.json(&["rollback", id, c, "--json"]);
    assert_eq!(r["processes_restarted"], false, "{r}");
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
    let c = checkpoint_processes(&d, &id);
    // The agent goes on and breaks things.
    out(&d, &id, &py, "x = 1000\ndel data");
    out(
        &d,
        &id,
        &sh,
        "cd / && unset FOO && unset -f greet && echo v2 > /work/file && rm -rf /work/deep",
    );
    for round in 0..20 {
        restore(&d, &id, &c);
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
    // The restored processes live on the new generation: what they write lands in its writable layer, never in a
    // frozen one (their template's root was the checkpoint's generation).
    d.ok(&["rollback", &id, &c]);
    out(&d, &id, &sh, "echo fresh > probe-sh");
    out(&d, &id, &py, "open('/work/probe-py', 'w').write('fresh')");
    let upper = std::path::PathBuf::from(d.json(&["info", &id])["upper"].as_str().unwrap());
    for f in ["work/deep/dir/probe-sh", "work/probe-py"] {
        assert_eq!(
            std::fs::read_to_string(upper.join(f)).unwrap().trim(),
            "fresh",
            "{f} in the writable layer"
        );
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
    let c = checkpoint_processes(&d, &id);
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
    checkpoint_processes(&d, &id);
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
    // Warm-only checkpoints (no durable images): see `durable.rs` for the same faults with images.
    let mut d = TestDaemon::start_with(&[("DELTABOX_DURABLE", "0")]);
    let id = d.create(&[]);
    let py = d
        .ok(&["session", "start", &id, "python3"])
        .trim()
        .to_string();
    out(&d, &id, &py, "x = 1");
    let c = checkpoint_processes(&d, &id);
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
    let c2 = checkpoint_processes(&d, &id);
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

#[test]
fn processes_blocked_in_system_calls_resume_after_rollback() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let sh = d.session(&id, "bash");
    // Each background process is blocked in a different call when the checkpoint is taken, and finishes its job
    // only after the rollback: nanosleep, read on a FIFO, accept, and wait4 (whose child comes back re-parented
    // to init, so the wait ends early: the documented degradation, but it must not hang).
    out(
        &d,
        &id,
        &sh,
        "mkdir -p /work && cd /work && mkfifo fifo \
         && (python3 -c \"import time; time.sleep(1.5); open('/work/slept', 'w').write('ok')\" &) \
         && (python3 -c \"open('/work/fifo-got', 'w').write(open('/work/fifo').read())\" &) \
         && (python3 -c \"import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', 9000)); s.listen(); c, _ = s.accept(); open('/work/accepted', 'w').write(c.recv(10).decode())\" &) \
         && (sh -c 'sleep 1; echo waited > /work/waited' &) && sleep 0.5",
    );
    let c = checkpoint_processes(&d, &id);
    // The live branch finishes everything, then the sandbox goes back to before.
    d.sh(&id, "echo live > /work/fifo; python3 -c \"import socket; socket.create_connection(('127.0.0.1', 9000)).send(b'live')\"; sleep 2");
    assert_eq!(
        d.sh(&id, "cat /work/slept /work/fifo-got /work/accepted").1,
        "oklive\nlive"
    );
    d.ok(&["rollback", &id, &c]);
    // The reader is blocked in open() again (it created /work/fifo-got, empty, before opening the FIFO). Not
    // /work/slept: a restarted nanosleep keeps its original deadline, long past by now.
    assert_eq!(
        d.sh(&id, "cat /work/fifo-got /work/accepted 2>/dev/null").1,
        "",
        "the rollback undid the live branch"
    );
    d.sh(&id, "echo again > /work/fifo; python3 -c \"import socket; socket.create_connection(('127.0.0.1', 9000)).send(b'again')\"");
    eventually("every blocked call resumed and finished", || {
        d.sh(
            &id,
            "cat /work/slept /work/fifo-got /work/accepted /work/waited",
        )
        .1 == "okagain\nagainwaited\n"
    });
    d.stop_and_check(&[id]);
}

#[test]
fn a_thousand_rollbacks_to_one_checkpoint() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let py = d.session(&id, "python3");
    out(&d, &id, &py, "import os\nx = 7");
    let pid = out(&d, &id, &py, "os.getpid()");
    let c = checkpoint_processes(&d, &id);
    for round in 0..1000 {
        restore(&d, &id, &c);
        assert_eq!(
            out(&d, &id, &py, "x += 1; x, os.getpid()"),
            format!("(8, {})\n", pid.trim()),
            "round {round}"
        );
    }
    d.stop_and_check(&[id]);
}

#[test]
fn a_fifo_held_open_without_a_writer_does_not_block_checkpoint_or_rollback() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let sh = d.session(&id, "bash");
    // Re-opening this FIFO by path for reading would wait for a writer that never comes.
    out(
        &d,
        &id,
        &sh,
        "mkdir -p /work/d && cd /work/d && mkfifo f && (python3 -c \"import os, time; fd = os.open('/work/d/f', os.O_RDONLY | os.O_NONBLOCK); os.set_blocking(fd, True); time.sleep(600)\" &) && sleep 0.5",
    );
    d.ok(&["checkpoint", &id]);
    let c = checkpoint_processes(&d, &id);
    // Live holders (templates, stopped in state t, hold it too).
    let holder =
        "for p in $(pgrep -f 'time[.]sleep.600'); do grep -q '^State:.S' /proc/$p/status && ls -l /proc/$p/fd | grep -c '/work/d/f'; done";
    assert_eq!(
        d.sh(&id, holder).1,
        "1\n",
        "the holder was re-pointed, not killed"
    );
    d.ok(&["rollback", &id, &c]);
    assert_eq!(d.sh(&id, holder).1, "1\n", "and restored");
    d.stop_and_check(&[id]);
}

#[test]
fn the_template_pool_reports_costs_and_evicts_the_least_recently_used() {
    // Room for the templates of two checkpoints of a sandbox with two sessions.
    let d = TestDaemon::start_with(&[("DELTABOX_MAX_TEMPLATES", "4")]);
    let id = d.create(&[]);
    let py = d.session(&id, "python3");
    let _sh = d.session(&id, "bash");
    out(&d, &id, &py, "data = b'x' * (8 << 20); n = 1");
    let c1 = checkpoint_processes(&d, &id);
    out(&d, &id, &py, "n = 2");
    let c2 = checkpoint_processes(&d, &id);
    // Rolling back to c1 makes it the most recently used; c2 is the one to go when c3 needs room.
    d.ok(&["rollback", &id, &c1]);
    out(&d, &id, &py, "n = 3");
    let c3 = checkpoint_processes(&d, &id);
    let held = |d: &TestDaemon| -> Vec<(String, u64)> {
        d.json(&["checkpoints", &id, "--json"])
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|c| {
                let t = c.get("templates")?.as_object()?;
                Some((c["id"].as_str()?.to_string(), t["pss"].as_u64()?))
            })
            .collect()
    };
    eventually("the pool evicts down to two checkpoints", || {
        held(&d).len() == 2
    });
    let now = held(&d);
    assert!(
        now.iter().any(|(c, _)| *c == c1) && now.iter().any(|(c, _)| *c == c3),
        "{now:?}"
    );
    assert!(
        now.iter().all(|(_, pss)| *pss > 0),
        "templates report their memory: {now:?}"
    );
    // Evicted, but durable: its templates are rebuilt from its images, and the processes come back.
    let r = d.json(&["rollback", &id, &c2, "--json"]);
    assert_eq!(r["processes_restarted"], false, "{r}");
    assert!(
        r["note"].as_str().unwrap().contains("durable images"),
        "{r}"
    );
    assert_eq!(
        out(&d, &id, &py, "print(n, len(data))"),
        format!("2 {}\n", 8 << 20)
    );
    restore(&d, &id, &c1);
    assert_eq!(out(&d, &id, &py, "print(n)"), "1\n");
    d.stop_and_check(&[id]);
}

#[test]
fn without_durable_images_an_evicted_checkpoint_restarts_the_processes() {
    let d = TestDaemon::start_with(&[("DELTABOX_MAX_TEMPLATES", "4"), ("DELTABOX_DURABLE", "0")]);
    let id = d.create(&[]);
    let py = d.session(&id, "python3");
    let _sh = d.session(&id, "bash");
    out(&d, &id, &py, "n = 1");
    let c1 = checkpoint_processes(&d, &id);
    out(&d, &id, &py, "n = 2");
    let _c2 = checkpoint_processes(&d, &id);
    out(&d, &id, &py, "n = 3");
    let _c3 = checkpoint_processes(&d, &id);
    eventually("the pool evicts the oldest checkpoint", || {
        d.json(&["checkpoints", &id, "--json"])
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == c1.as_str() && c["templates"].is_null())
    });
    let r = d.json(&["rollback", &id, &c1, "--json"]);
    assert_eq!(r["processes_restarted"], true, "{r}");
    assert!(r["note"].as_str().unwrap().contains("evicted"), "{r}");
    assert!(!d.json(&["checkpoints", &id, "--json"])[0]["durable"]
        .as_bool()
        .unwrap());
    d.stop_and_check(&[id]);
}

/// A background job comes back as a child of the sandbox's init (a parent/child link below init cannot be
/// rebuilt by forking templates): it keeps running, `kill %1` still kills it, and `wait` does not hang on it.
#[test]
fn a_restored_background_job_keeps_running_and_kill_percent_one_kills_it() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let sh = d.session(&id, "bash");
    let job = out(&d, &id, &sh, "sleep 1000 & echo $!").trim().to_string();
    let c = checkpoint_processes(&d, &id);
    out(&d, &id, &sh, "kill %1; wait");
    for round in 0..3 {
        restore(&d, &id, &c);
        assert_eq!(
            out(
                &d,
                &id,
                &sh,
                &format!("kill -0 {job} && echo alive; ps -o ppid= -p {job}")
            ),
            "alive\n      1\n",
            "round {round}: the job is back, re-parented to init"
        );
        assert_eq!(
            out(
                &d,
                &id,
                &sh,
                &format!("kill %1; echo rc=$?; sleep 0.3; kill -0 {job} 2>/dev/null || echo gone")
            ),
            "rc=0\ngone\n",
            "round {round}"
        );
        assert_eq!(
            out(&d, &id, &sh, "sleep 0.1 & wait; echo waited"),
            "waited\n",
            "round {round}"
        );
    }
    d.stop_and_check(&[id]);
}

/// A sandbox whose processes fork all the time: the checkpoint holds every process (seizing newcomers until
/// none appears, or freezing the sandbox when they keep coming) and the state comes back.
#[test]
fn a_sandbox_that_keeps_forking_is_checkpointed_and_rolled_back() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let sh = d.session(&id, "bash");
    let bg = d.session(&id, "bash");
    out(
        &d,
        &id,
        &bg,
        "(while :; do /bin/true; echo x >> /tmp/spins; done) > /dev/null 2>&1 &",
    );
    for round in 0..10 {
        out(&d, &id, &sh, &format!("export ROUND={round}"));
        let c = checkpoint_processes(&d, &id);
        out(&d, &id, &sh, "export ROUND=broken");
        restore(&d, &id, &c);
        assert_eq!(out(&d, &id, &sh, "echo $ROUND"), format!("{round}\n"));
    }
    // The loop runs on after all that.
    let n = |d: &TestDaemon| {
        out(d, &id, &sh, "wc -l < /tmp/spins")
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    let before = n(&d);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(n(&d) > before, "the forking loop was restored and runs");
    d.stop_and_check(&[id]);
}

/// A file a process reads through comes back at the offset it had at the checkpoint, however far the process
/// read afterwards, on every rollback.
#[test]
fn a_restored_reader_resumes_at_the_checkpoint_offset() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let py = d.session(&id, "python3");
    out(
        &d,
        &id,
        &py,
        // Unbuffered: every readline moves the kernel's file offset.
        "import os; os.makedirs('/work', exist_ok=True)\nopen('/work/lines', 'w').write(''.join(f'line {i}\\n' for i in range(100)))\nf = open('/work/lines', 'rb', buffering=0)\nf.readline(); f.readline()",
    );
    let c = checkpoint_processes(&d, &id);
    out(&d, &id, &py, "[f.readline() for _ in range(10)]");
    for round in 0..3 {
        d.ok(&["rollback", &id, &c]);
        assert_eq!(
            out(&d, &id, &py, "print(f.readline().decode().strip())"),
            "line 2\n",
            "round {round}"
        );
        out(&d, &id, &py, "[f.readline() for _ in range(5)]");
    }
    d.stop_and_check(&[id]);
}

/// A large process in small pages is killed on rollback through a memory holder (its teardown happens after the
/// answer): the state comes back every time, the pid too, and no holder is left behind.
#[test]
fn large_small_page_processes_roll_back_with_their_teardown_deferred() {
    let d = TestDaemon::start();
    let id = d.create(&["--memory", "2G"]);
    let py = d.session(&id, "python3");
    let sh = d.session(&id, "bash");
    out(
        &d,
        &id,
        &py,
        "import os\ndata = bytearray(b'x') * (200 << 20)\nx = 1",
    );
    let pid = out(&d, &id, &py, "os.getpid()");
    let c = d.json(&[
        "checkpoint",
        &id,
        "--processes",
        "--no-huge-pages",
        "--json",
    ]);
    let c = c["id"].as_str().unwrap().to_string();
    // Every process, templates included (holders would show up here).
    let procs = |d: &TestDaemon| out(d, &id, &sh, "ps -e --no-headers | wc -l");
    let before = procs(&d);
    for round in 0..5 {
        out(&d, &id, &py, "x = 2; data[0] = 0");
        restore(&d, &id, &c);
        assert_eq!(
            out(&d, &id, &py, "x, len(data), data[0], os.getpid()"),
            format!("(1, 209715200, 120, {})\n", pid.trim()),
            "round {round}"
        );
        // (A holder's teardown runs after the answer, on a loaded machine for a moment after it.)
        eventually(&format!("round {round}: no process left behind"), || {
            procs(&d) == before
        });
    }
    d.stop_and_check(&[id]);
}

/// A job stopped by a signal at the checkpoint (^Z, SIGSTOP) comes back stopped, and continues when told to.
#[test]
fn a_stopped_job_comes_back_stopped() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let sh = d.session(&id, "bash");
    let job = out(&d, &id, &sh, "sleep 1000 & kill -STOP $!; echo $!")
        .trim()
        .to_string();
    let state = |d: &TestDaemon| {
        out(d, &id, &sh, &format!("ps -o stat= -p {job} | cut -c1"))
            .trim()
            .to_string()
    };
    eventually("the job stops", || state(&d) == "T");
    let c = checkpoint_processes(&d, &id);
    assert_eq!(state(&d), "T", "still stopped after the checkpoint");
    out(&d, &id, &sh, &format!("kill -CONT {job}"));
    d.ok(&["rollback", &id, &c]);
    assert_eq!(state(&d), "T", "stopped again after the rollback");
    out(&d, &id, &sh, &format!("kill -CONT {job}"));
    eventually("the job runs again", || state(&d) == "S");
    d.stop_and_check(&[id]);
}

/// The freezer path (taken when a sandbox keeps forking while its processes are seized; forced here) captures the
/// same state as the ptrace-only path.
#[test]
fn the_freezer_path_captures_the_same_state() {
    let d = TestDaemon::start_with(&[("DELTABOX_SEIZE_ROUNDS", "0")]);
    let id = d.create(&[]);
    let py = d.session(&id, "python3");
    let sh = d.session(&id, "bash");
    out(&d, &id, &py, "import os\nx = 41\ndata = list(range(10**5))");
    out(
        &d,
        &id,
        &sh,
        "mkdir -p /work/d && cd /work/d && export FOO=bar && echo v1 > f",
    );
    let job = out(&d, &id, &sh, "sleep 1000 & echo $!").trim().to_string();
    let pids = (
        out(&d, &id, &py, "os.getpid()"),
        out(&d, &id, &sh, "echo $$"),
    );
    let c = checkpoint_processes(&d, &id);
    for round in 0..5 {
        out(&d, &id, &py, "x = 0; del data");
        out(&d, &id, &sh, "cd /; unset FOO; echo v2 > /work/d/f");
        restore(&d, &id, &c);
        assert_eq!(
            out(&d, &id, &py, "x + 1, len(data)"),
            "(42, 100000)\n",
            "round {round}"
        );
        assert_eq!(
            out(
                &d,
                &id,
                &sh,
                &format!("pwd; echo $FOO; cat f; kill -0 {job} && echo job")
            ),
            "/work/d\nbar\nv1\njob\n",
            "round {round}"
        );
        assert_eq!(out(&d, &id, &py, "os.getpid()"), pids.0);
        assert_eq!(out(&d, &id, &sh, "echo $$"), pids.1);
    }
    d.stop_and_check(&[id]);
}
