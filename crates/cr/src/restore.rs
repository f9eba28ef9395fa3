//! Rebuilding a process from its [`ProcessImage`] inside a *host* process: any stopped single-threaded process
//! with the right credentials and namespaces (a blank child the sandbox's init forks, or a test's own child).
//! Everything happens by injected system calls, in the host's own context, so the kernel checks them against
//! the sandbox's credentials, seccomp filter and limits — nothing is done with more privilege than the process
//! has.
//!
//! Order matters: descriptors are installed while the host still has its stack (the transfer needs scratch
//! memory); then every mapping but the kernel's special ones is removed, the special ones (`[vdso]`, `[vvar]`)
//! are moved to the image's addresses (its code holds pointers into them), the image's mappings are created and
//! filled by `pread` from the pages file (the kernel copies; nothing passes through us), and from then on the
//! image's own stack serves as scratch space for the remaining calls.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use deltabox_sys::inject::Tracee;

use crate::image::{FdImage, HostKind, ProcessImage, VmaKind, PAGE};
use crate::{Error, Result};

/// Opens a path of the image's filesystem (the restorer resolves it in the process's root) with `open` flags.
pub type Opener<'a> = dyn FnMut(&Path, i32) -> std::io::Result<OwnedFd> + 'a;

/// Highest address of user space on x86-64 (4-level paging).
const USER_TOP: u64 = 0x7fff_ffff_f000;

/// Private writable anonymous mappings with at least this much content are filled lazily (when asked).
const LAZY_MIN: u64 = 1 << 20;

/// Memory of a rebuilt process not copied in yet (lazy restore): its missing pages wait on `uffd` until a
/// pager copies them from `pages`.
#[derive(Debug)]
pub struct LazyMemory {
    pub uffd: deltabox_sys::uffd::Uffd,
    /// The page runs still to copy: (address, bytes, offset in `pages`).
    pub runs: Vec<(u64, u64, u64)>,
    /// The mappings registered with `uffd` (start, length).
    pub registered: Vec<(u64, u64)>,
    pub pages: std::fs::File,
}

/// How to fill the memory of a rebuilt process.
pub enum Fill<'a> {
    /// Everything before the process runs.
    Eager,
    /// Large heaps on demand through a userfaultfd made from `dev` (`/dev/userfaultfd`, opened by us).
    Lazy { dev: BorrowedFd<'a> },
}

