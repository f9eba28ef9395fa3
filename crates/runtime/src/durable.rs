//! Durable checkpoints: a checkpoint's templates written to disk as process images (`deltabox_cr::image`), and
//! rebuilt from them when the templates are gone (evicted, killed from inside, lost with the daemon).
//!
//! Layout of one checkpoint's images: `<dir>/p<pid>/` per process (its `meta.json` and `pages.bin`), and
//! `<dir>/checkpoint.json` ([`ImagesMeta`]). Everything is written under `<dir>.partial` and renamed into place
//! once synced: a directory with that name is complete, anything else is an interrupted write.
//!
//! A rebuilt template lives in a *blank* process: a copy of the sandbox's init made by an injected `fork` (so it
//! has exactly the sandbox's namespaces, cgroup, credentials, seccomp filter and limits, and never runs as init),
//! whose address space and state are then replaced by the image's. Descriptors an image cannot carry (pipes,
//! sockets) become `/dev/null`, as in a fork's branch; a session interpreter's pipes are replaced by new ones that
//! the daemon adopts.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use deltabox_cr::image::{FdImage, ImageDir};
use deltabox_cr::Template;
use deltabox_sys::inject::{find_syscall_insn, ForkSpec, Tracee};
use deltabox_sys::procfs;
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::keeper::{session_fds, Captured};

/// Name of the file that completes a checkpoint's images.
pub const IMAGES_META: &str = "checkpoint.json";

/// What a checkpoint's images hold besides the processes themselves.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ImagesMeta {
    /// One per process, in capture order.
    pub processes: Vec<ImagedProcess>,
    /// The sessions there were (session id, sandbox pid, kind), as the daemon knew them.
    pub sessions: Vec<(String, i32, crate::SessionKind)>,
    /// Bytes of memory content in the images.
    pub bytes: u64,
    /// Of those, bytes shared with the base checkpoint's images (equal pages, reflinked): the images took
    /// `bytes - shared` of new space.
    #[serde(default)]
    pub shared: u64,
    /// The checkpoint whose images these were deduplicated against.
    #[serde(default)]
    pub base: Option<String>,
    /// Of the shared bytes, those known unchanged since the base from the page tables (the same physical pages
    /// in both checkpoints' templates): neither read nor compared.
    #[serde(default)]
    pub unchanged: u64,
}

/// One imaged process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImagedProcess {
    /// Its pid in the sandbox.
    pub ns_pid: i32,
    /// It was stopped by a signal at the checkpoint.
    pub stopped: bool,
    /// Descriptors its copies re-create (see `fd_fixup`).
    pub fixups: Vec<crate::fd_fixup::Fixup>,
}

impl ImagesMeta {
    /// Reads the metadata of the complete images in `dir`.
    pub fn read(dir: &Path) -> Result<ImagesMeta, String> {
        let text = std::fs::read(dir.join(IMAGES_META))
            .map_err(|e| format!("{}: no complete images ({e})", dir.display()))?;
        serde_json::from_slice(&text)
            .map_err(|e| format!("{}: corrupt image metadata: {e}", dir.display()))
    }
}

/// Whether `dir` holds a checkpoint's complete images.
pub fn complete(dir: &Path) -> bool {
    dir.join(IMAGES_META).is_file()
}

/// A checkpoint's images, described by the keeper (a few injected calls per template), to be written off it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Described {
    /// What goes into `checkpoint.json`.
    pub meta: ImagesMeta,
    /// One per process, in `meta.processes` order.
    pub images: Vec<deltabox_cr::image::ProcessImage>,
    /// The checkpoint `unchanged` is relative to.
    #[serde(default)]
    pub unchanged_base: Option<String>,
    /// Per process (in order; empty when unknown): address ranges whose pages are the very pages of the same
    /// process's template in `unchanged_base` (see [`deltabox_cr::image::same_frames`]).
    #[serde(default)]
    pub unchanged: Vec<Vec<(u64, u64)>>,
}

