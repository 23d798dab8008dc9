//! Baseline for the benchmarks: a minimal fastwebsockets echo server (hyper upgrade, one task
//! per connection, `FragmentCollector`), on a current-thread runtime like one wsgate shard.
//! Dev-only: `cargo run --release --example baseline_fastwebsockets -- --listen 127.0.0.1:9001`.

use std::convert::Infallible;

use bytes::Bytes;
use fastwebsockets::{FragmentCollector, OpCode, upgrade};
use http_body_util::Empty;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

async fn echo(fut: upgrade::UpgradeFut) {
    let Ok(ws) = fut.await else { return };
    let mut ws = FragmentCollector::new(ws);
    while let Ok(frame) = ws.read_frame().await {
        if frame.opcode == OpCode::Close {
            break;
        }
        let data = matches!(frame.opcode, OpCode::Text | OpCode::Binary);
        if data && ws.write_frame(frame).await.is_err() {
            break;
        }
    }
}

async fn handle(
    mut req: Request<hyper::body::Incoming>,
) -> Result<Response<Empty<Bytes>>, Infallible> {
    match upgrade::upgrade(&mut req) {
        Ok((response, fut)) => {
            tokio::spawn(echo(fut));
            Ok(response)
        }
        Err(_) => Ok(Response::builder().status(400).body(Empty::new()).unwrap()),
    }
}

fn main() {
    // As wsgate does: the soft open-files limit up to the hard one, or accept fails past ~1k.
    rlimit::increase_nofile_limit(u64::MAX).expect("raise the open-files limit");
    // `--listen ADDR`, as wsgate takes it, so the benchmark scripts start both the same way.
    let addr = std::env::args()
        .nth(2)
        .unwrap_or_else(|| "127.0.0.1:9001".into());
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
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(handle))
                    .with_upgrades()
                    .await;
            });
        }
    });
}
