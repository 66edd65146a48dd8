//! Minimal leveled logging to stderr. Lines look like
//! `coregate[w0] warn: upstream 127.0.0.1:9000: connect failed: ...`.
//!
//! Per-request problems are logged at `debug`, off by default: at a
//! million bad requests a second, logging them all would be the outage.
//! Set `COREGATE_LOG=debug` to see them.

use std::sync::atomic::{AtomicU8, Ordering};

pub const ERROR: u8 = 1;
pub const WARN: u8 = 2;
pub const INFO: u8 = 3;
pub const DEBUG: u8 = 4;

static LEVEL: AtomicU8 = AtomicU8::new(INFO);

/// Read `COREGATE_LOG` (error, warn, info, debug) once at start-up.
pub fn init_from_env() {
    let level = match std::env::var("COREGATE_LOG").as_deref() {
        Ok("error") => ERROR,
        Ok("warn") => WARN,
        Ok("debug") => DEBUG,
        _ => INFO,
    };
    LEVEL.store(level, Ordering::Relaxed);
}

pub fn enabled(level: u8) -> bool {
    level <= LEVEL.load(Ordering::Relaxed)
}

#[macro_export]
macro_rules! log {
    ($level:expr, $name:literal, $($arg:tt)*) => {
        if $crate::log::enabled($level) {
            let thread = std::thread::current();
            let who = thread.name().unwrap_or("main");
            eprintln!("coregate[{}] {}: {}", who.trim_start_matches("coregate-"), $name, format_args!($($arg)*));
        }
    };
}

#[macro_export]
macro_rules! error { ($($arg:tt)*) => { $crate::log!($crate::log::ERROR, "error", $($arg)*) }; }
#[macro_export]
macro_rules! warn { ($($arg:tt)*) => { $crate::log!($crate::log::WARN, "warn", $($arg)*) }; }
#[macro_export]
macro_rules! info { ($($arg:tt)*) => { $crate::log!($crate::log::INFO, "info", $($arg)*) }; }
#[macro_export]
macro_rules! debug { ($($arg:tt)*) => { $crate::log!($crate::log::DEBUG, "debug", $($arg)*) }; }
