//! DeltaFS checkpoints: live generation switch (processes keep running), frozen layers never change,
//! rollback restores files, bad input is refused with reasons.

use std::path::PathBuf;

use crate::common::*;
// Locals here are named `out` (command outputs): the session helper goes by `run`.
use crate::common::out as run;

fn upper(d: &TestDaemon, id: &str) -> PathBuf {
    PathBuf::from(d.json(&["info", id])["upper"].as_str().unwrap())
}

#[test]
fn checkpoint_keeps_processes_running_and_freezes_the_layer() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let s = d.ok(&["session", "start", &id, "bash"]).trim().to_string();
    let py = d
        .ok(&["session", "start", &id, "python3"])
        .trim()
        .to_string();
    run(&d, &id, &s, "mkdir -p /work/deep/dir && cd /work/deep/dir && echo v1 > f && exec 7>>/work/log && echo line1 >&7");
    run(
        &d,
        &id,
        &py,
        "w = open('/work/py.txt', 'a', buffering=1)\nr = open('/work/deep/dir/f')\nw.write('a\\n')",
    );
    let frozen = upper(&d, &id);
    let c1 = d.ok(&["checkpoint", &id]).trim().to_string();
    assert!(
        c1.starts_with("c-"),
        "checkpoint prints only its id: {c1:?}"
    );
    assert_ne!(upper(&d, &id), frozen, "a fresh writable layer");
    // Processes kept running, in the same directory, with the same descriptors, now on the new generation.
    assert_eq!(
        run(
            &d,
            &id,
            &s,
            "/bin/pwd; echo line2 >&7; echo v2 > f; cat /work/log f"
        ),
        "/work/deep/dir\nline1\nline2\nv2\n"
    );
    assert_eq!(
        run(
            &d,
            &id,
            &py,
            "w.write('b\\n'); r.read(), open('/work/py.txt').read()"
        ),
        "('v2\\n', 'a\\nb\\n')\n",
        "a re-pointed read descriptor sees later writes, as on any filesystem"
    );
    // The frozen layer did not change.
    assert_eq!(
        std::fs::read_to_string(frozen.join("work/log")).unwrap(),
        "line1\n"
    );
    assert_eq!(
        std::fs::read_to_string(frozen.join("work/deep/dir/f")).unwrap(),
        "v1\n"
    );
    assert_eq!(
        std::fs::read_to_string(frozen.join("work/py.txt")).unwrap(),
        "a\n"
    );
    let frozen2 = upper(&d, &id);
    let c2 = d.ok(&["checkpoint", &id]).trim().to_string();
    run(&d, &id, &s, "echo v3 > f; rm /work/log; echo line3 >&7");
    // The layer holds the state at c2 (copy-up copies whole files), and only files changed since c1.
    assert_eq!(
        std::fs::read_to_string(frozen2.join("work/log")).unwrap(),
        "line1\nline2\n"
    );
    assert!(frozen.join("etc/hostname").exists() && !frozen2.join("etc/hostname").exists());
    let list = d.json(&["checkpoints", &id]);
    assert_eq!(list[0]["id"], c1.as_str());
    assert_eq!(list[1]["id"], c2.as_str());
    assert_eq!(list[1]["parent"], c1.as_str());
    assert_eq!(list[1]["depth"], 2);

    let out = d.cli(&["rollback", &id, &c1]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("restarted"),
        "says that processes restarted"
    );
    let (code, files, _) = d.sh(&id, "cat /work/log /work/deep/dir/f /work/py.txt");
    assert_eq!((code, files.as_str()), (0, "line1\nv1\na\n"));
    d.ok(&["rollback", &id, &c2]);
    let (_, files, _) = d.sh(&id, "cat /work/log /work/deep/dir/f /work/py.txt");
    assert_eq!(files, "line1\nline2\nv2\na\nb\n");
    assert_eq!(d.json(&["info", &id])["head"], c2.as_str());
    // Rolling back to the same checkpoint again and again works every time.
    for i in 0..5 {
        d.ok(&["rollback", &id, &c1]);
        let (_, f, _) = d.sh(
            &id,
            &format!("cat /work/deep/dir/f; echo {i} > /work/deep/dir/f"),
        );
        assert_eq!(f, "v1\n");
    }
    d.ok(&["rm", &id]);
    eventually("rm frees every layer (background GC)", || {
        layer_dirs(&d) == 0
    });
    d.stop_and_check(&[id]);
}

