//! Base images other than the host: OCI archives and layouts (whiteouts honoured), and plain directories.

use std::process::Command;

use crate::common::*;

fn make_image(d: &TestDaemon) -> (std::path::PathBuf, std::path::PathBuf) {
    let archive = d.dir.join("tiny.tar");
    let rootdir = d.dir.join("rootdir");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/make_oci.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(&archive)
        .arg(&rootdir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (archive, rootdir)
}

#[test]
fn oci_archive_image_with_whiteouts() {
    let d = TestDaemon::start();
    let (archive, _) = make_image(&d);
    let id = d.create(&["--image", archive.to_str().unwrap()]);
    let (code, out, err) = d.sh(
        &id,
        "echo $GREETING; pwd; cat /etc/os-release; ls /opt; ls /etc",
    );
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "hello", "image Env applies");
    assert_eq!(lines[1], "/opt", "image WorkingDir applies");
    assert_eq!(lines[2], "ID=tiny");
    assert_eq!(lines[3], "new", "opaque directory hid opt/old");
    assert!(!out.contains("gone"), "whiteout removed etc/gone: {out}");
    assert!(out.contains("hostname"), "the sandbox's own /etc/hostname");
    // Unpacked once per digest: a second sandbox reuses the base layer.
    let id2 = d.create(&["--image", archive.to_str().unwrap()]);
    let unpacked = std::fs::read_dir(d.dir.join("store/images/oci"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("oci-")
        })
        .count();
    assert_eq!(unpacked, 1);
    let info = d.json(&["info", &id2]);
    assert!(info["image_digest"]
        .as_str()
        .unwrap()
        .starts_with("sha256:"));
    // Writes in one sandbox do not show in the other or in the base layer.
    d.sh(&id, "echo mine > /etc/os-release");
    let (_, other, _) = d.sh(&id2, "cat /etc/os-release");
    assert_eq!(other, "ID=tiny\n");
    // A truncated copy of the same archive is refused.
    let data = std::fs::read(&archive).unwrap();
    let cut = d.dir.join("cut.tar");
    std::fs::write(&cut, &data[..data.len() * 2 / 3]).unwrap();
    let out = d.cli(&["create", "--image", cut.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    d.stop_and_check(&[id, id2]);
}

#[test]
fn directory_image() {
    let d = TestDaemon::start();
    let (_, rootdir) = make_image(&d);
    let before = std::fs::read_dir(&rootdir).unwrap().count();
    let id = d.create(&["--image", rootdir.to_str().unwrap()]);
    let (code, out, err) = d.sh(&id, "cat /etc/os-release; ls /opt; echo x > /opt/added");
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("ID=tiny\n"));
    assert!(out.contains("old"));
    assert!(
        !rootdir.join("opt/added").exists(),
        "the image directory stays read-only"
    );
    assert_eq!(std::fs::read_dir(&rootdir).unwrap().count(), before);
    d.stop_and_check(&[id]);
}
