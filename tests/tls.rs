//! HTTPS listeners: real TLS clients (curl, `openssl s_client`, Python's
//! `ssl`) against coregate terminating TLS in front of the Python origin.
//! Certificates are made by each test with `openssl req` (ECDSA P-256,
//! self-signed, a few days valid): no key is committed.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

/// A self-signed certificate for `names` (the first is its CN) and its
/// key, in `dir`: (cert, key).
fn cert(dir: &Path, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
    cert_with(dir, file, names, &[])
}

/// [`cert`] with more `openssl req` arguments.
fn cert_with(dir: &Path, file: &str, names: &[&str], more: &[&str]) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{file}.pem"));
    let key = dir.join(format!("{file}.key"));
    let san = names
        .iter()
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(_) => format!("IP:{n}"),
            Err(_) => format!("DNS:{n}"),
        })
        .collect::<Vec<_>>()
        .join(",");
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args([
            "-nodes",
            "-days",
            "3",
            "-subj",
            &format!("/CN={}", names[0]),
        ])
        .args(["-addext", &format!("subjectAltName={san}")])
        .args(more)
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl req");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// coregate on `config`, waiting for every listener it prints: their
/// URLs, in order.
fn start_listeners(config: &str, listeners: usize) -> (Proc, Vec<String>) {
    let dir = temp_dir();
    let path = dir.join("coregate.toml");
    std::fs::write(&path, config).expect("write config");
    let mut cmd = Command::new(BIN);
    cmd.arg("run")
        .arg("--config")
        .arg(&path)
        .args(["--workers", "2"]);
    if let Ok(driver) = std::env::var("COREGATE_TEST_DRIVER") {
        cmd.args(["--driver", &driver]);
    }
    let (mut proxy, urls) = start_lines(cmd, "coregate listening on ", listeners, dir);
    proxy.addr = urls[0].rsplit('/').next().expect("an address").to_string();
    (proxy, urls)
}

