//! Fork ×N of live processes: every branch of a process checkpoint is a sandbox of its own that goes on from the
//! checkpoint's processes (same pids, the sessions' state), and no branch can see or signal another or its
//! source.

use crate::common::*;

fn fork(d: &TestDaemon, c: &str, n: usize) -> Vec<serde_json::Value> {
    let v = d.json(&["fork", c, "-n", &n.to_string()]);
    let list = v.as_array().unwrap_or_else(|| panic!("fork: {v}")).clone();
    assert_eq!(list.len(), n, "{v}");
    list
}

/// The ids of [`fork`]'s branches.
fn ids_of(branches: &[serde_json::Value]) -> Vec<String> {
    branches
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect()
}

/// Removes `branches` in that order (a branch's own branches first), then stops the daemon, checking that
/// nothing of them or of `others` is left behind.
fn remove_and_check(d: TestDaemon, branches: &[String], others: &[String]) {
    for b in branches {
        d.ok(&["rm", b]);
    }
    let mut all = branches.to_vec();
    all.extend_from_slice(others);
    d.stop_and_check(&all);
}

/// Pids a sandbox's own `/proc` shows (what its processes can see and signal).
fn visible_pids(d: &TestDaemon, id: &str) -> Vec<i32> {
    let (code, stdout, err) = d.sh(id, "cd /proc && echo [0-9]*");
    assert_eq!(code, 0, "{err}");
    let mut v: Vec<i32> = stdout
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    v.sort_unstable();
    v
}

#[test]
fn branches_get_the_processes_with_their_state_and_pids_and_diverge_on_their_own() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let py = d.session(&id, "python3");
    let sh = d.session(&id, "bash");
    out(&d, &id, &py, "import os\ndata = list(range(10**6))\nx = 41");
    let py_pid = out(&d, &id, &py, "os.getpid()");
    out(
        &d,
        &id,
        &sh,
        "mkdir -p /work/deep && cd /work/deep && export FOO=bar && greet() { echo hi $1; }; echo v1 > /work/file",
    );
    let sh_pid = out(&d, &id, &sh, "echo $$");
    let c = checkpoint_processes(&d, &id);
    // The source goes on.
    out(&d, &id, &py, "x = 1000");
    out(
        &d,
        &id,
        &sh,
        "cd / && unset FOO && echo source > /work/file",
    );

    let branches = fork(&d, &c, 3);
    let ids = ids_of(&branches);
    for (i, (b, info)) in ids.iter().zip(&branches).enumerate() {
        assert_eq!(info["branch_of"], id.as_str(), "{info}");
        let mut forked: Vec<i64> = info["forked_processes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_i64().unwrap())
            .collect();
        forked.sort_unstable();
        let mut want: Vec<i64> = vec![
            py_pid.trim().parse().unwrap(),
            sh_pid.trim().parse().unwrap(),
        ];
        want.sort_unstable();
        assert_eq!(forked, want, "{info}");
        // The sessions go on in the branch under the same ids, from the checkpoint's state, with their pids.
        assert_eq!(out(&d, b, &py, "x + 1, len(data)"), "(42, 1000000)\n");
        assert_eq!(out(&d, b, &py, "os.getpid()"), py_pid);
        assert_eq!(
            out(
                &d,
                b,
                &sh,
                "pwd; echo $FOO; greet you; cat /work/file; echo $$"
            ),
            format!("/work/deep\nbar\nhi you\nv1\n{sh_pid}")
        );
        // Each diverges.
        out(&d, b, &py, &format!("x = {i}"));
        out(
            &d,
            b,
            &sh,
            &format!("export FOO=b{i}; echo b{i} > /work/file"),
        );
    }
    for (i, b) in ids.iter().enumerate() {
        assert_eq!(out(&d, b, &py, "x"), format!("{i}\n"));
        assert_eq!(
            out(&d, b, &sh, "echo $FOO; cat /work/file"),
            format!("b{i}\nb{i}\n")
        );
        // What a branch writes lands in its own writable layer.
        let upper = std::path::PathBuf::from(d.json(&["info", b])["upper"].as_str().unwrap());
        assert_eq!(
            std::fs::read_to_string(upper.join("work/file")).unwrap(),
            format!("b{i}\n")
        );
    }
    // The source is untouched.
    assert_eq!(out(&d, &id, &py, "x"), "1000\n");
    assert_eq!(
        out(&d, &id, &sh, "echo ${FOO:-unset}; cat /work/file"),
        "unset\nsource\n"
    );
    // The source rolls back and forks again; the branches are unaffected.
    d.ok(&["rollback", &id, &c]);
    assert_eq!(out(&d, &id, &py, "x"), "41\n");
    assert_eq!(out(&d, &ids[0], &py, "x"), "0\n");
    let more = fork(&d, &c, 1);
    let extra = more[0]["id"].as_str().unwrap().to_string();
    assert_eq!(out(&d, &extra, &py, "x"), "41\n");

    // The source cannot be removed while branches live in its pid namespace.
    let r = d.cli(&["rm", &id]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("remove them first") || err.contains("remove it first"),
        "{err}"
    );
    assert_eq!(out(&d, &id, &py, "x"), "41\n", "nothing happened to it");
    let mut branches = ids.clone();
    branches.push(extra);
    remove_and_check(d, &branches, &[id]);
}

