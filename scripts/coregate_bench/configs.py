"""Configuration text for every proxy measured: nginx, HAProxy, Envoy and
coregate, each set up to do the same thing (a Site) in its own idiom.

nginx: upstream keepalive, request and response streaming without temp
files; HAProxy: `http-reuse always`, a `map_beg` lookup for many prefix
routes; Envoy: the router filter, circuit breakers raised; coregate:
defaults. Only nginx and coregate are written for TLS and WebSocket; for
those two, nginx keeps the configuration `tls` and `ws` were first
measured with (docs/bench/tls-bench-*, ws-bench-*): nginx's defaults and,
for WebSocket, the lines its documentation gives, without `run`'s tuning,
so that their figures stay comparable with the published ones.

An idle-memory measurement sets keepalive_timeout: the proxies' idle
timeouts (nginx 75 s, coregate 60 s) must not close the connections
while they are counted."""
import json
import resource
from dataclasses import dataclass


@dataclass
class Site:
    """What a proxy is set up to do, whatever its configuration language."""
    work: str  # the directory for the files the proxy itself writes
    addr: str
    port: int
    origin: int  # the origin's port on 127.0.0.1
    workers: int = 1
    routes: int = 1  # routes; requests go to the last one
    regex: bool = False  # regex routes rather than prefixes
    conns: int = 0  # idle connections (tunnels) it must hold besides the load
    tls: tuple = None  # (certificate, key) paths: HTTPS
    websocket: bool = False  # pass Upgrade through (nginx needs telling)
    access_log: bool = False  # coregate: a [[rule]] logging every request
    keepalive_timeout: str = None  # downstream idle timeout ("300s"); None: each proxy's default


def route_patterns(site):
    """The routes' prefixes, or regexes; the request path matches the last."""
    if site.regex:
        return [rf"^/svc{i}/(\w+)$" for i in range(site.routes)]
    if site.routes == 1:
        return ["/"]
    return [f"/svc{i}/" for i in range(site.routes)]


def request_path(site):
    return "/" if site.routes == 1 and not site.regex else f"/svc{site.routes - 1}/item"


def hard_nofile(want):
    """WANT, or the hard open-files limit where that is lower."""
    return min(want, resource.getrlimit(resource.RLIMIT_NOFILE)[1])


def unsupported(proxy, site):
    if site.tls or site.websocket:
        raise ValueError(f"no {proxy} configuration is written for TLS or WebSocket")


def nginx(site):
    if site.websocket:
        return nginx_websocket(site)
    if site.tls:
        return nginx_tls(site)
    conns = max(4096, site.conns + 1024)
    match = "~ " if site.regex else ""
    locations = "\n".join(f"    location {match}{p} {{ proxy_pass http://origin; }}" for p in route_patterns(site))
    w = site.work
    return f"""daemon off;
master_process {"on" if site.workers > 1 else "off"};
worker_processes {site.workers};
worker_rlimit_nofile {hard_nofile(conns * 2)};
error_log {w}/nginx-error.log error;
pid {w}/nginx.pid;
events {{ worker_connections {conns}; }}
http {{
  access_log off;
  keepalive_requests 1000000;
{nginx_keepalive_timeout(site)}  client_body_temp_path {w}/nginx-body; proxy_temp_path {w}/nginx-proxy;
  fastcgi_temp_path {w}/nginx-fcgi; uwsgi_temp_path {w}/nginx-uwsgi; scgi_temp_path {w}/nginx-scgi;
  # Stream bodies both ways rather than spool them to disk, as coregate does.
  proxy_request_buffering off;
  client_body_buffer_size 64k;
  proxy_buffer_size 16k;
  proxy_buffers 8 32k;
  proxy_max_temp_file_size 0;
  proxy_http_version 1.1;
  proxy_set_header Connection "";
  upstream origin {{ server 127.0.0.1:{site.origin}; keepalive 64; keepalive_requests 1000000; }}
  server {{
    listen {site.addr}:{site.port} reuseport backlog=4096;
{locations}
  }}
}}
"""


def nginx_keepalive_timeout(site):
    return f"  keepalive_timeout {site.keepalive_timeout};\n" if site.keepalive_timeout else ""


def one_route(proxy, site):
    if site.routes != 1 or site.regex:
        raise ValueError(f"{proxy} is written for TLS and WebSocket with one prefix route only")


def nginx_tls(site):
    """HTTPS as `tls` has measured it from the start: upstream keep-alive,
    otherwise nginx's defaults (request buffering, proxy buffers)."""
    one_route("nginx", site)
    w = site.work
    return f"""daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile {site.conns * 2 + 1024};
error_log {w}/nginx-error.log error;
pid {w}/nginx.pid;
events {{ worker_connections {site.conns + 1024}; }}
http {{
  access_log off;
  keepalive_requests 1000000;
{nginx_keepalive_timeout(site)}  client_body_temp_path {w}/nginx-body; proxy_temp_path {w}/nginx-proxy;
  fastcgi_temp_path {w}/nginx-fcgi; uwsgi_temp_path {w}/nginx-uwsgi; scgi_temp_path {w}/nginx-scgi;
  proxy_http_version 1.1;
  proxy_set_header Connection "";
  upstream origin {{ server 127.0.0.1:{site.origin}; keepalive 64; keepalive_requests 1000000; }}
  ssl_certificate {site.tls[0]};
  ssl_certificate_key {site.tls[1]};
  ssl_protocols TLSv1.2 TLSv1.3;
  ssl_session_cache shared:SSL:10m;
  ssl_session_tickets on;
  server {{
    listen {site.addr}:{site.port} ssl reuseport backlog=4096;
    location / {{ proxy_pass http://origin; }}
  }}
}}
"""


