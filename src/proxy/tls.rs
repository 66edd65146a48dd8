//! A client connection over TLS: the proxy's receive and send paths with a
//! `tls::Session` between the socket and the exchange.
//!
//! Received ciphertext is decrypted into the exchange's `buf`, so every
//! phase after it reads plaintext as on a plain connection; the direct
//! copy from a provided buffer into the upstream's `out` is not used
//! (the bytes there are ciphertext). What the exchange puts in `out` is
//! sealed into the session's own buffer and sent from there: `out_sent`
//! moves on once the records carrying those bytes are out, so a send in
//! flight never reads storage the exchange may touch.
//!
//! The upstream side (`https://` backends) is simpler: once the handshake
//! is done, what the exchange hands on in `Up.out` is sealed and counted
//! as sent at once (`Up::flush`; until then only the handshake's own
//! messages go, and the request stays whole for a retry), and what comes
//! is decrypted into `Up.buf`
//! ([`Proxy::up_tls_received`]); the direct copy from a provided buffer
//! into the client's `out` is not used there either.
//!
//! Owns: the handshake's progress on a connection, sealing and sending,
//! and closing after an alert. Does not own: the TLS session itself
//! (`crate::tls`) or anything a plaintext connection does too.

use super::{Phase, Proxy, Timer, UP_RECV, UpFail, UpstreamFailure, arm_down_send, take_in};
use crate::context::WorkerCtx;
use crate::engine::{Io, token};

use super::DOWN_SEND;

impl Proxy {
    /// Ciphertext came on TLS connection `id`: decrypted into the
    /// exchange (one is taken when plaintext arrives), the handshake moved
    /// on, its replies sent. False when the connection is closing.
    pub(super) fn tls_received(
        &mut self,
        io: &mut Io,
        ctx: &WorkerCtx,
        id: usize,
        bid: u16,
        n: usize,
    ) -> bool {
        let Proxy { downs, spare, .. } = self;
        let d = &mut downs[id];
        let session = d.tls.as_deref_mut().expect("a TLS connection");
        if session.closing || d.closing {
            // Closing after an alert or close_notify: what still comes is
            // not read. A connection already closing is closed from here
            // as on the plaintext path (this may be its receive's end).
            io.driver.recycle(bid);
            if d.closing {
                self.close_down(io, ctx, id);
            }
            return false;
        }
        let handshaking = session.is_handshaking();
        let ex_slot = &mut d.ex;
        let got = session.receive(io.driver.buf(bid, n), |plain| {
            let ex = ex_slot.get_or_insert_with(|| spare.pop().unwrap_or_default());
            if matches!(ex.phase, Phase::Linger) {
                ex.lingered += plain.len();
            } else {
                take_in(ctx, &mut ex.buf, plain);
            }
        });
        io.driver.recycle(bid);
        match got {
            Err(why) => {
                crate::debug!("TLS from {}: {}", d.client, why.name());
                if handshaking {
                    ctx.stats.tls.failed(why);
                }
                session.closing = true;
                // The alert rustls queued goes out, then the connection
                // closes (`flush_tls`, `down_sent`).
                self.flush_down(io, ctx, id);
                false
            }
            Ok(r) => {
                if r.handshaken {
                    ctx.stats
                        .tls
                        .handshake(session.resumed(), session.version());
                    if d.ex.is_none() {
                        // Now the first request's head has its own time.
                        let cur = ctx.current();
                        let timeout = cur.snapshot.listeners[d.listener as usize].header_timeout;
                        d.idle_until = io.tick_after(timeout);
                    }
                }
                if r.closed && !d.eof {
                    // close_notify: the client's end of stream.
                    d.eof = true;
                }
                // Handshake replies and tickets.
                self.flush_down(io, ctx, id);
                true
            }
        }
    }

    /// `flush_down` on a TLS connection: send the ciphertext waiting, or
    /// seal what waits in the exchange's `out` and send that.
    pub(super) fn flush_tls(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize) {
        let d = &mut self.downs[id];
        let listener = d.listener as usize;
        let session = d.tls.as_deref_mut().expect("a TLS connection");
        if !session.pending() {
            if session.out.capacity() == 0 {
                // Records are written into a pooled buffer, given back
                // once they are sent: an idle session holds none.
                session.out = ctx.bufs.get();
            }
            match d.ex.as_deref() {
                Some(ex)
                    if !session.is_handshaking()
                        && !session.closing
                        && ex.out_sent + session.carried < ex.out.len() =>
                {
                    session.seal(&ex.out[ex.out_sent + session.carried..]);
                }
                _ => session.flush(),
            }
        }
        if !session.pending() {
            ctx.bufs.put(std::mem::take(&mut session.out));
            session.sent = 0;
            if session.closing {
                return self.close_down(io, ctx, id);
            }
            // Nothing to send: where the plaintext path finds `out` sent.
            if d.ex.as_ref().is_some_and(|ex| ex.out_sent == ex.out.len()) {
                self.out_drained(io, ctx, id);
            }
            return;
        }
        d.sending = true;
        let bytes = &session.out[session.sent..];
        // SAFETY: the bytes live in the session's `out`, on the heap behind
        // the connection's box, which stays put when the slab moves; while
        // `sending` is set `out` is neither sealed into nor flushed (both
        // run only from here, with no send in flight) and the record is
        // not freed (`close_down` waits for the send's completion).
        let r = unsafe { io.driver.send(d.fd, bytes, token(DOWN_SEND, id as u64)) };
        if r.is_err() {
            d.sending = false;
            return self.close_down(io, ctx, id);
        }
        if let Some(ex) = d.ex.as_deref_mut().filter(|ex| ex.cur.is_some()) {
            arm_down_send(ex, listener, io);
        }
    }