#[test]
fn branches_cannot_see_or_signal_each_other_or_their_source() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let sh = d.session(&id, "bash");
    out(&d, &id, &sh, "sleep 1000 & echo started");
    let sh_pid: i32 = out(&d, &id, &sh, "echo $$").trim().parse().unwrap();
    let c = checkpoint_processes(&d, &id);
    let ids = ids_of(&fork(&d, &c, 2));
    let source_sees = visible_pids(&d, &id);
    for b in &ids {
        let pids = visible_pids(&d, b);
        // Init, the shell, its sleep, and the probe's own `sh` (plus a transient pid): nothing of the source
        // or of the other branch.
        assert!(pids.contains(&1) && pids.contains(&sh_pid), "{pids:?}");
        assert!(
            pids.len() <= 5,
            "a branch sees only its own processes: {pids:?}"
        );
        let (_, ps, _) = d.sh(b, "cat /proc/[0-9]*/comm | sort | tr '\\n' ' '");
        assert!(ps.contains("sleep") && ps.contains("bash"), "{ps}");
        assert!(!ps.contains("python"), "{ps}");
    }
    // A branch's processes are not in the source's cgroup either: only in their branch's.
    for b in &ids {
        let cg = cgroup_dirs_of(b);
        let procs = std::fs::read_to_string(cg[0].join("cgroup.procs")).unwrap();
        assert!(
            procs.lines().count() >= 3,
            "init, bash and sleep are in the branch's cgroup: {procs}"
        );
    }
    assert!(source_sees.contains(&sh_pid));
    // `kill -9 -1` in branch 0 ends everything it can reach: its own processes only.
    let _ = d.sh(&ids[0], "kill -9 -1");
    eventually("branch 0's shell is gone", || {
        d.json(&["session", "run", &ids[0], &sh, "true"])["exit_code"] != 0
    });
    assert_eq!(
        out(&d, &ids[1], &sh, "echo alive; jobs -p | wc -l"),
        "alive\n1\n"
    );
    assert_eq!(
        out(&d, &id, &sh, "echo alive; jobs -p | wc -l"),
        "alive\n1\n"
    );
    remove_and_check(d, &ids, &[id]);
}

#[test]
fn a_branch_checkpoints_rolls_back_and_forks_on_its_own() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let py = d.session(&id, "python3");
    out(&d, &id, &py, "x = 1");
    let c = checkpoint_processes(&d, &id);
    // A paused source's templates are frozen with it: refused, saying so.
    d.ok(&["pause", &id]);
    let r = d.cli(&["fork", &c]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("is paused"));
    d.ok(&["resume", &id]);
    let b = fork(&d, &c, 1)[0]["id"].as_str().unwrap().to_string();
    out(&d, &b, &py, "x = 2");
    let cb = checkpoint_processes(&d, &b);
    out(&d, &b, &py, "x = 3");
    let r = d.json(&["rollback", &b, &cb, "--json"]);
    assert_eq!(r["processes_restarted"], false, "{r}");
    assert_eq!(out(&d, &b, &py, "x"), "2\n");
    // A branch of the branch: one pid namespace further down.
    let bbs = ids_of(&fork(&d, &cb, 2));
    for (i, x) in bbs.iter().enumerate() {
        assert_eq!(out(&d, x, &py, "x"), "2\n");
        out(&d, x, &py, &format!("x = {}", 10 + i));
    }
    assert_eq!(out(&d, &bbs[1], &py, "x"), "11\n");
    assert_eq!(out(&d, &b, &py, "x"), "2\n");
    assert_eq!(out(&d, &id, &py, "x"), "1\n");
    // The branch cannot go while its own branches run; they can.
    assert!(!d.cli(&["rm", &b]).status.success());
    let mut branches = bbs.clone();
    branches.push(b);
    remove_and_check(d, &branches, &[id]);
}