/// Describes the images of a checkpoint's templates; returns with them each template's memory
/// ([`deltabox_cr::image::open_mem`]), in the same order, for [`store`].
///
/// With the templates of checkpoint `base` (`(id, templates)`), each process's memory unchanged since then is
/// found from the page tables, so that the writer neither reads nor compares it.
pub(crate) fn describe(
    captured: &mut [Captured],
    sessions: Vec<(String, i32, crate::SessionKind)>,
    mut base: Option<(&str, &mut [Captured])>,
) -> Result<(Described, Vec<OwnedFd>), String> {
    let mut d = Described {
        meta: ImagesMeta {
            sessions,
            ..Default::default()
        },
        images: Vec::new(),
        unchanged_base: base.as_ref().map(|(id, _)| id.to_string()),
        unchanged: Vec::new(),
    };
    let mut mems = Vec::new();
    for c in captured.iter_mut() {
        let ns_pid = c.template.identity().ns_pid;
        let (img, mem) = c
            .template
            .describe_image()
            .map_err(|e| format!("process {ns_pid}: {e}"))?;
        d.meta.bytes += img.page_bytes;
        // Only a live template: a dead one's pid may be another process's by now.
        let theirs = base.as_mut().and_then(|(_, b)| {
            b.iter_mut()
                .filter(|t| t.template.identity().ns_pid == ns_pid)
                .find_map(|t| t.template.is_alive().then_some(t))
        });
        let unchanged = theirs
            .and_then(|t| {
                let runs: Vec<(u64, u64)> = img
                    .vmas
                    .iter()
                    .flat_map(|v| &v.pages)
                    .map(|r| (r.addr, r.pages * deltabox_cr::image::PAGE))
                    .collect();
                deltabox_cr::image::same_frames(
                    c.template.pid().as_raw(),
                    t.template.pid().as_raw(),
                    &runs,
                )
                .ok()
            })
            .unwrap_or_default();
        d.unchanged.push(unchanged);
        d.meta.processes.push(ImagedProcess {
            ns_pid,
            stopped: c.stopped,
            fixups: c.fixups.clone(),
        });
        d.images.push(img);
        mems.push(OwnedFd::from(mem));
    }
    Ok((d, mems))
}

