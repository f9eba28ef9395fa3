//! One cgroup per sandbox: memory, pids and cpu limits, freeze/thaw and kill-all.
//!
//! cgroup v2 when the unified hierarchy has the memory, pids and cpu controllers; otherwise the v1 hierarchies
//! (this project's machines have v1 controllers only, and a v2 mount without controllers). Both are real code
//! paths: `DELTABOX_CGROUP=v1|v2` forces one (v2 without controllers then refuses limits it cannot enforce).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{Error, Limits, Result};

/// Which cgroup API a manager drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupVersion {
    /// Legacy per-controller hierarchies.
    V1,
    /// The unified hierarchy.
    V2,
}

const V1_CONTROLLERS: &[&str] = &["memory", "pids", "cpu", "freezer"];
const V2_CONTROLLERS: &[&str] = &["memory", "pids", "cpu"];

/// Creates and finds sandbox cgroups under one parent (`deltabox/<daemon instance>`), so that several daemons
/// (or test runs) never touch each other's cgroups.
#[derive(Debug, Clone)]
pub struct CgroupManager {
    version: CgroupVersion,
    /// v1: controller → parent directory in that hierarchy. v2: ("unified", parent directory).
    parents: Vec<(&'static str, PathBuf)>,
    /// v2 controllers actually enabled for our subtree.
    v2_controllers: Vec<String>,
}

fn cg_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Cgroup {
        path: path.to_path_buf(),
        source,
    }
}

fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).map_err(cg_err(path))
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(cg_err(path))
}

/// Cgroup mounts from `/proc/self/mountinfo`: (fstype, mountpoint, super options).
fn cgroup_mounts() -> Vec<(String, PathBuf, Vec<String>)> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return vec![];
    };
    info.lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let mountpoint = pre.split(' ').nth(4)?;
            let mut post = post.split(' ');
            let fstype = post.next()?;
            let _source = post.next()?;
            let opts = post.next().unwrap_or("");
            (fstype == "cgroup" || fstype == "cgroup2").then(|| {
                (
                    fstype.to_string(),
                    PathBuf::from(mountpoint),
                    opts.split(',').map(str::to_string).collect(),
                )
            })
        })
        .collect()
}

