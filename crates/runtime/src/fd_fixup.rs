//! Descriptors a template must not hold, and how a restored process gets them back.
//!
//! A template shares every open file description with the process it copies. For files that is harmless (they
//! are re-opened by path on restore), but some objects change behaviour while anyone holds them: a listening
//! socket keeps its port taken after the live server exits (a restarted server gets `EADDRINUSE`), and a pipe
//! end keeps the process at the other end from ever seeing end-of-file. So right after the fork the template
//! closes those, and a process restored from it gets:
//! - a **bound TCP or UDP socket** re-created on the same address (and listening, for TCP), at the same number;
//! - a **pipe to another process of the sandbox, or a TCP connection** replaced by `/dev/null` (reads see
//!   end-of-file, writes are discarded): the other end is gone or restored separately, so the connection is
//!   broken, as it would be after a crash.
//!
//! Pipes whose other end is outside the sandbox (the daemon's session pipes) and a process's pipes to itself are
//! kept. Unix-domain sockets are kept shared (their peers cannot be found from `/proc`).

use std::collections::HashMap;
use std::path::Path;

use deltabox_sys::inject::Tracee;

use crate::generation::check;

/// What to do with one descriptor of a restored process.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Fixup {
    /// Re-create a socket bound to `addr` (a `sockaddr`), listening if it is a stream socket.
    Bound {
        fd: i32,
        flags: i32,
        family: i32,
        stream: bool,
        addr: Vec<u8>,
    },
    /// Replace with `/dev/null`.
    Broken { fd: i32, flags: i32 },
    /// Both ends of a pipe to itself (a self-pipe): replace with a new pipe, at the same numbers.
    SelfPipe { read: i32, write: i32, flags: i32 },
    /// An epoll instance: a template shares it with the live process (whose sockets it watches are gone by the
    /// time a copy runs), so the copy gets a new one watching its own descriptors `(fd, events, data)`,
    /// applied after every other fixup.
    Epoll {
        fd: i32,
        flags: i32,
        watches: Vec<(i32, u32, u64)>,
    },
}

impl Fixup {
    /// The descriptor number.
    pub fn fd(&self) -> i32 {
        match self {
            Fixup::Bound { fd, .. } | Fixup::Broken { fd, .. } | Fixup::Epoll { fd, .. } => *fd,
            Fixup::SelfPipe { read, .. } => *read,
        }
    }
}

/// One end of a pipe or a socket, as `/proc/<pid>/fd` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Object {
    Pipe(u64),
    Socket(u64),
}

fn object(pid: i32, fd: i32) -> Option<Object> {
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
    let s = link.to_str()?;
    let ino = |p: &str| s.strip_prefix(p)?.strip_suffix(']')?.parse().ok();
    if let Some(i) = ino("pipe:[") {
        return Some(Object::Pipe(i));
    }
    ino("socket:[").map(Object::Socket)
}

fn fd_flags(pid: i32, fd: i32) -> i32 {
    std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|v| i32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0)
}

fn fds(pid: i32) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Pipe ends held by the sandbox's processes: inode → (pid, is the write end).
pub struct PipeHolders(HashMap<u64, Vec<(i32, bool)>>);

impl PipeHolders {
    /// Scans `pids` (the sandbox's live processes).
    pub fn scan(pids: &[i32]) -> PipeHolders {
        let mut m: HashMap<u64, Vec<(i32, bool)>> = HashMap::new();
        for &pid in pids {
            for fd in fds(pid) {
                if let Some(Object::Pipe(ino)) = object(pid, fd) {
                    let write = fd_flags(pid, fd) & libc::O_ACCMODE == libc::O_WRONLY;
                    m.entry(ino).or_default().push((pid, write));
                }
            }
        }
        PipeHolders(m)
    }

    /// Whether another process of the sandbox holds the other end of pipe `ino`.
    fn connects_elsewhere(&self, ino: u64, pid: i32, write: bool) -> bool {
        self.0
            .get(&ino)
            .is_some_and(|v| v.iter().any(|&(p, w)| p != pid && w != write))
    }
}

