//! `deltabox demo`: the main job on the embedded default image, narrated. A short agent-like trajectory in a
//! fresh sandbox: write a buggy module and its tests, run them, fix the bug, re-run, explore in a python REPL
//! whose state persists, commit with git, and show what the sandbox can and cannot see. Every step is
//! checkpointed with its processes; a bad branch is rolled back (the REPL's variables and the shell's working
//! directory come back with the files), then an earlier checkpoint; then an explored checkpoint is forked with
//! its live processes.

use std::time::Instant;

use anyhow::{bail, Result};
use deltabox_daemon::api::{
    CheckpointInfo, CreateSandbox, ExecBody, ExecResult, RunInSession, SandboxInfo, SessionInfo,
    SessionResult, StartSession,
};
use deltabox_daemon::Client;

const CALC: &str = r#"def add(a, b):
    return a - b   # bug: the agent will fix this


def mul(a, b):
    return a * b
"#;

const TESTS: &str = r#"import unittest
from calc import add, mul


class CalcTest(unittest.TestCase):
    def test_add(self):
        self.assertEqual(add(2, 3), 5)

    def test_mul(self):
        self.assertEqual(mul(4, 5), 20)


if __name__ == "__main__":
    unittest.main()
"#;

struct Demo<'a> {
    client: &'a Client,
    id: String,
    step: usize,
    /// (label, checkpoint id, round-trip ms) of every checkpoint taken.
    checkpoints: Vec<(String, String, f64)>,
}

impl Demo<'_> {
    fn say(&mut self, what: &str) {
        self.step += 1;
        println!("\n[{}] {what}", self.step);
    }

    async fn session(&self, sid: &str, command: &str) -> Result<SessionResult> {
        let body = RunInSession {
            command: command.into(),
            timeout_ms: Some(120_000),
            max_output_bytes: None,
        };
        let t = Instant::now();
        let r: SessionResult = self.client.run_in_session(&self.id, sid, &body).await?;
        for line in r.stdout.lines().chain(r.stderr.lines()) {
            println!("    | {line}");
        }
        println!(
            "    -> status {} in {:.1} ms (round trip {:.1} ms)",
            r.exit_code.map(|c| c.to_string()).unwrap_or("?".into()),
            r.duration_ms,
            t.elapsed().as_secs_f64() * 1e3
        );
        Ok(r)
    }

    /// Checkpoints the sandbox, files and processes (which keep running), and prints the latency.
    async fn checkpoint(&mut self, label: &str) -> Result<String> {
        let t = Instant::now();
        let c: CheckpointInfo = self.client.checkpoint_with(&self.id, true).await?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let sw = c.switch.unwrap_or_default();
        println!(
            "    -> checkpoint {} ({label}): {ms:.2} ms round trip; in the sandbox: frozen {:.2} ms, {} processes captured, {} cwd + {} fds re-pointed",
            c.id,
            sw.total_us as f64 / 1e3,
            c.processes.len(),
            sw.cwds,
            sw.fds
        );
        self.checkpoints.push((label.to_string(), c.id.clone(), ms));
        Ok(c.id)
    }

    async fn rollback(&self, cid: &str) -> Result<f64> {
        let t = Instant::now();
        let r = self.client.rollback(&self.id, cid).await?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        println!("    -> rolled back to {cid} in {ms:.2} ms ({})", r.note);
        Ok(ms)
    }

    async fn exec(&self, argv: &[&str]) -> Result<ExecResult> {
        let body = ExecBody {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            timeout_ms: Some(60_000),
            ..Default::default()
        };
        let r: ExecResult = self.client.exec(&self.id, &body).await?;
        for line in r.stdout.lines().chain(r.stderr.lines()) {
            println!("    | {line}");
        }
        println!("    -> exit {} in {:.1} ms", r.shell_code(), r.duration_ms);
        Ok(r)
    }
}

