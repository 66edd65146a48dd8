//! The access log: one JSON object per line for each request a logging
//! rule selected, with the fields the rules chose.
//!
//! Each worker formats into its own buffer and appends whole lines with
//! one `write` on an `O_APPEND` descriptor, so lines from different
//! workers never interleave. The buffer is written when it passes
//! `FLUSH_BYTES`, by the worker's housekeeping tick, and when it drains.
//!
//! Owns: line formatting, JSON escaping, timestamps, the per-worker buffer.
//! Does not own: which requests and fields are logged (`rules`).

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::http::view::RequestView;
use crate::rules::LogField;

/// Buffered log bytes that trigger a write. Small enough that a quiet
/// worker's lines appear within one housekeeping tick anyway.
const FLUSH_BYTES: usize = 32 * 1024;

/// Where lines go.
enum Sink {
    Stdout,
    File(File),
}

/// Open (creating) an access log file for appending.
pub fn open(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// One worker's access log.
pub struct AccessLog {
    /// The configured path (`None`: stdout) and its open sink.
    sink: RefCell<(Option<PathBuf>, Option<Sink>)>,
    buf: RefCell<Vec<u8>>,
}

/// The request facts a log line needs, copied out of the connection's
/// buffer (which the next request reuses) for logged requests only.
pub struct Request {
    method: Vec<u8>,
    path: Vec<u8>,
    query: Vec<u8>,
    host: Option<Vec<u8>>,
    client: IpAddr,
    tls: bool,
    /// Values of the `header:NAME` fields, in field order.
    headers: Vec<Option<Vec<u8>>>,
}

impl Request {
    pub fn capture(view: &RequestView<'_>, fields: &[&LogField]) -> Request {
        let headers = fields
            .iter()
            .filter_map(|f| match f {
                LogField::Header(name) => Some(
                    view.headers
                        .iter()
                        .find(|h| h.name.get(view.buf).eq_ignore_ascii_case(name))
                        .map(|h| h.value.get(view.buf).to_vec()),
                ),
                _ => None,
            })
            .collect();
        Request {
            method: view.method.to_vec(),
            path: view.path.to_vec(),
            query: view.query.to_vec(),
            host: view.host.map(<[u8]>::to_vec),
            client: view.client,
            tls: view.tls,
            headers,
        }
    }
}

/// What the proxy knows of a request when it ends.
pub struct Entry<'a> {
    pub req: &'a Request,
    pub status: u16,
    pub latency: Duration,
    /// The backend's label, when the request went upstream.
    pub upstream: Option<&'a str>,
    pub bytes: u64,
    pub route: Option<&'a str>,
}

impl AccessLog {
    pub fn new(path: Option<&Path>) -> AccessLog {
        let log = AccessLog {
            sink: RefCell::new((None, None)),
            buf: RefCell::new(Vec::new()),
        };
        log.retarget(path);
        log
    }

    /// Point at `path` (stdout when `None`) if it changed with a reload;
    /// pending lines go to the old destination first.
    pub fn retarget(&self, path: Option<&Path>) {
        let mut sink = self.sink.borrow_mut();
        if sink.1.is_some() && sink.0.as_deref() == path {
            return;
        }
        drop(sink);
        self.flush();
        sink = self.sink.borrow_mut();
        let opened = match path {
            None => Some(Sink::Stdout),
            Some(p) => match open(p) {
                Ok(f) => Some(Sink::File(f)),
                Err(e) => {
                    crate::warn!("access log {}: {e}; lines are dropped", p.display());
                    None
                }
            },
        };
        *sink = (path.map(Path::to_path_buf), opened);
    }

    /// Format one line with `fields`.
    pub fn write(&self, fields: &[&LogField], e: &Entry<'_>) {
        let mut buf = self.buf.borrow_mut();
        format_line(&mut buf, fields, e, SystemTime::now());
        let full = buf.len() >= FLUSH_BYTES;
        drop(buf);
        if full {
            self.flush();
        }
    }

    /// Write buffered lines out. A failed write drops them: the access log
    /// must never stall or kill the data path.
    pub fn flush(&self) {
        let mut buf = self.buf.borrow_mut();
        if buf.is_empty() {
            return;
        }
        let mut sink = self.sink.borrow_mut();
        let result = match &mut sink.1 {
            Some(Sink::File(f)) => f.write_all(&buf),
            Some(Sink::Stdout) => std::io::stdout().lock().write_all(&buf),
            None => Ok(()),
        };
        if let Err(e) = result {
            crate::warn!("access log: {e}; {} bytes dropped", buf.len());
        }
        buf.clear();
    }
}