/// A socket of `pid`'s network namespace in `/proc/<pid>/net/{tcp,udp}{,6}`: (state, local sockaddr, family).
fn inet_socket(pid: i32, ino: u64) -> Option<(bool, u8, i32, Vec<u8>)> {
    for (file, family, stream) in [
        ("tcp", libc::AF_INET, true),
        ("tcp6", libc::AF_INET6, true),
        ("udp", libc::AF_INET, false),
        ("udp6", libc::AF_INET6, false),
    ] {
        let Ok(table) = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) else {
            continue;
        };
        for line in table.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || f[9].parse::<u64>().ok() != Some(ino) {
                continue;
            }
            let state = u8::from_str_radix(f[3], 16).ok()?;
            let (addr_hex, port_hex) = f[1].split_once(':')?;
            let port = u16::from_str_radix(port_hex, 16).ok()?;
            // The kernel prints each 32-bit word of the address as a host-order integer.
            let mut addr = Vec::new();
            for chunk in addr_hex.as_bytes().chunks(8) {
                let word = u32::from_str_radix(std::str::from_utf8(chunk).ok()?, 16).ok()?;
                addr.extend_from_slice(&word.to_le_bytes());
            }
            return Some((stream, state, family, sockaddr(family, port, &addr)));
        }
    }
    None
}

fn sockaddr(family: i32, port: u16, addr: &[u8]) -> Vec<u8> {
    let mut sa = Vec::new();
    sa.extend_from_slice(&(family as u16).to_ne_bytes());
    sa.extend_from_slice(&port.to_be_bytes());
    if family == libc::AF_INET {
        sa.extend_from_slice(addr);
        sa.extend_from_slice(&[0u8; 8]);
    } else {
        sa.extend_from_slice(&[0u8; 4]); // flowinfo
        sa.extend_from_slice(addr);
        sa.extend_from_slice(&[0u8; 4]); // scope id
    }
    sa
}

/// TCP states from `include/net/tcp_states.h`.
const TCP_LISTEN: u8 = 0x0A;
/// UDP sockets report `TCP_CLOSE` when bound and not connected.
const UDP_UNCONNECTED: u8 = 0x07;

/// What an epoll descriptor of `pid` watches, from its `fdinfo` (`tfd: N events: HEX data: HEX …`).
fn epoll_watches(pid: i32, fd: i32) -> Option<Vec<(i32, u32, u64)>> {
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
    if link.to_str()? != "anon_inode:[eventpoll]" {
        return None;
    }
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    Some(
        info.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                match f.as_slice() {
                    ["tfd:", tfd, "events:", ev, "data:", data, ..] => Some((
                        tfd.parse().ok()?,
                        u32::from_str_radix(ev, 16).ok()?,
                        u64::from_str_radix(data, 16).ok()?,
                    )),
                    _ => None,
                }
            })
            .collect(),
    )
}

/// What process `pid` holds that its template must drop, and how to give it back on restore.
pub fn plan(pid: i32, pipes: &PipeHolders) -> Vec<Fixup> {
    let mut out = Vec::new();
    for fd in fds(pid) {
        let flags = fd_flags(pid, fd);
        if let Some(watches) = epoll_watches(pid, fd) {
            out.push(Fixup::Epoll { fd, flags, watches });
            continue;
        }
        match object(pid, fd) {
            Some(Object::Pipe(ino)) => {
                let write = flags & libc::O_ACCMODE == libc::O_WRONLY;
                if pipes.connects_elsewhere(ino, pid, write) {
                    out.push(Fixup::Broken { fd, flags });
                }
            }
            Some(Object::Socket(ino)) => match inet_socket(pid, ino) {
                Some((stream, state, family, addr))
                    if (stream && state == TCP_LISTEN) || (!stream && state == UDP_UNCONNECTED) =>
                {
                    out.push(Fixup::Bound {
                        fd,
                        flags,
                        family,
                        stream,
                        addr,
                    });
                }
                Some(_) => out.push(Fixup::Broken { fd, flags }),
                None => {}
            },
            None => {}
        }
    }
    out
}

