//! `deltabox`: the command-line client, the daemon launcher, the demo and the benchmarks.

mod bench;
mod bench_cr;
mod bench_durable;
mod bench_fs;
mod cli;
mod commands;
mod daemon_cmd;
mod demo;
mod output;

use clap::Parser;

fn main() {
    // The zygote must stay single-threaded: dispatch it before anything could start a thread.
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("__zygote") {
        std::process::exit(daemon_cmd::zygote_main(&args[2..]));
    }
    let cli = cli::Cli::parse();
    if !matches!(cli.command, cli::Command::Daemon(_)) {
        // A client whose output is cut short (`deltabox ls | head -1`) ends quietly, like other command-line
        // tools, instead of panicking on the broken pipe. (The daemon keeps ignoring SIGPIPE: a client that
        // goes away must not end it.)
        // SAFETY: SIG_DFL installs no handler code; nothing else has started yet.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let json = cli.json;
    let code = match commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            if json {
                let msg = serde_json::json!({"error": {"message": format!("{e:#}")}});
                println!("{msg}");
            }
            eprintln!("deltabox: {e:#}");
            1
        }
    };
    std::process::exit(code);
}
