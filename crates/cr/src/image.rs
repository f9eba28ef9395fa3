//! Durable process images: what a template is, written down so that it can be rebuilt after the template is
//! gone (evicted, killed, or lost with the daemon).
//!
//! An image is taken from a template — a process that never runs — so it needs no freezing and can be written
//! in the background. It records the address space (every mapping, and the content of the pages that are not
//! simply a file's: anonymous memory and copy-on-write copies of file pages), the registers and extended
//! processor state, and the per-process state a `fork` would have copied: signal dispositions, mask and
//! alternate stack, `rseq`, robust futex list, `clear_child_tid`, working directory, umask, resource limits,
//! name, and the descriptors. [`crate::restore`] rebuilds it inside another process by injected system calls.
//!
//! Refused (an error naming the process and why), rather than imaged wrongly: several threads, shared
//! anonymous or System V memory, memfd mappings, mappings of deleted files.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use deltabox_sys::inject::Tracee;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Page size the images are written in.
pub const PAGE: u64 = 4096;

/// Format version, bumped on any incompatible change.
pub const VERSION: u32 = 1;

/// One process, as [`dump`] found it. Its memory content lives in a separate pages file; each
/// [`PageRun`] says where.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessImage {
    /// [`VERSION`].
    pub version: u32,
    /// Kernel release and CPU features it was taken on: registers and the vdso are only valid on the same.
    pub host: HostKind,
    /// Its name (`comm`).
    pub comm: String,
    /// General registers it resumes with.
    pub regs: Regs,
    /// Extended processor state (`NT_X86_XSTATE`), hex.
    pub xstate: String,
    /// Every mapping, in address order.
    pub vmas: Vec<Vma>,
    /// Where the kernel's view of the address space lies (`prctl(PR_SET_MM_MAP)`).
    pub mm: MmLayout,
    /// Auxiliary vector.
    pub auxv: Vec<u64>,
    /// Its executable (a path in its root).
    pub exe: PathBuf,
    /// Signals with a disposition other than the default.
    pub sigactions: Vec<SigAction>,
    /// Blocked signals.
    pub sigmask: u64,
    /// Alternate signal stack, if enabled: (sp, flags, size).
    pub sigaltstack: Option<(u64, i32, u64)>,
    /// `rseq` registration: (area, size, signature).
    pub rseq: Option<(u64, u32, u32)>,
    /// Robust futex list: (head, length).
    pub robust_list: (u64, u64),
    /// `clear_child_tid` (`set_tid_address`).
    pub tid_address: u64,
    /// Working directory (a path in its root).
    pub cwd: PathBuf,
    /// File mode creation mask.
    pub umask: u32,
    /// Real, effective, saved uid and gid: a restore refuses to change credentials.
    pub uids: [u32; 3],
    pub gids: [u32; 3],
    /// Capability sets: inheritable, permitted, effective, bounding, ambient.
    pub caps: [u64; 5],
    /// Supplementary groups.
    #[serde(default)]
    pub groups: Vec<u32>,
    /// `prctl(PR_GET_DUMPABLE)` (a change of identity resets it; it decides who may look at the process).
    #[serde(default)]
    pub dumpable: u64,
    /// Resource limits: (resource, soft, hard).
    pub rlimits: Vec<(u32, u64, u64)>,
    /// Descriptors.
    pub fds: Vec<FdImage>,
    /// Bytes of memory content in the pages file.
    pub page_bytes: u64,
    /// For a template's image: who its copies must be.
    pub identity: Option<crate::template::Identity>,
}

/// The host an image can be restored on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostKind {
    /// `uname -r`.
    pub kernel: String,
    /// The CPU's feature flags (`/proc/cpuinfo`), which decide the extended state's layout.
    pub cpu_flags: String,
}

impl HostKind {
    /// This machine.
    pub fn current() -> HostKind {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let flags = cpu
            .lines()
            .find_map(|l| l.strip_prefix("flags"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, f)| f.trim().to_string())
            .unwrap_or_default();
        HostKind {
            kernel: kernel.trim().to_string(),
            cpu_flags: flags,
        }
    }
}

