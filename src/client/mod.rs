//! The client side of the admin socket, for the commands people type:
//! `coregate reload`, `stats`, `drain` and `top` talk to a running
//! coregate through it.
//!
//! Owns: sending a command and reading its answer, turning a `stats`
//! answer into reports, and `top`'s terminal (`top`). Does not own: the
//! server side (`admin`) or the figures and their formats (`stats`).

pub mod top;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use crate::stats::Report;

/// Send `command` and return the whole answer as text (`metrics`).
pub fn request_text(path: &Path, command: &str) -> anyhow::Result<String> {
    let mut stream = UnixStream::connect(path)
        .with_context(|| format!("connect to admin socket {}", path.display()))?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    writeln!(stream, "{command}")?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .context("read the admin socket's answer")?;
    Ok(text)
}

pub fn request(path: &Path, command: &str) -> anyhow::Result<serde_json::Value> {
    let mut stream = UnixStream::connect(path)
        .with_context(|| format!("connect to admin socket {}", path.display()))?;
    // A reload of a large rule set takes a while; never hang forever.
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    writeln!(stream, "{command}")?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .context("read the admin socket's answer")?;
    serde_json::from_str(&line).with_context(|| format!("admin socket answered {line:?}"))
}

/// Every worker's report, asked of a running coregate's admin socket
/// (`coregate stats` and `coregate top`).
pub fn fetch_stats(socket: &Path) -> anyhow::Result<Vec<Report>> {
    let reply = request(socket, "stats")?;
    serde_json::from_value(reply["workers"].clone()).context("the admin socket's stats answer")
}
