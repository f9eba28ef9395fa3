//! Layer compaction: merging a run of frozen overlayfs layers into one layer that means the same thing.
//!
//! overlayfs takes at most 500 lower layers, and every extra layer costs a little on first lookups, yet a
//! sandbox may be checkpointed 10,000 times. A run of adjacent frozen layers `[L_top … L_bottom]` is replaced by
//! one layer `M` such that, over **any** stack `S` below it, `M over S` shows exactly what `L_top … L_bottom over S`
//! shows. `M` is built in user space by resolving each name through the run the way the kernel's `ovl_lookup`
//! does: whiteouts, opaque directories, and directories renamed with `redirect_dir` (relative and absolute
//! redirects, which may point through other redirected directories of the run). What the run deletes from `S`
//! stays a whiteout in `M`; what it hides becomes an opaque directory; a directory the run renamed gets an
//! absolute redirect to where its lower contents live in `S`.
//!
//! File data is cloned (`FICLONE`) when the store supports reflinks (XFS, btrfs), so a merged layer costs
//! metadata only; elsewhere it is copied. Hard links inside one layer stay hard links. overlayfs's private
//! `origin`/`impure` xattrs are dropped: they only keep inode numbers stable across copy-up and are ignored when
//! stale. Only layers written by overlayfs mounted as host root (whiteouts as 0/0 character devices, metadata in
//! `trusted.overlay.*`) are understood; `metacopy` and xattr whiteouts are not used by DeltaBox's mounts.

use std::collections::{BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, Mode, OFlags, Timestamps, XattrFlags};

use crate::whiteout::OPAQUE_XATTR;
use crate::{Error, Result};

/// Redirect xattr of a renamed directory (value: an absolute path, or a name in the same parent).
pub const REDIRECT_XATTR: &str = "trusted.overlay.redirect";
const OVERLAY_XATTR_PREFIX: &[u8] = b"trusted.overlay.";

/// What a merge produced.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MergeStats {
    /// Entries written (files, directories, links, whiteouts).
    pub entries: u64,
    /// Bytes shared with the source layers by reflink.
    pub cloned_bytes: u64,
    /// Bytes copied because the filesystem cannot clone.
    pub copied_bytes: u64,
}

/// A directory of the merged namespace: where it exists in the run, and where lookups continue below the run.
#[derive(Debug, Clone)]
struct DirState {
    /// (layer index, physical directory), topmost first.
    stack: Vec<(usize, PathBuf)>,
    /// Path (relative to the root) at which the layers below the run are looked up; `None` if the run hides
    /// everything below (an opaque directory, or a directory over a whiteout or a non-directory).
    below: Option<PathBuf>,
}

/// The result of looking a name up through the run.
enum Found {
    /// The top hit is a whiteout: the name is deleted.
    Whiteout,
    /// The top hit is a non-directory (it hides everything below it).
    NonDir(PathBuf, std::fs::Metadata),
    /// A directory (possibly merged over several layers).
    Dir(DirState),
    /// Not in the run at all; below the run it is looked up at `below`.
    Missing(Option<PathBuf>),
}

struct Merger<'a> {
    run: &'a [PathBuf],
    stats: MergeStats,
    /// Hard-linked source inodes already written: (dev, ino) -> path in the output.
    links: HashMap<(u64, u64), PathBuf>,
    reflink: bool,
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    Error::io(what, path.to_path_buf())
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    match rustix::fs::lgetxattr(path, name, &mut buf) {
        Ok(n) => {
            buf.truncate(n);
            Some(buf)
        }
        Err(_) => None,
    }
}

fn is_whiteout(md: &std::fs::Metadata) -> bool {
    md.file_type().is_char_device() && md.rdev() == 0
}

fn lstat(path: &Path) -> Result<Option<std::fs::Metadata>> {
    match std::fs::symlink_metadata(path) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        // A component that is not a directory (a lower path through a file) means "not there" to overlayfs.
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => Ok(None),
        Err(e) => Err(io("stat", path)(e)),
    }
}

