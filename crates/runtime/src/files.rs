//! A running sandbox's files as its processes see them, for the file API: read, write, list, stat, make
//! directories, remove. Every path is resolved by the kernel inside the sandbox's root (`openat2` with
//! `RESOLVE_IN_ROOT` from `/proc/<init>/root`): `..` stops at the root and a symlink, absolute or not, resolves
//! as it would for the sandbox — nothing reaches the host. A path that climbs above the root by its own `..`
//! is refused before anything is opened.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};
use serde::{Deserialize, Serialize};

/// Why a file operation failed; each maps to one API error code.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Relative, empty, with a NUL, or climbing above the sandbox's root with `..`.
    #[error("{0}")]
    BadPath(String),
    #[error("{0}: no such file or directory")]
    NotFound(String),
    #[error("{0}: is a directory")]
    IsDir(String),
    #[error("{0}: not a directory")]
    NotDir(String),
    #[error("{0}: too large ({1} bytes; the limit is {2})")]
    TooLarge(String, u64, u64),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

impl FileError {
    fn io(path: &str, e: std::io::Error) -> FileError {
        match e.raw_os_error() {
            Some(libc::ENOENT) => FileError::NotFound(path.into()),
            Some(libc::EISDIR) => FileError::IsDir(path.into()),
            Some(libc::ENOTDIR) => FileError::NotDir(path.into()),
            // (Opening a FIFO without a reader, or a device with nothing behind it.)
            Some(libc::ENXIO) | Some(libc::ENODEV) => {
                FileError::BadPath(format!("{path}: not a regular file (a FIFO or a device)"))
            }
            Some(libc::ELOOP) | Some(libc::EXDEV) => FileError::BadPath(format!(
                "{path}: resolves through a link that leaves the sandbox's files"
            )),
            _ => FileError::Io(path.into(), e),
        }
    }
}

/// What a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EntryType {
    File,
    Dir,
    Symlink,
    Other,
}

/// One file or directory.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EntryInfo {
    /// Last component.
    pub name: String,
    /// Absolute path in the sandbox.
    pub path: String,
    #[serde(rename = "type")]
    pub kind: EntryType,
    pub size: u64,
    /// Permission bits (`0o644` …).
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub modified: i64,
    /// Where a symlink points (as stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// The absolute sandbox path `p`, normalized, as a path relative to the root (`.` for the root itself).
pub fn relative(p: &str) -> Result<PathBuf, FileError> {
    if p.contains('\0') {
        return Err(FileError::BadPath(format!("{p:?}: contains a NUL byte")));
    }
    if !p.starts_with('/') {
        return Err(FileError::BadPath(format!(
            "{p:?}: not an absolute path (paths are as the sandbox sees them, from /)"
        )));
    }
    let mut parts: Vec<&std::ffi::OsStr> = Vec::new();
    for c in Path::new(p).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                if parts.pop().is_none() {
                    return Err(FileError::BadPath(format!(
                        "{p}: climbs above the sandbox's root"
                    )));
                }
            }
            Component::Normal(n) => parts.push(n),
            Component::Prefix(_) => {}
        }
    }
    Ok(if parts.is_empty() {
        PathBuf::from(".")
    } else {
        parts.iter().collect()
    })
}

/// Kernel filesystems (proc, sys, cgroup, debug, trace, security, bpf, configfs, fusectl,
/// binfmt_misc, efivarfs, nsfs): their files act in *the opener's* context. Opened by the daemon they would read
/// the host's state (`/proc/sys/kernel/hostname` gave the host's name) and write it with the daemon's
/// privileges, so the file API refuses them; a command inside the sandbox reads its own.
const KERNEL_FS: [i64; 12] = [
    0x9fa0,
    0x6265_6572,
    0x0027_e0eb,
    0x6367_7270,
    0x6462_6720,
    0x7472_6163,
    0x7363_6673,
    0xcafe_4a11,
    0x6265_6570,
    0x6573_5543,
    0x4249_4e4d,
    0x6e73_6673,
];

/// Whether `fd` is on a kernel filesystem ([`KERNEL_FS`]).
pub(crate) fn on_kernel_fs(fd: &OwnedFd) -> std::io::Result<bool> {
    let fs = rustix::fs::fstatfs(fd)?;
    Ok(KERNEL_FS.contains(&(fs.f_type as i64)))
}

/// Refuses `fd` if it is on a kernel filesystem, or (with `regular`) not a regular file.
fn plain(fd: &OwnedFd, shown: &str, regular: bool) -> Result<(), FileError> {
    if on_kernel_fs(fd).map_err(|e| FileError::io(shown, e))? {
        return Err(FileError::BadPath(format!(
            "{shown}: on a kernel filesystem (proc, sys …), which the file API does not reach: run a command in the sandbox"
        )));
    }
    if regular {
        let st = rustix::fs::fstat(fd).map_err(|e| FileError::io(shown, e.into()))?;
        let ft = rustix::fs::FileType::from_raw_mode(st.st_mode);
        if ft == rustix::fs::FileType::Directory {
            return Err(FileError::IsDir(shown.into()));
        }
        if ft != rustix::fs::FileType::RegularFile {
            return Err(FileError::BadPath(format!(
                "{shown}: not a regular file (a device, FIFO or socket)"
            )));
        }
    }
    Ok(())
}

