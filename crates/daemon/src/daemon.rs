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
use crate::api::{CheckpointInfo, MemoryFill, RollbackInfo};
use crate::compaction::{MergeIndex, MergedLayer};
use crate::error::{start_err, StartError};
use crate::sandbox::Sandbox;
use crate::store::{CheckpointRow, FsState, Store};
use crate::{ApiError, Config};
use deltabox_runtime::generation::SwitchSpec;
use deltabox_runtime::keeper::{KeeperReply, KeeperRequest};

/// Removes a half-created sandbox's cgroup (killing anything in it) and directory when dropped, unless
/// disarmed once the sandbox is registered.
struct Undo {
    dirs: Vec<PathBuf>,
    cgroup: Option<deltabox_runtime::Cgroup>,
}

impl Undo {
    fn disarm(&mut self) {
        self.dirs.clear();
        self.cgroup = None;
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        if let Some(cg) = self.cgroup.take() {
            let _ = cg.destroy();
        }
        for dir in self.dirs.drain(..) {
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
    /// Held from creating a layer until it is recorded, and by layer GC: GC never sees an unrecorded layer.
    layers_lock: tokio::sync::Mutex<()>,
    /// Wakes the background layer GC.
    gc_wanted: Arc<tokio::sync::Notify>,
    /// Layers that may have lost their last user, for the GC to check.
    gc_candidates: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Merged layers, for rewriting chains (mirrors the `merged_layers` table).
    merges: std::sync::Mutex<MergeIndex>,
    /// Layers a compaction in progress reads or writes: GC keeps them though nothing records them yet.
    pins: std::sync::Mutex<HashMap<String, usize>>,
    /// Wakes the background compactor.
    compact_wanted: Arc<tokio::sync::Notify>,
    /// One compaction pass at a time.
    compact_lock: tokio::sync::Mutex<()>,
    /// One template budget pass at a time.
    budget_lock: tokio::sync::Mutex<()>,
    /// A budget check is scheduled (bursts of checkpoints share one).
    budget_due: std::sync::atomic::AtomicBool,
    /// Process checkpoints whose templates were evicted (rollback says so).
    evicted: std::sync::Mutex<std::collections::HashSet<String>>,
    /// One checkpoint's durable images written at a time.
    durable_lock: tokio::sync::Mutex<()>,
    /// Why a checkpoint's durable images could not be written.
    durable_errors: std::sync::Mutex<HashMap<String, String>>,
    /// Request counts and latencies (`GET /v1/metrics`).
    pub metrics: crate::metrics::Metrics,
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

/// Runs a short blocking call on the latency-critical path (a keeper request) right on this worker thread
/// (`block_in_place`: other tasks move to another worker) instead of handing it to the blocking pool and back,
/// which costs two thread wake-ups. Falls back to the pool on a single-threaded runtime.
async fn blocking_here<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::MultiThread => Ok(tokio::task::block_in_place(f)),
        _ => blocking(f).await,
    }
}

/// Runs the current (blocking-pool) thread at nice 19 until dropped.
struct LowPriority;

impl LowPriority {
    fn here() -> LowPriority {
        // SAFETY: setpriority(2) on our own thread id, plain integers.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
        LowPriority
    }
}

impl Drop for LowPriority {
    fn drop(&mut self) {
        // SAFETY: as above; back to normal for the next job the pool gives this thread.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 0) };
    }
}

/// Sessions for interpreters (sandbox pids `pids`) that got new pipes from the keeper: `fds` holds their ends,
/// four per interpreter in that order (command, stdout, stderr, status); each session keeps the id `snapshot`
/// gives its pid.
async fn adopt_sessions(
    handle: &deltabox_runtime::SandboxHandle,
    pids: &[i32],
    fds: Vec<std::os::fd::OwnedFd>,
    snapshot: &[(String, i32, deltabox_runtime::SessionKind)],
) -> Result<Vec<(String, Arc<Session>)>, ApiError> {
    let mut fds = fds.into_iter();
    let mut adopted = Vec::new();
    for pid in pids {
        let (Some(cmd), Some(out), Some(err), Some(status)) =
            (fds.next(), fds.next(), fds.next(), fds.next())
        else {
            break;
        };
        let Some((sid, _, kind)) = snapshot.iter().find(|(_, p, _)| p == pid) else {
            continue;
        };
        let exit = handle.track(*pid).await?;
        let pipes = deltabox_runtime::session::SessionPipes {
            cmd,
            out,
            err,
            status,
        };
        let session = Session::adopt(handle, *kind, *pid, pipes, exit)?;
        adopted.push((sid.clone(), Arc::new(session)));
    }
    Ok(adopted)
}

/// Where a rollback's processes come from.
#[derive(Clone, Copy)]
enum RollbackVia<'a> {
    /// The templates the keeper holds.
    Templates,
    /// Nowhere: files only (the note says why), processes killed.
    Files(&'a str),
    /// The checkpoint's durable images in this directory (templates rebuilt first, their memory filled so).
    Images(&'a std::path::Path, MemoryFill),
}

/// Whether checkpoint `cid` was taken with its processes (recorded so that a rollback after a restart can say why
/// they were restarted instead).
fn ck_has_processes(store: &Store, cid: &str) -> bool {
    store.checkpoint_has_processes(cid).unwrap_or(false)
}

/// Layers kept free below overlayfs's limit before a checkpoint compacts synchronously.
const COMPACT_MARGIN: usize = 8;

/// Most sandboxes one fork call may create.
pub const MAX_FORK: usize = 64;

/// What every branch of one fork gets.
#[derive(Clone, Copy)]
struct BranchPlan<'a> {
    cid: &'a str,
    n: usize,
    limits: Limits,
    network: NetworkMode,
    image: &'a deltabox_fs::BaseImage,
    chain: &'a [String],
    base: &'a [PathBuf],
}

/// A sandbox's hostname: `dbx-` and the first 8 characters of its id.
fn hostname_of(id: &str) -> String {
    format!("dbx-{}", &id[..8.min(id.len())])
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
        let merges = MergeIndex::new(
            store
                .merged_layers()
                .map_err(|e| start_err("read merged layers", e))?,
        );
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
            layers_lock: Default::default(),
            gc_wanted: Default::default(),
            gc_candidates: Default::default(),
            merges: std::sync::Mutex::new(merges),
            pins: Default::default(),
            compact_wanted: Default::default(),
            compact_lock: Default::default(),
            budget_lock: Default::default(),
            budget_due: Default::default(),
            evicted: Default::default(),
            durable_lock: Default::default(),
            durable_errors: Default::default(),
            metrics: Default::default(),
        });
        d.recover();
        // Unreachable layers are deleted in the background, off every request's critical path; requests only
        // ask (and many asks coalesce into one pass).
        let (weak, wanted) = (Arc::downgrade(&d), d.gc_wanted.clone());
        tokio::spawn(async move {
            loop {
                wanted.notified().await;
                let Some(d) = weak.upgrade() else { return };
                d.gc_layers().await;
            }
        });
        // Long chains are compacted in the background too (a checkpoint waits only if a chain nears the limit).
        let (weak, wanted) = (Arc::downgrade(&d), d.compact_wanted.clone());
        tokio::spawn(async move {
            loop {
                wanted.notified().await;
                let Some(d) = weak.upgrade() else { return };
                if let Err(e) = d.compact().await {
                    tracing::warn!("compaction: {}", e.message);
                }
            }
        });
        d.compact_wanted.notify_one();
        // Templates grow after the checkpoint (the background huge-page collapse makes them full copies; the
        // live processes rewrite shared pages): the budget is checked again every few seconds.
        let weak = Arc::downgrade(&d);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let Some(d) = weak.upgrade() else { return };
                d.enforce_template_budget().await;
            }
        });
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
        // Layers created but never recorded (the daemon died mid-checkpoint, mid-create or mid-compaction) are
        // leftovers too.
        for dir in self.unused_layers(None).unwrap_or_default() {
            let _ = std::fs::remove_dir_all(dir);
        }
        // Images whose writing was interrupted are never trusted.
        if let Ok(dir) = std::fs::read_dir(self.config.store_dir().join("process-images")) {
            for e in dir.flatten() {
                if e.path().extension().is_some_and(|x| x == "partial") {
                    let _ = std::fs::remove_dir_all(e.path());
                }
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
    /// What the metrics' gauges show.
    pub async fn gauges(&self) -> crate::metrics::Gauges {
        let mut sandboxes = std::collections::BTreeMap::new();
        for s in self.store.list().unwrap_or_default() {
            *sandboxes.entry(s.status).or_insert(0) += 1;
        }
        let live = self.live.read().await;
        let warm = live
            .values()
            .map(|sb| sb.kept.lock().map(|k| k.len()).unwrap_or(0))
            .sum();
        crate::metrics::Gauges {
            sandboxes,
            live: live.values().filter(|sb| sb.handle.is_alive()).count(),
            checkpoints: self.store.all_checkpoints().map(|c| c.len()).unwrap_or(0),
            warm,
        }
    }

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
        let images = self.images.clone();
        let image_ref = req.image.clone();
        let image = blocking(move || images.resolve(image_ref.as_deref())).await??;
        let start = FsState {
            upper: String::new(),
            chain: vec![],
            base: image.layers.clone(),
            head: None,
        };
        self.create_on(limits, network, &image, start, None).await
    }

    /// Creates and starts a sandbox whose files are `start.chain` over `start.base` (empty for a new sandbox,
    /// a checkpoint's chain for a fork), with a fresh writable layer.
    async fn create_on(
        self: &Arc<Self>,
        limits: Limits,
        network: NetworkMode,
        image: &deltabox_fs::BaseImage,
        start: FsState,
        branch_of: Option<&Sandbox>,
    ) -> Result<SandboxInfo, ApiError> {
        let id = random_id("");
        let hostname = hostname_of(&id);
        let _layers = self.layers_lock.lock().await;
        // Until the sandbox is registered, any failure undoes what was made so far.
        let mut undo = Undo {
            dirs: vec![self.sandbox_dir(&id)],
            cgroup: None,
        };
        let upper = self.new_layer()?;
        undo.dirs.push(self.layer_dir(&upper));
        let prepared = (|| -> std::io::Result<()> {
            let diff = self.layer_dir(&upper).join("diff");
            std::fs::create_dir_all(diff.join("etc"))?;
            std::fs::create_dir_all(self.sandbox_dir(&id).join("rootfs"))?;
            std::fs::write(diff.join("etc/hostname"), format!("{hostname}\n"))?;
            if start.chain.is_empty() {
                // `/tmp` lives in the layers like every other directory, so checkpoints and rollbacks cover it;
                // opaque, so nothing of the base image's (or the host's) `/tmp` shows through.
                use std::os::unix::fs::PermissionsExt;
                let tmp = diff.join("tmp");
                std::fs::create_dir_all(&tmp)?;
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777))?;
                deltabox_fs::whiteout::make_opaque(&tmp).map_err(std::io::Error::other)?;
            }
            std::fs::write(
                diff.join("etc/hosts"),
                format!("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n"),
            )
        })();
        prepared.map_err(|e| ApiError::internal(format!("prepare sandbox directory: {e}")))?;
        let cgroup = self.cgroups.create(&id, &limits)?;
        undo.cgroup = Some(cgroup.clone());
        let mut fs = FsState { upper, ..start };
        if let Some(cid) = fs.head.clone() {
            fs.chain = self.current_chain(&cid)?;
        }
        let sb = self
            .start_init(&id, network, &fs, cgroup, image.config.clone(), branch_of)
            .await?;
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
            init_pid: Some(sb.handle.init_pid()),
            sessions: 0,
            upper: Some(self.layer_dir(&fs.upper).join("diff").display().to_string()),
            head: fs.head.clone(),
            depth: self.depth(&fs.chain),
            branch_of: branch_of.map(|b| b.id.clone()),
            forked_processes: Vec::new(),
            note: None,
        };
        if let Err(e) = self
            .store
            .insert(&info)
            .and_then(|()| self.store.set_fs_state(&id, &fs))
        {
            let _ = self.store.delete(&id);
            return Err(e.into());
        }
        undo.disarm();
        self.register(sb).await;
        Ok(info)
    }

    /// A layer's directory (`diff/` holds its files, `work/` is overlayfs's scratch space while it is writable).
    fn layer_dir(&self, layer: &str) -> PathBuf {
        self.config.store_dir().join("layers").join(layer)
    }

    /// Creates an empty layer; returns its id. Call with `layers_lock` held until the layer is recorded.
    fn new_layer(&self) -> Result<String, ApiError> {
        let id = random_id("l-");
        let dir = self.layer_dir(&id);
        std::fs::create_dir_all(dir.join("diff"))
            .and_then(|()| std::fs::create_dir_all(dir.join("work")))
            .map_err(|e| ApiError::internal(format!("create layer {}: {e}", dir.display())))?;
        Ok(id)
    }

    /// The overlay for a sandbox's layers.
    fn stack(&self, fs: &FsState) -> LayerStack {
        let mut lowers: Vec<PathBuf> = fs
            .chain
            .iter()
            .map(|l| self.layer_dir(l).join("diff"))
            .collect();
        lowers.extend(fs.base.iter().cloned());
        LayerStack {
            lowers,
            upper: self.layer_dir(&fs.upper).join("diff"),
            work: self.layer_dir(&fs.upper).join("work"),
        }
    }

    /// Starts a sandbox's init on `fs` in `cgroup` (a new sandbox, or a rollback's fresh start).
    async fn start_init(
        &self,
        id: &str,
        network: NetworkMode,
        fs: &FsState,
        cgroup: deltabox_runtime::Cgroup,
        image_config: deltabox_fs::ImageConfig,
        branch_of: Option<&Sandbox>,
    ) -> Result<Arc<Sandbox>, ApiError> {
        let hostname = hostname_of(id);
        let spec = SandboxSpec {
            branch_of: branch_of.map(|b| b.handle.init_pid()),
            id: id.to_string(),
            hostname: hostname.to_string(),
            layers: self.stack(fs),
            rootfs: self.sandbox_dir(id).join("rootfs"),
            cgroup_procs: cgroup.procs_files(),
            network,
        };
        std::fs::create_dir_all(&spec.rootfs)
            .map_err(|e| ApiError::internal(format!("create {}: {e}", spec.rootfs.display())))?;
        let zygote = self.zygote.clone();
        let (pid, ctrl) = blocking(move || zygote.create(&spec)).await??;
        let handle = SandboxHandle::new(pid, ctrl)?;
        Ok(Arc::new(Sandbox {
            id: id.to_string(),
            handle,
            cgroup,
            image_config,
            hostname: hostname.to_string(),
            network,
            fs: std::sync::Mutex::new(fs.clone()),
            sessions: Default::default(),
            lifecycle: Default::default(),
            keeper: Default::default(),
            kept: Default::default(),
            dormant: Default::default(),
            branch_of: branch_of.map(|b| b.id.clone()),
        }))
    }

    /// Makes a started sandbox reachable, and watches its init: if it dies on its own (killed from the host,
    /// OOM), the sandbox is recorded as exited and its cgroup freed.
    async fn register(self: &Arc<Self>, sb: Arc<Sandbox>) {
        self.live.write().await.insert(sb.id.clone(), sb.clone());
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            sb.handle.closed().await;
            let Some(d) = me.upgrade() else { return };
            let mut live = d.live.write().await;
            // Only if this very sandbox is still the registered one (a rollback replaces it on purpose).
            if live.get(&sb.id).is_some_and(|cur| Arc::ptr_eq(cur, &sb)) {
                live.remove(&sb.id);
                drop(live);
                let cg = sb.cgroup.clone();
                let _ = blocking(move || cg.destroy()).await;
                let _ =
                    d.store
                        .set_status(&sb.id, "exited", Some("the sandbox's init process exited"));
            }
        });
    }

    /// Deletes the candidate layers (see [`Daemon::gc_later`]) that nothing uses any more, merged layers included.
    async fn gc_layers(&self) {
        let _layers = self.layers_lock.lock().await;
        let candidates: Vec<String> = match self.gc_candidates.lock() {
            Ok(mut c) => c.drain().collect(),
            Err(_) => return,
        };
        if candidates.is_empty() {
            return;
        }
        let t = std::time::Instant::now();
        let Ok(dead) = self.unused_layers(Some(candidates)) else {
            return;
        };
        tracing::debug!(
            "layer gc: {} unused layers found in {:.2} ms",
            dead.len(),
            t.elapsed().as_secs_f64() * 1e3
        );
        let _ = blocking(move || {
            for dir in dead {
                let _ = std::fs::remove_dir_all(dir);
            }
        })
        .await;
    }

    /// Queues layers that may have lost their last user for the background GC.
    fn gc_later(&self, layers: impl IntoIterator<Item = String>) {
        if let Ok(mut c) = self.gc_candidates.lock() {
            c.extend(layers);
        }
        self.gc_wanted.notify_one();
    }

    /// The layers a sandbox on `fs` holds: its writable layer, its mounted chain, and the merged layers its next
    /// checkpoint would use (GC candidates once it leaves them).
    fn held_by(&self, fs: &FsState) -> Vec<String> {
        let mut used = std::collections::HashSet::new();
        if let Ok(m) = self.merges.lock() {
            m.rewrite_noting(&fs.chain, &mut used);
        }
        used.into_iter()
            .chain(fs.chain.iter().cloned())
            .chain(std::iter::once(fs.upper.clone()))
            .collect()
    }

    /// The directories of layers nothing needs, among `candidates` (every layer directory if `None`): not a
    /// sandbox's (mounted, or compacted for its next checkpoint), not a checkpoint's, not pinned. Merged layers
    /// among them are forgotten at once. Call with `layers_lock` held (or before anything else runs).
    fn unused_layers(&self, candidates: Option<Vec<String>>) -> Result<Vec<PathBuf>, ApiError> {
        let mut used = self.store.sandbox_layers()?;
        let sandboxes = self.store.list()?;
        let mut merges = self
            .merges
            .lock()
            .map_err(|_| ApiError::internal("poisoned"))?;
        for s in sandboxes {
            if let Some(fs) = self.store.fs_state(&s.id)? {
                merges.rewrite_noting(&fs.chain, &mut used);
            }
        }
        if let Ok(pins) = self.pins.lock() {
            used.extend(pins.keys().cloned());
        }
        let unused = |l: &str| !used.contains(l) && !self.store.checkpoint_uses(l);
        let dead_merged: Vec<String> = merges.ids().filter(|id| unused(id)).cloned().collect();
        self.store.delete_merged(&dead_merged)?;
        for id in &dead_merged {
            merges.remove(id);
        }
        let layers = self.config.store_dir().join("layers");
        let names: Vec<String> = match candidates {
            Some(c) => c,
            None => std::fs::read_dir(&layers)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
        };
        Ok(names
            .into_iter()
            .filter(|l| !l.is_empty() && valid_id(l) && unused(l))
            .map(|l| layers.join(l))
            .collect())
    }

    /// Keeps `layers` from GC until unpinned (call with `layers_lock` held, or on layers already protected).
    fn pin<'a>(&self, layers: impl IntoIterator<Item = &'a String>) {
        if let Ok(mut pins) = self.pins.lock() {
            for l in layers {
                *pins.entry(l.clone()).or_default() += 1;
            }
        }
    }

    /// Undoes one [`Daemon::pin`] of `layers`.
    fn unpin<'a>(&self, layers: impl IntoIterator<Item = &'a String>) {
        if let Ok(mut pins) = self.pins.lock() {
            for l in layers {
                if let Some(n) = pins.get_mut(l) {
                    *n -= 1;
                    if *n == 0 {
                        pins.remove(l);
                    }
                }
            }
        }
    }

    /// A checkpoint's chain as recorded now, compacted (call with `layers_lock` held: compaction may have rewritten
    /// it, and GC may have freed the layers of an older reading, since the caller last looked).
    fn current_chain(&self, cid: &str) -> Result<Vec<String>, ApiError> {
        let ck = self.store.checkpoint(cid)?.ok_or_else(|| {
            ApiError::not_found(format!("checkpoint {cid} was deleted meanwhile"))
        })?;
        self.rewrite(&ck.chain)
    }

    /// `chain` with the runs merged layers cover replaced by them.
    fn rewrite(&self, chain: &[String]) -> Result<Vec<String>, ApiError> {
        Ok(self
            .merges
            .lock()
            .map_err(|_| ApiError::internal("poisoned"))?
            .rewrite(chain))
    }

    /// The chain a checkpoint of a sandbox on `fs` gets: its writable layer over its (compacted) chain.
    fn next_chain(&self, fs: &FsState) -> Result<Vec<String>, ApiError> {
        let mut chain = vec![fs.upper.clone()];
        chain.extend(self.rewrite(&fs.chain)?);
        Ok(chain)
    }

    /// A chain's depth in checkpoints.
    fn depth(&self, chain: &[String]) -> usize {
        self.merges
            .lock()
            .map(|m| m.depth(chain) as usize)
            .unwrap_or(chain.len())
    }

    /// Merges runs of old layers of long chains (see [`crate::compaction`]) until no chain that needs it can be
    /// shortened further; returns how many merged layers were built. Checkpoint chains are rewritten to use them;
    /// running sandboxes keep their mounted chain and use the merged layers from their next generation on.
    pub async fn compact(&self) -> Result<usize, ApiError> {
        let _one = self.compact_lock.lock().await;
        let (at, fanout) = (self.config.compact_at, self.config.compact_fanout);
        let mut built = 0;
        // Each round merges one level; a few rounds suffice for any chain.
        for _round in 0..32 {
            let plan = {
                let _layers = self.layers_lock.lock().await;
                let mut chains: Vec<Vec<String>> = self
                    .store
                    .long_chains(at)?
                    .into_iter()
                    .map(|(_, c)| c)
                    .collect();
                for s in self.store.list()? {
                    if let Some(fs) = self.store.fs_state(&s.id)? {
                        chains.push(fs.chain);
                    }
                }
                let merges = self
                    .merges
                    .lock()
                    .map_err(|_| ApiError::internal("poisoned"))?;
                let mut todo: HashMap<Vec<String>, u64> = HashMap::new();
                for c in chains {
                    let c = merges.rewrite(&c);
                    if c.len() < at {
                        continue;
                    }
                    for (parts, span) in merges.next_merges(&c, fanout) {
                        if merges.by_parts(&parts).is_none() {
                            todo.insert(parts, span);
                        }
                    }
                }
                drop(merges);
                let plan: Vec<MergedLayer> = todo
                    .into_iter()
                    .map(|(parts, span)| MergedLayer {
                        id: random_id("m-"),
                        parts,
                        span,
                    })
                    .collect();
                for m in &plan {
                    self.pin(std::iter::once(&m.id).chain(&m.parts));
                }
                plan
            };
            if plan.is_empty() {
                break;
            }
            let result = self.build_merged(&plan).await;
            let recorded = match result {
                Ok(()) => self.record_merged(&plan, at).await,
                Err(e) => Err(e),
            };
            for m in &plan {
                self.unpin(std::iter::once(&m.id).chain(&m.parts));
            }
            match recorded {
                Ok(orphans) => self.gc_later(orphans),
                Err(e) => {
                    for m in &plan {
                        let _ = std::fs::remove_dir_all(self.layer_dir(&m.id));
                    }
                    return Err(e);
                }
            }
            built += plan.len();
        }
        Ok(built)
    }

    /// Writes the merged layers of `plan` (off the async runtime).
    async fn build_merged(&self, plan: &[MergedLayer]) -> Result<(), ApiError> {
        let jobs: Vec<(Vec<PathBuf>, PathBuf)> = plan
            .iter()
            .map(|m| {
                (
                    m.parts
                        .iter()
                        .map(|p| self.layer_dir(p).join("diff"))
                        .collect(),
                    self.layer_dir(&m.id).join("diff"),
                )
            })
            .collect();
        blocking(move || -> Result<(), ApiError> {
            for (parts, out) in jobs {
                std::fs::create_dir_all(&out)
                    .map_err(|e| ApiError::internal(format!("create {}: {e}", out.display())))?;
                deltabox_fs::compact::merge_layers(&parts, &out)
                    .map_err(|e| ApiError::internal(format!("merge layers: {e}")))?;
            }
            Ok(())
        })
        .await?
    }

    /// Records built merged layers and rewrites the long checkpoint chains to use them, atomically.
    async fn record_merged(
        &self,
        plan: &[MergedLayer],
        at: usize,
    ) -> Result<Vec<String>, ApiError> {
        let _layers = self.layers_lock.lock().await;
        let mut merges = self
            .merges
            .lock()
            .map_err(|_| ApiError::internal("poisoned"))?;
        let mut next = merges.clone();
        for m in plan {
            next.insert(m.clone());
        }
        let rewritten: Vec<(String, Vec<String>)> = self
            .store
            .long_chains(at)?
            .into_iter()
            .filter_map(|(id, chain)| {
                let new = next.rewrite(&chain);
                (new != chain).then_some((id, new))
            })
            .collect();
        let orphans = self.store.record_merges(plan, &rewritten, now())?;
        *merges = next;
        Ok(orphans)
    }

    /// Checkpoints a running sandbox's files: its writable layer is frozen into the chain and the sandbox moves,
    /// processes and all, onto a new generation with a fresh writable layer. No data is copied.
    pub async fn checkpoint(
        self: &Arc<Self>,
        id: &str,
        opts: &crate::api::CheckpointBody,
    ) -> Result<CheckpointInfo, ApiError> {
        let processes = opts.processes;
        let start = std::time::Instant::now();
        let sb = self.live(id).await?;
        let _g = sb.lifecycle.lock().await;
        Self::check_running(&sb)?;
        let keeper = if processes {
            Some(self.keeper_of(&sb).await?)
        } else {
            None
        };
        let fs_now = || -> Result<FsState, ApiError> {
            Ok(sb
                .fs
                .lock()
                .map_err(|_| ApiError::internal("poisoned"))?
                .clone())
        };
        let before = fs_now()?;
        if self.next_chain(&before)?.len() + before.base.len() + COMPACT_MARGIN
            > deltabox_fs::overlay::MAX_LOWER_LAYERS
        {
            // Checkpoints came faster than background compaction: compact now rather than fail.
            if let Err(e) = self.compact().await {
                tracing::warn!("compaction: {}", e.message);
            }
        }
        let _layers = self.layers_lock.lock().await;
        let cur = fs_now()?;
        let chain = self.next_chain(&cur)?;
        if chain.len() + cur.base.len() > deltabox_fs::overlay::MAX_LOWER_LAYERS {
            return Err(ApiError::conflict(
                "chain_too_deep",
                format!(
                    "sandbox {id}'s chain has {} layers and compaction could not shorten it (see the daemon log)",
                    chain.len()
                ),
            ));
        }
        let cid = random_id("c-");
        let next = FsState {
            upper: self.new_layer()?,
            chain: chain.clone(),
            base: cur.base.clone(),
            head: Some(cid.clone()),
        };
        let spec = SwitchSpec {
            init_pid: sb.handle.init_pid(),
            cgroup: sb.cgroup.clone(),
            layers: self.stack(&next),
            keeper_pid: sb.keeper.lock().await.as_ref().map(|k| k.pid()),
            templates: None,
        };
        let switched = match keeper {
            None => {
                let zygote = self.zygote.clone();
                blocking(move || zygote.switch(&spec))
                    .await?
                    .map(|r| (r, Vec::new()))
                    .map_err(|e| e.to_string())
            }
            Some(keeper) => {
                let req = KeeperRequest::Checkpoint {
                    id: cid.clone(),
                    switch: spec,
                    huge_pages: opts.huge_pages.unwrap_or(true),
                };
                match blocking_here(move || keeper.request(&req)).await? {
                    Ok(KeeperReply::Checkpointed { report, pids }) => Ok((report, pids)),
                    Ok(KeeperReply::Failed { error }) => Err(error),
                    Ok(other) => Err(format!("unexpected keeper reply {other:?}")),
                    Err(e) => Err(e.to_string()),
                }
            }
        };
        let (report, pids) = match switched {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_dir_all(self.layer_dir(&next.upper));
                return Err(ApiError::conflict("checkpoint_refused", e));
            }
        };
        if processes {
            let sessions: Vec<(String, i32, deltabox_runtime::SessionKind)> = sb
                .sessions
                .lock()
                .await
                .iter()
                .filter(|(_, s)| pids.contains(&s.pid()))
                .map(|(sid, s)| (sid.clone(), s.pid(), s.kind()))
                .collect();
            if let Ok(mut kept) = sb.kept.lock() {
                kept.insert(
                    cid.clone(),
                    crate::sandbox::KeptCheckpoint {
                        sessions,
                        processes: pids.len(),
                        last_used: std::time::Instant::now(),
                    },
                );
            }
            // Off the critical path (it walks every template's page tables): keep the template pool within its
            // budget, once for a burst of checkpoints.
            if !self
                .budget_due
                .swap(true, std::sync::atomic::Ordering::AcqRel)
            {
                let me = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    me.budget_due
                        .store(false, std::sync::atomic::Ordering::Release);
                    me.enforce_template_budget().await
                });
            }
        }
        // Fault injection for tests: die between switching and recording, as a crash or kill -9 would.
        if self
            .config
            .state_dir
            .join("fault-crash-after-switch")
            .exists()
        {
            std::process::abort();
        }
        // The sandbox runs on the new generation from here on, whatever the database says.
        *sb.fs.lock().map_err(|_| ApiError::internal("poisoned"))? = next.clone();
        let row = CheckpointRow {
            id: cid.clone(),
            sandbox_id: id.to_string(),
            parent: cur.head.clone(),
            chain,
            base: cur.base,
            created_at: now(),
            processes,
            pinned: false,
        };
        self.store.record_checkpoint(&row, &next)?;
        if processes && self.config.durable {
            self.write_images_later(sb.clone(), cid.clone());
        }
        // Layers its mounted chain had that the compacted one replaced.
        let replaced: Vec<String> = cur
            .chain
            .iter()
            .filter(|l| !row.chain.contains(l))
            .cloned()
            .collect();
        if !replaced.is_empty() {
            self.gc_later(replaced);
        }
        if row.chain.len() >= self.config.compact_at {
            self.compact_wanted.notify_one();
        }
        Ok(CheckpointInfo {
            id: cid,
            sandbox_id: id.to_string(),
            parent: row.parent,
            created_at: row.created_at,
            depth: self.depth(&row.chain),
            layers: row.chain.len(),
            duration_ms: start.elapsed().as_secs_f64() * 1e3,
            switch: Some(report),
            with_processes: processes,
            processes: pids,
            templates: None,
            durable: false,
            durable_error: None,
            pinned: false,
            image_bytes: 0,
            image_new_bytes: 0,
            image_unchanged_bytes: 0,
        })
    }

    /// What the templates of each of a sandbox's kept process checkpoints cost (empty without a keeper).
    async fn template_costs(
        &self,
        sb: &Sandbox,
    ) -> HashMap<String, deltabox_runtime::keeper::TemplateCost> {
        let Some(keeper) = sb.keeper.lock().await.clone() else {
            return HashMap::new();
        };
        let kept = match blocking(move || keeper.request(&KeeperRequest::Stats)).await {
            Ok(Ok(KeeperReply::Stats(m))) => m,
            _ => return HashMap::new(),
        };
        // The page-table walks happen here, not in the keeper (which must stay free for rollbacks).
        blocking(move || {
            kept.into_iter()
                .map(|(cid, t)| (cid, deltabox_runtime::keeper::TemplateCost::measure(&t)))
                .collect()
        })
        .await
        .unwrap_or_default()
    }

    /// Evicts the least recently used process checkpoints' templates while all templates together hold more
    /// memory (PSS) than the budget, a sandbox's templates hold more than half its memory limit (they are charged
    /// to it: beyond that its own processes would meet the OOM killer), or a sandbox holds more templates than
    /// allowed (they count against its pids limit). An evicted checkpoint keeps its files and its durable images
    /// (written first); rolling back to it rebuilds the templates from them.
    pub async fn enforce_template_budget(&self) {
        let _one = self.budget_lock.lock().await;
        let sandboxes: Vec<Arc<Sandbox>> = self.live.read().await.values().cloned().collect();
        // (last used, sandbox, checkpoint, pss, processes)
        let mut entries = Vec::new();
        let mut per_sandbox: HashMap<String, usize> = HashMap::new();
        let mut pss_of: HashMap<String, u64> = HashMap::new();
        let mut limit_of: HashMap<String, u64> = HashMap::new();
        let mut total = 0u64;
        for sb in &sandboxes {
            if sb.kept.lock().map_or(true, |k| k.is_empty()) {
                continue;
            }
            let costs = self.template_costs(sb).await;
            let Ok(kept) = sb.kept.lock().map(|k| k.clone()) else {
                continue;
            };
            if let Some(limit) = self
                .store
                .get(&sb.id)
                .ok()
                .flatten()
                .and_then(|i| i.memory_bytes)
            {
                limit_of.insert(sb.id.clone(), limit / 2);
            }
            for (cid, cost) in costs {
                let Some(k) = kept.get(&cid) else { continue };
                total += cost.pss;
                *per_sandbox.entry(sb.id.clone()).or_default() += cost.processes;
                *pss_of.entry(sb.id.clone()).or_default() += cost.pss;
                entries.push((k.last_used, sb.clone(), cid, cost.pss, cost.processes));
            }
        }
        entries.sort_by_key(|e| e.0);
        for (_, sb, cid, pss, n) in entries {
            let count = per_sandbox.get(&sb.id).copied().unwrap_or(0);
            let mine = pss_of.get(&sb.id).copied().unwrap_or(0);
            let over_limit = limit_of.get(&sb.id).is_some_and(|l| mine > *l);
            if total <= self.config.template_budget
                && count <= self.config.max_templates
                && !over_limit
            {
                continue;
            }
            let Some(keeper) = sb.keeper.lock().await.clone() else {
                continue;
            };
            // Its durable images first (if the background writer has not got to them yet): an evicted
            // checkpoint stays restorable. If they cannot be written it is evicted all the same (the budget
            // wins) and rollback says why its processes were restarted.
            if self.config.durable {
                let _w = self.durable_lock.lock().await;
                if let Err(e) = self.write_images(&sb, &cid).await {
                    if let Ok(mut errs) = self.durable_errors.lock() {
                        errs.insert(cid.clone(), e);
                    }
                }
            }
            // Not while a rollback or fork uses the sandbox's templates; and no longer listed as kept before the
            // keeper forgets them, so that nothing asks the keeper for them afterwards.
            let _g = sb.lifecycle.lock().await;
            if let Ok(mut k) = sb.kept.lock() {
                k.remove(&cid);
            }
            if let Ok(mut e) = self.evicted.lock() {
                e.insert(cid.clone());
            }
            let req = KeeperRequest::Forget {
                ids: vec![cid.clone()],
            };
            let _ = blocking(move || keeper.request(&req)).await;
            tracing::info!("template pool: evicted the processes of checkpoint {cid} ({pss} bytes, {n} processes)");
            total = total.saturating_sub(pss);
            per_sandbox.insert(sb.id.clone(), count.saturating_sub(n));
            pss_of.insert(sb.id.clone(), mine.saturating_sub(pss));
        }
    }

    /// Pins (or unpins) a checkpoint: `gc` keeps pinned checkpoints and every checkpoint they build on.
    pub async fn pin_checkpoint(&self, cid: &str, pinned: bool) -> Result<(), ApiError> {
        if !valid_id(cid) || !self.store.set_pinned(cid, pinned)? {
            return Err(ApiError::not_found(format!("no checkpoint {cid:?}")));
        }
        Ok(())
    }

    /// Deletes every checkpoint nothing keeps (with `dry_run`, only says which). Kept: pinned checkpoints; the
    /// checkpoint each sandbox's current files build on (its head: every sandbox, running or not, forks
    /// included); and every ancestor of a kept checkpoint. A collected checkpoint goes as with
    /// `rm-checkpoint` — its templates, images and the layers only it used — deepest first, so no deletion is
    /// refused for a later checkpoint still building on it.
    pub async fn gc(&self, dry_run: bool) -> Result<api::GcReport, ApiError> {
        let all = self.store.all_checkpoints()?;
        let parent: HashMap<String, Option<String>> = all
            .iter()
            .map(|c| (c.id.clone(), c.parent.clone()))
            .collect();
        let kept = self.kept_checkpoints()?;
        let depth = |c: &CheckpointRow| {
            let mut n = 0usize;
            let mut cur = c.parent.clone();
            while let Some(p) = cur {
                n += 1;
                cur = parent.get(&p).cloned().flatten();
            }
            n
        };
        // Deepest first: a collected checkpoint's descendants are collected too (were one kept, so would it be).
        let mut gone: Vec<&CheckpointRow> = all.iter().filter(|c| !kept.contains(&c.id)).collect();
        gone.sort_by_key(|c| std::cmp::Reverse(depth(c)));
        let mut report = api::GcReport {
            dry_run,
            kept: kept.len(),
            ..Default::default()
        };
        for c in gone {
            let images = deltabox_runtime::durable::ImagesMeta::read(&self.images_dir(&c.id))
                .map(|m| m.bytes - m.shared.min(m.bytes))
                .unwrap_or(0);
            if !dry_run {
                // Serialized with rollbacks of its sandbox (they hold this lock while they move its head), and
                // checked again: one may have made it a head (or someone pinned it) since the plan was made.
                let sb = self.live.read().await.get(&c.sandbox_id).cloned();
                let _g = match &sb {
                    Some(sb) => Some(sb.lifecycle.lock().await),
                    None => None,
                };
                if self.kept_checkpoints()?.contains(&c.id) {
                    report
                        .refused
                        .push(format!("{}: pinned or built on since gc started", c.id));
                    continue;
                }
                if let Err(e) = self.remove_checkpoint(&c.id).await {
                    report.refused.push(format!("{}: {}", c.id, e.message));
                    continue;
                }
            }
            report.image_bytes += images;
            report.removed.push(api::GcEntry {
                id: c.id.clone(),
                sandbox_id: c.sandbox_id.clone(),
                created_at: c.created_at,
                with_processes: c.processes,
            });
        }
        Ok(report)
    }

    /// Writes checkpoint `cid` (its files, its process images if durable, its sandbox's settings) to the archive
    /// `out` on this machine (see [`crate::export`]); `progress(done, total)` in bytes.
    pub async fn export(
        &self,
        cid: &str,
        out: PathBuf,
        progress: impl FnMut(u64, u64) + Send + 'static,
    ) -> Result<crate::export::ExportReport, ApiError> {
        let ck = if valid_id(cid) {
            self.store.checkpoint(cid)?
        } else {
            None
        }
        .ok_or_else(|| ApiError::not_found(format!("no checkpoint {cid:?}")))?;
        if !out.is_absolute() {
            return Err(ApiError::invalid("the archive path must be absolute"));
        }
        let sandbox = self.record(&ck.sandbox_id)?;
        // The chain as it is now, kept from GC while it is read.
        let chain = {
            let _g = self.layers_lock.lock().await;
            let chain = self.current_chain(cid)?;
            self.pin(&chain);
            chain
        };
        let dirs: Vec<PathBuf> = chain
            .iter()
            .map(|l| self.layer_dir(l).join("diff"))
            .collect();
        let images = self.images_dir(cid);
        let images =
            (ck.processes && deltabox_runtime::durable::complete(&images)).then_some(images);
        let manifest = crate::export::Manifest {
            version: crate::export::VERSION,
            host: deltabox_cr::image::HostKind::current(),
            sandbox,
            checkpoint: cid.to_string(),
            created_at: ck.created_at,
            base: ck.base.clone(),
            layers: Vec::new(),
            images: Vec::new(),
            blob_bytes: 0,
        };
        let r = blocking(move || {
            crate::export::export(manifest, &dirs, images.as_deref(), &out, progress)
        })
        .await;
        self.unpin(&chain);
        r?.map_err(|e| ApiError::conflict("export_failed", e))
    }

    /// Recreates an exported checkpoint from the archive `path` on this machine as a new sandbox (stopped: a
    /// rollback to the checkpoint starts it, with its processes when the archive holds their images) and a new
    /// checkpoint. Importing the same archive twice gives two independent copies. Refused, with nothing
    /// recorded, for a corrupt or truncated archive, a kernel or CPU other than the one the process images were
    /// taken on, or a base image this machine lacks.
    pub async fn import(
        &self,
        path: PathBuf,
        progress: impl FnMut(u64, u64) + Send + 'static,
    ) -> Result<api::ImportReport, ApiError> {
        if !path.is_absolute() {
            return Err(ApiError::invalid("the archive path must be absolute"));
        }
        let scratch = self
            .config
            .store_dir()
            .join(format!("import-{}", random_id("")));
        let blobs = scratch.join("blobs");
        let b = blobs.clone();
        let unpacked = blocking(move || crate::export::unpack(&path, &b, progress)).await?;
        let result = async {
            let m = unpacked.map_err(ApiError::invalid)?;
            if !m.images.is_empty() {
                let here = deltabox_cr::image::HostKind::current();
                if m.host.kernel != here.kernel {
                    return Err(ApiError::conflict(
                        "incompatible_host",
                        format!(
                            "the archive's processes were taken on kernel {}, this is {}",
                            m.host.kernel, here.kernel
                        ),
                    ));
                }
                if m.host.cpu_flags != here.cpu_flags {
                    return Err(ApiError::conflict(
                        "incompatible_host",
                        "the archive's processes were taken on a CPU with other features"
                            .to_string(),
                    ));
                }
            }
            // The base image, as this machine has it (its layers live in this daemon's image store).
            let images = self.images.clone();
            let reference = m.sandbox.image.clone();
            let image = blocking(move || images.resolve(Some(&reference))).await?;
            let base = match image {
                Ok(i) if i.digest == m.sandbox.image_digest => i.layers,
                Ok(i) => {
                    return Err(ApiError::conflict(
                        "missing_base",
                        format!(
                            "the archive's base image {} is {} here, not {}",
                            m.sandbox.image, i.digest, m.sandbox.image_digest
                        ),
                    ))
                }
                Err(e) => {
                    return Err(ApiError::conflict(
                        "missing_base",
                        format!(
                            "the archive's base image {} is not on this machine: {e}",
                            m.sandbox.image
                        ),
                    ))
                }
            };
            let _g = self.layers_lock.lock().await;
            let mut chain = Vec::new();
            let built = async {
                for entries in &m.layers {
                    let layer = self.new_layer()?;
                    chain.push(layer.clone());
                    let (dest, blobs, entries) = (
                        self.layer_dir(&layer).join("diff"),
                        blobs.clone(),
                        entries.clone(),
                    );
                    blocking(move || crate::export::build_layer(&entries, &blobs, &dest))
                        .await?
                        .map_err(ApiError::internal)?;
                }
                Ok::<_, ApiError>(())
            }
            .await;
            let undo = |chain: &[String]| {
                for l in chain {
                    let _ = std::fs::remove_dir_all(self.layer_dir(l));
                }
            };
            if let Err(e) = built {
                undo(&chain);
                return Err(e);
            }
            let id = random_id("");
            let cid = random_id("c-");
            let images = self.images_dir(&cid);
            let (files, b, dest) = (m.images.clone(), blobs.clone(), images.clone());
            if let Err(e) = blocking(move || crate::export::build_images(&files, &b, &dest))
                .await?
                .map_err(ApiError::internal)
            {
                undo(&chain);
                return Err(e);
            }
            let upper = self.new_layer()?;
            let mut info = m.sandbox.clone();
            info.id = id.clone();
            info.status = "exited".into();
            info.reason = Some(format!(
                "imported (checkpoint {} of sandbox {}): roll back to {cid} to start it",
                m.checkpoint, m.sandbox.id
            ));
            info.created_at = now();
            self.store.insert(&info)?;
            let row = CheckpointRow {
                id: cid.clone(),
                sandbox_id: id.clone(),
                parent: None,
                chain: chain.clone(),
                base: base.clone(),
                created_at: m.created_at,
                processes: !m.images.is_empty(),
                pinned: false,
            };
            let fs = FsState {
                upper,
                chain,
                base: base.clone(),
                head: Some(cid.clone()),
            };
            self.store.record_checkpoint(&row, &fs)?;
            Ok(api::ImportReport {
                sandbox_id: id,
                checkpoint: cid,
                with_processes: row.processes,
            })
        }
        .await;
        let _ = std::fs::remove_dir_all(&scratch);
        result
    }

    /// The checkpoints `gc` keeps: pinned ones, every sandbox's head, and every ancestor of those.
    fn kept_checkpoints(&self) -> Result<std::collections::HashSet<String>, ApiError> {
        let all = self.store.all_checkpoints()?;
        let parent: HashMap<&str, Option<&str>> = all
            .iter()
            .map(|c| (c.id.as_str(), c.parent.as_deref()))
            .collect();
        let mut roots: Vec<String> = all
            .iter()
            .filter(|c| c.pinned)
            .map(|c| c.id.clone())
            .collect();
        for s in self.store.list()? {
            if let Some(head) = self.store.fs_state(&s.id)?.and_then(|f| f.head) {
                roots.push(head);
            }
        }
        let mut kept = std::collections::HashSet::new();
        for r in roots {
            let mut cur = Some(r);
            while let Some(c) = cur {
                if !kept.insert(c.clone()) {
                    break;
                }
                cur = parent
                    .get(c.as_str())
                    .copied()
                    .flatten()
                    .map(str::to_string);
            }
        }
        Ok(kept)
    }

    /// Where a process checkpoint's durable images live (see `deltabox_runtime::durable`).
    fn images_dir(&self, cid: &str) -> PathBuf {
        self.config.store_dir().join("process-images").join(cid)
    }

    /// Writes a process checkpoint's durable images in the background, one checkpoint at a time daemon-wide: the
    /// keeper only describes the templates (a few injected calls each); the pages are copied here, off it.
    /// Until this finishes the checkpoint is warm-only; if it fails it stays so (the error is kept for `info`).
    fn write_images_later(self: &Arc<Self>, sb: Arc<Sandbox>, cid: String) {
        let me = self.clone();
        tokio::spawn(async move {
            let _one = me.durable_lock.lock().await;
            if let Err(e) = me.write_images(&sb, &cid).await {
                tracing::warn!("durable images of checkpoint {cid}: {e}");
                if let Ok(mut errs) = me.durable_errors.lock() {
                    errs.insert(cid, e);
                }
            }
        });
    }

    /// Deletes the durable images of these (deleted) checkpoints, in the background.
    fn remove_images(&self, cids: Vec<String>) {
        let dirs: Vec<PathBuf> = cids.iter().map(|c| self.images_dir(c)).collect();
        if let Ok(mut e) = self.durable_errors.lock() {
            for c in &cids {
                e.remove(c);
            }
        }
        tokio::task::spawn_blocking(move || {
            for d in dirs {
                let _ = std::fs::remove_dir_all(&d);
                let _ = std::fs::remove_dir_all(d.with_extension("partial"));
            }
        });
    }

    /// Writes checkpoint `cid`'s images now (see [`Daemon::write_images_later`]).
    async fn write_images(&self, sb: &Arc<Sandbox>, cid: &str) -> Result<(), String> {
        let dir = self.images_dir(cid);
        if deltabox_runtime::durable::complete(&dir) {
            return Ok(());
        }
        let sessions = match sb
            .kept
            .lock()
            .ok()
            .and_then(|k| k.get(cid).map(|k| k.sessions.clone()))
        {
            Some(s) => s,
            None => return Err("its templates were gone before they could be written".into()),
        };
        // Deduplicated against the nearest ancestor checkpoint that has images (pages equal to its pages at the
        // same address share its extents).
        let mut base = None;
        let mut cur = self
            .store
            .checkpoint(cid)
            .ok()
            .flatten()
            .and_then(|c| c.parent);
        for _ in 0..64 {
            let Some(p) = cur else { break };
            if deltabox_runtime::durable::complete(&self.images_dir(&p)) {
                base = Some(p);
                break;
            }
            cur = self
                .store
                .checkpoint(&p)
                .ok()
                .flatten()
                .and_then(|c| c.parent);
        }
        let keeper = sb.keeper.lock().await.clone().ok_or("no keeper")?;
        let req = KeeperRequest::DescribeImages {
            id: cid.to_string(),
            sessions,
            base: base.clone(),
        };
        let (described, mems) = match blocking(move || keeper.request_with_fds(&req))
            .await
            .map_err(|e| e.message.clone())?
        {
            Ok((KeeperReply::ImagesDescribed(d), fds)) => (d, fds),
            Ok((KeeperReply::Failed { error }, _)) => return Err(error),
            Ok((other, _)) => return Err(format!("unexpected keeper reply {other:?}")),
            Err(e) => return Err(e.to_string()),
        };
        // Fault injection for tests: die in the middle of writing, as a crash or kill -9 would.
        if self
            .config
            .state_dir
            .join("fault-crash-during-images")
            .exists()
        {
            let _ = std::fs::create_dir_all(dir.with_extension("partial").join("p1"));
            std::process::abort();
        }
        let base_dir = base.as_ref().map(|b| self.images_dir(b));
        let t = std::time::Instant::now();
        let meta = blocking(move || {
            let base = base.as_deref().zip(base_dir.as_deref());
            // At the lowest priority: the agent's own work (and its next rollback) comes first.
            let _nice = LowPriority::here();
            deltabox_runtime::durable::store(&dir, &described, mems, base)
        })
        .await
        .map_err(|e| e.message.clone())??;
        // Deleted meanwhile: nothing may keep its images.
        if !matches!(self.store.checkpoint(cid), Ok(Some(_))) {
            self.remove_images(vec![cid.to_string()]);
            return Ok(());
        }
        tracing::info!(
            "durable images of checkpoint {cid}: {} processes, {} bytes of memory ({} shared with {:?}), written in {:?}",
            meta.processes.len(),
            meta.bytes,
            meta.shared,
            meta.base,
            t.elapsed()
        );
        Ok(())
    }

    /// The keeper of a sandbox's process checkpoints, started on first use.
    async fn keeper_of(&self, sb: &Sandbox) -> Result<Arc<deltabox_runtime::Keeper>, ApiError> {
        let mut k = sb.keeper.lock().await;
        if let Some(k) = k.as_ref() {
            return Ok(k.clone());
        }
        let zygote = self.zygote.clone();
        let init = sb.handle.init_pid();
        let keeper = Arc::new(blocking(move || zygote.start_keeper(init)).await??);
        *k = Some(keeper.clone());
        Ok(keeper)
    }

    /// Forks checkpoint `cid` into `n` new sandboxes, each with its own writable layer over the checkpoint's
    /// frozen chain (shared, never copied), and the source's image, limits and network. All or nothing.
    pub async fn fork(self: &Arc<Self>, cid: &str, n: usize) -> Result<Vec<SandboxInfo>, ApiError> {
        if !(1..=MAX_FORK).contains(&n) {
            return Err(ApiError::invalid(format!(
                "n must be between 1 and {MAX_FORK}"
            )));
        }
        let ck = if valid_id(cid) {
            self.store.checkpoint(cid)?
        } else {
            None
        }
        .ok_or_else(|| ApiError::not_found(format!("no checkpoint {cid:?}")))?;
        let src = self.get(&ck.sandbox_id).await?;
        let images = self.images.clone();
        let image_ref = src.image.clone();
        let mut image = blocking(move || images.resolve(Some(&image_ref))).await??;
        image.layers = ck.base.clone();
        let limits = Limits {
            memory_bytes: src.memory_bytes,
            pids: src.pids,
            cpus: src.cpus,
        };
        let network = if src.network == "host" {
            NetworkMode::Host
        } else {
            NetworkMode::None
        };
        // A process checkpoint whose templates the source's keeper holds: the branches get the processes too.
        let source = self
            .live
            .read()
            .await
            .get(&ck.sandbox_id)
            .cloned()
            .filter(|sb| sb.handle.is_alive() && sb.kept.lock().is_ok_and(|k| k.contains_key(cid)));
        let mut source = source;
        let locked = source.clone();
        let _source_guard = match &locked {
            Some(sb) => {
                let g = sb.lifecycle.lock().await;
                // Its templates are frozen with it: nothing could be forked from them.
                if sb.cgroup.is_frozen() {
                    return Err(ApiError::conflict(
                        "sandbox_paused",
                        format!(
                            "sandbox {} is paused, and its process templates with it: resume it to fork checkpoint {cid}",
                            sb.id
                        ),
                    ));
                }
                // Evicted while this fork waited for the sandbox: the branches get the files.
                if !sb.kept.lock().is_ok_and(|k| k.contains_key(cid)) {
                    source = None;
                }
                Some(g)
            }
            None => None,
        };
        let plan = BranchPlan {
            cid,
            n,
            limits,
            network,
            image: &image,
            chain: &ck.chain,
            base: &ck.base,
        };
        match self.make_branches(&plan, source.as_ref()).await {
            // The templates were killed from inside: the branches get the files, processes start fresh.
            Err(e) if source.is_some() && e.message.contains("is gone") => {
                if let Some(sb) = &source {
                    if let Ok(mut k) = sb.kept.lock() {
                        k.remove(cid);
                    }
                }
                let note = format!("files only; processes start fresh: {}", e.message);
                let mut made = self.make_branches(&plan, None).await?;
                for m in &mut made {
                    m.note = Some(note.clone());
                }
                Ok(made)
            }
            Ok(mut made) if source.is_none() && ck_has_processes(&self.store, cid) => {
                let why = if self.evicted.lock().is_ok_and(|e| e.contains(cid)) {
                    "this checkpoint's process templates were evicted to keep within the template memory budget"
                } else {
                    "this checkpoint's process templates are gone (its sandbox or the daemon restarted since)"
                };
                for m in &mut made {
                    m.note = Some(format!("files only; processes start fresh: {why}"));
                }
                Ok(made)
            }
            other => other,
        }
    }

    /// Makes the branches of a fork (see [`Daemon::fork`]), with `source`'s processes when given. All or nothing.
    async fn make_branches(
        self: &Arc<Self>,
        plan: &BranchPlan<'_>,
        source: Option<&Arc<Sandbox>>,
    ) -> Result<Vec<SandboxInfo>, ApiError> {
        let BranchPlan {
            cid,
            n,
            limits,
            network,
            image,
            chain,
            base,
        } = *plan;
        // Pipelined: the keeper forks the processes into one branch while the zygote makes the next.
        type Forking<'a> = std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Vec<i32>, ApiError>> + Send + 'a>,
        >;
        let mut made: Vec<SandboxInfo> = Vec::new();
        let mut in_flight: Option<(SandboxInfo, Forking<'_>)> = None;
        let mut failure = None;
        let settle = |made: &mut Vec<SandboxInfo>,
                      done: Option<(SandboxInfo, Result<Vec<i32>, ApiError>)>|
         -> Option<ApiError> {
            let (mut info, r) = done?;
            let e = match r {
                Ok(pids) => {
                    info.forked_processes = pids;
                    None
                }
                Err(e) => Some(e),
            };
            made.push(info);
            e
        };
        for _ in 0..n {
            let start = match self.rewrite(chain) {
                Ok(chain) => FsState {
                    upper: String::new(),
                    chain,
                    base: base.to_vec(),
                    head: Some(cid.to_string()),
                },
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            };
            let create = self.create_on(limits, network, image, start, source.map(|s| &**s));
            let (created, done) = match in_flight.take() {
                Some((info, forking)) => {
                    let (c, f) = tokio::join!(create, forking);
                    (c, Some((info, f)))
                }
                None => (create.await, None),
            };
            failure = settle(&mut made, done);
            match created {
                Ok(info) => match source {
                    Some(src) => {
                        let forking: Forking<'_> =
                            Box::pin(self.fork_processes(src, cid, info.id.clone()));
                        in_flight = Some((info, forking));
                    }
                    None => made.push(info),
                },
                Err(e) => failure = failure.or(Some(e)),
            }
            if failure.is_some() {
                break;
            }
        }
        if let Some((info, forking)) = in_flight.take() {
            let r = forking.await;
            failure = settle(&mut made, Some((info, r))).or(failure);
        }
        if let Some(e) = failure {
            // All or nothing.
            for m in &made {
                let _ = self.remove(&m.id).await;
            }
            return Err(e);
        }
        Ok(made)
    }

    /// Forks the processes of checkpoint `cid` (kept by `src`'s keeper) into the new branch sandbox `branch_id`
    /// and gives each session interpreter among them pipes of its own, as a session of the branch with the same
    /// id. Returns the processes (sandbox pids).
    async fn fork_processes(
        &self,
        src: &Arc<Sandbox>,
        cid: &str,
        branch_id: String,
    ) -> Result<Vec<i32>, ApiError> {
        let branch = self
            .live
            .read()
            .await
            .get(&branch_id)
            .cloned()
            .ok_or_else(|| ApiError::internal("the new branch vanished"))?;
        let snapshot = {
            let mut kept = src
                .kept
                .lock()
                .map_err(|_| ApiError::internal("poisoned"))?;
            let k = kept.get_mut(cid).ok_or_else(|| {
                ApiError::conflict(
                    "templates_gone",
                    format!("checkpoint {cid}'s process templates were dropped meanwhile"),
                )
            })?;
            k.last_used = std::time::Instant::now();
            k.sessions.clone()
        };
        let keeper = src
            .keeper
            .lock()
            .await
            .clone()
            .ok_or_else(|| ApiError::internal("process checkpoint without a keeper"))?;
        let req = KeeperRequest::Fork {
            id: cid.to_string(),
            branch: deltabox_runtime::keeper::BranchTarget {
                init_pid: branch.handle.init_pid(),
                cgroup: branch.cgroup.clone(),
                sessions: snapshot
                    .iter()
                    .map(|(_, pid, kind)| (*pid, *kind))
                    .collect(),
            },
        };
        let (report, fds) = match blocking(move || keeper.request_with_fds(&req)).await? {
            Ok((KeeperReply::Forked(report), fds)) => (report, fds),
            Ok((KeeperReply::Failed { error }, _)) => {
                return Err(ApiError::conflict("fork_failed", error))
            }
            Ok((other, _)) => {
                return Err(ApiError::internal(format!(
                    "unexpected keeper reply {other:?}"
                )))
            }
            Err(e) => return Err(ApiError::internal(e.to_string())),
        };
        tracing::debug!(
            "fork {cid} into {branch_id}: keeper {} us (fork {}, re-point {}, cgroup {})",
            report.total_us,
            report.fork_us,
            report.repoint_us,
            report.cgroup_us
        );
        if fds.len() != report.sessions.len() * 4 {
            return Err(ApiError::internal(format!(
                "the keeper sent {} descriptors for {} sessions",
                fds.len(),
                report.sessions.len()
            )));
        }
        let adopted = adopt_sessions(&branch.handle, &report.sessions, fds, &snapshot).await?;
        branch.sessions.lock().await.extend(adopted);
        Ok(report.pids)
    }

    /// Deletes a checkpoint: it can no longer be rolled back to or forked, and its layers are freed once nothing
    /// else uses them. Refused while a later checkpoint or another sandbox (a fork) builds on it.
    pub async fn remove_checkpoint(&self, cid: &str) -> Result<(), ApiError> {
        let ck = if valid_id(cid) {
            self.store.checkpoint(cid)?
        } else {
            None
        }
        .ok_or_else(|| ApiError::not_found(format!("no checkpoint {cid:?}")))?;
        let top = ck.chain.first().cloned().unwrap_or_default();
        let mut needed_by = Vec::new();
        for c in self.store.all_checkpoints()? {
            if c.id != ck.id && (c.parent.as_deref() == Some(cid) || c.chain.contains(&top)) {
                needed_by.push(format!("checkpoint {}", c.id));
            }
        }
        for s in self.store.list()? {
            if s.id == ck.sandbox_id {
                continue;
            }
            if self
                .store
                .fs_state(&s.id)?
                .is_some_and(|fs| fs.chain.contains(&top))
            {
                needed_by.push(format!("sandbox {} (a fork)", s.id));
            }
        }
        if !needed_by.is_empty() {
            return Err(ApiError::conflict(
                "checkpoint_in_use",
                format!("checkpoint {cid} is needed by {}", needed_by.join(", ")),
            ));
        }
        let orphans = self.store.delete_checkpoint(cid)?;
        self.gc_later(orphans);
        self.remove_images(vec![cid.to_string()]);
        // Its templates, if its sandbox's keeper holds them.
        if let Some(sb) = self.live.read().await.get(&ck.sandbox_id).cloned() {
            let had = sb
                .kept
                .lock()
                .map(|mut k| k.remove(cid).is_some())
                .unwrap_or(false);
            let keeper = sb.keeper.lock().await.clone();
            if let (true, Some(keeper)) = (had, keeper) {
                let req = KeeperRequest::Forget {
                    ids: vec![cid.to_string()],
                };
                let _ = blocking(move || keeper.request(&req)).await;
            }
        }
        Ok(())
    }

    /// The files added, deleted and changed from checkpoint `a` to checkpoint `b`, computed from the layers the
    /// two chains do not share.
    pub async fn diff(
        &self,
        a: &str,
        b: &str,
    ) -> Result<deltabox_runtime::diff::DiffResult, ApiError> {
        let get = |c: &str| -> Result<CheckpointRow, ApiError> {
            if valid_id(c) {
                self.store.checkpoint(c)?
            } else {
                None
            }
            .ok_or_else(|| ApiError::not_found(format!("no checkpoint {c:?}")))
        };
        // Read and pin both chains together: GC must not free their layers while the diff reads them.
        let (ca, cb) = {
            let _layers = self.layers_lock.lock().await;
            let (ca, cb) = (get(a)?, get(b)?);
            self.pin(ca.chain.iter().chain(&cb.chain));
            (ca, cb)
        };
        let result = self.diff_chains(a, b, &ca, &cb).await;
        self.unpin(ca.chain.iter().chain(&cb.chain));
        result
    }

    async fn diff_chains(
        &self,
        a: &str,
        b: &str,
        ca: &CheckpointRow,
        cb: &CheckpointRow,
    ) -> Result<deltabox_runtime::diff::DiffResult, ApiError> {
        if ca.base != cb.base {
            return Err(ApiError::conflict(
                "different_base",
                format!("checkpoints {a} and {b} are on different base images"),
            ));
        }
        let common = ca
            .chain
            .iter()
            .rev()
            .zip(cb.chain.iter().rev())
            .take_while(|(x, y)| x == y)
            .count();
        let unique: Vec<PathBuf> = ca.chain[..ca.chain.len() - common]
            .iter()
            .chain(cb.chain[..cb.chain.len() - common].iter())
            .map(|l| self.layer_dir(l).join("diff"))
            .collect();
        let lowers = |c: &CheckpointRow| -> Vec<PathBuf> {
            c.chain
                .iter()
                .map(|l| self.layer_dir(l).join("diff"))
                .chain(c.base.iter().cloned())
                .collect()
        };
        let spec = deltabox_runtime::diff::DiffSpec {
            a: lowers(ca),
            b: lowers(cb),
            unique,
        };
        let zygote = self.zygote.clone();
        Ok(blocking(move || zygote.diff(&spec)).await??)
    }

    /// A sandbox's checkpoints, oldest first.
    pub async fn list_checkpoints(&self, id: &str) -> Result<Vec<CheckpointInfo>, ApiError> {
        self.get(id).await?;
        let live = self.live.read().await.get(id).cloned();
        let costs = match live {
            Some(sb) => self.template_costs(&sb).await,
            None => HashMap::new(),
        };
        Ok(self
            .store
            .checkpoints_of(id)?
            .into_iter()
            .map(|c| {
                let images =
                    deltabox_runtime::durable::ImagesMeta::read(&self.images_dir(&c.id)).ok();
                CheckpointInfo {
                    image_bytes: images.as_ref().map_or(0, |m| m.bytes),
                    image_new_bytes: images
                        .as_ref()
                        .map_or(0, |m| m.bytes - m.shared.min(m.bytes)),
                    image_unchanged_bytes: images.as_ref().map_or(0, |m| m.unchanged),
                    with_processes: c.processes,
                    processes: Vec::new(),
                    templates: costs.get(&c.id).cloned(),
                    durable: c.processes
                        && deltabox_runtime::durable::complete(&self.images_dir(&c.id)),
                    pinned: c.pinned,
                    durable_error: self
                        .durable_errors
                        .lock()
                        .ok()
                        .and_then(|e| e.get(&c.id).cloned()),
                    depth: self.depth(&c.chain),
                    layers: c.chain.len(),
                    id: c.id,
                    sandbox_id: c.sandbox_id,
                    parent: c.parent,
                    created_at: c.created_at,
                    duration_ms: 0.0,
                    switch: None,
                }
            })
            .collect())
    }

    /// Rolls a sandbox's files back to checkpoint `cid`. Until process checkpointing lands, its processes are
    /// restarted: sessions come back fresh.
    pub async fn rollback(self: &Arc<Self>, id: &str, cid: &str) -> Result<RollbackInfo, ApiError> {
        self.rollback_filled(id, cid, MemoryFill::default()).await
    }

    /// [`Daemon::rollback`]; processes rebuilt from durable images get their memory as `fill` says.
    pub async fn rollback_filled(
        self: &Arc<Self>,
        id: &str,
        cid: &str,
        fill: MemoryFill,
    ) -> Result<RollbackInfo, ApiError> {
        let start = std::time::Instant::now();
        let info = self.record(id)?;
        let ck = if valid_id(cid) {
            self.store.checkpoint(cid)?
        } else {
            None
        }
        .ok_or_else(|| ApiError::not_found(format!("no checkpoint {cid:?}")))?;
        if ck.sandbox_id != id {
            return Err(ApiError::conflict(
                "foreign_checkpoint",
                format!(
                    "checkpoint {cid} belongs to sandbox {}, not {id}",
                    ck.sandbox_id
                ),
            ));
        }
        // A process checkpoint whose templates this very sandbox's keeper still holds: restore the processes.
        let live = self.live.read().await.get(id).cloned();
        let mut gone = None;
        if let Some(sb) = live
            .clone()
            .filter(|sb| sb.kept.lock().is_ok_and(|k| k.contains_key(cid)))
        {
            match self
                .rollback_processes(&sb, id, cid, start, RollbackVia::Templates)
                .await?
            {
                Ok(info) => return Ok(info),
                Err(why) => {
                    // The templates are gone (killed from inside): nothing changed; restart instead.
                    if let Ok(mut k) = sb.kept.lock() {
                        k.remove(cid);
                    }
                    gone = Some(why);
                }
            }
        }
        // Templates gone but the checkpoint is durable: rebuild them from its images.
        let images = self.images_dir(cid);
        let durable = ck.processes && deltabox_runtime::durable::complete(&images);
        if durable {
            if let Some(sb) = live.clone().filter(|sb| sb.handle.is_alive()) {
                match self
                    .rollback_processes(&sb, id, cid, start, RollbackVia::Images(&images, fill))
                    .await?
                {
                    Ok(info) => return Ok(info),
                    Err(why) => gone = Some(why),
                }
            }
        }
        let gone_note;
        let restart_note = match gone.clone() {
            Some(why) => {
                gone_note = format!(
                    "files rolled back; processes were restarted (sessions start fresh): {why}"
                );
                gone_note.as_str()
            }
            None if self.evicted.lock().is_ok_and(|e| e.contains(cid)) => {
                "files rolled back; processes were restarted (sessions start fresh): this checkpoint's process \
                 templates were evicted to keep within the template memory budget"
            }
            None if ck_has_processes(&self.store, cid) => {
                "files rolled back; processes were restarted (sessions start fresh): this checkpoint's process \
                 templates are gone (the sandbox or the daemon restarted since)"
            }
            None => "files rolled back; processes were restarted (sessions start fresh): the checkpoint has files only",
        };
        // A live sandbox with a keeper: roll the files back through it, keeping init and every other
        // checkpoint's templates (a restart would lose them all).
        if let Some(sb) = live.filter(|sb| sb.handle.is_alive()) {
            if sb.keeper.lock().await.is_some() {
                if let Ok(info) = self
                    .rollback_processes(&sb, id, cid, start, RollbackVia::Files(restart_note))
                    .await?
                {
                    return Ok(info);
                }
            }
        }
        let branches = self.live_branches(id).await;
        if !branches.is_empty() {
            return Err(Self::branches_refusal(
                id,
                "restart (a files-only rollback) of",
                &branches,
            ));
        }
        let old = self.live.write().await.remove(id);
        let (cgroup, network, image_config) = match &old {
            Some(sb) => {
                let _g = sb.lifecycle.lock().await;
                sb.sessions.lock().await.clear();
                let cg = sb.cgroup.clone();
                if let Err(e) = blocking(move || cg.kill_all())
                    .await
                    .and_then(|r| r.map_err(ApiError::from))
                {
                    // Nothing changed: keep the sandbox reachable as it was.
                    self.live.write().await.insert(id.to_string(), sb.clone());
                    return Err(e);
                }
                let _ = tokio::time::timeout(Duration::from_secs(5), sb.handle.closed()).await;
                (sb.cgroup.clone(), sb.network, sb.image_config.clone())
            }
            None => {
                // A sandbox that was lost or exited comes back to life on the checkpoint.
                let limits = Limits {
                    memory_bytes: info.memory_bytes,
                    pids: info.pids,
                    cpus: info.cpus,
                };
                let cg = self.cgroups.open(id);
                let _ = cg.destroy();
                let cg = self.cgroups.create(id, &limits)?;
                let images = self.images.clone();
                let image_ref = info.image.clone();
                let config = blocking(move || images.resolve(Some(&image_ref)).map(|i| i.config))
                    .await?
                    .unwrap_or_default();
                let net = if info.network == "host" {
                    NetworkMode::Host
                } else {
                    NetworkMode::None
                };
                (cg, net, config)
            }
        };
        let layers_guard = self.layers_lock.lock().await;
        let chain = match self.current_chain(cid) {
            Ok(c) => c,
            Err(e) => {
                let _ = self.store.set_status(
                    id,
                    "exited",
                    Some(&format!("rollback to {cid} failed: {}", e.message)),
                );
                return Err(e);
            }
        };
        let next = FsState {
            upper: self.new_layer()?,
            chain,
            base: ck.base.clone(),
            head: Some(cid.to_string()),
        };
        let sb = match self
            .start_init(id, network, &next, cgroup.clone(), image_config, None)
            .await
        {
            Ok(sb) => sb,
            Err(e) => {
                let _ = std::fs::remove_dir_all(self.layer_dir(&next.upper));
                let _ = self.store.set_status(
                    id,
                    "exited",
                    Some(&format!("rollback to {cid} failed to start: {}", e.message)),
                );
                return Err(e);
            }
        };
        let left = self.store.fs_state(id)?;
        self.store.set_fs_state(id, &next)?;
        self.store.set_status(id, "running", None)?;
        drop(layers_guard);
        self.register(sb).await;
        // The writable layer (and chain) it left may be used by nothing now.
        if let Some(left) = left {
            self.gc_later(self.held_by(&left));
        }
        // A lost sandbox is back on the checkpoint's files; a durable checkpoint brings its processes back too.
        if durable && old.is_none() {
            if let Some(sb) = self.live.read().await.get(id).cloned() {
                if let Ok(info) = self
                    .rollback_processes(&sb, id, cid, start, RollbackVia::Images(&images, fill))
                    .await?
                {
                    return Ok(info);
                }
            }
        }
        Ok(RollbackInfo {
            sandbox_id: id.to_string(),
            checkpoint: cid.to_string(),
            processes_restarted: true,
            note: restart_note.into(),
            duration_ms: start.elapsed().as_secs_f64() * 1e3,
            restored: Vec::new(),
            restore: None,
        })
    }

    /// Rolls a live sandbox back to a process checkpoint its keeper holds: its processes are killed (but init),
    /// it moves onto a new generation over the checkpoint's layers, and every process is forked back from its
    /// template with its pid. Sessions keep their pipes and go on with the restored interpreters. `Ok(Err(why))`:
    /// the templates are gone, nothing was changed, and the caller restarts the processes instead.
    async fn rollback_processes(
        &self,
        sb: &Arc<Sandbox>,
        id: &str,
        cid: &str,
        start: std::time::Instant,
        via: RollbackVia<'_>,
    ) -> Result<Result<RollbackInfo, String>, ApiError> {
        let _g = sb.lifecycle.lock().await;
        let files_only = match via {
            RollbackVia::Files(note) => Some(note),
            _ => None,
        };
        // Which sessions it had; it is now the most recently used.
        let snapshot: Vec<(String, i32, deltabox_runtime::SessionKind)> = match via {
            RollbackVia::Templates => {
                let mut kept = sb.kept.lock().map_err(|_| ApiError::internal("poisoned"))?;
                match kept.get_mut(cid) {
                    Some(k) => {
                        k.last_used = std::time::Instant::now();
                        k.sessions.clone()
                    }
                    // Evicted while this rollback waited for the sandbox: nothing changed; fall back.
                    None => {
                        return Ok(Err(
                            "this checkpoint's process templates were evicted to keep within the template \
                             memory budget"
                                .into(),
                        ))
                    }
                }
            }
            RollbackVia::Files(_) => Vec::new(),
            RollbackVia::Images(dir, _) => match deltabox_runtime::durable::ImagesMeta::read(dir) {
                Ok(m) => m.sessions,
                Err(e) => return Ok(Err(e)),
            },
        };
        let keeper = match via {
            RollbackVia::Images(..) => self.keeper_of(sb).await?,
            _ => sb
                .keeper
                .lock()
                .await
                .clone()
                .ok_or_else(|| ApiError::internal("process checkpoint without a keeper"))?,
        };
        // Hold every session still (after the command it may be running) while its process is replaced.
        let sessions: Vec<(String, Arc<Session>)> = sb
            .sessions
            .lock()
            .await
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut held = Vec::new();
        for (sid, s) in sessions {
            if let Ok(Ok(h)) = tokio::time::timeout(Duration::from_secs(2), s.suspend()).await {
                held.push((sid, s.clone(), h));
            }
        }
        let layers_guard = self.layers_lock.lock().await;
        let prepared = (|| -> Result<FsState, ApiError> {
            let cur = sb
                .fs
                .lock()
                .map_err(|_| ApiError::internal("poisoned"))?
                .clone();
            Ok(FsState {
                upper: self.new_layer()?,
                chain: self.current_chain(cid)?,
                base: cur.base,
                head: Some(cid.to_string()),
            })
        })();
        let next = match prepared {
            Ok(n) => n,
            Err(e) => {
                for (_, _, h) in held {
                    h.cancel();
                }
                return Err(e);
            }
        };
        let left = sb
            .fs
            .lock()
            .map_err(|_| ApiError::internal("poisoned"))?
            .clone();
        let switch = SwitchSpec {
            init_pid: sb.handle.init_pid(),
            cgroup: sb.cgroup.clone(),
            layers: self.stack(&next),
            keeper_pid: Some(keeper.pid()),
            templates: None,
        };
        let mut send_fds: Vec<std::os::fd::OwnedFd> = Vec::new();
        let req = match via {
            RollbackVia::Files(_) => KeeperRequest::RollbackFiles { switch },
            RollbackVia::Templates => KeeperRequest::Rollback {
                id: cid.to_string(),
                switch,
            },
            RollbackVia::Images(dir, fill) => {
                // Sessions the daemon still has keep their pipes (every other copy of the interpreter speaks
                // over them); the others (gone with a daemon restart) get new ones.
                let (mut reuse, mut fresh) = (Vec::new(), Vec::new());
                let dormant = sb.dormant.lock().await;
                for (sid, pid, kind) in &snapshot {
                    // Alive (held still above) or dormant: a session that ended with its process (killed
                    // from inside) is not resumed, and gets new pipes like a lost one.
                    let known = held
                        .iter()
                        .find(|(h, _, _)| h == sid)
                        .map(|(_, s, _)| s.clone())
                        .or_else(|| dormant.get(sid).map(|(s, _)| s.clone()))
                        .filter(|s| s.pid() == *pid && s.kind() == *kind);
                    match known.map(|s| s.interpreter_ends()) {
                        Some(Ok(ends)) => {
                            reuse.push((*pid, *kind));
                            send_fds.extend(ends);
                        }
                        _ => fresh.push((*pid, *kind)),
                    }
                }
                KeeperRequest::RollbackImages {
                    id: cid.to_string(),
                    dir: dir.to_path_buf(),
                    switch,
                    sessions: fresh,
                    reuse,
                    lazy: fill == MemoryFill::Lazy,
                }
            }
        };
        let k = keeper.clone();
        let mut pipes = Vec::new();
        let (report, error) = match blocking_here(move || {
            let borrowed: Vec<_> = send_fds.iter().map(std::os::fd::AsFd::as_fd).collect();
            k.request_sending(&req, &borrowed)
        })
        .await?
        {
            Ok((KeeperReply::RolledBack(r), fds)) => {
                pipes = fds;
                (Some(r), None)
            }
            Ok((KeeperReply::RollbackFailed { error, switched }, _)) => {
                (None, Some((error, switched)))
            }
            Ok((other, _)) => (
                None,
                Some((format!("unexpected keeper reply {other:?}"), false)),
            ),
            Err(e) => (None, Some((e.to_string(), false))),
        };
        let switched = report.is_some() || error.as_ref().is_some_and(|(_, s)| *s);
        if !switched {
            let _ = std::fs::remove_dir_all(self.layer_dir(&next.upper));
            drop(layers_guard);
            for (_, _, h) in held {
                h.cancel();
            }
            let (msg, _) = error.unwrap_or_default();
            if msg.contains("template of process") {
                return Ok(Err(msg));
            }
            return Err(ApiError::conflict("rollback_failed", msg));
        }
        // The sandbox is on the new generation now.
        *sb.fs.lock().map_err(|_| ApiError::internal("poisoned"))? = next.clone();
        self.store.set_fs_state(id, &next)?;
        drop(layers_guard);
        self.gc_later(self.held_by(&left));
        let restored: Vec<i32> = report.as_ref().map(|r| r.pids.clone()).unwrap_or_default();
        // Rebuilt from images: the interpreters have new pipes; their sessions start over on them, same ids.
        let mut adopted: Vec<(String, Arc<Session>)> = Vec::new();
        if let (RollbackVia::Images(..), Some(r)) = (via, report.as_ref()) {
            adopted = adopt_sessions(
                &sb.handle,
                &r.sessions,
                std::mem::take(&mut pipes),
                &snapshot,
            )
            .await?;
            if let Ok(mut kept) = sb.kept.lock() {
                kept.insert(
                    cid.to_string(),
                    crate::sandbox::KeptCheckpoint {
                        sessions: snapshot.clone(),
                        processes: restored.len(),
                        last_used: std::time::Instant::now(),
                    },
                );
            }
            if let Ok(mut e) = self.evicted.lock() {
                e.remove(cid);
            }
        }
        let mut sessions = sb.sessions.lock().await;
        let mut dormant = sb.dormant.lock().await;
        for (sid, s) in adopted {
            // The old session (held still above) ends with its old pipes.
            held.retain(|(h, _, _)| *h != sid);
            dormant.remove(&sid);
            sessions.insert(sid, s);
        }
        // Sessions whose interpreter is back: live ones resume, dormant ones wake up.
        let mut back = Vec::new();
        for (sid, pid, _) in &snapshot {
            if !restored.contains(pid) {
                continue;
            }
            let entry = match held.iter().position(|(s, _, _)| s == sid) {
                Some(i) => {
                    let (_, s, h) = held.swap_remove(i);
                    Some((s, h))
                }
                None => dormant.remove(sid),
            };
            if let Some((s, h)) = entry {
                back.push((sid, *pid, s, h));
            }
        }
        // Init learns to report their exits, off the reply's path: each session goes on at once with an exit
        // receiver that a task fills once init has answered (if init finds the process gone, the receiver
        // closes and the session ends, as the process did).
        for (sid, pid, s, h) in back {
            if s.pid() != pid {
                sessions.remove(sid);
                continue;
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            let handle = sb.handle.clone();
            tokio::spawn(async move {
                if let Ok(exit) = handle.track(pid).await {
                    if let Ok(status) = exit.await {
                        let _ = tx.send(status);
                    }
                }
            });
            h.resume(rx);
            sessions.insert(sid.clone(), s);
        }
        // The others' interpreters are gone: hide them, pipes kept, until a rollback brings them back.
        for (sid, s, h) in held {
            sessions.remove(&sid);
            dormant.insert(sid, (s, h));
        }
        drop(dormant);
        drop(sessions);
        if let Some((msg, _)) = error {
            // The files are rolled back but a process could not be rebuilt from its image: the caller restarts
            // the processes instead, saying why (as when templates are gone).
            if matches!(via, RollbackVia::Images(..)) {
                return Ok(Err(msg));
            }
            return Err(ApiError::conflict("rollback_failed", msg));
        }
        Ok(Ok(RollbackInfo {
            sandbox_id: id.to_string(),
            checkpoint: cid.to_string(),
            processes_restarted: files_only.is_some(),
            note: match files_only {
                Some(note) => note.to_string(),
                None => {
                    let mut note = format!(
                        "files and processes rolled back ({} process{} restored with their pids{})",
                        restored.len(),
                        if restored.len() == 1 { "" } else { "es" },
                        if matches!(via, RollbackVia::Images(..)) {
                            ", rebuilt from the checkpoint's durable images"
                        } else {
                            ""
                        }
                    );
                    for n in report.iter().flat_map(|r| &r.notes) {
                        note.push_str("; ");
                        note.push_str(n);
                    }
                    note
                }
            },
            duration_ms: start.elapsed().as_secs_f64() * 1e3,
            restored,
            restore: report,
        }))
    }

    async fn live(&self, id: &str) -> Result<Arc<Sandbox>, ApiError> {
        self.live_sandbox(id).await
    }

    /// Running (or paused) sandbox `id`; `sandbox_not_running` for a known one that is not, `not_found` else.
    pub(crate) async fn live_sandbox(&self, id: &str) -> Result<Arc<Sandbox>, ApiError> {
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
        if let Ok(Some(fs)) = self.store.fs_state(&info.id) {
            info.upper = Some(self.layer_dir(&fs.upper).join("diff").display().to_string());
            info.depth = self.depth(&fs.chain);
            info.head = fs.head;
        }
        if let Some(s) = self.live.read().await.get(&info.id) {
            info.init_pid = Some(s.handle.init_pid());
            info.sessions = s.sessions.lock().await.len();
            info.branch_of = s.branch_of.clone();
        }
        info
    }

    /// Live branches forked with processes from sandbox `id` (their pid namespaces lie inside its own).
    async fn live_branches(&self, id: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .live
            .read()
            .await
            .values()
            .filter(|b| b.branch_of.as_deref() == Some(id) && b.handle.is_alive())
            .map(|b| b.id.clone())
            .collect();
        out.sort();
        out
    }

    fn branches_refusal(id: &str, what: &str, branches: &[String]) -> ApiError {
        ApiError::conflict(
            "has_branches",
            format!(
                "cannot {what} sandbox {id}: {} live fork{} ({}) got its processes, whose pid namespaces lie inside \
                 {id}'s; remove {} first",
                branches.len(),
                if branches.len() == 1 { "" } else { "s" },
                branches.join(", "),
                if branches.len() == 1 { "it" } else { "them" },
            ),
        )
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
        let info = self.record(id)?;
        Ok(self.decorate(info).await)
    }

    /// One sandbox as the store has it (without what [`Daemon::get`] adds from its live state).
    fn record(&self, id: &str) -> Result<SandboxInfo, ApiError> {
        if !valid_id(id) {
            return Err(ApiError::not_found(format!("no sandbox {id:?}")));
        }
        self.store
            .get(id)?
            .ok_or_else(|| ApiError::not_found(format!("no sandbox {id:?}")))
    }

    /// Stops and deletes a sandbox: processes, cgroup, files, record.
    pub async fn remove(&self, id: &str) -> Result<(), ApiError> {
        if !valid_id(id) || self.store.get(id)?.is_none() {
            return Err(ApiError::not_found(format!("no sandbox {id:?}")));
        }
        // Held until the sandbox is gone: a fork of it (which holds the lock) cannot add branches meanwhile.
        let live = self.live.read().await.get(id).cloned();
        let _guard = match &live {
            Some(sb) => Some(sb.lifecycle.lock().await),
            None => None,
        };
        let branches = self.live_branches(id).await;
        if !branches.is_empty() {
            return Err(Self::branches_refusal(id, "remove", &branches));
        }
        let sb = self.live.write().await.remove(id);
        let cg = self.cgroups.open(id);
        let dir = self.sandbox_dir(id);
        if let Some(sb) = &sb {
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
        let left = self.store.fs_state(id)?;
        let gone: Vec<String> = self
            .store
            .checkpoints_of(id)?
            .into_iter()
            .map(|c| c.id)
            .collect();
        let orphans = self.store.delete_checkpoints_of(id)?;
        self.remove_images(gone);
        self.store.delete(id)?;
        // Its writable layer and the layers only it and its checkpoints used.
        self.gc_later(orphans);
        if let Some(left) = left {
            self.gc_later(self.held_by(&left));
        }
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