impl Merger<'_> {
    fn root_state(&self, from_layer: usize) -> DirState {
        DirState {
            stack: (from_layer..self.run.len())
                .map(|i| (i, self.run[i].clone()))
                .collect(),
            below: Some(PathBuf::new()),
        }
    }

    /// Looks `name` up in directory `parent`, as `ovl_lookup` walks the layers.
    fn lookup(&self, parent: &DirState, name: &OsStr) -> Result<Found> {
        let cands = parent
            .stack
            .iter()
            .map(|(l, p)| (*l, p.join(name)))
            .collect();
        let below = parent.below.as_ref().map(|b| b.join(name));
        self.continue_lookup(cands, below, parent.clone(), Vec::new())
    }

    /// Continues a lookup over candidate entries `cands` (topmost first), `found` holding the directories hit so
    /// far; `parent` is where a relative redirect is resolved.
    fn continue_lookup(
        &self,
        cands: Vec<(usize, PathBuf)>,
        mut below: Option<PathBuf>,
        parent: DirState,
        mut found: Vec<(usize, PathBuf)>,
    ) -> Result<Found> {
        let stop = |found: Vec<(usize, PathBuf)>| {
            Ok(Found::Dir(DirState {
                stack: found,
                below: None,
            }))
        };
        for (layer, path) in cands {
            let Some(md) = lstat(&path)? else { continue };
            if is_whiteout(&md) {
                return if found.is_empty() {
                    Ok(Found::Whiteout)
                } else {
                    stop(found)
                };
            }
            if !md.is_dir() {
                return if found.is_empty() {
                    Ok(Found::NonDir(path, md))
                } else {
                    // A directory over a non-directory ignores it and everything below.
                    stop(found)
                };
            }
            found.push((layer, path.clone()));
            if xattr(&path, OPAQUE_XATTR).as_deref() == Some(b"y") {
                return stop(found);
            }
            let Some(redirect) = xattr(&path, REDIRECT_XATTR) else {
                continue;
            };
            if redirect.first() == Some(&b'/') {
                // Absolute: look the path up again from the root of the layers below this one.
                let comps: Vec<&OsStr> = redirect
                    .split(|b| *b == b'/')
                    .filter(|c| !c.is_empty())
                    .map(OsStr::from_bytes)
                    .collect();
                let Some((last, dirs)) = comps.split_last() else {
                    return stop(found);
                };
                let mut st = self.root_state(layer + 1);
                for c in dirs {
                    st = match self.lookup(&st, c)? {
                        Found::Dir(s) => s,
                        Found::Missing(below) => DirState {
                            stack: Vec::new(),
                            below,
                        },
                        Found::Whiteout | Found::NonDir(..) => DirState {
                            stack: Vec::new(),
                            below: None,
                        },
                    };
                }
                let cands = st.stack.iter().map(|(l, p)| (*l, p.join(last))).collect();
                let below = st.below.as_ref().map(|b| b.join(last));
                return self.continue_lookup(cands, below, st, found);
            }
            // Relative: the same parent, another name, in the layers below this one.
            let name = OsStr::from_bytes(&redirect);
            let cands = parent
                .stack
                .iter()
                .filter(|(l, _)| *l > layer)
                .map(|(l, p)| (*l, p.join(name)))
                .collect();
            below = parent.below.as_ref().map(|b| b.join(name));
            return self.continue_lookup(cands, below, parent, found);
        }
        if found.is_empty() {
            Ok(Found::Missing(below))
        } else {
            Ok(Found::Dir(DirState {
                stack: found,
                below,
            }))
        }
    }

    /// Writes directory `state`'s entries into `out` (which exists).
    fn merge_dir(&mut self, state: &DirState, out: &Path) -> Result<()> {
        let mut names = BTreeSet::<OsString>::new();
        for (_, dir) in &state.stack {
            for e in std::fs::read_dir(dir).map_err(io("read directory", dir))? {
                names.insert(e.map_err(io("read directory", dir))?.file_name());
            }
        }
        for name in names {
            let target = out.join(&name);
            match self.lookup(state, &name)? {
                Found::Missing(_) => {}
                Found::Whiteout => {
                    if state.below.is_some() {
                        crate::whiteout::make_whiteout(&target)?;
                        self.stats.entries += 1;
                    }
                }
                Found::NonDir(src, md) => self.copy_nondir(&src, &md, &target)?,
                Found::Dir(child) => {
                    let (_, top) = &child.stack[0];
                    let md = std::fs::symlink_metadata(top).map_err(io("stat", top))?;
                    std::fs::create_dir(&target).map_err(io("create directory", &target))?;
                    self.stats.entries += 1;
                    let natural = state.below.as_ref().map(|b| b.join(&name));
                    match &child.below {
                        None if state.below.is_some() => {
                            crate::whiteout::make_opaque(&target)?;
                        }
                        Some(b) if Some(b) != natural.as_ref() => {
                            let mut v = b"/".to_vec();
                            v.extend_from_slice(b.as_os_str().as_bytes());
                            rustix::fs::setxattr(&target, REDIRECT_XATTR, &v, XattrFlags::empty())
                                .map_err(|e| io("set redirect", &target)(e.into()))?;
                        }
                        _ => {}
                    }
                    copy_xattrs(top, &target)?;
                    self.merge_dir(&child, &target)?;
                    set_attrs(&target, &md)?;
                }
            }
        }
        Ok(())
    }

    fn copy_nondir(&mut self, src: &Path, md: &std::fs::Metadata, dst: &Path) -> Result<()> {
        self.stats.entries += 1;
        if md.nlink() > 1 {
            if let Some(first) = self.links.get(&(md.dev(), md.ino())) {
                return std::fs::hard_link(first, dst).map_err(io("link", dst));
            }
            self.links.insert((md.dev(), md.ino()), dst.to_path_buf());
        }
        let ft = md.file_type();
        if ft.is_file() {
            self.copy_file(src, md, dst)?;
        } else if ft.is_symlink() {
            let to = std::fs::read_link(src).map_err(io("read link", src))?;
            std::os::unix::fs::symlink(&to, dst).map_err(io("create symlink", dst))?;
        } else {
            let kind = if ft.is_char_device() {
                FileType::CharacterDevice
            } else if ft.is_block_device() {
                FileType::BlockDevice
            } else if ft.is_fifo() {
                FileType::Fifo
            } else {
                FileType::Socket
            };
            rustix::fs::mknodat(rustix::fs::CWD, dst, kind, Mode::empty(), md.rdev())
                .map_err(|e| io("create node", dst)(e.into()))?;
        }
        copy_xattrs(src, dst)?;
        set_attrs(dst, md)
    }

    fn copy_file(&mut self, src: &Path, md: &std::fs::Metadata, dst: &Path) -> Result<()> {
        let from = std::fs::File::open(src).map_err(io("open", src))?;
        let to = rustix::fs::open(
            dst,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| io("create", dst)(e.into()))?;
        if md.len() == 0 {
            return Ok(());
        }
        if self.reflink {
            match rustix::fs::ioctl_ficlone(&to, &from) {
                Ok(()) => {
                    self.stats.cloned_bytes += md.len();
                    return Ok(());
                }
                Err(_) => self.reflink = false,
            }
        }
        let mut left = md.len();
        while left > 0 {
            let n = rustix::fs::copy_file_range(&from, None, &to, None, left as usize)
                .map_err(|e| io("copy", dst)(e.into()))?;
            if n == 0 {
                break;
            }
            left -= n as u64;
            self.stats.copied_bytes += n as u64;
        }
        Ok(())
    }
}