/// Runs the demo; returns 0 when every step behaved as expected.
pub async fn run(client: &Client) -> Result<i32> {
    println!("DeltaBox demo: an agent-like trajectory in a fresh sandbox (host image, no network)");
    let t = Instant::now();
    let body = CreateSandbox {
        memory: Some("1G".into()),
        pids: Some(256),
        ..Default::default()
    };
    let info: SandboxInfo = client.create(&body).await?;
    println!(
        "\ncreated sandbox {} in {:.1} ms (memory 1G, pids 256, loopback only)",
        info.id,
        t.elapsed().as_secs_f64() * 1e3
    );
    let mut d = Demo {
        client,
        id: info.id.clone(),
        step: 0,
        checkpoints: Vec::new(),
    };
    let result = trajectory(&mut d).await;
    let rm = client.remove(&info.id).await;
    match (&result, rm) {
        (Ok(()), Ok(())) => {
            println!(
                "\nremoved sandbox {}: processes, cgroup and writable layer are gone",
                info.id
            );
            println!("demo finished in {:.2} s", t.elapsed().as_secs_f64());
            Ok(0)
        }
        (Err(e), _) => bail!("demo failed: {e:#}"),
        (_, Err(e)) => bail!("removing the sandbox failed: {e}"),
    }
}