/// `user_regs_struct`, as its 27 words.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Regs(pub Vec<u64>);

const REG_WORDS: usize = std::mem::size_of::<libc::user_regs_struct>() / 8;

impl Regs {
    fn from_raw(r: &libc::user_regs_struct) -> Regs {
        // SAFETY: user_regs_struct is REG_WORDS plain u64s (repr(C)); reading it as such is sound.
        let words = unsafe {
            std::slice::from_raw_parts(
                (r as *const libc::user_regs_struct).cast::<u64>(),
                REG_WORDS,
            )
        };
        Regs(words.to_vec())
    }

    /// The registers as the kernel takes them.
    pub fn to_raw(&self) -> Result<libc::user_regs_struct> {
        if self.0.len() != REG_WORDS {
            return Err(Error::Image(format!(
                "registers: {} words, expected {REG_WORDS}",
                self.0.len()
            )));
        }
        // SAFETY: all-zero is a valid user_regs_struct (plain integers).
        let mut r: libc::user_regs_struct = unsafe { std::mem::zeroed() };
        // SAFETY: as in from_raw: REG_WORDS u64s, now written.
        let words = unsafe {
            std::slice::from_raw_parts_mut(
                (&mut r as *mut libc::user_regs_struct).cast::<u64>(),
                REG_WORDS,
            )
        };
        words.copy_from_slice(&self.0);
        Ok(r)
    }
}

/// One mapping.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    /// `PROT_*` bits.
    pub prot: u32,
    /// `MAP_SHARED` (else private).
    pub shared: bool,
    pub kind: VmaKind,
    /// Memory content, for anonymous pages (and copied-on-write pages of private file mappings).
    pub pages: Vec<PageRun>,
}

/// What backs a mapping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmaKind {
    /// Private anonymous memory (also `[heap]`, and anonymous mappings a process named).
    Anon,
    /// The main thread's stack (grows down).
    Stack,
    /// A file, from `offset`, with the size and modification time it had (a restore refuses a changed file).
    File {
        path: PathBuf,
        offset: u64,
        size: u64,
        mtime_ns: i128,
    },
    /// A kernel-provided mapping (`[vdso]`, `[vvar]` …), moved into place on restore.
    Special(String),
}

/// Consecutive pages of a mapping stored in the pages file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PageRun {
    /// First page's address.
    pub addr: u64,
    /// Number of pages.
    pub pages: u64,
    /// Where they start in the pages file.
    pub offset: u64,
}

/// Fields of `struct prctl_mm_map`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MmLayout {
    pub start_code: u64,
    pub end_code: u64,
    pub start_data: u64,
    pub end_data: u64,
    pub start_brk: u64,
    pub brk: u64,
    pub start_stack: u64,
    pub arg_start: u64,
    pub arg_end: u64,
    pub env_start: u64,
    pub env_end: u64,
}

/// A signal's disposition (`struct kernel_sigaction`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SigAction {
    pub sig: u32,
    pub handler: u64,
    pub flags: u64,
    pub restorer: u64,
    pub mask: u64,
}

/// A descriptor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FdImage {
    /// A file or directory reopened by path, with its `open` flags and offset.
    Path {
        fd: i32,
        path: PathBuf,
        flags: u32,
        pos: u64,
    },
    /// Anything else (pipe, socket, event descriptors …): the restorer must be given a replacement.
    Other { fd: i32, what: String },
}

impl FdImage {
    /// Its number.
    pub fn fd(&self) -> i32 {
        match self {
            FdImage::Path { fd, .. } | FdImage::Other { fd, .. } => *fd,
        }
    }
}

/// A line of `/proc/PID/maps`.
struct MapsLine {
    start: u64,
    end: u64,
    perms: String,
    offset: u64,
    inode: u64,
    path: String,
}

fn parse_maps(text: &str) -> Vec<MapsLine> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut f = line.splitn(6, ' ');
        let (Some(range), Some(perms), Some(off), Some(_dev), Some(inode)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let path = f.next().unwrap_or("").trim_start().to_string();
        let Some((s, e)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end), Ok(offset), Ok(inode)) = (
            u64::from_str_radix(s, 16),
            u64::from_str_radix(e, 16),
            u64::from_str_radix(off, 16),
            inode.parse::<u64>(),
        ) else {
            continue;
        };
        out.push(MapsLine {
            start,
            end,
            perms: perms.to_string(),
            offset,
            inode,
            path,
        });
    }
    out
}