fn root(init_pid: i32) -> Result<OwnedFd, FileError> {
    rustix::fs::open(
        format!("/proc/{init_pid}/root").as_str(),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| FileError::Io("/".into(), e.into()))
}

fn open_at(
    dir: impl AsFd,
    rel: &Path,
    flags: OFlags,
    mode: u32,
    shown: &str,
) -> Result<OwnedFd, FileError> {
    rustix::fs::openat2(
        dir,
        rel,
        flags | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|e| FileError::io(shown, e.into()))
}

/// Reads file `path` (at most `limit` bytes; larger is [`FileError::TooLarge`]).
pub fn read(init_pid: i32, path: &str, limit: u64) -> Result<Vec<u8>, FileError> {
    let rel = relative(path)?;
    // Non-blocking: a FIFO must not hang the call (it is refused below anyway).
    let fd = open_at(
        root(init_pid)?,
        &rel,
        OFlags::RDONLY | OFlags::NONBLOCK,
        0,
        path,
    )?;
    plain(&fd, path, true)?;
    let mut f = std::fs::File::from(fd);
    let meta = f.metadata().map_err(|e| FileError::io(path, e))?;
    if meta.is_dir() {
        return Err(FileError::IsDir(path.into()));
    }
    if meta.is_file() && meta.len() > limit {
        return Err(FileError::TooLarge(path.into(), meta.len(), limit));
    }
    let mut out = Vec::new();
    (&mut f)
        .take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| FileError::io(path, e))?;
    if out.len() as u64 > limit {
        return Err(FileError::TooLarge(path.into(), out.len() as u64, limit));
    }
    Ok(out)
}

/// Writes `data` to file `path` (created with `mode`, or truncated), making missing parent directories.
pub fn write(init_pid: i32, path: &str, data: &[u8], mode: u32) -> Result<EntryInfo, FileError> {
    let rel = relative(path)?;
    if rel == Path::new(".") {
        return Err(FileError::IsDir(path.into()));
    }
    let root = root(init_pid)?;
    if let Some(parent) = rel.parent().filter(|p| !p.as_os_str().is_empty()) {
        mkdirs(&root, parent, path)?;
    }
    // Opened without truncating, checked, then truncated: nothing changes on a file that is refused.
    let fd = open_at(
        &root,
        &rel,
        OFlags::WRONLY | OFlags::CREATE | OFlags::NONBLOCK,
        mode & 0o7777,
        path,
    )?;
    plain(&fd, path, true)?;
    rustix::fs::ftruncate(&fd, 0).map_err(|e| FileError::io(path, e.into()))?;
    let mut f = std::fs::File::from(fd);
    f.write_all(data).map_err(|e| FileError::io(path, e))?;
    drop(f);
    stat_at(&root, &rel, path)
}

/// Makes directory `path` and its missing parents; returns it.
pub fn mkdir(init_pid: i32, path: &str) -> Result<EntryInfo, FileError> {
    let rel = relative(path)?;
    let root = root(init_pid)?;
    mkdirs(&root, &rel, path)?;
    stat_at(&root, &rel, path)
}

