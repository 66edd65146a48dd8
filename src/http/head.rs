//! Request and response heads: parsing with httparse, strict framing checks,
//! and the header offsets that the encoder later copies from.
//!
//! Owns: turning the bytes of one head into a [`RequestHead`] or
//! [`ResponseHead`] whose fields are offsets into the caller's buffer (no
//! copies), and refusing every ambiguous framing a request smuggler could
//! use. Does not own: reading bytes, body framing state (see `chunked`) or
//! writing heads (see `encode`).

use std::mem::MaybeUninit;

/// Hard ceiling on the header count, whatever the config says: the stack
/// array httparse fills is this long (uninitialised, so it costs nothing).
pub const MAX_HEADERS_HARD: usize = 256;

/// Byte range inside the buffer a head was parsed from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Span {
    pub start: u32,
    pub end: u32,
}

impl Span {
    fn of(base: &[u8], part: &[u8]) -> Span {
        let start = part.as_ptr() as usize - base.as_ptr() as usize;
        Span {
            start: start as u32,
            end: (start + part.len()) as u32,
        }
    }

    pub fn get<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.start as usize..self.end as usize]
    }

    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// The header names the proxy treats specially, classified once at parse
/// time so the encoder never compares names again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderKind {
    ContentLength,
    TransferEncoding,
    Host,
    Connection,
    /// Hop-by-hop by definition (RFC 9110 7.6.1): Keep-Alive, TE, Trailer,
    /// Proxy-*.
    HopByHop,
    /// Hop-by-hop too, but passed on when a route lets the request switch
    /// protocols (RFC 9110 7.8).
    Upgrade,
    Expect,
    XForwardedFor,
    XForwardedProto,
    Via,
    /// A name that reads as one of the above once `_` becomes `-`; never
    /// forwarded.
    Shadowing,
    Other,
}

fn classify(name: &[u8]) -> HeaderKind {
    if has_byte(name, b'_') {
        return classify_underscored(name);
    }
    classify_exact(name)
}

/// `Transfer_Encoding`, `Content_Length`, `X_Forwarded_For`...: CGI-style
/// backends (PHP, WSGI) read `_` as `-`, so forwarding such a field would
/// let a client frame a body we never framed, or forge what the proxy
/// adds. Such fields are dropped (nginx drops every underscored name by
/// default; other underscored names pass here).
fn classify_underscored(name: &[u8]) -> HeaderKind {
    let mut folded = [0u8; 32];
    if name.len() > folded.len() {
        // Only Proxy-* names are this long among the shadowable ones.
        let proxy =
            name[..6].eq_ignore_ascii_case(b"proxy-") || name[..6].eq_ignore_ascii_case(b"proxy_");
        return if proxy {
            HeaderKind::Shadowing
        } else {
            HeaderKind::Other
        };
    }
    for (d, &b) in folded.iter_mut().zip(name) {
        *d = if b == b'_' { b'-' } else { b };
    }
    match classify_exact(&folded[..name.len()]) {
        HeaderKind::Other => HeaderKind::Other,
        _ => HeaderKind::Shadowing,
    }
}

