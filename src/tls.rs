//! TLS with rustls (aws-lc-rs provider): the server configuration a
//! listener's certificates compile to, the certificate choice by SNI, the
//! client configuration for `https://` backends, and one connection's TLS
//! session (either side) driven without I/O.
//!
//! rustls's connection type is sans-I/O, which fits the native core: the
//! proxy hands [`Session::receive`] the ciphertext a receive completion
//! brought and gets plaintext back, and gets ciphertext to send from
//! [`Session::seal`] and [`Session::flush`]; nothing here blocks or
//! touches a socket.
//!
//! Resumption works whichever worker accepts the next connection: every
//! worker's connections share one `ServerConfig` (in the snapshot), so
//! they share its ticket keys (rotated by rustls's ticketer) and its
//! bounded session cache. Kernel TLS offload would send from the socket
//! once the handshake is done; this machine's kernel has no `tls` ULP, so
//! records are sealed here (the seam is [`Session::seal`]).
//!
//! Owns: loading certificates and keys, SNI matching, the handshake and
//! record layer of a session, and naming why a handshake failed. Does not
//! own: sockets, buffers or when to send (`proxy`), or where the files are
//! named (`config`).

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientConfig, ClientConnection};
use rustls::crypto::aws_lc_rs;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::pki_types::{ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig, ServerConnection};
use rustls::sign::CertifiedKey;
use rustls::{Connection, DigitallySignedStruct, SignatureScheme};

/// TLS sessions kept for resumption by ID (TLS 1.2), per listener.
const SESSION_CACHE: usize = 10_000;

/// Plaintext a session takes to seal at once: a pooled buffer's worth.
const SEAL_LIMIT: usize = 64 * 1024;

/// One certificate chain and its key, and the names it serves.
#[derive(Debug)]
struct Entry {
    key: Arc<CertifiedKey>,
}

/// The certificate for a ClientHello: the one whose names match its SNI
/// (exact names first, then `*.` wildcards one label deep), else the first.
#[derive(Debug)]
struct SniResolver {
    entries: Vec<Entry>,
    exact: HashMap<String, usize>,
    /// `example.com` for `*.example.com`.
    wildcard: HashMap<String, usize>,
}

impl SniResolver {
    fn pick(&self, sni: Option<&str>) -> usize {
        let Some(name) = sni.map(str::to_ascii_lowercase) else {
            return 0;
        };
        if let Some(&i) = self.exact.get(&name) {
            return i;
        }
        name.split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent).copied())
            .unwrap_or(0)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.entries[self.pick(hello.server_name())].key.clone())
    }
}

/// A listener's TLS: its rustls configuration, shared by every worker.
#[derive(Debug, Clone)]
pub struct Acceptor {
    pub config: Arc<ServerConfig>,
    /// The names of each certificate, in order (for `check` and logs).
    pub names: Vec<Vec<String>>,
    /// Each certificate's file and the end of its validity (seconds since
    /// the epoch; `None` when its date could not be read).
    pub expiry: Vec<(std::path::PathBuf, Option<i64>)>,
}

impl Acceptor {
    /// Certificates that expire within `within` seconds of `now` (or have
    /// expired): their file, names and notAfter.
    pub fn expiring(&self, now: i64, within: i64) -> Vec<(&Path, &[String], i64)> {
        self.expiry
            .iter()
            .zip(&self.names)
            .filter_map(|((file, end), names)| {
                end.filter(|&end| end - now < within)
                    .map(|end| (file.as_path(), &names[..], end))
            })
            .collect()
    }
}

/// One DER element at the start of `der` with tag `tag`: its contents,
/// and what follows it.
fn der_element(der: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, rest) = der.split_first()?;
    if t != tag {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |l, &b| l << 8 | usize::from(b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| rest.split_at(len))
}

/// Skip one DER element, whatever its tag.
fn der_skip(der: &[u8]) -> Option<&[u8]> {
    let tag = *der.first()?;
    der_element(der, tag).map(|(_, rest)| rest)
}