/// For a copy placed in another sandbox (a fork branch): what it still shares with its source — and so with the
/// source's processes and the daemon's pipes to them — besides the descriptors in `keep`: a pipe to itself gets a
/// new pipe of its own, any other pipe or socket is replaced by `/dev/null` (a connection that breaks, as after
/// a crash; nothing of the source reaches the branch, nothing of the branch reaches the source).
pub fn plan_branch(pid: i32, keep: &[i32]) -> Vec<Fixup> {
    let mut out = Vec::new();
    let mut pipes: HashMap<u64, Vec<(i32, i32)>> = HashMap::new();
    for fd in fds(pid) {
        if keep.contains(&fd) {
            continue;
        }
        let flags = fd_flags(pid, fd);
        match object(pid, fd) {
            Some(Object::Pipe(ino)) => pipes.entry(ino).or_default().push((fd, flags)),
            Some(Object::Socket(_)) => out.push(Fixup::Broken { fd, flags }),
            None => {}
        }
    }
    for ends in pipes.into_values() {
        let read = ends
            .iter()
            .find(|(_, f)| f & libc::O_ACCMODE == libc::O_RDONLY);
        let write = ends
            .iter()
            .find(|(_, f)| f & libc::O_ACCMODE == libc::O_WRONLY);
        match (read, write) {
            (Some(&(r, flags)), Some(&(w, _))) => {
                out.push(Fixup::SelfPipe {
                    read: r,
                    write: w,
                    flags,
                });
                // Further duplicates of either end are cut off.
                for &(fd, flags) in &ends {
                    if fd != r && fd != w {
                        out.push(Fixup::Broken { fd, flags });
                    }
                }
            }
            _ => out.extend(ends.iter().map(|&(fd, flags)| Fixup::Broken { fd, flags })),
        }
    }
    out
}

/// Applies `fixups` in a restored process (held, already in the sandbox's namespaces and on its root).
pub fn apply(t: &mut Tracee, fixups: &[Fixup]) -> Result<(), String> {
    let sc = |t: &mut Tracee, nr: i64, args: &[u64]| t.syscall(nr, args).map_err(|e| e.to_string());
    for f in fixups {
        let (fd, flags) = match f {
            Fixup::Bound { fd, flags, .. } | Fixup::Broken { fd, flags } => (*fd, *flags),
            Fixup::SelfPipe { read, write, flags } => {
                self_pipe(t, *read, *write, *flags)?;
                continue;
            }
            Fixup::Epoll { .. } => continue,
        };
        let what = |s: &str| format!("fd {fd}: {s}");
        let new = match f {
            Fixup::Bound {
                family,
                stream,
                addr,
                ..
            } => {
                let ty = if *stream {
                    libc::SOCK_STREAM
                } else {
                    libc::SOCK_DGRAM
                };
                let s = check(
                    &what("socket"),
                    sc(
                        t,
                        libc::SYS_socket,
                        &[*family as u64, (ty | libc::SOCK_CLOEXEC) as u64, 0],
                    )?,
                )?;
                let one = t
                    .write_scratch(&1i32.to_ne_bytes())
                    .map_err(|e| e.to_string())?;
                sc(
                    t,
                    libc::SYS_setsockopt,
                    &[
                        s as u64,
                        libc::SOL_SOCKET as u64,
                        libc::SO_REUSEADDR as u64,
                        one,
                        4,
                    ],
                )?;
                let a = t.write_scratch(addr).map_err(|e| e.to_string())?;
                check(
                    &what("bind to its old address"),
                    sc(t, libc::SYS_bind, &[s as u64, a, addr.len() as u64])?,
                )?;
                if *stream {
                    check(&what("listen"), sc(t, libc::SYS_listen, &[s as u64, 4096])?)?;
                }
                s
            }
            Fixup::SelfPipe { .. } | Fixup::Epoll { .. } => continue,
            Fixup::Broken { .. } => {
                let p = t
                    .write_path(Path::new("/dev/null"))
                    .map_err(|e| e.to_string())?;
                check(
                    &what("open /dev/null"),
                    sc(
                        t,
                        libc::SYS_openat,
                        &[
                            libc::AT_FDCWD as u64,
                            p,
                            (libc::O_RDWR | libc::O_CLOEXEC) as u64,
                            0,
                        ],
                    )?,
                )?
            }
        };
        if flags & libc::O_NONBLOCK != 0 {
            sc(
                t,
                libc::SYS_fcntl,
                &[new as u64, libc::F_SETFL as u64, libc::O_NONBLOCK as u64],
            )?;
        }
        if new == i64::from(fd) {
            // It got the very number (the lowest free one): only close-on-exec may differ.
            let cloexec = if flags & libc::O_CLOEXEC != 0 {
                libc::FD_CLOEXEC
            } else {
                0
            };
            sc(
                t,
                libc::SYS_fcntl,
                &[new as u64, libc::F_SETFD as u64, cloexec as u64],
            )?;
        } else {
            check(
                &what("dup3"),
                sc(
                    t,
                    libc::SYS_dup3,
                    &[new as u64, fd as u64, (flags & libc::O_CLOEXEC) as u64],
                )?,
            )?;
            sc(t, libc::SYS_close, &[new as u64])?;
        }
    }
    // Last: what they watch exists now.
    for f in fixups {
        if let Fixup::Epoll { fd, flags, watches } = f {
            epoll(t, *fd, *flags, watches)?;
        }
    }
    Ok(())
}

