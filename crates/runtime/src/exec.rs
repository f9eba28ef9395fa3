//! One-shot commands: run, collect bounded output (or stream it), enforce a timeout.

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;

use crate::protocol::ExitStatus;
use crate::{Error, Result, SandboxHandle};

/// How long to keep reading after the command exited, for output still in flight from processes it left behind
/// (which may hold the pipes open forever).
const LINGER: Duration = Duration::from_millis(100);

/// A one-shot command.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    /// Program and arguments (`argv[0]` is looked up in the request's `PATH`).
    pub argv: Vec<String>,
    /// Complete environment, `KEY=VALUE`.
    pub env: Vec<String>,
    /// Working directory inside the sandbox.
    pub cwd: String,
    /// Bytes for stdin (`None`: `/dev/null`).
    pub stdin: Option<Vec<u8>>,
    /// Kill the command (its whole process group) after this long.
    pub timeout: Option<Duration>,
    /// Keep at most this many bytes of each stream; the rest is read and dropped.
    pub max_output: usize,
}

/// A chunk of output, as it comes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputEvent {
    /// From stdout.
    Stdout(Vec<u8>),
    /// From stderr.
    Stderr(Vec<u8>),
}

/// What a command did.
#[derive(Debug, Clone, Default)]
pub struct ExecOutput {
    /// Captured stdout (at most `max_output` bytes).
    pub stdout: Vec<u8>,
    /// Captured stderr (at most `max_output` bytes).
    pub stderr: Vec<u8>,
    /// stdout was longer than `max_output`.
    pub stdout_truncated: bool,
    /// stderr was longer than `max_output`.
    pub stderr_truncated: bool,
    /// How it ended (`None` only if the daemon lost track of it).
    pub status: Option<ExitStatus>,
    /// The timeout fired and the command was killed.
    pub timed_out: bool,
    /// Wall time from request to exit.
    pub duration: Duration,
}

/// Appends up to a bound, remembering whether anything was dropped.
pub(crate) fn push_bounded(buf: &mut Vec<u8>, data: &[u8], max: usize, truncated: &mut bool) {
    let room = max.saturating_sub(buf.len());
    if data.len() > room {
        *truncated = true;
    }
    buf.extend_from_slice(&data[..data.len().min(room)]);
}

pub(crate) fn pipe_pair() -> Result<(OwnedFd, OwnedFd)> {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| Error::Io("pipe", e.into()))
}

pub(crate) fn dev_null() -> Result<OwnedFd> {
    Ok(std::fs::File::open("/dev/null")
        .map_err(Error::io("open /dev/null"))?
        .into())
}

pub(crate) fn receiver(fd: OwnedFd) -> Result<pipe::Receiver> {
    pipe::Receiver::from_owned_fd(fd).map_err(Error::io("pipe"))
}

pub(crate) fn sender(fd: OwnedFd) -> Result<pipe::Sender> {
    pipe::Sender::from_owned_fd(fd).map_err(Error::io("pipe"))
}

/// Runs `req`; with `sink`, forwards output as it arrives (and kills the command if the sink goes away: the
/// client disconnected).
pub async fn run(
    h: &SandboxHandle,
    req: ExecRequest,
    sink: Option<mpsc::Sender<OutputEvent>>,
) -> Result<ExecOutput> {
    let start = Instant::now();
    let (out_r, out_w) = pipe_pair()?;
    let (err_r, err_w) = pipe_pair()?;
    let (in_r, in_w) = match &req.stdin {
        Some(_) => {
            let (r, w) = pipe_pair()?;
            (r, Some(w))
        }
        None => (dev_null()?, None),
    };
    let p = h
        .spawn(
            req.argv.clone(),
            req.env.clone(),
            req.cwd.clone(),
            vec![(in_r, 0), (out_w, 1), (err_w, 2)],
        )
        .await?;
    if let (Some(w), Some(data)) = (in_w, req.stdin) {
        let mut w = sender(w)?;
        // A command that never reads its stdin just leaves this task blocked until the pipe closes.
        tokio::spawn(async move {
            let _ = w.write_all(&data).await;
        });
    }
    let mut out = receiver(out_r)?;
    let mut err = receiver(err_r)?;
    let mut res = ExecOutput::default();
    let (mut out_open, mut err_open) = (true, true);
    let mut exit = p.exit;
    let deadline = req.timeout.map(|t| tokio::time::Instant::now() + t);
    let mut linger_until: Option<tokio::time::Instant> = None;
    let mut client_gone = false;
    let (mut obuf, mut ebuf) = (vec![0u8; 64 << 10], vec![0u8; 64 << 10]);
    loop {
        if res.status.is_some() && !out_open && !err_open {
            break;
        }
        // Which stream produced how many bytes (`true`: stdout).
        let chunk: Option<(bool, usize)> = tokio::select! {
            r = out.read(&mut obuf), if out_open => match r {
                Ok(n @ 1..) => Some((true, n)),
                _ => { out_open = false; None }
            },
            r = err.read(&mut ebuf), if err_open => match r {
                Ok(n @ 1..) => Some((false, n)),
                _ => { err_open = false; None }
            },
            s = &mut exit, if res.status.is_none() => {
                res.status = Some(s.map_err(|_| Error::SandboxDead)?);
                res.duration = start.elapsed();
                linger_until = Some(tokio::time::Instant::now() + LINGER);
                None
            },
            _ = sleep_until(deadline), if deadline.is_some() && res.status.is_none() && !res.timed_out => {
                res.timed_out = true;
                let _ = h.signal_group(p.pid, libc::SIGKILL, None).await;
                None
            },
            _ = sleep_until(linger_until), if linger_until.is_some() => break,
            // The client went away while the command was silent.
            _ = sink_closed(&sink), if !client_gone && res.status.is_none() => {
                client_gone = true;
                let _ = h.signal_group(p.pid, libc::SIGKILL, None).await;
                None
            },
        };
        let Some((is_out, n)) = chunk else { continue };
        let (data, buf, truncated) = if is_out {
            (&obuf[..n], &mut res.stdout, &mut res.stdout_truncated)
        } else {
            (&ebuf[..n], &mut res.stderr, &mut res.stderr_truncated)
        };
        push_bounded(buf, data, req.max_output, truncated);
        if let (Some(s), false) = (&sink, client_gone) {
            let ev = if is_out {
                OutputEvent::Stdout(data.to_vec())
            } else {
                OutputEvent::Stderr(data.to_vec())
            };
            if s.send(ev).await.is_err() {
                client_gone = true;
                let _ = h.signal_group(p.pid, libc::SIGKILL, None).await;
            }
        }
    }
    Ok(res)
}

async fn sink_closed(sink: &Option<mpsc::Sender<OutputEvent>>) {
    match sink {
        Some(s) => s.closed().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(t: Option<tokio::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bounded_push() {
        let mut b = Vec::new();
        let mut t = false;
        push_bounded(&mut b, b"hello", 8, &mut t);
        assert!(!t);
        push_bounded(&mut b, b"world", 8, &mut t);
        assert_eq!(b, b"hellowor");
        assert!(t);
    }
}
