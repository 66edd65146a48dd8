//! `coregate` command-line entry: parse arguments, dispatch, exit codes.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;

use coregate::admin::{self, Reloader};
use coregate::cli::{Cli, Command, RunArgs, WorkerArgs};
use coregate::client;
use coregate::config::epoch::Published;
use coregate::config::{self, Snapshot};
use coregate::control::{self, RunOptions, Server, parse_core_list};
use coregate::stats::hub::Hub;
use coregate::stats::{Report, render};
use coregate::upgrade::{self, Handover, Sockets};
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
    if !matches!(
        command,
        Command::Check { .. }
            | Command::Reload { .. }
            | Command::Upgrade { .. }
            | Command::Drain { .. }
            | Command::Stats { .. }
            | Command::Top { .. }
    ) {
        let limit = control::raise_fd_limit();
        coregate::info!("open files limit: {limit}");
    }
    match command {
        Command::Check { config } => match config::load(&config) {
            Ok(s) => {
                for line in expiry_warnings(&s) {
                    println!("warning: {line}");
                }
                println!(
                    "{}: ok ({} listeners, {} upstream groups, {} routes, {} rules, {} regexes)",
                    config.display(),
                    s.listeners.len(),
                    s.upstreams.len(),
                    s.rules.routes().len(),
                    s.rules.stacking_rules().len(),
                    s.rules.regex_count()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Run(args) => run(args),
        Command::Reload { socket } => reload(&socket),
        Command::Upgrade { socket, binary } => upgrade_to(&socket, binary.as_deref()),
        Command::Drain { socket } => Ok(answered(
            &client::request(&socket, "drain")?,
            |_| {
                "draining: /readyz says so at once; the listeners close after server.drain_grace"
                    .into()
            },
            |_| "drain refused: ".into(),
        )),
        Command::Stats {
            socket,
            json,
            per_core,
            prometheus,
            interval,
        } => stats(&socket, json, per_core, prometheus, &interval),
        Command::Top { socket } => {
            coregate::client::top::run(&socket)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Origin {
            listen,
            body_size,
            workers,
        } => {
            let snapshot = origin_snapshot(&listen)?;
            control::block_signals();
            let server = Server::start(
                Published::new(snapshot),
                &run_options(&workers)?,
                Role::Origin(body_size),
                None,
            )?;
            println!(
                "coregate origin listening on http://{} ({body_size}-byte bodies)",
                server.local_addrs()[0]
            );
            control::run_until_signal(vec![server], None, None)?;
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
    let started = std::time::Instant::now();
    let tls = args.tls_cert.as_deref().zip(args.tls_key.as_deref());
    let snapshot = match (&args.config, &args.listen, &args.upstream) {
        (Some(path), _, _) => config::load(path),
        (None, Some(listen), Some(upstream)) => config::quick(listen, upstream, tls),
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
    for line in expiry_warnings(&snapshot) {
        coregate::warn!("{line}");
    }
    let schemes: Vec<&str> = snapshot
        .listeners
        .iter()
        .map(|l| if l.tls.is_some() { "https" } else { "http" })
        .collect();
    // Sockets passed by systemd or handed over by the process we upgrade
    // from, taken before any thread starts (both edit the environment).
    let mut outside = match passed_listeners() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("coregate: {e:#}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let mut inherited = upgrade::inherit()?;
    let mut inherited_metrics = None;
    if let Some(i) = &mut inherited {
        for s in i.listeners.drain(..) {
            match s.role {
                upgrade::Role::Listener => outside.push(s),
                upgrade::Role::Metrics => inherited_metrics = Some(s),
            }
        }
    }
    control::block_signals();
    let admin_path = args.admin_socket.clone().or(snapshot.admin_socket.clone());
    let user = args.user.clone().or(snapshot.user.clone());
    let snapshot_metrics = snapshot.metrics_listen;
    let published = Published::new(snapshot);
    coregate::health::spawn(published.clone()).context("start the health checker")?;
    let reloader = Arc::new(Reloader::new(
        args.config.clone(),
        published.clone(),
        started.elapsed(),
    ));
    let hub = Hub::new();
    let handover = admin_path.clone().map(Handover::new).transpose()?;
    // Bound before the workers start (see `admin::serve`). A process
    // started by an upgrade stages its socket beside the old one's.
    let mut admin = match &admin_path {
        Some(p) => Some(admin::serve(
            p,
            admin::Serving {
                reloader: reloader.clone(),
                hub: hub.clone(),
                handover: handover.clone(),
            },
            inherited.as_ref().is_some_and(|i| &i.from == p),
        )?),
        None => None,
    };
    let metrics = match snapshot_metrics {
        Some(addr) => Some(admin::serve_metrics(
            addr,
            hub.clone(),
            inherited_metrics,
            handover.clone(),
        )?),
        None => None,
    };
    let options = run_options(&args.workers)?;
    let bound = Server::bind(&published, &options, outside, handover.as_deref())?;
    if let Some(user) = &user {
        let switched = (|| -> anyhow::Result<()> {
            // SAFETY: geteuid only reads our credentials.
            if unsafe { libc::geteuid() } == 0
                && let Some(a) = &admin
            {
                let ids = config::lookup_user(user)?;
                a.give_to(ids.uid, ids.gid)?;
            }
            control::drop_privileges(user)
        })();
        if let Err(e) = switched {
            eprintln!("coregate: refusing to run on: {e:#}");
            return Ok(ExitCode::FAILURE);
        }
    }
    let server = bound.spawn(published.clone(), &options, Role::Proxy, Some(&hub))?;
    // Idle while the config has no [fleet]; a reload may add one.
    coregate::fleet::spawn(published, server.boards(), hub.fleet.clone())
        .context("start the fleet sync thread")?;
    server.wait_ready(std::time::Duration::from_secs(30))?;
    for (addr, scheme) in server.local_addrs().iter().zip(&schemes) {
        println!("coregate listening on {scheme}://{addr}");
    }
    if let Some(p) = &admin_path {
        println!("admin socket {}", p.display());
    }
    if let Some(addr) = metrics {
        println!("metrics on http://{addr}/metrics");
    }
    if let Some(i) = inherited {
        i.ready();
        if let Some(a) = &mut admin {
            a.settle();
        }
    }
    coregate::systemd::notify(&format!(
        "READY=1\nSTATUS={}",
        reloader.status().status_line()
    ));
    control::run_until_signal(vec![server], Some(&reloader), handover.as_ref())?;
    Ok(ExitCode::SUCCESS)
}

/// The listening sockets systemd passed (socket activation), each checked
/// and matched to a `[[listener]]` by its address.
fn passed_listeners() -> anyhow::Result<Vec<Sockets>> {
    coregate::systemd::listen_fds()
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let what = format!("LISTEN_FDS #{i} ({})", p.name);
            let listener = upgrade::tcp_listener(p.fd, &what)?;
            Ok(Sockets {
                role: upgrade::Role::Listener,
                configured: None,
                bound: listener.local_addr()?,
                fds: vec![listener.into()],
            })
        })
        .collect()
}

fn upgrade_to(
    socket: &std::path::Path,
    binary: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    let command = match binary {
        // The running process resolves the path from its own directory.
        Some(b) => format!("upgrade {}", std::path::absolute(b)?.display()),
        None => "upgrade".into(),
    };
    Ok(answered(
        &client::request(socket, &command)?,
        |r| {
            format!(
                "upgraded: process {} serves; the old one finishes its requests and exits",
                r["pid"]
            )
        },
        |_| "upgrade refused; the running process keeps serving:\n".into(),
    ))
}

/// An admin-socket command's answer: what `done` says of it on stdout and
/// success, or what `refused` says followed by its error on stderr and
/// failure.
fn answered(
    reply: &serde_json::Value,
    done: impl FnOnce(&serde_json::Value) -> String,
    refused: impl FnOnce(&serde_json::Value) -> String,
) -> ExitCode {
    if reply["ok"].as_bool() == Some(true) {
        println!("{}", done(reply));
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "{}{}",
            refused(reply),
            reply["error"].as_str().unwrap_or("unknown error")
        );
        ExitCode::FAILURE
    }
}

fn reload(socket: &std::path::Path) -> anyhow::Result<ExitCode> {
    Ok(answered(
        &client::request(socket, "reload")?,
        |r| {
            format!(
                "reloaded {}: epoch {}, {}, loaded at {} in {} ms",
                r["config"].as_str().unwrap_or("?"),
                r["epoch"],
                r["hash"].as_str().unwrap_or("?"),
                r["loaded_at"].as_str().unwrap_or("?"),
                r["load_ms"]
            )
        },
        |r| {
            format!(
                "reload refused; still running epoch {} ({}):\n",
                r["running"]["epoch"],
                r["running"]["hash"].as_str().unwrap_or("?")
            )
        },
    ))
}

fn stats(
    socket: &std::path::Path,
    json: bool,
    per_core: bool,
    prometheus: bool,
    interval: &str,
) -> anyhow::Result<ExitCode> {
    // Output piped into `head` ends quietly, as for other Unix tools.
    // SAFETY: restoring the default action of one signal, before any thread.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    if prometheus {
        print!("{}", client::request_text(socket, "metrics")?);
        return Ok(ExitCode::SUCCESS);
    }
    let sample = || -> anyhow::Result<(Vec<Report>, std::time::Instant)> {
        Ok((
            coregate::client::fetch_stats(socket)?,
            std::time::Instant::now(),
        ))
    };
    if json {
        let (workers, _) = sample()?;
        let mut out = serde_json::json!({ "total": Report::merge(&workers).without_buckets() });
        if per_core {
            let workers: Vec<Report> = workers.into_iter().map(Report::without_buckets).collect();
            out["workers"] = serde_json::to_value(&workers)?;
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    let interval = config::parse_duration(interval)
        .ok_or_else(|| anyhow::anyhow!("--interval {interval:?}: write e.g. 1s or 500ms"))?;
    let (first, t0) = sample()?;
    std::thread::sleep(interval);
    let (second, t1) = sample()?;
    let seconds = (t1 - t0).as_secs_f64();
    print!(
        "{}",
        render::table(&second, Some(&first), seconds, per_core, false)
    );
    Ok(ExitCode::SUCCESS)
}

fn origin_snapshot(listen: &str) -> anyhow::Result<Arc<Snapshot>> {
    // The origin reuses listener parsing; its one route is never consulted.
    let s = config::quick(listen, "tcp://127.0.0.1:9", None).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Arc::new(s))
}

fn demo(listen: &str, workers: &WorkerArgs) -> anyhow::Result<ExitCode> {
    control::block_signals();
    let origin_opts = RunOptions {
        workers: Some(1),
        ..run_options(workers)?
    };
    let origin = Server::start(
        Published::new(origin_snapshot("127.0.0.1:0")?),
        &origin_opts,
        Role::Origin(128),
        None,
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
    let published = Published::new(Arc::new(snapshot));
    // An admin socket of its own, so `coregate stats` and `top` can be
    // tried on the demo too.
    let hub = Hub::new();
    let socket = std::env::temp_dir().join(format!("coregate-demo-{}.sock", std::process::id()));
    let reloader = Arc::new(Reloader::new(
        None,
        published.clone(),
        std::time::Duration::ZERO,
    ));
    let _admin = admin::serve(
        &socket,
        admin::Serving {
            reloader,
            hub: hub.clone(),
            handover: None,
        },
        false,
    )?;
    let proxy = Server::start(published, &run_options(workers)?, Role::Proxy, Some(&hub))?;
    let addr = proxy.local_addrs()[0];
    println!("coregate demo: proxy on http://{addr} -> built-in origin on http://{origin_addr}");
    println!("try:   curl -i http://{addr}/");
    println!("load:  wrk -t1 -c50 -d10s http://{addr}/");
    println!("stats: coregate top --socket {}", socket.display());
    println!("stop:  Ctrl-C");
    control::run_until_signal(vec![proxy, origin], None, None)?;
    Ok(ExitCode::SUCCESS)
}

/// Certificates that expire within 14 days (or have), named with their
/// file: what `coregate check` and `coregate run` warn about.
fn expiry_warnings(s: &config::Snapshot) -> Vec<String> {
    const DAY: i64 = 86_400;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let mut out = Vec::new();
    for l in &s.listeners {
        let Some(tls) = &l.tls else { continue };
        for (file, names, end) in tls.expiring(now, 14 * DAY) {
            let left = end - now;
            let when = if left < 0 {
                format!("expired {} days ago", (-left) / DAY)
            } else {
                format!(
                    "expires in {} days, {} hours",
                    left / DAY,
                    left % DAY / 3600
                )
            };
            out.push(format!(
                "{}: the certificate for {} {when}",
                file.display(),
                names.join(", ")
            ));
        }
    }
    out
}