/// Writes described images into `dir`, copying the pages from `mems` (nothing is done if they are already
/// there). All or nothing: an interrupted or failed write leaves no `dir` (only a `.partial` one, removed here on
/// failure and by the daemon at start).
pub fn store(
    dir: &Path,
    d: &Described,
    mems: Vec<OwnedFd>,
    base: Option<(&str, &Path)>,
) -> Result<ImagesMeta, String> {
    // Frame-level knowledge only holds against the checkpoint it was taken against.
    let known = |i: usize| -> &[(u64, u64)] {
        match (base, &d.unchanged_base) {
            (Some((id, _)), Some(u)) if id == u => d.unchanged.get(i).map_or(&[], |v| v.as_slice()),
            _ => &[],
        }
    };
    if complete(dir) {
        return ImagesMeta::read(dir);
    }
    if mems.len() != d.images.len() {
        return Err(format!(
            "{} memory descriptors for {} images",
            mems.len(),
            d.images.len()
        ));
    }
    let partial = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).map_err(|e| format!("create {}: {e}", partial.display()))?;
    let result = (|| {
        let mut meta = d.meta.clone();
        meta.base = base.map(|(id, _)| id.to_string());
        for (i, ((img, p), mem)) in d.images.iter().zip(&d.meta.processes).zip(mems).enumerate() {
            let mem = std::fs::File::from(mem);
            let name = format!("p{}", p.ns_pid);
            let theirs = base.map(|(_, b)| b.join(&name)).filter(|b| b.is_dir());
            let w = ImageDir::store(img, &mem, &partial.join(&name), theirs.as_deref(), known(i))
                .map_err(|e| format!("process {}: {e}", p.ns_pid))?;
            meta.shared += w.shared;
            meta.unchanged += w.known_unchanged;
        }
        let text = serde_json::to_vec(&meta).map_err(|e| e.to_string())?;
        let path = partial.join(IMAGES_META);
        std::fs::write(&path, text)
            .and_then(|()| std::fs::File::open(&path)?.sync_all())
            .map_err(|e| format!("write {}: {e}", path.display()))?;
        deltabox_cr::image::sync_dir(&partial);
        std::fs::rename(&partial, dir).map_err(|e| format!("rename images into place: {e}"))?;
        if let Some(parent) = dir.parent() {
            deltabox_cr::image::sync_dir(parent);
        }
        Ok(meta)
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    result
}

/// A blank process in the sandbox: a copy of its init, forked by injection and held in its first stop.
fn blank(init_pid: i32) -> Result<Tracee, String> {
    let pid = Pid::from_raw(init_pid);
    let insn = find_syscall_insn(pid).map_err(|e| format!("init: {e}"))?;
    let mut init = Tracee::seize(pid, pid, insn, crate::keeper::TIMEOUT)
        .map_err(|e| format!("seize init: {e}"))?;
    // At a pid near the top of the range: the next free one may be a pid the rebuilt template's copies need
    // (in a sandbox restarted after the daemon, it is 2).
    let pid_max: i32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(32768);
    let mut seed = [0u8; 4];
    let _ = getrandom::fill(&mut seed);
    let mut want = pid_max - 1 - (u32::from_ne_bytes(seed) % (pid_max as u32 / 4)) as i32;
    let mut copy = Err(String::new());
    for _ in 0..16 {
        copy = init
            .fork(&ForkSpec {
                flags: 0,
                exit_signal: libc::SIGCHLD as u64,
                set_tid: vec![want],
            })
            .map_err(|e| format!("fork a blank process from init: {e}"));
        match &copy {
            Err(e) if e.contains("File exists") => want -= 1,
            _ => break,
        }
    }
    init.detach().map_err(|e| format!("let init go: {e}"))?;
    copy
}

/// Templates rebuilt from a checkpoint's images, with the daemon's ends of the new session pipes.
pub(crate) struct Rebuilt {
    pub(crate) captured: Vec<Captured>,
    /// Four per session (command, stdout, stderr, status), in `sessions` order.
    pub(crate) pipes: Vec<OwnedFd>,
    /// Session interpreters (sandbox pids) that got new pipes.
    pub(crate) sessions: Vec<i32>,
    /// What could not be carried over.
    pub(crate) notes: Vec<String>,
    /// Memory left for a pager to copy in (lazy fill).
    pub(crate) lazy: Vec<deltabox_cr::restore::LazyMemory>,
}

/// Rebuilds every template of the images in `dir` in the sandbox of `init_pid`, whose root must already be on
/// the checkpoint's files (paths in the images are opened there). Session interpreters (`sessions`) get new pipes.
/// With `lazy`, large heaps are left for a pager (started before anything forks the templates). All or nothing:
/// on failure the templates rebuilt so far are killed.
pub(crate) fn rebuild(
    init_pid: i32,
    dir: &Path,
    sessions: &[(i32, crate::SessionKind)],
    reuse: &[(i32, crate::SessionKind)],
    reuse_fds: Vec<OwnedFd>,
    lazy: bool,
) -> Result<Rebuilt, String> {
    if reuse_fds.len() != reuse.len() * 4 {
        return Err(format!(
            "{} session pipe ends for {} sessions",
            reuse_fds.len(),
            reuse.len()
        ));
    }
    let meta = ImagesMeta::read(dir)?;
    let generation = procfs::mnt_id(Path::new(&format!("/proc/{init_pid}/root")))
        .map_err(|e| format!("sandbox root: {e}"))?;
    let devnull = crate::generation::open_in_root(init_pid, Path::new("/dev/null"), libc::O_RDWR)
        .map_err(|e| format!("/dev/null: {e}"))?;
    let mut out = Rebuilt {
        captured: Vec::new(),
        pipes: Vec::new(),
        sessions: Vec::new(),
        notes: Vec::new(),
        lazy: Vec::new(),
    };
    // The device (not the system call) so that faults the kernel takes for the process wait for the pager too.
    let uffd_dev = if lazy {
        match std::fs::File::options()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")
        {
            Ok(f) => Some(f),
            Err(e) => {
                out.notes.push(format!(
                    "memory filled before the processes ran (/dev/userfaultfd: {e})"
                ));
                None
            }
        }
    } else {
        None
    };
    // The session pipes the daemon still has, by the object each was in the images ("pipe:[ino]"): every
    // process holding one (the interpreter, its background jobs, bash's copy on 255) gets the session's end.
    let images = meta
        .processes
        .iter()
        .map(|p| {
            ImageDir::meta(&dir.join(format!("p{}", p.ns_pid)))
                .map_err(|e| format!("process {} from its image: {e}", p.ns_pid))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let mut objects: std::collections::HashMap<String, usize> = Default::default();
    for (i, (pid, kind)) in reuse.iter().enumerate() {
        let Some(img) = meta
            .processes
            .iter()
            .position(|p| p.ns_pid == *pid)
            .map(|j| &images[j])
        else {
            return Err(format!("process {pid} from its image: no image of it"));
        };
        for (slot, (n, _)) in session_fds(*kind).iter().enumerate() {
            for f in &img.fds {
                if let FdImage::Other { fd, what } = f {
                    if fd == n {
                        objects.insert(what.clone(), i * 4 + slot);
                    }
                }
            }
        }
    }
    for (p, img) in meta.processes.iter().zip(&images) {
        let pdir = dir.join(format!("p{}", p.ns_pid));
        let what = |e: String| format!("process {} from its image: {e}", p.ns_pid);

        // A session interpreter whose session the daemon no longer has gets new pipes (made below).
        let fresh = sessions
            .iter()
            .find(|(pid, _)| *pid == p.ns_pid)
            .map(|(_, k)| *k);
        let fresh_fds: Vec<i32> = fresh
            .map(|k| session_fds(k).iter().map(|(n, _)| *n).collect())
            .unwrap_or_default();
        let what_of = |n: i32| {
            img.fds.iter().find_map(|f| match f {
                FdImage::Other { fd, what } if *fd == n => Some(what.clone()),
                _ => None,
            })
        };
        // Other numbers for one of those pipes (bash keeps its input on 255 too) get the new pipe as well.
        let mut aliases = Vec::new();
        let mut given: Vec<(i32, std::os::fd::BorrowedFd<'_>)> = Vec::new();
        for f in &img.fds {
            let FdImage::Other { fd, what } = f else {
                continue;
            };
            if let Some(s) = fresh_fds
                .iter()
                .find(|s| **s != *fd && what_of(**s).as_deref() == Some(what.as_str()))
            {
                aliases.push((*s, *fd));
            }
            let end = objects.get(what).map(|i| reuse_fds[*i].as_fd());
            let kept = end.is_some()
                || fresh_fds.contains(fd)
                || aliases.iter().any(|(_, to)| to == fd)
                || p.fixups.iter().any(|x| x.fd() == *fd)
                || what.contains("eventpoll");
            if !kept {
                out.notes.push(format!(
                    "process {}: descriptor {fd} ({what}) could not be kept in its image: it reads as /dev/null",
                    p.ns_pid
                ));
            }
            given.push((*fd, end.unwrap_or(devnull.as_fd())));
        }
        let host = blank(init_pid).map_err(what)?;
        let mut open =
            |path: &Path, flags: i32| crate::generation::open_in_root(init_pid, path, flags);
        let fill = match &uffd_dev {
            Some(dev) => deltabox_cr::restore::Fill::Lazy { dev: dev.as_fd() },
            None => deltabox_cr::restore::Fill::Eager,
        };
        let (mut template, lazy) =
            Template::from_image_filled(host, &pdir, &mut open, &given, fill)
                .map_err(|e| what(e.to_string()))?;
        out.lazy.extend(lazy);
        if let Some(kind) = fresh {
            out.pipes.extend(
                template
                    .replace_with_pipes(&session_fds(kind))
                    .map_err(|e| what(format!("session pipes: {e}")))?,
            );
            template
                .dup_fds(&aliases)
                .map_err(|e| what(format!("session pipe duplicates: {e}")))?;
            out.sessions.push(p.ns_pid);
        }
        let tpid = template.pid().as_raw();
        let mut c = Captured {
            template,
            cwd: PathBuf::from(&img.cwd),
            generations: vec![generation],
            reopen: None,
            fixups: p.fixups.clone(),
            source: 0,
            stopped: p.stopped,
            caps: None,
        };
        c.reopen = Some(c.files_to_reopen(tpid).map_err(what)?);
        out.captured.push(c);
    }
    Ok(out)
}
