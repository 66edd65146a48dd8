//! nginx as a real origin behind coregate.

use std::process::Command;

use crate::support::*;

/// nginx on 127.0.0.1:PORT serving fixed bodies, run in the foreground
/// from a temp prefix. `None` when nginx is not installed.
///
/// nginx cannot report a port it picked, so the test binds and listens
/// first and hands nginx the socket the way nginx hands its sockets to a
/// new binary (`NGINX="3;"`): no other process can take the port between.
/// nginx 1.22 takes inherited sockets only with a master process (without
/// one it crashes on them).
fn nginx_origin() -> Option<(Proc, u16)> {
    use std::os::fd::AsRawFd;
    let nginx = ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())?;
    let dir = temp_dir();
    let reserved = reserve_port();
    reserved.socket.listen(128).expect("listen");
    let port = reserved.port;
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    let conf = format!(
        "daemon off;\nmaster_process on;\nworker_processes 1;\nerror_log {dir}/logs/error.log;\npid {dir}/nginx.pid;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n\
         fastcgi_temp_path {dir}/fcgi;\n  uwsgi_temp_path {dir}/uwsgi;\n  scgi_temp_path {dir}/scgi;\n\
           server {{\n    listen 127.0.0.1:{port};\n\
             location /hello {{ return 200 \"hello from nginx\\n\"; }}\n\
             location /echo-method {{ return 200 \"$request_method $http_x_forwarded_for $http_via\\n\"; }}\n\
           }}\n}}\n",
        dir = dir.display()
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let mut cmd = Command::new(nginx);
    cmd.env("NGINX", "3;");
    pass_from_3(&mut cmd, vec![reserved.socket.as_raw_fd()]);
    let child = cmd
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
        .spawn()
        .ok()?;
    let proc_ = Proc {
        child,
        addr: format!("127.0.0.1:{port}"),
        dir,
    };
    // Connections queue on the socket from the start: nginx is up once
    // one is answered.
    let answered = raw_exchange(
        &proc_.addr,
        b"GET /hello HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(statuses(&answered.0), [200], "nginx: {}", proc_.stderr());
    Some((proc_, port))
}

#[test]
fn proxies_to_nginx() {
    let Some((nginx, _)) = nginx_origin() else {
        panic!("nginx is not installed; .ci/run installs it (apt-get install nginx-light)");
    };
    let proxy = proxy_to(&nginx, "", &[]);
    let out = curl(&[&format!("http://{}/hello", proxy.addr)]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from nginx\n");
    let out = curl(&[
        "-X",
        "DELETE",
        &format!("http://{}/echo-method", proxy.addr),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "DELETE 127.0.0.1 1.1 coregate\n"
    );
}
