//! What changed between two checkpoints, computed from their layers.
//!
//! Two checkpoints of one lineage share the bottom of their layer chains; only the layers they do not share can
//! hold differences. Candidate paths are the entries of those layers (whiteouts included); under a directory
//! that is opaque or redirected (renamed) in one of them, everything is a candidate. Each candidate is then
//! compared through read-only overlay mounts of both checkpoints: type, mode, ownership, symlink target and
//! file content. Nothing walks the whole tree.

use std::collections::BTreeSet;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Two checkpoints' layers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiffSpec {
    /// All of A's read-only layers, topmost first (base included).
    pub a: Vec<PathBuf>,
    /// All of B's.
    pub b: Vec<PathBuf>,
    /// The layers that are in one chain but not the other.
    pub unique: Vec<PathBuf>,
}

/// Paths (absolute, as seen in the sandbox) by kind of change from A to B.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DiffResult {
    /// In B, not in A.
    pub added: Vec<String>,
    /// In A, not in B.
    pub deleted: Vec<String>,
    /// In both, different.
    pub changed: Vec<String>,
}

fn is_special_dir(p: &Path) -> bool {
    let mut b = [0u8; 4096];
    ["trusted.overlay.opaque", "trusted.overlay.redirect"]
        .iter()
        .any(|x| rustix::fs::lgetxattr(p, *x, &mut b).is_ok())
}

/// Relative paths of every entry under `dir` (not following symlinks).
fn walk(dir: &Path, rel: &Path, out: &mut BTreeSet<PathBuf>, whole: &mut BTreeSet<PathBuf>) {
    let Ok(list) = std::fs::read_dir(dir) else {
        return;
    };
    for e in list.flatten() {
        let r = rel.join(e.file_name());
        let p = e.path();
        out.insert(r.clone());
        if let Ok(ft) = e.file_type() {
            if ft.is_dir() {
                if is_special_dir(&p) {
                    whole.insert(r.clone());
                }
                walk(&p, &r, out, whole);
            }
        }
    }
}

fn view(mnt: &OwnedFd, rel: &Path) -> PathBuf {
    Path::new(&format!("/proc/self/fd/{}", mnt.as_raw_fd())).join(rel)
}

fn same_content(a: &Path, b: &Path) -> bool {
    let (Ok(mut fa), Ok(mut fb)) = (std::fs::File::open(a), std::fs::File::open(b)) else {
        return false;
    };
    let (mut ba, mut bb) = (vec![0u8; 65536], vec![0u8; 65536]);
    loop {
        let (Ok(na), Ok(nb)) = (fa.read(&mut ba), fb.read(&mut bb)) else {
            return false;
        };
        if na != nb || ba[..na] != bb[..nb] {
            return false;
        }
        if na == 0 {
            return true;
        }
    }
}

fn differs(a: &Path, b: &Path, ma: &std::fs::Metadata, mb: &std::fs::Metadata) -> bool {
    let (ta, tb) = (ma.file_type(), mb.file_type());
    if ta.is_dir() != tb.is_dir()
        || ta.is_symlink() != tb.is_symlink()
        || ta.is_file() != tb.is_file()
        || ta.is_char_device() != tb.is_char_device()
    {
        return true;
    }
    if ma.mode() != mb.mode() || ma.uid() != mb.uid() || ma.gid() != mb.gid() {
        return true;
    }
    if ta.is_symlink() {
        return std::fs::read_link(a).ok() != std::fs::read_link(b).ok();
    }
    if ta.is_file() {
        return ma.len() != mb.len() || !same_content(a, b);
    }
    false
}

/// Everything under `rel` in a view, as sandbox paths (a directory that appeared or vanished as a whole).
fn subtree(m: &OwnedFd, rel: &Path) -> Vec<String> {
    let mut all = BTreeSet::new();
    walk(&view(m, rel), rel, &mut all, &mut BTreeSet::new());
    all.into_iter()
        .map(|r| format!("/{}", r.display()))
        .collect()
}

/// Computes the difference (call in a process that sees every layer path: the zygote's helper).
pub fn diff(spec: &DiffSpec) -> Result<DiffResult, String> {
    let ma = deltabox_fs::overlay::fsmount_readonly(&spec.a).map_err(|e| e.to_string())?;
    let mb = deltabox_fs::overlay::fsmount_readonly(&spec.b).map_err(|e| e.to_string())?;
    let mut cands = BTreeSet::new();
    let mut whole = BTreeSet::new();
    for layer in &spec.unique {
        walk(layer, Path::new(""), &mut cands, &mut whole);
    }
    for w in &whole {
        for m in [&ma, &mb] {
            let mut extra = BTreeSet::new();
            walk(&view(m, w), w, &mut extra, &mut BTreeSet::new());
            cands.extend(extra);
        }
    }
    let mut res = DiffResult::default();
    let cands: Vec<PathBuf> = cands.into_iter().collect();
    for rel in cands {
        let (pa, pb) = (view(&ma, &rel), view(&mb, &rel));
        let name = format!("/{}", rel.display());
        match (
            std::fs::symlink_metadata(&pa),
            std::fs::symlink_metadata(&pb),
        ) {
            (Err(_), Err(_)) => {}
            (Err(_), Ok(m)) => {
                res.added.push(name);
                if m.is_dir() {
                    res.added.extend(subtree(&mb, &rel));
                }
            }
            (Ok(m), Err(_)) => {
                res.deleted.push(name);
                if m.is_dir() {
                    res.deleted.extend(subtree(&ma, &rel));
                }
            }
            (Ok(a), Ok(b)) => {
                if differs(&pa, &pb, &a, &b) {
                    res.changed.push(name);
                }
            }
        }
    }
    for v in [&mut res.added, &mut res.deleted, &mut res.changed] {
        v.sort();
        v.dedup();
    }
    Ok(res)
}
