//! `deltabox bench durable`: durable checkpoints. The slow-path rollback (templates gone, rebuilt from their
//! images) against the process's memory, beside the fast path and CRIU's restore of the same program in the same
//! run; the space images take over a trajectory against the bytes actually changed; and what writing images in
//! the background costs an agent's next command. Prints numbers; asserts only that every rollback restored the
//! state.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use deltabox_daemon::api::{
    CheckpointBody, CheckpointInfo, CreateSandbox, ExecBody, MemoryFill, RollbackBody,
    RollbackInfo, SandboxInfo, SessionInfo, StartSession,
};
use deltabox_daemon::Client;

use crate::bench_cr::{criu_cycle, fmt_pair, rss_mb, run, scratch_dir, stats, HostTree};

fn start_session(kind: &str) -> StartSession {
    StartSession {
        kind: kind.into(),
        cwd: None,
        env: Default::default(),
    }
}

/// Waits until checkpoint `cid` is durable; returns its listing.
async fn wait_durable(c: &Client, id: &str, cid: &str) -> Result<CheckpointInfo> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let list = c.list_checkpoints(id).await?;
        let ck = list
            .into_iter()
            .find(|x| x.id == cid)
            .context("checkpoint gone")?;
        if ck.durable {
            return Ok(ck);
        }
        if let Some(e) = &ck.durable_error {
            anyhow::bail!("durable images of {cid} failed: {e}");
        }
        ensure!(Instant::now() < deadline, "images of {cid} never written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Kills every process of the sandbox, templates included (as `kill -9 -1` from inside would).
async fn kill_all(c: &Client, id: &str) -> Result<()> {
    let body = ExecBody {
        argv: vec!["sh".into(), "-c".into(), "kill -9 -1; true".into()],
        ..Default::default()
    };
    let _ = c.exec(id, &body).await;
    Ok(())
}

/// What tracking written pages (uffd WP-async + `PAGEMAP_SCAN`) would cost instead of comparing an image with its
/// parent's: starting it registers and write-protects the process's memory, on the checkpoint's critical path
/// (the process stopped) and again for every new process, which each rollback makes.
async fn write_tracking(mb: usize, reps: usize) -> Result<()> {
    println!("
write tracking (uffd WP-async + PAGEMAP_SCAN), the alternative to comparing bytes: a python3 process on the host holding {mb} MB that rewrites 64 random bytes every 20 ms:");
    let tree = HostTree::start(
        &format!(
            "exec python3 -c \"import os, random, time\ndata = bytearray(os.urandom(1 << 20)) * {mb}\nwhile True:\n    for _ in range(64): data[random.randrange(len(data))] = 1\n    time.sleep(0.02)\"",
        ),
        |pid| rss_mb(pid) as usize >= mb,
    )?;
    let pid = tree.pid();
    let (starts, scans, found) = tokio::task::spawn_blocking(move || -> Result<_> {
        use deltabox_sys::dirty::DirtyTracker;
        use deltabox_sys::inject::{find_syscall_insn, Tracee};
        let (mut starts, mut scans, mut found) = (Vec::new(), Vec::new(), Vec::new());
        let p = nix::unistd::Pid::from_raw(pid);
        for _ in 0..reps {
            let mut t = Tracee::seize(p, p, find_syscall_insn(p)?, Duration::from_secs(5))?;
            let started = Instant::now();
            let mut tracker = DirtyTracker::start(&mut t)?;
            starts.push(started.elapsed().as_secs_f64() * 1e3);
            t.detach()?;
            for _ in 0..5 {
                std::thread::sleep(Duration::from_millis(50));
                let started = Instant::now();
                let w = tracker.take_written()?;
                scans.push(started.elapsed().as_secs_f64() * 1e3);
                found.push(DirtyTracker::bytes(&w) as f64 / 1024.0);
            }
        }
        Ok((starts, scans, found))
    })
    .await??;
    drop(tree);
    println!(
        "  start (register + write-protect everything, process stopped): {} ms; scan (pages written since the last, protected again): {} ms, finding {} KiB per 50 ms",
        ms(&starts),
        ms(&scans),
        ms(&found)
    );
    Ok(())
}

/// Slow-path rollback times of one size, ms.
#[derive(Default)]
struct Timings {
    lazy: Vec<f64>,
    lazy_next: Vec<f64>,
    eager: Vec<f64>,
    eager_next: Vec<f64>,
    fast: Vec<f64>,
}

fn ms(v: &[f64]) -> String {
    fmt_pair(stats(v.to_vec()))
}

/// A sandbox with memory for `mb` MB three times over (the process, a template, a rebuilt one) and a python3
/// session that ran `setup`; removed again if that fails.
async fn python_sandbox(
    client: &Client,
    mb: usize,
    setup: &str,
) -> Result<(SandboxInfo, SessionInfo)> {
    let sb: SandboxInfo = client
        .create(&CreateSandbox {
            memory: Some(format!("{}M", mb * 3 + 1024)),
            ..Default::default()
        })
        .await?;
    let py = async {
        let py: SessionInfo = client
            .start_session(&sb.id, &start_session("python3"))
            .await?;
        run(client, &sb.id, &py.id, setup).await?;
        Ok::<_, anyhow::Error>(py)
    }
    .await;
    match py {
        Ok(py) => Ok((sb, py)),
        Err(e) => {
            let _ = client.remove(&sb.id).await;
            Err(e)
        }
    }
}

/// Runs the benchmark.
pub async fn durable(client: &Client, quick: bool) -> Result<i32> {
    let sizes: &[usize] = if quick {
        &[10, 100]
    } else {
        &[10, 100, 500, 1000]
    };
    let reps = if quick { 3 } else { 7 };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "deltabox bench durable: kernel {}, {reps} reps per cell, times in ms, median (p99)",
        kernel.trim()
    );
    println!("\nslow-path rollback: a python3 session holding N MB (its templates killed, rebuilt from the checkpoint's images) beside the fast path and CRIU restoring the same program:");
    println!(
        "{:>6} {:>9} {:>14} {:>14} {:>14} {:>14} {:>13} {:>12} {:>12}",
        "MB",
        "image MB",
        "slow lazy",
        "next command",
        "slow eager",
        "next command",
        "fast rollback",
        "image write",
        "CRIU restore"
    );
    let scratch = scratch_dir()?;
    for &mb in sizes {
        let (sb, py) = python_sandbox(
            client,
            mb,
            &format!("import os, hashlib; data = bytearray(os.urandom(1 << 20)) * {mb}; tick = 0"),
        )
        .await?;
        let result = async {
            let body = CheckpointBody {
                processes: true,
                huge_pages: Some(true),
            };
            let t = Instant::now();
            let ck: CheckpointInfo = client.checkpoint_body(&sb.id, &body).await?;
            let listed = wait_durable(client, &sb.id, &ck.id).await?;
            let write_ms = t.elapsed().as_secs_f64() * 1e3;
            let expect = format!("0 {}", mb << 20);
            let digest = run(
                client,
                &sb.id,
                &py.id,
                "print(hashlib.sha256(data).hexdigest())",
            )
            .await?;
            let mut t = Timings::default();
            for _ in 0..reps {
                for fill in [MemoryFill::Lazy, MemoryFill::Eager] {
                    kill_all(client, &sb.id).await?;
                    let body = RollbackBody {
                        checkpoint: ck.id.clone(),
                        memory: fill,
                    };
                    let started = Instant::now();
                    let r: RollbackInfo = client.rollback_body(&sb.id, &body).await?;
                    let slow = started.elapsed().as_secs_f64() * 1e3;
                    ensure!(
                        r.note.contains("durable images"),
                        "not a slow-path rollback: {}",
                        r.note
                    );
                    let lazy = r.restore.as_ref().map_or(0, |x| x.lazy_bytes);
                    ensure!(
                        (fill == MemoryFill::Lazy) == (lazy > 0),
                        "{fill:?} rollback left {lazy} bytes to copy lazily"
                    );
                    // The agent's next command (it reads a little of the heap).
                    let started = Instant::now();
                    let got = run(client, &sb.id, &py.id, "print(tick, len(data))").await?;
                    let next = started.elapsed().as_secs_f64() * 1e3;
                    ensure!(
                        got.trim() == expect,
                        "slow path ({fill:?}) restored {got:?}, expected {expect:?}"
                    );
                    // Every byte as it was (this reads the whole heap).
                    let got = run(
                        client,
                        &sb.id,
                        &py.id,
                        "print(hashlib.sha256(data).hexdigest())",
                    )
                    .await?;
                    ensure!(
                        got.trim() == digest.trim(),
                        "slow path ({fill:?}) restored other memory"
                    );
                    match fill {
                        MemoryFill::Lazy => {
                            t.lazy.push(slow);
                            t.lazy_next.push(next);
                        }
                        MemoryFill::Eager => {
                            t.eager.push(slow);
                            t.eager_next.push(next);
                        }
                    }
                }
                run(client, &sb.id, &py.id, "tick = 1").await?;
                let started = Instant::now();
                client.rollback(&sb.id, &ck.id).await?;
                t.fast.push(started.elapsed().as_secs_f64() * 1e3);
                let got = run(client, &sb.id, &py.id, "print(tick, len(data))").await?;
                ensure!(got.trim() == expect, "fast path restored {got:?}");
            }
            Ok::<_, anyhow::Error>((listed.image_bytes, t, write_ms))
        }
        .await;
        client.remove(&sb.id).await?;
        let (bytes, t, write_ms) = result?;
        let criu = HostTree::start(
            &format!(
                "exec python3 -c \"import os, time; data = bytearray(os.urandom(1 << 20)) * {mb}; time.sleep(1e9)\""
            ),
            |pid| rss_mb(pid) as usize >= mb,
        )
        .and_then(|tree| criu_cycle(&tree, reps.min(3), &scratch));
        let criu = match criu {
            Ok((_, restore)) => format!("{restore:.1}"),
            Err(e) => format!("failed: {e}"),
        };
        println!(
            "{mb:>6} {:>9} {:>14} {:>14} {:>14} {:>14} {:>13} {:>12.1} {:>12}",
            bytes >> 20,
            ms(&t.lazy),
            ms(&t.lazy_next),
            ms(&t.eager),
            ms(&t.eager_next),
            ms(&t.fast),
            write_ms,
            criu
        );
    }
    let _ = std::fs::remove_dir_all(&scratch);

    // Space over a trajectory.
    let (mb, steps) = if quick { (32usize, 12usize) } else { (100, 50) };
    println!("\nimage space over a {steps}-step trajectory: a python3 session holding {mb} MB; each step rewrites a few random pages (the bytes changed), then a process checkpoint:");
    let (sb, py) = python_sandbox(
        client,
        mb,
        &format!("import os, random; random.seed(7); data = bytearray(os.urandom(1 << 20)) * {mb}"),
    )
    .await?;
    let result = async {
        let (mut changed, mut stored, mut new, mut first) = (0u64, 0u64, 0u64, 0u64);
        let mut writes = Vec::new();
        let mut unchanged = 0u64;
        // Small pages: the templates share every unchanged page with the live process (collapsed ones would
        // each hold a full copy, and 50 of them would not fit the sandbox's memory limit).
        let body = CheckpointBody {
            processes: true,
            huge_pages: Some(false),
        };
        for step in 0..steps {
            let pages = 16 + (step * 37) % 240;
            run(
                client,
                &sb.id,
                &py.id,
                &format!("for _ in range({pages}):\n    i = random.randrange(len(data) // 4096) * 4096\n    data[i:i + 4096] = os.urandom(4096)"),
            )
            .await?;
            let started = Instant::now();
            let ck: CheckpointInfo = client.checkpoint_body(&sb.id, &body).await?;
            let listed = wait_durable(client, &sb.id, &ck.id).await?;
            if step > 0 {
                writes.push(started.elapsed().as_secs_f64() * 1e3);
            }
            stored += listed.image_bytes;
            unchanged += listed.image_unchanged_bytes;
            if step == 0 {
                first = listed.image_new_bytes;
            } else {
                changed += pages as u64 * 4096;
                new += listed.image_new_bytes;
            }
        }
        Ok::<_, anyhow::Error>((changed, stored, new, first, writes, unchanged))
    }
    .await;
    client.remove(&sb.id).await?;
    let (changed, stored, new, first, writes, unchanged) = result?;
    println!(
        "  first image (whole): {:.1} MB; then over {} steps: heap bytes changed {:.1} MB, new space the images took {:.1} MB ({:.2}x the bytes changed, {:.2} MB a step); without sharing all {steps} images would take {:.1} MB",
        first as f64 / 1e6,
        steps - 1,
        changed as f64 / 1e6,
        new as f64 / 1e6,
        new as f64 / changed.max(1) as f64,
        new as f64 / 1e6 / (steps - 1) as f64,
        stored as f64 / 1e6,
    );
    println!(
        "  each later image written in {} ms, in the background; of the later images' {:.1} MB, {:.1} MB were known unchanged from the page tables (neither read nor compared), the rest read and compared with the parent's byte for byte",
        ms(&writes),
        (stored - first) as f64 / 1e6,
        unchanged as f64 / 1e6
    );
    write_tracking(mb, reps).await?;

    // What background image writing costs the agent's next command.
    let mb = if quick { 64 } else { 256 };
    println!("\nthe agent's next command while a checkpoint's images are written ({mb} MB python3 process; the command hashes 32 MB):");
    let (sb, py) = python_sandbox(
        client,
        mb,
        &format!("import os, hashlib, time; data = bytearray(os.urandom(1 << 20)) * {mb}; work = bytes(32 << 20)"),
    )
    .await?;
    let result = async {
        let cmd = "t = time.perf_counter(); hashlib.sha256(work).digest(); print((time.perf_counter() - t) * 1e3)";
        let body = CheckpointBody {
            processes: true,
            huge_pages: Some(false),
        };
        let (mut during, mut idle) = (Vec::new(), Vec::new());
        for i in 0..reps {
            run(client, &sb.id, &py.id, &format!("data[{i} * 4096 * 64] = 1")).await?;
            let ck: CheckpointInfo = client.checkpoint_body(&sb.id, &body).await?;
            during.push(run(client, &sb.id, &py.id, cmd).await?.trim().parse::<f64>()?);
            wait_durable(client, &sb.id, &ck.id).await?;
            idle.push(run(client, &sb.id, &py.id, cmd).await?.trim().parse::<f64>()?);
        }
        Ok::<_, anyhow::Error>((during, idle))
    }
    .await;
    client.remove(&sb.id).await?;
    let (during, idle) = result?;
    let (d, _) = stats(during.clone());
    let (i, _) = stats(idle.clone());
    println!(
        "  right after the checkpoint (images being written): {}; once they are written: {}; ratio {:.2}x",
        ms(&during),
        ms(&idle),
        d / i
    );
    println!("\nslow rollback = kill every process (templates too), then one API call: files rolled back, templates rebuilt from their images in blank copies of the sandbox's init (mappings, registers, descriptors by injected calls), processes forked from them with their pids. Eager: the memory is filled (pread) before they run; lazy: heaps of 1 MiB and more are left missing, a pager copies each page as it is touched and the rest in the background (the call returns before that). Next command: the agent's next session command (it reads a little of the heap), after the rollback. Each rollback is then checked by hashing the whole heap. Fast rollback = from the rebuilt templates. Image write = from the checkpoint call until the images are durable (background). CRIU restore: the same program on the host, images on tmpfs.");
    Ok(0)
}