fn classify_exact(name: &[u8]) -> HeaderKind {
    let eq = |s: &str| name.eq_ignore_ascii_case(s.as_bytes());
    match name.len() {
        2 if eq("te") => HeaderKind::HopByHop,
        3 if eq("via") => HeaderKind::Via,
        4 if eq("host") => HeaderKind::Host,
        6 if eq("expect") => HeaderKind::Expect,
        7 if eq("trailer") => HeaderKind::HopByHop,
        7 if eq("upgrade") => HeaderKind::Upgrade,
        10 if eq("connection") => HeaderKind::Connection,
        10 if eq("keep-alive") => HeaderKind::HopByHop,
        14 if eq("content-length") => HeaderKind::ContentLength,
        15 if eq("x-forwarded-for") => HeaderKind::XForwardedFor,
        17 if eq("transfer-encoding") => HeaderKind::TransferEncoding,
        17 if eq("x-forwarded-proto") => HeaderKind::XForwardedProto,
        n if n > 6 && name[..6].eq_ignore_ascii_case(b"proxy-") => HeaderKind::HopByHop,
        _ => HeaderKind::Other,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeaderSpan {
    pub name: Span,
    pub value: Span,
    pub kind: HeaderKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
    Options,
    Connect,
    Trace,
    Other,
}

impl Method {
    /// Writes: shed before reads under load (docs/design.md).
    pub fn is_write(self) -> bool {
        matches!(
            self,
            Method::Post | Method::Put | Method::Patch | Method::Delete
        )
    }

    /// RFC 9110 9.2.2: repeating the request has the effect of one.
    pub fn is_idempotent(self) -> bool {
        matches!(
            self,
            Method::Get
                | Method::Head
                | Method::Put
                | Method::Delete
                | Method::Options
                | Method::Trace
        )
    }

    fn from_bytes(m: &[u8]) -> Method {
        match m {
            b"GET" => Method::Get,
            b"HEAD" => Method::Head,
            b"POST" => Method::Post,
            b"PUT" => Method::Put,
            b"PATCH" => Method::Patch,
            b"DELETE" => Method::Delete,
            b"OPTIONS" => Method::Options,
            b"CONNECT" => Method::Connect,
            b"TRACE" => Method::Trace,
            _ => Method::Other,
        }
    }
}

/// How the body after a head is delimited (RFC 9112 section 6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFraming {
    None,
    Length(u64),
    Chunked,
    /// Responses only: the body runs until the upstream closes.
    CloseDelimited,
}

/// Why a head was refused. Small and `Copy`: the status code, log reason and
/// metric label all come from here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("header block too large")]
    HeadTooLarge,
    #[error("too many header fields")]
    TooManyHeaders,
    #[error("request target too long")]
    UriTooLong,
    #[error("malformed head: {0}")]
    Malformed(&'static str),
    #[error("ambiguous message framing: {0}")]
    Framing(&'static str),
    #[error("HTTP/1.1 request without Host")]
    MissingHost,
    #[error("unsupported HTTP version")]
    Version,
}

impl HeadError {
    /// The status a downstream client gets for this error (docs/design.md table).
    pub fn status(self) -> u16 {
        match self {
            HeadError::HeadTooLarge | HeadError::TooManyHeaders => 431,
            HeadError::UriTooLong => 414,
            HeadError::Malformed(_)
            | HeadError::Framing(_)
            | HeadError::MissingHost
            | HeadError::Version => 400,
        }
    }

    /// Short label for logs and the `rejected_total{reason}` counter.
    pub fn reason(self) -> &'static str {
        match self {
            HeadError::HeadTooLarge => "head_too_large",
            HeadError::TooManyHeaders => "too_many_headers",
            HeadError::UriTooLong => "uri_too_long",
            HeadError::Malformed(_) => "malformed",
            HeadError::Framing(_) => "framing",
            HeadError::MissingHost => "missing_host",
            HeadError::Version => "version",
        }
    }
}

/// Per-listener parsing limits.
#[derive(Clone, Copy, Debug)]
pub struct HeadLimits {
    pub max_head_bytes: usize,
    pub max_headers: usize,
    pub max_uri_bytes: usize,
}

impl Default for HeadLimits {
    fn default() -> Self {
        // nginx's large_client_header_buffers is 4 x 8k; HAProxy's bufsize
        // is 16k. One 16 KiB head covers every browser and API client.
        HeadLimits {
            max_head_bytes: 16 * 1024,
            max_headers: 100,
            max_uri_bytes: 8 * 1024,
        }
    }
}

/// `Partial` means "read more"; `Complete(n)` says the head is `n` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Complete(usize),
    Partial,
}

/// A parsed request head. Reused across the requests of a connection, so
/// its vectors keep their capacity and parsing allocates nothing.
#[derive(Debug)]
pub struct RequestHead {
    pub len: usize,
    pub method: Method,
    pub method_span: Span,
    /// The request target as sent.
    pub target: Span,
    /// Origin-form path and query to forward (differs from `target` only
    /// for absolute-form targets).
    pub path: Span,
    /// Authority of an absolute-form target; it overrides Host (RFC 9112 3.2.2).
    pub authority: Option<Span>,
    pub version: Version,
    pub headers: Vec<HeaderSpan>,
    pub host: Option<Span>,
    pub framing: BodyFraming,
    pub keep_alive: bool,
    pub expect_continue: bool,
    /// Header names listed in Connection: hop-by-hop, never forwarded.
    pub connection_names: Vec<Span>,
    /// The protocols an HTTP/1.1 request offers to switch to: its Upgrade
    /// field, when Connection lists `upgrade` too (RFC 9110 7.8; an
    /// HTTP/1.0 request's Upgrade is ignored).
    pub upgrade: Option<Span>,
}

impl Default for RequestHead {
    fn default() -> Self {
        RequestHead {
            len: 0,
            method: Method::Get,
            method_span: Span::default(),
            target: Span::default(),
            path: Span::default(),
            authority: None,
            version: Version::Http11,
            headers: Vec::new(),
            host: None,
            framing: BodyFraming::None,
            keep_alive: true,
            expect_continue: false,
            connection_names: Vec::new(),
            upgrade: None,
        }
    }
}

impl RequestHead {
    /// Host to route on: the absolute-form authority, else the Host header.
    pub fn routing_host<'a>(&self, buf: &'a [u8]) -> Option<&'a [u8]> {
        self.authority.or(self.host).map(|s| s.get(buf))
    }

    #[inline]
    pub fn is_connection_listed(&self, buf: &[u8], name: Span) -> bool {
        if self.connection_names.is_empty() {
            return false;
        }
        let name = name.get(buf);
        self.connection_names
            .iter()
            .any(|s| s.get(buf).eq_ignore_ascii_case(name))
    }

    /// Path to route on: `/` for an absolute-form target without a path
    /// (`GET http://a HTTP/1.1`) and for `OPTIONS *`, which concern the
    /// whole host.
    pub fn routing_path<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        match self.path.get(buf) {
            b"" | b"*" => b"/",
            [b'?', ..] => b"/",
            p => p,
        }
    }
}

#[derive(Debug)]
pub struct ResponseHead {
    pub len: usize,
    pub status: u16,
    pub reason: Span,
    pub version: Version,
    pub headers: Vec<HeaderSpan>,
    pub framing: BodyFraming,
    /// The upstream may keep the connection open after this response.
    pub keep_alive: bool,
    pub connection_names: Vec<Span>,
    /// Value of Transfer-Encoding when it is exactly `chunked`, or a list.
    pub te_is_plain_chunked: bool,
    /// The Upgrade field: in a 101, the protocols switched to.
    pub upgrade: Option<Span>,
}

