//! Baseline for the benchmarks: a minimal tokio-tungstenite echo server (one task per
//! connection), on a current-thread runtime like one wsgate shard.
//! Dev-only: `cargo run --release --example baseline_tungstenite -- --listen 127.0.0.1:9002`.

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;

fn main() {
    // As wsgate does: the soft open-files limit up to the hard one, or accept fails past ~1k.
    rlimit::increase_nofile_limit(u64::MAX).expect("raise the open-files limit");
    // `--listen ADDR`, as wsgate takes it, so the benchmark scripts start both the same way.
    let addr = std::env::args()
        .nth(2)
        .unwrap_or_else(|| "127.0.0.1:9002".into());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let listener = TcpListener::bind(&addr).await.unwrap();
        println!(
            "baseline listening on http://{}/",
            listener.local_addr().unwrap()
        );
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_close() {
                        break;
                    }
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
}
