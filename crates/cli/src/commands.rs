//! Client commands: thin wrappers over the daemon's API.

use std::io::Write;

use anyhow::{bail, Context, Result};
use base64::Engine;
use deltabox_daemon::api::{
    self, CheckpointInfo, CreateSandbox, ExecBody, ExecResult, MemoryFill, RollbackBody,
    RollbackInfo, SandboxInfo, SessionInfo, SessionResult, StreamEvent,
};
use deltabox_daemon::client::seg;
use deltabox_daemon::Client;
use hyper::Method;

use crate::cli::{BenchCmd, Cli, Command, SessionCmd};
use crate::daemon_cmd::ensure_daemon;
use crate::output;

/// Runs a parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> Result<i32> {
    if let Command::Daemon(args) = cli.command {
        init_tracing();
        return crate::daemon_cmd::run_daemon(cli.socket, cli.state_dir, args);
    }
    if let Command::Openapi = cli.command {
        let doc = <deltabox_daemon::server::ApiDoc as utoipa::OpenApi>::openapi();
        println!("{}", doc.to_pretty_json()?);
        return Ok(0);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let client = ensure_daemon(&cli.socket, &cli.state_dir).await?;
        dispatch(&client, cli.command, cli.json, &cli.state_dir).await
    })
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DELTABOX_LOG")
        .unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Prints a list as JSON, or as a table with one row per item.
fn print_list<T: serde::Serialize>(
    list: &[T],
    json: bool,
    header: &[&str],
    row: impl Fn(&T) -> Vec<String>,
) -> Result<()> {
    if json {
        return print_json(&list);
    }
    let rows: Vec<Vec<String>> = list.iter().map(row).collect();
    output::table(header, &rows);
    Ok(())
}

fn secs_to_ms(s: Option<f64>) -> Result<Option<u64>> {
    match s {
        Some(s) if !(s.is_finite() && s > 0.0) => {
            bail!("timeout must be a positive number of seconds")
        }
        Some(s) => Ok(Some((s * 1000.0) as u64)),
        None => Ok(None),
    }
}