#[test]
fn unsafe_descriptors_refuse_the_checkpoint_and_change_nothing() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let s = d.ok(&["session", "start", &id, "bash"]).trim().to_string();
    run(
        &d,
        &id,
        &s,
        "mkdir -p /work && exec 8>/work/scratch && rm /work/scratch",
    );
    let before = upper(&d, &id);
    let out = d.cli(&["checkpoint", &id]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("fd 8") && err.contains("/work/scratch") && err.contains("deleted"),
        "{err}"
    );
    assert_eq!(upper(&d, &id), before, "nothing switched");
    assert!(d.json(&["checkpoints", &id]).as_array().unwrap().is_empty());
    // The sandbox was thawed and works; once the descriptor is closed the checkpoint goes through.
    run(&d, &id, &s, "exec 8>&-");
    d.ok(&["checkpoint", &id]);
    // A shared writable mapping of a file in the sandbox is refused too.
    let p = d
        .ok(&["session", "start", &id, "python3"])
        .trim()
        .to_string();
    run(&d, &id, &p, "import mmap\nf = open('/work/m', 'w+b'); f.write(b'x' * 4096); f.flush()\nm = mmap.mmap(f.fileno(), 4096)");
    let out = d.cli(&["checkpoint", &id]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("shared writable mapping of /work/m"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    run(&d, &id, &p, "m.close()");
    d.ok(&["checkpoint", &id]);
    assert_eq!(
        layer_dirs(&d),
        3,
        "two frozen layers and the writable one; refused attempts left nothing"
    );
    // A process in a mount namespace of its own would keep writing into the frozen layer: refused, named.
    run(
        &d,
        &id,
        &s,
        "unshare -m --propagation unchanged sleep 600 >/dev/null 2>&1 & sleep 0.3",
    );
    let out = d.cli(&["checkpoint", &id]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("mount namespace of its own") && err.contains("(sleep)"),
        "{err}"
    );
    run(&d, &id, &s, "kill %1; wait");
    d.ok(&["checkpoint", &id]);
    d.stop_and_check(&[id]);
}

fn layer_dirs(d: &TestDaemon) -> usize {
    std::fs::read_dir(d.dir.join("store/layers"))
        .map(|r| r.count())
        .unwrap_or(0)
}

#[test]
fn bad_checkpoint_ids_are_refused() {
    let d = TestDaemon::start();
    let a = d.create(&[]);
    let b = d.create(&[]);
    let ca = d.ok(&["checkpoint", &a]).trim().to_string();
    for (args, want) in [
        (vec!["rollback", &a, "c-000000000000"], "no checkpoint"),
        (vec!["rollback", &a, "../x"], "no checkpoint"),
        (vec!["rollback", &b, &ca], "belongs to sandbox"),
        (vec!["checkpoint", "nosuch"], "no sandbox"),
        (vec!["checkpoints", "nosuch"], "no sandbox"),
    ] {
        let out = d.cli(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(want),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    d.ok(&["pause", &a]);
    assert!(String::from_utf8_lossy(&d.cli(&["checkpoint", &a]).stderr).contains("paused"));
    d.ok(&["resume", &a]);
    d.stop_and_check(&[a, b]);
}

#[test]
fn forks_share_layers_and_checkpoints_are_removed_only_when_unneeded() {
    let d = TestDaemon::start();
    let id = d.create(&["--memory", "256M"]);
    let (_, _, _) = d.sh(&id, "mkdir -p /work && echo base > /work/f");
    let c1 = d.ok(&["checkpoint", &id]).trim().to_string();
    d.sh(&id, "echo two > /work/g");
    let c2 = d.ok(&["checkpoint", &id]).trim().to_string();
    let forks: Vec<String> = d
        .ok(&["fork", &c2, "-n", "3"])
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(forks.len(), 3);
    for (i, f) in forks.iter().enumerate() {
        let info = d.json(&["info", f]);
        assert_eq!(info["head"], c2.as_str());
        assert_eq!(
            info["memory_bytes"],
            256 << 20,
            "forks keep the source's limits"
        );
        let (code, out, _) = d.sh(f, &format!("cat /work/f /work/g; echo fork{i} > /work/f"));
        assert_eq!((code, out.as_str()), (0, "base\ntwo\n"));
    }
    // Each fork wrote only to its own layer.
    for (i, f) in forks.iter().enumerate() {
        assert_eq!(d.sh(f, "cat /work/f").1, format!("fork{i}\n"));
    }
    assert_eq!(d.sh(&id, "cat /work/f").1, "base\n");
    // c1 has a descendant, c2 has forks: both refused, with the reason.
    let out = d.cli(&["rm-checkpoint", &c1]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("needed by checkpoint {c2}")),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = d.cli(&["rm-checkpoint", &c2]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("(a fork)"));
    // Removing the source keeps what the forks need.
    d.ok(&["rm", &id]);
    assert_eq!(d.sh(&forks[0], "cat /work/g").1, "two\n");
    let out = d.cli(&["fork", "c-000000000000"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no checkpoint"));
    for bad in ["0", "65"] {
        let out = d.cli(&["fork", &c2, "-n", bad]);
        assert!(!out.status.success(), "n={bad}");
    }
    // A fork's own checkpoint can be removed when nothing builds on it.
    let cf = d.ok(&["checkpoint", &forks[1]]).trim().to_string();
    d.ok(&["rm-checkpoint", &cf]);
    assert!(
        String::from_utf8_lossy(&d.cli(&["rollback", &forks[1], &cf]).stderr)
            .contains("no checkpoint")
    );
    for f in &forks {
        d.ok(&["rm", f]);
    }
    eventually("no layer outlives its users (background GC)", || {
        layer_dirs(&d) == 0
    });
    let mut all = forks.clone();
    all.push(id);
    d.stop_and_check(&all);
}

#[test]
fn daemon_killed_between_switch_and_record_restarts_consistent() {
    let mut d = TestDaemon::start();
    let id = d.create(&[]);
    d.sh(&id, "mkdir -p /work && echo one > /work/f");
    let c1 = d.ok(&["checkpoint", &id]).trim().to_string();
    d.sh(&id, "echo two > /work/f");
    let layers_before: Vec<_> = std::fs::read_dir(d.dir.join("store/layers"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    std::fs::write(d.dir.join("fault-crash-after-switch"), "").unwrap();
    let out = d.cli(&["checkpoint", &id]);
    assert!(!out.status.success(), "the daemon died mid-checkpoint");
    std::fs::remove_file(d.dir.join("fault-crash-after-switch")).unwrap();
    d.kill9();
    d.spawn();
    // Recorded state only: the sandbox is lost, the unrecorded generation's layer is gone, c1 still works.
    assert_eq!(d.json(&["info", &id])["status"], "lost");
    let mut layers_after: Vec<_> = std::fs::read_dir(d.dir.join("store/layers"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let mut before = layers_before.clone();
    before.sort();
    layers_after.sort();
    assert_eq!(layers_after, before, "no unrecorded layer left behind");
    assert_eq!(d.json(&["checkpoints", &id]).as_array().unwrap().len(), 1);
    d.ok(&["rollback", &id, &c1]);
    assert_eq!(d.sh(&id, "cat /work/f").1, "one\n");
    assert!(
        !cgroup_dirs_of(&id).is_empty(),
        "running again, in its cgroup"
    );
    d.stop_and_check(&[id]);
}

#[test]
fn diff_lists_what_changed_between_checkpoints() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let (code, _, err) = d.sh(&id, "mkdir -p /work/d /work/dir/sub && echo 1 > /work/d/x && echo keep > /work/k && echo old > /work/old && echo s > /work/dir/sub/f && echo same > /work/same");
    assert_eq!(code, 0, "{err}");
    let c1 = d.ok(&["checkpoint", &id]).trim().to_string();
    let (code, _, err) = d.sh(&id, "echo 2 > /work/d/x && echo new > /work/new && rm /work/old && mv /work/dir /work/dir2 && chmod 600 /work/k && cat /work/same > /dev/null && touch /work/same");
    assert_eq!(code, 0, "{err}");
    let c2 = d.ok(&["checkpoint", &id]).trim().to_string();
    let v = d.json(&["diff", &c1, &c2]);
    let list = |k: &str| -> Vec<String> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        list("added"),
        [
            "/work/dir2",
            "/work/dir2/sub",
            "/work/dir2/sub/f",
            "/work/new"
        ]
    );
    assert_eq!(
        list("deleted"),
        ["/work/dir", "/work/dir/sub", "/work/dir/sub/f", "/work/old"]
    );
    assert_eq!(
        list("changed"),
        ["/work/d/x", "/work/k"],
        "a touched-but-identical file is not a change"
    );
    // The other way round, and the text form.
    let back = d.json(&["diff", &c2, &c1]);
    assert_eq!(back["added"], v["deleted"]);
    assert_eq!(back["deleted"], v["added"]);
    let text = d.ok(&["diff", &c1, &c2]);
    assert!(
        text.contains("M\t/work/d/x\n")
            && text.contains("A\t/work/new\n")
            && text.contains("D\t/work/old\n"),
        "{text}"
    );
    assert!(d.json(&["diff", &c2, &c2])["changed"]
        .as_array()
        .unwrap()
        .is_empty());
    // Across branches: a fork's checkpoint against its source's.
    let f = d.ok(&["fork", &c1]).trim().to_string();
    d.sh(&f, "echo fork > /work/k");
    let cf = d.ok(&["checkpoint", &f]).trim().to_string();
    let v = d.json(&["diff", &c2, &cf]);
    assert!(v["changed"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p == "/work/k"));
    assert!(v["added"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p == "/work/old"));
    let out = d.cli(&["diff", &c1, "c-000000000000"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no checkpoint"));
    d.stop_and_check(&[id, f]);
}

#[test]
fn a_full_layer_store_gives_clear_errors_and_loses_nothing() {
    let d = TestDaemon::start_with(&[("DELTABOX_STORE_SIZE", "600M")]);
    let id = d.create(&["--memory", "1G"]);
    let (code, sum, err) = d.sh(&id, "mkdir -p /work && head -c 100000000 /dev/urandom > /work/big && sha256sum /work/big | cut -c1-64");
    assert_eq!(code, 0, "{err}");
    let frozen = upper(&d, &id);
    let c1 = d.ok(&["checkpoint", &id]).trim().to_string();
    // Fill the store from inside.
    let (code, _, err) = d.sh(
        &id,
        "dd if=/dev/zero of=/work/filler bs=1M 2>/tmp/dd.err; rc=$?; cat /tmp/dd.err >&2; exit $rc",
    );
    assert_ne!(code, 0);
    assert!(err.contains("No space left"), "{err}");
    // Modifying the checkpointed file needs a copy-up: it either works (XFS shares the extents) or fails
    // cleanly with ENOSPC; either way the frozen layer keeps its content.
    let (code, _, err) = d.sh(&id, "echo more >> /work/big");
    assert!(code == 0 || err.contains("No space left"), "{err}");
    let out = d.cli(&["checkpoint", &id]);
    assert!(
        out.status.success() || String::from_utf8_lossy(&out.stderr).contains("space"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let host_sum = std::process::Command::new("sha256sum")
        .arg(frozen.join("work/big"))
        .output()
        .unwrap();
    assert_eq!(
        &String::from_utf8_lossy(&host_sum.stdout)[..64],
        sum.trim(),
        "the frozen layer is intact"
    );
    // The daemon is fine, space comes back, and the checkpoint still restores the file.
    d.ok(&["ls"]);
    let (code, _, err) = d.sh(&id, "rm -f /work/filler");
    assert_eq!(code, 0, "{err}");
    d.ok(&["checkpoint", &id]);
    d.ok(&["rollback", &id, &c1]);
    let (_, after, _) = d.sh(&id, "sha256sum /work/big | cut -c1-64");
    assert_eq!(after, sum);
    d.stop_and_check(&[id]);
}

#[test]
fn threads_keep_writing_across_checkpoints_and_frozen_layers_stay_frozen() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let py = d
        .ok(&["session", "start", &id, "python3"])
        .trim()
        .to_string();
    // Four threads append to their own files through descriptors opened before any checkpoint, from a deep cwd.
    let code = "import os, threading, time\nos.makedirs('/work/deep/dir', exist_ok=True); os.chdir('/work/deep/dir')\nstop = threading.Event()\ndef w(i):\n    f = open(f'log{i}', 'a', buffering=1)\n    n = 0\n    while not stop.is_set():\n        f.write(f'{n}\\n'); n += 1; time.sleep(0.002)\nts = [threading.Thread(target=w, args=(i,)) for i in range(4)]\n[t.start() for t in ts]";
    let r = d.json(&["session", "run", &id, &py, code]);
    assert_eq!(r["exit_code"], 0, "{r}");
    let mut frozen = Vec::new();
    for _ in 0..5 {
        std::thread::sleep(std::time::Duration::from_millis(60));
        frozen.push(upper(&d, &id));
        let out = d.json(&["checkpoint", &id]);
        assert!(out["switch"]["fds"].as_u64().unwrap() >= 4, "{out}");
    }
    std::thread::sleep(std::time::Duration::from_millis(60));
    // Snapshot what each frozen layer holds, let the threads write on, and check nothing changed.
    let read_all = |dirs: &[PathBuf]| -> Vec<Option<String>> {
        dirs.iter()
            .flat_map(|l| {
                (0..4).map(move |i| {
                    std::fs::read_to_string(l.join(format!("work/deep/dir/log{i}"))).ok()
                })
            })
            .collect()
    };
    let before = read_all(&frozen);
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(read_all(&frozen), before, "a frozen layer changed");
    let r = d.json(&["session", "run", &id, &py, "stop.set(); [t.join() for t in ts]\nimport os\nprint(os.getcwd(), [len(open(f'log{i}').read().split()) for i in range(4)])"]);
    let out = r["stdout"].as_str().unwrap();
    assert!(out.starts_with("/work/deep/dir ["), "{r}");
    // Each log is a gap-free count: nothing was lost or duplicated across the switches.
    for i in 0..4 {
        let (_, log, _) = d.sh(&id, &format!("cat /work/deep/dir/log{i}"));
        let nums: Vec<usize> = log.lines().map(|l| l.parse().unwrap()).collect();
        assert!(nums.len() > 50, "thread {i} kept writing: {}", nums.len());
        assert!(
            nums.iter().enumerate().all(|(k, &v)| k == v),
            "thread {i} log has gaps or repeats"
        );
    }
    d.stop_and_check(&[id]);
}

/// `/tmp` is part of the sandbox's files: empty and world-writable in a new sandbox (nothing of the host's shows
/// through), covered by checkpoints, rollbacks and forks.
#[test]
fn tmp_is_checkpointed_rolled_back_and_forked_like_any_directory() {
    let marker = format!("/tmp/deltabox-host-marker-{}", std::process::id());
    std::fs::write(&marker, "host").unwrap();
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let s = d.session(&id, "bash");
    assert_eq!(
        run(&d, &id, &s, "ls -A /tmp | wc -l; stat -c %a /tmp"),
        "0\n1777\n"
    );
    run(
        &d,
        &id,
        &s,
        "echo v1 > /tmp/state && mkdir /tmp/dir && echo a > /tmp/dir/a",
    );
    let c = d.ok(&["checkpoint", &id]).trim().to_string();
    run(
        &d,
        &id,
        &s,
        "echo v2 > /tmp/state && rm -r /tmp/dir && echo new > /tmp/new",
    );
    d.ok(&["rollback", &id, &c]);
    let s = d.session(&id, "bash");
    assert_eq!(
        run(&d, &id, &s, "cat /tmp/state /tmp/dir/a; ls /tmp"),
        "v1\na\ndir\nstate\n"
    );
    let fork = d.ok(&["fork", &c]).trim().to_string();
    let fs = d.session(&fork, "bash");
    assert_eq!(run(&d, &fork, &fs, "cat /tmp/state"), "v1\n");
    std::fs::remove_file(&marker).unwrap();
    d.stop_and_check(&[id, fork]);
}
