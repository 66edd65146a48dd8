//! Each matcher and action of the rule engine, through the running proxy,
//! with curl and Python's http.client as clients and the Python origin
//! behind it.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::*;

fn rules_config(origin: &str, log: &str) -> String {
    format!(
        r#"[server]
access_log = "{log}"

[[listener]]
listen = "127.0.0.1:0"

[upstream.app]
backends = ["tcp://{origin}"]

[[rule]]
request_headers = {{ set = {{ "X-Stacked" = "1" }} }}
response_headers = {{ add = {{ "X-Served-By" = "coregate" }} }}

[[rule]]
path_prefix = "/logged/"
log = ["method", "path", "query", "status", "upstream", "route", "latency", "bytes", "header:User-Agent"]

[[route]]
host = "api.example.com"
respond = {{ status = 200, body = "api\n" }}

[[route]]
host = ["*.example.com", "example.org"]
respond = {{ status = 200, body = "wild $host\n" }}

[[route]]
path = "/exact"
respond = {{ status = 200, body = "exact\n", headers = {{ "X-Kind" = "exact" }} }}

[[route]]
name = "users"
path_regex = '^/users/(\d+)(?P<rest>/.*)?$'
upstream = "app"
rewrite = "/echo/user/$1${{rest}}"

[[route]]
path_prefix = "/api/"
upstream = "app"
strip_prefix = "/api"

[[route]]
path = "/write"
methods = ["POST", "PUT"]
respond = {{ status = 201, body = "written\n" }}

[[route]]
header = [{{ name = "X-Canary", equals = "1" }}]
respond = {{ status = 200, body = "canary\n" }}

[[route]]
header = [{{ name = "User-Agent", regex = "^bot-" }}]
drop = "403"

[[route]]
query = [{{ name = "debug", present = true }}]
respond = {{ status = 200, body = "debug\n" }}

[[route]]
query = [{{ name = "q", equals = "two words" }}]
respond = {{ status = 200, body = "two words\n" }}

[[route]]
query = [{{ name = "id", regex = '^\d{{3}}$' }}]
respond = {{ status = 200, body = "three digits\n" }}

[[route]]
path_prefix = "/admin"
not = {{ client = ["10.0.0.0/8"] }}
drop = "403"

[[route]]
path_prefix = "/internal"
client = ["127.0.0.0/8", "::1"]
respond = {{ status = 200, body = "internal\n" }}

[[route]]
path = "/old"
redirect = {{ status = 301, location = "http://$http_host/new$is_args$query" }}

[[route]]
path = "/close"
drop = "close"

[[route]]
path_prefix = "/logged/"
upstream = "app"
rewrite = "/echo$path"

[[route]]
path_prefix = "/echo"
upstream = "app"
request_headers = {{ remove = ["X-Remove-Me"], add = {{ "X-Route" = "echo $method" }} }}
response_headers = {{ remove = ["Server"] }}
"#
    )
}

struct Setup {
    _origin: Proc,
    proxy: Proc,
    log: std::path::PathBuf,
}

fn setup() -> Setup {
    let origin = python_origin();
    let dir = temp_dir();
    let log = dir.join("access.log");
    let proxy = coregate(
        &rules_config(&origin.addr, &log.display().to_string()),
        &["--workers", "1"],
    );
    Setup {
        _origin: origin,
        proxy,
        log,
    }
}

fn body(args: &[&str]) -> String {
    String::from_utf8_lossy(&curl(args).stdout).into_owned()
}

#[test]
fn host_matchers_exact_wildcard_and_lists() {
    let s = setup();
    let url = format!("http://{}/", s.proxy.addr);
    assert_eq!(body(&["-H", "Host: API.example.com:8080", &url]), "api\n");
    assert_eq!(
        body(&["-H", "Host: a.b.example.com", &url]),
        "wild a.b.example.com\n"
    );
    assert_eq!(
        body(&["-H", "Host: example.org", &url]),
        "wild example.org\n"
    );
    // `*.example.com` is not example.com itself.
    assert_eq!(status_of(&["-H", "Host: example.com", &url]), 404);
}