fn format_line(out: &mut Vec<u8>, fields: &[&LogField], e: &Entry<'_>, now: SystemTime) {
    out.push(b'{');
    let mut header_open = false;
    for f in fields {
        // Header fields are grouped under one "headers" object at the end.
        if matches!(f, LogField::Header(_)) {
            continue;
        }
        if out.last() != Some(&b'{') {
            out.push(b',');
        }
        json_string(out, f.key().as_bytes());
        out.push(b':');
        let req = e.req;
        match f {
            LogField::Time => {
                out.push(b'"');
                rfc3339(out, now);
                out.push(b'"');
            }
            LogField::Method => json_string(out, &req.method),
            LogField::Path => json_string(out, &req.path),
            LogField::Query => json_string(out, &req.query),
            LogField::Host => json_string(out, req.host.as_deref().unwrap_or_default()),
            LogField::Status => {
                let _ = write!(out, "{}", e.status);
            }
            LogField::Latency => {
                let _ = write!(out, "{:.3}", e.latency.as_secs_f64() * 1000.0);
            }
            LogField::Upstream => match e.upstream {
                Some(u) => json_string(out, u.as_bytes()),
                None => out.extend_from_slice(b"null"),
            },
            LogField::Bytes => {
                let _ = write!(out, "{}", e.bytes);
            }
            LogField::Client => {
                out.push(b'"');
                let _ = write!(out, "{}", req.client);
                out.push(b'"');
            }
            LogField::Route => match e.route {
                Some(r) => json_string(out, r.as_bytes()),
                None => out.extend_from_slice(b"null"),
            },
            LogField::Scheme => json_string(out, if req.tls { b"https" } else { b"http" }),
            LogField::Header(_) => {}
        }
    }
    let mut values = e.req.headers.iter();
    for f in fields {
        let LogField::Header(name) = f else { continue };
        if !header_open {
            if out.last() != Some(&b'{') {
                out.push(b',');
            }
            out.extend_from_slice(b"\"headers\":{");
            header_open = true;
        } else {
            out.push(b',');
        }
        json_string(out, name);
        out.push(b':');
        match values.next().and_then(Option::as_deref) {
            Some(v) => json_string(out, v),
            None => out.extend_from_slice(b"null"),
        }
    }
    if header_open {
        out.push(b'}');
    }
    out.extend_from_slice(b"}\n");
}

/// A JSON string. Bytes that are not UTF-8 (a request may carry any
/// obs-text) are written as `\u00XX` escapes of each byte, so a line is
/// always valid JSON.
pub fn json_string(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    let mut rest = s;
    while !rest.is_empty() {
        let (valid, bad) = match std::str::from_utf8(rest) {
            Ok(v) => (v, &b""[..]),
            Err(e) => {
                let (v, b) = rest.split_at(e.valid_up_to());
                (std::str::from_utf8(v).expect("checked up to here"), b)
            }
        };
        for c in valid.chars() {
            match c {
                '"' => out.extend_from_slice(b"\\\""),
                '\\' => out.extend_from_slice(b"\\\\"),
                '\n' => out.extend_from_slice(b"\\n"),
                '\r' => out.extend_from_slice(b"\\r"),
                '\t' => out.extend_from_slice(b"\\t"),
                c if (c as u32) < 0x20 || c == '\u{7f}' => {
                    let _ = write!(out, "\\u{:04x}", c as u32);
                }
                c => {
                    let mut b = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
                }
            }
        }
        if let Some((&b, tail)) = bad.split_first() {
            let _ = write!(out, "\\u{:04x}", b);
            rest = tail;
        } else {
            rest = &b""[..];
        }
    }
    out.push(b'"');
}

/// `2026-11-22T10:04:05.123Z`
pub fn rfc3339(out: &mut Vec<u8>, t: SystemTime) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        let mut out = Vec::new();
        rfc3339(
            &mut out,
            UNIX_EPOCH + Duration::from_millis(1_795_356_245_123),
        );
        assert_eq!(String::from_utf8(out).unwrap(), "2026-11-22T14:04:05.123Z");
        let mut out = Vec::new();
        rfc3339(&mut out, UNIX_EPOCH + Duration::from_secs(951_782_400));
        assert_eq!(String::from_utf8(out).unwrap(), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn json_escapes() {
        let mut out = Vec::new();
        json_string(&mut out, b"a\"b\\c\n\x01\xffz\xc3\xa9");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "\"a\\\"b\\\\c\\n\\u0001\\u00ffz\u{e9}\""
        );
    }
}