impl Default for ResponseHead {
    fn default() -> Self {
        ResponseHead {
            len: 0,
            status: 0,
            reason: Span::default(),
            version: Version::Http11,
            headers: Vec::new(),
            framing: BodyFraming::None,
            keep_alive: true,
            connection_names: Vec::new(),
            te_is_plain_chunked: true,
            upgrade: None,
        }
    }
}

impl ResponseHead {
    #[inline]
    pub fn is_connection_listed(&self, buf: &[u8], name: Span) -> bool {
        if self.connection_names.is_empty() {
            return false;
        }
        let name = name.get(buf);
        self.connection_names
            .iter()
            .any(|s| s.get(buf).eq_ignore_ascii_case(name))
    }
}

fn parser_config() -> httparse::ParserConfig {
    // Every leniency stays off: no obs-fold, no spaces before colons, no
    // multiple spaces in the request line, no invalid headers skipped.
    httparse::ParserConfig::default()
}

fn map_httparse(e: httparse::Error) -> HeadError {
    use httparse::Error as E;
    match e {
        E::TooManyHeaders => HeadError::TooManyHeaders,
        E::Version => HeadError::Version,
        E::HeaderName => HeadError::Malformed("invalid header name"),
        E::HeaderValue => HeadError::Malformed("invalid header value"),
        E::NewLine => HeadError::Malformed("invalid line ending"),
        E::Status => HeadError::Malformed("invalid status"),
        E::Token => HeadError::Malformed("invalid token"),
    }
}

/// httparse accepts a bare LF as a line ending; RFC 9112 2.2 lets a
/// recipient do so, but two parsers disagreeing on line ends is a classic
/// desync, so a proxy must not.
///
/// In a head httparse completed, a CR can only be the start of a CRLF line
/// ending (it refuses CR in the target, in names and values, and a CR not
/// followed by LF). So every line ends in CRLF exactly when there are as
/// many CRs as lines: start line, one per field, and the empty line. The
/// count compiles to a vectorised loop. The byte-by-byte scan it replaced
/// cost 239 ns of the 670 ns it took to parse a 700-byte browser request
/// (`cargo bench --bench parse`: 431 ns now); fuzz/request_head checks the
/// two agree.
fn check_line_endings(head: &[u8], fields: usize) -> Result<(), HeadError> {
    // Empty lines before the start line are skipped by httparse (RFC 9112
    // 2.2 allows it); each must still be a CRLF.
    let mut start = 0;
    while let Some(&b) = head.get(start) {
        match (b, head.get(start + 1)) {
            (b'\r', Some(b'\n')) => start += 2,
            (b'\r' | b'\n', _) => return Err(HeadError::Malformed("bare LF")),
            _ => break,
        }
    }
    if count_cr(&head[start..]) == fields + 2 {
        Ok(())
    } else {
        Err(HeadError::Malformed("bare LF"))
    }
}

/// Bit 7 of each byte of `w` equal to `b`, and no other bit (the sum
/// cannot carry out of a byte, so no byte disturbs its neighbour).
#[inline]
fn bytes_equal(w: &[u8], b: u8) -> u64 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    let x = u64::from_le_bytes(w.try_into().expect("eight bytes"))
        ^ (u64::from(b) * 0x0101_0101_0101_0101);
    !(((x & LOW7) + LOW7) | x | LOW7)
}

/// CR bytes in `bytes`, eight at a time: a byte-by-byte count cost about
/// 1,000 instructions a proxied request (request and response heads).
fn count_cr(bytes: &[u8]) -> usize {
    let mut words = bytes.chunks_exact(8);
    let mut n = 0;
    for w in &mut words {
        n += bytes_equal(w, b'\r').count_ones() as usize;
    }
    n + words.remainder().iter().filter(|&&b| b == b'\r').count()
}

/// Whether `b` is in `bytes`, eight at a time: for header names, a call
/// to `memchr` per field cost ~250 instructions a request.
#[inline]
fn has_byte(bytes: &[u8], b: u8) -> bool {
    let mut words = bytes.chunks_exact(8);
    words.any(|w| bytes_equal(w, b) != 0) || words.remainder().contains(&b)
}

/// Shared between requests and responses: what the framing headers said.
#[derive(Default)]
struct FramingFields {
    content_length: Option<u64>,
    te_seen: bool,
    te_chunked_last: bool,
    te_plain_chunked: bool,
    conn_close: bool,
    conn_keep_alive: bool,
    /// Connection lists `upgrade`.
    conn_upgrade: bool,
    upgrade: Option<Span>,
}