#[test]
fn path_exact_regex_with_captures_and_prefix_strip() {
    let s = setup();
    let a = &s.proxy.addr;
    let out = curl(&["-i", &format!("http://{a}/exact")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("x-kind: exact") || text.contains("X-Kind: exact"),
        "{text}"
    );
    assert!(text.ends_with("exact\n"), "{text}");
    assert_eq!(status_of(&[&format!("http://{a}/exact/more")]), 404);

    let echo = echo_json(&curl(&[&format!("http://{a}/users/42/photos?size=2")]).stdout);
    assert_eq!(echo["path"], "/echo/user/42/photos?size=2");
    let echo = echo_json(&curl(&[&format!("http://{a}/users/7")]).stdout);
    assert_eq!(echo["path"], "/echo/user/7");
    assert_eq!(status_of(&[&format!("http://{a}/users/x7")]), 404);

    let echo = echo_json(&curl(&[&format!("http://{a}/api/echo/x?q=1")]).stdout);
    assert_eq!(echo["path"], "/echo/x?q=1");
}

#[test]
fn methods_headers_and_query_parameters() {
    let s = setup();
    let a = &s.proxy.addr;
    assert_eq!(
        status_of(&["-X", "POST", &format!("http://{a}/write")]),
        201
    );
    assert_eq!(status_of(&["-X", "PUT", &format!("http://{a}/write")]), 201);
    assert_eq!(status_of(&[&format!("http://{a}/write")]), 404);

    assert_eq!(
        body(&["-H", "X-Canary: 1", &format!("http://{a}/x")]),
        "canary\n"
    );
    assert_eq!(
        status_of(&["-H", "X-Canary: 2", &format!("http://{a}/x")]),
        404
    );
    assert_eq!(
        status_of(&["-A", "bot-crawler/1", &format!("http://{a}/x")]),
        403
    );

    assert_eq!(body(&[&format!("http://{a}/x?a=1&debug")]), "debug\n");
    assert_eq!(body(&[&format!("http://{a}/x?q=two+words")]), "two words\n");
    assert_eq!(
        body(&[&format!("http://{a}/x?q=two%20words")]),
        "two words\n"
    );
    assert_eq!(body(&[&format!("http://{a}/x?id=123")]), "three digits\n");
    assert_eq!(status_of(&[&format!("http://{a}/x?id=1234")]), 404);
}

#[test]
fn client_networks_negation_and_path_normalisation() {
    let s = setup();
    let a = &s.proxy.addr;
    // 127.0.0.1 is not in 10.0.0.0/8, so the negated rule drops.
    assert_eq!(status_of(&[&format!("http://{a}/admin/users")]), 403);
    assert_eq!(body(&[&format!("http://{a}/internal/x")]), "internal\n");
    // Spellings of /admin that a backend would serve as /admin.
    for sneaky in [
        "/%61dmin",
        "//admin",
        "/x/../admin",
        "/./admin/",
        "/%2E%2E/admin",
    ] {
        assert_eq!(
            status_of(&["--path-as-is", &format!("http://{a}{sneaky}")]),
            403,
            "{sneaky}"
        );
    }
    // What is forwarded is the normalised path.
    let echo = echo_json(&curl(&["--path-as-is", &format!("http://{a}/x/../echo//a%62c")]).stdout);
    assert_eq!(echo["path"], "/echo/abc");
}

#[test]
fn respond_redirect_drop_and_header_edits() {
    let s = setup();
    let a = &s.proxy.addr;
    let out = curl(&["-i", &format!("http://{a}/old?x=1")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("HTTP/1.1 301 Moved Permanently\r\n"),
        "{text}"
    );
    assert!(
        text.contains(&format!("Location: http://{a}/new?x=1\r\n")),
        "{text}"
    );
    // Stacking rules apply to fixed responses too.
    assert!(text.contains("X-Served-By: coregate\r\n"), "{text}");

    // drop = "close": no response at all (curl: empty reply).
    let out = curl(&[&format!("http://{a}/close")]);
    assert_eq!(out.status.code(), Some(52), "{out:?}");

    let out = curl(&["-i", "-H", "X-Remove-Me: 1", &format!("http://{a}/echo/h")]);
    let text = String::from_utf8_lossy(&out.stdout);
    let (head, json) = text.split_once("\r\n\r\n").expect("a head");
    let echo = echo_json(json.as_bytes());
    assert_eq!(header(&echo, "x-stacked"), Some("1"));
    assert_eq!(header(&echo, "x-route"), Some("echo GET"));
    assert_eq!(header(&echo, "x-remove-me"), None);
    assert!(head.contains("X-Served-By: coregate"), "{head}");
    assert!(!head.to_ascii_lowercase().contains("\nserver:"), "{head}");
}

/// Python's http.client on one keep-alive connection across several
/// routes: fixed responses keep the connection.
#[test]
fn python_client_keeps_alive_across_actions() {
    let s = setup();
    let script = format!(
        r#"
import http.client
c = http.client.HTTPConnection("{}", timeout=5)
out = []
for path in ["/exact", "/old", "/echo/x", "/nothing", "/exact"]:
    c.request("GET", path)
    r = c.getresponse()
    r.read()
    out.append(str(r.status))
print(" ".join(out))
"#,
        s.proxy.addr
    );
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .output()
        .expect("python3");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "200 301 200 404 200",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn logging_rule_writes_json_lines() {
    let s = setup();
    let a = &s.proxy.addr;
    let echo = echo_json(&curl(&["-A", "tester/1", &format!("http://{a}/logged/a?b=c")]).stdout);
    assert_eq!(echo["path"], "/echo/logged/a?b=c");
    // Not selected by the logging rule.
    curl(&[&format!("http://{a}/exact")]);
    let end = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let text = std::fs::read_to_string(&s.log).unwrap_or_default();
        if !text.is_empty() || Instant::now() > end {
            break text;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    let entry: serde_json::Value = serde_json::from_str(lines[0]).expect("a JSON line");
    assert_eq!(entry["method"], "GET");
    assert_eq!(entry["path"], "/logged/a");
    assert_eq!(entry["query"], "b=c");
    assert_eq!(entry["status"], 200);
    assert_eq!(entry["upstream"], format!("tcp://{}", s._origin.addr));
    assert!(
        entry["route"].as_str().unwrap().starts_with("route #"),
        "{entry}"
    );
    assert!(entry["latency"].as_f64().unwrap() > 0.0);
    assert!(entry["bytes"].as_u64().unwrap() > 100);
    assert_eq!(entry["headers"]["user-agent"], "tester/1");
}

#[test]
fn check_reports_bad_rules_with_line_key_and_regex_error() {
    let dir = temp_dir();
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        "[[listener]]\nlisten = \"127.0.0.1:0\"\n\n[[route]]\npath_regex = \"^/(a\"\nrespond = { status = 200 }\n\n\
         [[route]]\nhost = \"a b\"\nupstream = \"nowhere\"\n\n[[rule]]\nrespond = { status = 200 }\n\n\
         [[route]]\npath = \"/x\"\nrequest_headers = { set = { \"Content-Length\" = \"1\" } }\ndrop = \"maybe\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let file = path.display().to_string();
    for want in [
        format!("{file}:5: route.path_regex: bad regex \"^/(a\""),
        "unclosed group".to_string(),
        format!("{file}:9: route.host:"),
        format!("{file}:10: route.upstream: no upstream named \"nowhere\""),
        "rule.respond: a [[rule]] only edits headers".to_string(),
        "Content-Length is managed by coregate".to_string(),
        format!("{file}:18: route.drop:"),
    ] {
        assert!(err.contains(&want), "missing {want:?} in:\n{err}");
    }
}