/// One HTTPS listener with `certs` in front of `origin`, an admin socket
/// at `dir/admin.sock`, and `extra` config.
fn https_config(origin: &str, certs: &[(PathBuf, PathBuf)], dir: &Path, extra: &str) -> String {
    let list = certs
        .iter()
        .map(|(c, k)| {
            format!(
                "{{ cert = \"{}\", key = \"{}\" }}",
                c.display(),
                k.display()
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "[server]\nadmin_socket = \"{}\"\naccess_log = \"{}\"\n\n[[listener]]\nlisten = \"127.0.0.1:0\"\n\n\
         [listener.tls]\ncerts = [{list}]\nhandshake_timeout = \"1s\"\n\n\
         [upstream.app]\nbackends = [\"tcp://{origin}\"]\n\n{extra}\n[[route]]\nupstream = \"app\"\n",
        dir.join("admin.sock").display(),
        dir.join("access.log").display()
    )
}

/// curl over HTTPS to `name` (resolved to the proxy) trusting `ca`.
fn curl_https(proxy: &str, name: &str, ca: &Path, path: &str, more: &[&str]) -> Output {
    let port = proxy.rsplit(':').next().expect("a port");
    let resolve = format!("{name}:{port}:127.0.0.1");
    let url = format!("https://{name}:{port}{path}");
    let mut args = vec![
        "--cacert",
        ca.to_str().expect("a path"),
        "--resolve",
        &resolve,
    ];
    args.extend_from_slice(more);
    args.push(&url);
    curl(&args)
}

/// The status of GET `path` over HTTPS to `name` trusting `ca` (0 when
/// there is none), and what curl said on stderr.
fn https_status(proxy: &str, name: &str, ca: &Path, path: &str) -> (u16, String) {
    let out = curl_https(
        proxy,
        name,
        ca,
        path,
        &["-o", "/dev/null", "-w", "%{http_code}"],
    );
    let status = String::from_utf8_lossy(&out.stdout).parse().unwrap_or(0);
    (status, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `openssl s_client` with `args`, sending one request that asks the
/// proxy to close: it reads until the proxy closes (`-ign_eof`), so TLS
/// 1.3 tickets, sent before the answer, have all arrived. Everything it
/// printed.
fn s_client(addr: &str, args: &[&str]) -> String {
    let mut child = Command::new("openssl")
        .args(["s_client", "-ign_eof", "-connect", addr])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run openssl s_client");
    let mut stdin = child.stdin.take().expect("piped stdin");
    // A failed handshake ends s_client before it reads this: ignored.
    let _ = stdin.write_all(b"GET /echo HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n");
    drop(stdin);
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("s_client output");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn each_sni_name_gets_its_certificate_and_requests_say_https() {
    let origin = python_origin();
    let dir = temp_dir();
    let a = cert(&dir, "a", &["a.test"]);
    let b = cert(&dir, "b", &["b.test", "*.b.test"]);
    let log = "[[rule]]\nlog = [\"scheme\", \"status\"]\n";
    let (proxy, _) = start_listeners(
        &https_config(&origin.addr, &[a.clone(), b.clone()], &dir, log),
        1,
    );
    let out = curl_https(&proxy.addr, "a.test", &a.0, "/echo", &["-d", "hello"]);
    let echo = echo_json(&out.stdout);
    assert_eq!(
        echo["body_len"],
        5,
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(header(&echo, "X-Forwarded-Proto"), Some("https"));
    // b.test and a name under its wildcard verify against b's certificate
    // only: the one chosen by SNI.
    for name in ["b.test", "x.b.test"] {
        let (status, stderr) = https_status(&proxy.addr, name, &b.0, "/bytes?n=100000");
        assert_eq!(status, 200, "{name}: {stderr}");
    }
    let wrong = curl_https(&proxy.addr, "b.test", &a.0, "/echo", &[]);
    assert!(
        !wrong.status.success(),
        "b.test verified against a's certificate"
    );
    // No SNI, or a name no certificate has: the first certificate.
    let none = s_client(&proxy.addr, &["-noservername"]);
    assert!(
        none.contains("CN = a.test") || none.contains("CN=a.test"),
        "{none}"
    );
    let other = s_client(&proxy.addr, &["-servername", "c.test"]);
    assert!(
        other.contains("CN = a.test") || other.contains("CN=a.test"),
        "{other}"
    );
    // The access log tells TLS requests apart (lines are flushed every
    // 250 ms: polled).
    let end = Instant::now() + Duration::from_secs(10);
    let mut text = String::new();
    while Instant::now() < end && !text.contains("{\"scheme\":\"https\",\"status\":200}") {
        std::thread::sleep(Duration::from_millis(50));
        text = std::fs::read_to_string(dir.join("access.log")).unwrap_or_default();
    }
    assert!(
        text.contains("{\"scheme\":\"https\",\"status\":200}"),
        "{text}"
    );
}

#[test]
fn versions_alpn_and_resumption_as_openssl_sees_them() {
    let origin = python_origin();
    let dir = temp_dir();
    let a = cert(&dir, "a", &["a.test"]);
    let (proxy, _) = start_listeners(&https_config(&origin.addr, &[a], &dir, ""), 1);
    let old = s_client(&proxy.addr, &["-tls1_1"]);
    assert!(!old.contains("New, TLSv1.1"), "{old}");
    assert!(old.contains("alert") || old.contains("error"), "{old}");
    let alpn = s_client(&proxy.addr, &["-alpn", "h2,http/1.1"]);
    assert!(alpn.contains("ALPN protocol: http/1.1"), "{alpn}");
    let h2 = s_client(&proxy.addr, &["-alpn", "h2"]);
    assert!(h2.contains("no application protocol"), "{h2}");
    // Sessions resume whichever of the two workers accepts (tickets for
    // TLS 1.3, the session cache for TLS 1.2).
    for version in ["-tls1_3", "-tls1_2"] {
        let sess = dir.join(format!("session{version}"));
        let sess = sess.to_str().expect("a path");
        let first = s_client(&proxy.addr, &[version, "-sess_out", sess]);
        assert!(first.contains("New, TLSv1."), "{first}");
        for _ in 0..3 {
            let again = s_client(&proxy.addr, &[version, "-sess_in", sess]);
            assert!(again.contains("Reused, TLSv1."), "{version}: {again}");
        }
    }
    let total = stats_total(&dir.join("admin.sock"));
    assert!(total["tls_resumed"].as_u64().unwrap() >= 6, "{total}");
    assert_eq!(total["tls_failures"]["incompatible"], 2, "{total}");
}

#[test]
fn python_keeps_a_connection_alive_and_stats_count_the_handshake() {
    let origin = python_origin();
    let dir = temp_dir();
    let a = cert(&dir, "a", &["a.test"]);
    let (proxy, _) = start_listeners(
        &https_config(&origin.addr, std::slice::from_ref(&a), &dir, ""),
        1,
    );
    let port = proxy.addr.rsplit(':').next().unwrap();
    let script = format!(
        "import http.client, ssl, socket\n\
         ctx = ssl.create_default_context(cafile={cafile:?})\n\
         class C(http.client.HTTPSConnection):\n    def connect(self):\n        \
         self.sock = ctx.wrap_socket(socket.create_connection(('127.0.0.1', {port}), timeout=10), server_hostname='a.test')\n\
         c = C('a.test', {port}, context=ctx)\n\
         for i in range(3):\n    c.request('POST', '/echo', body=b'x' * 70000)\n    r = c.getresponse(); body = r.read()\n    print(r.status, len(body), c.sock.version())\n",
        cafile = a.0.to_str().unwrap()
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("python3");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(
        text.lines()
            .all(|l| l.starts_with("200 ") && l.ends_with("TLSv1.3")),
        "{text}"
    );
    let socket = dir.join("admin.sock");
    assert_eq!(stat_when(&socket, &["tls_handshakes"], |n| n == 1), 1);
    assert_eq!(stats_total(&socket)["tls_versions"]["TLSv1.3"], 1);
    // A closing answer ends with close_notify: read to the end with
    // ragged EOFs refused, the stream ends cleanly.
    let script = format!(
        "import socket, ssl\n\
         ctx = ssl.create_default_context(cafile={cafile:?})\n\
         s = ctx.wrap_socket(socket.create_connection(('127.0.0.1', {port}), timeout=10), server_hostname='a.test', suppress_ragged_eofs=False)\n\
         s.sendall(b'GET /echo HTTP/1.1\\r\\nHost: a\\r\\nConnection: close\\r\\n\\r\\n')\n\
         data = b''\n\
         while True:\n    part = s.recv(65536)\n    if not part: break\n    data += part\n\
         print(data.split(b' ')[1].decode(), 'clean end')\n",
        cafile = a.0.to_str().unwrap()
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("python3");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "200 clean end",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bytes_that_are_not_tls_and_stalled_handshakes_are_counted_and_closed() {
    let origin = python_origin();
    let dir = temp_dir();
    let a = cert(&dir, "a", &["a.test"]);
    let (proxy, _) = start_listeners(&https_config(&origin.addr, &[a], &dir, ""), 1);
    let socket = dir.join("admin.sock");
    // Plain HTTP to the TLS port: an alert record, then the close.
    let (got, closed) = raw_exchange(&proxy.addr, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
    assert!(closed, "{got:?}");
    assert_eq!(got.first(), Some(&0x15), "an alert record: {got:?}");
    assert_eq!(
        stat_when(&socket, &["tls_failures", "malformed"], |n| n == 1),
        1
    );
    // Silent after connecting, and a ClientHello cut short: both closed
    // at the handshake timeout (1 s here).
    let mut silent = TcpStream::connect(&proxy.addr).unwrap();
    let mut cut = TcpStream::connect(&proxy.addr).unwrap();
    cut.write_all(&[
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ])
    .unwrap();
    for s in [&mut silent, &mut cut] {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(s.read(&mut buf).unwrap_or(0), 0, "closed without an answer");
    }
    assert_eq!(
        stat_when(&socket, &["tls_failures", "timeout"], |n| n == 2),
        2
    );
    assert_eq!(stat_when(&socket, &["connections_open"], |n| n == 0), 0);
}

#[test]
fn a_reload_swaps_the_certificate_for_new_connections_only() {
    let origin = python_origin();
    let dir = temp_dir();
    let a = cert(&dir, "a", &["a.test"]);
    let a2 = cert(&dir, "a2", &["a.test"]);
    let (proxy, _) = start_listeners(
        &https_config(&origin.addr, std::slice::from_ref(&a), &dir, ""),
        1,
    );
    let port = proxy.addr.rsplit(':').next().unwrap().to_string();
    // A keep-alive connection opened before the reload, on the old
    // certificate, driven by Python between two requests.
    let script = format!(
        "import http.client, ssl, sys\n\
         ctx = ssl.create_default_context(cafile={cafile:?})\n\
         c = http.client.HTTPSConnection('127.0.0.1', {port}, context=ctx)\n\
         ctx.check_hostname = False\n\
         c.request('GET', '/echo'); r = c.getresponse(); r.read(); print(r.status, flush=True)\n\
         sys.stdin.readline()\n\
         c.request('GET', '/echo'); r = c.getresponse(); r.read(); print(r.status, flush=True)\n",
        cafile = a.0.to_str().unwrap()
    );
    let mut held = Command::new("python3")
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut lines = BufReader::new(held.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "200");
    let path = proxy.dir.join("coregate.toml");
    std::fs::write(
        &path,
        https_config(&origin.addr, std::slice::from_ref(&a2), &dir, ""),
    )
    .unwrap();
    let out = reload(&dir.join("admin.sock"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, stderr) = https_status(&proxy.addr, "a.test", &a2.0, "/echo");
    assert_eq!(status, 200, "{stderr}");
    let stale = curl_https(&proxy.addr, "a.test", &a.0, "/echo", &[]);
    assert!(
        !stale.status.success(),
        "a new connection still got the old certificate"
    );
    held.stdin.take().unwrap().write_all(b"\n").unwrap();
    assert_eq!(lines.next().unwrap().unwrap(), "200");
    let _ = held.wait();
}

#[test]
fn bad_certificates_and_keys_are_refused_with_file_line_and_key() {
    let dir = temp_dir();
    let a = cert(&dir, "a", &["a.test"]);
    let b = cert(&dir, "b", &["b.test"]);
    let check = |certs: &[(PathBuf, PathBuf)]| {
        let path = dir.join("check.toml");
        std::fs::write(&path, https_config("127.0.0.1:9", certs, &dir, "")).unwrap();
        let out = Command::new(BIN)
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // A key that is not the certificate's.
    let text = check(&[(a.0.clone(), b.1.clone())]);
    assert!(text.contains("check.toml:9: listener.tls.certs:"), "{text}");
    assert!(text.contains("does not match"), "{text}");
    // An unreadable file, named.
    let missing = dir.join("missing.pem");
    let text = check(&[a.clone(), (missing.clone(), a.1.clone())]);
    assert!(text.contains(&*missing.to_string_lossy()), "{text}");
    // A key file in place of a certificate.
    let text = check(&[(a.1.clone(), a.1.clone())]);
    assert!(text.contains("no certificate"), "{text}");
    // A good one that expires within 14 days (these are made for 3): a
    // warning that names its file and names.
    let path = dir.join("good.toml");
    std::fs::write(
        &path,
        https_config("127.0.0.1:9", &[a.clone(), b.clone()], &dir, ""),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for (file, name) in [(&a.0, "a.test"), (&b.0, "b.test")] {
        let start = format!(
            "warning: {}: the certificate for {name} expires in ",
            file.display()
        );
        // Three days from a second that may not have ended yet.
        let ok = ["2 days, 23 hours", "3 days, 0 hours"]
            .iter()
            .any(|left| text.contains(&format!("{start}{left}\n")));
        assert!(ok, "{text}");
    }
    // One that expired in 2020 (signed with `openssl ca`, which takes
    // dates): it loads, and the warning says so.
    let old = expired_cert(&dir);
    std::fs::write(
        &path,
        https_config("127.0.0.1:9", std::slice::from_ref(&old), &dir, ""),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = format!(
        "warning: {}: the certificate for old.test expired ",
        old.0.display()
    );
    assert!(out.status.success() && text.contains(&line), "{text}");
}

/// A certificate for `old.test` valid on 1 January 2020 only, signed by a
/// throwaway CA: (cert, key).
fn expired_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let ca = cert(dir, "old-ca", &["ca.test"]);
    let (csr, key, leaf) = (
        dir.join("old.csr"),
        dir.join("old.key"),
        dir.join("old.pem"),
    );
    let run = |args: &[&std::ffi::OsStr]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let os = |s: &str| std::ffi::OsString::from(s);
    run(&[
        &os("req"),
        &os("-new"),
        &os("-newkey"),
        &os("ec"),
        &os("-pkeyopt"),
        &os("ec_paramgen_curve:P-256"),
        &os("-nodes"),
        &os("-subj"),
        &os("/CN=old.test"),
        &os("-addext"),
        &os("subjectAltName=DNS:old.test"),
        &os("-keyout"),
        key.as_os_str(),
        &os("-out"),
        csr.as_os_str(),
    ]);
    std::fs::write(dir.join("index.txt"), "").unwrap();
    std::fs::write(dir.join("serial"), "01\n").unwrap();
    let conf = dir.join("ca.cnf");
    std::fs::write(
        &conf,
        format!(
            "[ca]\ndefault_ca = d\n[d]\ndatabase = {0}/index.txt\nnew_certs_dir = {0}\n\
             serial = {0}/serial\ndefault_md = sha256\npolicy = p\ncopy_extensions = copy\n\
             [p]\ncommonName = supplied\n",
            dir.display()
        ),
    )
    .unwrap();
    run(&[
        &os("ca"),
        &os("-batch"),
        &os("-config"),
        conf.as_os_str(),
        &os("-in"),
        csr.as_os_str(),
        &os("-out"),
        leaf.as_os_str(),
        &os("-cert"),
        ca.0.as_os_str(),
        &os("-keyfile"),
        ca.1.as_os_str(),
        &os("-startdate"),
        &os("20200101000000Z"),
        &os("-enddate"),
        &os("20200102000000Z"),
    ]);
    (leaf, key)
}

#[test]
fn a_redirect_rule_sends_plain_http_to_https() {
    let origin = python_origin();
    let dir = temp_dir();
    let a = cert(&dir, "a", &["a.test"]);
    let config = https_config(&origin.addr, std::slice::from_ref(&a), &dir, "")
        .replace(
            "[upstream.app]",
            "[[listener]]\nlisten = \"127.0.0.2:0\"\n\n[upstream.app]",
        )
        .replace(
            "[[route]]\nupstream = \"app\"",
            "[[route]]\nscheme = \"http\"\nredirect = { location = \"https://$host$request_uri\", status = 308 }\n\n\
             [[route]]\nupstream = \"app\"\nresponse_headers = { set = { \"X-Scheme\" = \"$scheme\" } }",
        );
    let (proxy, urls) = start_listeners(&config, 2);
    assert!(
        urls[0].starts_with("https://") && urls[1].starts_with("http://"),
        "{urls:?}"
    );
    let plain = urls[1].trim_start_matches("http://");
    let out = curl(&["-i", &format!("http://{plain}/echo?x=1")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/1.1 308"), "{text}");
    // `$host` is the host without its port: the HTTPS default port.
    assert!(
        text.contains("Location: https://127.0.0.2/echo?x=1\r\n"),
        "{text}"
    );
    let out = curl_https(&proxy.addr, "a.test", &a.0, "/echo", &["-i"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("X-Scheme: https"), "{text}");
}

/// The Python origin serving HTTPS with `cert`.
fn https_origin(cert: &(PathBuf, PathBuf)) -> Proc {
    let mut cmd = Command::new("python3");
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/origin.py"))
        .arg("--tls")
        .arg(&cert.0)
        .arg(&cert.1);
    let mut p = start(cmd, "READY", temp_dir());
    p.addr = format!("127.0.0.1:{}", p.addr);
    p
}

/// A plain listener in front of one `https://` backend with `tls` keys.
fn to_https_backend(origin: &str, tls: &str, dir: &Path) -> (Proc, PathBuf) {
    let socket = dir.join(format!("admin-{}.sock", tls.len()));
    let config = format!(
        "[server]\nadmin_socket = \"{}\"\n\n[[listener]]\nlisten = \"127.0.0.1:0\"\n\n\
         [upstream.app]\nbackends = [\"https://{origin}\"]\n{tls}\n\n[[route]]\nupstream = \"app\"\n",
        socket.display()
    );
    (coregate(&config, &["--workers", "1"]), socket)
}

#[test]
fn https_backends_are_verified_kept_alive_and_refused_when_wrong() {
    let dir = temp_dir();
    // A backend's own certificate is a leaf: a CA's would be refused as
    // an end entity (webpki's CaUsedAsEndEntity).
    let leaf = ["-addext", "basicConstraints=critical,CA:FALSE"];
    let backend = cert_with(&dir, "backend", &["127.0.0.1"], &leaf);
    let stranger = cert_with(&dir, "stranger", &["127.0.0.1"], &leaf);
    let origin = https_origin(&backend);
    // Verified against the backend's own certificate as the CA: requests
    // go through, on one kept-alive TLS connection.
    let ca = format!("ca = \"{}\"", backend.0.display());
    let (proxy, socket) = to_https_backend(&origin.addr, &ca, &dir);
    for i in 0..3 {
        let out = curl(&[
            "-d",
            &"y".repeat(100_000),
            &format!("http://{}/echo?{i}", proxy.addr),
        ]);
        let echo = echo_json(&out.stdout);
        assert_eq!(
            echo["body_len"],
            100_000,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let label = format!("app/https://{}", origin.addr);
    let total = stats_total(&socket);
    assert_eq!(total["upstreams"][&label]["connects"], 1, "{total}");
    assert_eq!(total["upstreams"][&label]["reuses"], 2, "{total}");
    // Another CA: the certificate does not verify, 502.
    let ca = format!("ca = \"{}\"", stranger.0.display());
    let (wrong, _) = to_https_backend(&origin.addr, &ca, &dir);
    assert_eq!(status_of(&[&format!("http://{}/echo", wrong.addr)]), 502);
    // Verification off, written out: it goes through.
    let (unverified, _) = to_https_backend(&origin.addr, "tls_verify = false", &dir);
    assert_eq!(
        status_of(&[&format!("http://{}/echo", unverified.addr)]),
        200
    );
    // TLS keys on a group without https:// backends are a mistake.
    let path = dir.join("plain.toml");
    std::fs::write(
        &path,
        format!(
            "[[listener]]\nlisten = \"127.0.0.1:0\"\n[upstream.app]\nbackends = [\"tcp://127.0.0.1:9\"]\n{ca}\n[[route]]\nupstream = \"app\"\n"
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("plain.toml:5: upstream.app.ca: only applies to https:// backends"),
        "{text}"
    );
}

#[test]
fn websockets_tunnel_through_a_tls_listener() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/ws.py");
    let mut cmd = Command::new("python3");
    cmd.arg(&script).arg("server");
    let mut ws_origin = start(cmd, "READY", temp_dir());
    ws_origin.addr = format!("127.0.0.1:{}", ws_origin.addr);
    let dir = temp_dir();
    let a = cert(&dir, "a", &["a.test"]);
    let (proxy, _) = start_listeners(
        &https_config(&ws_origin.addr, std::slice::from_ref(&a), &dir, ""),
        1,
    );
    let out = Command::new("python3")
        .arg(&script)
        .arg("client")
        .arg(format!("wss://{}/echo", proxy.addr))
        .args(["echo:200:11", "text:20", "ping", "close"])
        .env("WS_CA", &a.0)
        .env("WS_SERVER_NAME", "a.test")
        .output()
        .expect("ws.py client");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lines[0], "open");
    assert!(lines[1].starts_with("echoed 200 "), "{text}");
    assert_eq!(&lines[2..], ["texted 20", "pong", "closed 1000"]);
}
