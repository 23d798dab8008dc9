//! The real `wsgate` binary as a child process: for what only a separate process shows (its own
//! memory, its own open-files limit, signals).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

pub struct GatewayProcess {
    child: Child,
    pub addr: SocketAddr,
    log: std::path::PathBuf,
    /// The line it printed on stdout once listening, as printed.
    listening_line: String,
}

impl GatewayProcess {
    /// Starts `wsgate --listen 127.0.0.1:0 ARGS` with `env` (and no other `WSGATE_*` variable but
    /// the engine under test), under an open-files limit of `open_files` when given; returns
    /// once it listens.
    pub fn start(args: &[&str], env: &[(&str, &str)], open_files: Option<u32>) -> Self {
        Self::launch(args, env, open_files, |_| {})
    }

    /// [`GatewayProcess::start`] in a sandbox without io_uring (see [`deny_io_uring`]).
    pub fn start_without_io_uring(args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::launch(args, env, None, deny_io_uring)
    }

    fn launch(
        args: &[&str],
        env: &[(&str, &str)],
        open_files: Option<u32>,
        sandbox: impl FnOnce(&mut Command),
    ) -> Self {
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
        cmd.env("WSGATE_LOG", "warn");
        // The engine under test reaches every gateway the suite starts.
        if let Ok(engine) = std::env::var("WSGATE_ENGINE") {
            cmd.env("WSGATE_ENGINE", engine);
        }
        cmd.envs(env.iter().copied());
        sandbox(&mut cmd);
        let mut child = cmd.spawn().expect("wsgate starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let listening_line = line.trim_end().to_owned();
        // With JSON logs the line is a JSON object whose message is the same words.
        let line = match serde_json::from_str::<serde_json::Value>(&line) {
            Ok(json) => json["fields"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            Err(_) => line,
        };
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
        GatewayProcess {
            child,
            addr,
            log,
            listening_line,
        }
    }

    /// The line it printed on stdout once listening.
    pub fn first_stdout_line(&self) -> String {
        self.listening_line.clone()
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
        super::redis_server::send_signal(self.pid(), "-TERM");
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

/// Makes `io_uring_setup` fail with EPERM in the child (and what it executes), as the default
/// seccomp profiles of container runtimes do: a seccomp filter installed before `exec`.
pub fn deny_io_uring(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // Load the system call's number; io_uring_setup gets EPERM, everything else passes.
    // (x86-64 numbering: the test machines'.)
    let code = |class: u32| class as u16;
    let filter = [
        libc::sock_filter {
            code: code(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS),
            jt: 0,
            jf: 0,
            k: 0,
        },
        libc::sock_filter {
            code: code(libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K),
            jt: 0,
            jf: 1,
            k: libc::SYS_io_uring_setup as u32,
        },
        libc::sock_filter {
            code: code(libc::BPF_RET | libc::BPF_K),
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        },
        libc::sock_filter {
            code: code(libc::BPF_RET | libc::BPF_K),
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ALLOW,
        },
    ];
    // SAFETY: between fork and exec the closure makes two system calls only; `filter` is
    // copied into the closure and outlives them.
    unsafe {
        cmd.pre_exec(move || {
            let program = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr().cast_mut(),
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &program as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A fresh path in the temporary directory.
fn tempfile_path(prefix: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()))
}
