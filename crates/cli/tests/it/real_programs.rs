//! Real programs agents use, inside a default sandbox: git, python with a venv and pip, shell pipelines.

use crate::common::*;

#[test]
fn git_pip_and_shell_work_inside() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let s = d.ok(&["session", "start", &id, "bash"]).trim().to_string();
    let run = |cmd: &str| {
        let r = d.json(&["session", "run", "--timeout", "180", &id, &s, cmd]);
        assert_eq!(r["exit_code"], 0, "{cmd}: {r}");
        r["stdout"].as_str().unwrap().to_string()
    };
    // git: a repository with two commits and a branch.
    run("mkdir -p /work/repo && cd /work/repo && git init -q -b main . && git config user.email a@b.invalid && git config user.name agent");
    run("echo one > f && git add f && git commit -qm first && git checkout -qb feature && echo two >> f && git commit -qam second");
    assert_eq!(run("git log --format=%s | tr '\\n' ' '"), "second first ");
    assert_eq!(
        run("git diff main --stat | tail -n 1 | tr -s ' '"),
        " 1 file changed, 1 insertion(+)\n"
    );
    // python: a venv, and pip installing a local project (no network needed, none available).
    run("cd /work && mkdir -p pkg/hello && printf 'def hi():\\n    return 42\\n' > pkg/hello/__init__.py");
    run("cd /work && printf '[build-system]\\nrequires=[\"setuptools\"]\\nbuild-backend=\"setuptools.build_meta\"\\n[project]\\nname=\"hello\"\\nversion=\"0.1\"\\n' > pkg/pyproject.toml");
    run("cd /work && python3 -m venv --system-site-packages venv && venv/bin/pip install -q --no-index --no-build-isolation ./pkg");
    assert_eq!(
        run("/work/venv/bin/python -c 'import hello; print(hello.hi())'"),
        "42\n"
    );
    // pip reaching for the network fails cleanly (no network inside).
    let r = d.json(&["session", "run", "--timeout", "120", &id, &s, "/work/venv/bin/pip install --retries 0 --timeout 3 -q requests-not-a-real-pkg 2>&1 | tail -n 1"]);
    assert!(
        r["stdout"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("no matching distribution")
            || r["stdout"].as_str().unwrap().contains("rror"),
        "{r}"
    );
    // Pipelines, archives, job control-free background work.
    assert_eq!(run("seq 1 100000 | sort -rn | head -n 1"), "100000\n");
    run("cd /work && tar czf repo.tgz repo && mkdir x && tar xzf repo.tgz -C x && cmp repo/f x/repo/f");
    run("(sleep 0.2; echo done > /tmp/bg) & wait; cat /tmp/bg");
    d.stop_and_check(&[id]);
}

#[test]
fn exec_passes_stdin_env_cwd_and_exact_bytes() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let mut child = std::process::Command::new(BIN)
        .env("DELTABOX_SOCKET", &d.socket)
        .env("DELTABOX_NO_AUTOSTART", "1")
        .args([
            "exec",
            "-i",
            "-e",
            "FOO=bar baz",
            "-w",
            "/tmp",
            &id,
            "--",
            "sh",
            "-c",
            "echo \"$FOO|$(pwd)|$(cat | wc -c)\"",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&vec![b'x'; 200_000])
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "bar baz|/tmp|200000\n"
    );
    // Binary output passes through the CLI byte for byte.
    let out = d.cli(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "printf '\\000\\377\\376abc\\n'; head -c 300000 /dev/zero | tr '\\0' '\\377'",
    ]);
    assert!(out.status.success());
    assert_eq!(&out.stdout[..7], b"\x00\xff\xfeabc\n");
    assert_eq!(out.stdout.len(), 7 + 300_000);
    assert!(out.stdout[7..].iter().all(|&b| b == 0xff));
    d.stop_and_check(&[id]);
}

#[test]
fn pip_and_git_across_checkpoints() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let s = d.ok(&["session", "start", &id, "bash"]).trim().to_string();
    let run = |s: &str, cmd: &str| {
        let r = d.json(&["session", "run", "--timeout", "180", &id, s, cmd]);
        assert_eq!(r["exit_code"], 0, "{cmd}: {r}");
        r["stdout"].as_str().unwrap().to_string()
    };
    run(&s, "mkdir -p /work/repo /work/pkg/hello && cd /work/repo && git init -q -b main . && git config user.email a@b.invalid && git config user.name agent && echo one > f && git add f && git commit -qm first");
    run(&s, "cd /work && printf 'def hi():\\n    return 42\\n' > pkg/hello/__init__.py && printf '[build-system]\\nrequires=[\"setuptools\"]\\nbuild-backend=\"setuptools.build_meta\"\\n[project]\\nname=\"hello\"\\nversion=\"0.1\"\\n' > pkg/pyproject.toml && python3 -m venv --system-site-packages venv");
    let clean = d.ok(&["checkpoint", &id]).trim().to_string();
    // The shell works on across the checkpoint, in its directory.
    run(&s, "cd /work/repo && echo two >> f && git commit -qam second && /work/venv/bin/pip install -q --no-index --no-build-isolation /work/pkg");
    assert_eq!(run(&s, "/work/venv/bin/python -c 'import hello; print(hello.hi())'; git log --format=%s | tr '\\n' ' '"), "42\nsecond first ");
    let installed = d.ok(&["checkpoint", &id]).trim().to_string();
    d.ok(&["rollback", &id, &clean]);
    let s = d.ok(&["session", "start", &id, "bash"]).trim().to_string();
    let r = d.json(&[
        "session",
        "run",
        &id,
        &s,
        "/work/venv/bin/python -c 'import hello'",
    ]);
    assert_ne!(r["exit_code"], 0, "the package is gone after rollback");
    assert_eq!(run(&s, "cd /work/repo && git log --format=%s && git fsck --full 2>&1 && git status --porcelain && cat f"), "first\none\n");
    d.ok(&["rollback", &id, &installed]);
    let s = d.ok(&["session", "start", &id, "bash"]).trim().to_string();
    assert_eq!(run(&s, "/work/venv/bin/python -c 'import hello; print(hello.hi())'; cd /work/repo && git fsck --full 2>&1 && git log --format=%s | tr '\\n' ' '"), "42\nsecond first ");
    d.stop_and_check(&[id]);
}
