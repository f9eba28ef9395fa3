//! The daemon's async connection to one sandbox's init.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};

use tokio::io::Interest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{oneshot, watch};

use crate::protocol::{ExitStatus, InitEvent, InitRequest};
use crate::{Error, Result};

type SpawnReply = std::result::Result<(i32, oneshot::Receiver<ExitStatus>), String>;

#[derive(Default)]
struct State {
    next_id: u64,
    pending: HashMap<u64, oneshot::Sender<SpawnReply>>,
    exits: HashMap<i32, oneshot::Sender<ExitStatus>>,
    dead: bool,
}

struct Inner {
    init_pid: i32,
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    state: Mutex<State>,
    closed: watch::Receiver<bool>,
}

/// A running process started in the sandbox.
#[derive(Debug)]
pub struct Spawned {
    /// Its pid inside the sandbox (also its process group and session id).
    pub pid: i32,
    /// Resolves when it exits; fails if the sandbox dies first.
    pub exit: oneshot::Receiver<ExitStatus>,
}

/// Cheap to clone; all clones talk to the same init.
#[derive(Clone)]
pub struct SandboxHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SandboxHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxHandle")
            .field("init_pid", &self.inner.init_pid)
            .finish()
    }
}

impl SandboxHandle {
    /// Wraps init's control socket; starts the reader task (needs a tokio runtime).
    pub fn new(init_pid: i32, ctrl: std::os::unix::net::UnixStream) -> Result<SandboxHandle> {
        ctrl.set_nonblocking(true)
            .map_err(Error::io("control socket"))?;
        let stream = tokio::net::UnixStream::from_std(ctrl).map_err(Error::io("control socket"))?;
        let (reader, writer) = stream.into_split();
        let (closed_tx, closed_rx) = watch::channel(false);
        let inner = Arc::new(Inner {
            init_pid,
            writer: tokio::sync::Mutex::new(writer),
            state: Mutex::new(State::default()),
            closed: closed_rx,
        });
        tokio::spawn(read_loop(Arc::downgrade(&inner), reader, closed_tx));
        Ok(SandboxHandle { inner })
    }

    /// Host pid of the sandbox's init.
    pub fn init_pid(&self) -> i32 {
        self.inner.init_pid
    }

    /// Whether init is still connected.
    pub fn is_alive(&self) -> bool {
        !*self.inner.closed.borrow()
    }

    /// Resolves once init has gone away.
    pub async fn closed(&self) {
        let mut rx = self.inner.closed.clone();
        let _ = rx.wait_for(|c| *c).await;
    }

    async fn send(&self, req: &InitRequest, fds: &[OwnedFd]) -> Result<()> {
        let payload = serde_json::to_vec(req).map_err(|e| Error::Io("encode", e.into()))?;
        let header = deltabox_sys::fdpass::frame_header(&payload).map_err(Error::io("frame"))?;
        let mut w = self.inner.writer.lock().await;
        let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
        let stream: &tokio::net::UnixStream = (*w).as_ref();
        let sent = stream
            .async_io(Interest::WRITABLE, || {
                deltabox_sys::fdpass::sendmsg_with_fds(stream.as_fd(), &header, &payload, &borrowed)
            })
            .await
            .map_err(|_| Error::SandboxDead)?;
        let mut frame = header.to_vec();
        frame.extend_from_slice(&payload);
        if sent < frame.len() {
            w.write_all(&frame[sent..])
                .await
                .map_err(|_| Error::SandboxDead)?;
        }
        Ok(())
    }

    /// Starts `argv` in the sandbox with `fds` installed at the given descriptor numbers.
    pub async fn spawn(
        &self,
        argv: Vec<String>,
        env: Vec<String>,
        cwd: String,
        fds: Vec<(OwnedFd, i32)>,
    ) -> Result<Spawned> {
        if argv.is_empty() || argv[0].is_empty() {
            return Err(Error::Invalid("empty command".into()));
        }
        let (id, rx) = self.pending()?;
        let (fds, fd_targets): (Vec<OwnedFd>, Vec<i32>) = fds.into_iter().unzip();
        let req = InitRequest::Spawn {
            id,
            argv,
            env,
            cwd,
            fd_targets,
        };
        if let Err(e) = self.send(&req, &fds).await {
            if let Ok(mut st) = self.inner.state.lock() {
                st.pending.remove(&id);
            }
            return Err(e);
        }
        drop(fds);
        match rx.await {
            Ok(Ok((pid, exit))) => Ok(Spawned { pid, exit }),
            Ok(Err(msg)) => Err(Error::Spawn(msg)),
            Err(_) => Err(Error::SandboxDead),
        }
    }

