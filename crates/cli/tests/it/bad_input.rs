//! Bad input gets a clear one-line error, a non-zero exit status, and changes nothing.

use crate::common::*;

fn err_line(out: &std::process::Output) -> String {
    let e = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        e.trim_end().lines().count(),
        1,
        "one-line reason expected: {e:?}"
    );
    e
}

#[test]
fn unknown_ids_are_clear_errors() {
    let d = TestDaemon::start();
    for args in [
        vec!["exec", "nosuchsandbox", "--", "true"],
        vec!["rm", "nosuchsandbox"],
        vec!["session", "start", "nosuchsandbox", "bash"],
        vec!["info", "nosuchsandbox"],
        vec!["pause", "../../etc"],
    ] {
        let out = d.cli(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(err_line(&out).contains("no sandbox"), "{args:?}");
    }
    let id = d.create(&[]);
    let out = d.cli(&["session", "run", &id, "s-000000000000", "true"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(err_line(&out).contains("no session"));
    let out = d.cli(&["--json", "exec", "nosuch", "--", "true"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("no sandbox"));
    d.stop_and_check(&[id]);
}

#[test]
fn bad_commands_and_limits_are_refused() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let out = d.cli(&["exec", &id, "--", ""]);
    assert!(err_line(&out).contains("argv"));
    let out = d.cli(&["exec", &id, "--", "no-such-program-xyz"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(err_line(&out).contains("cannot run no-such-program-xyz: No such file"));
    let out = d.cli(&["exec", "-w", "/does/not/exist", &id, "--", "true"]);
    assert!(err_line(&out).contains("cannot change directory"));
    for bad in [
        vec!["--memory", "lots"],
        vec!["--memory", "1k"],
        vec!["--pids", "1"],
        vec!["--pids", "9223372036854775808"],
        vec!["--memory", "9999999P"],
        vec!["--cpus=-2"],
        vec!["--network", "bridge"],
    ] {
        let mut a = vec!["create"];
        a.extend(bad.iter().copied());
        let out = d.cli(&a);
        assert_eq!(out.status.code(), Some(1), "{bad:?}");
        err_line(&out);
    }
    // None of that created anything.
    assert_eq!(d.json(&["ls"]).as_array().unwrap().len(), 1);
    // The sandbox still works.
    assert_eq!(d.ok(&["exec", &id, "--", "echo", "fine"]), "fine\n");
    d.stop_and_check(&[id]);
}

#[test]
fn bad_images_are_refused_and_leave_nothing() {
    let d = TestDaemon::start();
    let out = d.cli(&["create", "--image", "/nonexistent/image.tar"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(err_line(&out).contains("image"));
    let junk = d.dir.join("junk.tar");
    std::fs::write(&junk, b"definitely not a tar archive at all").unwrap();
    let out = d.cli(&["create", "--image", junk.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(err_line(&out).contains("corrupt image"));
    assert_eq!(d.json(&["ls"]).as_array().unwrap().len(), 0);
    assert_eq!(
        std::fs::read_dir(d.dir.join("store/layers"))
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );
    d.stop_and_check(&[]);
}
