//! The default base image: the host's system directories, read-only, with everything private masked out.
//!
//! Needs no download, so a new user's first `deltabox create` works. The sandbox sees the host root through a
//! non-recursive bind mount (the lowest layer) under a small *mask layer* built here: whiteouts hide every
//! top-level entry that is not a system directory, opaque empty directories replace `/root`, `/home`, `/var` …,
//! and known secrets inside visible directories (`/etc/shadow`, SSH host keys …) are whited out too.
//! Allow-listing (rather than hiding known-bad paths) means a new directory on the host stays invisible.

use std::collections::BTreeSet;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::whiteout::{make_opaque, make_whiteout};
use crate::{Error, Result};

/// Top-level host directories a default sandbox sees (read-only; writes copy up into the sandbox's layer).
pub const VISIBLE: &[&str] = &[
    "usr", "etc", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "opt",
];

/// Top-level directories present but empty (mountpoints and per-sandbox state), with their modes.
pub const EMPTY: &[(&str, u32)] = &[
    ("root", 0o700),
    ("home", 0o755),
    ("var", 0o755),
    ("run", 0o755),
    ("tmp", 0o1777),
    ("srv", 0o755),
    ("mnt", 0o755),
    ("media", 0o755),
    ("proc", 0o555),
    ("dev", 0o755),
    ("sys", 0o555),
    (crate::GENERATION_MOUNTPOINT, 0o000),
];

/// Secrets inside visible directories, hidden by whiteouts. A trailing `*` matches a name prefix.
pub const SECRETS: &[&str] = &[
    "etc/shadow",
    "etc/shadow-",
    "etc/gshadow",
    "etc/gshadow-",
    "etc/security/opasswd",
    "etc/ssl/private",
    "etc/ssh/ssh_host_*",
    "etc/sudoers",
    "etc/sudoers.d",
    "etc/machine-id",
    "etc/deltabox",
];

/// One entry of the mask layer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum MaskEntry {
    Whiteout(PathBuf),
    EmptyDir(PathBuf, u32),
}

/// Computes the mask for the host root at `host_root`, also hiding `extra_hidden` (absolute host paths such as
/// the daemon's state directory when it lies inside a visible directory).
fn plan(host_root: &Path, extra_hidden: &[PathBuf]) -> Result<BTreeSet<MaskEntry>> {
    let mut entries = BTreeSet::new();
    let top = std::fs::read_dir(host_root).map_err(Error::io("read", host_root))?;
    for entry in top {
        let name = entry.map_err(Error::io("read", host_root))?.file_name();
        let name_str = name.to_string_lossy();
        if VISIBLE.contains(&name_str.as_ref()) || EMPTY.iter().any(|(n, _)| *n == name_str) {
            continue;
        }
        entries.insert(MaskEntry::Whiteout(PathBuf::from(&name)));
    }
    for (name, mode) in EMPTY {
        entries.insert(MaskEntry::EmptyDir(PathBuf::from(name), *mode));
    }
    entries.insert(MaskEntry::EmptyDir(PathBuf::from("var/tmp"), 0o1777));
    for secret in SECRETS {
        if let Some(prefix) = secret.strip_suffix('*') {
            let rel = Path::new(prefix);
            let (dir, stem) = (
                rel.parent().unwrap_or(Path::new("")),
                rel.file_name().unwrap_or_default(),
            );
            if let Ok(list) = std::fs::read_dir(host_root.join(dir)) {
                for e in list.flatten() {
                    if e.file_name()
                        .to_string_lossy()
                        .starts_with(&*stem.to_string_lossy())
                    {
                        entries.insert(MaskEntry::Whiteout(dir.join(e.file_name())));
                    }
                }
            }
        } else if host_root.join(secret).symlink_metadata().is_ok() {
            entries.insert(MaskEntry::Whiteout(PathBuf::from(secret)));
        }
    }
    for hidden in extra_hidden {
        let rel: PathBuf = hidden
            .components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .collect();
        let first = rel
            .components()
            .next()
            .map(|c| c.as_os_str().to_string_lossy().into_owned());
        // Only paths under a visible directory need hiding; everything else is masked already.
        if first.is_some_and(|f| VISIBLE.contains(&f.as_str())) && rel.components().count() > 1 {
            entries.insert(MaskEntry::Whiteout(rel));
        }
    }
    Ok(entries)
}