async fn dispatch(
    client: &Client,
    command: Command,
    json: bool,
    state_dir: &std::path::Path,
) -> Result<i32> {
    match command {
        Command::Create(a) => {
            let body = CreateSandbox {
                image: a.image,
                memory: a.memory,
                pids: a.pids,
                cpus: a.cpus,
                network: a.network,
            };
            let info: SandboxInfo = client.create(&body).await?;
            if json {
                print_json(&info)?;
            } else {
                println!("{}", info.id);
            }
            Ok(0)
        }
        Command::Ls => {
            let list: Vec<SandboxInfo> = client
                .call(Method::GET, "/v1/sandboxes", None::<&()>)
                .await?;
            print_list(
                &list,
                json,
                &[
                    "ID", "STATUS", "IMAGE", "MEMORY", "PIDS", "CPUS", "SESSIONS", "NOTE",
                ],
                |s| {
                    vec![
                        s.id.clone(),
                        s.status.clone(),
                        s.image.clone(),
                        output::size(s.memory_bytes),
                        s.pids.map(|p| p.to_string()).unwrap_or("-".into()),
                        s.cpus.map(|c| c.to_string()).unwrap_or("-".into()),
                        s.sessions.to_string(),
                        s.reason.clone().unwrap_or_default(),
                    ]
                },
            )?;
            Ok(0)
        }
        Command::Info { id } => {
            let info: SandboxInfo = client
                .call(
                    Method::GET,
                    &format!("/v1/sandboxes/{}", seg(&id)),
                    None::<&()>,
                )
                .await?;
            print_json(&info)?;
            Ok(0)
        }
        Command::Exec(a) => {
            let mut env = std::collections::BTreeMap::new();
            for kv in &a.env {
                let (k, v) = kv
                    .split_once('=')
                    .with_context(|| format!("--env wants KEY=VALUE, got {kv:?}"))?;
                env.insert(k.to_string(), v.to_string());
            }
            let stdin = if a.stdin {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
                Some(s)
            } else {
                None
            };
            let body = ExecBody {
                argv: a.argv,
                env,
                cwd: a.cwd,
                stdin,
                timeout_ms: secs_to_ms(a.timeout)?,
                max_output_bytes: None,
            };
            if json {
                let r: ExecResult = client.exec(&a.id, &body).await?;
                print_json(&r)?;
                return Ok(r.shell_code());
            }
            exec_streaming(client, &a.id, &body).await
        }
        Command::Session(cmd) => session(client, cmd, json).await,
        Command::Rm { ids } => {
            let mut failed = false;
            for id in &ids {
                match client.remove(id).await {
                    Ok(()) if json => {
                        println!("{}", serde_json::json!({"id": id, "removed": true}))
                    }
                    Ok(()) => println!("{id}"),
                    Err(e) => {
                        eprintln!("deltabox: {id}: {e}");
                        failed = true;
                    }
                }
            }
            Ok(i32::from(failed))
        }
        Command::Checkpoint {
            id,
            processes,
            no_huge_pages,
        } => {
            let body = deltabox_daemon::api::CheckpointBody {
                processes,
                huge_pages: Some(!no_huge_pages),
            };
            let c: CheckpointInfo = client.checkpoint_body(&id, &body).await?;
            if json {
                print_json(&c)?;
            } else {
                println!("{}", c.id);
            }
            Ok(0)
        }
        Command::Rollback {
            id,
            checkpoint,
            eager,
        } => {
            let body = RollbackBody {
                checkpoint,
                memory: if eager {
                    MemoryFill::Eager
                } else {
                    MemoryFill::Lazy
                },
            };
            let r: RollbackInfo = client.rollback_body(&id, &body).await?;
            if json {
                print_json(&r)?;
            } else {
                println!("{} {}", r.sandbox_id, r.checkpoint);
                if r.processes_restarted {
                    eprintln!("deltabox: {}", r.note);
                }
            }
            Ok(0)
        }
        Command::Fork { checkpoint, n } => {
            let list: Vec<SandboxInfo> = client.fork(&checkpoint, n).await?;
            if json {
                print_json(&list)?;
            } else {
                // Like rollback: the ids on stdout, what the forks did not get on stderr.
                if let Some(note) = list.first().and_then(|s| s.note.as_deref()) {
                    eprintln!("deltabox: {note}");
                }
                for s in list {
                    println!("{}", s.id);
                }
            }
            Ok(0)
        }
        Command::Diff { from, to } => {
            let d: deltabox_runtime::diff::DiffResult = client
                .call(
                    Method::GET,
                    &format!("/v1/checkpoints/{}/diff/{}", seg(&from), seg(&to)),
                    None::<&()>,
                )
                .await?;
            if json {
                print_json(&d)?;
            } else {
                let mut lines: Vec<(String, char)> =
                    d.added.into_iter().map(|p| (p, 'A')).collect();
                lines.extend(d.deleted.into_iter().map(|p| (p, 'D')));
                lines.extend(d.changed.into_iter().map(|p| (p, 'M')));
                lines.sort();
                for (p, k) in lines {
                    println!("{k}\t{p}");
                }
            }
            Ok(0)
        }
        Command::RmCheckpoint { checkpoint } => {
            client.remove_checkpoint(&checkpoint).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"checkpoint": checkpoint, "removed": true})
                );
            } else {
                println!("{checkpoint}");
            }
            Ok(0)
        }
        Command::Checkpoints { id } => {
            let list: Vec<CheckpointInfo> = client
                .call(
                    Method::GET,
                    &format!("/v1/sandboxes/{}/checkpoints", seg(&id)),
                    None::<&()>,
                )
                .await?;
            print_list(
                &list,
                json,
                &[
                    "CHECKPOINT",
                    "PARENT",
                    "DEPTH",
                    "CREATED",
                    "PROCESSES",
                    "PINNED",
                ],
                |c| {
                    let processes = if !c.with_processes {
                        "-".to_string()
                    } else if c.durable {
                        format!("durable ({:.1} MB new)", c.image_new_bytes as f64 / 1e6)
                    } else if let Some(e) = &c.durable_error {
                        format!("warm only: {e}")
                    } else {
                        "warm".to_string()
                    };
                    vec![
                        c.id.clone(),
                        c.parent.clone().unwrap_or("-".into()),
                        c.depth.to_string(),
                        c.created_at.to_string(),
                        processes,
                        if c.pinned { "yes" } else { "-" }.to_string(),
                    ]
                },
            )?;
            Ok(0)
        }
        Command::Export { checkpoint, output } => {
            let path = absolute(&output)?;
            let r = with_progress(
                client,
                &format!("/v1/checkpoints/{}/export", seg(&checkpoint)),
                &path,
                "exporting",
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                let mb = |k: &str| r[k].as_u64().unwrap_or(0) as f64 / 1e6;
                println!(
                    "{}: {:.1} MB of content, {:.1} MB unique, {:.1} MB compressed",
                    path.display(),
                    mb("content_bytes"),
                    mb("blob_bytes"),
                    mb("archive_bytes")
                );
            }
            Ok(0)
        }
        Command::Import { archive } => {
            let path = absolute(&archive)?;
            let r = with_progress(client, "/v1/import", &path, "importing").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "{} {}",
                    r["sandbox_id"].as_str().unwrap_or(""),
                    r["checkpoint"].as_str().unwrap_or("")
                );
            }
            Ok(0)
        }
        Command::Pin { checkpoint } => pin(client, &checkpoint, true, json).await,
        Command::Unpin { checkpoint } => pin(client, &checkpoint, false, json).await,
        Command::Gc { dry_run } => {
            let r: deltabox_daemon::api::GcReport = client
                .call(
                    Method::POST,
                    "/v1/gc",
                    Some(&deltabox_daemon::api::GcBody { dry_run }),
                )
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                for e in &r.removed {
                    println!(
                        "{}{} (sandbox {})",
                        if dry_run { "would remove " } else { "removed " },
                        e.id,
                        e.sandbox_id
                    );
                }
                for e in &r.refused {
                    println!("kept: {e}");
                }
                println!(
                    "{} checkpoint{} {}, {} kept; their images' own space: {} bytes",
                    r.removed.len(),
                    if r.removed.len() == 1 { "" } else { "s" },
                    if dry_run { "would go" } else { "removed" },
                    r.kept,
                    r.image_bytes
                );
            }
            Ok(0)
        }
        Command::Pause { id } => lifecycle(client, &id, "pause", json).await,
        Command::Resume { id } => lifecycle(client, &id, "resume", json).await,
        Command::Demo => crate::demo::run(client).await,
        Command::Bench(BenchCmd::Cr { quick }) => crate::bench_cr::cr(client, quick).await,
        Command::Bench(BenchCmd::Durable { quick }) => {
            crate::bench_durable::durable(client, quick).await
        }
        Command::Bench(BenchCmd::Fs { quick }) => {
            crate::bench_fs::fs(client, state_dir, quick).await
        }
        Command::Bench(BenchCmd::Runtime { iterations }) => {
            crate::bench::runtime(client, iterations, json).await
        }
        Command::Daemon(_) | Command::Openapi => unreachable!("handled before connecting"),
    }
}

