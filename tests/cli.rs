//! The `wsgate` binary's configuration: file < environment < flags, and clear refusals.

use std::process::Command;

mod support;

fn wsgate() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsgate"));
    // Keep the test independent of the developer's environment.
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("WSGATE_")) {
        cmd.env_remove(key);
    }
    cmd
}

fn print_config(cmd: &mut Command) -> toml::Table {
    let out = cmd.arg("--print-config").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    toml::from_str(&String::from_utf8(out.stdout).unwrap()).unwrap()
}

#[test]
fn defaults_need_no_file() {
    let config = print_config(&mut wsgate());
    assert_eq!(config["listen"].as_str(), Some("127.0.0.1:8080"));
    let cores = std::thread::available_parallelism().unwrap().get() as i64;
    assert_eq!(config["shards"].as_integer(), Some(cores));
    assert_eq!(config["max_message_size"].as_integer(), Some(65536));
    assert_eq!(config["max_rooms_per_connection"].as_integer(), Some(100));
    assert_eq!(config["presence_max_members"].as_integer(), Some(1000));
    assert_eq!(config["heartbeat_interval"].as_str(), Some("30s"));
    assert_eq!(config["allow_anonymous"].as_bool(), Some(false));
    assert!(config.get("jwt_secret").is_none(), "no key: dev mode");
}

#[test]
fn secrets_are_never_printed() {
    let config = print_config(
        wsgate()
            .env("WSGATE_JWT_SECRET", "a-very-secret-value-123")
            .env("WSGATE_API_KEY", "an-api-key-0123456789"),
    );
    assert_eq!(config["jwt_secret"].as_str(), Some("<redacted>"));
    assert_eq!(config["api_key"].as_str(), Some("<redacted>"));
    // An empty value is no key (an environment file's `WSGATE_API_KEY=`), not a short one.
    let config = print_config(wsgate().env("WSGATE_API_KEY", ""));
    assert!(config.get("api_key").is_none(), "{config:?}");
    let err = refused(wsgate().env("WSGATE_API_KEY", "short-key"));
    assert!(err.contains("api_key") && err.contains("16"), "{err}");
    assert!(!err.contains("short-key"), "{err}");
}

#[test]
fn dev_mode_serves_loopback_unless_told_otherwise() {
    // No key configured: a non-loopback address is refused at start-up...
    let err = refused(wsgate().args(["--listen", "0.0.0.0:0"]));
    assert!(
        err.contains("dev mode") && err.contains("dev_mode"),
        "{err}"
    );
    // ...unless asked for (checked without binding: --print-config validates and stops there).
    let config = print_config(wsgate().args(["--listen", "0.0.0.0:0", "--dev"]));
    assert_eq!(config["dev_mode"].as_bool(), Some(true));
    // With a key, any address.
    let config = print_config(
        wsgate()
            .args(["--listen", "0.0.0.0:0"])
            .env("WSGATE_JWT_SECRET", "a-very-secret-value-123"),
    );
    assert_eq!(config["listen"].as_str(), Some("0.0.0.0:0"));
}