async fn trajectory(d: &mut Demo<'_>) -> Result<()> {
    let start = |kind: &str| StartSession {
        kind: kind.into(),
        cwd: None,
        env: Default::default(),
    };
    let bash: SessionInfo = d.client.start_session(&d.id, &start("bash")).await?;
    let py: SessionInfo = d.client.start_session(&d.id, &start("python3")).await?;
    println!(
        "started a bash session ({}) and a python3 session ({})",
        bash.id, py.id
    );

    d.say("agent writes a module with a bug, and its tests");
    let write = format!("mkdir -p /work/calc && cd /work/calc && cat > calc.py <<'EOF'\n{CALC}EOF\ncat > test_calc.py <<'EOF'\n{TESTS}EOF\nls -l");
    d.session(&bash.id, &write).await?;
    let written = d.checkpoint("module written").await?;

    d.say("agent runs the tests (the session remembers the working directory)");
    let r = d
        .session(&bash.id, "python3 -m unittest -q 2>&1 | tail -n 4")
        .await?;
    if !r.stdout.contains("FAILED") {
        bail!("the buggy module should fail its tests");
    }
    d.checkpoint("tests run").await?;

    d.say("agent edits the file to fix the bug");
    d.session(
        &bash.id,
        "sed -i 's/return a - b.*/return a + b/' calc.py && grep -n 'return a' calc.py",
    )
    .await?;

    d.say("agent re-runs the tests");
    let r = d.session(&bash.id, "python3 -m unittest -q 2>&1 | tail -n 2; exit_code=${PIPESTATUS[0]}; (exit $exit_code)").await?;
    if r.exit_code != Some(0) {
        bail!("the fixed module should pass its tests");
    }
    let fixed = d.checkpoint("bug fixed").await?;

    d.say("agent explores in the python REPL (variables persist between commands)");
    d.session(&py.id, "import sys; sys.path.insert(0, '/work/calc')\nimport calc\ndata = [calc.add(i, i) for i in range(100_000)]\nlen(data)").await?;
    let r = d.session(&py.id, "sum(data), calc.mul(6, 7)").await?;
    if !r.stdout.contains("(9999900000, 42)") {
        bail!("the REPL lost its state");
    }

    d.say("agent commits the fix with git");
    d.checkpoint("REPL explored").await?;
    d.session(&bash.id, "git init -q . && git add -A && git -c user.name=agent -c user.email=agent@example.invalid commit -qm 'fix add' && git log --oneline").await?;

    d.say("what the sandbox sees: its own pid 1, hostname, an empty /home, no host secrets, loopback only");
    d.exec(&["sh", "-c", "echo \"pid $$ (pid 1 is $(cat /proc/1/comm)), hostname $(hostname)\"; echo \"/home entries: $(ls -A /home | wc -l); /etc/shadow: $(cat /etc/shadow 2>&1 | head -c 60)\"; echo \"network interfaces: $(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' ' | tr '\\n' ' ')\""]).await?;

    d.say("a runaway command is interrupted by its timeout; the session survives");
    let body = RunInSession {
        command: "sleep 600".into(),
        timeout_ms: Some(500),
        max_output_bytes: None,
    };
    let r: SessionResult = d.client.run_in_session(&d.id, &bash.id, &body).await?;
    println!(
        "    -> timed out: {}, session alive: {}",
        r.timed_out, r.session_alive
    );
    d.session(&bash.id, "echo still here in $(pwd)").await?;

    d.say("the agent explores a bad branch: deletes the project and clobbers the REPL's data");
    let explored = d.checkpoint("before the bad branch").await?;
    d.session(&bash.id, "cd / && rm -rf /work/calc && ls /work")
        .await?;
    d.session(&py.id, "data = None; del calc").await?;

    d.say("roll back: files, the REPL's variables and the shell's working directory are back");
    d.rollback(&explored).await?;
    let r = d.session(&py.id, "sum(data), calc.mul(6, 7)").await?;
    if !r.stdout.contains("(9999900000, 42)") {
        bail!("rollback should have restored the REPL's state");
    }
    let r = d.session(&bash.id, "pwd && git log --oneline").await?;
    if !r.stdout.starts_with("/work/calc") {
        bail!("rollback should have restored the shell's working directory");
    }

    d.say("roll back further, to before the fix: the bug is back (and the REPL has no data yet)");
    d.rollback(&written).await?;
    let r = d
        .session(&bash.id, "python3 -m unittest -q 2>&1 | tail -n 1")
        .await?;
    if !r.stdout.contains("FAILED") {
        bail!("rollback should have restored the buggy module");
    }
    let r = d.session(&py.id, "'data' in globals()").await?;
    if !r.stdout.contains("False") {
        bail!("the REPL should be back to before it computed data");
    }

    d.say("roll forward to the fixed checkpoint: the tests pass again");
    d.rollback(&fixed).await?;
    d.session(&bash.id, "python3 -m unittest -q 2>&1 | tail -n 1")
        .await?;

    d.say("fork the explored checkpoint three times: each branch goes on from its processes (the REPL's data, the shell's directory, the same pids) and diverges on its own");
    let t = Instant::now();
    let forks = d.client.fork(&explored, 3).await?;
    println!(
        "    -> forked 3 sandboxes in {:.2} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let client = d.client;
    for (i, f) in forks.iter().enumerate() {
        let run = |sid: &str, command: String| {
            let body = RunInSession {
                command,
                timeout_ms: Some(60_000),
                max_output_bytes: None,
            };
            let (id, sid) = (f.id.clone(), sid.to_string());
            async move { client.run_in_session(&id, &sid, &body).await }
        };
        let shown = match &f.note {
            // Its templates were evicted or killed: a fork of the files, with fresh processes.
            Some(note) => format!("files only ({note})"),
            None => {
                let r: SessionResult = run(
                    &py.id,
                    format!("branch = {i}; sum(data), calc.mul(6, 7), branch"),
                )
                .await?;
                if !r.stdout.contains(&format!("(9999900000, 42, {i})")) {
                    bail!("fork {} should have the REPL's data: {}", f.id, r.stdout);
                }
                let sh: SessionResult = run(&bash.id, "pwd".into()).await?;
                format!(
                    "python {} · bash in {} · pids {:?}",
                    r.stdout.trim(),
                    sh.stdout.trim(),
                    f.forked_processes
                )
            }
        };
        println!("    | fork {}: {shown}", f.id);
    }
    for f in &forks {
        d.client.remove(&f.id).await?;
    }

    d.say("the agent kills everything it can see (`kill -9 -1`), the checkpoint's templates included; its durable images (written in the background) bring the processes back");
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let list = d.client.list_checkpoints(&d.id).await?;
        let ck = list.iter().find(|c| c.id == explored);
        if let Some(ck) = ck.filter(|c| c.durable) {
            println!(
                "    -> checkpoint {} is durable: {:.1} MB of memory in its images, {:.1} MB of it new (the rest shared with the previous checkpoint's)",
                ck.id,
                ck.image_bytes as f64 / 1e6,
                ck.image_new_bytes as f64 / 1e6
            );
            break;
        }
        if let Some(e) = ck.and_then(|c| c.durable_error.clone()) {
            bail!("the checkpoint's images could not be written: {e}");
        }
        if Instant::now() > deadline {
            bail!("the checkpoint's images were not written in time");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    d.exec(&["sh", "-c", "kill -9 -1; true"]).await?;
    d.rollback(&explored).await?;
    let r = d.session(&py.id, "sum(data), calc.mul(6, 7)").await?;
    if !r.stdout.contains("(9999900000, 42)") {
        bail!("the images should have restored the REPL's state");
    }
    d.session(&bash.id, "pwd").await?;
    let mut ms: Vec<f64> = d.checkpoints.iter().map(|c| c.2).collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    println!(
        "\ncheckpoints taken: {} (median {:.2} ms round trip, debug/release as built)",
        ms.len(),
        ms[ms.len() / 2]
    );
    Ok(())
}