async fn lifecycle(client: &Client, id: &str, verb: &str, json: bool) -> Result<i32> {
    let info: SandboxInfo = client
        .call(
            Method::POST,
            &format!("/v1/sandboxes/{}/{verb}", seg(id)),
            None::<&()>,
        )
        .await?;
    if json {
        print_json(&info)?;
    } else {
        println!("{} {}", info.id, info.status);
    }
    Ok(0)
}

/// Streams a command's output through to ours; returns its exit code.
async fn exec_streaming(client: &Client, id: &str, body: &ExecBody) -> Result<i32> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut result: Option<Result<ExecResult>> = None;
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    client
        .stream(
            &format!("/v1/sandboxes/{}/exec/stream", seg(id)),
            body,
            |line| match serde_json::from_slice::<StreamEvent>(line) {
                Ok(StreamEvent::Stdout { data }) => {
                    let _ = stdout
                        .lock()
                        .write_all(&b64.decode(data).unwrap_or_default());
                    let _ = stdout.lock().flush();
                }
                Ok(StreamEvent::Stderr { data }) => {
                    let _ = stderr
                        .lock()
                        .write_all(&b64.decode(data).unwrap_or_default());
                }
                Ok(StreamEvent::Exit(r)) => result = Some(Ok(r)),
                Ok(StreamEvent::Error { message, .. }) => {
                    result = Some(Err(anyhow::anyhow!(message)))
                }
                Err(e) => result = Some(Err(anyhow::anyhow!("bad stream line: {e}"))),
            },
        )
        .await?;
    match result {
        Some(Ok(r)) => {
            if r.timed_out {
                eprintln!("deltabox: command timed out and was killed");
            } else if r.oom_killed {
                eprintln!("deltabox: command was killed: the sandbox ran out of memory");
            }
            if r.stdout_truncated || r.stderr_truncated {
                tracing::debug!("output was larger than the capture bound (streamed in full)");
            }
            Ok(r.shell_code())
        }
        Some(Err(e)) => Err(e),
        None => bail!("the daemon closed the stream before the command finished"),
    }
}