/// A certificate's notAfter (RFC 5280 4.1.2.5), in seconds since the epoch.
pub fn not_after(cert: &[u8]) -> Option<i64> {
    let (certificate, _) = der_element(cert, 0x30)?;
    let (tbs, _) = der_element(certificate, 0x30)?;
    // [0] version (optional), serial number, signature algorithm, issuer.
    let mut rest = tbs;
    if rest.first() == Some(&0xa0) {
        rest = der_skip(rest)?;
    }
    for _ in 0..3 {
        rest = der_skip(rest)?;
    }
    let (validity, _) = der_element(rest, 0x30)?;
    let after = der_skip(validity)?;
    let (text, year) = match der_element(after, 0x17) {
        // UTCTime: YYMMDDHHMMSSZ, years 1950-2049.
        Some((t, _)) => {
            let yy = digits(t.get(..2)?)?;
            (t.get(2..)?, if yy < 50 { 2000 + yy } else { 1900 + yy })
        }
        // GeneralizedTime: YYYYMMDDHHMMSSZ.
        None => {
            let (t, _) = der_element(after, 0x18)?;
            (t.get(4..)?, digits(t.get(..4)?)?)
        }
    };
    let field = |i: usize| text.get(i..i + 2).and_then(digits);
    let (month, day) = (field(0)?, field(2)?);
    let seconds = field(4)? * 3600 + field(6)? * 60 + field(8)?;
    Some(days_from_civil(year, month, day) * 86_400 + seconds)
}

fn digits(s: &[u8]) -> Option<i64> {
    s.iter().try_fold(0i64, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + i64::from(b - b'0'))
    })
}

/// Days from 1970-01-01 to a civil date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Load one certificate chain and its key. Errors name the file and why.
fn load(cert: &Path, key: &Path) -> Result<(Arc<CertifiedKey>, Vec<String>), String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in the file", cert.display()));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let provider = aws_lc_rs::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| format!("{}: {e}", key.display()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| format!("{} does not match {}: {e}", key.display(), cert.display()))?;
    let end = webpki::EndEntityCert::try_from(&certified.cert[0])
        .map_err(|e| format!("{}: {e:?}", cert.display()))?;
    let names = end.valid_dns_names().map(str::to_ascii_lowercase).collect();
    Ok((Arc::new(certified), names))
}

