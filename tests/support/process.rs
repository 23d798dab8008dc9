//! The real `wsgate` binary as a child process: for what only a separate process shows (its own
//! memory, its own open-files limit, signals).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

pub struct GatewayProcess {
    child: Child,
    pub addr: SocketAddr,
    log: std::path::PathBuf,
}

impl GatewayProcess {
    /// Starts `wsgate --listen 127.0.0.1:0 ARGS` with `env` (and no other `WSGATE_*` variable),
    /// under an open-files limit of `open_files` when given; returns once it listens.
    pub fn start(args: &[&str], env: &[(&str, &str)], open_files: Option<u32>) -> Self {
        let binary = env!("CARGO_BIN_EXE_wsgate");
        // `ulimit -n` in the shell sets the soft and hard limits the gateway then starts under.
        let limit = open_files.map_or(String::new(), |n| format!("ulimit -n {n} && "));
        // Logs go to a file, read back if start-up fails.
        let log = tempfile_path("wsgate-stderr");
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!(r#"{limit}exec "$0" "$@""#))
            .arg(binary)
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap());
        for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("WSGATE_")) {
            cmd.env_remove(key);
        }
        cmd.env("WSGATE_LOG", "warn").envs(env.iter().copied());
        let mut child = cmd.spawn().expect("wsgate starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("wsgate listening on ")
            .and_then(|url| url.split_once("://"))
            .map(|(_, rest)| rest)
            .and_then(|a| a.strip_suffix('/'))
            .unwrap_or_else(|| {
                let stderr = std::fs::read_to_string(&log).unwrap_or_default();
                panic!("wsgate did not start: {line:?}\n{stderr}")
            })
            .parse()
            .unwrap();
        GatewayProcess { child, addr, log }
    }

    /// What the gateway has logged so far (its stderr).
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory, in bytes.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse().ok())
            .expect("VmRSS in /proc/PID/status");
        kb * 1024
    }

    /// Sends SIGTERM and waits for the exit code.
    pub fn terminate(mut self) -> Option<i32> {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        self.child.wait().unwrap().code()
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A fresh path in the temporary directory.
fn tempfile_path(prefix: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()))
}
