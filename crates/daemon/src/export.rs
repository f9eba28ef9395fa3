//! Export and import of one checkpoint: its layer chain (files with their modes, owners, times, extended
//! attributes and overlayfs whiteouts), its process images, and what is needed to start a sandbox on it, as one
//! gzip-compressed tar. Content-addressed: every regular file and every 1 MiB of a process's pages is stored
//! once, under its SHA-256, however many times it occurs (identical files across layers, repeated memory).
//!
//! The archive holds `manifest.json` first, then `blobs/<sha256>`. An import checks each blob's hash as it reads
//! it: a corrupt or truncated archive is refused before anything is recorded.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::Digest;

/// Archive format version.
pub const VERSION: u32 = 1;
/// Chunk size for process pages.
const CHUNK: usize = 1 << 20;

/// What an archive describes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    /// Kernel and CPU it was taken on (process images need the same).
    pub host: deltabox_cr::image::HostKind,
    /// The sandbox settings a new sandbox gets.
    pub sandbox: crate::api::SandboxInfo,
    /// The checkpoint's id where it was exported.
    pub checkpoint: String,
    /// Its creation time.
    pub created_at: i64,
    /// Base image layers (paths on the host: they must exist where it is imported).
    pub base: Vec<PathBuf>,
    /// The layer chain, topmost first: each layer's entries.
    pub layers: Vec<Vec<Entry>>,
    /// Process images: files relative to the images directory, with their chunks.
    pub images: Vec<ImageFile>,
    /// Bytes of all blobs.
    pub blob_bytes: u64,
}

/// One file of a checkpoint's process images.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageFile {
    pub path: String,
    pub len: u64,
    pub chunks: Vec<String>,
}

/// One entry of a layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    /// Relative path.
    pub path: String,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_ns: i64,
    /// Extended attributes (names, base64 values): overlayfs's opaque markers and redirects among them.
    pub xattrs: Vec<(String, String)>,
}

/// What an entry is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Kind {
    Dir,
    File {
        blob: String,
        len: u64,
    },
    Symlink {
        target: String,
    },
    /// A character device (overlayfs whiteouts are 0:0).
    Char {
        rdev: u64,
    },
    Fifo,
}

fn sha(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}

fn xattrs_of(path: &Path) -> Vec<(String, String)> {
    let mut names = vec![0u8; 4096];
    let n = match rustix::fs::llistxattr(path, &mut names) {
        Ok(n) => n,
        Err(_) => return Vec::new(),
    };
    let b64 = base64::engine::general_purpose::STANDARD;
    names[..n]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .filter_map(|name| {
            let name = std::str::from_utf8(name).ok()?.to_string();
            let mut value = vec![0u8; 65536];
            let len = rustix::fs::lgetxattr(path, name.as_str(), &mut value).ok()?;
            Some((name, b64.encode(&value[..len])))
        })
        .collect()
}

/// Blobs found while planning an export: hash → where to read it (path, offset, len).
type Sources = Vec<(String, PathBuf, u64, usize)>;

