//! Durable images of templates (as root; one process per test with cargo-nextest): a template written to disk,
//! killed, and rebuilt inside a blank process forks copies that carry on exactly like copies of the original.
#![allow(clippy::unwrap_used)]

use std::io::BufRead;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use deltabox_cr::Template;
use deltabox_sys::inject::{find_syscall_insn, Tracee};
use nix::unistd::Pid;

mod common;
use common::*;

/// A blank process to rebuild an image in: a child of ours sleeping in `pause()`, seized.
fn blank() -> Tracee {
    // SAFETY: the child only calls pause(), which is async-signal-safe, until it is rebuilt or killed.
    let pid = match unsafe { libc::fork() } {
        0 => loop {
            // SAFETY: pause(2) has no arguments.
            unsafe { libc::pause() };
        },
        p if p > 0 => Pid::from_raw(p),
        _ => panic!("fork: {}", std::io::Error::last_os_error()),
    };
    wait_state(pid, 'S');
    Tracee::seize(pid, pid, find_syscall_insn(pid).unwrap(), T).unwrap()
}

fn open_on_host(path: &std::path::Path, flags: i32) -> std::io::Result<OwnedFd> {
    use std::os::unix::fs::OpenOptionsExt;
    let acc = flags & libc::O_ACCMODE;
    std::fs::OpenOptions::new()
        .read(acc == libc::O_RDONLY || acc == libc::O_RDWR)
        .write(acc == libc::O_WRONLY || acc == libc::O_RDWR)
        .custom_flags(flags & !libc::O_ACCMODE)
        .open(path)
        .map(OwnedFd::from)
}

/// The descriptors an image cannot reopen by path (the pipes to us), taken from the live process `pid` to hand
/// to its rebuilt copy.
fn pipes_of(img: &deltabox_cr::image::ProcessImage, pid: Pid) -> Vec<(i32, OwnedFd)> {
    img.fds
        .iter()
        .filter(|f| matches!(f, deltabox_cr::image::FdImage::Other { .. }))
        .map(|f| {
            (
                f.fd(),
                deltabox_sys::pidfd::getfd(pid.as_raw(), f.fd()).unwrap(),
            )
        })
        .collect()
}

const REPL: &str = "import sys, hashlib, os\ndata = bytearray(os.urandom(1 << 20)) * 24\nx = 0\nfor line in sys.stdin:\n    exec(line)\n";

#[test]
fn a_template_rebuilt_from_its_image_forks_copies_that_carry_on() {
    let mut p = spawn(REPL);
    assert_eq!(p.say("x += 5; print(x)"), "5");
    let digest = p.say("print(hashlib.sha256(data).hexdigest())");
    let mut tpl = checkpoint(p.pid, false);
    // The live process goes on after the checkpoint and changes everything.
    assert_eq!(
        p.say("x += 100; data[:] = b''; print(x, len(data))"),
        "105 0"
    );

    let dir = tempfile::tempdir().unwrap();
    let img_dir = dir.path().join("img");
    let t0 = Instant::now();
    let img = tpl.write_image(&img_dir).unwrap();
    eprintln!(
        "image of {} MiB written in {:?}",
        img.page_bytes >> 20,
        t0.elapsed()
    );
    assert!(img.page_bytes >= 24 << 20, "the heap is in the image");
    // The pipes to us cannot be reopened by path: take them from the live process to hand to the copy.
    let given = pipes_of(&img, p.pid);
    assert!(given.len() >= 2, "stdin and stdout are pipes");
    // The template and the live process are gone: only the image is left.
    drop(tpl);
    let pid = p.pid;
    kill_and_reap(pid);
    let _ = p.child.try_wait();

    let host = blank();
    let host_pid = host.tgid();
    let borrowed: Vec<_> = given.iter().map(|(n, f)| (*n, f.as_fd())).collect();
    let t0 = Instant::now();
    let mut rebuilt = Template::from_image(host, &img_dir, &mut open_on_host, &borrowed).unwrap();
    eprintln!("template rebuilt in {:?}", t0.elapsed());
    assert_eq!(rebuilt.pid(), host_pid);
    assert_eq!(rebuilt.identity().ns_pid, pid.as_raw());
    for round in 0..3 {
        let copy = rebuilt.spawn(true).unwrap();
        assert_eq!(copy.tgid(), pid, "same pid as the original");
        copy.detach().unwrap();
        assert_eq!(
            p.say("print(x)"),
            "5",
            "round {round}: state at the checkpoint"
        );
        assert_eq!(
            p.say("print(hashlib.sha256(data).hexdigest())"),
            digest,
            "round {round}: memory"
        );
        assert_eq!(
            p.say("x += 1; print(x, len(data))"),
            format!("6 {}", 24 << 20)
        );
        kill_and_reap(pid);
    }
    assert!(rebuilt.is_alive());
}

