//! What a process holds, read from `/proc`: the facts DeltaFS needs to re-point it onto a new generation.

use std::io;
use std::path::{Path, PathBuf};

/// Mount id of the mount `path` resolves to (`statx` `STATX_MNT_ID`; follows `/proc` magic links such as
/// `/proc/PID/cwd`, so it names the mount a process's cwd or root is on).
pub fn mnt_id(path: &Path) -> io::Result<u64> {
    use rustix::fs::{statx, AtFlags, StatxFlags};
    let st = statx(rustix::fs::CWD, path, AtFlags::empty(), StatxFlags::MNT_ID)?;
    Ok(st.stx_mnt_id)
}

/// The amount a `/proc` summary (`status`, `smaps_rollup`) gives in kB on the line starting with `key` (such as
/// `"Pss:"`), in bytes; 0 when the line is missing.
pub fn kb_field(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// The last number on the line starting with `key` of `/proc/PID/status` text: for `NSpid:`, `NSpgid:` and
/// `NSsid:`, the id in the innermost pid namespace.
pub fn last_field(text: &str, key: &str) -> Option<i32> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

/// A process's pid in its own (innermost) pid namespace.
pub fn ns_pid(pid: i32) -> Option<i32> {
    last_field(
        &std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?,
        "NSpid:",
    )
}

/// A process's parent (its pid as we see it), from `/proc/<pid>/stat`.
pub fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A process's effective capabilities (`CapEff:`, a bit per `CAP_*` number), in its own user namespace.
pub fn effective_caps(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let v = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(v.trim(), 16).ok()
}

/// A process's pid in every pid namespace from ours inwards (`NSpid:`).
pub fn ns_pids(pid: i32) -> Option<Vec<i32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    line.split_whitespace().map(|v| v.parse().ok()).collect()
}

/// Thread ids of a process.
pub fn threads(pid: i32) -> io::Result<Vec<i32>> {
    let mut out: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    out.sort_unstable();
    Ok(out)
}

/// An open descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenFile {
    /// Descriptor number.
    pub fd: i32,
    /// Link target as the kernel prints it (a path, or `pipe:[…]`, `socket:[…]` …), without ` (deleted)`.
    pub target: PathBuf,
    /// The file was unlinked while open.
    pub deleted: bool,
    /// `open` flags (from `fdinfo`, including `O_CLOEXEC` and `O_APPEND`).
    pub flags: u32,
    /// File offset.
    pub pos: u64,
    /// Mount the file is on.
    pub mnt_id: u64,
}

/// Every descriptor of a process. Descriptors closed while we read are skipped.
pub fn open_files(pid: i32) -> io::Result<Vec<OpenFile>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))?.flatten() {
        let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(link) = std::fs::read_link(e.path()) else {
            continue;
        };
        let Ok(info) = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")) else {
            continue;
        };
        let field = |k: &str| info.lines().find_map(|l| l.strip_prefix(k)).map(str::trim);
        let (Some(pos), Some(flags), Some(mnt)) =
            (field("pos:"), field("flags:"), field("mnt_id:"))
        else {
            continue;
        };
        let link_str = link.to_string_lossy();
        let (target, deleted) = match link_str.strip_suffix(" (deleted)") {
            Some(t) => (PathBuf::from(t), true),
            None => (link.clone(), false),
        };
        out.push(OpenFile {
            fd,
            target,
            deleted,
            flags: u32::from_str_radix(flags, 8).unwrap_or(0),
            pos: pos.parse().unwrap_or(0),
            mnt_id: mnt.parse().unwrap_or(0),
        });
    }
    out.sort_by_key(|f| f.fd);
    Ok(out)
}

/// A shared, writable file mapping: writes through it reach the file directly, so it cannot be re-pointed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedWritableMapping {
    /// `start-end` as in `/proc/PID/maps`.
    pub range: String,
    /// The mapped file.
    pub path: String,
    /// Mount the file is on.
    pub mnt_id: u64,
}

/// Shared writable file mappings of a process.
pub fn shared_writable_mappings(pid: i32) -> io::Result<Vec<SharedWritableMapping>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mut out = Vec::new();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            continue;
        };
        let path: Vec<&str> = f.skip(3).collect();
        let path = path.join(" ");
        if !(perms.contains('w') && perms.ends_with('s') && path.starts_with('/')) {
            continue;
        }
        let Ok(mnt_id) = mnt_id(Path::new(&format!("/proc/{pid}/map_files/{range}"))) else {
            continue;
        };
        out.push(SharedWritableMapping {
            range: range.to_string(),
            path,
            mnt_id,
        });
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn reads_own_descriptors_and_mappings() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .unwrap();
        std::io::Write::write_all(&mut &f, b"hello").unwrap();
        let gone = dir.path().join("gone");
        let g = std::fs::File::create(&gone).unwrap();
        std::fs::remove_file(&gone).unwrap();
        let me = std::process::id() as i32;
        let files = open_files(me).unwrap();
        let ff = files.iter().find(|x| x.fd == f.as_raw_fd()).unwrap();
        assert_eq!(ff.target, p);
        assert_ne!(ff.flags & libc::O_APPEND as u32, 0);
        assert_eq!(ff.pos, 5);
        assert_eq!(ff.mnt_id, mnt_id(&p).unwrap());
        let gg = files.iter().find(|x| x.fd == g.as_raw_fd()).unwrap();
        assert!(gg.deleted);
        assert_eq!(gg.target, gone);
        assert!(threads(me).unwrap().contains(&me));
        // A shared writable mapping of a file shows up; a private one does not.
        f.set_len(4096).unwrap();
        let rw = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        // SAFETY: mapping a 4 KiB file we own; unmapped below.
        let (shared, private) = unsafe {
            (
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    rw.as_raw_fd(),
                    0,
                ),
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE,
                    rw.as_raw_fd(),
                    0,
                ),
            )
        };
        let maps = shared_writable_mappings(me).unwrap();
        let ours: Vec<_> = maps
            .iter()
            .filter(|m| m.path == p.to_string_lossy())
            .collect();
        assert_eq!(ours.len(), 1);
        assert!(ours[0]
            .range
            .starts_with(&format!("{:x}-", shared as usize)));
        // SAFETY: unmapping what we mapped above.
        unsafe {
            libc::munmap(shared, 4096);
            libc::munmap(private, 4096);
        }
    }
}
