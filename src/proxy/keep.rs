//! Every keep-alive and reuse decision of the proxy, in one place: whether
//! the client connection serves another request after this one, whether it
//! closes at once or lingers first, and whether the upstream connection
//! goes back to the pool.
//!
//! The proxy gathers the facts into a [`Keep`] as the request goes (what
//! the client asked, whether its body was read, the answer's framing, a
//! closing refusal, the worker draining) and asks it; it never combines
//! them itself.

use crate::admission::After;
use crate::http::head::{BodyFraming, Method, RequestHead, ResponseHead};

/// What becomes of the client connection once the answer is out.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Next {
    KeepAlive,
    Close,
    /// Close after draining what the client still sends.
    LingerClose,
}

impl Next {
    /// The same, unless the worker began to drain while the answer went
    /// out: then nothing is kept.
    pub fn unless_draining(self, draining: bool) -> Next {
        match self {
            Next::KeepAlive if draining => Next::Close,
            n => n,
        }
    }
}

/// What the client connection's fate depends on.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Keep {
    /// The client did not ask to close (HTTP/1.1 without `Connection:
    /// close`, or HTTP/1.0 with `keep-alive`).
    pub asked: bool,
    /// The request's body, if it has one, was read to its end: only then
    /// can the next request's first byte be found.
    pub body_read: bool,
    /// The answer ends without a close (not a close-delimited or
    /// de-chunked body for an HTTP/1.0 client).
    pub framed: bool,
    /// A refusal whose row in the refusal table closes the connection.
    pub refused_closing: bool,
    pub draining: bool,
}

impl Keep {
    /// A request just parsed: its own wishes, its body still unread.
    pub fn for_request(req: &RequestHead, draining: bool) -> Keep {
        Keep {
            asked: req.keep_alive,
            body_read: req.framing == BodyFraming::None,
            framed: true,
            refused_closing: false,
            draining,
        }
    }

    /// Whether the answer tells the client the connection stays open.
    pub fn keeps(self) -> bool {
        self.asked && self.body_read && self.framed && !self.refused_closing && !self.draining
    }

    /// A refusal, with its row's word on the connection.
    pub fn refused(self, after: After) -> Keep {
        Keep {
            refused_closing: after == After::Close,
            ..self
        }
    }

    /// After our own answer (a rule's, a probe's, a refusal, a failure):
    /// kept, or closed after lingering, since the client may have sent
    /// more than was read and a close with unread bytes is a reset that
    /// can destroy the answer in flight.
    pub fn after_own_answer(self) -> Next {
        if self.keeps() {
            Next::KeepAlive
        } else {
            Next::LingerClose
        }
    }

    /// After a proxied response: kept; closed when the request was read
    /// whole; lingered when it was not (the backend answered before the
    /// body ended, and the client may still be sending it).
    pub fn after_response(self) -> Next {
        match (self.keeps(), self.body_read) {
            (true, _) => Next::KeepAlive,
            (false, false) => Next::LingerClose,
            (false, true) => Next::Close,
        }
    }
}

/// What an upstream connection itself says about its reuse.
#[derive(Clone, Copy, Debug)]
pub struct UpstreamState {
    /// A send of ours is still in flight.
    pub sending: bool,
    /// The backend closed its side.
    pub eof: bool,
    /// Bytes came past the response's end.
    pub leftover: bool,
}

/// Whether an upstream connection may carry another request after this
/// exchange: the response kept it, the whole request reached the backend,
/// nothing is left over on it, and the worker is not draining.
///
/// A body on a method whose body has no defined meaning (RFC 9110 9.3.1,
/// 9.3.2, 9.3.5) is forwarded with its framing, but a backend that ignores
/// it would read it as a second request and answer it to the next client
/// on this connection (desync-guardian's "Ambiguous" tier): such a
/// connection is never reused.
pub fn upstream_reusable(
    req: &RequestHead,
    res: &ResponseHead,
    body_sent: bool,
    draining: bool,
    conn: UpstreamState,
) -> bool {
    let body_without_meaning = req.framing != BodyFraming::None
        && matches!(req.method, Method::Get | Method::Head | Method::Delete);
    res.keep_alive
        && body_sent
        && !body_without_meaning
        && !draining
        && !conn.sending
        && !conn.eof
        && !conn.leftover
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept() -> Keep {
        Keep {
            asked: true,
            body_read: true,
            framed: true,
            refused_closing: false,
            draining: false,
        }
    }

    #[test]
    fn a_connection_is_kept_only_when_every_fact_allows() {
        assert!(kept().keeps());
        assert_eq!(kept().after_own_answer(), Next::KeepAlive);
        assert_eq!(kept().after_response(), Next::KeepAlive);
        for k in [
            Keep {
                asked: false,
                ..kept()
            },
            Keep {
                framed: false,
                ..kept()
            },
            Keep {
                draining: true,
                ..kept()
            },
            kept().refused(After::Close),
        ] {
            assert!(!k.keeps(), "{k:?}");
            assert_eq!(k.after_own_answer(), Next::LingerClose, "{k:?}");
            assert_eq!(k.after_response(), Next::Close, "{k:?}");
        }
        assert!(kept().refused(After::KeepIfBodyRead).keeps());
        // A body left unread: an early answer lingers, whatever else holds.
        let unread = Keep {
            body_read: false,
            ..kept()
        };
        assert!(!unread.keeps());
        assert_eq!(unread.after_response(), Next::LingerClose);
        assert_eq!(Next::KeepAlive.unless_draining(true), Next::Close);
        assert_eq!(Next::LingerClose.unless_draining(true), Next::LingerClose);
    }

    #[test]
    fn an_upstream_is_reused_only_clean_after_a_whole_exchange() {
        let mut req = RequestHead {
            method: Method::Post,
            framing: BodyFraming::Length(3),
            ..RequestHead::default()
        };
        let mut res = ResponseHead {
            keep_alive: true,
            ..ResponseHead::default()
        };
        let clean = UpstreamState {
            sending: false,
            eof: false,
            leftover: false,
        };
        assert!(upstream_reusable(&req, &res, true, false, clean));
        assert!(
            !upstream_reusable(&req, &res, false, false, clean),
            "body not all sent"
        );
        assert!(
            !upstream_reusable(&req, &res, true, true, clean),
            "draining"
        );
        for conn in [
            UpstreamState {
                sending: true,
                ..clean
            },
            UpstreamState { eof: true, ..clean },
            UpstreamState {
                leftover: true,
                ..clean
            },
        ] {
            assert!(
                !upstream_reusable(&req, &res, true, false, conn),
                "{conn:?}"
            );
        }
        req.method = Method::Get;
        assert!(
            !upstream_reusable(&req, &res, true, false, clean),
            "GET with a body"
        );
        res.keep_alive = false;
        req.framing = BodyFraming::None;
        assert!(
            !upstream_reusable(&req, &res, true, false, clean),
            "response closes"
        );
    }
}