/// Lists layer `dir` (its `diff/`), hashing its files.
fn plan_layer(
    dir: &Path,
    sources: &mut Sources,
    seen: &mut HashSet<String>,
) -> Result<Vec<Entry>, String> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let full = dir.join(&rel);
        let md =
            std::fs::symlink_metadata(&full).map_err(|e| format!("{}: {e}", full.display()))?;
        let ft = md.file_type();
        use std::os::unix::fs::FileTypeExt;
        let kind = if ft.is_dir() {
            let mut names: Vec<_> = std::fs::read_dir(&full)
                .map_err(|e| format!("{}: {e}", full.display()))?
                .flatten()
                .map(|e| rel.join(e.file_name()))
                .collect();
            names.sort();
            stack.extend(names.into_iter().rev());
            Kind::Dir
        } else if ft.is_file() {
            let data = std::fs::read(&full).map_err(|e| format!("{}: {e}", full.display()))?;
            let h = sha(&data);
            if seen.insert(h.clone()) {
                sources.push((h.clone(), full.clone(), 0, data.len()));
            }
            Kind::File {
                blob: h,
                len: data.len() as u64,
            }
        } else if ft.is_symlink() {
            Kind::Symlink {
                target: std::fs::read_link(&full)
                    .map_err(|e| format!("{}: {e}", full.display()))?
                    .to_string_lossy()
                    .into_owned(),
            }
        } else if ft.is_char_device() {
            Kind::Char { rdev: md.rdev() }
        } else if ft.is_fifo() {
            Kind::Fifo
        } else {
            return Err(format!(
                "{}: sockets and block devices are not exported",
                full.display()
            ));
        };
        out.push(Entry {
            path: rel.to_string_lossy().into_owned(),
            kind,
            mode: md.permissions().mode(),
            uid: md.uid(),
            gid: md.gid(),
            mtime: md.mtime(),
            mtime_ns: md.mtime_nsec(),
            xattrs: xattrs_of(&full),
        });
    }
    Ok(out)
}

/// What an export wrote.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExportReport {
    /// Bytes of content before deduplication.
    pub content_bytes: u64,
    /// Bytes of unique content (blobs).
    pub blob_bytes: u64,
    /// Size of the archive.
    pub archive_bytes: u64,
}

/// Writes an archive of `manifest` (its `layers` and `images` are filled here from `layer_dirs` and
/// `images_dir`) to `out` (under a temporary name, renamed when complete). `progress(done, total)` in bytes.
pub fn export(
    mut manifest: Manifest,
    layer_dirs: &[PathBuf],
    images_dir: Option<&Path>,
    out: &Path,
    mut progress: impl FnMut(u64, u64),
) -> Result<ExportReport, String> {
    let mut sources = Sources::new();
    let mut seen = HashSet::new();
    let mut report = ExportReport::default();
    manifest.layers.clear();
    for dir in layer_dirs {
        let entries = plan_layer(dir, &mut sources, &mut seen)?;
        report.content_bytes += entries
            .iter()
            .map(|e| match e.kind {
                Kind::File { len, .. } => len,
                _ => 0,
            })
            .sum::<u64>();
        manifest.layers.push(entries);
    }
    manifest.images.clear();
    if let Some(dir) = images_dir {
        let mut files = Vec::new();
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let full = dir.join(&rel);
            if full.is_dir() {
                for e in std::fs::read_dir(&full)
                    .map_err(|e| e.to_string())?
                    .flatten()
                {
                    stack.push(rel.join(e.file_name()));
                }
            } else {
                files.push(rel);
            }
        }
        files.sort();
        for rel in files {
            let full = dir.join(&rel);
            let mut f =
                std::fs::File::open(&full).map_err(|e| format!("{}: {e}", full.display()))?;
            let len = f.metadata().map_err(|e| e.to_string())?.len();
            let mut chunks = Vec::new();
            let mut buf = vec![0u8; CHUNK];
            let mut off = 0u64;
            loop {
                let n = read_full(&mut f, &mut buf).map_err(|e| e.to_string())?;
                if n == 0 {
                    break;
                }
                let h = sha(&buf[..n]);
                if seen.insert(h.clone()) {
                    sources.push((h.clone(), full.clone(), off, n));
                }
                chunks.push(h);
                off += n as u64;
            }
            report.content_bytes += len;
            manifest.images.push(ImageFile {
                path: rel.to_string_lossy().into_owned(),
                len,
                chunks,
            });
        }
    }
    manifest.blob_bytes = sources.iter().map(|s| s.3 as u64).sum();
    report.blob_bytes = manifest.blob_bytes;
    let tmp = out.with_extension("partial");
    let result = (|| {
        let file = std::fs::File::create(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
        let mut tar = tar::Builder::new(gz);
        let add = |tar: &mut tar::Builder<_>, name: &str, data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            tar.append_data(&mut h, name, data)
                .map_err(|e| format!("write archive: {e}"))
        };
        let text = serde_json::to_vec(&manifest).map_err(|e| e.to_string())?;
        add(&mut tar, "manifest.json", &text)?;
        let total = manifest.blob_bytes;
        let mut done = 0u64;
        for (h, path, off, len) in &sources {
            let mut f =
                std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let mut data = vec![0u8; *len];
            use std::os::unix::fs::FileExt;
            f.read_exact_at(&mut data, *off)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let _ = &mut f;
            if sha(&data) != *h {
                return Err(format!("{} changed while it was exported", path.display()));
            }
            add(&mut tar, &format!("blobs/{h}"), &data)?;
            done += *len as u64;
            progress(done, total);
        }
        let gz = tar
            .into_inner()
            .map_err(|e| format!("write archive: {e}"))?;
        let file = gz.finish().map_err(|e| format!("write archive: {e}"))?;
        file.sync_all().map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, out).map_err(|e| format!("rename archive into place: {e}"))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    report.archive_bytes = std::fs::metadata(out).map(|m| m.len()).unwrap_or(0);
    Ok(report)
}