def nginx_websocket(site):
    """WebSocket as nginx's documentation sets it up (HTTP/1.1 upstream,
    the Upgrade and Connection lines), idle timeouts raised to coregate's
    hour; no upstream keep-alive: a tunnel is its own upstream connection."""
    one_route("nginx", site)
    # A tunnel holds a downstream and an upstream connection.
    conns = 2 * site.conns + 1024
    w = site.work
    return f"""daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile {conns + 64};
error_log {w}/nginx-error.log error;
pid {w}/nginx.pid;
events {{ worker_connections {conns}; }}
http {{
  access_log off;
{nginx_keepalive_timeout(site)}  client_body_temp_path {w}/nginx-body; proxy_temp_path {w}/nginx-proxy;
  fastcgi_temp_path {w}/nginx-fcgi; uwsgi_temp_path {w}/nginx-uwsgi; scgi_temp_path {w}/nginx-scgi;
  map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
  upstream ws {{ server 127.0.0.1:{site.origin}; }}
  server {{
    listen {site.addr}:{site.port} reuseport backlog=4096;
    location / {{
      proxy_pass http://ws;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_read_timeout 3600s;
      proxy_send_timeout 3600s;
    }}
  }}
}}
"""


def haproxy(site):
    unsupported("HAProxy", site)
    if site.regex:
        # Tried in order, as nginx and coregate try their regexes.
        routing = "\n".join(f"  use_backend origin if {{ path_reg '{p}' }}" for p in route_patterns(site))
    elif site.routes == 1:
        routing = "  default_backend origin"
    else:
        # The idiomatic way to route on many prefixes: one map lookup.
        with open(f"{site.work}/haproxy-routes.map", "w") as f:
            for p in route_patterns(site):
                f.write(f"{p} origin\n")
        routing = f"  use_backend %[path,map_beg({site.work}/haproxy-routes.map)]"
    idle = site.keepalive_timeout or "60s"
    return f"""global
  nbthread {site.workers}
  maxconn {max(4096, site.conns + 256)}
  log stderr format raw local0 err
defaults
  mode http
  timeout connect 5s
  timeout client {idle}
  timeout server 60s
  timeout http-keep-alive {idle}
  option http-keep-alive
  http-reuse always
frontend proxy
  bind {site.addr}:{site.port}
{routing}
backend origin
  server o1 127.0.0.1:{site.origin}
"""


def envoy(site):
    unsupported("Envoy", site)
    key = "safe_regex" if site.regex else "prefix"
    routes = [{"match": {key: {"regex": p} if site.regex else p}, "route": {"cluster": "origin"}}
              for p in route_patterns(site)]
    manager = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
                 "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "proxy",
        "codec_type": "HTTP1",
        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
        "http_filters": [{
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        }],
    }
    conf = {"static_resources": {
        "listeners": [{
            "name": "proxy",
            "address": {"socket_address": {"address": site.addr, "port_value": site.port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": manager}]}],
        }],
        "clusters": [{
            "name": "origin",
            "connect_timeout": "1s",
            "type": "STATIC",
            # The defaults (1,024) would queue the idle-connection test.
            "circuit_breakers": {"thresholds": [{
                "max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000}]},
            "load_assignment": {"cluster_name": "origin", "endpoints": [{"lb_endpoints": [{
                "endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": site.origin}}}}]}]},
        }],
    }}
    return json.dumps(conf, indent=1)


# What the access-log variant logs per request.
LOG_FIELDS = ["time", "method", "path", "status", "latency", "upstream", "bytes"]


def coregate(site):
    out = []
    if site.access_log:
        out.append(f'[server]\naccess_log = "{site.work}/access.log"\n')
    keepalive = f'keepalive_timeout = "{site.keepalive_timeout}"\n' if site.keepalive_timeout else ""
    out.append(f'[[listener]]\nlisten = "{site.addr}:{site.port}"\n'
               f"max_connections = {max(10000, site.conns + 1024)}\n{keepalive}")
    if site.tls:
        out.append(f'[listener.tls]\ncerts = [{{ cert = "{site.tls[0]}", key = "{site.tls[1]}" }}]\n')
    out.append(f'[upstream.origin]\nbackends = ["tcp://127.0.0.1:{site.origin}"]\n')
    for p in route_patterns(site):
        # A TOML literal string: the regex's backslashes stay as they are.
        match = f"path_regex = '{p}'" if site.regex else f'path_prefix = "{p}"'
        out.append(f'[[route]]\n{match}\nupstream = "origin"\n')
    if site.access_log:
        out.append("[[rule]]\nlog = [" + ", ".join(f'"{f}"' for f in LOG_FIELDS) + "]\n")
    return "\n".join(out)


WRITERS = {"nginx": (nginx, "conf"), "haproxy": (haproxy, "cfg"), "envoy": (envoy, "json"),
           "coregate": (coregate, "toml")}
