//! Tunnels: a client connection that switched protocols through the
//! proxy (`Upgrade`, a backend's `101 Switching Protocols`, RFC 9110 7.8)
//! and now relays raw bytes both ways until each side has closed.
//!
//! Owns: what a 101 must say to be accepted, the switch, the relay in both
//! directions with its half-closes, the idle timeout's meaning, and a
//! tunnel's accounting (`max_tunnels`, counters, its one access log line).
//! Does not own: which requests may upgrade (`decide`, from the route's
//! `upgrade` list), the heads' fields (`http`), or moving bytes between a
//! receive and a buffer (`Framer`, the direct paths and the backpressure
//! of `Proxy`, which a tunnel shares with a request body and a response).
//!
//! A tunnel is the exchange that asked to upgrade, in `Phase::Tunnel`,
//! with its upstream connection: both directions run at once, each with
//! one send in flight, each pausing its receive when the other side does
//! not take the bytes (`MAX_BUFFERED`). Quiet, it holds no buffer: the
//! receives are armed on the worker's provided buffers, and every
//! emptied buffer goes back to the pool.

use std::time::Duration;

use super::relay::{BodyIn, BodyOut, Framer};
use super::timers::Timer;
use super::{Exchange, Phase, Proxy, backend_failed, count_response, shut_write};
use crate::context::WorkerCtx;
use crate::engine::Io;
use crate::http::head::upgrade_answers;

/// What an exchange knows of its upgrade.
#[derive(Default)]
pub(super) struct Tunnel {
    /// The request's upgrade goes on to the backend: a tunnel it opens
    /// closes after this long with no bytes either way.
    pub idle: Option<Duration>,
    /// The protocols the request offered (its Upgrade field's value), to
    /// check the 101 against.
    pub offer: Vec<u8>,
    /// Counted against this listener's `max_tunnels`, from the upgrade's
    /// admission to the tunnel's end.
    pub reserved: Option<u16>,
    /// The backend's write side is shut: the client closed its own, and
    /// all it sent was handed on. `down_shut`: the same, the other way.
    pub up_shut: bool,
    pub down_shut: bool,
    /// Bytes each way already added to the worker's counters.
    pub counted_up: u64,
    pub counted_down: u64,
    /// The tick of the tunnel's last event, and its idle timeout in ticks.
    pub active: u64,
    pub idle_ticks: u64,
}

impl Tunnel {
    /// When the tunnel is idle past its timeout, counted from its last
    /// event; `None` before it opened.
    pub fn idle_due(&self) -> Option<u64> {
        (self.idle_ticks > 0).then(|| self.active.saturating_add(self.idle_ticks))
    }

    /// Ready for the connection's next request (the offer's storage kept).
    pub fn clear(&mut self) {
        self.offer.clear();
        *self = Tunnel {
            offer: std::mem::take(&mut self.offer),
            ..Tunnel::default()
        };
    }
}

/// Count an upgrade about to go to a backend against its listener's
/// `max_tunnels`; false when the listener is at its cap.
pub(super) fn reserve(ctx: &WorkerCtx, ex: &mut Exchange, listener: usize) -> bool {
    let open = &ctx.listener_tunnels[listener];
    if open.get() >= ex.cur().snapshot.listeners[listener].max_tunnels {
        return false;
    }
    open.set(open.get() + 1);
    ex.tunnel.reserved = Some(listener as u16);
    true
}

/// The request is over (`finish`): its place under `max_tunnels` is given
/// back, and an open tunnel's last bytes are counted.
pub(super) fn ended(ctx: &WorkerCtx, ex: &mut Exchange) {
    if matches!(ex.phase, Phase::Tunnel) {
        count_relayed(ctx, ex);
        ex.sent += ex.body_out.as_ref().map_or(0, Framer::total);
        ctx.stats.tunnels.closed();
    }
    if let Some(l) = ex.tunnel.reserved.take() {
        let open = &ctx.listener_tunnels[l as usize];
        open.set(open.get() - 1);
    }
}

/// Add the bytes relayed since the last count to the worker's counters,
/// so `top` shows a long tunnel's traffic while it is open.
fn count_relayed(ctx: &WorkerCtx, ex: &mut Exchange) {
    let up = ex.body_in.as_ref().map_or(0, Framer::total);
    let down = ex.body_out.as_ref().map_or(0, Framer::total);
    let t = &mut ex.tunnel;
    ctx.stats
        .tunnels
        .relayed(up - t.counted_up, down - t.counted_down);
    t.counted_up = up;
    t.counted_down = down;
}

/// Whether a 101 in `buf` answers the request: the request's upgrade was
/// passed on, and the 101 names only protocols it offered.
pub(super) fn answers(ex: &Exchange, buf: &[u8]) -> bool {
    ex.tunnel.idle.is_some()
        && ex
            .res
            .upgrade
            .is_some_and(|s| upgrade_answers(s.get(buf), &ex.tunnel.offer))
}

