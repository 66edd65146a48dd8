//! `coregate` command-line entry: parse arguments, dispatch, exit codes.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;

use coregate::cli::{Cli, Command, RunArgs, WorkerArgs};
use coregate::config::{self, Snapshot};
use coregate::control::{self, RunOptions, Server, parse_core_list};
use coregate::worker::Role;

fn main() -> ExitCode {
    coregate::log::init_from_env();
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("coregate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    if !matches!(command, Command::Check { .. }) {
        let limit = control::raise_fd_limit();
        coregate::info!("open files limit: {limit}");
    }
    match command {
        Command::Check { config } => match config::load(&config) {
            Ok(s) => {
                println!(
                    "{}: ok ({} listeners, {} upstream groups, {} routes)",
                    config.display(),
                    s.listeners.len(),
                    s.upstreams.len(),
                    s.routes.len()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Run(args) => run(args),
        Command::Origin {
            listen,
            body_size,
            workers,
        } => {
            let snapshot = origin_snapshot(&listen)?;
            control::block_signals();
            let server = Server::start(snapshot, &run_options(&workers)?, Role::Origin(body_size))?;
            println!(
                "coregate origin listening on http://{} ({body_size}-byte bodies)",
                server.local_addrs()[0]
            );
            control::run_until_signal(vec![server])?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { listen, workers } => demo(&listen, &workers),
    }
}

fn run_options(w: &WorkerArgs) -> anyhow::Result<RunOptions> {
    let cores = match &w.cores {
        None => None,
        Some(s) => Some(parse_core_list(s).map_err(|e| anyhow::anyhow!("--cores: {e}"))?),
    };
    Ok(RunOptions {
        workers: w.workers,
        cores,
        driver: w.driver,
    })
}

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let snapshot = match (&args.config, &args.listen, &args.upstream) {
        (Some(path), _, _) => config::load(path),
        (None, Some(listen), Some(upstream)) => config::quick(listen, upstream),
        _ => anyhow::bail!("give --config FILE, or --listen ADDR with --upstream URL"),
    };
    let snapshot = match snapshot {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!("{e}");
            eprintln!("coregate: refusing to start with an invalid configuration");
            return Ok(ExitCode::FAILURE);
        }
    };
    control::block_signals();
    let server = Server::start(snapshot, &run_options(&args.workers)?, Role::Proxy)?;
    for addr in server.local_addrs() {
        println!("coregate listening on http://{addr}");
    }
    control::run_until_signal(vec![server])?;
    Ok(ExitCode::SUCCESS)
}

fn origin_snapshot(listen: &str) -> anyhow::Result<Arc<Snapshot>> {
    // The origin reuses listener parsing; its one route is never consulted.
    let s = config::quick(listen, "tcp://127.0.0.1:9").map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Arc::new(s))
}

fn demo(listen: &str, workers: &WorkerArgs) -> anyhow::Result<ExitCode> {
    control::block_signals();
    let origin_opts = RunOptions {
        workers: Some(1),
        ..run_options(workers)?
    };
    let origin = Server::start(
        origin_snapshot("127.0.0.1:0")?,
        &origin_opts,
        Role::Origin(128),
    )
    .context("start the demo origin")?;
    let origin_addr = origin.local_addrs()[0];
    let text = format!(
        "# coregate demo: one upstream group with the built-in origin behind it.\n\
         [[listener]]\nlisten = \"{listen}\"\n\n\
         [upstream.demo]\nbackends = [\"tcp://{origin_addr}\"]\n\n\
         [[route]]\nupstream = \"demo\"\n"
    );
    let snapshot = config::parse(&text, "<demo>").map_err(|e| anyhow::anyhow!("{e}"))?;
    let proxy = Server::start(Arc::new(snapshot), &run_options(workers)?, Role::Proxy)?;
    let addr = proxy.local_addrs()[0];
    println!("coregate demo: proxy on http://{addr} -> built-in origin on http://{origin_addr}");
    println!("try:   curl -i http://{addr}/");
    println!("load:  wrk -t1 -c50 -d10s http://{addr}/");
    println!("stop:  Ctrl-C");
    control::run_until_signal(vec![proxy, origin])?;
    Ok(ExitCode::SUCCESS)
}
