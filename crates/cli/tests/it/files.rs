//! The file API: files as the sandbox's processes see them, written, read, listed and removed over HTTP;
//! paths and links never reach the host; bad input is a clear 4xx that changes nothing.

use crate::common::*;

fn q(path: &str) -> String {
    path.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'/' | b'-' | b'_' | b'.' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn files_written_through_the_api_are_the_sandboxs_and_roll_back_with_it() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let base = format!("/v1/sandboxes/{id}/files");
    // Written with parents made, seen by the sandbox's processes.
    let (st, info) = d.http_json(
        "PUT",
        &format!("{base}?path=/app/pkg/mod.py&mode=0600"),
        b"x = 1\n",
    );
    assert_eq!(st, 200, "{info}");
    assert_eq!(info["type"], "file");
    assert_eq!(info["size"], 6);
    assert_eq!(info["mode"], 0o600);
    assert_eq!(
        d.sh(&id, "cat /app/pkg/mod.py; stat -c %a /app/pkg/mod.py")
            .1,
        "x = 1\n600\n"
    );
    // And what they write is read back, bytes exactly (not UTF-8).
    d.sh(
        &id,
        "printf '\\000\\377abc' > /app/bin.dat; ln -s pkg/mod.py /app/link; mkdir /app/empty",
    );
    let (st, b) = d.http("GET", &format!("{base}?path=/app/bin.dat"), b"");
    assert_eq!((st, b), (200, b"\0\xffabc".to_vec()));
    let (st, b) = d.http("GET", &format!("{base}?path=/app/link"), b"");
    assert_eq!((st, b), (200, b"x = 1\n".to_vec()));
    let (st, list) = d.http_json("GET", &format!("{base}/list?path=/app"), b"");
    assert_eq!(st, 200, "{list}");
    let names: Vec<(String, String)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().into(),
                e["type"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            ("bin.dat", "file"),
            ("empty", "dir"),
            ("link", "symlink"),
            ("pkg", "dir")
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
    );
    let (_, link) = d.http_json("GET", &format!("{base}/stat?path=/app/link"), b"");
    assert_eq!(link["target"], "pkg/mod.py");
    assert_eq!(link["path"], "/app/link");
    let (st, dir) = d.http_json("POST", &format!("{base}/mkdir?path=/srv/a/b"), b"");
    assert_eq!((st, dir["type"].as_str()), (200, Some("dir")));
    assert_eq!(d.sh(&id, "test -d /srv/a/b && echo yes").1, "yes\n");
    // A checkpoint holds what the API wrote; removal (recursive, a link not followed) rolls back with it.
    let c = d.ok(&["checkpoint", &id]);
    assert_eq!(
        d.http("DELETE", &format!("{base}?path=/app/link"), b"").0,
        204
    );
    assert_eq!(
        d.sh(&id, "cat /app/pkg/mod.py").1,
        "x = 1\n",
        "the link's target stays"
    );
    assert_eq!(d.http("DELETE", &format!("{base}?path=/app"), b"").0, 204);
    assert!(d.sh(&id, "ls /app 2>&1; true").1.contains("No such file"));
    d.ok(&["rollback", &id, c.trim()]);
    let (st, b) = d.http("GET", &format!("{base}?path=/app/link"), b"");
    assert_eq!((st, b), (200, b"x = 1\n".to_vec()));
    d.stop_and_check(&[id]);
}

