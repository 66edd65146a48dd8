//! The built-in origin: a small, fast HTTP/1.1 server for the demo,
//! benchmarks and tests (`coregate origin`).
//!
//! Every request gets `200 OK` with a fixed body of `--body-size` bytes.
//! A request body is read and discarded, and its size is echoed back in
//! `X-Received-Bytes`, so tests can check what arrived. Owns: nothing the
//! proxy uses; it shares the worker and HTTP modules.

use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use monoio::BufResult;
use monoio::buf::{IoBuf, IoVecBuf};
use monoio::io::{AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use crate::http::encode::{write_canned, write_decimal};
use crate::http::head::{self, BodyFraming, Method, RequestHead, Status, Version};
use crate::net::buffer::{Buf, flush, lent_slices};
use crate::proxy::relay::{BodyIn, BodyOut, Bounds, relay};
use crate::worker::WorkerCtx;

/// The response an origin sends, prepared once.
pub struct OriginBody {
    /// Status line, headers and body for a keep-alive GET.
    full: Bytes,
    /// Just the body.
    body: Bytes,
}

impl OriginBody {
    pub fn new(size: usize) -> Self {
        let body: Vec<u8> = (0..size)
            .map(|i| b"abcdefghijklmnopqrstuvwxyz0123456789\n"[i % 37])
            .collect();
        let mut full = Vec::with_capacity(size + 128);
        full.extend_from_slice(b"HTTP/1.1 200 OK\r\nServer: coregate-origin\r\nContent-Type: text/plain\r\nContent-Length: ");
        write_decimal(&mut full, size as u64);
        full.extend_from_slice(b"\r\n\r\n");
        full.extend_from_slice(&body);
        OriginBody {
            full: Bytes::from(full),
            body: Bytes::from(body),
        }
    }
}

/// A writer that drops what it is given.
struct Discard;

impl AsyncWriteRent for Discard {
    async fn write<T: IoBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        (Ok(buf.bytes_init()), buf)
    }
    async fn writev<T: IoVecBuf>(&mut self, buf: T) -> BufResult<usize, T> {
        (Ok(lent_slices(&buf).map(<[u8]>::len).sum()), buf)
    }
    async fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    async fn shutdown(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const IDLE: Duration = Duration::from_secs(60);

pub async fn serve(
    ctx: Rc<WorkerCtx>,
    mut stream: TcpStream,
    listener_idx: usize,
    body: Rc<OriginBody>,
) {
    let limits = ctx.current().snapshot.listeners[listener_idx].limits;
    let mut buf = Buf::new(ctx.bufs.get());
    let mut out = ctx.bufs.get();
    let mut req = RequestHead::default();
    let timeouts = Bounds::new(IDLE, IDLE);
    'conn: loop {
        let head_len = loop {
            match head::parse_request(buf.data(), &limits, &mut req) {
                Ok(Status::Complete(n)) => break n,
                Ok(Status::Partial) => {}
                Err(e) => {
                    write_canned(&mut out, e.status(), false, Version::Http11, true, None);
                    let _ = flush(&mut stream, &mut out).await;
                    break 'conn;
                }
            }
            let read = monoio::select! {
                r = monoio::time::timeout(IDLE, buf.read_from(&mut stream)) => r,
                _ = ctx.idle.drained() => break 'conn,
            };
            match read {
                Ok(Ok(n)) if n > 0 => {}
                _ => break 'conn,
            }
        };
        let (keep, method) = (req.keep_alive && !ctx.idle.is_draining(), req.method);
        let body_in = match req.framing {
            BodyFraming::Length(n) => Some(BodyIn::Length(n)),
            BodyFraming::Chunked => Some(BodyIn::Chunked),
            _ => None,
        };
        buf.consume(head_len);
        let received = match body_in {
            None => None,
            Some(b) => {
                if req.expect_continue && req.version == Version::Http11 && buf.is_empty() {
                    let (r, _) = stream
                        .write_all(&b"HTTP/1.1 100 Continue\r\n\r\n"[..])
                        .await;
                    if r.is_err() {
                        break;
                    }
                }
                match relay(
                    &mut stream,
                    &mut buf,
                    &mut Discard,
                    &mut out,
                    b,
                    BodyOut::Verbatim,
                    &timeouts,
                )
                .await
                {
                    Ok(n) => Some(n),
                    Err(_) => break,
                }
            }
        };
        out.clear();
        let ok = match (received, keep, method) {
            // The common case: one prepared write, no formatting.
            (None, true, m) if m != Method::Head => {
                stream.write_all(body.full.clone()).await.0.is_ok()
            }
            _ => {
                out.extend_from_slice(b"HTTP/1.1 200 OK\r\nServer: coregate-origin\r\nContent-Type: text/plain\r\nContent-Length: ");
                write_decimal(&mut out, body.body.len() as u64);
                if let Some(n) = received {
                    out.extend_from_slice(b"\r\nX-Received-Bytes: ");
                    write_decimal(&mut out, n);
                }
                if !keep {
                    out.extend_from_slice(b"\r\nConnection: close");
                }
                out.extend_from_slice(b"\r\n\r\n");
                let head_ok = flush(&mut stream, &mut out).await.is_ok();
                head_ok
                    && (method == Method::Head
                        || stream.write_all(body.body.clone()).await.0.is_ok())
            }
        };
        if !ok || !keep {
            break;
        }
    }
    ctx.bufs.put(buf.into_inner());
    ctx.bufs.put(out);
}
