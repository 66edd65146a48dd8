//! Command-line definitions (clap). Only the shape of the flags lives
//! here; `main` turns them into validated options.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::ring::DriverKind;

#[derive(Debug, Parser)]
#[command(
    name = "coregate",
    version,
    about = "HTTP/1.1 reverse proxy with one io_uring worker per core"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy, from a config file or as a quick proxy.
    Run(RunArgs),
    /// Validate a config file; print every problem with file, line and key.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Reload the config of a running coregate through its admin socket.
    Reload {
        /// The admin socket (server.admin_socket, or run --admin-socket).
        #[arg(long, short)]
        socket: PathBuf,
    },
    /// Take a running coregate out of service: /readyz says draining for
    /// server.drain_grace while requests are served, then it drains and
    /// exits (as SIGTERM).
    Drain {
        /// The admin socket (server.admin_socket, or run --admin-socket).
        #[arg(long, short)]
        socket: PathBuf,
    },
    /// Replace a running coregate with a new binary, refusing no
    /// connection: the new process takes the listening sockets over the
    /// admin socket and the old one drains once the new one serves.
    Upgrade {
        /// The admin socket (server.admin_socket, or run --admin-socket).
        #[arg(long, short)]
        socket: PathBuf,
        /// The binary to start (default: the path the running process was
        /// started from, which a package upgrade has replaced).
        #[arg(long)]
        binary: Option<PathBuf>,
    },
    /// Per-core statistics of a running coregate, from its admin socket.
    Stats {
        /// The admin socket (server.admin_socket, or run --admin-socket).
        #[arg(long, short)]
        socket: PathBuf,
        /// JSON instead of a table: the merged total, and every worker's
        /// figures with --per-core.
        #[arg(long, conflicts_with = "prometheus")]
        json: bool,
        /// A row per core as well as the total.
        #[arg(long)]
        per_core: bool,
        /// Prometheus text exposition, a series per worker.
        #[arg(long)]
        prometheus: bool,
        /// Time between the two samples the table's req/s comes from.
        #[arg(long, default_value = "1s")]
        interval: String,
    },
    /// Live per-core view refreshed every second; q or Ctrl-C quits.
    Top {
        /// The admin socket (server.admin_socket, or run --admin-socket).
        #[arg(long, short)]
        socket: PathBuf,
    },
    /// Start a built-in origin and the proxy in front of it, no setup needed.
    Demo {
        /// Where the proxy listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        #[command(flatten)]
        workers: WorkerArgs,
    },
    /// Run only the built-in origin server (for benchmarks and tests).
    Origin {
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: String,
        /// Response body size in bytes.
        #[arg(long, default_value_t = 128)]
        body_size: usize,
        #[command(flatten)]
        workers: WorkerArgs,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML config file.
    #[arg(long, short, conflicts_with_all = ["listen", "upstream"], required_unless_present = "listen")]
    pub config: Option<PathBuf>,
    /// Quick proxy: address to listen on (with --upstream).
    #[arg(long, requires = "upstream")]
    pub listen: Option<String>,
    /// Quick proxy: backend, tcp://HOST:PORT or unix:/PATH (with --listen).
    #[arg(long, requires = "listen")]
    pub upstream: Option<String>,
    /// Quick proxy over HTTPS: certificate chain, PEM (with --tls-key).
    #[arg(long, requires_all = ["listen", "tls_key"])]
    pub tls_cert: Option<PathBuf>,
    /// Quick proxy over HTTPS: private key, PEM (with --tls-cert).
    #[arg(long, requires_all = ["listen", "tls_cert"])]
    pub tls_key: Option<PathBuf>,
    /// Admin UNIX socket (overrides server.admin_socket).
    #[arg(long)]
    pub admin_socket: Option<PathBuf>,
    /// When started as root: the user to run as once the listeners, the
    /// admin socket and the logs are open (overrides server.user).
    #[arg(long)]
    pub user: Option<String>,
    #[command(flatten)]
    pub workers: WorkerArgs,
}

#[derive(Debug, Args, Clone)]
pub struct WorkerArgs {
    /// Number of workers (default: one per core in the CPU set).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Cores to run workers on, e.g. 0-3,6 (default: the process's CPU set).
    #[arg(long)]
    pub cores: Option<String>,
    /// Event loop: io_uring where available (auto), or force one.
    #[arg(long, value_enum, default_value_t = DriverKind::Auto)]
    pub driver: DriverKind,
}