#[test]
fn paths_and_links_never_reach_the_host_and_bad_input_is_a_clear_4xx() {
    let d = TestDaemon::start();
    let id = d.create(&[]);
    let base = format!("/v1/sandboxes/{id}/files");
    let secret = d.dir.join("host-secret");
    std::fs::write(&secret, "host only").unwrap();
    // Links made inside point "out": they resolve in the sandbox's root, never on the host.
    d.sh(
        &id,
        &format!(
            "mkdir -p /w && ln -s {s} /w/abs && ln -s ../../../../../../..{s} /w/rel && ln -s /proc/1/root/etc/hostname /w/magic",
            s = secret.display()
        ),
    );
    for p in ["/w/abs", "/w/rel"] {
        let (st, v) = d.http_json("GET", &format!("{base}?path={}", q(p)), b"");
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (404, Some("file_not_found")),
            "{p}: {v}"
        );
    }
    // Writing through one creates the file inside the sandbox (where its directory now exists), not on the host.
    d.sh(
        &id,
        &format!("mkdir -p {}", secret.parent().unwrap().display()),
    );
    let (st, v) = d.http_json("PUT", &format!("{base}?path=/w/abs"), b"mine");
    assert_eq!(st, 200, "{v}");
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "host only");
    let (st, b) = d.http("GET", &format!("{base}?path=/w/rel"), b"");
    assert_eq!((st, b), (200, b"mine".to_vec()));
    let (st, v) = d.http_json("GET", &format!("{base}?path=/w/magic"), b"");
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (400, Some("invalid_path")),
        "{v}"
    );
    // Paths that climb out by themselves, relative paths, a missing path: refused before anything is opened.
    for (p, code, put_too) in [
        ("/../etc/passwd", "invalid_path", true),
        ("/a/../../etc/passwd", "invalid_path", true),
        ("etc/passwd", "invalid_path", true),
        ("/nope/nothing", "file_not_found", false),
        ("/", "is_a_directory", true),
    ] {
        let (st, v) = d.http_json("GET", &format!("{base}?path={}", q(p)), b"");
        assert_eq!(v["error"]["code"].as_str(), Some(code), "{p}: {st} {v}");
        assert!((400..500).contains(&st), "{p}: {st}");
        if put_too {
            let (st, v) = d.http_json("PUT", &format!("{base}?path={}", q(p)), b"x");
            assert!((400..500).contains(&st), "PUT {p}: {st} {v}");
        }
    }
    assert!(d.sh(&id, "head -1 /etc/passwd").1.starts_with("root:"));
    for (method, url) in [
        ("GET", base.clone()),
        ("GET", format!("{base}?path=/etc/hostname&bogus=1")),
        ("PUT", format!("{base}?path=/x&mode=999")),
        ("DELETE", format!("{base}?path=/")),
        ("GET", format!("{base}/list?path=/etc/hostname")),
        (
            "GET",
            "/v1/sandboxes/nosuch/files?path=/etc/hostname".to_string(),
        ),
    ] {
        let (st, v) = d.http_json(method, &url, b"");
        assert!((400..500).contains(&st), "{method} {url}: {st} {v}");
        assert!(v["error"]["code"].is_string(), "{method} {url}: {v}");
    }
    // Kernel filesystems act in the opener's context (the daemon's: the host's hostname, host root's writes):
    // refused. So are devices and FIFOs (a FIFO must not hang the call).
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let adj = d.sh(&id, "cat /proc/1/oom_score_adj").1;
    d.sh(&id, "mkfifo /w/fifo; ln -s /proc/1/oom_score_adj /w/adj");
    for (method, p) in [
        ("GET", "/proc/sys/kernel/hostname"),
        ("GET", "/proc/1/environ"),
        ("PUT", "/proc/1/oom_score_adj"),
        ("PUT", "/w/adj"),
        ("PUT", "/proc/newfile"),
        ("DELETE", "/proc/1"),
        ("GET", "/dev/null"),
        ("PUT", "/dev/null"),
        ("GET", "/w/fifo"),
        ("PUT", "/w/fifo"),
    ] {
        let (st, v) = d.http_json(method, &format!("{base}?path={p}"), b"-1000");
        assert_eq!(
            (st, v["error"]["code"].as_str()),
            (400, Some("invalid_path")),
            "{method} {p}: {v}"
        );
        assert!(
            !v.to_string().contains(host_name.trim()) || host_name.trim().len() < 3,
            "{v}"
        );
    }
    assert_eq!(
        d.sh(&id, "cat /proc/1/oom_score_adj").1,
        adj,
        "nothing was written"
    );
    // An upload over the limit: 413, nothing written.
    let big = vec![b'a'; (256 << 20) + 1];
    let (st, v) = d.http_json("PUT", &format!("{base}?path=/big"), &big);
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (413, Some("too_large")),
        "{v}"
    );
    assert!(d.sh(&id, "ls /big 2>&1; true").1.contains("No such file"));
    // The sandbox is unaffected.
    assert_eq!(d.sh(&id, "echo ok").1, "ok\n");
    d.stop_and_check(&[id]);
}