impl FramingFields {
    /// Take in one field if it is Content-Length, Transfer-Encoding or
    /// Connection; requests and responses frame by the same rules.
    #[inline]
    fn add(&mut self, buf: &[u8], h: &HeaderSpan, names: &mut Vec<Span>) -> Result<(), HeadError> {
        match h.kind {
            HeaderKind::ContentLength => {
                if self.content_length.is_some() {
                    return Err(HeadError::Framing("duplicate Content-Length"));
                }
                self.content_length = Some(parse_content_length(h.value.get(buf))?);
            }
            HeaderKind::TransferEncoding => add_transfer_encoding(self, h.value.get(buf))?,
            HeaderKind::Connection => add_connection(self, buf, h.value.get(buf), names)?,
            HeaderKind::Upgrade => {
                if self.upgrade.is_some() {
                    return Err(HeadError::Malformed("duplicate Upgrade"));
                }
                if upgrade_protocols(h.value.get(buf)).any(|p| p.is_none()) {
                    return Err(HeadError::Malformed("invalid Upgrade"));
                }
                self.upgrade = Some(h.value);
            }
            _ => {}
        }
        Ok(())
    }
}

/// `Content-Length = 1*DIGIT` (RFC 9110 8.6). A list, a sign, spaces
/// inside or a second Content-Length field are all refused: a smuggler
/// relies on two hops reading them differently.
fn parse_content_length(v: &[u8]) -> Result<u64, HeadError> {
    if v.is_empty() || v.len() > 19 {
        return Err(HeadError::Framing("invalid Content-Length"));
    }
    let mut n: u64 = 0;
    for &b in v {
        if !b.is_ascii_digit() {
            return Err(HeadError::Framing("invalid Content-Length"));
        }
        n = n * 10 + u64::from(b - b'0');
    }
    Ok(n)
}

pub fn is_tchar(b: u8) -> bool {
    matches!(b, b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9'
        | b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+'
        | b'-' | b'.' | b'^' | b'_' | b'`' | b'|' | b'~')
}

fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// The protocols of an Upgrade field (`websocket`, `h2c, websocket/13`):
/// each one's name, without its version, or `None` for an element that
/// is not `token [ "/" token ]`.
pub fn upgrade_protocols(v: &[u8]) -> impl Iterator<Item = Option<&[u8]>> {
    v.split(|&b| b == b',').map(trim_ows).map(|p| {
        let (name, version) = match p.iter().position(|&b| b == b'/') {
            Some(i) => (&p[..i], Some(&p[i + 1..])),
            None => (p, None),
        };
        let token = |t: &[u8]| !t.is_empty() && t.iter().all(|&b| is_tchar(b));
        (token(name) && version.is_none_or(token)).then_some(name)
    })
}

/// Whether every protocol of the Upgrade field `switched` (a 101's) is
/// one of those `offered` (the request's).
pub fn upgrade_answers(switched: &[u8], offered: &[u8]) -> bool {
    upgrade_protocols(switched).all(|p| {
        p.is_some_and(|p| {
            upgrade_protocols(offered).any(|o| o.is_some_and(|o| o.eq_ignore_ascii_case(p)))
        })
    })
}

/// Transfer-Encoding is a list of codings; several fields concatenate.
/// `chunked` must be the last coding and appear once (RFC 9112 6.1).
fn add_transfer_encoding(f: &mut FramingFields, v: &[u8]) -> Result<(), HeadError> {
    for item in v.split(|&b| b == b',') {
        let coding = trim_ows(item);
        if coding.is_empty() {
            // `#rule` allows empty elements, but no sender needs them here.
            return Err(HeadError::Framing("empty transfer-coding"));
        }
        if !coding.iter().all(|&b| is_tchar(b)) {
            return Err(HeadError::Framing("invalid transfer-coding"));
        }
        if f.te_chunked_last {
            // Something follows `chunked`: the body is not chunked-framed.
            return Err(HeadError::Framing(
                "chunked is not the final transfer-coding",
            ));
        }
        if coding.eq_ignore_ascii_case(b"chunked") {
            f.te_chunked_last = true;
            f.te_plain_chunked = !f.te_seen;
        } else {
            f.te_plain_chunked = false;
        }
        f.te_seen = true;
    }
    Ok(())
}

fn add_connection(
    f: &mut FramingFields,
    base: &[u8],
    v: &[u8],
    names: &mut Vec<Span>,
) -> Result<(), HeadError> {
    for item in v.split(|&b| b == b',') {
        let opt = trim_ows(item);
        if opt.is_empty() {
            continue;
        }
        if !opt.iter().all(|&b| is_tchar(b)) {
            return Err(HeadError::Malformed("invalid Connection option"));
        }
        if opt.eq_ignore_ascii_case(b"close") {
            f.conn_close = true;
        } else if opt.eq_ignore_ascii_case(b"keep-alive") {
            f.conn_keep_alive = true;
        } else if opt.eq_ignore_ascii_case(b"upgrade") {
            f.conn_upgrade = true;
        } else {
            names.push(Span::of(base, opt));
        }
    }
    Ok(())
}

/// Host = uri-host [ ":" port ]: reg-name, IPv4 or an IP literal. Anything
/// else (spaces, '/', '@', ...) is refused rather than forwarded.
fn valid_host(v: &[u8]) -> bool {
    v.iter().all(|&b| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b':'
                    | b'['
                    | b']'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            )
    })
}