/// The server configuration for `certs` (certificate and key file
/// pairs): TLS 1.3 and 1.2 only, ALPN `http/1.1`, tickets and a session
/// cache for resumption, the certificate chosen by SNI.
pub fn acceptor(certs: &[(&Path, &Path)]) -> Result<Acceptor, String> {
    let mut resolver = SniResolver {
        entries: Vec::new(),
        exact: HashMap::new(),
        wildcard: HashMap::new(),
    };
    let mut all_names = Vec::new();
    let mut expiry = Vec::new();
    for (i, (cert, key)) in certs.iter().enumerate() {
        let (key, names) = load(cert, key)?;
        expiry.push((cert.to_path_buf(), not_after(&key.cert[0])));
        for name in &names {
            match name.strip_prefix("*.") {
                Some(parent) => resolver.wildcard.entry(parent.to_string()).or_insert(i),
                None => resolver.exact.entry(name.clone()).or_insert(i),
            };
        }
        resolver.entries.push(Entry { key });
        all_names.push(names);
    }
    if resolver.entries.is_empty() {
        return Err("no certificate".into());
    }
    let provider = Arc::new(aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    // A client offering ALPN without `http/1.1` (only `h2`) is refused
    // with `no_application_protocol`; one offering none is served.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE);
    config.ticketer = aws_lc_rs::Ticketer::new().map_err(|e| e.to_string())?;
    // TLS 1.3 tickets: two per handshake (rustls's default is 2 too, set
    // here so the choice is visible).
    config.send_tls13_tickets = 2;
    Ok(Acceptor {
        config: Arc::new(config),
        names: all_names,
        expiry,
    })
}

/// The client configuration for a group's `https://` backends: TLS 1.3
/// and 1.2, ALPN `http/1.1`, the server's certificate verified against
/// `ca` (a PEM file) or the system's roots, or not verified at all when
/// `verify` is false (its handshake signature still is). Sessions are
/// resumed from rustls's in-memory store, shared by every worker.
pub fn connector(ca: Option<&Path>, verify: bool) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?;
    let mut config = if verify {
        let mut roots = rustls::RootCertStore::empty();
        match ca {
            Some(file) => {
                for cert in CertificateDer::pem_file_iter(file)
                    .map_err(|e| format!("{}: {e}", file.display()))?
                {
                    let cert = cert.map_err(|e| format!("{}: {e}", file.display()))?;
                    roots
                        .add(cert)
                        .map_err(|e| format!("{}: {e}", file.display()))?;
                }
                if roots.is_empty() {
                    return Err(format!("{}: no certificate in the file", file.display()));
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(
                        "the system has no trusted CA certificates: set ca = \"FILE\" (or tls_verify = false)"
                            .into(),
                    );
                }
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
            .with_no_client_auth()
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// `tls_verify = false`: any certificate is accepted; the handshake's
/// signatures are still checked against the key it carries.
#[derive(Debug)]
struct Unverified(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Why a handshake (or a session) failed, for the counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Not TLS at all, or a malformed record or handshake message.
    Malformed,
    /// No version, cipher suite or ALPN protocol in common.
    Incompatible,
    /// The client sent an alert (it refused our certificate, say).
    Alert,
    /// The client closed or reset mid-handshake.
    Closed,
    /// The handshake did not finish within its timeout.
    Timeout,
    Other,
}

impl Failure {
    pub const ALL: [Failure; 6] = [
        Failure::Malformed,
        Failure::Incompatible,
        Failure::Alert,
        Failure::Closed,
        Failure::Timeout,
        Failure::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Failure::Malformed => "malformed",
            Failure::Incompatible => "incompatible",
            Failure::Alert => "alert",
            Failure::Closed => "closed",
            Failure::Timeout => "timeout",
            Failure::Other => "other",
        }
    }

    fn of(e: &rustls::Error) -> Failure {
        use rustls::Error as E;
        match e {
            E::InvalidMessage(_) | E::InappropriateMessage { .. } => Failure::Malformed,
            E::InappropriateHandshakeMessage { .. } | E::DecryptError => Failure::Malformed,
            E::PeerIncompatible(_) | E::NoApplicationProtocol => Failure::Incompatible,
            E::AlertReceived(_) => Failure::Alert,
            _ => Failure::Other,
        }
    }
}

/// What a receive brought, besides plaintext.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// The handshake completed with this receive.
    pub handshaken: bool,
    /// The client sent `close_notify`: no more plaintext will come.
    pub closed: bool,
}

/// One connection's TLS session (a client's to us, or ours to a backend),
/// and the ciphertext waiting to be sent.
pub struct Session {
    conn: Connection,
    /// Ciphertext to send; `sent` of it is out.
    pub out: Vec<u8>,
    pub sent: usize,
    /// Plaintext bytes the ciphertext in `out` carries: the caller counts
    /// them as sent once `out` is.
    pub carried: usize,
    /// The connection closes once what is queued is out: an alert after
    /// a failure (counted), or `close_notify` after a closing answer.
    pub closing: bool,
    handshaken: bool,
}

impl Session {
    /// The server side of a client's connection to a listener.
    pub fn new(acceptor: &Acceptor) -> Result<Session, rustls::Error> {
        let conn = ServerConnection::new(acceptor.config.clone())?;
        Ok(Session::of(Connection::Server(conn)))
    }

    /// The client side of a connection to a backend named `name`.
    pub fn client(
        config: &Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> Result<Session, rustls::Error> {
        let conn = ClientConnection::new(config.clone(), name)?;
        Ok(Session::of(Connection::Client(conn)))
    }

    fn of(mut conn: Connection) -> Session {
        conn.set_buffer_limit(Some(SEAL_LIMIT));
        Session {
            conn,
            out: Vec::new(),
            sent: 0,
            carried: 0,
            closing: false,
            handshaken: false,
        }
    }

    pub fn is_handshaking(&self) -> bool {
        !self.handshaken
    }

    /// Whether the session was resumed (a ticket or a cached session).
    pub fn resumed(&self) -> bool {
        self.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
    }

    /// `TLSv1.3` or `TLSv1.2`, once the handshake is done.
    pub fn version(&self) -> Option<&'static str> {
        match self.conn.protocol_version()? {
            rustls::ProtocolVersion::TLSv1_3 => Some("TLSv1.3"),
            rustls::ProtocolVersion::TLSv1_2 => Some("TLSv1.2"),
            _ => None,
        }
    }

    /// Take in ciphertext; every piece of plaintext it held goes to
    /// `plain`. On a failure the alert for the client is queued (send it
    /// with [`Session::flush`], then close).
    pub fn receive(
        &mut self,
        mut bytes: &[u8],
        mut plain: impl FnMut(&[u8]),
    ) -> Result<Received, Failure> {
        let mut got = Received::default();
        let mut scratch = [0u8; 16 * 1024];
        while !bytes.is_empty() {
            match self.conn.read_tls(&mut bytes) {
                // After the peer's close_notify rustls reads nothing more:
                // whatever follows it is dropped.
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    crate::debug!("TLS: {e}");
                    return Err(Failure::Other);
                }
            }
            let state = self.conn.process_new_packets().map_err(|e| {
                crate::debug!("TLS: {e}");
                Failure::of(&e)
            })?;
            if !self.handshaken && !self.conn.is_handshaking() {
                self.handshaken = true;
                got.handshaken = true;
            }
            let mut left = state.plaintext_bytes_to_read();
            while left > 0 {
                match self.conn.reader().read(&mut scratch) {
                    Ok(0) => break,
                    Ok(n) => {
                        plain(&scratch[..n]);
                        left = left.saturating_sub(n);
                    }
                    Err(_) => break,
                }
            }
            if state.peer_has_closed() {
                got.closed = true;
            }
        }
        Ok(got)
    }

    /// Seal plaintext into `out` (behind what it holds); how many bytes
    /// of `plain` were taken (at most [`SEAL_LIMIT`] at a time).
    pub fn seal(&mut self, plain: &[u8]) -> usize {
        let taken = std::io::Write::write(&mut self.conn.writer(), plain).unwrap_or(0);
        self.carried += taken;
        self.flush();
        taken
    }

    /// Move what the session has to send (handshake messages, alerts,
    /// sealed records) into `out`.
    pub fn flush(&mut self) {
        if self.sent == self.out.len() {
            self.out.clear();
            self.sent = 0;
        }
        while self.conn.wants_write() {
            if self.conn.write_tls(&mut self.out).is_err() {
                break;
            }
        }
    }

    /// Queue `close_notify`: the client learns the stream ended here and
    /// was not cut.
    pub fn close_notify(&mut self) {
        self.conn.send_close_notify();
        self.flush();
    }

    /// Ciphertext waits to be sent.
    pub fn pending(&self) -> bool {
        self.sent < self.out.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_count_days_from_the_epoch() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(days_from_civil(2026, 11, 30), 20_787);
        assert_eq!(digits(b"2049"), Some(2049));
        assert_eq!(digits(b"2x"), None);
        // A DER length in the long form, and one running past the input.
        assert_eq!(
            der_element(&[0x30, 0x81, 0x01, 0xaa], 0x30),
            Some((&[0xaa][..], &[][..]))
        );
        assert_eq!(der_element(&[0x30, 0x05, 0x00], 0x30), None);
        assert_eq!(not_after(b"not a certificate"), None);
    }

    /// Hand what `from` has to send to `to`; the plaintext it carried.
    fn pass(from: &mut Session, to: &mut Session) -> Result<(Vec<u8>, Received), Failure> {
        from.flush();
        let bytes = std::mem::take(&mut from.out);
        from.sent = 0;
        let mut plain = Vec::new();
        let got = to.receive(&bytes, |p| plain.extend_from_slice(p))?;
        Ok((plain, got))
    }

    #[test]
    fn a_session_pair_talks_and_nothing_after_close_notify_is_read() {
        let dir = std::env::temp_dir().join(format!("coregate-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("c.pem"), dir.join("c.key"));
        let made = std::process::Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-days", "1", "-subj", "/CN=unit.test"])
            .args(["-addext", "subjectAltName=DNS:unit.test"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("openssl");
        assert!(made.status.success());
        let acceptor = acceptor(&[(cert.as_path(), key.as_path())]).unwrap();
        assert_eq!(acceptor.names, [vec!["unit.test".to_string()]]);
        assert!(acceptor.expiring(0, 14 * 86_400).is_empty());
        let connector = connector(None, false).unwrap();
        let name = ServerName::try_from("unit.test").unwrap();
        let mut server = Session::new(&acceptor).unwrap();
        let mut client = Session::client(&connector, name).unwrap();
        for _ in 0..4 {
            pass(&mut client, &mut server).unwrap();
            pass(&mut server, &mut client).unwrap();
        }
        assert!(!server.is_handshaking() && !client.is_handshaking());
        assert_eq!(server.version(), Some("TLSv1.3"));
        client.seal(b"GET / HTTP/1.1\r\n\r\n");
        let (plain, got) = pass(&mut client, &mut server).unwrap();
        assert_eq!(plain, b"GET / HTTP/1.1\r\n\r\n");
        assert!(!got.closed);
        // close_notify, then bytes behind it in the same read: the end of
        // the stream, and the rest dropped (rustls reads nothing more
        // there; the loop once spun on it forever).
        client.close_notify();
        client.out.extend_from_slice(&[0x17; 9000]);
        let (plain, got) = pass(&mut client, &mut server).unwrap();
        assert!(plain.is_empty() && got.closed);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sni_picks_exact_then_wildcard_then_the_first() {
        let r = SniResolver {
            entries: Vec::new(),
            exact: [("a.test".to_string(), 1), ("b.test".to_string(), 2)].into(),
            wildcard: [("b.test".to_string(), 3)].into(),
        };
        assert_eq!(r.pick(Some("A.test")), 1);
        assert_eq!(r.pick(Some("b.test")), 2);
        assert_eq!(r.pick(Some("x.b.test")), 3);
        // A wildcard covers one label only.
        assert_eq!(r.pick(Some("y.x.b.test")), 0);
        assert_eq!(r.pick(Some("other.test")), 0);
        assert_eq!(r.pick(None), 0);
    }
}