impl Proxy {
    /// A 101 that does not answer the request (none was asked for, or it
    /// names another protocol): the backend is at fault, and neither
    /// side can know what the other now speaks. 502, and both close.
    pub(super) fn refuse_switch(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize) {
        let ex = self.downs[id]
            .ex
            .as_deref_mut()
            .expect("a 101 answers an exchange");
        backend_failed(ex, io.now);
        crate::warn!(
            "upstream {}: 101 Switching Protocols to a request that did not offer that upgrade; answered 502",
            ex.cur().snapshot.upstreams[ex.group].backends[ex.backend].label
        );
        ex.keep.refused_closing = true;
        self.release_upstream(io, ctx, id, false);
        self.reject(io, ctx, id, 502);
    }

    /// The 101 went into `out` (`response_head`): from here on both
    /// connections carry the new protocol, relayed as it comes.
    pub(super) fn open_tunnel(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize) {
        let ex = self.downs[id]
            .ex
            .as_deref_mut()
            .expect("a tunnel is an exchange");
        ex.phase = Phase::Tunnel;
        let idle = ex
            .tunnel
            .idle
            .expect("an upgrade passed on has its idle timeout");
        ex.tunnel.idle_ticks = io.tick_after(idle) - io.tick;
        ex.tunnel.active = io.tick;
        ex.timers.set(Timer::TunnelIdle, io.tick_after(idle));
        ex.body_in = Some(Framer::new(BodyIn::UntilClose, BodyOut::Verbatim, u64::MAX));
        for t in [
            Timer::Request,
            Timer::BodyIdle,
            Timer::Response,
            Timer::UpWrite,
            Timer::UpRead,
        ] {
            ex.timers.clear(t);
        }
        // The 101 is the request's response: counted now, its latency the
        // handshake's. The access log line waits for the tunnel's end, as
        // nginx's does, with the bytes relayed and the tunnel's life.
        count_response(ctx, ex, io.now);
        ctx.stats.tunnels.opened();
        // Neither head is read again: their arrays go back to the pool,
        // so a quiet tunnel holds its records and nothing else.
        for v in [
            std::mem::take(&mut ex.req.headers),
            std::mem::take(&mut ex.res.headers),
        ] {
            ctx.header_vecs.put(v);
        }
        ex.req.connection_names = Vec::new();
        ex.res.connection_names = Vec::new();
        self.pump_tunnel(io, ctx, id);
    }

    /// Move what each side sent on to the other, one send in flight per
    /// direction; pass a half-close on once everything before it went;
    /// close both when both sides have closed, or at once when either
    /// fails.
    pub(super) fn pump_tunnel(&mut self, io: &mut Io, ctx: &WorkerCtx, id: usize) {
        let Proxy { downs, ups, .. } = self;
        let d = &mut downs[id];
        if d.closing {
            return;
        }
        let ex = d.ex.as_deref_mut().expect("a tunnel is an exchange");
        let Some(uid) = ex.up else {
            return self.close_down(io, ctx, id);
        };
        let u = &mut ups[uid];
        if u.reset || u.stopped || u.closing {
            // A reset, or a send that failed: what is left cannot arrive
            // whole on the other side, so it is not sent at all.
            return self.close_down(io, ctx, id);
        }
        // Client to backend.
        if !u.sending && !ex.tunnel.up_shut {
            if !ex.buf.is_empty() {
                let framer = ex.body_in.as_mut().expect("a tunnel relays both ways");
                match framer.forward(&mut ex.buf, &mut u.out, &mut u.sent) {
                    Ok(step) => ex.received += step.consumed as u64,
                    Err(_) => return self.close_down(io, ctx, id),
                }
            }
            let sending = match u.flush(io, uid) {
                Ok(sending) => sending,
                Err(_) => return self.close_down(io, ctx, id),
            };
            if !sending && d.eof && ex.buf.is_empty() {
                shut_write(u.fd);
                ex.tunnel.up_shut = true;
            }
        }
        // Backend to client.
        if !d.sending && !ex.tunnel.down_shut {
            if !u.buf.is_empty() {
                let framer = ex.body_out.as_mut().expect("a tunnel relays both ways");
                if framer
                    .forward(&mut u.buf, &mut ex.out, &mut ex.out_sent)
                    .is_err()
                {
                    return self.close_down(io, ctx, id);
                }
            }
            if ex.out_sent == ex.out.len() && u.eof && u.buf.is_empty() {
                shut_write(d.fd);
                ex.tunnel.down_shut = true;
            }
        }
        count_relayed(ctx, ex);
        if ex.tunnel.up_shut && ex.tunnel.down_shut {
            return self.close_down(io, ctx, id);
        }
        ex.tunnel.active = io.tick;
        // Emptied buffers go back to the pool: a quiet tunnel holds none.
        // One a send is reading from stays.
        for (v, sent, busy) in [
            (&mut u.out, &mut u.sent, u.sending),
            (&mut ex.out, &mut ex.out_sent, d.sending),
        ] {
            if !busy && *sent == v.len() && v.capacity() > 0 {
                ctx.bufs.put(std::mem::take(v));
                *sent = 0;
            }
        }
        for b in [&mut ex.buf, &mut u.buf] {
            if b.is_empty() && b.has_capacity() {
                ctx.bufs.put(std::mem::take(b).into_inner());
            }
        }
        self.flush_down(io, ctx, id);
        self.resume_down(io, id);
        self.resume_up(io, uid);
    }
}