/// Copies every xattr but overlayfs's own bookkeeping (`origin`, `impure`, `opaque`, `redirect` are decided by
/// the merge).
fn copy_xattrs(src: &Path, dst: &Path) -> Result<()> {
    let mut names = vec![0u8; 4096];
    let n = match rustix::fs::llistxattr(src, &mut names) {
        Ok(n) => n,
        Err(rustix::io::Errno::RANGE) => {
            let size =
                rustix::fs::llistxattr_query(src).map_err(|e| io("list xattrs", src)(e.into()))?;
            names = vec![0u8; size];
            rustix::fs::llistxattr(src, &mut names).map_err(|e| io("list xattrs", src)(e.into()))?
        }
        Err(e) => return Err(io("list xattrs", src)(e.into())),
    };
    for name in names[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        if name.starts_with(OVERLAY_XATTR_PREFIX) {
            continue;
        }
        let name = OsStr::from_bytes(name);
        let mut value = vec![0u8; 65536];
        let len = rustix::fs::lgetxattr(src, name, &mut value)
            .map_err(|e| io("read xattr", src)(e.into()))?;
        rustix::fs::lsetxattr(dst, name, &value[..len], XattrFlags::empty())
            .map_err(|e| io("set xattr", dst)(e.into()))?;
    }
    Ok(())
}

/// Ownership, mode and times as in the source (mode after ownership, which clears set-id bits).
fn set_attrs(dst: &Path, md: &std::fs::Metadata) -> Result<()> {
    let err = |what| move |e: rustix::io::Errno| io(what, dst)(e.into());
    rustix::fs::chownat(
        rustix::fs::CWD,
        dst,
        Some(rustix::process::Uid::from_raw(md.uid())),
        Some(rustix::process::Gid::from_raw(md.gid())),
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(err("chown"))?;
    if !md.file_type().is_symlink() {
        rustix::fs::chmod(dst, Mode::from_raw_mode(md.mode() & 0o7777)).map_err(err("chmod"))?;
    }
    let ts = |s: i64, ns: i64| rustix::fs::Timespec {
        tv_sec: s,
        tv_nsec: ns as _,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        dst,
        &Timestamps {
            last_access: ts(md.atime(), md.atime_nsec()),
            last_modification: ts(md.mtime(), md.mtime_nsec()),
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(err("set times"))
}

/// Merges `run` (layer directories, topmost first, all frozen) into `out`, an empty directory on the same
/// filesystem (for reflinks), such that `out` over any stack means the same as `run` over it.
pub fn merge_layers(run: &[PathBuf], out: &Path) -> Result<MergeStats> {
    let mut m = Merger {
        run,
        stats: MergeStats::default(),
        links: HashMap::new(),
        reflink: true,
    };
    if run.is_empty() {
        return Ok(m.stats);
    }
    let root = m.root_state(0);
    m.merge_dir(&root, out)?;
    let md = std::fs::symlink_metadata(&run[0]).map_err(io("stat", &run[0]))?;
    copy_xattrs(&run[0], out)?;
    set_attrs(out, &md)?;
    Ok(m.stats)
}