/// Gives a held process a new epoll instance at `fd` watching `watches`. A watch whose descriptor is gone or
/// cannot be watched any more (a connection that came back as `/dev/null`) is left out, as its events would
/// never come.
fn epoll(t: &mut Tracee, fd: i32, flags: i32, watches: &[(i32, u32, u64)]) -> Result<(), String> {
    let sc = |t: &mut Tracee, nr: i64, args: &[u64]| t.syscall(nr, args).map_err(|e| e.to_string());
    let what = |s: &str| format!("fd {fd} (epoll): {s}");
    let new = check(
        &what("epoll_create1"),
        sc(
            t,
            libc::SYS_epoll_create1,
            &[(flags & libc::O_CLOEXEC) as u64],
        )?,
    )?;
    for &(tfd, events, data) in watches {
        // struct epoll_event is packed on x86-64: u32 events, u64 data.
        let mut ev = [0u8; 12];
        ev[..4].copy_from_slice(&events.to_ne_bytes());
        ev[4..].copy_from_slice(&data.to_ne_bytes());
        let addr = t.write_scratch(&ev).map_err(|e| e.to_string())?;
        let _ = sc(
            t,
            libc::SYS_epoll_ctl,
            &[new as u64, libc::EPOLL_CTL_ADD as u64, tfd as u64, addr],
        )?;
    }
    // It may have got the very number (the template closed it): then it is in place already.
    if new != i64::from(fd) {
        let cloexec = (flags & libc::O_CLOEXEC) as u64;
        check(
            &what("dup3"),
            sc(t, libc::SYS_dup3, &[new as u64, fd as u64, cloexec])?,
        )?;
        sc(t, libc::SYS_close, &[new as u64])?;
    }
    Ok(())
}

/// Gives a held process a new pipe at descriptors `read` and `write`.
fn self_pipe(t: &mut Tracee, read: i32, write: i32, flags: i32) -> Result<(), String> {
    let sc = |t: &mut Tracee, nr: i64, args: &[u64]| t.syscall(nr, args).map_err(|e| e.to_string());
    let what = |s: &str| format!("fd {read}/{write}: {s}");
    let pipe_flags = (flags & (libc::O_CLOEXEC | libc::O_NONBLOCK)) as u64;
    let (r, w) = t
        .fd_pair("injected pipe2", libc::SYS_pipe2, |a| vec![a, pipe_flags])
        .map_err(|e| what(&e.to_string()))?;
    let result = (|| {
        let cloexec = (flags & libc::O_CLOEXEC) as u64;
        check(
            &what("dup3"),
            sc(t, libc::SYS_dup3, &[r as u64, read as u64, cloexec])?,
        )?;
        check(
            &what("dup3"),
            sc(t, libc::SYS_dup3, &[w as u64, write as u64, cloexec])?,
        )?;
        Ok(())
    })();
    for fd in [r, w] {
        if fd != read && fd != write {
            let _ = sc(t, libc::SYS_close, &[fd as u64]);
        }
    }
    result
}
