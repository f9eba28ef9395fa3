//! A daemon per test, and helpers to drive the real `deltabox` binary against it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_deltabox");

pub struct TestDaemon {
    pub dir: PathBuf,
    pub socket: PathBuf,
    child: Option<Child>,
    env: Vec<(String, String)>,
    daemon_args: Vec<String>,
}

fn unique_dir() -> PathBuf {
    let mut b = [0u8; 6];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .unwrap();
    let tag: String = b.iter().map(|x| format!("{x:02x}")).collect();
    PathBuf::from(format!("/var/tmp/dbx-it-{tag}"))
}

impl TestDaemon {
    pub fn start() -> TestDaemon {
        Self::start_with(&[])
    }

    pub fn start_with(env: &[(&str, &str)]) -> TestDaemon {
        Self::start_full(env, &[])
    }

    /// With extra `deltabox daemon` arguments; `{dir}` in them is replaced by the state directory.
    pub fn start_full(env: &[(&str, &str)], daemon_args: &[&str]) -> TestDaemon {
        let dir = unique_dir();
        std::fs::create_dir_all(&dir).unwrap();
        let daemon_args = daemon_args
            .iter()
            .map(|a| a.replace("{dir}", &dir.to_string_lossy()))
            .collect();
        let mut d = TestDaemon {
            socket: dir.join("api.sock"),
            dir,
            child: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            daemon_args,
        };
        d.spawn();
        d
    }