/// Rebuilds `img` (memory content in `pages`) in the stopped process `t`. Paths are opened through `open`;
/// descriptors the image lists as [`FdImage::Other`] (pipes, sockets …) must be in `given` by number. On
/// success `t` holds the image's registers: detach it to let it run, or keep it stopped as a template. On
/// failure the process is unusable and should be killed. With [`Fill::Lazy`], the memory left to copy is
/// returned: until a pager has copied all of it, the process waits on each page it touches.
pub fn restore(
    t: &mut Tracee,
    img: &ProcessImage,
    pages: &std::fs::File,
    open: &mut Opener<'_>,
    given: &[(i32, BorrowedFd<'_>)],
    fill: Fill<'_>,
) -> Result<Option<LazyMemory>> {
    let pid = t.tgid().as_raw();
    let fail = |what: String| Error::Image(format!("restore into process {pid}: {what}"));
    let here = HostKind::current();
    if img.host.kernel != here.kernel {
        return Err(fail(format!(
            "the image was taken on kernel {}, this is {}",
            img.host.kernel, here.kernel
        )));
    }
    if img.host.cpu_flags != here.cpu_flags {
        return Err(fail(
            "the image was taken on a CPU with other features".into(),
        ));
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| fail(format!("status: {e}")))?;
    let (uids, gids) = (
        crate::image::ids(&status, "Uid:"),
        crate::image::ids(&status, "Gid:"),
    );
    let same_ids = uids == img.uids && gids == img.gids;
    // Another identity is taken at the end (the restore itself needs root's privileges); only from root.
    if !same_ids && (uids != [0; 3] || gids != [0; 3]) {
        return Err(fail(format!(
            "credentials differ (image uids {:?} gids {:?}) and this process is not root",
            img.uids, img.gids
        )));
    }

    let vdso = crate::image::specials(pid)
        .map_err(|e| fail(format!("maps: {e}")))?
        .into_iter()
        .find(|(n, _, _)| n == "[vdso]");
    if !vdso.is_some_and(|(_, s, e)| (s..e).contains(&t.syscall_insn())) {
        return Err(fail(
            "injected calls must go through the vdso (it is the one mapping kept)".into(),
        ));
    }

    let have = crate::image::cap_sets(&status);
    if img.caps.iter().zip(have).any(|(want, h)| want & !h != 0) {
        return Err(fail(format!(
            "the image holds capabilities this process lacks (image {:x?}, here {have:x?})",
            img.caps
        )));
    }

    // Limits first: the descriptor numbers below must fit.
    for &(res, cur, max) in &img.rlimits {
        let l = libc::rlimit64 {
            rlim_cur: cur,
            rlim_max: max,
        };
        // SAFETY: prlimit64 reads the new limit from `l`.
        if unsafe { libc::prlimit64(pid, res as _, &l, std::ptr::null_mut()) } != 0 {
            return Err(fail(format!(
                "resource limit {res}: {}",
                std::io::Error::last_os_error()
            )));
        }
    }

    // The host's own rseq registration points into memory that is about to go.
    if let Some(r) = t.rseq()? {
        t.checked_syscall(
            "rseq (unregister)",
            libc::SYS_rseq,
            &[r.area, r.size as u64, 1, r.signature as u64],
        )?;
    }

    // Every file the image needs, opened here and installed while the host still has a stack.
    let mut to_install: Vec<OwnedFd> = Vec::new();
    let mut vma_fd: Vec<Option<usize>> = Vec::new();
    let mut opened: std::collections::HashMap<(std::path::PathBuf, bool), usize> =
        Default::default();
    for v in &img.vmas {
        let VmaKind::File {
            path,
            size,
            mtime_ns,
            ..
        } = &v.kind
        else {
            vma_fd.push(None);
            continue;
        };
        let rw = v.shared && v.prot & libc::PROT_WRITE as u32 != 0;
        let key = (path.clone(), rw);
        let idx = match opened.get(&key) {
            Some(i) => *i,
            None => {
                let f = open(path, if rw { libc::O_RDWR } else { libc::O_RDONLY })
                    .map_err(|e| fail(format!("open mapped file {}: {e}", path.display())))?;
                let st = rustix::fs::fstat(&f)
                    .map_err(|e| fail(format!("stat {}: {e}", path.display())))?;
                let m = st.st_mtime as i128 * 1_000_000_000 + st.st_mtime_nsec as i128;
                if st.st_size as u64 != *size || m != *mtime_ns {
                    return Err(fail(format!(
                        "mapped file {} changed since the image was taken",
                        path.display()
                    )));
                }
                to_install.push(f);
                opened.insert(key, to_install.len() - 1);
                to_install.len() - 1
            }
        };
        vma_fd.push(Some(idx));
    }
    let exe_idx = {
        let f = open(&img.exe, libc::O_RDONLY)
            .map_err(|e| fail(format!("open executable {}: {e}", img.exe.display())))?;
        to_install.push(f);
        to_install.len() - 1
    };
    let mut fd_src: Vec<(i32, FdSource)> = Vec::new();
    for f in &img.fds {
        match f {
            FdImage::Path {
                fd,
                path,
                flags,
                pos,
                ..
            } => {
                let clean = *flags as i32
                    & !(libc::O_CREAT | libc::O_TRUNC | libc::O_EXCL | libc::O_CLOEXEC);
                let o = open(path, clean).map_err(|e| {
                    fail(format!("reopen descriptor {fd} ({}): {e}", path.display()))
                })?;
                let seek = rustix::fs::fstat(&o)
                    .map(|st| {
                        rustix::fs::FileType::from_raw_mode(st.st_mode)
                            == rustix::fs::FileType::RegularFile
                    })
                    .unwrap_or(false);
                to_install.push(o);
                fd_src.push((
                    *fd,
                    FdSource {
                        idx: to_install.len() - 1,
                        cloexec: *flags as i32 & libc::O_CLOEXEC != 0,
                        pos: seek.then_some(*pos),
                    },
                ));
            }
            FdImage::Other { fd, what } => {
                let Some((_, g)) = given.iter().find(|(n, _)| n == fd) else {
                    return Err(fail(format!(
                        "descriptor {fd} ({what}) cannot be rebuilt from an image and no replacement was given"
                    )));
                };
                let dup = g
                    .try_clone_to_owned()
                    .map_err(|e| fail(format!("dup descriptor {fd}: {e}")))?;
                to_install.push(dup);
                fd_src.push((
                    *fd,
                    FdSource {
                        idx: to_install.len() - 1,
                        cloexec: false,
                        pos: None,
                    },
                ));
            }
        }
    }
    let pages_idx = {
        let p = pages
            .try_clone()
            .map_err(|e| fail(format!("dup pages file: {e}")))?;
        to_install.push(p.into());
        to_install.len() - 1
    };
    let dev_idx = match &fill {
        Fill::Eager => None,
        Fill::Lazy { dev } => {
            to_install.push(
                dev.try_clone_to_owned()
                    .map_err(|e| fail(format!("dup /dev/userfaultfd: {e}")))?,
            );
            Some(to_install.len() - 1)
        }
    };
    let mut lazy_runs: Vec<(u64, u64, u64)> = Vec::new();
    let mut registered: Vec<(u64, u64)> = Vec::new();

    // The host's descriptors go; ours come in, parked above every number the image uses.
    t.checked_syscall(
        "close_range",
        libc::SYS_close_range,
        &[0, u32::MAX as u64, 0],
    )?;
    let borrowed: Vec<BorrowedFd<'_>> = to_install.iter().map(|f| f.as_fd()).collect();
    let low = t.install_fds(&borrowed)?;
    let park = img.fds.iter().map(|f| f.fd()).max().unwrap_or(2).max(2) as u64 + 1;
    let mut parked = Vec::with_capacity(low.len());
    for &n in &low {
        let p = t.checked_syscall(
            "fcntl(F_DUPFD_CLOEXEC)",
            libc::SYS_fcntl,
            &[n as u64, libc::F_DUPFD_CLOEXEC as u64, park],
        )?;
        parked.push(p as u64);
    }
    for &n in &low {
        t.checked_syscall("close", libc::SYS_close, &[n as u64])?;
    }
    drop(to_install);

    // Address space: all of the host's goes but its special mappings.
    let mine = crate::image::specials(pid).map_err(|e| fail(format!("maps: {e}")))?;
    let mut cursor = 0u64;
    let mut keep: Vec<(u64, u64)> = mine.iter().map(|(_, s, e)| (*s, *e)).collect();
    keep.sort();
    for &(s, e) in &keep {
        if s > cursor {
            t.checked_syscall("munmap", libc::SYS_munmap, &[cursor, s - cursor])?;
        }
        cursor = cursor.max(e);
    }
    if cursor < USER_TOP {
        t.checked_syscall("munmap", libc::SYS_munmap, &[cursor, USER_TOP - cursor])?;
    }
    t.forget_scratch_map();
    move_specials(t, img, &mine)?;

    // The image's mappings, writable while they are filled.
    for (v, fdi) in img.vmas.iter().zip(&vma_fd) {
        if matches!(v.kind, VmaKind::Special(_)) {
            continue;
        }
        let len = v.end - v.start;
        let fill_prot = (libc::PROT_READ | libc::PROT_WRITE) as u64;
        let (flags, fd, off) = match (&v.kind, fdi) {
            (VmaKind::File { offset, .. }, Some(i)) => (
                libc::MAP_FIXED
                    | if v.shared {
                        libc::MAP_SHARED
                    } else {
                        libc::MAP_PRIVATE
                    },
                parked[*i],
                *offset,
            ),
            (VmaKind::Stack, _) => (
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_GROWSDOWN,
                u64::MAX,
                0,
            ),
            _ => (
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                u64::MAX,
                0,
            ),
        };
        let stored: u64 = v.pages.iter().map(|r| r.pages * PAGE).sum();
        let lazy = dev_idx.is_some()
            && matches!(v.kind, VmaKind::Anon)
            && !v.shared
            && v.prot & libc::PROT_WRITE as u32 != 0
            && stored >= LAZY_MIN;
        let prot = if v.shared || lazy {
            v.prot as u64
        } else {
            fill_prot
        };
        let r = t.checked_syscall(
            "mmap",
            libc::SYS_mmap,
            &[v.start, len, prot, flags as u64, fd, off],
        )?;
        if r as u64 != v.start {
            return Err(fail(format!("mapping at {:#x} landed at {r:#x}", v.start)));
        }
        // Filled in small pages: a huge page fault may compact memory first (`defrag=madvise`), measured 6x
        // slower here; templates get collapsed in the background anyway.
        if lazy {
            registered.push((v.start, len));
            lazy_runs.extend(v.pages.iter().map(|r| (r.addr, r.pages * PAGE, r.offset)));
            continue;
        }
        for run in &v.pages {
            let mut done = 0u64;
            let total = run.pages * PAGE;
            while done < total {
                let chunk = (total - done).min(1 << 30);
                let n = t.checked_syscall(
                    "pread64 (memory)",
                    libc::SYS_pread64,
                    &[parked[pages_idx], run.addr + done, chunk, run.offset + done],
                )?;
                if n <= 0 {
                    return Err(fail(format!(
                        "pages file ends early at {:#x}",
                        run.offset + done
                    )));
                }
                done += n as u64;
            }
        }
        if !v.shared && v.prot as u64 != fill_prot {
            t.checked_syscall(
                "mprotect",
                libc::SYS_mprotect,
                &[v.start, len, v.prot as u64],
            )?;
        }
    }

    // The lazy mappings are ours to serve from here on (they are at their final protection: faults are taken
    // and copies made whatever it is).
    let lazy = match dev_idx {
        Some(i) if !registered.is_empty() => {
            let uffd = deltabox_sys::uffd::Uffd::new_in(t, parked[i] as i32)?;
            for &(start, len) in &registered {
                uffd.register(start, len)
                    .map_err(|e| fail(format!("register {start:#x}+{len:#x}: {e}")))?;
            }
            Some(LazyMemory {
                uffd,
                runs: lazy_runs,
                registered,
                pages: pages
                    .try_clone()
                    .map_err(|e| fail(format!("dup pages file: {e}")))?,
            })
        }
        _ => None,
    };

    // From here on, scratch space is below the image's own stack pointer.
    t.set_saved_regs(img.regs.to_raw()?);
    let mm = &img.mm;
    let mut block: Vec<u8> = Vec::new();
    for w in [
        mm.start_code,
        mm.end_code,
        mm.start_data,
        mm.end_data,
        mm.start_brk,
        mm.brk,
        mm.start_stack,
        mm.arg_start,
        mm.arg_end,
        mm.env_start,
        mm.env_end,
        0, // auxv pointer, set below
    ] {
        block.extend_from_slice(&w.to_ne_bytes());
    }
    let auxv_bytes: Vec<u8> = img.auxv.iter().flat_map(|w| w.to_ne_bytes()).collect();
    block.extend_from_slice(&(auxv_bytes.len() as u32).to_ne_bytes());
    block.extend_from_slice(&(parked[exe_idx] as u32).to_ne_bytes());
    let map_len = block.len();
    block.extend_from_slice(&auxv_bytes);
    let addr = t.write_scratch(&block)?;
    let auxv_addr = addr + map_len as u64;
    t.write_scratch_at(addr + 11 * 8, &auxv_addr.to_ne_bytes())?;
    // PR_SET_MM (35), PR_SET_MM_MAP (14).
    t.checked_syscall(
        "prctl(PR_SET_MM_MAP)",
        libc::SYS_prctl,
        &[35, 14, addr, map_len as u64, 0],
    )?;

    // Descriptors into place, then the parked ones go.
    for (fd, src) in &fd_src {
        let flags = if src.cloexec {
            libc::O_CLOEXEC as u64
        } else {
            0
        };
        t.checked_syscall(
            "dup3",
            libc::SYS_dup3,
            &[parked[src.idx], *fd as u64, flags],
        )?;
        if let Some(pos) = src.pos {
            t.checked_syscall(
                "lseek",
                libc::SYS_lseek,
                &[*fd as u64, pos, libc::SEEK_SET as u64],
            )?;
        }
    }
    for p in &parked {
        t.checked_syscall("close", libc::SYS_close, &[*p])?;
    }

    let cwd = t.write_path(&img.cwd)?;
    t.checked_syscall("chdir", libc::SYS_chdir, &[cwd])
        .map_err(|e| fail(format!("working directory {}: {e}", img.cwd.display())))?;
    t.checked_syscall("umask", libc::SYS_umask, &[img.umask as u64])?;
    let mut name = img.comm.as_bytes().to_vec();
    name.truncate(15);
    name.push(0);
    let n = t.write_scratch(&name)?;
    t.checked_syscall(
        "prctl(PR_SET_NAME)",
        libc::SYS_prctl,
        &[libc::PR_SET_NAME as u64, n],
    )?;
    for a in &img.sigactions {
        let mut b = Vec::with_capacity(32);
        for w in [a.handler, a.flags, a.restorer, a.mask] {
            b.extend_from_slice(&w.to_ne_bytes());
        }
        let p = t.write_scratch(&b)?;
        t.checked_syscall(
            "rt_sigaction",
            libc::SYS_rt_sigaction,
            &[a.sig as u64, p, 0, 8],
        )?;
    }
    let p = t.write_scratch(&img.sigmask.to_ne_bytes())?;
    t.checked_syscall(
        "rt_sigprocmask",
        libc::SYS_rt_sigprocmask,
        &[libc::SIG_SETMASK as u64, p, 0, 8],
    )?;
    if let Some((sp, flags, size)) = img.sigaltstack {
        let mut b = Vec::with_capacity(24);
        b.extend_from_slice(&sp.to_ne_bytes());
        b.extend_from_slice(&flags.to_ne_bytes());
        b.extend_from_slice(&0i32.to_ne_bytes());
        b.extend_from_slice(&size.to_ne_bytes());
        let p = t.write_scratch(&b)?;
        t.checked_syscall("sigaltstack", libc::SYS_sigaltstack, &[p, 0])?;
    }
    t.checked_syscall(
        "set_robust_list",
        libc::SYS_set_robust_list,
        &[img.robust_list.0, img.robust_list.1],
    )?;
    t.checked_syscall(
        "set_tid_address",
        libc::SYS_set_tid_address,
        &[img.tid_address],
    )?;
    if let Some((area, size, sig)) = img.rseq {
        t.checked_syscall("rseq", libc::SYS_rseq, &[area, size as u64, 0, sig as u64])?;
    }
    let have = if same_ids {
        have
    } else {
        // The bounding set first (dropping needs CAP_SETPCAP, which root loses below), then groups, gids and
        // uids (which drops root's capabilities as for any process doing it).
        drop_bounding(t, have[3], img.caps[3])?;
        let groups: Vec<u8> = img.groups.iter().flat_map(|g| g.to_ne_bytes()).collect();
        let p = t.write_scratch(&groups)?;
        t.checked_syscall(
            "setgroups",
            libc::SYS_setgroups,
            &[img.groups.len() as u64, p],
        )?;
        let [r, e, s] = img.gids;
        t.checked_syscall(
            "setresgid",
            libc::SYS_setresgid,
            &[r as u64, e as u64, s as u64],
        )?;
        let [r, e, s] = img.uids;
        t.checked_syscall(
            "setresuid",
            libc::SYS_setresuid,
            &[r as u64, e as u64, s as u64],
        )?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_err(|e| fail(format!("status: {e}")))?;
        let now = crate::image::cap_sets(&status);
        if img.caps.iter().zip(now).any(|(want, h)| want & !h != 0) {
            return Err(fail(format!(
                "the image keeps capabilities across its change of identity (image {:x?}, here {now:x?}): not supported",
                img.caps
            )));
        }
        now
    };
    // PR_SET_DUMPABLE (4): as it was (a change of identity above reset it).
    t.checked_syscall(
        "prctl(PR_SET_DUMPABLE)",
        libc::SYS_prctl,
        &[4, img.dumpable.min(1)],
    )?;
    lower_caps(t, &have, &img.caps)?;
    let xstate = hex::decode(&img.xstate).map_err(|e| fail(format!("extended state: {e}")))?;
    t.set_xstate(&xstate)?;
    Ok(lazy)
}

/// Drops from the bounding set every capability in `have` but not in `want` (`PR_CAPBSET_DROP`, which needs
/// `CAP_SETPCAP`).
fn drop_bounding(t: &mut Tracee, have: u64, want: u64) -> Result<()> {
    for cap in 0..64u64 {
        if have & !want & (1 << cap) != 0 {
            t.checked_syscall("prctl(PR_CAPBSET_DROP)", libc::SYS_prctl, &[24, cap])?;
        }
    }
    Ok(())
}

/// Lowers the process's capabilities from `have` to `want` (a subset): bounding set, ambient set, then
/// inheritable, permitted and effective (`capset`), last because the others need `CAP_SETPCAP`.
fn lower_caps(t: &mut Tracee, have: &[u64; 5], want: &[u64; 5]) -> Result<()> {
    if have == want {
        return Ok(());
    }
    drop_bounding(t, have[3], want[3])?;
    if have[4] != want[4] {
        // PR_CAP_AMBIENT (47): CLEAR_ALL (4), then RAISE (2) each.
        t.checked_syscall(
            "prctl(PR_CAP_AMBIENT_CLEAR_ALL)",
            libc::SYS_prctl,
            &[47, 4, 0, 0, 0],
        )?;
        for cap in 0..64u64 {
            if want[4] & (1 << cap) != 0 {
                t.checked_syscall(
                    "prctl(PR_CAP_AMBIENT_RAISE)",
                    libc::SYS_prctl,
                    &[47, 2, cap, 0, 0],
                )?;
            }
        }
    }
    if have[..3] != want[..3] {
        // _LINUX_CAPABILITY_VERSION_3 header, then two {effective, permitted, inheritable} u32 triples.
        let mut b = Vec::with_capacity(32);
        b.extend_from_slice(&0x2008_0522u32.to_ne_bytes());
        b.extend_from_slice(&0i32.to_ne_bytes());
        for half in 0..2 {
            for set in [want[2], want[1], want[0]] {
                b.extend_from_slice(&((set >> (32 * half)) as u32).to_ne_bytes());
            }
        }
        let p = t.write_scratch(&b)?;
        t.checked_syscall("capset", libc::SYS_capset, &[p, p + 8])?;
    }
    Ok(())
}

/// Where one of the image's descriptors comes from.
struct FdSource {
    /// Index among the installed descriptors.
    idx: usize,
    cloexec: bool,
    /// Offset to seek to (regular files).
    pos: Option<u64>,
}

/// Moves the host's special mappings to the image's addresses (through a free spot if the two overlap), and
/// follows the `syscall` instruction injected calls use to its new place in the vdso.
fn move_specials(t: &mut Tracee, img: &ProcessImage, mine: &[(String, u64, u64)]) -> Result<()> {
    let pid = t.tgid().as_raw();
    let theirs: Vec<(&str, u64, u64)> = img
        .vmas
        .iter()
        .filter_map(|v| match &v.kind {
            VmaKind::Special(n) => Some((n.as_str(), v.start, v.end)),
            _ => None,
        })
        .collect();
    let mut names_mine: Vec<(&str, u64)> =
        mine.iter().map(|(n, s, e)| (n.as_str(), e - s)).collect();
    let mut names_theirs: Vec<(&str, u64)> = theirs.iter().map(|(n, s, e)| (*n, e - s)).collect();
    names_mine.sort();
    names_theirs.sort();
    if names_mine != names_theirs {
        return Err(Error::Image(format!(
            "restore into process {pid}: kernel mappings differ ({names_theirs:?} in the image, {names_mine:?} here)"
        )));
    }
    let overlaps = |a: (u64, u64), b: (u64, u64)| a.0 < b.1 && b.0 < a.1;
    let mut cur: Vec<(String, u64, u64)> = mine.to_vec();
    let clash = theirs
        .iter()
        .any(|(_, s, e)| cur.iter().any(|(_, cs, ce)| overlaps((*s, *e), (*cs, *ce))));
    if clash {
        // A spot clear of both layouts (the image's mappings do not exist yet).
        let total: u64 = cur.iter().map(|(_, s, e)| e - s).sum();
        let busy: Vec<(u64, u64)> = img
            .vmas
            .iter()
            .map(|v| (v.start, v.end))
            .chain(cur.iter().map(|(_, s, e)| (*s, *e)))
            .collect();
        let mut spot = 0x1000_0000_0000u64;
        while busy.iter().any(|b| overlaps((spot, spot + total), *b)) {
            spot += 0x10_0000_0000;
        }
        for c in cur.iter_mut() {
            remap(t, c, spot)?;
            spot += c.2 - c.1;
        }
    }
    for (name, s, _) in &theirs {
        let Some(c) = cur.iter_mut().find(|c| c.0 == *name) else {
            continue;
        };
        if c.1 != *s {
            remap(t, c, *s)?;
        }
    }
    Ok(())
}

/// Moves one special mapping `c` to `to` (updating `c`), and the injection instruction with the vdso.
fn remap(t: &mut Tracee, c: &mut (String, u64, u64), to: u64) -> Result<()> {
    let len = c.2 - c.1;
    let r = t.checked_syscall(
        "mremap",
        libc::SYS_mremap,
        &[
            c.1,
            len,
            len,
            (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
            to,
        ],
    )?;
    if c.0 == "[vdso]" {
        let insn = t.syscall_insn();
        t.set_syscall_insn(insn - c.1 + r as u64);
    }
    c.1 = r as u64;
    c.2 = r as u64 + len;
    Ok(())
}
