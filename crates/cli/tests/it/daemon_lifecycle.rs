//! The daemon dying and coming back: nothing leaks, what existed is listed.

use std::time::{Duration, Instant};

use crate::common::*;

#[test]
fn daemon_killed_mid_command_leaves_nothing_behind() {
    let mut d = TestDaemon::start();
    let id = d.create(&[]);
    let marker = format!(
        "sleep 61.{}",
        &id[..6]
            .bytes()
            .map(|b| (b % 10).to_string())
            .collect::<String>()
    );
    let s = d.ok(&["session", "start", &id, "bash"]).trim().to_string();
    d.ok(&["session", "run", &id, &s, &format!("{marker} &")]);
    let exec = d.cli_spawn(&["exec", &id, "--", "sh", "-c", &marker]);
    std::thread::sleep(Duration::from_millis(500));
    assert!(!host_processes_with(&marker).is_empty());
    d.kill9();
    let out = exec.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("lost the connection") || err.contains("daemon"),
        "{err}"
    );
    // The sandbox's processes die with the daemon (zygote and init have parent-death signals).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !host_processes_with(&marker).is_empty() {
        assert!(
            Instant::now() < deadline,
            "sandbox processes outlived the daemon"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A new daemon lists the sandbox as lost, has removed its cgroup, and can delete it.
    d.spawn();
    let list = d.json(&["ls"]);
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["status"], "lost");
    assert!(cgroup_dirs_of(&id).is_empty());
    let out = d.cli(&["exec", &id, "--", "true"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("lost"));
    // New sandboxes work as usual.
    let id2 = d.create(&[]);
    assert_eq!(d.ok(&["exec", &id2, "--", "echo", "hi"]), "hi\n");
    d.ok(&["rm", &id]);
    d.stop_and_check(&[id, id2]);
}

#[test]
fn graceful_stop_and_restart() {
    let mut d = TestDaemon::start();
    let id = d.create(&[]);
    // Our daemon's cgroup parents are the parents of our sandbox's cgroups (other tests' daemons run too).
    let ours: Vec<_> = cgroup_dirs_of(&id)
        .iter()
        .filter_map(|p| p.parent().map(|p| p.to_path_buf()))
        .collect();
    assert!(
        !ours.is_empty(),
        "the daemon has a cgroup parent of its own"
    );
    d.stop();
    assert_no_leaks(&d.dir, std::slice::from_ref(&id));
    assert!(
        ours.iter().all(|p| !p.exists()),
        "a stopped daemon leaves no cgroup: {ours:?}"
    );
    d.spawn();
    let list = d.json(&["ls"]);
    assert_eq!(list[0]["status"], "lost");
    // rm of a lost sandbox removes its files.
    let upper = std::path::PathBuf::from(d.json(&["info", &id])["upper"].as_str().unwrap());
    assert!(upper.exists());
    d.ok(&["rm", &id]);
    eventually("rm deletes the writable layer", || !upper.exists());
    assert_eq!(d.json(&["ls"]).as_array().unwrap().len(), 0);
    d.stop_and_check(&[id]);
}

#[test]
fn sandbox_whose_init_is_killed_is_reported_exited() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let pid = d.json(&["info", &id])["init_pid"].as_i64().unwrap() as i32;
    // SAFETY: killing the sandbox init from the host, as an operator might.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.json(&["info", &id])["status"] != "exited" {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = d.cli(&["exec", &id, "--", "true"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("exited"));
    assert!(cgroup_dirs_of(&id).is_empty());
    d.ok(&["rm", &id]);
    d.stop_and_check(&[id]);
}

#[test]
fn cgroup_v2_driver_freezes_and_kills() {
    // This machine's v2 hierarchy has no controllers: limits are refused clearly, freeze/kill still work.
    let d = TestDaemon::start_with(&[("DELTABOX_CGROUP", "v2")]);
    let out = d.cli(&["create"]);
    assert_eq!(out.status.code(), Some(1));
    let has_v2_memory = std::fs::read_to_string("/sys/fs/cgroup/unified/cgroup.controllers")
        .is_ok_and(|c| c.contains("memory"));
    if !has_v2_memory {
        assert!(String::from_utf8_lossy(&out.stderr).contains("no 'memory' controller"));
    }
    let id = d.create(&["--memory", "max", "--pids", "0"]);
    let s = d.ok(&["session", "start", &id, "bash"]).trim().to_string();
    d.ok(&["session", "run", &id, &s, "sleep 1000 &"]);
    d.ok(&["pause", &id]);
    assert!(d.json(&["info", &id])["status"] == "paused");
    d.ok(&["resume", &id]);
    assert_eq!(d.ok(&["exec", &id, "--", "echo", "ok"]), "ok\n");
    d.ok(&["rm", &id]);
    d.stop_and_check(&[id]);
}

#[test]
fn cli_starts_the_daemon_on_first_use() {
    let d = TestDaemon::start();
    let dir = d.dir.join("auto");
    let sock = dir.join("auto.sock");
    let out = std::process::Command::new(BIN)
        .env("DELTABOX_SOCKET", &sock)
        .env("DELTABOX_STATE_DIR", &dir)
        .env("DELTABOX_STORE_SIZE", "2G")
        .args(["create"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let pid: i32 = host_processes_with(&format!("{} daemon", sock.display()))
        .first()
        .copied()
        .or_else(|| {
            host_processes_with(&dir.display().to_string())
                .into_iter()
                .find(|p| {
                    std::fs::read(format!("/proc/{p}/cmdline"))
                        .map(|c| String::from_utf8_lossy(&c).contains("daemon"))
                        .unwrap_or(false)
                })
        })
        .expect("auto-started daemon");
    // SAFETY: stopping the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_no_leaks(&dir, &[id]);
    drop(d);
}

fn http_status(port: u16, auth: Option<&str>) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let auth = auth
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET /v1/health HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp.lines().next().unwrap_or_default().to_string()
}

#[test]
fn tcp_listener_requires_the_token() {
    let port = 20_000 + (std::process::id() % 30_000) as u16;
    let listen = format!("127.0.0.1:{port}");
    let d = TestDaemon::start_full(&[], &["--listen", &listen, "--token-file", "{dir}/token"]);
    let token = std::fs::read_to_string(d.dir.join("token")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(d.dir.join("token"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert!(http_status(port, None).contains("401"));
    assert!(http_status(port, Some("wrong-token-wrong-token")).contains("401"));
    assert!(http_status(port, Some(token.trim())).contains("200"));
    // The unix socket is root-only and needs no token.
    assert_eq!(
        std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777,
        0o600
    );
    d.ok(&["ls"]);
    d.stop_and_check(&[]);
}
