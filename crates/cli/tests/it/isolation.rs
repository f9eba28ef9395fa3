//! What a sandbox is: pid 1 inside, its own namespaces, a read-only view of the host, nothing secret, no network.

use crate::common::*;

#[test]
fn pid1_is_init_and_namespaces_are_private() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let (code, out, err) = d.sh(&id, "echo pid=$$; cat /proc/1/comm; hostname; cat /etc/hostname; ls /proc | grep -c '^[0-9]'; id -u; readlink /proc/self/ns/pid");
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_ne!(lines[0], "pid=1");
    assert_eq!(lines[1], "deltabox-init");
    assert!(
        lines[2].starts_with("dbx-") && lines[2] == lines[3],
        "{out}"
    );
    let procs: usize = lines[4].parse().unwrap();
    assert!(
        procs <= 4,
        "the sandbox sees only its own processes, saw {procs}"
    );
    assert_eq!(lines[5], "0");
    let host_ns = std::fs::read_link("/proc/self/ns/pid").unwrap();
    assert_ne!(lines[6], host_ns.to_str().unwrap());
    // Its command line names no host path (init is a fork of the zygote, whose arguments name the state dir).
    let (code, out, _) = d.sh(&id, "tr '\\0' ' ' < /proc/1/cmdline");
    assert_eq!((code, out.trim()), (0, "deltabox-init"));
    // init cannot be inspected or hijacked from inside (non-dumpable).
    let (code, _, _) = d.sh(&id, "cat /proc/1/mem; cat /proc/1/environ");
    assert_ne!(code, 0);
    // Pid 1 survives signals sent from inside.
    let (code, out, _) = d.sh(
        &id,
        "kill -TERM 1; kill -INT 1; kill -KILL 1; sleep 0.2; echo alive",
    );
    assert_eq!((code, out.trim()), (0, "alive"));
    // Zombies are reaped: orphaned children do not accumulate.
    let (code, out, _) = d.sh(&id, "for i in 1 2 3 4 5; do (sleep 0.05 &) ; done; sleep 0.5; grep -l zombie /proc/[0-9]*/status 2>/dev/null | wc -l");
    assert_eq!((code, out.trim()), (0, "0"));
    d.stop_and_check(&[id]);
}

#[test]
fn host_files_unchanged_after_rm_rf_root() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let watch = [
        "/usr/bin/python3",
        "/etc/passwd",
        "/bin/sh",
        "/usr/lib/os-release",
    ];
    let before: Vec<_> = watch
        .iter()
        .map(|p| std::fs::read(std::fs::canonicalize(p).unwrap()).unwrap())
        .collect();
    let etc_before = std::fs::read_dir("/etc").unwrap().count();
    let out = d.cli(&[
        "exec",
        "--timeout",
        "120",
        &id,
        "--",
        "rm",
        "-rf",
        "--no-preserve-root",
        "/",
    ]);
    assert!(out.status.code().is_some());
    // The sandbox really lost its files...
    let out = d.cli(&["exec", &id, "--", "/bin/sh", "-c", "true"]);
    assert!(!out.status.success());
    // ...and the host did not.
    for (p, b) in watch.iter().zip(&before) {
        assert_eq!(
            &std::fs::read(std::fs::canonicalize(p).unwrap()).unwrap(),
            b,
            "{p} changed"
        );
    }
    assert_eq!(std::fs::read_dir("/etc").unwrap().count(), etc_before);
    assert!(d.dir.join("deltabox.db").exists());
    // Writes inside land in the sandbox's own layer only.
    let id2 = d.create(&[]);
    let (code, _, err) = d.sh(
        &id2,
        "echo owned > /usr/bin/dbx-it-probe && cat /usr/bin/dbx-it-probe",
    );
    assert_eq!(code, 0, "{err}");
    assert!(!std::path::Path::new("/usr/bin/dbx-it-probe").exists());
    let upper = std::path::PathBuf::from(d.json(&["info", &id2])["upper"].as_str().unwrap());
    assert!(upper.join("usr/bin/dbx-it-probe").exists());
    d.ok(&["rm", &id, &id2]);
    eventually("rm deletes the writable layer", || !upper.exists());
    assert!(!d.dir.join("store/sandboxes").join(&id2).exists());
    d.stop_and_check(&[id, id2]);
}

