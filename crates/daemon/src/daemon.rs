//! The daemon's operations on sandboxes, independent of HTTP.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deltabox_fs::{ImageStore, LayerStack};
use deltabox_runtime::{
    limits, CgroupManager, ExecRequest, Limits, NetworkMode, SandboxHandle, SandboxSpec, Session,
    SessionKind, Zygote,
};
use tokio::sync::{mpsc, RwLock};

use crate::api::{
    self, CreateSandbox, ExecBody, ExecResult, SandboxInfo, SessionInfo, SessionResult,
};
use crate::error::{start_err, StartError};
use crate::sandbox::Sandbox;
use crate::store::Store;
use crate::{ApiError, Config};

/// Removes a half-created sandbox's cgroup (killing anything in it) and directory when dropped, unless
/// disarmed once the sandbox is registered.
struct Undo {
    dir: Option<PathBuf>,
    cgroup: Option<deltabox_runtime::Cgroup>,
}

impl Undo {
    fn disarm(&mut self) {
        self.dir = None;
        self.cgroup = None;
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        if let Some(cg) = self.cgroup.take() {
            let _ = cg.destroy();
        }
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Everything the daemon owns.
pub struct Daemon {
    /// Configuration.
    pub config: Config,
    zygote: Arc<Zygote>,
    cgroups: CgroupManager,
    images: ImageStore,
    store: Store,
    live: RwLock<HashMap<String, Arc<Sandbox>>>,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn random_id(prefix: &str) -> String {
    let mut b = [0u8; 6];
    let _ = getrandom::fill(&mut b);
    format!("{prefix}{}", hex::encode(b))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("worker: {e}")))
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

impl Daemon {
    /// Opens the state, cleans up what a previous daemon left, and returns the daemon.
    pub fn open(config: Config, zygote: Zygote) -> Result<Arc<Daemon>, StartError> {
        std::fs::create_dir_all(config.store_dir().join("sandboxes"))
            .map_err(|e| start_err("create store dirs", e))?;
        let store = Store::open(&config.state_dir.join("deltabox.db"))
            .map_err(|e| start_err("open database", e))?;
        let cgroups = CgroupManager::detect(&format!("deltabox/{}", config.instance_tag()))
            .map_err(|e| start_err("cgroups", e))?;
        let images = ImageStore::new(
            config.store_dir().join("images"),
            zygote.host_root(),
            vec![config.state_dir.clone()],
        );
        let d = Arc::new(Daemon {
            config,
            zygote: Arc::new(zygote),
            cgroups,
            images,
            store,
            live: RwLock::new(HashMap::new()),
        });
        d.recover();
        Ok(d)
    }

    /// After a restart nothing is ours any more: sandboxes that were running are killed (their cgroups emptied
    /// and removed) and marked `lost`; stray cgroups are removed. Their files stay until `rm`.
    fn recover(&self) {
        let known = self.store.list().unwrap_or_default();
        for s in &known {
            if s.status == "running" || s.status == "paused" {
                let _ = self.cgroups.open(&s.id).destroy();
                let _ = self.store.set_status(
                    &s.id,
                    "lost",
                    Some("the daemon restarted; its processes were stopped"),
                );
            }
        }
        // Nothing runs yet, so every cgroup under our parent is a leftover.
        for name in self.cgroups.list() {
            let _ = self.cgroups.open(&name).destroy();
        }
    }

    /// Cgroup API in use.
    pub fn cgroup_version(&self) -> &'static str {
        match self.cgroups.version() {
            deltabox_runtime::CgroupVersion::V1 => "v1",
            deltabox_runtime::CgroupVersion::V2 => "v2",
        }
    }

    /// Health summary.
    pub async fn health(&self) -> api::Health {
        api::Health {
            status: if self.zygote.is_alive() {
                "ok".into()
            } else {
                "degraded: zygote exited".into()
            },
            version: env!("CARGO_PKG_VERSION").into(),
            cgroup: self.cgroup_version().into(),
            sandboxes: self.store.list().map(|l| l.len()).unwrap_or(0),
        }
    }

    /// Creates and starts a sandbox.
    pub async fn create(self: &Arc<Self>, req: CreateSandbox) -> Result<SandboxInfo, ApiError> {
        let defaults = Limits::default();
        let limits = Limits {
            memory_bytes: match &req.memory {
                Some(m) => limits::parse_size(m)?,
                None => defaults.memory_bytes,
            },
            // 0 means no limit.
            pids: match req.pids {
                Some(0) => None,
                Some(p) => Some(p),
                None => defaults.pids,
            },
            cpus: req.cpus,
        };
        limits.validate()?;
        let network = match req.network.as_deref() {
            None | Some("none") => NetworkMode::None,
            Some("host") => NetworkMode::Host,
            Some(other) => {
                return Err(ApiError::invalid(format!(
                    "unknown network mode {other:?} (none or host)"
                )))
            }
        };
        let id = random_id("");
        let images = self.images.clone();
        let image_ref = req.image.clone();
        let image = blocking(move || images.resolve(image_ref.as_deref())).await??;
        let dir = self.config.store_dir().join("sandboxes").join(&id);
        let hostname = format!("dbx-{}", &id[..8]);
        let prepared = (|| -> std::io::Result<LayerStack> {
            let upper = dir.join("upper");
            std::fs::create_dir_all(upper.join("etc"))?;
            std::fs::create_dir_all(dir.join("work"))?;
            std::fs::create_dir_all(dir.join("rootfs"))?;
            std::fs::write(upper.join("etc/hostname"), format!("{hostname}\n"))?;
            std::fs::write(
                upper.join("etc/hosts"),
                format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"),
            )?;
            Ok(LayerStack {
                lowers: image.layers.clone(),
                upper,
                work: dir.join("work"),
            })
        })();
        // Until the sandbox is registered, any failure undoes what was made so far.
        let mut undo = Undo {
            dir: Some(dir.clone()),
            cgroup: None,
        };
        let layers =
            prepared.map_err(|e| ApiError::internal(format!("prepare sandbox directory: {e}")))?;
        let cgroup = self.cgroups.create(&id, &limits)?;
        undo.cgroup = Some(cgroup.clone());
        let spec = SandboxSpec {
            id: id.clone(),
            hostname: hostname.clone(),
            layers,
            rootfs: dir.join("rootfs"),
            cgroup_procs: cgroup.procs_files(),
            network,
        };
        let zygote = self.zygote.clone();
        let (pid, ctrl) = blocking(move || zygote.create(&spec)).await??;
        let handle = SandboxHandle::new(pid, ctrl)?;
        let info = SandboxInfo {
            id: id.clone(),
            status: "running".into(),
            reason: None,
            image: image.reference.clone(),
            image_digest: image.digest.clone(),
            created_at: now(),
            memory_bytes: limits.memory_bytes,
            pids: limits.pids,
            cpus: limits.cpus,
            network: match network {
                NetworkMode::None => "none".into(),
                NetworkMode::Host => "host".into(),
            },
            init_pid: Some(pid),
            sessions: 0,
        };
        self.store.insert(&info)?;
        undo.disarm();
        let sb = Arc::new(Sandbox {
            id: id.clone(),
            handle: handle.clone(),
            cgroup,
            dir,
            image_config: image.config.clone(),
            hostname,
            sessions: Default::default(),
            lifecycle: Default::default(),
        });
        self.live.write().await.insert(id.clone(), sb.clone());
        // If init dies on its own (killed from the host, OOM), record it and free the cgroup.
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            handle.closed().await;
            let Some(d) = me.upgrade() else { return };
            let removed = d.live.write().await.remove(&sb.id);
            if removed.is_some() {
                let cg = sb.cgroup.clone();
                let _ = blocking(move || cg.destroy()).await;
                let _ =
                    d.store
                        .set_status(&sb.id, "exited", Some("the sandbox's init process exited"));
            }
        });
        Ok(info)
    }

    async fn live(&self, id: &str) -> Result<Arc<Sandbox>, ApiError> {
        if let Some(s) = self.live.read().await.get(id) {
            return Ok(s.clone());
        }
        if !valid_id(id) {
            return Err(ApiError::not_found(format!("no sandbox {id:?}")));
        }
        match self.store.get(id)? {
            Some(s) => Err(ApiError::conflict(
                "sandbox_not_running",
                format!(
                    "sandbox {id} is {}{}",
                    s.status,
                    s.reason.map(|r| format!(": {r}")).unwrap_or_default()
                ),
            )),
            None => Err(ApiError::not_found(format!("no sandbox {id:?}"))),
        }
    }

    async fn decorate(&self, mut info: SandboxInfo) -> SandboxInfo {
        if let Some(s) = self.live.read().await.get(&info.id) {
            info.init_pid = Some(s.handle.init_pid());
            info.sessions = s.sessions.lock().await.len();
        }
        info
    }

    /// Every sandbox.
    pub async fn list(&self) -> Result<Vec<SandboxInfo>, ApiError> {
        let mut out = Vec::new();
        for s in self.store.list()? {
            out.push(self.decorate(s).await);
        }
        Ok(out)
    }

    /// One sandbox.
    pub async fn get(&self, id: &str) -> Result<SandboxInfo, ApiError> {
        if !valid_id(id) {
            return Err(ApiError::not_found(format!("no sandbox {id:?}")));
        }
        let info = self
            .store
            .get(id)?
            .ok_or_else(|| ApiError::not_found(format!("no sandbox {id:?}")))?;
        Ok(self.decorate(info).await)
    }

    /// Stops and deletes a sandbox: processes, cgroup, files, record.
    pub async fn remove(&self, id: &str) -> Result<(), ApiError> {
        if !valid_id(id) || self.store.get(id)?.is_none() {
            return Err(ApiError::not_found(format!("no sandbox {id:?}")));
        }
        let sb = self.live.write().await.remove(id);
        let cg = self.cgroups.open(id);
        let dir = self.config.store_dir().join("sandboxes").join(id);
        if let Some(sb) = &sb {
            let _guard = sb.lifecycle.lock().await;
            sb.sessions.lock().await.clear();
        }
        blocking(move || -> Result<(), ApiError> {
            cg.destroy().map_err(ApiError::from)?;
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(ApiError::internal(format!("remove {}: {e}", dir.display()))),
            }
        })
        .await??;
        if let Some(sb) = sb {
            // Wait (briefly) for init's socket to close so the sandbox is really gone when we answer.
            let _ = tokio::time::timeout(Duration::from_secs(5), sb.handle.closed()).await;
        }
        self.store.delete(id)?;
        Ok(())
    }

    /// Freezes every process of a sandbox.
    pub async fn pause(&self, id: &str) -> Result<SandboxInfo, ApiError> {
        let sb = self.live(id).await?;
        let _g = sb.lifecycle.lock().await;
        let cg = sb.cgroup.clone();
        blocking(move || cg.freeze()).await??;
        self.store.set_status(id, "paused", None)?;
        self.get(id).await
    }

    /// Thaws a paused sandbox.
    pub async fn resume(&self, id: &str) -> Result<SandboxInfo, ApiError> {
        let sb = self.live(id).await?;
        let _g = sb.lifecycle.lock().await;
        let cg = sb.cgroup.clone();
        blocking(move || cg.thaw()).await??;
        self.store.set_status(id, "running", None)?;
        self.get(id).await
    }

    fn check_running(sb: &Sandbox) -> Result<(), ApiError> {
        if sb.cgroup.is_frozen() {
            return Err(ApiError::conflict(
                "sandbox_paused",
                format!("sandbox {} is paused", sb.id),
            ));
        }
        Ok(())
    }

    /// Runs a one-shot command; with `sink`, streams its output.
    pub async fn exec(
        &self,
        id: &str,
        body: ExecBody,
        sink: Option<mpsc::Sender<deltabox_runtime::OutputEvent>>,
    ) -> Result<ExecResult, ApiError> {
        let sb = self.live(id).await?;
        Self::check_running(&sb)?;
        if body.argv.is_empty() || body.argv[0].is_empty() {
            return Err(ApiError::invalid("argv must name a program"));
        }
        let max_output = body
            .max_output_bytes
            .unwrap_or(api::DEFAULT_MAX_OUTPUT)
            .min(api::MAX_MAX_OUTPUT);
        let req = ExecRequest {
            env: sb.base_env(&body.env),
            cwd: body.cwd.clone().unwrap_or_else(|| sb.default_cwd()),
            argv: body.argv,
            stdin: body.stdin.map(String::into_bytes),
            timeout: body.timeout_ms.map(Duration::from_millis),
            max_output,
        };
        let ooms = sb.cgroup.oom_kills();
        let out = deltabox_runtime::exec::run(&sb.handle, req, sink).await?;
        let status = out
            .status
            .unwrap_or(deltabox_runtime::protocol::ExitStatus {
                code: None,
                signal: None,
            });
        let oom_killed =
            status.signal == Some(libc::SIGKILL) && !out.timed_out && sb.cgroup.oom_kills() > ooms;
        Ok(ExecResult {
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            stdout_truncated: out.stdout_truncated,
            stderr_truncated: out.stderr_truncated,
            exit_code: status.code,
            signal: status.signal,
            timed_out: out.timed_out,
            oom_killed,
            duration_ms: out.duration.as_secs_f64() * 1e3,
        })
    }

    /// Starts a persistent session.
    pub async fn start_session(
        &self,
        id: &str,
        body: api::StartSession,
    ) -> Result<SessionInfo, ApiError> {
        let sb = self.live(id).await?;
        Self::check_running(&sb)?;
        let kind: SessionKind = body.kind.parse()?;
        let cwd = body.cwd.clone().unwrap_or_else(|| sb.default_cwd());
        let session = Session::start(&sb.handle, kind, sb.base_env(&body.env), cwd).await?;
        let sid = random_id("s-");
        let info = SessionInfo {
            id: sid.clone(),
            kind: kind.to_string(),
            pid: session.pid(),
            alive: true,
        };
        sb.sessions.lock().await.insert(sid, Arc::new(session));
        Ok(info)
    }

    /// Lists a sandbox's sessions.
    pub async fn list_sessions(&self, id: &str) -> Result<Vec<SessionInfo>, ApiError> {
        let sb = self.live(id).await?;
        let sessions = sb.sessions.lock().await;
        let mut out: Vec<SessionInfo> = sessions
            .iter()
            .map(|(sid, s)| SessionInfo {
                id: sid.clone(),
                kind: s.kind().to_string(),
                pid: s.pid(),
                alive: s.is_alive(),
            })
            .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// Runs a command in a session.
    pub async fn run_in_session(
        &self,
        id: &str,
        sid: &str,
        body: api::RunInSession,
    ) -> Result<SessionResult, ApiError> {
        let sb = self.live(id).await?;
        Self::check_running(&sb)?;
        let session =
            sb.sessions.lock().await.get(sid).cloned().ok_or_else(|| {
                ApiError::not_found(format!("no session {sid:?} in sandbox {id}"))
            })?;
        let max_output = body
            .max_output_bytes
            .unwrap_or(api::DEFAULT_MAX_OUTPUT)
            .min(api::MAX_MAX_OUTPUT);
        let timeout = Duration::from_millis(body.timeout_ms.unwrap_or(60_000));
        let out = session.run(body.command, timeout, max_output).await?;
        Ok(SessionResult {
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            stdout_truncated: out.stdout_truncated,
            stderr_truncated: out.stderr_truncated,
            exit_code: out.exit_code,
            timed_out: out.timed_out,
            session_alive: out.alive,
            duration_ms: out.duration.as_secs_f64() * 1e3,
        })
    }

    /// Ends a session.
    pub async fn stop_session(&self, id: &str, sid: &str) -> Result<(), ApiError> {
        let sb = self.live(id).await?;
        let removed = sb.sessions.lock().await.remove(sid);
        removed
            .map(|_| ())
            .ok_or_else(|| ApiError::not_found(format!("no session {sid:?} in sandbox {id}")))
    }

    /// Stops every sandbox (daemon shutdown); they are recorded as `lost`.
    pub async fn shutdown(&self) {
        let all: Vec<_> = self.live.write().await.drain().collect();
        for (id, sb) in all {
            let cg = sb.cgroup.clone();
            let _ = blocking(move || cg.destroy()).await;
            let _ = self.store.set_status(
                &id,
                "lost",
                Some("the daemon stopped; its processes were stopped"),
            );
        }
        self.cgroups.remove_parent();
    }

    /// Where a sandbox's files live on the host (for tests and debugging).
    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.config.store_dir().join("sandboxes").join(id)
    }
}
