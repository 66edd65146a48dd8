//! nginx as a real origin behind coregate.

use std::process::Command;

use crate::support::*;

/// nginx on 127.0.0.1:PORT serving fixed bodies, run in the foreground
/// from a temp prefix. `None` when nginx is not installed.
fn nginx_origin() -> Option<(Proc, u16)> {
    let nginx = ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())?;
    let dir = temp_dir();
    let port = free_port();
    std::fs::create_dir_all(dir.join("logs")).unwrap();
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\nerror_log {dir}/logs/error.log;\npid {dir}/nginx.pid;\n\
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
    let child = Command::new(nginx)
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
    for _ in 0..100 {
        if std::net::TcpStream::connect(&proc_.addr).is_ok() {
            return Some((proc_, port));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("nginx did not start: {}", proc_.stderr());
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