#[test]
fn host_secrets_are_unreadable() {
    let d = TestDaemon::start();
    let tag = d.dir.file_name().unwrap().to_string_lossy().into_owned();
    let secret_root = format!("/root/{tag}-secret");
    let secret_tmp = format!("/tmp/{tag}-secret");
    std::fs::write(&secret_root, "TOPSECRET").unwrap();
    std::fs::write(&secret_tmp, "TOPSECRET").unwrap();
    let id = d.create(&[]);
    let state = d.dir.to_string_lossy().into_owned();
    let script = format!(
        "cat {secret_root} {secret_tmp} /etc/shadow /etc/gshadow 2>/dev/null; ls -A /root /home /var/lib 2>/dev/null; \
         ls {state} 2>/dev/null; ls /etc/ssh 2>/dev/null | grep key; grep -r TOPSECRET /root /tmp /home /var 2>/dev/null; true"
    );
    let (code, out, _) = d.sh(&id, &script);
    let _ = std::fs::remove_file(&secret_root);
    let _ = std::fs::remove_file(&secret_tmp);
    assert_eq!(code, 0);
    assert!(!out.contains("TOPSECRET"), "{out}");
    let (code, shadow, _) = d.sh(&id, "cat /etc/shadow");
    assert!(code != 0 && shadow.is_empty(), "shadow readable: {shadow}");
    assert!(!out.contains("deltabox.db"), "daemon state visible: {out}");
    assert!(!out.contains("ssh_host_"), "{out}");
    d.stop_and_check(&[id]);
}

#[test]
fn only_loopback_network() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let py = r#"
import socket
print(sorted(l.split(':')[0].strip() for l in open('/proc/net/dev').readlines()[2:]))
s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()
c = socket.create_connection(s.getsockname(), timeout=2); a, _ = s.accept(); c.sendall(b'ping'); print(a.recv(4).decode())
for addr in [('1.1.1.1', 80), ('10.0.2.2', 80)]:
    try:
        socket.create_connection(addr, timeout=2); print('REACHED', addr)
    except OSError as e:
        print('blocked', e.errno)
"#;
    let out = d.cli(&["exec", &id, "--", "python3", "-c", py]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "['lo']");
    assert_eq!(lines[1], "ping");
    assert!(!text.contains("REACHED"), "{text}");
    d.stop_and_check(&[id]);
}

#[test]
fn hardening_is_in_place() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let (code, out, err) = d.sh(&id, "grep -E '^(NoNewPrivs|Seccomp|CapBnd):' /proc/self/status; mount -t tmpfs x /mnt 2>&1; echo mount=$?; touch /proc/sys/kernel/hostname 2>&1; echo x > /proc/sysrq-trigger; cat /proc/kcore | wc -c");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    assert!(out.contains("Seccomp:\t2"), "{out}");
    let bnd = out
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:\t"))
        .unwrap();
    let bnd = u64::from_str_radix(bnd.trim(), 16).unwrap();
    assert_eq!(bnd & (1 << 16), 0, "CAP_SYS_MODULE dropped");
    assert_ne!(
        bnd & (1 << 21),
        0,
        "CAP_SYS_ADMIN kept (in the sandbox's user namespace)"
    );
    assert!(
        out.contains("mount=32") || out.contains("mount=1"),
        "mount refused: {out}"
    );
    assert!(out.trim_end().ends_with('0'), "/proc/kcore masked: {out}");
    // Root inside is not root outside: the uid map is the sandbox's own user namespace.
    let (_, ns, _) = d.sh(&id, "readlink /proc/self/ns/user");
    assert_ne!(
        ns.trim(),
        std::fs::read_link("/proc/self/ns/user")
            .unwrap()
            .to_str()
            .unwrap()
    );
    d.stop_and_check(&[id]);
}

#[test]
fn pause_and_resume_freeze_every_process() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let s = d.ok(&["session", "start", &id, "bash"]).trim().to_string();
    d.ok(&[
        "session",
        "run",
        &id,
        &s,
        "(while true; do date +%s%N > /tmp/tick; sleep 0.01; done) &",
    ]);
    d.ok(&["pause", &id]);
    let out = d.cli(&["exec", &id, "--", "true"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("paused"));
    d.ok(&["resume", &id]);
    let t1 = d.ok(&["exec", &id, "--", "cat", "/tmp/tick"]);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let t2 = d.ok(&["exec", &id, "--", "cat", "/tmp/tick"]);
    assert_ne!(t1, t2, "the background loop runs again after resume");
    d.stop_and_check(&[id]);
}
