#![allow(dead_code)] // shared by test binaries, each using its part
//! A real `redis-server` on a free loopback port, started and stopped by the test (`.ci/run`
//! installs it when the machine has none).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    /// Its working directory (the append-only file, when persistent).
    dir: PathBuf,
    persistent: bool,
}

impl RedisServer {
    /// A Redis that keeps nothing on disk: a restart loses every room.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// A Redis with an append-only file fsynced on every write: a restart loses nothing.
    pub fn start_persistent() -> Self {
        Self::start_with(true)
    }

    fn start_with(persistent: bool) -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("wsgate-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = RedisServer {
            port,
            child: None,
            dir,
            persistent,
        };
        server.spawn();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn spawn(&mut self) {
        let appendonly = if self.persistent { "yes" } else { "no" };
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            // DEBUG RELOAD: Redis back on its snapshot without dropping its clients.
            .args(["--enable-debug-command", "local"])
            .args([
                "--save",
                "",
                "--appendonly",
                appendonly,
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.try_query::<String>(&mut redis::cmd("PING")).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9`: no shutdown, no final save.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (and, when persistent, with its data; otherwise with its
    /// last `save`, if any).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn try_query<T: redis::FromRedisValue>(&self, cmd: &mut redis::Cmd) -> redis::RedisResult<T> {
        let client = redis::Client::open(self.url())?;
        // A signal to the test process (a child gateway exiting) interrupts the connect's wait
        // (EINTR, which `poll` never restarts): tried again.
        let mut tries = 0;
        let mut conn = loop {
            match client.get_connection_with_timeout(Duration::from_secs(2)) {
                Err(e) if tries < 3 && e.to_string().contains("Interrupted system call") => {
                    tries += 1;
                }
                connected => break connected?,
            }
        };
        cmd.query(&mut conn)
    }

    /// Runs one command.
    pub fn query<T: redis::FromRedisValue>(&self, cmd: &mut redis::Cmd) -> T {
        self.try_query(cmd).expect("redis answers")
    }

    /// The cluster's generation (see `era.lua`).
    pub fn generation(&self) -> String {
        self.query(redis::cmd("HGET").arg("wsgate:era").arg("gen"))
    }

    /// The name of a room's key of `kind` (`meta`, `history`, `presence`, `members`) in the
    /// cluster's generation.
    pub fn room_key(&self, kind: &str, room: &str) -> String {
        format!("wsgate:{}:{kind}:{{{room}}}", self.generation())
    }

    /// The index of rooms with members, in the cluster's generation.
    pub fn rooms_key(&self) -> String {
        format!("wsgate:{}:rooms", self.generation())
    }

    /// `SAVE`: a snapshot that a restart loads (the data written after it is lost then).
    pub fn save(&self) {
        let _: String = self.query(&mut redis::cmd("SAVE"));
    }

    /// Stops the process (SIGSTOP): connections stay open and nothing is answered.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Continues it (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        send_signal(self.child.as_ref().expect("running").id(), signal);
    }

    /// Clients subscribed to `channel`.
    pub fn subscribers(&self, channel: &str) -> u64 {
        let (_, count): (String, u64) = self.query(redis::cmd("PUBSUB").arg("NUMSUB").arg(channel));
        count
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Sends `signal` (`-STOP`, `-CONT`, `-TERM`, …) to process `pid` (here, as the load generator's
/// tests include this file alone).
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(signal)
        .arg(pid.to_string())
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {signal} {pid}");
}