    /// The answer is out and the connection closes: a TLS client is told
    /// with `close_notify` first, so it can tell the end of the stream
    /// from a cut (the close follows once it is sent).
    pub(super) fn close_after_answer(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize) {
        let d = &mut self.downs[id];
        match d.tls.as_deref_mut() {
            Some(session) if !session.is_handshaking() && !session.closing && !d.sending => {
                session.close_notify();
                session.closing = true;
                self.flush_down(io, ctx, id);
            }
            _ => self.close_down(io, ctx, id),
        }
    }

    /// A send on a TLS connection completed with `n` bytes: the plaintext
    /// bytes the exchange may count as sent, or `None` when there is more
    /// of the session's own to send first (or the connection closes).
    pub(super) fn tls_sent(
        &mut self,
        io: &mut Io,
        ctx: &WorkerCtx,
        id: usize,
        n: usize,
    ) -> Option<usize> {
        let d = &mut self.downs[id];
        let session = d.tls.as_deref_mut().expect("a TLS connection");
        session.sent += n;
        if !session.pending() {
            ctx.bufs.put(std::mem::take(&mut session.out));
            session.sent = 0;
        }
        if session.pending() || session.closing || d.ex.is_none() {
            // The rest of the records, the alert before closing, or
            // handshake messages and tickets.
            self.flush_down(io, ctx, id);
            return None;
        }
        Some(std::mem::take(&mut session.carried))
    }

    /// Ciphertext from a TLS backend: decrypted into `Up.buf`, the
    /// handshake moved on and its messages sent. True when the receive's
    /// usual course goes on (`up_received`: receive again, push back,
    /// hand the response on); false when it was handled here.
    pub(super) fn up_tls_received(
        &mut self,
        io: &mut Io,
        ctx: &WorkerCtx,
        uid: usize,
        bid: u16,
        n: usize,
    ) -> bool {
        let u = &mut self.ups[uid];
        let session = u.tls.as_deref_mut().expect("a TLS upstream");
        let handshaking = session.is_handshaking();
        let buf = &mut u.buf;
        let mut plain = false;
        let got = session.receive(io.driver.buf(bid, n), |p| {
            plain = true;
            take_in(ctx, buf, p);
        });
        io.driver.recycle(bid);
        let ended = match got {
            Ok(r) => r.closed,
            Err(why) => {
                crate::debug!("TLS from an upstream: {}", why.name());
                true
            }
        };
        let Some(id) = u.down.filter(|_| !u.closing) else {
            // Idle in the pool: a ticket or a key update keeps it; bytes,
            // a failure or its close end it.
            if plain || ended || u.closing {
                self.close_up(io, ctx, uid);
                return false;
            }
            if !u.sending && u.flush(io, uid).is_err() {
                self.close_up(io, ctx, uid);
                return false;
            }
            if !u.recv_armed {
                u.recv_armed = io
                    .driver
                    .recv_multi(u.fd, crate::engine::token(UP_RECV, uid as u64))
                    .is_ok();
            }
            return false;
        };
        if got.is_err() {
            if handshaking {
                // The request never reached the backend: another may
                // take it.
                self.upstream_failed(io, ctx, id, UpFail::Unsent(UpstreamFailure::BadGateway));
            } else {
                u.eof = true;
                u.reset = true;
                self.pump_response(io, ctx, id);
            }
            return false;
        }
        if ended {
            // close_notify: the backend's end of stream.
            u.eof = true;
        }
        let handshaken = got.is_ok_and(|r| r.handshaken);
        if !u.sending && u.flush(io, uid).is_err() {
            u.stopped = true;
        }
        if handshaken && let Some(ex) = self.downs[id].ex.as_deref_mut() {
            // The connection is ready: `connect_timeout` bounded the
            // handshake too.
            ex.timers.clear(Timer::Connect);
        }
        true
    }
}