/// Checkpoints `p`, lets `after` change the live process, writes the template's image, kills template and
/// process, and rebuilds the template from the image in a blank process (its pipes to us handed over).
fn through_image(p: &mut Proc, after: &str) -> Template {
    let mut tpl = checkpoint(p.pid, false);
    if !after.is_empty() {
        p.say(after);
    }
    let dir = tempfile::tempdir().unwrap();
    let img_dir = dir.path().join("img");
    let img = tpl.write_image(&img_dir).unwrap();
    let given = pipes_of(&img, p.pid);
    drop(tpl);
    kill_and_reap(p.pid);
    let _ = p.child.try_wait();
    let borrowed: Vec<_> = given.iter().map(|(n, f)| (*n, f.as_fd())).collect();
    Template::from_image(blank(), &img_dir, &mut open_on_host, &borrowed).unwrap()
}

#[test]
fn bash_comes_back_with_its_variables_functions_traps_and_cwd() {
    let mut p = spawn_cmd("bash", &["--norc", "--noprofile"]);
    assert_eq!(
        p.say("cd /tmp; X=42; f() { echo \"f$1\"; }; trap 'echo usr1' USR1; alias ll='echo aliased'; shopt -s expand_aliases; echo ready"),
        "ready"
    );
    let mut tpl = through_image(&mut p, "cd /; X=0; unset -f f; echo changed");
    let copy = tpl.spawn(true).unwrap();
    assert_eq!(copy.tgid(), p.pid);
    copy.detach().unwrap();
    assert_eq!(p.say("echo $X $(pwd) $(f 7)"), "42 /tmp f7");
    assert_eq!(p.say("ll"), "aliased");
    // The trap's handler is bash's own; the disposition came back with the image.
    assert_eq!(p.say("kill -USR1 $$; echo after"), "usr1");
    kill_and_reap(p.pid);
}

#[test]
fn an_open_file_keeps_its_offset_and_a_sleeping_process_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.txt");
    std::fs::write(&path, "0123456789abcdefghij").unwrap();
    let script = format!(
        "import sys, select, time\nf = open({:?})\nprint(f.read(4))\nn = 0\nwhile True:\n    r, _, _ = select.select([sys.stdin], [], [], 0.05)\n    if r:\n        exec(sys.stdin.readline())\n    time.sleep(0.01)\n",
        path.display().to_string()
    );
    let mut p = spawn(&script);
    let mut first = String::new();
    p.stdout.read_line(&mut first).unwrap();
    assert_eq!(first.trim(), "0123");
    assert_eq!(p.say("n += 1; print(n)"), "1");
    let mut tpl = through_image(&mut p, "print(f.read(6))");
    for _ in 0..3 {
        let copy = tpl.spawn(true).unwrap();
        copy.detach().unwrap();
        assert_eq!(p.say("print(f.tell(), n)"), "4 1");
        assert_eq!(p.say("print(f.read(3))"), "456");
        kill_and_reap(p.pid);
    }
}

#[test]
fn shared_anonymous_memory_is_refused_by_name() {
    let mut p = spawn(
        "import sys, mmap\nm = mmap.mmap(-1, 4096)\nfor line in sys.stdin:\n    exec(line)\n",
    );
    assert_eq!(p.say("print('up')"), "up");
    let mut tpl = checkpoint(p.pid, false);
    let dir = tempfile::tempdir().unwrap();
    let err = tpl
        .write_image(&dir.path().join("img"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("shared anonymous memory"), "{err}");
    assert!(
        !dir.path().join("img").exists(),
        "nothing half-written is left"
    );
    assert!(tpl.is_alive(), "the template is untouched");
    assert_eq!(p.say("print('still')"), "still");
    kill_and_reap(p.pid);
}

#[test]
fn a_truncated_or_corrupt_image_is_refused_and_the_blank_process_killed() {
    let mut p = spawn(REPL);
    assert_eq!(p.say("print(x)"), "0");
    let mut tpl = checkpoint(p.pid, false);
    let dir = tempfile::tempdir().unwrap();
    let img_dir = dir.path().join("img");
    tpl.write_image(&img_dir).unwrap();
    let pages = img_dir.join("pages.bin");
    let len = std::fs::metadata(&pages).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pages)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let host = blank();
    let host_pid = host.tgid();
    let err = Template::from_image(host, &img_dir, &mut open_on_host, &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("truncated"), "{err}");
    // Refused before touching the blank process: it is killed all the same (it was handed over).
    assert!(
        !std::path::Path::new(&format!("/proc/{host_pid}")).exists(),
        "killed and reaped"
    );
    std::fs::write(img_dir.join("meta.json"), b"{\"version\": 1, \"comm\": ").unwrap();
    let err = Template::from_image(blank(), &img_dir, &mut open_on_host, &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("corrupt metadata"), "{err}");
    assert!(tpl.is_alive());
    kill_and_reap(p.pid);
}