#[test]
fn a_background_server_serves_in_each_branch_on_its_own_loopback() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let sh = d.session(&id, "bash");
    out(
        &d,
        &id,
        &sh,
        "mkdir -p /srv && cd /srv && echo hello > index.html && (python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 &) && sleep 1",
    );
    let fetch = "timeout 5 python3 -c \"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8000/index.html').read().decode().strip())\"";
    assert_eq!(d.sh(&id, fetch).1, "hello\n");
    let c = checkpoint_processes(&d, &id);
    let ids = ids_of(&fork(&d, &c, 2));
    // Each branch's server answers on the branch's own loopback, with the branch's files.
    d.sh(&ids[1], "echo branch1 > /srv/index.html");
    assert_eq!(d.sh(&ids[0], fetch).1, "hello\n");
    assert_eq!(d.sh(&ids[1], fetch).1, "branch1\n");
    // A branch stopping its server (`pkill` sees only its own processes) leaves its sibling's and the
    // source's alone.
    d.sh(&ids[1], "pkill -f 'http[.]server'; sleep 0.2");
    assert_ne!(d.sh(&ids[1], fetch).0, 0);
    assert_eq!(d.sh(&ids[0], fetch).1, "hello\n");
    assert_eq!(d.sh(&id, fetch).1, "hello\n");
    remove_and_check(d, &ids, &[id]);
}

#[test]
fn a_fork_after_the_templates_were_killed_gets_the_files_and_says_why() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let py = d.session(&id, "python3");
    out(&d, &id, &py, "open('/root/kept', 'w').write('v1')");
    let c = checkpoint_processes(&d, &id);
    // The agent kills everything it can see, templates included.
    let _ = d.sh(&id, "kill -9 -1; true");
    let b = fork(&d, &c, 2);
    for info in &b {
        assert!(
            info["note"].as_str().unwrap_or("").contains("gone"),
            "{info}"
        );
        assert!(info["forked_processes"].is_null(), "{info}");
        let bid = info["id"].as_str().unwrap();
        assert_eq!(d.sh(bid, "cat /root/kept").1, "v1");
    }
    remove_and_check(d, &ids_of(&b), &[id]);
}

#[test]
fn a_process_without_root_credentials_is_checkpointed_and_restored_but_refuses_the_fork_by_name() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let sh = d.session(&id, "bash");
    let pid = unprivileged_sleep(&d, &id, &sh);
    let alive = |d: &TestDaemon| {
        d.sh(&id, &format!("cat /proc/{pid}/comm; cat /proc/{pid}/fd/7"))
            .1
    };
    assert_eq!(alive(&d), "sleep\nsecret\n");
    let c = d.json(&["checkpoint", &id, "--processes", "--json"]);
    assert_eq!(c["switch"]["killed"], serde_json::json!([]), "{c}");
    assert!(
        c["switch"]["notes"][0]
            .as_str()
            .unwrap()
            .contains("working directory /root is not searchable with its own credentials"),
        "{c}"
    );
    assert_eq!(
        alive(&d),
        "sleep\nsecret\n",
        "still running after the checkpoint"
    );
    let c = c["id"].as_str().unwrap().to_string();
    // Rollback brings it back with its pid (through ns_last_pid: it may not choose pids itself) and its file.
    d.sh(&id, &format!("kill {pid}"));
    let r = d.json(&["rollback", &id, &c, "--json"]);
    assert_eq!(r["processes_restarted"], false, "{r}");
    assert!(
        r["note"].as_str().unwrap().contains("continues in /"),
        "{r}"
    );
    assert_eq!(alive(&d), "sleep\nsecret\n", "restored");
    // A fork would need it to move itself into the branch's namespaces: refused by name, nothing left behind.
    let before = d.json(&["ls"]).as_array().unwrap().len();
    let r = d.cli(&["fork", &c, "-n", "3"]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("(sleep) runs without the sandbox's root capabilities"),
        "{err}"
    );
    assert_eq!(
        d.json(&["ls"]).as_array().unwrap().len(),
        before,
        "no branch left"
    );
    out(&d, &id, &sh, "export X=1");
    d.stop_and_check(&[id]);
}