async fn session(client: &Client, cmd: SessionCmd, json: bool) -> Result<i32> {
    match cmd {
        SessionCmd::Start { id, kind, cwd } => {
            let body = api::StartSession {
                kind,
                cwd,
                env: Default::default(),
            };
            let s: SessionInfo = client.start_session(&id, &body).await?;
            if json {
                print_json(&s)?;
            } else {
                println!("{}", s.id);
            }
            Ok(0)
        }
        SessionCmd::Run {
            id,
            session,
            command,
            timeout,
        } => {
            let body = api::RunInSession {
                command,
                timeout_ms: secs_to_ms(timeout)?,
                max_output_bytes: None,
            };
            let r: SessionResult = client.run_in_session(&id, &session, &body).await?;
            if json {
                print_json(&r)?;
            } else {
                print!("{}", r.stdout);
                eprint!("{}", r.stderr);
                let _ = std::io::stdout().flush();
                if r.timed_out {
                    eprintln!("deltabox: command timed out and was interrupted");
                }
                if !r.session_alive {
                    eprintln!("deltabox: the session has ended");
                }
            }
            Ok(if r.timed_out {
                124
            } else {
                r.exit_code.unwrap_or(1)
            })
        }
        SessionCmd::Ls { id } => {
            let list: Vec<SessionInfo> = client
                .call(
                    Method::GET,
                    &format!("/v1/sandboxes/{}/sessions", seg(&id)),
                    None::<&()>,
                )
                .await?;
            print_list(&list, json, &["SESSION", "KIND", "PID", "ALIVE"], |s| {
                vec![
                    s.id.clone(),
                    s.kind.clone(),
                    s.pid.to_string(),
                    s.alive.to_string(),
                ]
            })?;
            Ok(0)
        }
        SessionCmd::Stop { id, session } => {
            client
                .call::<()>(
                    Method::DELETE,
                    &format!("/v1/sandboxes/{}/sessions/{}", seg(&id), seg(&session)),
                    None::<&()>,
                )
                .await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"session": session, "stopped": true})
                );
            }
            Ok(0)
        }
    }
}

/// `pin` / `unpin`.
async fn pin(client: &Client, checkpoint: &str, pinned: bool, json: bool) -> Result<i32> {
    let path = format!("/v1/checkpoints/{}/pin", seg(checkpoint));
    let method = if pinned { Method::POST } else { Method::DELETE };
    client.call::<()>(method, &path, None::<&()>).await?;
    if json {
        println!(
            "{}",
            serde_json::json!({"checkpoint": checkpoint, "pinned": pinned})
        );
    } else {
        println!("{checkpoint}");
    }
    Ok(0)
}

fn absolute(p: &std::path::Path) -> Result<std::path::PathBuf> {
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    })
}

/// Runs a streamed archive operation, drawing its progress on stderr (when it is a terminal); returns its result.
async fn with_progress(
    client: &Client,
    path: &str,
    archive: &std::path::Path,
    what: &str,
) -> Result<serde_json::Value> {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    let mut result = None;
    let mut error = None;
    let body = deltabox_daemon::api::ArchiveBody {
        path: archive.display().to_string(),
    };
    client
        .stream(path, &body, |line| {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
                return;
            };
            if let Some(p) = v.get("progress") {
                let (done, total) = (
                    p["done"].as_u64().unwrap_or(0),
                    p["total"].as_u64().unwrap_or(0),
                );
                if tty && total > 0 {
                    let filled = (done * 30 / total) as usize;
                    eprint!(
                        "\r{what} [{}{}] {:3}% {:.1}/{:.1} MB",
                        "#".repeat(filled),
                        " ".repeat(30 - filled.min(30)),
                        done * 100 / total,
                        done as f64 / 1e6,
                        total as f64 / 1e6
                    );
                }
            } else if let Some(r) = v.get("result") {
                result = Some(r.clone());
            } else if let Some(e) = v.get("error") {
                error = Some(e["message"].as_str().unwrap_or("failed").to_string());
            }
        })
        .await?;
    if tty {
        eprintln!();
    }
    if let Some(e) = error {
        bail!("{e}");
    }
    result.context("the daemon sent no result")
}