    fn command(&self) -> Command {
        let mut c = Command::new(BIN);
        c.env("DELTABOX_SOCKET", &self.socket)
            .env("DELTABOX_STATE_DIR", &self.dir)
            .env("DELTABOX_NO_AUTOSTART", "1")
            .env("DELTABOX_STORE_SIZE", "3G");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .unwrap();
        let child = self
            .command()
            .arg("daemon")
            .args(&self.daemon_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.cli(&["ls"]).status.success() {
            if Instant::now() > deadline {
                panic!(
                    "daemon did not start: {}",
                    std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait: the daemon stops every sandbox and unmounts its store.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while c.try_wait().unwrap().is_none() {
                assert!(Instant::now() < deadline, "daemon did not stop on SIGTERM");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        self.command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    pub fn cli_spawn(&self, args: &[&str]) -> Child {
        self.command()
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Runs a CLI command that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "deltabox {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.cli(&a);
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
    }

    pub fn create(&self, extra: &[&str]) -> String {
        let mut a = vec!["create"];
        a.extend_from_slice(extra);
        let id = self.ok(&a).trim().to_string();
        assert_eq!(id.len(), 12, "create prints only the id: {id:?}");
        id
    }

    /// `sh -c SCRIPT` in the sandbox; returns (exit code, stdout, stderr).
    /// Starts a session (`bash` or `python3`) in sandbox `id`; returns its id.
    pub fn session(&self, id: &str, kind: &str) -> String {
        self.ok(&["session", "start", id, kind]).trim().to_string()
    }

    pub fn sh(&self, id: &str, script: &str) -> (i32, String, String) {
        let out = self.cli(&["exec", id, "--", "sh", "-c", script]);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Stops the daemon and checks that nothing is left: no mounts under our state dir, no cgroups for `ids`.
    /// One raw HTTP/1.1 request to the daemon's socket: (status, body). For what the CLI does not expose.
    pub fn http(&self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        use std::io::{Read, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&self.socket).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        // A refused upload may be answered (and the connection closed) before all of it is sent.
        let _ = s.write_all(body);
        let mut raw = Vec::new();
        // A peer that closed with our upload unread resets the connection after its answer: keep the answer.
        if let Err(e) = s.read_to_end(&mut raw) {
            assert!(
                e.kind() == std::io::ErrorKind::ConnectionReset && !raw.is_empty(),
                "{method} {path}: {e}"
            );
        }
        let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
        let head = String::from_utf8_lossy(&raw[..split]).to_lowercase();
        let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        let mut rest = raw[split + 4..].to_vec();
        if head.contains("transfer-encoding: chunked") {
            let mut out = Vec::new();
            loop {
                let nl = rest.windows(2).position(|w| w == b"\r\n").unwrap();
                let n = usize::from_str_radix(std::str::from_utf8(&rest[..nl]).unwrap().trim(), 16)
                    .unwrap();
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&rest[nl + 2..nl + 2 + n]);
                rest.drain(..nl + 2 + n + 2);
            }
            rest = out;
        }
        (status, rest)
    }

    /// [`TestDaemon::http`] with a JSON answer.
    pub fn http_json(&self, method: &str, path: &str, body: &[u8]) -> (u16, serde_json::Value) {
        let (status, b) = self.http(method, path, body);
        let v = serde_json::from_slice(&b).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&b).into_owned())
        });
        (status, v)
    }

    pub fn stop_and_check(mut self, ids: &[String]) {
        self.stop();
        assert_no_leaks(&self.dir, ids);
    }
}

pub fn cgroup_dirs_of(id: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for ctrl in ["memory", "pids", "cpu", "freezer", "unified"] {
        let base = Path::new("/sys/fs/cgroup").join(ctrl).join("deltabox");
        if let Ok(tags) = std::fs::read_dir(&base) {
            for t in tags.flatten() {
                let p = t.path().join(id);
                if p.exists() {
                    found.push(p);
                }
            }
        }
    }
    found
}

pub fn mounts_under(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(dir.to_str().unwrap()))
        .map(str::to_string)
        .collect()
}

/// Waits (up to 10 s) until `cond` holds: for effects that happen in the background, like layer GC.
pub fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn assert_no_leaks(dir: &Path, ids: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mounts = mounts_under(dir);
        let cgroups: Vec<_> = ids.iter().flat_map(|i| cgroup_dirs_of(i)).collect();
        if mounts.is_empty() && cgroups.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "leaked mounts {mounts:?} / cgroups {cgroups:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Processes on the host whose command line contains `needle`.
pub fn host_processes_with(needle: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .contains(needle)
                })
                .unwrap_or(false)
        })
        .collect()
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        self.stop();
        let store = self.dir.join("store");
        let _ = rustix_free_unmount(&store);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rustix_free_unmount(p: &Path) -> std::io::Result<()> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: umount2 with a valid C string.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `cmd` in session `s` of sandbox `id`, asserting it succeeded; returns its stdout.
pub fn out(d: &TestDaemon, id: &str, s: &str, cmd: &str) -> String {
    let r = d.json(&["session", "run", id, s, cmd]);
    assert_eq!(r["exit_code"], 0, "{cmd} in {id}: {r}");
    r["stdout"].as_str().unwrap().to_string()
}

/// Takes a checkpoint of sandbox `id` with its processes, asserting it kept them; returns its id.
pub fn checkpoint_processes(d: &TestDaemon, id: &str) -> String {
    let c = d.json(&["checkpoint", id, "--processes", "--json"]);
    assert!(c["with_processes"].as_bool().unwrap(), "{c}");
    c["id"].as_str().unwrap().to_string()
}

/// Starts, from bash session `sh`, a `sleep 1000` that dropped root (`setpriv` to uid/gid 65534, no
/// capabilities) while in `/root` (0700), holding the root-only file `/root/own` ("secret") open as descriptor
/// 7; returns its pid.
pub fn unprivileged_sleep(d: &TestDaemon, id: &str, sh: &str) -> String {
    out(
        d,
        id,
        sh,
        "echo secret > /root/own; chmod 600 /root/own; exec 7</root/own\n\
         setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=-all sleep 1000 </dev/null >/dev/null 2>&1 &\n\
         exec 7<&-; sleep 0.3; echo $!",
    )
    .trim()
    .to_string()
}
