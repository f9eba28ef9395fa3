//! `deltabox bench runtime`: sandbox create→ready, one-shot exec round trip and session command round trip, each
//! measured side by side with bubblewrap (`bwrap`) doing the same in the same run. Prints numbers; asserts none.
//!
//! What "the same" means for bwrap, which has no daemon: create→ready and exec are both one `bwrap … true`
//! (namespaces, mounts, exec, exit); the session round trip is one command through pipes to a bash or python
//! process already running inside a bwrap sandbox (no HTTP, no daemon: a lower bound).

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result};
use deltabox_daemon::api::{CreateSandbox, ExecBody, RunInSession, SessionInfo, StartSession};
use deltabox_daemon::Client;

#[derive(serde::Serialize)]
struct Stat {
    name: String,
    system: String,
    n: usize,
    median_ms: f64,
    p99_ms: f64,
    min_ms: f64,
}

fn stat(name: &str, system: &str, mut v: Vec<f64>) -> Stat {
    v.sort_by(|a, b| a.total_cmp(b));
    let pick = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    Stat {
        name: name.into(),
        system: system.into(),
        n: v.len(),
        median_ms: pick(0.5),
        p99_ms: pick(0.99),
        min_ms: v[0],
    }
}

fn bwrap_base() -> Vec<String> {
    let mut a: Vec<String> = [
        "--unshare-all",
        "--die-with-parent",
        "--new-session",
        "--ro-bind",
        "/usr",
        "/usr",
        "--ro-bind",
        "/etc",
        "/etc",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for d in ["bin", "sbin", "lib", "lib64", "lib32", "libx32"] {
        let p = std::path::Path::new("/").join(d);
        if let Ok(target) = std::fs::read_link(&p) {
            a.extend([
                "--symlink".into(),
                target.to_string_lossy().into_owned(),
                format!("/{d}"),
            ]);
        } else if p.is_dir() {
            a.extend([
                "--ro-bind".into(),
                p.to_string_lossy().into_owned(),
                format!("/{d}"),
            ]);
        }
    }
    a.extend(
        [
            "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--tmpfs", "/root", "--chdir",
            "/root",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    a
}

fn bwrap_available() -> bool {
    Command::new("bwrap")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn bwrap_run_true(base: &[String]) -> Result<f64> {
    let t = Instant::now();
    let st = Command::new("bwrap")
        .args(base)
        .arg("true")
        .stdin(Stdio::null())
        .status()?;
    anyhow::ensure!(st.success(), "bwrap true failed: {st}");
    Ok(t.elapsed().as_secs_f64() * 1e3)
}

/// Round trips through a persistent interpreter inside bwrap: send one command, read the acknowledgement line.
fn bwrap_session(base: &[String], argv: &[&str], cmd: &str, n: usize) -> Result<Vec<f64>> {
    let mut child = Command::new("bwrap")
        .args(base)
        .args(argv)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut out = BufReader::new(child.stdout.take().context("stdout")?);
    let mut line = String::new();
    let mut v = Vec::with_capacity(n);
    for i in 0..=n {
        let t = Instant::now();
        stdin.write_all(cmd.as_bytes())?;
        stdin.flush()?;
        line.clear();
        out.read_line(&mut line)?;
        if i > 0 {
            v.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    drop(stdin);
    let _ = child.kill();
    let _ = child.wait();
    Ok(v)
}

async fn timed<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<(T, f64)> {
    let t = Instant::now();
    let r = f.await?;
    Ok((r, t.elapsed().as_secs_f64() * 1e3))
}

/// Runs the runtime benchmark.
pub async fn runtime(client: &Client, n: usize, json: bool) -> Result<i32> {
    let n = n.max(3);
    let mut stats = Vec::new();
    // DeltaBox: create→ready (the API call returns once init is up, hardened, and ready to run commands).
    let mut create = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..n {
        let body = CreateSandbox {
            ..Default::default()
        };
        let (info, ms) = timed(async { Ok(client.create(&body).await?) }).await?;
        create.push(ms);
        ids.push(info.id);
    }
    let id = ids[0].clone();
    let mut exec = Vec::new();
    let body = ExecBody {
        argv: vec!["true".into()],
        ..Default::default()
    };
    for i in 0..=n {
        let (r, ms) = timed(async { Ok(client.exec(&id, &body).await?) }).await?;
        anyhow::ensure!(r.exit_code == Some(0), "exec true failed");
        if i > 0 {
            exec.push(ms);
        }
    }
    let mut sessions = Vec::new();
    for (kind, cmd) in [("bash", ":"), ("python3", "pass")] {
        let start = StartSession {
            kind: kind.into(),
            cwd: None,
            env: Default::default(),
        };
        let s: SessionInfo = client.start_session(&id, &start).await?;
        let body = RunInSession {
            command: cmd.into(),
            timeout_ms: None,
            max_output_bytes: None,
        };
        let mut v = Vec::new();
        for i in 0..=n {
            let (_r, ms) =
                timed(async { Ok(client.run_in_session(&id, &s.id, &body).await?) }).await?;
            if i > 0 {
                v.push(ms);
            }
        }
        sessions.push((kind, v));
    }
    let mut remove = Vec::new();
    for id in &ids {
        let (_, ms) = timed(async { Ok(client.remove(id).await?) }).await?;
        remove.push(ms);
    }
    stats.push(stat("create→ready", "deltabox", create));
    stats.push(stat("exec `true` round trip", "deltabox", exec));
    for (kind, v) in sessions.iter() {
        stats.push(stat(
            &format!("{kind} session round trip"),
            "deltabox",
            v.clone(),
        ));
    }
    stats.push(stat("remove", "deltabox", remove));

    if bwrap_available() {
        let base = bwrap_base();
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(bwrap_run_true(&base)?);
        }
        stats.push(stat("create→ready", "bwrap", v.clone()));
        stats.push(stat("exec `true` round trip", "bwrap", v));
        let bash = bwrap_session(&base, &["bash", "--norc", "--noprofile"], ":; echo\n", n)?;
        stats.push(stat("bash session round trip", "bwrap", bash));
        let py_loop = "import sys\nfor l in sys.stdin:\n    exec(l)\n    print(flush=True)";
        let py = bwrap_session(&base, &["python3", "-u", "-c", py_loop], "pass\n", n)?;
        stats.push(stat("python3 session round trip", "bwrap", py));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
        return Ok(0);
    }
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "deltabox bench runtime: n={n} per row, kernel {}, {} cpus",
        kernel.trim(),
        std::thread::available_parallelism()
            .map(|p| p.get())
            .unwrap_or(0)
    );
    println!(
        "{:<28} {:>9} {:>12} {:>10} {:>10} {:>10}",
        "metric", "system", "median ms", "p99 ms", "min ms", "ratio"
    );
    for s in &stats {
        let base = stats
            .iter()
            .find(|b| b.system == "bwrap" && b.name == s.name);
        let ratio = match (s.system.as_str(), base) {
            ("deltabox", Some(b)) => format!("{:.2}x", s.median_ms / b.median_ms),
            _ => String::new(),
        };
        println!(
            "{:<28} {:>9} {:>12.3} {:>10.3} {:>10.3} {:>10}",
            s.name, s.system, s.median_ms, s.p99_ms, s.min_ms, ratio
        );
    }
    if !bwrap_available() {
        println!("(bwrap is not installed: scripts/setup.sh installs bubblewrap for the side-by-side rows)");
    }
    println!("ratio = deltabox median / bwrap median, measured in this run");
    Ok(0)
}