fn read_full(f: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Reads an archive: its manifest, and every blob into `blob_dir` (each one's hash checked). Refuses a corrupt
/// or truncated archive, a blob the manifest does not know, and a missing one.
pub fn unpack(
    archive: &Path,
    blob_dir: &Path,
    mut progress: impl FnMut(u64, u64),
) -> Result<Manifest, String> {
    let file = std::fs::File::open(archive).map_err(|e| format!("{}: {e}", archive.display()))?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let bad = |what: String| {
        format!(
            "{}: corrupt or truncated archive: {what}",
            archive.display()
        )
    };
    let mut entries = tar.entries().map_err(|e| bad(e.to_string()))?;
    let mut first = entries
        .next()
        .ok_or_else(|| bad("empty".into()))?
        .map_err(|e| bad(e.to_string()))?;
    if first.path().map_err(|e| bad(e.to_string()))?.as_ref() != Path::new("manifest.json") {
        return Err(bad("no manifest first".into()));
    }
    let mut text = Vec::new();
    first
        .read_to_end(&mut text)
        .map_err(|e| bad(e.to_string()))?;
    let manifest: Manifest =
        serde_json::from_slice(&text).map_err(|e| bad(format!("manifest: {e}")))?;
    if manifest.version != VERSION {
        return Err(format!(
            "archive format {} (this build reads {VERSION})",
            manifest.version
        ));
    }
    let mut wanted: HashSet<String> = HashSet::new();
    for l in &manifest.layers {
        for e in l {
            if let Kind::File { blob, .. } = &e.kind {
                wanted.insert(blob.clone());
            }
        }
    }
    for f in &manifest.images {
        wanted.extend(f.chunks.iter().cloned());
    }
    std::fs::create_dir_all(blob_dir).map_err(|e| e.to_string())?;
    let mut done = 0u64;
    for e in entries {
        let mut e = e.map_err(|e| bad(e.to_string()))?;
        let path = e.path().map_err(|e| bad(e.to_string()))?.into_owned();
        let name = path
            .strip_prefix("blobs")
            .ok()
            .and_then(|p| p.to_str())
            .map(str::to_string)
            .ok_or_else(|| bad(format!("unexpected entry {}", path.display())))?;
        if !wanted.contains(&name) {
            return Err(bad(format!("unexpected blob {name}")));
        }
        let mut data = Vec::new();
        e.read_to_end(&mut data).map_err(|e| bad(e.to_string()))?;
        if sha(&data) != name {
            return Err(bad(format!("blob {name} does not match its hash")));
        }
        std::fs::write(blob_dir.join(&name), &data).map_err(|e| e.to_string())?;
        done += data.len() as u64;
        progress(done, manifest.blob_bytes);
        wanted.remove(&name);
    }
    if !wanted.is_empty() {
        return Err(bad(format!("{} blobs missing", wanted.len())));
    }
    Ok(manifest)
}

/// Recreates a layer's entries in `dest` (an empty `diff/` directory) from the blobs.
pub fn build_layer(entries: &[Entry], blob_dir: &Path, dest: &Path) -> Result<(), String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let err = |p: &Path, e: &dyn std::fmt::Display| format!("{}: {e}", p.display());
    let mut dirs = Vec::new();
    for e in entries {
        let rel = Path::new(&e.path);
        if rel.is_absolute()
            || rel
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            return Err(format!("unsafe path {:?} in archive", e.path));
        }
        let p = dest.join(rel);
        match &e.kind {
            Kind::Dir => {
                std::fs::create_dir_all(&p).map_err(|x| err(&p, &x))?;
                dirs.push((p.clone(), e));
            }
            Kind::File { blob, .. } => {
                std::fs::copy(blob_dir.join(blob), &p).map_err(|x| err(&p, &x))?;
            }
            Kind::Symlink { target } => {
                std::os::unix::fs::symlink(target, &p).map_err(|x| err(&p, &x))?;
            }
            Kind::Char { rdev } => {
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    &p,
                    rustix::fs::FileType::CharacterDevice,
                    rustix::fs::Mode::from_raw_mode(e.mode & 0o7777),
                    *rdev,
                )
                .map_err(|x| err(&p, &x))?;
            }
            Kind::Fifo => {
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    &p,
                    rustix::fs::FileType::Fifo,
                    rustix::fs::Mode::from_raw_mode(e.mode & 0o7777),
                    0,
                )
                .map_err(|x| err(&p, &x))?;
            }
        }
        for (name, value) in &e.xattrs {
            let v = b64.decode(value).map_err(|x| err(&p, &x))?;
            rustix::fs::lsetxattr(&p, name.as_str(), &v, rustix::fs::XattrFlags::empty())
                .map_err(|x| err(&p, &x))?;
        }
        rustix::fs::chownat(
            rustix::fs::CWD,
            &p,
            Some(rustix::fs::Uid::from_raw(e.uid)),
            Some(rustix::fs::Gid::from_raw(e.gid)),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|x| err(&p, &x))?;
        if !matches!(e.kind, Kind::Symlink { .. }) {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(e.mode & 0o7777))
                .map_err(|x| err(&p, &x))?;
            set_mtime(&p, e)?;
        }
    }
    // Directories' times last: creating their entries changed them.
    for (p, e) in dirs.into_iter().rev() {
        set_mtime(&p, e)?;
    }
    Ok(())
}