impl CgroupManager {
    /// Finds the hierarchies and creates `parent` (e.g. `deltabox/3f2a…`) in each.
    pub fn detect(parent: &str) -> Result<CgroupManager> {
        let mounts = cgroup_mounts();
        let forced = std::env::var("DELTABOX_CGROUP").ok();
        let v2_root = mounts
            .iter()
            .find(|(t, ..)| t == "cgroup2")
            .map(|(_, p, _)| p.clone());
        let v2_available: Vec<String> = v2_root
            .as_ref()
            .and_then(|r| std::fs::read_to_string(r.join("cgroup.controllers")).ok())
            .map(|s| s.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default();
        let v2_complete = V2_CONTROLLERS
            .iter()
            .all(|c| v2_available.iter().any(|a| a == c));
        let use_v2 = match forced.as_deref() {
            Some("v2") => true,
            Some("v1") => false,
            _ => v2_root.is_some() && v2_complete,
        };
        if use_v2 {
            let root =
                v2_root.ok_or_else(|| Error::Invalid("no cgroup2 hierarchy mounted".into()))?;
            let enable: Vec<String> = V2_CONTROLLERS
                .iter()
                .filter(|c| v2_available.iter().any(|a| a == *c))
                .map(|c| c.to_string())
                .collect();
            let mut dir = root.clone();
            for comp in Path::new(parent).components() {
                if !enable.is_empty() {
                    let req: Vec<String> = enable.iter().map(|c| format!("+{c}")).collect();
                    // Best effort at the root (systemd usually did it); required below.
                    let r = write(&dir.join("cgroup.subtree_control"), &req.join(" "));
                    if dir != root {
                        r?;
                    }
                }
                dir.push(comp);
                std::fs::create_dir_all(&dir).map_err(cg_err(&dir))?;
            }
            if !enable.is_empty() {
                let req: Vec<String> = enable.iter().map(|c| format!("+{c}")).collect();
                write(&dir.join("cgroup.subtree_control"), &req.join(" "))?;
            }
            return Ok(CgroupManager {
                version: CgroupVersion::V2,
                parents: vec![("unified", dir)],
                v2_controllers: enable,
            });
        }
        let mut parents = Vec::new();
        for ctrl in V1_CONTROLLERS {
            let (_, mp, _) = mounts
                .iter()
                .find(|(t, _, opts)| t == "cgroup" && opts.iter().any(|o| o == ctrl))
                .ok_or_else(|| {
                    Error::Invalid(format!(
                        "no cgroup v1 '{ctrl}' hierarchy and no usable cgroup v2"
                    ))
                })?;
            let dir = mp.join(parent);
            std::fs::create_dir_all(&dir).map_err(cg_err(&dir))?;
            parents.push((*ctrl, dir));
        }
        Ok(CgroupManager {
            version: CgroupVersion::V1,
            parents,
            v2_controllers: vec![],
        })
    }

    /// The API in use.
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// Handle to the cgroup `name` (whether or not it exists).
    pub fn open(&self, name: &str) -> Cgroup {
        Cgroup {
            version: self.version,
            dirs: self
                .parents
                .iter()
                .map(|(c, p)| (c.to_string(), p.join(name)))
                .collect(),
        }
    }

    /// Creates cgroup `name` with `limits`.
    pub fn create(&self, name: &str, limits: &Limits) -> Result<Cgroup> {
        limits.validate()?;
        let cg = self.open(name);
        for (_, d) in &cg.dirs {
            std::fs::create_dir_all(d).map_err(cg_err(d))?;
        }
        if let Err(e) = self.apply(&cg, limits) {
            let _ = cg.destroy();
            return Err(e);
        }
        Ok(cg)
    }

    fn apply(&self, cg: &Cgroup, limits: &Limits) -> Result<()> {
        let missing = |c: &str| {
            Error::Invalid(format!(
                "cgroup v2 has no '{c}' controller here: cannot enforce that limit"
            ))
        };
        match self.version {
            CgroupVersion::V1 => {
                if let Some(m) = limits.memory_bytes {
                    write(
                        &cg.dir("memory").join("memory.limit_in_bytes"),
                        &m.to_string(),
                    )?;
                }
                if let Some(p) = limits.pids {
                    write(&cg.dir("pids").join("pids.max"), &p.to_string())?;
                }
                if let Some(c) = limits.cpus {
                    write(&cg.dir("cpu").join("cpu.cfs_period_us"), "100000")?;
                    write(
                        &cg.dir("cpu").join("cpu.cfs_quota_us"),
                        &((c * 100_000.0) as u64).to_string(),
                    )?;
                }
            }
            CgroupVersion::V2 => {
                let has = |c: &str| self.v2_controllers.iter().any(|x| x == c);
                let d = cg.dir("unified");
                if let Some(m) = limits.memory_bytes {
                    if !has("memory") {
                        return Err(missing("memory"));
                    }
                    write(&d.join("memory.max"), &m.to_string())?;
                    let _ = write(&d.join("memory.swap.max"), "0");
                }
                if let Some(p) = limits.pids {
                    if !has("pids") {
                        return Err(missing("pids"));
                    }
                    write(&d.join("pids.max"), &p.to_string())?;
                }
                if let Some(c) = limits.cpus {
                    if !has("cpu") {
                        return Err(missing("cpu"));
                    }
                    write(
                        &d.join("cpu.max"),
                        &format!("{} 100000", (c * 100_000.0) as u64),
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Removes our (empty) parent directories: a daemon that stops leaves no cgroup behind. Best effort: a
    /// parent that still has children stays.
    pub fn remove_parent(&self) {
        for (_, dir) in &self.parents {
            let _ = std::fs::remove_dir(dir);
        }
    }

    /// Names of the cgroups that exist under our parent (to clean up after a crash).
    pub fn list(&self) -> Vec<String> {
        let Some((_, parent)) = self.parents.first() else {
            return vec![];
        };
        std::fs::read_dir(parent)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// One sandbox's cgroup (a directory per v1 controller, or one v2 directory).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Cgroup {
    version: CgroupVersion,
    dirs: Vec<(String, PathBuf)>,
}

impl Cgroup {
    fn dir(&self, ctrl: &str) -> PathBuf {
        self.dirs
            .iter()
            .find(|(c, _)| *c == ctrl)
            .or(self.dirs.first())
            .map(|(_, d)| d.clone())
            .unwrap_or_default()
    }

    /// `cgroup.procs` of every hierarchy: write a pid to each to move it in.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs
            .iter()
            .map(|(_, d)| d.join("cgroup.procs"))
            .collect()
    }

    /// Pids (host view) in the cgroup.
    pub fn pids(&self) -> Vec<i32> {
        let f = match self.version {
            CgroupVersion::V1 => self.dir("freezer").join("cgroup.procs"),
            CgroupVersion::V2 => self.dir("unified").join("cgroup.procs"),
        };
        std::fs::read_to_string(f)
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Stops every process (they stay in memory, unscheduled) and waits until the kernel says frozen.
    pub fn freeze(&self) -> Result<()> {
        self.set_frozen(true)
    }

    /// Resumes after [`Cgroup::freeze`].
    pub fn thaw(&self) -> Result<()> {
        self.set_frozen(false)
    }

    /// Whether the cgroup is frozen.
    pub fn is_frozen(&self) -> bool {
        match self.version {
            CgroupVersion::V1 => {
                read(&self.dir("freezer").join("freezer.state")).is_ok_and(|s| s.trim() == "FROZEN")
            }
            CgroupVersion::V2 => read(&self.dir("unified").join("cgroup.events"))
                .is_ok_and(|s| s.contains("frozen 1")),
        }
    }

    fn set_frozen(&self, frozen: bool) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        match self.version {
            CgroupVersion::V1 => {
                let f = self.dir("freezer").join("freezer.state");
                let want = if frozen { "FROZEN" } else { "THAWED" };
                write(&f, want)?;
                while read(&f)?.trim() != want {
                    if Instant::now() > deadline {
                        return Err(Error::Cgroup {
                            path: f,
                            source: std::io::ErrorKind::TimedOut.into(),
                        });
                    }
                    // Freezing retries tasks that were busy; re-issue as the kernel docs suggest.
                    write(&f, want)?;
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
            CgroupVersion::V2 => {
                let d = self.dir("unified");
                write(&d.join("cgroup.freeze"), if frozen { "1" } else { "0" })?;
                let want = if frozen { "frozen 1" } else { "frozen 0" };
                while !read(&d.join("cgroup.events"))?.contains(want) {
                    if Instant::now() > deadline {
                        return Err(Error::Cgroup {
                            path: d,
                            source: std::io::ErrorKind::TimedOut.into(),
                        });
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
        }
        Ok(())
    }

    /// SIGKILLs every process and waits until the cgroup is empty.
    pub fn kill_all(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        match self.version {
            CgroupVersion::V2 => {
                let d = self.dir("unified");
                if d.join("cgroup.kill").exists() {
                    write(&d.join("cgroup.kill"), "1")?;
                } else {
                    self.kill_each()?;
                }
            }
            CgroupVersion::V1 => self.kill_each()?,
        }
        while !self.pids().is_empty() {
            if Instant::now() > deadline {
                return Err(Error::Cgroup {
                    path: self.dir("freezer"),
                    source: std::io::ErrorKind::TimedOut.into(),
                });
            }
            if self.version == CgroupVersion::V1 {
                self.kill_each()?;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Freeze (so nothing forks while we walk the list), SIGKILL each, thaw (frozen tasks die on thaw).
    fn kill_each(&self) -> Result<()> {
        let frozen = self.freeze().is_ok();
        for pid in self.pids() {
            // SAFETY: kill(2) with a pid read from the cgroup; no memory is involved.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if frozen {
            self.thaw()?;
        }
        Ok(())
    }

    /// How many times the kernel OOM-killed a process here.
    pub fn oom_kills(&self) -> u64 {
        let (file, key) = match self.version {
            CgroupVersion::V1 => (self.dir("memory").join("memory.oom_control"), "oom_kill"),
            CgroupVersion::V2 => (self.dir("unified").join("memory.events"), "oom_kill"),
        };
        read(&file)
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse().ok()))
            })
            .unwrap_or(0)
    }

    /// Current memory use in bytes, if the memory controller is there.
    pub fn memory_current(&self) -> Option<u64> {
        let f = match self.version {
            CgroupVersion::V1 => self.dir("memory").join("memory.usage_in_bytes"),
            CgroupVersion::V2 => self.dir("unified").join("memory.current"),
        };
        read(&f).ok().and_then(|s| s.trim().parse().ok())
    }

    /// Number of tasks, if the pids controller is there.
    pub fn pids_current(&self) -> Option<u64> {
        read(&self.dir("pids").join("pids.current"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// Whether the directories exist.
    pub fn exists(&self) -> bool {
        self.dirs.iter().any(|(_, d)| d.is_dir())
    }

    /// Kills what is left and removes the directories.
    pub fn destroy(&self) -> Result<()> {
        if !self.exists() {
            return Ok(());
        }
        if self.is_frozen() {
            let _ = self.thaw();
        }
        self.kill_all()?;
        for (_, d) in &self.dirs {
            match std::fs::remove_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Error::Cgroup {
                        path: d.clone(),
                        source: e,
                    })
                }
            }
        }
        Ok(())
    }
}
