//! The sandbox's root filesystem, set up by its init inside the new user and mount namespaces.

use std::ffi::CStr;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rustix::mount::{
    mount, mount_bind, mount_change, mount_remount, unmount, MountFlags, MountPropagationFlags,
    UnmountFlags,
};

use crate::protocol::SandboxSpec;

/// Device nodes bound from the host into the sandbox's `/dev` (a user namespace cannot `mknod`).
pub const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// `/proc` files that leak host information or poke the host kernel: covered with `/dev/null`.
const PROC_MASKED_FILES: &[&str] = &[
    "kcore",
    "keys",
    "timer_list",
    "sched_debug",
    "sysrq-trigger",
    "latency_stats",
    "kallsyms",
];
/// `/proc` directories made read-only.
const PROC_READONLY_DIRS: &[&str] = &["sys", "irq", "bus", "fs"];

fn ctx<T>(what: &str, path: &Path, r: rustix::io::Result<T>) -> io::Result<T> {
    r.map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("{what} {}: {e}", path.display()),
        )
    })
}

fn ctx_io<T>(what: &str, path: &Path, r: io::Result<T>) -> io::Result<T> {
    r.map_err(|e| io::Error::new(e.kind(), format!("{what} {}: {e}", path.display())))
}

/// Covers the generation mountpoint with an empty read-only tmpfs: a mountpoint cannot be removed or renamed,
/// and nothing can be written under it.
pub fn mount_generation_guard(root: &Path) -> io::Result<()> {
    let guard = root.join(deltabox_fs::GENERATION_MOUNTPOINT);
    let flags = MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
    ctx(
        "mount",
        &guard,
        mount("tmpfs", &guard, "tmpfs", flags, opts(c"size=4k,mode=000")),
    )
}

fn opts(s: &CStr) -> Option<&CStr> {
    Some(s)
}

/// Mounts the layer stack, `/proc` and `/dev`, then `pivot_root`s into it and drops the old root.
///
/// Runs in the sandbox's init, already in its user and mount namespaces; the overlay itself was created by the
/// zygote (see `LayerStack::fsmount`). `/proc` is mounted before the pivot: the kernel only allows a new procfs while a
/// fully-visible one is still in the namespace.
pub fn setup(spec: &SandboxSpec, root_mnt: std::os::fd::OwnedFd) -> io::Result<()> {
    let root = &spec.rootfs;
    ctx(
        "make private",
        Path::new("/"),
        mount_change(
            "/",
            MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
        ),
    )?;
    // The overlay was created by the zygote (host root); we only attach it.
    let attach = rustix::mount::move_mount(
        std::os::fd::AsFd::as_fd(&root_mnt),
        "",
        rustix::fs::CWD,
        root,
        rustix::mount::MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    );
    ctx("attach root", root, attach)?;
    drop(root_mnt);

    let proc_dir = root.join("proc");
    ctx(
        "mount",
        &proc_dir,
        mount(
            "proc",
            &proc_dir,
            "proc",
            MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            None::<&CStr>,
        ),
    )?;

    let dev = root.join("dev");
    ctx(
        "mount",
        &dev,
        mount(
            "tmpfs",
            &dev,
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NOEXEC,
            opts(c"mode=755,size=1m"),
        ),
    )?;
    for d in DEVICES {
        let target = dev.join(d);
        ctx_io("create", &target, std::fs::File::create(&target))?;
        ctx_io(
            "chmod",
            &target,
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o666)),
        )?;
        ctx(
            "bind",
            &target,
            mount_bind(Path::new("/dev").join(d), &target),
        )?;
    }
    let pts = dev.join("pts");
    ctx_io("create", &pts, std::fs::create_dir(&pts))?;
    ctx(
        "mount",
        &pts,
        mount(
            "devpts",
            &pts,
            "devpts",
            MountFlags::NOSUID | MountFlags::NOEXEC,
            opts(c"newinstance,ptmxmode=0666,mode=0620"),
        ),
    )?;
    let shm = dev.join("shm");
    ctx_io("create", &shm, std::fs::create_dir(&shm))?;
    ctx(
        "mount",
        &shm,
        mount(
            "tmpfs",
            &shm,
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            opts(c"mode=1777"),
        ),
    )?;
    for (link, to) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        ctx_io(
            "symlink",
            &dev.join(link),
            std::os::unix::fs::symlink(to, dev.join(link)),
        )?;
    }
    ctx(
        "remount",
        &dev,
        mount_remount(
            &dev,
            MountFlags::BIND | MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NOEXEC,
            c"",
        ),
    )?;

    mount_generation_guard(root)?;

    for f in PROC_MASKED_FILES {
        let p = proc_dir.join(f);
        if p.exists() {
            ctx("mask", &p, mount_bind("/dev/null", &p))?;
        }
    }
    for d in PROC_READONLY_DIRS {
        let p = proc_dir.join(d);
        if p.is_dir() {
            ctx("bind", &p, mount_bind(&p, &p))?;
            let flags = MountFlags::BIND
                | MountFlags::RDONLY
                | MountFlags::NOSUID
                | MountFlags::NODEV
                | MountFlags::NOEXEC;
            ctx("remount read-only", &p, mount_remount(&p, flags, c""))?;
        }
    }

    ctx_io("chdir", root, std::env::set_current_dir(root))?;
    ctx("pivot_root", root, rustix::process::pivot_root(".", "."))?;
    ctx("detach old root", root, unmount(".", UnmountFlags::DETACH))?;
    ctx_io("chdir", Path::new("/"), std::env::set_current_dir("/"))?;
    Ok(())
}