fn set_mtime(p: &Path, e: &Entry) -> Result<(), String> {
    let t = rustix::fs::Timespec {
        tv_sec: e.mtime,
        tv_nsec: e.mtime_ns as _,
    };
    rustix::fs::utimensat(
        rustix::fs::CWD,
        p,
        &rustix::fs::Timestamps {
            last_access: t,
            last_modification: t,
        },
        rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(|x| format!("{}: {x}", p.display()))
}

/// Recreates process images in `dest` (which must not exist) from the blobs: written under a temporary name and
/// renamed, like images written by the daemon.
pub fn build_images(files: &[ImageFile], blob_dir: &Path, dest: &Path) -> Result<(), String> {
    if files.is_empty() {
        return Ok(());
    }
    let tmp = dest.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| {
        for f in files {
            let rel = Path::new(&f.path);
            if rel.is_absolute()
                || rel
                    .components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(format!("unsafe path {:?} in archive", f.path));
            }
            let p = tmp.join(rel);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
            }
            let mut out = std::fs::File::create(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            for c in &f.chunks {
                let data = std::fs::read(blob_dir.join(c)).map_err(|e| e.to_string())?;
                out.write_all(&data).map_err(|e| e.to_string())?;
            }
            out.sync_all().map_err(|e| e.to_string())?;
            if out.metadata().map_err(|e| e.to_string())?.len() != f.len {
                return Err(format!("{}: wrong length", f.path));
            }
        }
        std::fs::rename(&tmp, dest).map_err(|e| e.to_string())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}
