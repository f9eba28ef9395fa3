//! `deltabox bench cr`: process checkpoint and rollback (DeltaCR) against a process's anonymous memory and the
//! number of processes, with the phase breakdown, and CRIU dump/restore of identical processes (same program and
//! heap, on the host: CRIU cannot dump from inside our sandboxes yet) measured in the same run. Prints numbers;
//! asserts none, except that every rollback really restored the state.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use deltabox_daemon::api::{
    CheckpointBody, CheckpointInfo, CreateSandbox, RollbackInfo, RunInSession, SandboxInfo,
    SessionInfo, SessionResult, StartSession,
};
use deltabox_daemon::Client;

/// Median and p99 of a sample.
pub(crate) fn stats(mut v: Vec<f64>) -> (f64, f64) {
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let pick = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    (pick(0.5), pick(0.99))
}

fn med(v: &[f64]) -> f64 {
    stats(v.to_vec()).0
}

pub(crate) async fn run(c: &Client, id: &str, sid: &str, code: &str) -> Result<String> {
    let body = RunInSession {
        command: code.into(),
        timeout_ms: Some(300_000),
        max_output_bytes: None,
    };
    let r: SessionResult = c.run_in_session(id, sid, &body).await?;
    ensure!(
        r.exit_code == Some(0),
        "bench step failed: {code}: {}",
        r.stderr
    );
    Ok(r.stdout)
}

/// Per-phase samples of checkpoints and rollbacks, in ms.
#[derive(Default)]
struct Samples {
    ck: Vec<f64>,
    ck_freeze: Vec<f64>,
    ck_capture: Vec<f64>,
    ck_fs: Vec<f64>,
    rb: Vec<f64>,
    rb_kill: Vec<f64>,
    rb_fs: Vec<f64>,
    rb_fork: Vec<f64>,
    rb_repoint: Vec<f64>,
    /// Writing one byte per 4 KiB page of the heap right after a rollback (copy-on-write faults).
    touch: Vec<f64>,
}