/// Special (kernel-provided) mappings of a process: name → (start, end).
pub(crate) fn specials(pid: i32) -> std::io::Result<Vec<(String, u64, u64)>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    Ok(parse_maps(&maps)
        .into_iter()
        .filter(|m| m.path.starts_with('[') && is_special(&m.path))
        .map(|m| (m.path, m.start, m.end))
        .collect())
}

fn is_special(name: &str) -> bool {
    name == "[vdso]" || name.starts_with("[vvar")
}

/// Content of one line of `/proc/PID/status`.
fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
}

/// Real, effective and saved ids from a `Uid:`/`Gid:` line of `/proc/PID/status`.
/// An id that cannot be read is `u32::MAX` (nobody's: never mistaken for root).
pub(crate) fn ids(status: &str, key: &str) -> [u32; 3] {
    let mut v = status_field(status, key)
        .unwrap_or("")
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(u32::MAX));
    [
        v.next().unwrap_or(u32::MAX),
        v.next().unwrap_or(u32::MAX),
        v.next().unwrap_or(u32::MAX),
    ]
}

/// Capability sets from `/proc/PID/status`: inheritable, permitted, effective, bounding, ambient.
pub(crate) fn cap_sets(status: &str) -> [u64; 5] {
    let get = |k: &str| {
        status_field(status, k)
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .unwrap_or(0)
    };
    [
        get("CapInh:"),
        get("CapPrm:"),
        get("CapEff:"),
        get("CapBnd:"),
        get("CapAmb:"),
    ]
}

/// Pagemap bits.
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;

/// The process's memory, for [`ImageDir::store`]: the file stays bound to this process (a reused pid is another
/// process, which it does not reach), and reads fail once the process is gone.
pub fn open_mem(pid: i32) -> Result<std::fs::File> {
    std::fs::File::open(format!("/proc/{pid}/mem"))
        .map_err(|e| Error::Image(format!("process {pid}: open mem: {e}")))
}

/// Most bytes read from a process's memory at once: the kernel holds the process's mmap lock for a whole read,
/// and a rollback's fork of the same template waits for it (64 MiB reads made a 100 MB rollback take 15 ms
/// while its images were being written).
const READ_CHUNK: u64 = 1 << 20;

/// What writing an image's pages cost on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagesWritten {
    /// Bytes of memory content in the image.
    pub bytes: u64,
    /// Of those, bytes equal to the base image's at the same address, shared with it (reflink): no new space.
    pub shared: u64,
    /// Of the shared bytes, those known unchanged by their frames ([`same_frames`]): neither read nor compared.
    pub known_unchanged: u64,
}

/// A base image to deduplicate against: its description and its pages.
pub struct Base<'a> {
    pub image: &'a ProcessImage,
    pub pages: &'a std::fs::File,
    /// Address ranges known to hold the same bytes as the base at the same address (see [`same_frames`]):
    /// shared without reading or comparing them. Sorted.
    pub unchanged: &'a [(u64, u64)],
}

