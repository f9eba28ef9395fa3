//! Running the daemon (foreground), starting it on first use, and the zygote entry point.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use deltabox_daemon::{Client, Config, Daemon};

use crate::cli::DaemonArgs;

/// `deltabox __zygote --host-root PATH` (started by the daemon; never by hand).
pub fn zygote_main(args: &[String]) -> i32 {
    let host_root = match args {
        [flag, path] if flag == "--host-root" => PathBuf::from(path),
        _ => {
            eprintln!("deltabox: __zygote is internal");
            return 2;
        }
    };
    // SAFETY: first thing in this process; the daemon put the socket at fd 3.
    let sock = unsafe { deltabox_runtime::zygote::inherited_socket() };
    match deltabox_runtime::zygote::run(sock, &host_root) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("deltabox zygote: {e}");
            1
        }
    }
}

fn lock_state_dir(state_dir: &Path) -> Result<std::fs::File> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("create {}", state_dir.display()))?;
    let path = state_dir.join("daemon.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    // SAFETY: flock on a descriptor we own; no memory involved.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!("another daemon already uses {}", state_dir.display());
    }
    Ok(f)
}

fn read_or_create_token(path: &Path) -> Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Ok(t) = std::fs::read_to_string(path) {
        let t = t.trim().to_string();
        if t.len() >= 16 {
            return Ok(t);
        }
        bail!("token in {} is shorter than 16 characters", path.display());
    }
    let mut b = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))?;
    let token: String = b.iter().map(|x| format!("{x:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    std::io::Write::write_all(&mut f, token.as_bytes())?;
    Ok(token)
}

/// `deltabox daemon`.
pub fn run_daemon(socket: PathBuf, state_dir: PathBuf, args: DaemonArgs) -> Result<i32> {
    let _lock = lock_state_dir(&state_dir)?;
    let mut config = Config {
        state_dir,
        socket,
        tcp: args.listen,
        token: None,
        ..Config::from_env()
    };
    if args.listen.is_some() {
        let file = args
            .token_file
            .clone()
            .unwrap_or_else(|| config.state_dir.join("token"));
        config.token = Some(read_or_create_token(&file)?);
    }
    // Mount the layer store before the zygote copies our mount namespace.
    deltabox_daemon::storefs::ensure_mounted(&config.state_dir)?;
    // The zygote is spawned from the main thread: its parent-death signal is tied to the spawning thread.
    let exe = std::env::current_exe().context("find own executable")?;
    let zygote =
        deltabox_runtime::Zygote::spawn(&exe, &config.host_root()).context("start zygote")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let d = Daemon::open(config, zygote)?;
        tracing::info!(socket = %d.config.socket.display(), cgroup = d.cgroup_version(), "deltabox daemon ready");
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
        };
        deltabox_daemon::server::serve(d.clone(), shutdown).await?;
        d.shutdown().await;
        deltabox_daemon::storefs::unmount(&d.config.state_dir);
        anyhow::Ok(0)
    })
}

/// Connects to the daemon, starting it in the background first if nothing listens at the socket.
pub async fn ensure_daemon(socket: &Path, state_dir: &Path) -> Result<Client> {
    let client = Client::new(socket);
    if client
        .call::<serde_json::Value>(hyper::Method::GET, "/v1/health", None::<&()>)
        .await
        .is_ok()
    {
        return Ok(client);
    }
    if std::env::var_os("DELTABOX_NO_AUTOSTART").is_some() {
        bail!(
            "no daemon is listening at {} (and DELTABOX_NO_AUTOSTART is set)",
            socket.display()
        );
    }
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("create {}", state_dir.display()))?;
    let log = state_dir.join("daemon.log");
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)?;
    let exe = std::env::current_exe()?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--socket")
        .arg(socket)
        .arg("--state-dir")
        .arg(state_dir)
        .arg("daemon");
    cmd.stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid is async-signal-safe; the daemon must not die with our terminal.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("start the daemon")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if client
            .call::<serde_json::Value>(hyper::Method::GET, "/v1/health", None::<&()>)
            .await
            .is_ok()
        {
            return Ok(client);
        }
        if let Ok(Some(status)) = child.try_wait() {
            // Lost a start race to another CLI? Then someone else's daemon answers soon.
            if client
                .call::<serde_json::Value>(hyper::Method::GET, "/v1/health", None::<&()>)
                .await
                .is_ok()
            {
                return Ok(client);
            }
            bail!("the daemon exited ({status}); see {}", log.display());
        }
        if Instant::now() > deadline {
            bail!(
                "the daemon did not come up within 20 s; see {}",
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