/// Waits until no template of the sandbox is still being collapsed into huge pages.
async fn wait_collapsed(c: &Client, id: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let list = c.list_checkpoints(id).await?;
        if !list
            .iter()
            .any(|ck| ck.templates.as_ref().is_some_and(|t| t.collapsing))
        {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the huge-page collapse did not finish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A sandbox under measurement: its python session, how to check its state, how to time first writes.
#[derive(Clone, Copy)]
struct Workload<'a> {
    id: &'a str,
    py: &'a str,
    /// Python code printing the state …
    verify: &'a str,
    /// … which must print this after every rollback.
    expect: &'a str,
    /// Python code printing the milliseconds it took to write every page of the heap.
    touch: Option<&'a str>,
}

/// Checkpoints `reps` times (after a tiny change each), then rolls back `reps` times to the first one, checking
/// with `verify` that the state came back. With `huge`, the background huge-page collapse is on and allowed to
/// finish after every checkpoint (as an agent's think time would), after one warm-up checkpoint; with `touch`, a
/// few more rollbacks each time `touch` (it prints milliseconds).
async fn measure(c: &Client, w: &Workload<'_>, reps: usize, huge: bool) -> Result<Samples> {
    let Workload {
        id,
        py,
        verify,
        expect,
        touch,
    } = *w;
    let mut s = Samples::default();
    let mut first = None;
    let body = CheckpointBody {
        processes: true,
        huge_pages: Some(huge),
    };
    if huge {
        run(c, id, py, "tick = -2").await?;
        c.checkpoint_body(id, &body).await?;
        wait_collapsed(c, id).await?;
    }
    for i in 0..reps {
        run(c, id, py, &format!("tick = {i}")).await?;
        let t = Instant::now();
        let ck: CheckpointInfo = c.checkpoint_body(id, &body).await?;
        s.ck.push(t.elapsed().as_secs_f64() * 1e3);
        if let Some(sw) = &ck.switch {
            s.ck_freeze.push(sw.freeze_us as f64 / 1e3);
            s.ck_capture.push(sw.capture_us as f64 / 1e3);
            s.ck_fs.push((sw.mount_us + sw.repoint_us) as f64 / 1e3);
        }
        if first.is_none() {
            first = Some(ck.id);
        } else {
            // Only the first one is rolled back to: the others' templates would only crowd the pool (and the
            // per-sandbox cap would evict the first one with 16 processes).
            c.remove_checkpoint(&ck.id).await?;
        }
        if huge {
            wait_collapsed(c, id).await?;
        }
    }
    let first = first.context("no checkpoint")?;
    for _ in 0..reps {
        run(c, id, py, "tick = -1").await?;
        let t = Instant::now();
        let r: RollbackInfo = c.rollback(id, &first).await?;
        s.rb.push(t.elapsed().as_secs_f64() * 1e3);
        ensure!(
            !r.processes_restarted,
            "rollback restarted processes: {}",
            r.note
        );
        if let Some(rr) = &r.restore {
            s.rb_kill.push(rr.kill_us as f64 / 1e3);
            s.rb_fs.push(rr.mount_us as f64 / 1e3);
            s.rb_fork.push(rr.fork_us as f64 / 1e3);
            s.rb_repoint.push(rr.repoint_us as f64 / 1e3);
        }
        let got = run(c, id, py, verify).await?;
        if got.trim() != expect {
            bail!("rollback did not restore the state: {verify} gave {got:?}, expected {expect:?}");
        }
    }
    if let Some(touch) = touch {
        for _ in 0..reps.min(5) {
            c.rollback(id, &first).await?;
            let ms: f64 = run(c, id, py, touch).await?.trim().parse()?;
            s.touch.push(ms);
        }
    }
    Ok(s)
}

/// A process tree started with `setsid sh -c CMD` on the host, for CRIU.
pub(crate) struct HostTree {
    pid: i32,
    /// The original root process, ours to reap (a zombie would keep its pid from CRIU's restore); restored
    /// trees are re-parented away from us by `criu restore -d`.
    child: std::cell::RefCell<Option<std::process::Child>>,
}

impl HostTree {
    pub(crate) fn start(cmd: &str, ready: impl Fn(i32) -> bool) -> Result<HostTree> {
        let child = Command::new("setsid")
            .args(["sh", "-c", cmd])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let tree = HostTree {
            pid: child.id() as i32,
            child: std::cell::RefCell::new(Some(child)),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready(tree.pid) {
            ensure!(
                Instant::now() < deadline,
                "host process tree never got ready"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(200));
        Ok(tree)
    }

    /// The root process's pid.
    pub(crate) fn pid(&self) -> i32 {
        self.pid
    }

    fn kill(&self) {
        // Every pid of the tree must be free (reaped) before CRIU can restore it.
        let pids = tree_pids(self.pid);
        // SAFETY: kill(2) on our own process group (setsid made pid the group id).
        unsafe { libc::kill(-self.pid, libc::SIGKILL) };
        if let Some(mut c) = self.child.borrow_mut().take() {
            let _ = c.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while pids
            .iter()
            .any(|p| Path::new(&format!("/proc/{p}")).exists())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for HostTree {
    fn drop(&mut self) {
        self.kill();
    }
}

fn tree_pids(root: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let mut todo = vec![root];
    while let Some(p) = todo.pop() {
        out.push(p);
        todo.extend(
            std::fs::read_to_string(format!("/proc/{p}/task/{p}/children"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|c| c.parse::<i32>().ok()),
        );
    }
    out
}

pub(crate) fn rss_mb(pid: i32) -> u64 {
    let descendants = |pid: i32| -> Vec<i32> {
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    let mut total = 0;
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{p}/status")) {
            total += s
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0);
        }
        todo.extend(descendants(p));
    }
    total / 1024
}

/// CRIU dump (`--leave-running`) and restore (after killing the tree) of `tree`, `reps` times; medians in ms.
pub(crate) fn criu_cycle(tree: &HostTree, reps: usize, scratch: &Path) -> Result<(f64, f64)> {
    let (mut dumps, mut restores) = (Vec::new(), Vec::new());
    for r in 0..reps {
        let dir = scratch.join(format!("img{r}"));
        std::fs::create_dir_all(&dir)?;
        let t = Instant::now();
        let out = Command::new("criu")
            .args(["dump", "--leave-running", "-o", "dump.log", "-t"])
            .arg(tree.pid.to_string())
            .arg("-D")
            .arg(&dir)
            .output()
            .context("run criu (scripts/setup-criu.sh installs it)")?;
        dumps.push(t.elapsed().as_secs_f64() * 1e3);
        ensure!(
            out.status.success(),
            "criu dump failed (log: {})",
            dir.join("dump.log").display()
        );
        tree.kill();
        let t = Instant::now();
        let out = Command::new("criu")
            .args(["restore", "-d", "-o", "restore.log", "-D"])
            .arg(&dir)
            .output()?;
        restores.push(t.elapsed().as_secs_f64() * 1e3);
        ensure!(
            out.status.success(),
            "criu restore failed (log: {})",
            dir.join("restore.log").display()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok((med(&dumps), med(&restores)))
}

pub(crate) fn scratch_dir() -> Result<PathBuf> {
    // Images on a tmpfs: CRIU is measured at its best, not at the disk's speed.
    let d = PathBuf::from(format!("/dev/shm/deltabox-bench-cr-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// The table header (`first`: the first column's name).
fn print_header(first: &str) {
    println!(
        "{first:>6} {:>6} {:>15} {:>26} {:>15} {:>32} {:>12} {:>10} {:>13}",
        "pages",
        "checkpoint",
        "(freeze / capture / fs)",
        "rollback",
        "(kill / fs / fork / re-point)",
        "first write",
        "CRIU dump",
        "CRIU restore"
    );
}

/// One table row: DeltaCR's samples and the CRIU baseline (or why it is missing).
fn print_row(label: &str, pages: &str, s: &Samples, criu: Option<Result<(f64, f64)>>) {
    let (cd, cr) = match criu {
        Some(Ok(v)) => (format!("{:.1}", v.0), format!("{:.1}", v.1)),
        Some(Err(e)) => {
            eprintln!("CRIU baseline not measured: {e:#}");
            ("n/a".into(), "n/a".into())
        }
        None => ("".into(), "".into()),
    };
    let touch = if s.touch.is_empty() {
        "-".to_string()
    } else {
        format!("{:.2}", med(&s.touch))
    };
    println!(
        "{label:>6} {pages:>6} {:>15} {:>26} {:>15} {:>32} {touch:>12} {cd:>10} {cr:>13}",
        fmt_pair(stats(s.ck.clone())),
        format!(
            "{:.2} / {:.2} / {:.2}",
            med(&s.ck_freeze),
            med(&s.ck_capture),
            med(&s.ck_fs)
        ),
        fmt_pair(stats(s.rb.clone())),
        format!(
            "{:.2} / {:.2} / {:.2} / {:.2}",
            med(&s.rb_kill),
            med(&s.rb_fs),
            med(&s.rb_fork),
            med(&s.rb_repoint)
        ),
    );
}

pub(crate) fn fmt_pair((m, p): (f64, f64)) -> String {
    format!("{m:.2} ({p:.2})")
}

/// Runs the benchmark.
pub async fn cr(client: &Client, quick: bool) -> Result<i32> {
    let sizes: &[usize] = if quick {
        &[10, 100]
    } else {
        &[10, 100, 500, 1000]
    };
    let counts: &[usize] = if quick { &[1, 4] } else { &[1, 4, 16] };
    let reps = if quick { 5 } else { 15 };
    let criu_reps = if quick { 2 } else { 5 };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let criu = Command::new("criu")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_else(|_| "not installed".into());
    println!(
        "deltabox bench cr: kernel {}, criu {criu}, {reps} reps per cell (CRIU: {criu_reps}), times in ms, median (p99)",
        kernel.trim()
    );
    let scratch = scratch_dir()?;
    let start_session = |kind: &str| StartSession {
        kind: kind.into(),
        cwd: None,
        env: Default::default(),
    };

    println!("\na bash session + a python3 session holding N MB of anonymous memory (its heap):");
    print_header("MB");
    for &mb in sizes {
        // Each page size in a sandbox of its own: the first one's templates would otherwise hold a copy of the
        // heap while the second one collapses its own.
        let mut rows = Vec::new();
        for huge in [false, true] {
            let sb: SandboxInfo = client
                .create(&CreateSandbox {
                    memory: Some(format!("{}M", mb * 4 + 1024)),
                    ..Default::default()
                })
                .await?;
            let result = async {
                let _bash: SessionInfo =
                    client.start_session(&sb.id, &start_session("bash")).await?;
                let py: SessionInfo = client
                    .start_session(&sb.id, &start_session("python3"))
                    .await?;
                run(
                    client,
                    &sb.id,
                    &py.id,
                    &format!("import time; data = bytearray(b'x') * ({mb} << 20)"),
                )
                .await?;
                let touch = "t = time.perf_counter(); data[::4096] = b'y' * len(range(0, len(data), 4096)); print((time.perf_counter() - t) * 1e3)";
                let expect = format!("(0, {})", mb << 20);
                let w = Workload {
                    id: &sb.id,
                    py: &py.id,
                    verify: "tick, len(data)",
                    expect: &expect,
                    touch: Some(touch),
                };
                measure(client, &w, reps, huge).await
            }
            .await;
            client.remove(&sb.id).await?;
            rows.push(result?);
        }
        let criu = HostTree::start(
            &format!(
                "exec python3 -c \"import time; data = b'x' * ({mb} << 20); time.sleep(1e9)\""
            ),
            |pid| rss_mb(pid) as usize >= mb,
        )
        .and_then(|tree| criu_cycle(&tree, criu_reps, &scratch));
        print_row(&mb.to_string(), "4K", &rows[0], Some(criu));
        print_row("", "2M", &rows[1], None);
    }

    println!(
        "\nN idle python3 processes (started from a bash session) + the bash and python3 sessions:"
    );
    print_header("N");
    for &n in counts {
        let sb: SandboxInfo = client.create(&CreateSandbox::default()).await?;
        let result = async {
            let bash: SessionInfo = client.start_session(&sb.id, &start_session("bash")).await?;
            let py: SessionInfo = client.start_session(&sb.id, &start_session("python3")).await?;
            run(
                client,
                &sb.id,
                &bash.id,
                &format!("for i in $(seq {n}); do python3 -c 'import time; time.sleep(1e9)' & done; sleep 1"),
            )
            .await?;
            run(client, &sb.id, &py.id, "import os").await?;
            let expect = format!("(0, {n})");
            let w = Workload {
                id: &sb.id,
                py: &py.id,
                // Alive and not stopped: sleeping, or still running (a copy restarts its nanosleep right after
                // the rollback, and may not have been scheduled yet when this runs).
                verify: "tick, len([p for p in os.listdir('/proc') if p.isdigit() and b'time.sleep' in open('/proc/%s/cmdline' % p, 'rb').read() and open('/proc/%s/stat' % p).read().split(') ')[1][0] in 'SR'])",
                expect: &expect,
                touch: None,
            };
            measure(client, &w, reps, true).await
        }
        .await;
        client.remove(&sb.id).await?;
        let s = result?;
        let criu = HostTree::start(
            &format!(
                "for i in $(seq {n}); do python3 -c 'import time; time.sleep(1e9)' & done; wait"
            ),
            |pid| {
                std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                    .map(|c| c.split_whitespace().count() >= n)
                    .unwrap_or(false)
            },
        )
        .and_then(|tree| criu_cycle(&tree, criu_reps, &scratch));
        print_row(&n.to_string(), "", &s, Some(criu));
    }
    let _ = std::fs::remove_dir_all(&scratch);
    fork_fanout(client, if quick { &[1, 4] } else { &[1, 4, 16, 64] }).await?;
    println!("\npages: 4K = templates share the live processes' small pages; 2M = background huge-page collapse on (the default), measured after it finished");
    println!("first write = writing one byte per 4 KiB page of the heap right after a rollback (copy-on-write)");
    println!("\nrollback = kill the live processes (a large small-page process hands its memory teardown to a holder that dies after the answer) and, while they die, mount the generation and pivot onto it (fs); once their pids are free (kill) fork every template with its pid (fork), re-point; every rollback was verified (the heap's length, the processes alive)");
    Ok(0)
}

/// The state every branch of the fan-out must read back: a repository of small files and a 64 MiB heap.
const FANOUT_SETUP_BASH: &str =
    "mkdir -p /repo && cd /repo && for i in $(seq 200); do printf 'line %s\\n' $i > f$i.txt; done";
const FANOUT_SETUP_PY: &str =
    "import hashlib, os\ndata = bytearray(range(256)) * (256 << 10)\nmark = hashlib.sha256(data).hexdigest()[:16]";
const FANOUT_VERIFY_PY: &str = "len(data), hashlib.sha256(data).hexdigest()[:16] == mark, len(os.listdir('/repo')), open('/repo/f77.txt').read().strip(), os.getpid()";

/// Fork ×N of live processes (RL fan-out): N branches of one checkpoint of a bash session and a python3 REPL
/// holding 64 MiB, with a small repository; every branch reads back and verifies what it inherited. Beside it, in
/// the same run, the copy-free alternative without live forks: N fresh sandboxes that rebuild the state.
async fn fork_fanout(client: &Client, counts: &[usize]) -> Result<()> {
    println!(
        "\nfork ×N (RL fan-out): a bash session + a python3 REPL holding 64 MiB, and a 200-file repository; each branch verifies its heap (sha256), files and pids:"
    );
    println!(
        "{:>4} {:>12} {:>12} {:>14} {:>22} {:>12}",
        "N", "fork", "per branch", "verify all", "rebuild (fresh + replay)", "ratio"
    );
    let start_session = |kind: &str| StartSession {
        kind: kind.into(),
        cwd: None,
        env: Default::default(),
    };
    let src: SandboxInfo = client.create(&CreateSandbox::default()).await?;
    let result = async {
        let bash: SessionInfo = client
            .start_session(&src.id, &start_session("bash"))
            .await?;
        let py: SessionInfo = client
            .start_session(&src.id, &start_session("python3"))
            .await?;
        run(client, &src.id, &bash.id, FANOUT_SETUP_BASH).await?;
        run(client, &src.id, &py.id, FANOUT_SETUP_PY).await?;
        let expect = run(client, &src.id, &py.id, FANOUT_VERIFY_PY).await?;
        let ck = client
            .checkpoint_body(
                &src.id,
                &CheckpointBody {
                    processes: true,
                    huge_pages: Some(true),
                },
            )
            .await?;
        wait_collapsed(client, &src.id).await?;
        for &n in counts {
            let t = Instant::now();
            let branches = client.fork(&ck.id, n).await?;
            let fork_ms = t.elapsed().as_secs_f64() * 1e3;
            let verified = async {
                let t = Instant::now();
                for b in &branches {
                    ensure!(
                        b.forked_processes.len() >= 2,
                        "branch {} got no processes",
                        b.id
                    );
                    let got = run(client, &b.id, &py.id, FANOUT_VERIFY_PY).await?;
                    ensure!(
                        got == expect,
                        "branch {} read back {got:?}, expected {expect:?}",
                        b.id
                    );
                }
                Ok(t.elapsed().as_secs_f64() * 1e3)
            }
            .await;
            for b in &branches {
                client.remove(&b.id).await?;
            }
            let verify_ms = verified?;
            // The same state rebuilt in N fresh sandboxes (what a fan-out costs without live forks).
            let t = Instant::now();
            let mut fresh = Vec::new();
            let rebuilt = async {
                for _ in 0..n {
                    let sb: SandboxInfo = client.create(&CreateSandbox::default()).await?;
                    fresh.push(sb.id.clone());
                    let bash: SessionInfo =
                        client.start_session(&sb.id, &start_session("bash")).await?;
                    let py: SessionInfo = client
                        .start_session(&sb.id, &start_session("python3"))
                        .await?;
                    run(client, &sb.id, &bash.id, FANOUT_SETUP_BASH).await?;
                    run(client, &sb.id, &py.id, FANOUT_SETUP_PY).await?;
                }
                Ok::<_, anyhow::Error>(t.elapsed().as_secs_f64() * 1e3)
            }
            .await;
            for id in &fresh {
                client.remove(id).await?;
            }
            let rebuild_ms = rebuilt?;
            println!(
                "{n:>4} {fork_ms:>12.1} {:>12.2} {verify_ms:>14.1} {rebuild_ms:>22.1} {:>11.1}×",
                fork_ms / n as f64,
                rebuild_ms / fork_ms
            );
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    client.remove(&src.id).await?;
    result?;
    println!("fork = one API call making N live sandboxes (init, generation, processes forked from the templates with their pids, sessions re-wired, cgroup); ratio = rebuild / fork");
    Ok(())
}