fn record_headers(base: &[u8], parsed: &[httparse::Header<'_>], out: &mut Vec<HeaderSpan>) {
    out.clear();
    for h in parsed {
        let name = h.name.as_bytes();
        out.push(HeaderSpan {
            name: Span::of(base, name),
            value: Span::of(base, h.value),
            kind: classify(name),
        });
    }
}

/// Parse a request head at the start of `buf` into `head`.
///
/// On `Complete`, `head` describes the message and every framing rule of
/// docs/design.md step 3 has passed. Errors are final for the connection.
pub fn parse_request(
    buf: &[u8],
    limits: &HeadLimits,
    head: &mut RequestHead,
) -> Result<Status, HeadError> {
    let mut raw: [MaybeUninit<httparse::Header<'_>>; MAX_HEADERS_HARD] =
        [const { MaybeUninit::uninit() }; MAX_HEADERS_HARD];
    let mut req = httparse::Request::new(&mut []);
    let max = limits.max_headers.min(MAX_HEADERS_HARD);
    let len =
        match parser_config().parse_request_with_uninit_headers(&mut req, buf, &mut raw[..max]) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => {
                return partial_request_limits(buf, limits).map(|()| Status::Partial);
            }
            Err(e) => {
                // A head that is too long may fail for lack of room before it is
                // malformed; report the limit that was crossed, as nginx does.
                if e == httparse::Error::TooManyHeaders {
                    return Err(HeadError::TooManyHeaders);
                }
                return Err(map_httparse(e));
            }
        };
    if len > limits.max_head_bytes {
        return Err(HeadError::HeadTooLarge);
    }
    check_line_endings(&buf[..len], req.headers.len())?;

    let method = req.method.expect("complete request has a method");
    let target = req.path.expect("complete request has a target");
    if target.len() > limits.max_uri_bytes {
        return Err(HeadError::UriTooLong);
    }
    head.len = len;
    head.method = Method::from_bytes(method.as_bytes());
    head.method_span = Span::of(buf, method.as_bytes());
    head.target = Span::of(buf, target.as_bytes());
    head.version = match req.version {
        Some(0) => Version::Http10,
        Some(1) => Version::Http11,
        _ => return Err(HeadError::Version),
    };
    record_headers(buf, req.headers, &mut head.headers);
    head.connection_names.clear();
    head.host = None;
    head.authority = None;
    head.expect_continue = false;

    set_request_target(buf, head)?;

    let mut f = FramingFields::default();
    let mut host_count = 0;
    for h in &head.headers {
        f.add(buf, h, &mut head.connection_names)?;
        let v = h.value.get(buf);
        match h.kind {
            HeaderKind::Host => {
                host_count += 1;
                if host_count > 1 {
                    return Err(HeadError::Malformed("duplicate Host"));
                }
                if !valid_host(v) {
                    return Err(HeadError::Malformed("invalid Host"));
                }
                head.host = Some(h.value);
            }
            HeaderKind::Expect if v.eq_ignore_ascii_case(b"100-continue") => {
                head.expect_continue = true;
            }
            _ => {}
        }
    }
    if head.version == Version::Http11 && head.host.is_none() {
        return Err(HeadError::MissingHost);
    }
    head.framing = request_framing(&f, head.version)?;
    head.upgrade = f
        .upgrade
        .filter(|_| f.conn_upgrade && head.version == Version::Http11);
    head.keep_alive = match head.version {
        Version::Http11 => !f.conn_close,
        Version::Http10 => f.conn_keep_alive && !f.conn_close,
    };
    if head.method == Method::Connect {
        // Tunnels are not proxied; refuse rather than guess what follows.
        return Err(HeadError::Malformed("CONNECT is not supported"));
    }
    Ok(Status::Complete(len))
}

/// While the head is incomplete, fail as soon as a limit is certainly
/// crossed, so a client cannot make us buffer more than the limit.
fn partial_request_limits(buf: &[u8], limits: &HeadLimits) -> Result<(), HeadError> {
    let line_end = buf.iter().position(|&b| b == b'\n');
    if line_end.is_none() && buf.len() > limits.max_uri_bytes + 64 {
        return Err(HeadError::UriTooLong);
    }
    if buf.len() > limits.max_head_bytes {
        return Err(HeadError::HeadTooLarge);
    }
    Ok(())
}

fn set_request_target(buf: &[u8], head: &mut RequestHead) -> Result<(), HeadError> {
    let target = head.target.get(buf);
    match target.first() {
        Some(b'/') => head.path = head.target,
        Some(b'*') if target.len() == 1 && head.method == Method::Options => {
            head.path = head.target
        }
        _ => {
            // absolute-form: scheme "://" authority path-abempty [ "?" query ]
            let rest = if target.len() > 7 && target[..7].eq_ignore_ascii_case(b"http://") {
                &target[7..]
            } else if target.len() > 8 && target[..8].eq_ignore_ascii_case(b"https://") {
                &target[8..]
            } else {
                return Err(HeadError::Malformed("invalid request target"));
            };
            let auth_len = rest
                .iter()
                .position(|&b| b == b'/' || b == b'?')
                .unwrap_or(rest.len());
            let authority = &rest[..auth_len];
            if authority.is_empty() || !valid_host(authority) {
                return Err(HeadError::Malformed("invalid authority in request target"));
            }
            head.authority = Some(Span::of(buf, authority));
            let path = &rest[auth_len..];
            head.path = if path.is_empty() {
                // "GET http://a HTTP/1.1" means "/" (RFC 9112 3.2.2).
                Span { start: 0, end: 0 }
            } else {
                Span::of(buf, path)
            };
        }
    }
    Ok(())
}

fn request_framing(f: &FramingFields, version: Version) -> Result<BodyFraming, HeadError> {
    if f.te_seen {
        if f.content_length.is_some() {
            return Err(HeadError::Framing(
                "both Content-Length and Transfer-Encoding",
            ));
        }
        if version == Version::Http10 {
            // RFC 9112 6.1: treat as faulty framing.
            return Err(HeadError::Framing(
                "Transfer-Encoding in an HTTP/1.0 request",
            ));
        }
        if !f.te_chunked_last {
            // RFC 9112 6.3 rule 4: the server MUST respond with 400 and close.
            return Err(HeadError::Framing(
                "chunked is not the final transfer-coding",
            ));
        }
        return Ok(BodyFraming::Chunked);
    }
    Ok(match f.content_length {
        None | Some(0) => BodyFraming::None,
        Some(n) => BodyFraming::Length(n),
    })
}

/// Parse an upstream response head. `request_method` decides whether a
/// body may follow (HEAD); the upstream side
/// always speaks HTTP/1.1.
pub fn parse_response(
    buf: &[u8],
    max_head_bytes: usize,
    request_method: Method,
    head: &mut ResponseHead,
) -> Result<Status, HeadError> {
    let mut raw: [MaybeUninit<httparse::Header<'_>>; MAX_HEADERS_HARD] =
        [const { MaybeUninit::uninit() }; MAX_HEADERS_HARD];
    let mut res = httparse::Response::new(&mut []);
    let len = match parser_config().parse_response_with_uninit_headers(&mut res, buf, &mut raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > max_head_bytes {
                return Err(HeadError::HeadTooLarge);
            }
            return Ok(Status::Partial);
        }
        Err(e) => return Err(map_httparse(e)),
    };
    if len > max_head_bytes {
        return Err(HeadError::HeadTooLarge);
    }
    check_line_endings(&buf[..len], res.headers.len())?;
    let status = res.code.expect("complete response has a status");
    if !(100..=999).contains(&status) {
        return Err(HeadError::Malformed("invalid status"));
    }
    head.len = len;
    head.status = status;
    // httparse hands back a static "" (not a slice of `buf`) for an empty
    // or non-UTF-8 reason phrase; the phrase carries no meaning, so forward
    // an empty one then.
    head.reason = match res.reason {
        Some(r) if !r.is_empty() => Span::of(buf, r.as_bytes()),
        _ => Span::default(),
    };
    head.version = match res.version {
        Some(0) => Version::Http10,
        Some(1) => Version::Http11,
        _ => return Err(HeadError::Version),
    };
    record_headers(buf, res.headers, &mut head.headers);
    head.connection_names.clear();

    let mut f = FramingFields::default();
    for h in &head.headers {
        f.add(buf, h, &mut head.connection_names)?;
    }
    head.keep_alive = match head.version {
        Version::Http11 => !f.conn_close,
        Version::Http10 => f.conn_keep_alive && !f.conn_close,
    };
    if head.version == Version::Http10 && f.te_seen {
        // RFC 9112 6.1: framing of a 1.0 message with Transfer-Encoding is
        // faulty; read it as chunked but close the connection after it.
        head.keep_alive = false;
    }
    head.te_is_plain_chunked = f.te_plain_chunked;
    head.upgrade = f.upgrade;
    // RFC 9112 6.3, in order.
    head.framing = if request_method == Method::Head
        || (100..200).contains(&status)
        || status == 204
        || status == 304
    {
        BodyFraming::None
    } else if f.te_seen {
        if f.content_length.is_some() {
            return Err(HeadError::Framing(
                "both Content-Length and Transfer-Encoding",
            ));
        }
        if !f.te_chunked_last {
            // Rule 4 would read until close; a strict proxy refuses instead.
            return Err(HeadError::Framing(
                "chunked is not the final transfer-coding",
            ));
        }
        BodyFraming::Chunked
    } else {
        match f.content_length {
            Some(0) => BodyFraming::None,
            Some(n) => BodyFraming::Length(n),
            None => BodyFraming::CloseDelimited,
        }
    };
    if head.framing == BodyFraming::CloseDelimited {
        head.keep_alive = false;
    }
    Ok(Status::Complete(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(raw: &str) -> Result<(RequestHead, Status), HeadError> {
        let mut head = RequestHead::default();
        let st = parse_request(raw.as_bytes(), &HeadLimits::default(), &mut head)?;
        Ok((head, st))
    }

    macro_rules! rejects {
        ($name:ident, $raw:expr, $err:pat) => {
            #[test]
            fn $name() {
                let r = req($raw);
                assert!(
                    matches!(r, Err($err)),
                    "{:?}",
                    r.map(|(h, s)| (h.framing, s))
                );
            }
        };
    }

    macro_rules! frames {
        ($name:ident, $raw:expr, $framing:expr) => {
            #[test]
            fn $name() {
                let (head, st) = req($raw).expect("accepted");
                assert!(matches!(st, Status::Complete(_)));
                assert_eq!(head.framing, $framing);
            }
        };
    }

    frames!(
        get_no_body,
        "GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        BodyFraming::None
    );
    frames!(
        cl_body,
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n",
        BodyFraming::Length(5)
    );
    frames!(
        te_chunked,
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
        BodyFraming::Chunked
    );
    frames!(
        te_list_final_chunked,
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        BodyFraming::Chunked
    );
    frames!(
        te_split_fields,
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
        BodyFraming::Chunked
    );
    frames!(http10_no_host, "GET / HTTP/1.0\r\n\r\n", BodyFraming::None);

    rejects!(
        cl_and_te,
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        HeadError::Framing(_)
    );
    rejects!(
        duplicate_cl,
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
        HeadError::Framing(_)
    );
    rejects!(
        cl_list,
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n",
        HeadError::Framing(_)
    );
    rejects!(
        cl_sign,
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n",
        HeadError::Framing(_)
    );
    rejects!(
        cl_overflow,
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n",
        HeadError::Framing(_)
    );
    rejects!(
        te_not_final,
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        HeadError::Framing(_)
    );
    rejects!(
        te_identity,
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n",
        HeadError::Framing(_)
    );
    rejects!(
        te_double_chunked,
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        HeadError::Framing(_)
    );
    rejects!(
        te_http10,
        "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        HeadError::Framing(_)
    );
    rejects!(
        obs_fold,
        "GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
        HeadError::Malformed(_)
    );
    rejects!(
        bare_lf,
        "GET / HTTP/1.1\nHost: a\r\n\r\n",
        HeadError::Malformed(_)
    );
    rejects!(
        bare_cr_in_value,
        "GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
        HeadError::Malformed(_)
    );
    rejects!(
        space_before_colon,
        "GET / HTTP/1.1\r\nHost: a\r\nX : b\r\n\r\n",
        HeadError::Malformed(_)
    );
    rejects!(
        nul_in_value,
        "GET / HTTP/1.1\r\nHost: a\r\nX: a\0b\r\n\r\n",
        HeadError::Malformed(_)
    );
    rejects!(
        missing_host,
        "GET / HTTP/1.1\r\n\r\n",
        HeadError::MissingHost
    );
    rejects!(
        duplicate_host,
        "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        HeadError::Malformed(_)
    );
    rejects!(
        host_with_space,
        "GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
        HeadError::Malformed(_)
    );
    rejects!(
        http2_version,
        "GET / HTTP/2.0\r\nHost: a\r\n\r\n",
        HeadError::Version
    );

    #[test]
    fn underscored_framing_names_are_marked_shadowing() {
        let raw = "POST / HTTP/1.1\r\nHost: a\r\nTransfer_Encoding: chunked\r\nX_Custom: 1\r\n\r\n";
        let (head, _) = req(raw).unwrap();
        assert_eq!(head.framing, BodyFraming::None);
        assert_eq!(head.headers[1].kind, HeaderKind::Shadowing);
        assert_eq!(head.headers[2].kind, HeaderKind::Other);
        let long = format!("Proxy_{}", "x".repeat(40));
        assert_eq!(classify(long.as_bytes()), HeaderKind::Shadowing);
    }

    #[test]
    fn empty_or_non_utf8_reason_phrase() {
        for raw in [
            &b"HTTP/1.1 301\r\n\r\n"[..],
            b"HTTP/1.1 500 Ori\xebntatie\r\nContent-Length: 0\r\n\r\n",
        ] {
            let mut head = ResponseHead::default();
            parse_response(raw, 16384, Method::Get, &mut head).unwrap();
            assert!(head.reason.get(raw).is_empty());
        }
    }

    #[test]
    fn oversize_partial_head_is_431() {
        let mut raw = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
        while raw.len() < 20_000 {
            raw.push_str(&format!("X-Filler: {}\r\n", "a".repeat(1000)));
        }
        assert_eq!(req(&raw).unwrap_err(), HeadError::HeadTooLarge);
    }

    #[test]
    fn long_uri_is_414() {
        let raw = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(9000));
        assert_eq!(req(&raw).unwrap_err(), HeadError::UriTooLong);
        let partial = format!("GET /{}", "a".repeat(9000));
        assert_eq!(req(&partial).unwrap_err(), HeadError::UriTooLong);
    }

    #[test]
    fn too_many_headers_is_431() {
        let mut raw = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
        for i in 0..150 {
            raw.push_str(&format!("X-{i}: v\r\n"));
        }
        raw.push_str("\r\n");
        assert_eq!(req(&raw).unwrap_err(), HeadError::TooManyHeaders);
    }

    #[test]
    fn keep_alive_defaults() {
        assert!(
            req("GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                .unwrap()
                .0
                .keep_alive
        );
        assert!(
            !req("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                .unwrap()
                .0
                .keep_alive
        );
        assert!(!req("GET / HTTP/1.0\r\n\r\n").unwrap().0.keep_alive);
        assert!(
            req("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                .unwrap()
                .0
                .keep_alive
        );
    }

    #[test]
    fn connection_lists_hop_by_hop_names() {
        let raw =
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: X-Secret, keep-alive\r\nX-Secret: 1\r\n\r\n";
        let (head, _) = req(raw).unwrap();
        let x = head
            .headers
            .iter()
            .find(|h| h.name.get(raw.as_bytes()) == b"X-Secret")
            .unwrap();
        assert!(head.is_connection_listed(raw.as_bytes(), x.name));
    }

    #[test]
    fn an_upgrade_needs_http_1_1_and_connection_upgrade() {
        let offer = |raw: &str| {
            let (head, _) = req(raw).unwrap();
            head.upgrade
                .map(|s| String::from_utf8(s.get(raw.as_bytes()).to_vec()).unwrap())
        };
        assert_eq!(
            offer("GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n")
                .as_deref(),
            Some("websocket")
        );
        // Without `Connection: upgrade` the field is not an offer; in
        // HTTP/1.0 it is ignored (RFC 9110 7.8).
        assert_eq!(
            offer("GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n"),
            None
        );
        assert_eq!(
            offer("GET / HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"),
            None
        );
        // `upgrade` in Connection is not a field name to strip.
        let (head, _) =
            req("GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n")
                .unwrap();
        assert!(head.connection_names.is_empty());
        for bad in ["", "web socket", "websocket/", "a, , b"] {
            let raw = format!(
                "GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: {bad}\r\n\r\n"
            );
            assert!(req(&raw).is_err(), "{bad:?}");
        }
        assert!(
            req("GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\nUpgrade: h2c\r\n\r\n")
                .is_err()
        );
    }

    #[test]
    fn a_switch_answers_only_protocols_offered() {
        assert!(upgrade_answers(b"websocket", b"websocket"));
        assert!(upgrade_answers(b"WebSocket", b"h2c, websocket/13"));
        assert!(!upgrade_answers(b"h2c", b"websocket"));
        assert!(!upgrade_answers(b"websocket, h2c", b"websocket"));
        assert!(!upgrade_answers(b"", b"websocket"));
        let names: Vec<_> = upgrade_protocols(b"h2c, websocket/13,x").collect();
        assert_eq!(
            names,
            [Some(&b"h2c"[..]), Some(&b"websocket"[..]), Some(&b"x"[..])]
        );
        let r = res(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            Method::Get,
        )
        .unwrap();
        assert_eq!(r.framing, BodyFraming::None);
        assert!(r.upgrade.is_some());
    }

    #[test]
    fn absolute_form_routes_on_authority() {
        let raw = "GET http://example.com/x?y HTTP/1.1\r\nHost: other\r\n\r\n";
        let (head, _) = req(raw).unwrap();
        assert_eq!(head.routing_host(raw.as_bytes()), Some(&b"example.com"[..]));
        assert_eq!(head.path.get(raw.as_bytes()), b"/x?y");
    }

    #[test]
    fn partial_head_asks_for_more() {
        assert_eq!(
            req("GET / HTTP/1.1\r\nHost: a\r\n").unwrap().1,
            Status::Partial
        );
    }

    fn res(raw: &str, method: Method) -> Result<ResponseHead, HeadError> {
        let mut head = ResponseHead::default();
        parse_response(raw.as_bytes(), 16384, method, &mut head)?;
        Ok(head)
    }

    #[test]
    fn response_framing() {
        let r = res("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", Method::Get).unwrap();
        assert_eq!(r.framing, BodyFraming::Length(3));
        let r = res("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", Method::Head).unwrap();
        assert_eq!(r.framing, BodyFraming::None);
        let r = res(
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 3\r\n\r\n",
            Method::Get,
        )
        .unwrap();
        assert_eq!(r.framing, BodyFraming::None);
        let r = res("HTTP/1.1 200 OK\r\n\r\n", Method::Get).unwrap();
        assert_eq!(r.framing, BodyFraming::CloseDelimited);
        assert!(!r.keep_alive);
        let r = res(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            Method::Get,
        )
        .unwrap();
        assert_eq!(r.framing, BodyFraming::Chunked);
        assert!(
            res(
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
                Method::Get
            )
            .is_err()
        );
        assert!(
            res(
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
                Method::Get
            )
            .is_err()
        );
        assert!(res("HTTP/1.1 200 OK\nContent-Length: 3\r\n\r\n", Method::Get).is_err());
        assert!(
            res(
                "\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
                Method::Get
            )
            .is_err()
        );
        assert!(
            res(
                "\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
                Method::Get
            )
            .is_ok()
        );
    }

    #[test]
    fn carriage_returns_are_counted_eight_at_a_time_as_one_at_a_time() {
        let mut bytes = Vec::new();
        for i in 0..300u32 {
            bytes.push(match i % 7 {
                0 => b'\r',
                1 => 0x8d,
                2 => 0x0c,
                3 => b'\n',
                _ => (i * 31 % 256) as u8,
            });
            let slow = bytes.iter().filter(|&&b| b == b'\r').count();
            assert_eq!(count_cr(&bytes), slow, "{} bytes", bytes.len());
            assert_eq!(count_cr(&bytes[1..]), slow - 1, "{} bytes", bytes.len());
        }
    }

    #[test]
    fn a_byte_is_found_in_any_position() {
        let name = b"x-a-rather-long-header-name-here";
        for len in 0..name.len() {
            assert!(!has_byte(&name[..len], b'_'));
            for at in 0..len {
                let mut v = name[..len].to_vec();
                v[at] = b'_';
                assert!(has_byte(&v, b'_'), "{len} bytes, '_' at {at}");
                v[at] = b'_' | 0x80;
                assert!(!has_byte(&v, b'_'), "{len} bytes, 0xdf at {at}");
            }
        }
    }
}