/// `mkdir -p` of `rel` under `root`, one component at a time (each resolved inside the root).
fn mkdirs(root: &OwnedFd, rel: &Path, shown: &str) -> Result<(), FileError> {
    let mut at = PathBuf::new();
    for c in rel.components() {
        at.push(c);
        let dir = open_at(root, &at, OFlags::PATH | OFlags::DIRECTORY, 0, shown);
        match dir {
            Ok(d) => {
                plain(&d, shown, false)?;
                continue;
            }
            Err(FileError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
        let parent = at.parent().filter(|p| !p.as_os_str().is_empty());
        let pfd = match parent {
            Some(p) => open_at(root, p, OFlags::PATH | OFlags::DIRECTORY, 0, shown)?,
            None => root
                .try_clone()
                .map_err(|e| FileError::Io(shown.into(), e))?,
        };
        let name = at.file_name().unwrap_or_default();
        match rustix::fs::mkdirat(&pfd, name, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(FileError::io(shown, e.into())),
        }
    }
    Ok(())
}

fn kind_of(ft: std::fs::FileType) -> EntryType {
    if ft.is_symlink() {
        EntryType::Symlink
    } else if ft.is_dir() {
        EntryType::Dir
    } else if ft.is_file() {
        EntryType::File
    } else {
        EntryType::Other
    }
}

/// What `rel` is, without following a final symlink.
fn stat_at(root: &OwnedFd, rel: &Path, shown: &str) -> Result<EntryInfo, FileError> {
    let fd = open_at(root, rel, OFlags::PATH | OFlags::NOFOLLOW, 0, shown)?;
    let f = std::fs::File::from(fd);
    let meta = f.metadata().map_err(|e| FileError::io(shown, e))?;
    let kind = kind_of(meta.file_type());
    let target = (kind == EntryType::Symlink)
        .then(|| rustix::fs::readlinkat(&f, "", Vec::new()).ok())
        .flatten()
        .map(|t| t.to_string_lossy().into_owned());
    let abs = Path::new("/").join(rel);
    let abs = abs.to_string_lossy().replace("/./", "/");
    let abs = if abs == "/." { "/".to_string() } else { abs };
    Ok(EntryInfo {
        name: rel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".into()),
        path: abs,
        kind,
        size: meta.len(),
        mode: meta.mode() & 0o7777,
        modified: meta.mtime(),
        target,
    })
}

/// What `path` is (a final symlink is not followed).
pub fn stat(init_pid: i32, path: &str) -> Result<EntryInfo, FileError> {
    let rel = relative(path)?;
    stat_at(&root(init_pid)?, &rel, path)
}

/// The entries of directory `path`, sorted by name.
pub fn list(init_pid: i32, path: &str) -> Result<Vec<EntryInfo>, FileError> {
    let rel = relative(path)?;
    let root = root(init_pid)?;
    let fd = open_at(&root, &rel, OFlags::RDONLY | OFlags::DIRECTORY, 0, path)?;
    let mut names = Vec::new();
    let mut dir = rustix::fs::Dir::read_from(&fd).map_err(|e| FileError::io(path, e.into()))?;
    for e in dir.by_ref() {
        let e = e.map_err(|e| FileError::io(path, e.into()))?;
        let n = e.file_name().to_string_lossy().into_owned();
        if n != "." && n != ".." {
            names.push(n);
        }
    }
    names.sort();
    let mut out = Vec::with_capacity(names.len());
    for n in names {
        let child = if rel == Path::new(".") {
            PathBuf::from(&n)
        } else {
            rel.join(&n)
        };
        match stat_at(&root, &child, path) {
            Ok(i) => out.push(i),
            // Gone meanwhile: not listed.
            Err(FileError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Removes `path`: a file, a symlink (not what it points to) or a directory with everything in it.
pub fn remove(init_pid: i32, path: &str) -> Result<(), FileError> {
    let rel = relative(path)?;
    if rel == Path::new(".") {
        return Err(FileError::BadPath(
            "/: the sandbox's root cannot be removed".into(),
        ));
    }
    let root = root(init_pid)?;
    let parent = rel.parent().filter(|p| !p.as_os_str().is_empty());
    let pfd = match parent {
        Some(p) => open_at(&root, p, OFlags::RDONLY | OFlags::DIRECTORY, 0, path)?,
        None => open_at(
            &root,
            Path::new("."),
            OFlags::RDONLY | OFlags::DIRECTORY,
            0,
            path,
        )?,
    };
    plain(&pfd, path, false)?;
    let name = rel.file_name().unwrap_or_default();
    remove_in(&pfd, Path::new(name), path)
}

/// Removes `name` in directory `dir`; directories are emptied through descriptors (never following a link).
fn remove_in(dir: &OwnedFd, name: &Path, shown: &str) -> Result<(), FileError> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) => return Ok(()),
        Err(rustix::io::Errno::ISDIR) | Err(rustix::io::Errno::PERM) => {}
        Err(e) => return Err(FileError::io(shown, e.into())),
    }
    let sub = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| FileError::io(shown, e.into()))?;
    let mut names = Vec::new();
    let mut d = rustix::fs::Dir::read_from(&sub).map_err(|e| FileError::io(shown, e.into()))?;
    for e in d.by_ref() {
        let e = e.map_err(|e| FileError::io(shown, e.into()))?;
        let n = e.file_name().to_bytes().to_vec();
        if n != b"." && n != b".." {
            names.push(n);
        }
    }
    for n in names {
        use std::os::unix::ffi::OsStrExt;
        remove_in(&sub, Path::new(std::ffi::OsStr::from_bytes(&n)), shown)?;
    }
    rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR).map_err(|e| FileError::io(shown, e.into()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalized_and_never_climb_above_the_root() {
        assert_eq!(relative("/").unwrap(), PathBuf::from("."));
        assert_eq!(relative("/a/./b/../c").unwrap(), PathBuf::from("a/c"));
        assert_eq!(relative("/a/b/..").unwrap(), PathBuf::from("a"));
        assert!(matches!(
            relative("/../etc/passwd"),
            Err(FileError::BadPath(_))
        ));
        assert!(matches!(relative("/a/../../x"), Err(FileError::BadPath(_))));
        assert!(matches!(relative("a/b"), Err(FileError::BadPath(_))));
        assert!(matches!(relative("/a\0b"), Err(FileError::BadPath(_))));
    }
}
