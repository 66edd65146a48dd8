//! The two systemd interfaces a service speaks, written out: readiness
//! notification (`sd_notify(3)`: datagrams on `$NOTIFY_SOCKET`) and socket
//! activation (`sd_listen_fds(3)`: descriptors from 3 on, named by
//! `$LISTEN_FDNAMES`, for the process `$LISTEN_PID`).
//!
//! Owns: the wire format of both and taking the activation variables out
//! of the environment. Does not own: which messages are sent when
//! (`control`, `admin`, `upgrade`) or which listener a socket serves
//! (`control`).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::OnceLock;
use std::time::Duration;

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// More passed descriptors than this is a corrupt environment, not a
/// socket unit.
const MAX_LISTEN_FDS: RawFd = 4096;

/// Send one notification (`READY=1`, `STATUS=...`, several lines joined
/// with `\n`) to the service manager. Without `$NOTIFY_SOCKET` (not run by
/// systemd, or `Type=` is not `notify`) it does nothing; a failed send is
/// logged once and otherwise ignored, as `sd_notify` would: the service
/// runs the same either way.
pub fn notify(message: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send(&path, message) {
        static WARNED: OnceLock<()> = OnceLock::new();
        if WARNED.set(()).is_ok() {
            crate::warn!("NOTIFY_SOCKET {}: {e}", path.to_string_lossy());
        }
    }
}

fn send(path: &std::ffi::OsStr, message: &str) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let socket = UnixDatagram::unbound()?;
    let bytes = path.as_bytes();
    match bytes.first() {
        // An abstract socket: `@` stands for the leading NUL.
        Some(b'@') => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(&bytes[1..])?;
            socket.send_to_addr(message.as_bytes(), &addr)?;
        }
        Some(b'/') => {
            socket.send_to(message.as_bytes(), std::path::Path::new(path))?;
        }
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "neither an absolute path nor an abstract name",
            ));
        }
    }
    Ok(())
}

/// `MONOTONIC_USEC=...`: CLOCK_MONOTONIC now, which systemd wants with
/// `RELOADING=1` to tell one reload from the next.
pub fn monotonic_usec() -> String {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own and nothing else.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let usec = Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32).as_micros();
    format!("MONOTONIC_USEC={usec}")
}

/// One descriptor passed by the service manager, with its
/// `FileDescriptorName=` (systemd's default name is the unit's).
pub struct Passed {
    pub fd: OwnedFd,
    pub name: String,
}

/// Take the descriptors systemd passed this process, once: the variables
/// are removed from the environment so that a child (a binary upgrade)
/// does not take them for its own, and the descriptors are marked
/// close-on-exec. Empty when not socket-activated, or when `$LISTEN_PID`
/// names another process (the variables were inherited, not meant for us).
pub fn listen_fds() -> Vec<Passed> {
    let pid = std::env::var("LISTEN_PID").ok();
    let count = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    // SAFETY: run on the control thread before any other thread of ours
    // reads or writes the environment (main calls this before starting
    // the health, admin and worker threads).
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    let ours = pid.and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let Some(n) = count.and_then(|n| n.parse::<RawFd>().ok()).filter(|_| ours) else {
        return Vec::new();
    };
    let names: Vec<&str> = names.as_deref().unwrap_or("").split(':').collect();
    if !(0..=MAX_LISTEN_FDS).contains(&n) {
        crate::warn!("LISTEN_FDS={n}: not a count of descriptors; none taken");
        return Vec::new();
    }
    (0..n)
        .filter_map(|i| {
            let fd = LISTEN_FDS_START + i;
            // SAFETY: fcntl on a descriptor number: it fails (EBADF) for
            // one that is not open, and marks an open one close-on-exec.
            if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
                crate::warn!("LISTEN_FDS: descriptor {fd} is not open; skipped");
                return None;
            }
            // SAFETY: systemd passed descriptors 3..3+LISTEN_FDS to this
            // process (LISTEN_PID is ours), this one is open, and nothing
            // else owns it: the variables were removed above, so this runs
            // once per descriptor.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            Some(Passed {
                fd,
                name: names.get(i as usize).unwrap_or(&"").to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_reach_a_datagram_socket_by_path_and_by_abstract_name() {
        let dir = std::env::temp_dir().join(format!("coregate-notify-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let receiver = UnixDatagram::bind(&path).expect("bind");
        send(path.as_os_str(), "READY=1\nSTATUS=epoch 1").expect("send by path");
        let mut buf = [0u8; 256];
        let n = receiver.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=epoch 1");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("coregate-notify-test-{}", std::process::id());
        let abs = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let receiver = UnixDatagram::bind_addr(&abs).expect("bind abstract");
        send(std::ffi::OsStr::new(&format!("@{name}")), "STOPPING=1").expect("send abstract");
        let n = receiver.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"STOPPING=1");

        assert!(send(std::ffi::OsStr::new("relative"), "READY=1").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn monotonic_usec_is_a_number_of_microseconds() {
        let line = monotonic_usec();
        let n: u128 = line
            .strip_prefix("MONOTONIC_USEC=")
            .unwrap()
            .parse()
            .unwrap();
        assert!(n > 0);
    }
}