/// Address ranges among `runs` (address, bytes) where processes `a` and `b` map the very same physical pages —
/// present in both with the same frame number — so their bytes are equal without reading them. A template forked
/// from a process that was forked from the previous checkpoint's template shares every page nobody wrote since:
/// this is the checkpoint's *unchanged* memory, known from two page-table reads instead of a byte comparison.
/// Frame numbers need `CAP_SYS_ADMIN`; without them nothing is reported (everything gets compared).
pub fn same_frames(a: i32, b: i32, runs: &[(u64, u64)]) -> std::io::Result<Vec<(u64, u64)>> {
    const PFN: u64 = (1 << 55) - 1;
    const CHUNK: u64 = 4096;
    let pa = std::fs::File::open(format!("/proc/{a}/pagemap"))?;
    let pb = std::fs::File::open(format!("/proc/{b}/pagemap"))?;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let (mut ba, mut bb) = (Vec::new(), Vec::new());
    for &(start, len) in runs {
        let mut page = start / PAGE;
        let end = (start + len).div_ceil(PAGE);
        while page < end {
            let n = (end - page).min(CHUNK) as usize;
            ba.resize(n * 8, 0);
            bb.resize(n * 8, 0);
            pa.read_exact_at(&mut ba, page * 8)?;
            pb.read_exact_at(&mut bb, page * 8)?;
            for i in 0..n {
                let word = |b: &[u8]| {
                    u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or_default())
                };
                let (ea, eb) = (word(&ba), word(&bb));
                let same = ea >> 63 == 1 && eb >> 63 == 1 && ea & PFN != 0 && ea & PFN == eb & PFN;
                if same {
                    let addr = (page + i as u64) * PAGE;
                    match out.last_mut() {
                        Some(last) if last.1 == addr => last.1 = addr + PAGE,
                        _ => out.push((addr, addr + PAGE)),
                    }
                }
            }
            page += n as u64;
        }
    }
    Ok(out)
}

fn covered(ranges: &[(u64, u64)], start: u64, end: u64) -> bool {
    let i = ranges.partition_point(|r| r.1 <= start);
    ranges.get(i).is_some_and(|r| r.0 <= start && r.1 >= end)
}

impl Base<'_> {
    /// Offset in the base's pages file of the page at `addr`, if the base stored it.
    fn offset_of(&self, runs: &[&PageRun], addr: u64) -> Option<u64> {
        let i = runs.partition_point(|r| r.addr + r.pages * PAGE <= addr);
        let r = runs.get(i)?;
        (r.addr <= addr).then(|| r.offset + (addr - r.addr))
    }
}

/// Copies the pages `img` plans (see [`describe`]) from `mem` (see [`open_mem`]) into `pages`, sharing with
/// `base` every page whose content equals the base's page at the same address
/// (compared byte for byte, not by hash): the file is complete on its own, but only changed pages take new
/// space. Without reflink support (or a base) everything is written.
pub fn write_pages_dedup(
    img: &ProcessImage,
    mem: &std::fs::File,
    pages: &std::fs::File,
    base: Option<Base<'_>>,
) -> Result<PagesWritten> {
    let mut runs: Vec<&PageRun> = base
        .as_ref()
        .map(|b| b.image.vmas.iter().flat_map(|v| &v.pages).collect())
        .unwrap_or_default();
    runs.sort_by_key(|r| r.addr);
    let mut out = PagesWritten::default();
    let mut reflink = base.is_some();
    let mut buf = Vec::new();
    let mut theirs = vec![0u8; PAGE as usize];
    let mut at = 0u64;
    let werr = |e: std::io::Error| Error::Image(format!("write pages: {e}"));
    for run in img.vmas.iter().flat_map(|v| &v.pages) {
        if run.offset != at {
            return Err(Error::Image(format!(
                "page runs out of order at {:#x}",
                run.addr
            )));
        }
        let total = run.pages * PAGE;
        let mut done = 0;
        while done < total {
            let len = (total - done).min(READ_CHUNK);
            buf.resize(len as usize, 0);
            let addr0 = run.addr + done;
            // Memory known unchanged since the base (same frames) is neither read nor compared.
            let unchanged = |a: u64| {
                base.as_ref()
                    .is_some_and(|b| covered(b.unchanged, a, a + PAGE))
            };
            let skip_read = reflink
                && base.as_ref().is_some_and(|b| {
                    covered(b.unchanged, addr0, addr0 + len)
                        && (0..len / PAGE).all(|k| b.offset_of(&runs, addr0 + k * PAGE).is_some())
                });
            if !skip_read {
                mem.read_exact_at(&mut buf, addr0)
                    .map_err(|e| Error::Image(format!("read memory at {addr0:#x}: {e}")))?;
            }
            // Whether the page at `a` (at `i` in `buf`) holds the base's bytes at offset `o`.
            let equal = |a: u64, i: u64, o: u64, theirs: &mut [u8]| {
                unchanged(a)
                    || !skip_read
                        && base
                            .as_ref()
                            .is_some_and(|b| b.pages.read_exact_at(theirs, o).is_ok())
                        && theirs[..] == buf[i as usize..(i + PAGE) as usize]
            };
            // Split into stretches that are shared (same bytes as the base, contiguous there) or new.
            let mut i = 0u64;
            while i < len {
                let addr = addr0 + i;
                let src = base.as_ref().and_then(|b| b.offset_of(&runs, addr));
                let start = i;
                if let Some(src0) = src.filter(|o| reflink && equal(addr, i, *o, &mut theirs)) {
                    i += PAGE;
                    while i < len {
                        let a = addr0 + i;
                        match base.as_ref().and_then(|b| b.offset_of(&runs, a)) {
                            Some(o) if o == src0 + (i - start) && equal(a, i, o, &mut theirs) => {}
                            _ => break,
                        }
                        i += PAGE;
                    }
                    let n = i - start;
                    let dest = at + done + start;
                    if base.as_ref().is_some_and(|b| {
                        deltabox_sys::reflink::clone_range(pages, dest, b.pages, src0, n).is_ok()
                    }) {
                        out.shared += n;
                        if unchanged(addr) {
                            out.known_unchanged += n;
                        }
                        continue;
                    }
                    // No reflinks here after all: from now on everything is written (read first if skipped).
                    reflink = false;
                    if skip_read {
                        mem.read_exact_at(&mut buf, addr0)
                            .map_err(|e| Error::Image(format!("read memory at {addr0:#x}: {e}")))?;
                        pages.write_all_at(&buf, at + done).map_err(werr)?;
                        break;
                    }
                    pages
                        .write_all_at(&buf[start as usize..i as usize], dest)
                        .map_err(werr)?;
                } else {
                    i += PAGE;
                    while i < len {
                        let a = addr0 + i;
                        let again = reflink
                            && base
                                .as_ref()
                                .and_then(|b| b.offset_of(&runs, a))
                                .is_some_and(|o| equal(a, i, o, &mut theirs));
                        if again {
                            break;
                        }
                        i += PAGE;
                    }
                    pages
                        .write_all_at(&buf[start as usize..i as usize], at + done + start)
                        .map_err(werr)?;
                }
            }
            done += len;
        }
        at += total;
        out.bytes += total;
    }
    Ok(out)
}