#[test]
fn file_then_environment_then_flags() {
    let dir = std::env::temp_dir().join(format!("wsgate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("wsgate.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:9000\"\nshards = 3\nmax_message_size = 2048\nclose_timeout = \"2s\"\n",
    )
    .unwrap();
    let from_file = print_config(wsgate().arg("--config").arg(&file));
    assert_eq!(from_file["listen"].as_str(), Some("127.0.0.1:9000"));
    assert_eq!(from_file["shards"].as_integer(), Some(3));
    assert_eq!(from_file["close_timeout"].as_str(), Some("2s"));

    let env_over_file = print_config(
        wsgate()
            .arg("--config")
            .arg(&file)
            .env("WSGATE_SHARDS", "5")
            .env("WSGATE_MAX_MESSAGE_SIZE", "4096"),
    );
    assert_eq!(env_over_file["shards"].as_integer(), Some(5));
    assert_eq!(env_over_file["max_message_size"].as_integer(), Some(4096));

    let flags_over_env = print_config(
        wsgate()
            .env("WSGATE_CONFIG", &file)
            .env("WSGATE_SHARDS", "5")
            .args(["--shards", "7", "--listen", "127.0.0.1:9100"]),
    );
    assert_eq!(flags_over_env["shards"].as_integer(), Some(7));
    assert_eq!(flags_over_env["listen"].as_str(), Some("127.0.0.1:9100"));
    assert_eq!(flags_over_env["max_message_size"].as_integer(), Some(2048));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs with a bad setting; returns stderr, after checking for exit code 2 and a single line.
fn refused(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

#[test]
fn bad_values_stop_start_up_naming_the_key() {
    let err = refused(wsgate().env("WSGATE_SHARDS", "many"));
    assert!(err.contains("shards"), "{err}");
    // In words, not Rust's types; the choices quoted once.
    assert!(
        err.contains("expected a whole number") && !err.contains("usize"),
        "{err}"
    );
    let err = refused(wsgate().env("WSGATE_BROKER", "etcd"));
    assert!(
        err.contains("`memory` or `redis`") && !err.contains("``"),
        "{err}"
    );
    let err = refused(wsgate().env("WSGATE_SHARDS", "0"));
    assert!(
        err.contains("shards") && err.contains("between 1 and 1024"),
        "{err}"
    );
    let err = refused(wsgate().env("WSGATE_MAX_MESSAGE_SIZE", "10"));
    assert!(err.contains("max_message_size"), "{err}");
    let err = refused(wsgate().env("WSGATE_CLOSE_TIMEOUT", "soon"));
    assert!(err.contains("close_timeout"), "{err}");
    let err = refused(wsgate().env("WSGATE_NO_SUCH_KEY", "1"));
    assert!(
        err.contains("WSGATE_NO_SUCH_KEY") && err.contains("unknown key"),
        "{err}"
    );
    // The value given is echoed; a misspelt key gets the nearest real one, not a list of all.
    let err = refused(wsgate().env("WSGATE_SHARDS", "0"));
    assert!(err.contains("shards = 0"), "{err}");
    let err = refused(wsgate().env("WSGATE_MAX_CONECTIONS", "5"));
    assert!(err.contains("did you mean `max_connections`?"), "{err}");
    assert!(
        !err.contains("heartbeat_mode"),
        "not every key listed: {err}"
    );
    let err = refused(wsgate().env("WSGATE_JWT_SECRET", "short"));
    assert!(err.contains("jwt_secret"), "{err}");
    let err = refused(wsgate().env("WSGATE_JWT_PUBLIC_KEY_FILE", "/nonexistent.pem"));
    assert!(err.contains("jwt_public_key_file"), "{err}");
    let err = refused(wsgate().env("WSGATE_HEARTBEAT_MODE", "smoke-signals"));
    assert!(err.contains("heartbeat_mode"), "{err}");
    let err = refused(wsgate().args(["--config", "/nonexistent/wsgate.toml"]));
    assert!(err.contains("/nonexistent/wsgate.toml"), "{err}");
    let out = wsgate().args(["--shards", "x"]).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "clap's own usage errors exit 2 as well"
    );
}

#[test]
fn file_errors_name_the_file_and_line() {
    let dir = std::env::temp_dir().join(format!("wsgate-cli-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("wsgate.toml");
    std::fs::write(&file, "# tuned\nshards = 2\nmax_mesage_size = 1024\n").unwrap();
    let err = refused(wsgate().arg("--config").arg(&file));
    let expected = format!("{}, line 3: max_mesage_size", file.display());
    assert!(err.contains(&expected), "{err}");
    assert!(err.contains("did you mean `max_message_size`?"), "{err}");
    // A syntax error shows the line and a caret under the spot, on lines of their own.
    std::fs::write(&file, "shards = 2\nlisten = \n").unwrap();
    let out = wsgate().arg("--config").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains(&file.display().to_string())
            && err.contains("line 2")
            && err
                .lines()
                .any(|l| l.trim_start().starts_with('|') && l.contains('^')),
        "{err}"
    );
    std::fs::write(&file, "shards = \"two\"\n").unwrap();
    let err = refused(wsgate().arg("--config").arg(&file));
    assert!(
        err.contains("line 1: shards") && err.contains("\"two\""),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn raising_the_message_size_alone_just_works() {
    // The README's own example: the byte burst follows the message size unless set.
    let config = print_config(wsgate().env("WSGATE_MAX_MESSAGE_SIZE", "1048576"));
    assert_eq!(config["max_message_size"].as_integer(), Some(1 << 20));
    assert_eq!(config["rate_limit_burst_bytes"].as_integer(), Some(1 << 20));
}

#[test]
fn probe_fails_when_nothing_answers() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = wsgate()
        .args(["probe", &format!("http://127.0.0.1:{port}/readyz")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("wsgate probe"), "{stderr}");
    let out = wsgate()
        .args(["probe", "ftp://127.0.0.1/"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "only http:// and https://");
    // Flags about a URL's certificate without a URL are a usage error, not ignored.
    let out = wsgate().args(["probe", "--insecure"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

#[test]
fn probe_checks_liveness_by_default_and_readiness_when_asked() {
    // A cluster node whose Redis cannot be reached: it serves (alive) but is not ready. An image
    // health check that restarted it would drop every socket of every node during an outage.
    let gw = support::process::GatewayProcess::start(
        &[],
        &[
            ("WSGATE_BROKER", "redis"),
            ("WSGATE_REDIS_URL", "redis://127.0.0.1:1/"),
            ("WSGATE_JWT_SECRET", support::TEST_SECRET),
        ],
        None,
    );
    let probe = |extra: &[&str]| {
        wsgate()
            .env("WSGATE_LISTEN", gw.addr.to_string())
            .arg("probe")
            .args(extra)
            .output()
            .unwrap()
    };
    let alive = probe(&[]);
    assert_eq!(alive.status.code(), Some(0), "{alive:?}");
    let ready = probe(&["--ready"]);
    assert_eq!(ready.status.code(), Some(1), "{ready:?}");
    assert!(
        String::from_utf8_lossy(&ready.stderr).contains("/readyz"),
        "{ready:?}"
    );
}

#[test]
fn print_config_lists_unset_keys_too_and_masks_secrets() {
    let out = wsgate().arg("--print-config").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    for key in [
        "jwt_secret",
        "api_key",
        "metrics_key",
        "tls_cert_file",
        "tls_key_file",
    ] {
        assert!(
            text.lines().any(|l| l == format!("# {key} =")),
            "{key} is not shown: {text}"
        );
    }
    let out = wsgate()
        .arg("--print-config")
        .env("WSGATE_API_KEY", "an-api-key-of-some-length")
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("api_key = \"<redacted>\""), "{text}");
    assert!(!text.contains("an-api-key-of-some-length"), "{text}");
    assert!(!text.contains("# api_key ="), "{text}");
}

#[test]
fn help_says_how_every_key_is_set() {
    let out = wsgate().arg("--help").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8(out.stdout).unwrap();
    for words in ["--listen", "--shards", "WSGATE_<KEY>", "--print-config"] {
        assert!(help.contains(words), "{words} not in --help: {help}");
    }
}

/// `deploy/wsgate.toml`, the example production configuration: it loads as it is, it names every
/// key there is (a key added to the gateway and not to the example fails here), and with every
/// example line uncommented it still loads (no example value is out of range or mistyped).
#[test]
fn the_example_production_config_loads_and_names_every_key() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/wsgate.toml");
    // As in production: the secret from the environment.
    let secret = ("WSGATE_JWT_SECRET", "example-secret-0123456789abcdef");
    let loaded = print_config(wsgate().args(["--config", path]).env(secret.0, secret.1));
    assert_eq!(loaded["listen"].as_str(), Some("0.0.0.0:8080"));
    assert_eq!(loaded["log_format"].as_str(), Some("json"));

    let text = std::fs::read_to_string(path).unwrap();
    let defaults = serde_json::to_value(wsgate::Config::default()).unwrap();
    for key in defaults.as_object().unwrap().keys() {
        let named = text.lines().any(|line| {
            let line = line.trim_start_matches("# ");
            line.starts_with(&format!("{key} = ")) || line == format!("[{key}]")
        });
        assert!(named, "deploy/wsgate.toml does not name `{key}`");
    }

    // Every example uncommented; the table at the end replaces the URL-only form of its key.
    let (top, table) = text.split_at(text.find("# [").expect("a table example"));
    let table_key = &table[3..table.find(']').unwrap()];
    let uncomment = |part: &str| -> String {
        part.lines()
            .map(|line| line.strip_prefix("# ").unwrap_or(line))
            .filter(|line| line.contains(" = ") || line.starts_with('['))
            .map(|line| format!("{line}\n"))
            .collect()
    };
    let top: String = uncomment(top)
        .lines()
        .filter(|line| !line.starts_with(&format!("{table_key} = ")))
        .map(|line| format!("{line}\n"))
        .collect();
    let everything =
        std::env::temp_dir().join(format!("wsgate-every-key-{}.toml", std::process::id()));
    std::fs::write(&everything, format!("{top}{}", uncomment(table))).unwrap();
    // Loaded and checked as values (the key and certificate files it names do not exist here).
    let every = wsgate::Config::load(Some(&everything), &Default::default());
    std::fs::remove_file(&everything).unwrap();
    let every = every.unwrap();
    assert_eq!(every.shards, 2);
    assert!(every.tls_cert_file.is_some() && every.publish_proxy.is_some());
}

#[test]
fn a_proxy_in_the_environment_is_a_url_or_an_inline_table_and_empty_is_unset() {
    let config = print_config(
        wsgate()
            .env("WSGATE_CONNECT_PROXY", "")
            .env("WSGATE_PUBLISH_PROXY", "http://backend:3000/publish")
            .env(
                "WSGATE_JOIN_PROXY",
                r#"{url="http://backend:3000/join",on_error="allow",timeout="250ms"}"#,
            ),
    );
    assert!(config.get("connect_proxy").is_none(), "{config:?}");
    assert_eq!(
        config["publish_proxy"]["url"].as_str(),
        Some("http://backend:3000/publish")
    );
    assert_eq!(config["join_proxy"]["on_error"].as_str(), Some("allow"));
    assert_eq!(config["join_proxy"]["timeout"].as_str(), Some("250ms"));
    assert_eq!(
        config["join_proxy"]["max_in_flight"].as_integer(),
        Some(100)
    );
}