    /// Starts reporting the exit of `pid`, a process init did not spawn (restored from a checkpoint). Init answers
    /// after every event it sent before, so an exit of an earlier process with the same pid is never taken for it.
    pub async fn track(&self, pid: i32) -> Result<oneshot::Receiver<ExitStatus>> {
        let (id, rx) = self.pending()?;
        if let Err(e) = self.send(&InitRequest::Track { id, pid }, &[]).await {
            if let Ok(mut st) = self.inner.state.lock() {
                st.pending.remove(&id);
            }
            return Err(e);
        }
        match rx.await {
            Ok(Ok((_, exit))) => Ok(exit),
            Ok(Err(msg)) => Err(Error::Spawn(msg)),
            Err(_) => Err(Error::SandboxDead),
        }
    }

    /// Registers a request whose answer (`Spawned` or `SpawnFailed`) init will send with id `id`.
    fn pending(&self) -> Result<(u64, oneshot::Receiver<SpawnReply>)> {
        let (tx, rx) = oneshot::channel();
        let mut st = self.inner.state.lock().map_err(|_| Error::SandboxDead)?;
        if st.dead {
            return Err(Error::SandboxDead);
        }
        st.next_id += 1;
        let id = st.next_id;
        st.pending.insert(id, tx);
        Ok((id, rx))
    }

    /// Sends a signal to one process (sandbox pid).
    pub async fn signal(&self, pid: i32, signal: i32) -> Result<()> {
        self.send(&InitRequest::Signal { pid, signal }, &[]).await
    }

    /// Sends a signal to a process group, optionally sparing one member (a session's shell).
    pub async fn signal_group(&self, pgid: i32, signal: i32, except: Option<i32>) -> Result<()> {
        self.send(
            &InitRequest::SignalGroup {
                pgid,
                signal,
                except,
            },
            &[],
        )
        .await
    }
}

async fn read_loop(
    inner: std::sync::Weak<Inner>,
    mut reader: OwnedReadHalf,
    closed: watch::Sender<bool>,
) {
    loop {
        let mut header = [0u8; 4];
        if reader.read_exact(&mut header).await.is_err() {
            break;
        }
        let len = u32::from_le_bytes(header) as usize;
        if len > deltabox_sys::fdpass::MAX_FRAME {
            break;
        }
        let mut payload = vec![0u8; len];
        if reader.read_exact(&mut payload).await.is_err() {
            break;
        }
        let Ok(ev) = serde_json::from_slice::<InitEvent>(&payload) else {
            continue;
        };
        let Some(inner) = inner.upgrade() else { return };
        let Ok(mut st) = inner.state.lock() else {
            break;
        };
        match ev {
            InitEvent::Spawned { id, pid } => {
                let (tx, rx) = oneshot::channel();
                st.exits.insert(pid, tx);
                if let Some(p) = st.pending.remove(&id) {
                    let _ = p.send(Ok((pid, rx)));
                }
            }
            InitEvent::SpawnFailed { id, error } => {
                if let Some(p) = st.pending.remove(&id) {
                    let _ = p.send(Err(error));
                }
            }
            InitEvent::Exited { pid, status } => {
                if let Some(tx) = st.exits.remove(&pid) {
                    let _ = tx.send(status);
                }
            }
        }
    }
    if let Some(inner) = inner.upgrade() {
        if let Ok(mut st) = inner.state.lock() {
            st.dead = true;
            // Dropping the senders fails every waiter with "sandbox died".
            st.pending.clear();
            st.exits.clear();
        }
    }
    let _ = closed.send(true);
}