/// Lazy restore: the template is rebuilt without its heap, which a pager (a thread here, a process of the
/// keeper's in the daemon) copies in on demand and in the background. Its copies, a fork inside a copy, and a
/// page dropped with `MADV_DONTNEED` before the pager reached it all read exactly what they must.
#[test]
fn a_lazily_rebuilt_template_serves_every_page_right_to_its_copies_and_their_forks() {
    use std::io::{Read, Write};
    let mut p = spawn(REPL);
    assert_eq!(p.say("x += 5; print(x)"), "5");
    let digest = p.say("print(hashlib.sha256(data).hexdigest())");
    let mut tpl = checkpoint(p.pid, false);
    let dir = tempfile::tempdir().unwrap();
    let img_dir = dir.path().join("img");
    let img = tpl.write_image(&img_dir).unwrap();
    let given = pipes_of(&img, p.pid);
    drop(tpl);
    let pid = p.pid;
    kill_and_reap(pid);
    let _ = p.child.try_wait();

    let dev = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
        .unwrap();
    let borrowed: Vec<_> = given.iter().map(|(n, f)| (*n, f.as_fd())).collect();
    let t0 = Instant::now();
    let (mut rebuilt, lazy) = Template::from_image_filled(
        blank(),
        &img_dir,
        &mut open_on_host,
        &borrowed,
        deltabox_cr::restore::Fill::Lazy { dev: dev.as_fd() },
    )
    .unwrap();
    eprintln!("template rebuilt lazily in {:?}", t0.elapsed());
    let lazy = lazy.expect("the 24 MiB heap is left to the pager");
    let left: u64 = lazy.runs.iter().map(|r| r.1).sum();
    assert!(left >= 24 << 20, "{left} bytes left to copy");
    let (mut ctl, pager_end) = std::os::unix::net::UnixStream::pair().unwrap();
    let pager = std::thread::spawn(move || deltabox_cr::pager::serve(vec![lazy], pager_end.into()));
    let mut ready = [0u8; 1];
    ctl.read_exact(&mut ready).unwrap();
    assert_eq!(ready[0], deltabox_cr::pager::READY);

    let copy = rebuilt.spawn(true).unwrap();
    assert_eq!(copy.tgid(), pid);
    copy.detach().unwrap();
    // A page of the heap dropped at once (most likely before the pager copied it) reads zero, not the image.
    let zeroed = p.say(
        "import ctypes; a = ctypes.addressof((ctypes.c_char * len(data)).from_buffer(data)); \
         pg = (a + (20 << 20) + 4095) & ~4095; ctypes.CDLL(None).madvise(ctypes.c_void_p(pg), 4096, 4); \
         print(data[pg - a:pg - a + 4096].count(0))",
    );
    assert_eq!(zeroed, "4096");
    assert_eq!(p.say("print(x)"), "5");
    // A fork inside the copy sees the heap as the copy does (dropped page and all).
    let want_after = p.say("print(hashlib.sha256(data).hexdigest())");
    assert_ne!(want_after, digest);
    assert_eq!(
        p.say(
            "r, w = os.pipe(); c = os.fork(); (os.write(w, hashlib.sha256(data).hexdigest().encode()), \
             os._exit(0)) if c == 0 else None; os.waitpid(c, 0); print(os.read(r, 64).decode())"
        ),
        want_after
    );
    // Once the pager says everything is in, new copies carry the checkpoint's memory.
    ctl.write_all(&[1]).unwrap();
    let mut b = [0u8; 1];
    ctl.set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    ctl.read_exact(&mut b).unwrap();
    kill_and_reap(pid);
    let copy = rebuilt.spawn(true).unwrap();
    copy.detach().unwrap();
    assert_eq!(
        p.say("print(x, hashlib.sha256(data).hexdigest())"),
        format!("5 {digest}")
    );
    pager.join().unwrap().unwrap();
    kill_and_reap(pid);
    assert!(rebuilt.is_alive());
}
