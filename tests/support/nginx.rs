#![allow(dead_code)] // shared by test binaries, each using its part
//! A real nginx running the shipped `deploy/compose/nginx.conf`, rewritten only where a test must
//! (loopback addresses, a temporary prefix, one worker in the foreground). `scripts/test.sh`
//! installs nginx when the machine has none.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Nginx {
    pub addr: SocketAddr,
    /// The server API's port.
    pub api_addr: SocketAddr,
    /// The public server's TLS port, with `deploy/compose/tls.conf` included.
    pub tls_addr: Option<SocketAddr>,
    child: Child,
    prefix: PathBuf,
}

impl Nginx {
    /// nginx proxying to `upstreams` (the compose file's three nodes), listening on a free
    /// loopback port; returns once it accepts connections.
    pub fn start(upstreams: &[SocketAddr]) -> Self {
        Self::start_with(upstreams, None)
    }

    /// [`Nginx::start`], serving TLS too as `deploy/compose/tls.conf` says, with the certificate
    /// and key files `tls`.
    pub fn start_tls(upstreams: &[SocketAddr], tls: &(PathBuf, PathBuf)) -> Self {
        Self::start_with(upstreams, Some(tls))
    }

    fn start_with(upstreams: &[SocketAddr], tls: Option<&(PathBuf, PathBuf)>) -> Self {
        let free = || {
            TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
        };
        let (addr, api_addr) = (free(), free());
        let tls = tls.map(|files| (free(), files));
        let port = addr.port();
        let prefix =
            std::env::temp_dir().join(format!("wsgate-nginx-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&prefix).unwrap();
        let conf = prefix.join("nginx.conf");
        std::fs::write(
            &conf,
            loopback_config(upstreams, addr, api_addr, tls, &prefix),
        )
        .unwrap();
        let child = Command::new(binary())
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx runs (apt-get install nginx-light)");
        let mut nginx = Nginx {
            addr,
            api_addr,
            tls_addr: tls.map(|(tls_addr, _)| tls_addr),
            child,
            prefix,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            if let Ok(Some(status)) = nginx.child.try_wait() {
                panic!("nginx exited with {status}:\n{}", nginx.error_log());
            }
            assert!(
                Instant::now() < deadline,
                "nginx did not start:\n{}",
                nginx.error_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        nginx
    }

    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.prefix.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: the master takes its workers down with it (a killed master
        // leaves them running, holding the port).
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.prefix);
    }
}

fn binary() -> &'static str {
    // Debian installs it in /usr/sbin, which a non-root PATH may not have.
    if Command::new("nginx")
        .arg("-v")
        .stderr(Stdio::null())
        .status()
        .is_ok()
    {
        "nginx"
    } else {
        "/usr/sbin/nginx"
    }
}

/// The shipped configuration with the compose network replaced by loopback. Each replaced line
/// must be there: a change to the shipped file that this does not follow fails the test.
fn loopback_config(
    upstreams: &[SocketAddr],
    listen: SocketAddr,
    api_listen: SocketAddr,
    tls: Option<(SocketAddr, &(PathBuf, PathBuf))>,
    prefix: &std::path::Path,
) -> String {
    let shipped = include_str!("../../deploy/compose/nginx.conf");
    let mut config = String::new();
    // In the foreground (the test owns the process), its files under the prefix, one worker,
    // and within this machine's open-files cap.
    let prefix = prefix.display();
    config.push_str(&format!(
        "daemon off;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log info;\n"
    ));
    let mut replaced = 0;
    for line in shipped.lines() {
        let trimmed = line.trim();
        let rewritten = if trimmed.starts_with("worker_processes ") {
            Some("worker_processes 1;".to_owned())
        } else if trimmed.starts_with("worker_rlimit_nofile ") {
            Some("worker_rlimit_nofile 4096;".to_owned())
        } else if trimmed.starts_with("worker_connections ") {
            Some("worker_connections 1024;".to_owned())
        } else if trimmed.starts_with("server wsgate-1:8080") {
            Some(
                upstreams
                    .iter()
                    .map(|a| trimmed.replacen("wsgate-1:8080", &a.to_string(), 1))
                    .collect::<Vec<_>>()
                    .join("\n"),
            )
        } else if trimmed.starts_with("server wsgate-") {
            Some(String::new())
        } else if trimmed == "include /etc/nginx/wsgate-tls/*.conf;" {
            Some(match tls {
                Some(tls) => tls_config(tls),
                // As shipped: a glob that matches nothing (an empty directory).
                None => {
                    let empty = format!("{prefix}/wsgate-tls");
                    std::fs::create_dir_all(&empty).unwrap();
                    format!("include {empty}/*.conf;")
                }
            })
        } else if trimmed == "listen 8081;" {
            Some(format!("listen {api_listen};"))
        } else if trimmed == "listen 80;" {
            Some(format!(
                "listen {listen};\naccess_log off;\nclient_body_temp_path {prefix}/body;\n\
                 proxy_temp_path {prefix}/proxy;\nfastcgi_temp_path {prefix}/fastcgi;\n\
                 uwsgi_temp_path {prefix}/uwsgi;\nscgi_temp_path {prefix}/scgi;"
            ))
        } else {
            None
        };
        replaced += usize::from(rewritten.is_some());
        config.push_str(rewritten.as_deref().unwrap_or(line));
        config.push('\n');
    }
    assert_eq!(
        replaced, 9,
        "deploy/compose/nginx.conf changed shape:\n{shipped}"
    );
    config
}

/// The shipped `tls.conf` on loopback, with the test's certificate: every line it rewrites must
/// be there.
fn tls_config((listen, (cert, key)): (SocketAddr, &(PathBuf, PathBuf))) -> String {
    let shipped = include_str!("../../deploy/compose/tls.conf");
    let rewrites = [
        ("listen 443 ssl;", format!("listen {listen} ssl;")),
        (
            "ssl_certificate /etc/nginx/wsgate-tls/cert.pem;",
            format!("ssl_certificate {};", cert.display()),
        ),
        (
            "ssl_certificate_key /etc/nginx/wsgate-tls/key.pem;",
            format!("ssl_certificate_key {};", key.display()),
        ),
    ];
    let mut config = shipped.to_owned();
    for (from, to) in rewrites {
        assert!(
            config.contains(from),
            "deploy/compose/tls.conf changed:\n{shipped}"
        );
        config = config.replace(from, &to);
    }
    config
}