/// Builds (once per distinct mask) the mask layer under `layers_dir` and returns its path.
///
/// The directory name is a hash of the mask, so concurrent daemons and running sandboxes never see a mask layer
/// change under them.
pub fn build_mask_layer(
    host_root: &Path,
    layers_dir: &Path,
    extra_hidden: &[PathBuf],
) -> Result<PathBuf> {
    let entries = plan(host_root, extra_hidden)?;
    let mut hasher = Sha256::new();
    for e in &entries {
        hasher.update(format!("{e:?}\n").as_bytes());
    }
    let digest = hex::encode(&hasher.finalize()[..8]);
    let final_dir = layers_dir.join(format!("hostmask2-{digest}"));
    if final_dir.is_dir() {
        return Ok(final_dir);
    }
    std::fs::create_dir_all(layers_dir).map_err(Error::io("create", layers_dir))?;
    let tmp = layers_dir.join(format!(".hostmask2-{digest}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(Error::io("create", &tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
        .map_err(Error::io("chmod", &tmp))?;
    for e in &entries {
        match e {
            MaskEntry::Whiteout(rel) => {
                ensure_parents(&tmp, host_root, rel)?;
                make_whiteout(&tmp.join(rel))?;
            }
            MaskEntry::EmptyDir(rel, mode) => {
                ensure_parents(&tmp, host_root, rel)?;
                let path = tmp.join(rel);
                std::fs::DirBuilder::new()
                    .mode(*mode)
                    .create(&path)
                    .map_err(Error::io("create", &path))?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode))
                    .map_err(Error::io("chmod", &path))?;
                if rel.components().count() == 1 {
                    make_opaque(&path)?;
                }
            }
        }
    }
    match std::fs::rename(&tmp, &final_dir) {
        Ok(()) => Ok(final_dir),
        // Another daemon built the same mask first.
        Err(_) if final_dir.is_dir() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(final_dir)
        }
        Err(e) => Err(Error::io("rename", &final_dir)(e)),
    }
}

/// Creates the parent directories of `rel` inside the layer, copying each one's mode from the host so the
/// merged view keeps the host's permissions.
fn ensure_parents(layer: &Path, host_root: &Path, rel: &Path) -> Result<()> {
    let mut cur = PathBuf::new();
    let comps: Vec<_> = rel.components().collect();
    for c in &comps[..comps.len().saturating_sub(1)] {
        cur.push(c);
        let path = layer.join(&cur);
        if path.exists() {
            continue;
        }
        let mode = std::fs::metadata(host_root.join(&cur))
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0o755);
        std::fs::DirBuilder::new()
            .mode(mode)
            .create(&path)
            .map_err(Error::io("create", &path))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .map_err(Error::io("chmod", &path))?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::whiteout::is_whiteout;

    #[test]
    fn mask_hides_everything_but_system_dirs() {
        let host = tempfile::tempdir().unwrap();
        for d in [
            "usr",
            "etc/ssh",
            "home/alice",
            "work",
            "var/lib/deltabox",
            "opt/state/x",
        ] {
            std::fs::create_dir_all(host.path().join(d)).unwrap();
        }
        for f in [
            "etc/shadow",
            "etc/ssh/ssh_host_ed25519_key",
            "etc/ssh/ssh_config",
            "secret.txt",
        ] {
            std::fs::write(host.path().join(f), "x").unwrap();
        }
        let layers = tempfile::tempdir().unwrap();
        let hidden = [PathBuf::from("/opt/state")];
        let mask = build_mask_layer(host.path(), layers.path(), &hidden).unwrap();
        assert!(is_whiteout(&mask.join("work")));
        assert!(is_whiteout(&mask.join("secret.txt")));
        assert!(is_whiteout(&mask.join("etc/shadow")));
        assert!(is_whiteout(&mask.join("etc/ssh/ssh_host_ed25519_key")));
        assert!(!mask.join("etc/ssh/ssh_config").exists());
        assert!(is_whiteout(&mask.join("opt/state")));
        assert!(
            mask.join("home").is_dir()
                && std::fs::read_dir(mask.join("home"))
                    .unwrap()
                    .next()
                    .is_none()
        );
        assert_eq!(
            rustix::fs::getxattr(
                mask.join("home").as_path(),
                crate::whiteout::OPAQUE_XATTR,
                &mut [0u8; 4]
            )
            .unwrap(),
            1
        );
        assert!(!mask.join("usr").exists());
        // Same host, same mask: reused, not rebuilt.
        assert_eq!(
            build_mask_layer(host.path(), layers.path(), &hidden).unwrap(),
            mask
        );
    }
}