/// Everything of an image but the memory content: the mappings with the page runs planned (offsets in the
/// pages file), registers and per-process state, read from the stopped process `t` (a few injected calls).
pub fn describe(t: &mut Tracee) -> Result<ProcessImage> {
    let pid = t.tgid().as_raw();
    let unsupported = |reason: String| {
        Error::Image(format!(
            "process {pid} cannot be written to a durable image: {reason}"
        ))
    };
    let io = |what: &str| {
        let what = what.to_string();
        move |e: std::io::Error| Error::Image(format!("process {pid}: {what}: {e}"))
    };
    let threads = deltabox_sys::procfs::threads(pid).map_err(io("threads"))?;
    if threads.len() != 1 {
        return Err(unsupported(format!("{} threads", threads.len())));
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(io("status"))?;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(io("maps"))?;
    let pagemap =
        std::fs::File::open(format!("/proc/{pid}/pagemap")).map_err(io("open pagemap"))?;

    let mut vmas = Vec::new();
    let mut written = 0u64;
    for m in parse_maps(&maps) {
        let prot = prot_of(&m.perms);
        let shared = m.perms.as_bytes().get(3) == Some(&b's');
        let kind = if m.path == "[vsyscall]" {
            continue;
        } else if is_special(&m.path) {
            VmaKind::Special(m.path.clone())
        } else if m.path == "[stack]" {
            VmaKind::Stack
        } else if shared
            && (m.path.is_empty()
                || m.path.starts_with("/dev/zero")
                || m.path.starts_with("/SYSV")
                || m.path.starts_with("[anon"))
        {
            return Err(unsupported(format!(
                "shared anonymous memory at {:#x} (not supported by durable images yet)",
                m.start
            )));
        } else if m.path.is_empty() || m.path == "[heap]" || m.path.starts_with("[anon:") {
            VmaKind::Anon
        } else if m.path.starts_with('/') && m.inode != 0 {
            if m.path.ends_with(" (deleted)") {
                return Err(unsupported(format!("maps a deleted file ({})", m.path)));
            }
            if m.path.starts_with("/memfd:") || m.path.starts_with("/SYSV") {
                return Err(unsupported(format!("maps {}", m.path)));
            }
            let meta =
                std::fs::metadata(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end))
                    .map_err(io(&format!("mapped file {}", m.path)))?;
            use std::os::unix::fs::MetadataExt;
            VmaKind::File {
                path: PathBuf::from(&m.path),
                offset: m.offset,
                size: meta.size(),
                mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            }
        } else {
            return Err(unsupported(format!("a mapping of kind {:?}", m.path)));
        };
        // Which pages hold content of their own.
        let mut runs = Vec::new();
        let wants_pages = !shared && !matches!(kind, VmaKind::Special(_));
        if wants_pages && prot != 0 {
            let n = ((m.end - m.start) / PAGE) as usize;
            let mut entries = vec![0u8; n * 8];
            pagemap
                .read_exact_at(&mut entries, m.start / PAGE * 8)
                .map_err(io("read pagemap"))?;
            let file_backed = matches!(kind, VmaKind::File { .. });
            let own = |i: usize| {
                let e =
                    u64::from_ne_bytes(entries[i * 8..i * 8 + 8].try_into().unwrap_or_default());
                if e & PM_SWAPPED != 0 {
                    return true;
                }
                e & PM_PRESENT != 0 && !(file_backed && e & PM_FILE != 0)
            };
            let mut i = 0;
            while i < n {
                if !own(i) {
                    i += 1;
                    continue;
                }
                let first = i;
                while i < n && own(i) {
                    i += 1;
                }
                let addr = m.start + first as u64 * PAGE;
                let len = (i - first) as u64 * PAGE;
                runs.push(PageRun {
                    addr,
                    pages: len / PAGE,
                    offset: written,
                });
                written += len;
            }
        }
        vmas.push(Vma {
            start: m.start,
            end: m.end,
            prot,
            shared,
            kind,
            pages: runs,
        });
    }

    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(io("stat"))?;
    // Fields after the command name, numbered from 3 (state) as in proc(5).
    let f: Vec<u64> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| {
            rest.split_whitespace()
                .map(|x| x.parse().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default();
    let field = |n: usize| f.get(n - 3).copied().unwrap_or(0);
    let brk = t.syscall(libc::SYS_brk, &[0])? as u64;
    let mm = MmLayout {
        start_code: field(26),
        end_code: field(27),
        start_stack: field(28),
        start_data: field(45),
        end_data: field(46),
        start_brk: field(47),
        brk,
        arg_start: field(48),
        arg_end: field(49),
        env_start: field(50),
        env_end: field(51),
    };
    let auxv_raw = std::fs::read(format!("/proc/{pid}/auxv")).map_err(io("auxv"))?;
    let auxv = auxv_raw
        .chunks_exact(8)
        .map(|c| u64::from_ne_bytes(c.try_into().unwrap_or_default()))
        .collect();

    // Signal dispositions: those caught or ignored.
    let mask_of = |key: &str| {
        status_field(&status, key)
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .unwrap_or(0)
    };
    let interesting = mask_of("SigCgt:") | mask_of("SigIgn:");
    let mut sigactions = Vec::new();
    for sig in 1..=64u32 {
        if interesting & (1 << (sig - 1)) == 0 {
            continue;
        }
        let a = t.write_scratch(&[0u8; 32])?;
        t.checked_syscall(
            "rt_sigaction (read)",
            libc::SYS_rt_sigaction,
            &[sig as u64, 0, a, 8],
        )?;
        let b = t.read_mem(a, 32)?;
        let w = |i: usize| u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or_default());
        sigactions.push(SigAction {
            sig,
            handler: w(0),
            flags: w(1),
            restorer: w(2),
            mask: w(3),
        });
    }
    let a = t.write_scratch(&[0u8; 24])?;
    t.checked_syscall("sigaltstack (read)", libc::SYS_sigaltstack, &[0, a])?;
    let b = t.read_mem(a, 24)?;
    let ss_sp = u64::from_ne_bytes(b[0..8].try_into().unwrap_or_default());
    let ss_flags = i32::from_ne_bytes(b[8..12].try_into().unwrap_or_default());
    let ss_size = u64::from_ne_bytes(b[16..24].try_into().unwrap_or_default());
    let a = t.write_scratch(&[0u8; 8])?;
    t.checked_syscall("prctl(PR_GET_TID_ADDRESS)", libc::SYS_prctl, &[40, a])?;
    let tid_address = u64::from_ne_bytes(t.read_mem(a, 8)?[..8].try_into().unwrap_or_default());
    let robust_list = robust_list_of(pid).map_err(io("get_robust_list"))?;
    // PR_GET_DUMPABLE (3).
    let dumpable = t.checked_syscall("prctl(PR_GET_DUMPABLE)", libc::SYS_prctl, &[3])? as u64;

    let mut rlimits = Vec::new();
    for res in 0..16u32 {
        let mut old = libc::rlimit64 {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: prlimit64 with a null new limit writes the old one into `old`.
        let r = unsafe { libc::prlimit64(pid, res as _, std::ptr::null(), &mut old) };
        if r == 0 {
            rlimits.push((res, old.rlim_cur, old.rlim_max));
        }
    }

    let mut fds = Vec::new();
    for f in deltabox_sys::procfs::open_files(pid).map_err(io("descriptors"))? {
        let path_like = f.target.is_absolute() && !f.deleted;
        fds.push(if path_like {
            FdImage::Path {
                fd: f.fd,
                path: f.target,
                flags: f.flags,
                pos: f.pos,
            }
        } else {
            FdImage::Other {
                fd: f.fd,
                what: f.target.display().to_string(),
            }
        });
    }

    Ok(ProcessImage {
        version: VERSION,
        host: HostKind::current(),
        comm: std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .map_err(io("comm"))?
            .trim_end()
            .to_string(),
        regs: Regs::from_raw(t.saved_regs()),
        xstate: hex::encode(t.xstate()?),
        vmas,
        mm,
        auxv,
        exe: std::fs::read_link(format!("/proc/{pid}/exe")).map_err(io("exe"))?,
        sigactions,
        sigmask: mask_of("SigBlk:"),
        sigaltstack: (ss_flags & libc::SS_DISABLE == 0).then_some((ss_sp, ss_flags, ss_size)),
        rseq: t.rseq()?.map(|r| (r.area, r.size, r.signature)),
        robust_list,
        tid_address,
        cwd: std::fs::read_link(format!("/proc/{pid}/cwd")).map_err(io("cwd"))?,
        umask: status_field(&status, "Umask:")
            .and_then(|v| u32::from_str_radix(v, 8).ok())
            .unwrap_or(0o022),
        uids: ids(&status, "Uid:"),
        gids: ids(&status, "Gid:"),
        caps: cap_sets(&status),
        dumpable,
        groups: status_field(&status, "Groups:")
            .unwrap_or("")
            .split_whitespace()
            .filter_map(|g| g.parse().ok())
            .collect(),
        rlimits,
        fds,
        page_bytes: written,
        identity: None,
    })
}

fn prot_of(perms: &str) -> u32 {
    let b = perms.as_bytes();
    let mut p = 0;
    if b.first() == Some(&b'r') {
        p |= libc::PROT_READ as u32;
    }
    if b.get(1) == Some(&b'w') {
        p |= libc::PROT_WRITE as u32;
    }
    if b.get(2) == Some(&b'x') {
        p |= libc::PROT_EXEC as u32;
    }
    p
}

/// A process's robust futex list head and length (`get_robust_list`, from outside).
fn robust_list_of(pid: i32) -> std::io::Result<(u64, u64)> {
    let mut head: u64 = 0;
    let mut len: usize = 0;
    // SAFETY: get_robust_list writes a pointer and a length into the two locations we own.
    let r = unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            pid,
            &mut head as *mut u64,
            &mut len as *mut usize,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((head, len as u64))
}

/// Syncs a directory (after a rename into it, so the rename is durable). Best effort.
pub fn sync_dir(dir: &std::path::Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Where an image's files live: `meta.json` and `pages.bin` in one directory, written under a temporary name and
/// renamed into place (with everything synced first), so a directory that exists is complete.
pub struct ImageDir;

impl ImageDir {
    /// Dumps `t` into directory `dir` (which must not exist yet), recording `identity` for a template.
    pub fn write(
        t: &mut Tracee,
        dir: &std::path::Path,
        identity: Option<crate::template::Identity>,
    ) -> Result<ProcessImage> {
        let mut img = describe(t)?;
        img.identity = identity;
        let mem = open_mem(t.tgid().as_raw())?;
        Self::store(&img, &mem, dir, None, &[])?;
        Ok(img)
    }

    /// Writes the image [`describe`] gave, its pages copied from `mem` ([`open_mem`]) and shared with the
    /// image in `base` where equal ([`write_pages_dedup`]), into directory `dir` (which must not exist yet):
    /// under a temporary name, synced, then renamed into place.
    pub fn store(
        img: &ProcessImage,
        mem: &std::fs::File,
        dir: &std::path::Path,
        base: Option<&std::path::Path>,
        unchanged: &[(u64, u64)],
    ) -> Result<PagesWritten> {
        let io = |what: &'static str| move |e: std::io::Error| Error::Image(format!("{what}: {e}"));
        let tmp = dir.with_extension("partial");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io("create image directory"))?;
        let result = (|| {
            let pages = std::fs::File::create(tmp.join("pages.bin")).map_err(io("create pages"))?;
            let base = base.and_then(|b| Self::read(b).ok());
            let written = write_pages_dedup(
                img,
                mem,
                &pages,
                base.as_ref().map(|(image, pages)| Base {
                    image,
                    pages,
                    unchanged,
                }),
            )?;
            pages.sync_all().map_err(io("sync pages"))?;
            let meta = serde_json::to_vec(img).map_err(|e| Error::Image(format!("encode: {e}")))?;
            let mut f = std::fs::File::create(tmp.join("meta.json")).map_err(io("create meta"))?;
            f.write_all(&meta).map_err(io("write meta"))?;
            f.sync_all().map_err(io("sync meta"))?;
            std::fs::rename(&tmp, dir).map_err(io("rename image into place"))?;
            if let Some(parent) = dir.parent() {
                sync_dir(parent);
            }
            Ok(written)
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        result
    }

    /// Reads an image's metadata only.
    pub fn meta(dir: &std::path::Path) -> Result<ProcessImage> {
        let meta = std::fs::read(dir.join("meta.json"))
            .map_err(|e| Error::Image(format!("{}: read meta: {e}", dir.display())))?;
        serde_json::from_slice(&meta)
            .map_err(|e| Error::Image(format!("{}: corrupt metadata: {e}", dir.display())))
    }

    /// Reads an image's metadata and opens its pages, checking that the two agree.
    pub fn read(dir: &std::path::Path) -> Result<(ProcessImage, std::fs::File)> {
        let io = |what: &'static str| {
            move |e: std::io::Error| Error::Image(format!("{}: {what}: {e}", dir.display()))
        };
        let meta = std::fs::read(dir.join("meta.json")).map_err(io("read meta"))?;
        let img: ProcessImage = serde_json::from_slice(&meta)
            .map_err(|e| Error::Image(format!("{}: corrupt metadata: {e}", dir.display())))?;
        if img.version != VERSION {
            return Err(Error::Image(format!(
                "{}: image version {}, this build reads {VERSION}",
                dir.display(),
                img.version
            )));
        }
        let pages = std::fs::File::open(dir.join("pages.bin")).map_err(io("open pages"))?;
        let len = pages.metadata().map_err(io("stat pages"))?.len();
        if len != img.page_bytes {
            return Err(Error::Image(format!(
                "{}: truncated or corrupt image: {len} bytes of pages, expected {}",
                dir.display(),
                img.page_bytes
            )));
        }
        Ok((img, pages))
    }
}
