//! The TLS record path of a server session (`coregate::tls::Session`):
//! arbitrary bytes from a client, in pieces of arbitrary size, must end in
//! plaintext, a failure with a reason, or a wait for more; never a panic.
//! The server has no certificate (its resolver declines), so a handshake
//! stops at the certificate; records, alerts and ClientHellos before it
//! are parsed as from any client.
#![no_main]

use std::sync::{Arc, OnceLock};

use coregate::tls::{Acceptor, Session};
use libfuzzer_sys::fuzz_target;
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig};
use rustls::sign::CertifiedKey;

#[derive(Debug)]
struct NoCertificate;

impl ResolvesServerCert for NoCertificate {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        None
    }
}

fn acceptor() -> &'static Acceptor {
    static ACCEPTOR: OnceLock<Acceptor> = OnceLock::new();
    ACCEPTOR.get_or_init(|| {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(NoCertificate));
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Acceptor {
            config: Arc::new(config),
            names: Vec::new(),
            expiry: Vec::new(),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let mut session = Session::new(acceptor()).expect("a session");
    let piece = usize::from(first) % 64 + 1;
    for chunk in rest.chunks(piece) {
        let mut plain = 0;
        if session.receive(chunk, |p| plain += p.len()).is_err() {
            session.flush();
            return;
        }
        session.flush();
    }
});