/// An asyncio (epoll) server: a copy gets an epoll instance of its own watching its re-created listening socket,
/// after a rollback and in a branch.
#[test]
fn an_asyncio_server_serves_after_rollback_and_in_a_branch() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let sh = d.session(&id, "bash");
    let server = "import asyncio\n\
async def handle(r, w):\n    await r.readline()\n    w.write(open('/srv/msg').read().encode())\n    await w.drain()\n    w.close()\n\
async def main():\n    s = await asyncio.start_server(handle, '127.0.0.1', 8002)\n    async with s:\n        await s.serve_forever()\n\
asyncio.run(main())\n";
    out(
        &d,
        &id,
        &sh,
        &format!(
            "mkdir -p /srv && echo one > /srv/msg && cat > /srv/aserver.py <<'PY'\n{server}PY\n\
             (python3 /srv/aserver.py >/dev/null 2>&1 &) && sleep 1"
        ),
    );
    let fetch = "timeout 5 python3 -c \"import socket; s = socket.create_connection(('127.0.0.1', 8002), timeout=4); s.sendall(b'hi\\n'); print(s.recv(100).decode().strip())\"";
    assert_eq!(d.sh(&id, fetch).1, "one\n");
    let c = checkpoint_processes(&d, &id);
    d.sh(&id, "pkill -f aserver; sleep 0.2");
    assert_ne!(d.sh(&id, fetch).0, 0, "down");
    let r = d.json(&["rollback", &id, &c, "--json"]);
    assert_eq!(r["processes_restarted"], false, "{r}");
    assert_eq!(
        d.sh(&id, fetch).1,
        "one\n",
        "serving again after the rollback"
    );
    let b = fork(&d, &c, 1)[0]["id"].as_str().unwrap().to_string();
    d.sh(&b, "echo two > /srv/msg");
    assert_eq!(d.sh(&b, fetch).1, "two\n", "the branch's own server");
    assert_eq!(d.sh(&id, fetch).1, "one\n");
    remove_and_check(d, &[b], &[id]);
}

/// Branches of branches nest one pid namespace deeper each generation; past the kernel's 32 levels the fork
/// fails with a clear error and leaves nothing behind.
#[test]
fn fork_generations_stop_at_the_pid_namespace_depth_limit_with_a_clear_error() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let py = d.session(&id, "python3");
    out(&d, &id, &py, "depth = 0");
    let mut chain = vec![id.clone()];
    let err = loop {
        let cur = chain.last().unwrap().clone();
        let c = checkpoint_processes(&d, &cur);
        let r = d.cli(&["--json", "fork", &c]);
        if !r.status.success() {
            break String::from_utf8_lossy(&r.stderr).into_owned();
        }
        let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
        let b = v[0]["id"].as_str().unwrap().to_string();
        out(&d, &b, &py, "depth += 1");
        chain.push(b);
        assert!(chain.len() < 40, "no depth limit?");
    };
    assert!(err.contains("fork depth limit"), "{err}");
    // The sandbox is at level 1 below the host's pid namespace, so 31 generations of branches fit.
    assert_eq!(chain.len() - 1, 31, "generations");
    assert_eq!(
        out(&d, chain.last().unwrap(), &py, "depth"),
        "31\n",
        "the deepest branch went on from every generation's state"
    );
    let listed = d.json(&["ls"]).as_array().unwrap().len();
    assert_eq!(listed, chain.len(), "nothing left of the refused fork");
    let deepest_first: Vec<String> = chain.iter().rev().cloned().collect();
    remove_and_check(d, &deepest_first, &[]);
}
