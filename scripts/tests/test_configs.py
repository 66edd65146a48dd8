"""The configuration writers: what each proxy's text must say, and
coregate's own check of coregate's (where a built binary is at hand)."""
import json
import os
import subprocess

import pytest

from coregate_bench import ROOT, configs
from coregate_bench.configs import Site, request_path, route_patterns

BINARY = os.path.join(ROOT, "target", "debug", "coregate")
if not os.access(BINARY, os.X_OK):
    BINARY = None


def site(tmp_path, **kw):
    return Site(str(tmp_path), "127.0.0.1", 19301, 19300, **kw)


def test_one_route_is_the_root_prefix(tmp_path):
    s = site(tmp_path)
    assert route_patterns(s) == ["/"]
    assert request_path(s) == "/"


def test_the_request_matches_only_the_last_of_many_routes(tmp_path):
    import re
    s = site(tmp_path, routes=50, regex=True)
    path = request_path(s)
    assert [p for p in route_patterns(s) if re.search(p, path)] == [route_patterns(s)[-1]]
    prefixes = route_patterns(site(tmp_path, routes=50))
    assert [p for p in prefixes if path.startswith(p)] == [prefixes[-1]]


def test_nginx(tmp_path):
    text = configs.nginx(site(tmp_path, routes=3))
    assert "upstream origin { server 127.0.0.1:19300; keepalive 64;" in text
    assert "listen 127.0.0.1:19301 reuseport" in text
    assert "location /svc2/ { proxy_pass http://origin; }" in text
    assert "proxy_request_buffering off;" in text
    assert "master_process off;" in text
    assert text.count("{") == text.count("}")


def test_nginx_regex(tmp_path):
    text = configs.nginx(site(tmp_path, routes=2, regex=True))
    assert r"location ~ ^/svc1/(\w+)$ { proxy_pass http://origin; }" in text


# What `run` tunes in nginx and `tls` and `ws` leave at nginx's defaults,
# as their published figures (docs/bench/tls-bench-*, ws-bench-*) were.
RUN_TUNING = ["proxy_request_buffering", "client_body_buffer_size", "proxy_buffer_size", "proxy_buffers",
              "proxy_max_temp_file_size"]


def test_nginx_tls_is_what_tls_bench_measured(tmp_path):
    text = configs.nginx(site(tmp_path, conns=100, tls=("c.pem", "k.pem")))
    assert "listen 127.0.0.1:19301 ssl reuseport backlog=4096;" in text
    assert "ssl_certificate c.pem;\n  ssl_certificate_key k.pem;" in text
    assert "upstream origin { server 127.0.0.1:19300; keepalive 64; keepalive_requests 1000000; }" in text
    assert "worker_rlimit_nofile 1224;" in text and "worker_connections 1124;" in text
    assert [t for t in RUN_TUNING if t in text] == []
    assert text.count("{") == text.count("}")


def test_nginx_websocket_is_what_ws_bench_measured(tmp_path):
    text = configs.nginx(site(tmp_path, conns=100, websocket=True))
    assert "upstream ws { server 127.0.0.1:19300; }" in text  # no upstream keep-alive
    assert "proxy_set_header Upgrade $http_upgrade;" in text
    assert "map $http_upgrade $connection_upgrade { default upgrade; '' close; }" in text
    assert "proxy_read_timeout 3600s;" in text
    assert "worker_rlimit_nofile 1288;" in text and "worker_connections 1224;" in text
    assert [t for t in RUN_TUNING + ["keepalive_requests"] if t in text] == []
    assert text.count("{") == text.count("}")


@pytest.mark.parametrize("kind", [{"tls": ("c.pem", "k.pem")}, {"websocket": True}])
def test_nginx_tls_and_websocket_take_one_route(tmp_path, kind):
    with pytest.raises(ValueError):
        configs.nginx(site(tmp_path, routes=2, **kind))


def test_keepalive_timeout_reaches_every_proxy(tmp_path):
    s = site(tmp_path, conns=100, keepalive_timeout="300s")
    assert "  keepalive_timeout 300s;\n" in configs.nginx(s)
    assert 'keepalive_timeout = "300s"' in configs.coregate(s)
    assert "timeout http-keep-alive 300s" in configs.haproxy(s)
    assert "keepalive_timeout " not in configs.nginx(site(tmp_path))
    assert "keepalive_timeout =" not in configs.coregate(site(tmp_path))


def test_haproxy(tmp_path):
    assert "default_backend origin" in configs.haproxy(site(tmp_path))
    text = configs.haproxy(site(tmp_path, routes=3))
    assert f"map_beg({tmp_path}/haproxy-routes.map)" in text
    assert (tmp_path / "haproxy-routes.map").read_text() == "/svc0/ origin\n/svc1/ origin\n/svc2/ origin\n"
    assert "http-reuse always" in text
    assert "server o1 127.0.0.1:19300" in text
    with pytest.raises(ValueError):
        configs.haproxy(site(tmp_path, websocket=True))


def test_envoy(tmp_path):
    conf = json.loads(configs.envoy(site(tmp_path, routes=2, regex=True)))
    routes = conf["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "route_config"]["virtual_hosts"][0]["routes"]
    assert routes[-1]["match"] == {"safe_regex": {"regex": r"^/svc1/(\w+)$"}}


def test_coregate(tmp_path):
    text = configs.coregate(site(tmp_path, routes=2, regex=True, conns=20000, access_log=True))
    assert 'listen = "127.0.0.1:19301"' in text
    assert "max_connections = 21024" in text
    assert 'backends = ["tcp://127.0.0.1:19300"]' in text
    assert r"path_regex = '^/svc1/(\w+)$'" in text
    assert f'access_log = "{tmp_path}/access.log"' in text
    assert '[[rule]]\nlog = ["time", "method"' in text


@pytest.mark.skipif(BINARY is None, reason="no built coregate binary")
@pytest.mark.parametrize("kw", [{}, {"routes": 1000}, {"routes": 3, "regex": True}, {"access_log": True},
                                {"conns": 10000}, {"keepalive_timeout": "300s"}])
def test_coregate_checks_its_config(tmp_path, kw):
    path = tmp_path / "coregate.toml"
    path.write_text(configs.coregate(site(tmp_path, **kw)))
    out = subprocess.run([BINARY, "check", "--config", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
