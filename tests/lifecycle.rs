//! Start-up and stop: a taken port is refused, and stopping the gateway releases every
//! connection's state.

mod support;

use support::TestGateway;
use wsgate::Config;

#[tokio::test]
async fn a_port_in_use_is_refused_instead_of_shared() {
    let first = TestGateway::start(1);
    // SO_REUSEPORT would let a second gateway bind the same port and take half the connections.
    let config = Config {
        listen: first.addr,
        shards: 1,
        ..Config::default()
    };
    let err = wsgate::start(config)
        .err()
        .expect("second gateway on the same port");
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
    assert!(err.to_string().contains(&first.addr.to_string()), "{err}");
}

#[tokio::test]
async fn stopping_the_gateway_releases_every_connection() {
    let gw = TestGateway::start(2);
    let mut clients = Vec::new();
    for _ in 0..10 {
        let mut c = gw.client().await;
        c.join("lobby").await;
        clients.push(c);
    }
    gw.wait_for_connections(10).await;
    gw.gateway().shutdown();
    for mut c in clients {
        // Notices already sent, then the server's close (answered by tungstenite), then the end.
        let ended = tokio::time::timeout(support::PATIENCE, async {
            while let Some(Ok(msg)) = futures_util::StreamExt::next(&mut c.ws).await {
                assert!(msg.is_text() || msg.is_close(), "{msg:?}");
            }
        })
        .await;
        assert!(ended.is_ok(), "the connection ends when the gateway stops");
    }
    // Each connection's clean-up ran as its task ended: the gauges are back to zero.
    gw.wait_for_connections(0).await;
}
