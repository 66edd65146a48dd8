//! `coregate top`: a live per-core view in the terminal, redrawn every
//! second from the admin socket, until q or Ctrl-C.
//!
//! The terminal goes to non-canonical mode without echo or signals, so a
//! key is read the moment it is pressed and Ctrl-C arrives as a byte to
//! quit on (the settings are restored however the loop ends). Each frame
//! shows the last second only: req/s, percentiles from the difference of
//! two cumulative histograms, 5xx and refusals.
//!
//! Owns: the terminal and the refresh loop. Does not own: the table
//! (`stats::render`) or the socket protocol (`client`).

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::stats::{Report, render};

const REFRESH: Duration = Duration::from_secs(1);

/// Terminal settings to restore on the way out.
struct RawMode {
    saved: Option<libc::termios>,
}

impl RawMode {
    /// Raw-ish mode for stdin when it is a terminal; otherwise nothing.
    fn enter() -> RawMode {
        let fd = std::io::stdin().as_raw_fd();
        // SAFETY: tcgetattr/tcsetattr on our own stdin with a zeroed
        // termios that tcgetattr fills in.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::isatty(fd) != 1 || libc::tcgetattr(fd, &mut t) != 0 {
                return RawMode { saved: None };
            }
            let saved = t;
            t.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG);
            t.c_cc[libc::VMIN] = 0;
            t.c_cc[libc::VTIME] = 0;
            libc::tcsetattr(fd, libc::TCSANOW, &t);
            RawMode { saved: Some(saved) }
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = &self.saved {
            // SAFETY: restoring the settings read in `enter`.
            unsafe { libc::tcsetattr(std::io::stdin().as_raw_fd(), libc::TCSANOW, t) };
        }
        // Show the cursor again and leave the last frame on screen.
        print!("\x1b[?25h");
        let _ = std::io::stdout().flush();
    }
}

/// Wait up to `timeout` for a key; true when it asks to quit (q, Q,
/// Ctrl-C, or stdin at its end).
fn quit_pressed(timeout: Duration, interactive: bool) -> bool {
    if !interactive {
        std::thread::sleep(timeout);
        return false;
    }
    let fd = std::io::stdin().as_raw_fd();
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one pollfd we own.
        let ready = unsafe { libc::poll(&mut p, 1, left.as_millis() as i32) };
        if ready <= 0 {
            continue;
        }
        let mut buf = [0u8; 32];
        // SAFETY: read(2) into a buffer of its stated length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return true;
        }
        if buf[..n as usize]
            .iter()
            .any(|&b| b == b'q' || b == b'Q' || b == 0x03)
        {
            return true;
        }
    }
}

pub fn run(socket: &Path) -> anyhow::Result<()> {
    let raw = RawMode::enter();
    let interactive = raw.saved.is_some();
    let mut before: Option<(Vec<Report>, Instant)> = None;
    let mut out = std::io::stdout();
    loop {
        let reports = super::fetch_stats(socket)?;
        let at = Instant::now();
        let table = match &before {
            Some((b, t)) => render::table(&reports, Some(b), (at - *t).as_secs_f64(), true, true),
            None => render::table(&reports, None, 0.0, true, true),
        };
        let mut clock = Vec::new();
        crate::access_log::rfc3339(&mut clock, std::time::SystemTime::now());
        // Home, clear, hide the cursor, then the frame.
        write!(
            out,
            "\x1b[H\x1b[2J\x1b[?25lcoregate top  {}  {}  (q quits)\r\n\r\n{}",
            socket.display(),
            String::from_utf8_lossy(&clock),
            table.replace('\n', "\r\n")
        )?;
        out.flush()?;
        before = Some((reports, at));
        if quit_pressed(REFRESH, interactive) {
            break;
        }
    }
    drop(raw);
    println!();
    Ok(())
}
