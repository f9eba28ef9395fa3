//! Resource limits and runaway programs: memory, pids, cpu, huge output, timeouts.

use std::time::{Duration, Instant};

use crate::common::*;

#[test]
fn memory_hog_is_oom_killed_and_reported() {
    let d = TestDaemon::start();
    let id = d.create(&["--memory", "128M"]);
    let r = d.json(&[
        "exec",
        &id,
        "--",
        "python3",
        "-c",
        "x = bytearray(600 * 1024 * 1024); print('survived')",
    ]);
    assert_eq!(r["oom_killed"], true, "{r}");
    assert_eq!(r["signal"], 9);
    assert!(!r["stdout"].as_str().unwrap().contains("survived"));
    // The sandbox itself is fine afterwards.
    assert_eq!(d.ok(&["exec", &id, "--", "echo", "ok"]).trim(), "ok");
    d.stop_and_check(&[id]);
}

#[test]
fn fork_bomb_hits_the_pids_limit() {
    let d = TestDaemon::start();
    let id = d.create(&["--pids", "64"]);
    let out = d.cli(&[
        "exec",
        "--timeout",
        "5",
        &id,
        "--",
        "bash",
        "-c",
        "bomb() { bomb | bomb & }; bomb; sleep 3",
    ]);
    assert!(out.status.code().is_some());
    let pids = cgroup_dirs_of(&id)
        .into_iter()
        .find(|p| p.starts_with("/sys/fs/cgroup/pids"))
        .unwrap();
    let current: u64 = std::fs::read_to_string(pids.join("pids.current"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(current <= 64, "pids.current {current}");
    let max: u64 = std::fs::read_to_string(pids.join("pids.max"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(max, 64);
    // Daemon and host are fine; removing the sandbox ends the bomb.
    d.ok(&["ls"]);
    let t = Instant::now();
    d.ok(&["rm", &id]);
    assert!(t.elapsed() < Duration::from_secs(20));
    d.stop_and_check(&[id]);
}

#[test]
fn cpu_limit_is_enforced() {
    let d = TestDaemon::start();
    let id = d.create(&["--cpus", "0.3"]);
    let quota = cgroup_dirs_of(&id)
        .into_iter()
        .find(|p| p.starts_with("/sys/fs/cgroup/cpu/"))
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(quota.join("cpu.cfs_quota_us"))
            .unwrap()
            .trim(),
        "30000"
    );
    let py = "import time, resource\nt = time.time()\nwhile time.time() - t < 2: pass\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_utime / (time.time() - t))";
    let share: f64 = d
        .ok(&["exec", &id, "--", "python3", "-c", py])
        .trim()
        .parse()
        .unwrap();
    assert!(
        share < 0.6,
        "a busy loop got {share:.2} of a core under a 0.3-core limit"
    );
    d.stop_and_check(&[id]);
}

#[test]
fn huge_output_is_bounded_and_flagged() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let r = d.json(&[
        "exec",
        "--timeout",
        "120",
        &id,
        "--",
        "head",
        "-c",
        "1000000000",
        "/dev/zero",
    ]);
    assert_eq!(r["exit_code"], 0, "{}", r["stderr"]);
    assert_eq!(r["stdout_truncated"], true);
    assert_eq!(r["stdout"].as_str().unwrap().len(), 1 << 20);
    assert_eq!(r["timed_out"], false);
    d.stop_and_check(&[id]);
}

#[test]
fn exec_timeout_kills_the_command_group() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let t = Instant::now();
    let out = d.cli(&[
        "exec",
        "--timeout",
        "1",
        &id,
        "--",
        "sh",
        "-c",
        "sleep 30 & sleep 30; echo never",
    ]);
    assert_eq!(out.status.code(), Some(124));
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("never"));
    let (_, ps, _) = d.sh(&id, "ps -eo args 2>/dev/null || cat /proc/[0-9]*/cmdline");
    assert!(!ps.contains("sleep 30"), "the whole group was killed: {ps}");
    // A command that leaves a background job holding its pipes still returns promptly.
    let t = Instant::now();
    let r = d.json(&["exec", &id, "--", "sh", "-c", "sleep 30 & echo started"]);
    assert_eq!(r["stdout"], "started\n");
    assert!(t.elapsed() < Duration::from_secs(5));
    d.stop_and_check(&[id]);
}

#[test]
fn a_client_that_disconnects_mid_stream_kills_its_command() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let marker = "sleep 1000.25";
    let mut cli = d.cli_spawn(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        &format!("echo started; {marker}"),
    ]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while host_processes_with(marker).is_empty() {
        assert!(Instant::now() < deadline, "command did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    cli.kill().unwrap();
    cli.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !host_processes_with(marker).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the command outlived its disconnected client"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(d.ok(&["exec", &id, "--", "echo", "ok"]), "ok\n");
    d.stop_and_check(&[id]);
}
