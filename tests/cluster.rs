//! Nodes joined by a real `redis-server`: every member of a room, whichever node it is on, gets
//! each room message once, in one order, with the offsets Redis gave them; a node with no member
//! in a room is not subscribed to it; a client recovers on another node with `since`; Redis going
//! away keeps sockets open, refuses publishes with an error and flips readiness, and rooms catch
//! up (or are told to `resync`) when it is back.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use support::cluster::*;
use support::redis_server::RedisServer;
use support::{Client, PATIENCE, TestGateway, api, http_get};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wsgate::config::BrokerKind;
use wsgate::server::DisconnectError;

#[tokio::test]
async fn members_on_three_nodes_get_every_message_once_in_one_order() {
    const EACH: usize = 100;
    let redis = RedisServer::start();
    let nodes = cluster(&redis, &[2, 2, 1]).await;
    let mut members = Vec::new();
    for n in &nodes {
        for _ in 0..2 {
            let mut c = n.client().await;
            c.join("order").await;
            members.push(c);
        }
    }
    // One publisher on each node, all at once.
    let mut p2 = members.remove(4);
    let mut p1 = members.remove(2);
    let mut p0 = members.remove(0);
    tokio::join!(
        send_all(&mut p0, "a", EACH),
        send_all(&mut p1, "b", EACH),
        send_all(&mut p2, "c", EACH)
    );
    members.extend([p0, p1, p2]);
    let mut seen = Vec::new();
    for member in &mut members {
        seen.push(member.chats(3 * EACH).await);
    }
    for (offset, expected) in seen[0].iter().map(|(o, _)| *o).zip(1..) {
        assert_eq!(offset, expected, "gap-free offsets from 1");
    }
    for other in &seen[1..] {
        assert_eq!(*other, seen[0], "the same order for every member");
    }
    for tag in ["a", "b", "c"] {
        let sent: Vec<&str> = seen[0]
            .iter()
            .map(|(_, m)| m.as_str())
            .filter(|m| m.starts_with(tag))
            .collect();
        let expected: Vec<String> = (0..EACH).map(|i| format!("{tag}{i}")).collect();
        assert_eq!(sent, expected, "each sender's messages in the order sent");
    }
    // The offsets are the room's stream in Redis.
    let history: Vec<(String, Vec<(String, String)>)> = redis.query(
        redis::cmd("XRANGE")
            .arg(redis.room_key("history", "order"))
            .arg("-")
            .arg("+"),
    );
    let in_redis: Vec<(u64, String)> = history
        .into_iter()
        .map(|(id, fields)| {
            let offset = id.strip_suffix("-0").unwrap().parse().unwrap();
            let message: Value = serde_json::from_str(&fields[0].1).unwrap();
            (offset, message["message"].as_str().unwrap().to_owned())
        })
        .collect();
    assert_eq!(in_redis, seen[0]);
    for member in &mut members {
        member.expect_silence().await;
    }
}

#[tokio::test]
async fn only_nodes_with_members_follow_a_room_and_notices_cross_nodes() {
    let redis = RedisServer::start();
    let nodes = cluster(&redis, &[1, 1, 1]).await;
    let channel = "wsgate:room:{t}";
    let mut alice = user_on(&nodes[0], "alice").await;
    let mut bob = user_on(&nodes[1], "bob").await;
    let mut carol = nodes[2].client().await;
    // A session record per chat connection while it is open.
    let sessions = |client: &Client| {
        let node = client.id.split('.').next().unwrap();
        format!("wsgate:sessions:{node}")
    };
    let (alice_sessions, alice_id) = (sessions(&alice), alice.id.clone());
    // Written by the node's broker thread, soon after the connection.
    let record = eventually(|| {
        redis.query::<Option<String>>(redis::cmd("HGET").arg(&alice_sessions).arg(&alice_id))
    })
    .await;
    assert!(record.contains(r#""user":"alice""#), "{record}");
    alice.join("t").await;
    bob.join("t").await;
    carol.join("u").await;
    assert_eq!(redis.subscribers(channel), 2, "nodes 0 and 1, not node 2");
    assert_eq!(redis.subscribers("wsgate:room:{u}"), 1);
    let joined = alice.expect("user_joined").await;
    assert_eq!(joined["userId"], "bob", "a join on another node: {joined}");

    alice
        .send("typing", json!({"room": "t", "isTyping": true}))
        .await;
    let typing = bob.expect("typing").await;
    assert_eq!(typing["userId"], "alice");
    alice.chat("t", "hello").await;
    assert_eq!(bob.chats(1).await, vec![(1, "hello".to_owned())]);
    assert_eq!(alice.chats(1).await, vec![(1, "hello".to_owned())]);
    alice.expect_silence().await;
    carol.expect_silence().await;

    alice.send("leave_room", json!({"room": "t"})).await;
    let left = bob.expect("user_left").await;
    assert_eq!(left["userId"], "alice");
    // Node 0 unsubscribes once its grace has passed; node 1 still has bob.
    wait_until("node 0 unsubscribes", || redis.subscribers(channel) == 1).await;
    drop(bob);
    wait_until("no node follows the room", || {
        redis.subscribers(channel) == 0
    })
    .await;
    drop(alice);
    wait_until("a closed connection's session is deleted", || {
        redis.query::<i64>(redis::cmd("HEXISTS").arg(&alice_sessions).arg(&alice_id)) == 0
    })
    .await;
    // Following it again later starts from where the room is.
    let mut dave = nodes[2].client().await;
    let rejoined = dave.join_since("t", None).await;
    assert_eq!(rejoined["offset"], 1, "{rejoined}");
    assert_eq!(redis.subscribers(channel), 1);
}

#[tokio::test]
async fn a_client_reconnecting_to_another_node_with_since_gets_exactly_what_it_missed() {
    let redis = RedisServer::start();
    let nodes = cluster(&redis, &[1, 1, 1]).await;
    let mut speaker = nodes[1].client().await;
    speaker.join("r").await;
    let mut client = nodes[0].client().await;
    let joined = client.join_since("r", None).await;
    let epoch = joined["epoch"].as_str().unwrap().to_owned();
    for i in 1..=3 {
        speaker.chat("r", &format!("m{i}")).await;
    }
    let got = client.chats(3).await;
    assert_eq!(got.last().unwrap().0, 3);
    drop(client);
    for i in 4..=6 {
        speaker.chat("r", &format!("m{i}")).await;
    }
    speaker.chats(6).await;

    let mut back = nodes[2].client().await;
    let rejoined = back.join_since("r", Some((3, &epoch))).await;
    assert_eq!(rejoined["recovered"], true, "{rejoined}");
    assert_eq!(rejoined["offset"], 6);
    assert_eq!(rejoined["epoch"], epoch);
    let expected: Vec<(u64, String)> = (4..=6).map(|i| (i, format!("m{i}"))).collect();
    assert_eq!(back.chats(3).await, expected);
    back.expect_silence().await;

    let mut stale = nodes[2].client().await;
    let refused = stale.join_since("r", Some((3, "not-this-epoch"))).await;
    assert_eq!(refused["recovered"], false);
    stale.expect_silence().await;
}

#[tokio::test]
async fn a_redis_outage_keeps_sockets_refuses_publishing_and_a_lost_room_resyncs() {
    let mut redis = RedisServer::start();
    let nodes = cluster(&redis, &[1, 1]).await;
    let mut alice = nodes[0].client().await;
    let mut bob = nodes[1].client().await;
    alice.join("r").await;
    bob.join("r").await;
    // Anonymous connections are each their own presence, shown as "anonymous".
    let joined = alice.expect("user_joined").await;
    assert_eq!(joined["userId"], "anonymous");
    alice.chat("r", "before").await;
    assert_eq!(bob.chats(1).await, vec![(1, "before".to_owned())]);
    assert_eq!(alice.chats(1).await, vec![(1, "before".to_owned())]);

    redis.kill();
    for n in &nodes {
        wait_readiness(n, 503).await;
    }
    alice.chat("r", "during").await;
    alice.expect_error("Service unavailable: retry").await;
    // The sockets stay open and served.
    bob.send("echo", json!("still here")).await;
    assert_eq!(bob.expect("echo").await["payload"], "still here");

    // Without persistence the restarted Redis knows nothing of the room: members are told.
    redis.restart();
    for n in &nodes {
        wait_readiness(n, 200).await;
    }
    // The nodes wrote their sessions again.
    let node = alice.id.split('.').next().unwrap().to_owned();
    wait_until("alice's session is recorded again", || {
        let sessions = format!("wsgate:sessions:{node}");
        redis.query::<i64>(redis::cmd("HEXISTS").arg(sessions).arg(&alice.id)) == 1
    })
    .await;
    assert_eq!(bob.next_not_presence().await["type"], "resync");
    assert_eq!(alice.next_not_presence().await["type"], "resync");
    let offset = publish_surely(&mut alice, "r", "after").await;
    assert_eq!(offset, 1, "a new epoch starts from 1");
    assert_eq!(bob.chats(1).await, vec![(1, "after".to_owned())]);
    bob.expect_silence().await;
    // Nobody left: the nodes that lost Redis together are not taken for dead when it is back
    // (past the time a node is judged in, and a beat).
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(notices(&mut alice).await, vec![]);
    assert_eq!(notices(&mut bob).await, vec![]);
    for n in &nodes {
        assert!(counter(n, "broker_disconnects").await >= 1);
        assert!(counter(n, "resyncs").await >= 1);
    }
    assert!(counter(&nodes[0], "broker_unavailable").await >= 1);
}

#[tokio::test]
async fn a_persistent_redis_restart_loses_nothing() {
    let mut redis = RedisServer::start_persistent();
    let nodes = cluster(&redis, &[1, 1]).await;
    let mut alice = nodes[0].client().await;
    let mut bob = nodes[1].client().await;
    let epoch = alice.join_room_epoch("r").await;
    bob.join("r").await;
    alice.chat("r", "before").await;
    assert_eq!(bob.chats(1).await, vec![(1, "before".to_owned())]);
    assert_eq!(alice.chats(1).await, vec![(1, "before".to_owned())]);

    let mut before = Vec::new();
    for n in &nodes {
        before.push(counter(n, "broker_disconnects").await);
    }
    redis.restart();
    // Both nodes noticed (the restart may be too quick to see `/readyz` fail), and are back.
    for (n, before) in nodes.iter().zip(before) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while counter(n, "broker_disconnects").await == before {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the restart went unnoticed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        wait_readiness(n, 200).await;
    }
    let offset = publish_surely(&mut alice, "r", "after").await;
    assert_eq!(offset, 2, "the same stream goes on");
    assert_eq!(bob.chats(1).await, vec![(2, "after".to_owned())]);
    bob.expect_silence().await;
    // A newcomer recovers from before the restart.
    let mut carol = nodes[1].client().await;
    let joined = carol.join_since("r", Some((0, &epoch))).await;
    assert_eq!(joined["recovered"], true);
    assert_eq!(carol.chats(2).await.len(), 2);
}

#[tokio::test]
async fn killed_subscriptions_catch_up_with_no_loss_and_no_duplicate() {
    const MESSAGES: usize = 200;
    let redis = RedisServer::start();
    let nodes = cluster(&redis, &[1, 1]).await;
    let mut publisher = nodes[1].client().await;
    let mut reader = nodes[0].client().await;
    publisher.join("r").await;
    reader.join("r").await;
    let killer = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let killed: u64 = redis.query(redis::cmd("CLIENT").arg("KILL").arg("TYPE").arg("pubsub"));
        assert!(killed >= 2, "both nodes' subscriptions killed ({killed})");
    };
    let publishing = async {
        let mut offsets = Vec::new();
        for i in 0..MESSAGES {
            offsets.push(publish_surely(&mut publisher, "r", &format!("m{i}")).await);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        offsets
    };
    let (offsets, ()) = tokio::join!(publishing, killer);
    assert_eq!(offsets, (1..=MESSAGES as u64).collect::<Vec<_>>());
    let expected: Vec<(u64, String)> = (0..MESSAGES)
        .map(|i| (i as u64 + 1, format!("m{i}")))
        .collect();
    assert_eq!(reader.chats(MESSAGES).await, expected);
    reader.expect_silence().await;
    assert!(counter(&nodes[0], "broker_disconnects").await >= 1);
}

#[tokio::test]
async fn a_user_on_two_nodes_is_one_presence_and_counts_are_the_clusters() {
    let redis = RedisServer::start();
    let nodes = cluster(&redis, &[1, 1, 1]).await;
    let mut observer = user_on(&nodes[2], "olga").await;
    assert_eq!(observer.join("p").await, 1);
    // Node 2 writes olga's presence on its own time: node 0 reads the room after that.
    wait_until("olga's presence is in Redis", || {
        redis.query::<u64>(redis::cmd("HLEN").arg(redis.room_key("presence", "p"))) >= 2
    })
    .await;
    let mut local_observer = user_on(&nodes[0], "oscar").await;
    assert_eq!(local_observer.join("p").await, 2, "the cluster's count");
    assert_eq!(observer.expect("user_joined").await["userId"], "oscar");
    // Bob on two nodes: one join notice for everyone, whichever node they are on.
    let mut bob0 = user_on(&nodes[0], "bob").await;
    assert_eq!(bob0.join("p").await, 3);
    assert_eq!(observer.expect("user_joined").await["userId"], "bob");
    assert_eq!(local_observer.expect("user_joined").await["userId"], "bob");
    let mut bob1 = user_on(&nodes[1], "bob").await;
    assert_eq!(bob1.join("p").await, 4, "connections, across nodes");
    settle().await;
    assert_eq!(notices(&mut observer).await, vec![]);
    assert_eq!(notices(&mut local_observer).await, vec![]);

    // A presence request sees everyone once, across nodes.
    let mut carol = user_on(&nodes[1], "carol").await;
    assert_eq!(carol.join("p").await, 5);
    carol.send("presence", json!({"room": "p"})).await;
    let page = carol.next_not_presence().await;
    assert_eq!(page["type"], "presence", "{page}");
    assert_eq!(page["members"], 5);
    let users = support::user_ids(&page);
    assert_eq!(users, ["bob", "carol", "olga", "oscar"]);
    assert!(page.get("next").is_none(), "one page");
    // Past the page, `next` names where the next one starts.
    carol
        .send("presence", json!({"room": "p", "after": "carol"}))
        .await;
    let rest = carol.next_not_presence().await;
    assert_eq!(
        rest["users"],
        json!([{"userId": "olga", "username": "olga"}, {"userId": "oscar", "username": "oscar"}])
    );

    // Leaving one of two connections is not leaving.
    assert_eq!(observer.expect("user_joined").await["userId"], "carol");
    drop(bob0);
    settle().await;
    assert_eq!(notices(&mut observer).await, vec![]);
    drop(bob1);
    assert_eq!(observer.expect("user_left").await["userId"], "bob");
    // Oscar saw carol join meanwhile; then bob leave, once.
    assert_eq!(
        local_observer.expect("user_joined").await["userId"],
        "carol"
    );
    assert_eq!(local_observer.expect("user_left").await["userId"], "bob");
    settle().await;
    assert_eq!(notices(&mut local_observer).await, vec![]);
    let mut dave = user_on(&nodes[2], "dave").await;
    assert_eq!(dave.join("p").await, 4, "olga, oscar, carol and dave");
}

#[tokio::test]
async fn a_killed_node_leaves_every_room_within_the_node_ttl() {
    let redis = RedisServer::start();
    let doomed = node_process(&redis);
    let survivor = node(&redis, 1);
    wait_readiness(&survivor, 200).await;
    let mut observer = user_on(&survivor, "olga").await;
    observer.join("k").await;
    let mut victim = user_on_process(&doomed, "vic").await;
    assert_eq!(victim.join("k").await, 2);
    // Its session is recorded, in its node's sessions, which live while the node beats.
    let doomed_node = victim.id.split('.').next().unwrap().to_owned();
    let sessions = format!("wsgate:sessions:{doomed_node}");
    let record = eventually(|| {
        redis.query::<Option<String>>(redis::cmd("HGET").arg(&sessions).arg(&victim.id))
    })
    .await;
    let record: Value = serde_json::from_str(&record).unwrap();
    assert_eq!(record["user"], "vic");
    assert_eq!(record["node"], doomed_node);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let connected_at = record["connectedAt"].as_u64().unwrap();
    assert!(now_ms - connected_at < 10_000, "{record}");
    let ttl: i64 = redis.query(redis::cmd("PTTL").arg(&sessions));
    assert!(
        (1..=8000).contains(&ttl),
        "sessions expire with the node: {ttl}"
    );
    assert_eq!(observer.expect("user_joined").await["userId"], "vic");
    // kill -9: no goodbye, no leave.
    drop(doomed);
    let started = std::time::Instant::now();
    let left = observer
        .expect_within("user_left", Duration::from_secs(15))
        .await;
    assert_eq!(left["userId"], "vic");
    let took = started.elapsed();
    // The node's TTL (8 s) and a beat (2 s), and room for a busy machine.
    assert!(took < Duration::from_secs(15), "gone after {took:?}");
    wait_until_slowly("the dead node's sessions expire", || {
        redis.query::<i64>(redis::cmd("EXISTS").arg(&sessions)) == 0
    })
    .await;
    let mut late = user_on(&survivor, "lee").await;
    assert_eq!(late.join("k").await, 2, "olga and lee: no ghost");
    late.send("presence", json!({"room": "k"})).await;
    let page = late.next_not_presence().await;
    assert_eq!(page["users"].as_array().unwrap().len(), 2, "{page}");
}

#[tokio::test]
async fn what_is_not_wsgates_on_its_channels_and_keys_is_skipped_and_counted() {
    let redis = RedisServer::start();
    let nodes = cluster(&redis, &[1]).await;
    let mut alice = user_on(&nodes[0], "alice").await;
    alice.join("m").await;
    // Garbage published on the room's channel, of every kind, and garbage in its presence.
    for garbage in [
        &b"x"[..],
        b"s1 e\nnot json",
        b"s1 e\n{}",
        b"s\xff",
        b"unode 1\n{\"user\":\"u\",\"name\":\"n\",\"conns\":4294967295}",
        b"Unode 1\nnot a list",
        b"pnode\n[1]",
    ] {
        let _: i64 = redis.query(redis::cmd("PUBLISH").arg("wsgate:room:{m}").arg(garbage));
    }
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while counter(&nodes[0], "broker_malformed").await < 7 {
        assert!(tokio::time::Instant::now() < deadline, "all counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    alice.expect_silence().await;
    // Garbage in the room's keys: a presence entry of a live node that is not JSON, a field
    // that names no node, an offset that is not a count.
    let node0 = alice.id.split('.').next().unwrap().to_owned();
    for (field, value) in [
        (format!("{node0}\x1fmallory"), "not json"),
        ("no separator".into(), "x"),
    ] {
        let _: i64 = redis.query(
            redis::cmd("HSET")
                .arg(redis.room_key("presence", "m"))
                .arg(field)
                .arg(value),
        );
    }
    // A node that syncs the room reads past the bad fields (and counts them), and the room works.
    let other = node(&redis, 1);
    wait_readiness(&other, 200).await;
    let mut bob = user_on(&other, "bob").await;
    assert_eq!(bob.join("m").await, 2, "alice and bob");
    // Whichever node read the room first deleted them, and counted them.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let counted = counter(&nodes[0], "broker_malformed").await
            + counter(&other, "broker_malformed").await;
        if counted == 7 + 2 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "counted {counted}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fields: Vec<String> = redis.query(redis::cmd("HKEYS").arg(redis.room_key("presence", "m")));
    assert!(
        !fields
            .iter()
            .any(|f| f.contains("mallory") || f == "no separator"),
        "{fields:?}"
    );
    bob.chat("m", "still fine").await;
    assert_eq!(alice.chats(1).await, vec![(1, "still fine".to_owned())]);
    wait_readiness(&nodes[0], 200).await;
}

#[tokio::test]
async fn during_an_outage_joins_of_rooms_the_node_does_not_follow_are_refused() {
    let mut redis = RedisServer::start();
    let nodes = cluster(&redis, &[1]).await;
    let mut alice = nodes[0].client().await;
    alice.join("followed").await;
    redis.kill();
    wait_readiness(&nodes[0], 503).await;
    let mut bob = nodes[0].client().await;
    bob.send("join_room", json!({"room": "new"})).await;
    bob.expect_error("Service unavailable: retry").await;
    // A room the node follows is joined from what the node knows.
    let joined = bob.join_since("followed", None).await;
    assert_eq!(joined["members"], 2);
    redis.restart();
    wait_readiness(&nodes[0], 200).await;
    // Redis lost the room (no persistence): its members are told.
    assert_eq!(bob.expect("resync").await["room"], "followed");
    bob.join("new").await;
}

#[tokio::test]
async fn a_member_joining_on_a_new_node_during_traffic_gets_every_message_after_its_join() {
    const MESSAGES: usize = 300;
    let redis = RedisServer::start();
    let nodes = cluster(&redis, &[1, 1]).await;
    let mut publisher = nodes[0].client().await;
    publisher.join("busy").await;
    let joining = async {
        tokio::time::sleep(Duration::from_millis(30)).await;
        // The second node does not follow the room yet: it subscribes and reads it while
        // messages keep coming.
        let mut late = nodes[1].client().await;
        let joined = late.join_since("busy", None).await;
        (late, joined["offset"].as_u64().unwrap())
    };
    let publishing = async {
        for i in 0..MESSAGES {
            publisher.chat("busy", &format!("m{i}")).await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    let ((mut late, joined_at), ()) = tokio::join!(joining, publishing);
    assert!(
        0 < joined_at && joined_at < MESSAGES as u64,
        "the join came during the traffic: {joined_at}"
    );
    let expected = MESSAGES - joined_at as usize;
    let got = late.chats(expected).await;
    let offsets: Vec<u64> = got.iter().map(|(o, _)| *o).collect();
    assert_eq!(
        offsets,
        (joined_at + 1..=MESSAGES as u64).collect::<Vec<_>>(),
        "every message after the join, once, in order"
    );
    late.expect_silence().await;
}

#[tokio::test]
async fn a_node_that_stops_gracefully_leaves_presence_at_once() {
    let redis = RedisServer::start();
    let mut nodes = cluster(&redis, &[1, 1]).await;
    let mut observer = user_on(&nodes[0], "olga").await;
    observer.join("g").await;
    let mut leaving = user_on(&nodes[1], "lou").await;
    leaving.join("g").await;
    assert_eq!(observer.expect("user_joined").await["userId"], "lou");
    let started = std::time::Instant::now();
    // Shutdown begins (its connections are closing; `lou` does not answer its close frame).
    nodes[1].gateway().shutdown();
    let left = observer.expect("user_left").await;
    assert_eq!(left["userId"], "lou");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "told by the goodbye, not by the node's time-to-live"
    );
    wait_until("the stopped node took itself out", || {
        redis
            .query::<Vec<String>>(redis::cmd("HKEYS").arg("wsgate:nodes"))
            .len()
            == 1
    })
    .await;
    let nodes_alive: Vec<String> = redis.query(redis::cmd("HKEYS").arg("wsgate:nodes"));
    assert_eq!(
        nodes_alive.len(),
        1,
        "the stopped node took itself out: {nodes_alive:?}"
    );
    nodes[1].stop().await;
}

/// A TCP proxy in front of Redis that can wedge the subscription connections open now: they
/// stay open, but nothing Redis sends reaches the node any more (what a failover behind a proxy
/// can leave behind). Connections made later are not wedged.
struct WedgingProxy {
    port: u16,
    /// Per subscription connection: whether it is wedged.
    subscribers: Arc<Mutex<Vec<Arc<AtomicBool>>>>,
}

impl WedgingProxy {
    async fn start(redis_port: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let subscribers: Arc<Mutex<Vec<Arc<AtomicBool>>>> = Arc::default();
        let registry = subscribers.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = tokio::net::TcpStream::connect(("127.0.0.1", redis_port))
                    .await
                    .unwrap();
                let (mut client_rx, mut client_tx) = client.into_split();
                let (mut server_rx, mut server_tx) = server.into_split();
                let wedged = Arc::new(AtomicBool::new(false));
                let (registry, this) = (registry.clone(), wedged.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    let mut registered = false;
                    while let Ok(n @ 1..) = client_rx.read(&mut buf).await {
                        let subscribes = buf[..n]
                            .windows(9)
                            .any(|w| w.eq_ignore_ascii_case(b"SUBSCRIBE"));
                        if subscribes && !registered {
                            registered = true;
                            registry.lock().unwrap().push(this.clone());
                        }
                        if server_tx.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n @ 1..) = server_rx.read(&mut buf).await {
                        // Wedged: read and dropped, the connection stays up.
                        if wedged.load(Ordering::Relaxed) {
                            continue;
                        }
                        if client_tx.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        WedgingProxy { port, subscribers }
    }

    fn wedge_subscriptions(&self) {
        for wedged in self.subscribers.lock().unwrap().iter() {
            wedged.store(true, Ordering::Relaxed);
        }
    }
}

#[tokio::test]
async fn a_wedged_subscription_is_found_by_the_probe_and_replaced() {
    let redis = RedisServer::start();
    let proxy = WedgingProxy::start(redis.port).await;
    let url = format!("redis://127.0.0.1:{}/", proxy.port);
    let wedged_node = TestGateway::start_with(
        move |config| {
            config.broker = BrokerKind::Redis;
            config.redis_url = url.into();
        },
        1,
    );
    let other = node(&redis, 1);
    wait_readiness(&wedged_node, 200).await;
    wait_readiness(&other, 200).await;
    let mut reader = wedged_node.client().await;
    reader.join("w").await;
    let mut writer = other.client().await;
    writer.join("w").await;
    writer.chat("w", "before").await;
    assert_eq!(reader.chats(1).await, vec![(1, "before".to_owned())]);
    // From now on the node's subscription receives nothing, though its connection is up.
    proxy.wedge_subscriptions();
    writer.chat("w", "while wedged").await;
    let deadline = tokio::time::Instant::now() + 2 * PATIENCE;
    while counter(&wedged_node, "broker_probe_failures").await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the probe found nothing"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The new subscription connection is not wedged; the room is caught up, nothing lost.
    wait_readiness(&wedged_node, 200).await;
    writer.chat("w", "after").await;
    assert_eq!(
        reader.chats(2).await,
        vec![(2, "while wedged".to_owned()), (3, "after".to_owned())]
    );
}

#[tokio::test]
async fn disconnecting_a_user_closes_its_connections_on_every_node_and_counts_them() {
    let redis = RedisServer::start();
    let nodes = cluster(&redis, &[1, 1, 1]).await;
    let mut bob_here = user_on(&nodes[0], "bob").await;
    let mut bob_there = user_on(&nodes[1], "bob").await;
    let mut bob_there_too = user_on(&nodes[2], "bob").await;
    let mut carol = user_on(&nodes[1], "carol").await;
    assert!(
        matches!(
            nodes[0].gateway().disconnect_user("bob", 1000, "no").await,
            Err(DisconnectError::NotAnApplicationCode(_))
        ),
        "only application codes"
    );
    let closed = nodes[0]
        .gateway()
        .disconnect_user("bob", 4000, "kicked")
        .await
        .unwrap();
    // Every node counted its own: one here, one on each of the others.
    assert_eq!(
        (closed.connections, closed.nodes, closed.unanswered),
        (3, 3, 0)
    );
    for bob in [&mut bob_here, &mut bob_there, &mut bob_there_too] {
        let close = bob.expect_close().await.expect("a close frame");
        assert_eq!((u16::from(close.code), &*close.reason), (4000, "kicked"));
    }
    carol.expect_silence().await;
    for node in &nodes {
        assert_eq!(counter(node, "users_disconnected").await, 1);
    }
    // What POST /api/disconnect of bob on `node` answers.
    let disconnect_bob = |node: usize| {
        let addr = nodes[node].addr;
        async move {
            let (status, answer) =
                api(addr, "POST", "/api/disconnect", json!({"user": "bob"})).await;
            assert_eq!(status, 200, "{answer}");
            answer
        }
    };
    // No one left: every node answers, with nothing closed.
    assert_eq!(
        disconnect_bob(1).await,
        json!({"disconnected": "bob", "connections": 0, "nodes": 3, "unanswered": 0})
    );
    // A program subscribed to the control channel counts as a node that does not answer.
    let mut foreign = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let mut foreign = foreign.as_pubsub();
    foreign.subscribe("wsgate:control").unwrap();
    let mut bob = user_on(&nodes[2], "bob").await;
    assert_eq!(
        disconnect_bob(0).await,
        json!({"disconnected": "bob", "connections": 1, "nodes": 3, "unanswered": 1})
    );
    assert_eq!(u16::from(bob.expect_close().await.unwrap().code), 4000);
    drop(foreign);
    // A node that stops answering (a stalled process) is reported unanswered while its beats
    // still count it alive: once this node has heard it beat, and within its time-to-live.
    let stalled = node_process(&redis);
    let pid = stalled.pid();
    let answer = eventually_async(|| async {
        let mut bob = user_on(&nodes[0], "bob").await;
        support::redis_server::send_signal(pid, "-STOP");
        let answer = disconnect_bob(0).await;
        support::redis_server::send_signal(pid, "-CONT");
        assert_eq!(u16::from(bob.expect_close().await.unwrap().code), 4000);
        (answer["unanswered"] == 1).then_some(answer)
    })
    .await;
    assert_eq!(
        answer,
        json!({"disconnected": "bob", "connections": 1, "nodes": 3, "unanswered": 1})
    );
}

#[tokio::test]
async fn nodes_lists_every_live_node_with_what_it_said_at_its_last_beat() {
    let redis = RedisServer::start();
    let mut nodes = cluster(&redis, &[1, 1]).await;
    let _alice = user_on(&nodes[0], "alice").await;
    let _bob = user_on(&nodes[1], "bob").await;
    let _carol = user_on(&nodes[1], "carol").await;
    let ids: Vec<Value> = {
        let mut ids = Vec::new();
        for node in &nodes {
            let (_, _, health) = http_get(node.addr, "/healthz", "").await;
            let health: Value = serde_json::from_str(&health).unwrap();
            ids.push(health["broker"]["node"].clone());
        }
        ids
    };
    // Asked of either node: both, with the connections each had at its last beat.
    let listed = |answer: &Value| -> Vec<(Value, Value)> {
        let nodes = answer["nodes"].as_array().unwrap();
        nodes
            .iter()
            .map(|n| (n["node"].clone(), n["connections"].clone()))
            .collect()
    };
    let mut expected = vec![(ids[0].clone(), json!(1)), (ids[1].clone(), json!(2))];
    expected.sort_by_key(|(id, _)| id.as_str().unwrap().to_owned());
    let answer = api_until(&nodes[1], "/api/nodes", |a| listed(a) == expected).await;
    assert_eq!(answer["nodes"][0]["shards"], 1, "{answer}");
    // A node that stops says goodbye: gone from the list at once, not after its time-to-live.
    nodes[1].stop().await;
    api_until(&nodes[0], "/api/nodes", |a| {
        listed(a) == [(ids[0].clone(), json!(1))]
    })
    .await;
}

#[tokio::test]
async fn a_disconnect_while_redis_stalls_says_what_it_closed_on_its_own_node() {
    let redis = RedisServer::start();
    let nodes = cluster(&redis, &[1, 1]).await;
    let mut bob = user_on(&nodes[0], "bob").await;
    redis.pause();
    let (status, answer) = api(
        nodes[0].addr,
        "POST",
        "/api/disconnect",
        json!({"user": "bob"}),
    )
    .await;
    redis.resume();
    assert_eq!(status, 503, "{answer}");
    assert_eq!(
        answer["error"],
        "closed 1 connections on this node only: the other nodes could not be told, or may not \
         have been (retry)"
    );
    assert_eq!(u16::from(bob.expect_close().await.unwrap().code), 4000);
}

#[tokio::test]
async fn the_server_api_publishes_and_broadcasts_to_every_node() {
    let mut redis = RedisServer::start();
    let nodes = cluster(&redis, &[1, 1]).await;
    let mut member = nodes[1].client().await;
    let epoch = member.join_room_epoch("news").await;
    let mut other = nodes[1].client().await;
    // Published on a node without members: Redis gives the offset, the member's node delivers.
    for n in 1..=2u64 {
        let (status, answer) = api(
            nodes[0].addr,
            "POST",
            "/api/publish",
            json!({"room": "news", "data": {"n": n}}),
        )
        .await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["offset"], n);
        assert_eq!(
            answer["epoch"],
            epoch.as_str(),
            "the epoch Redis gave the room"
        );
        let publication = member.expect("publication").await;
        assert_eq!(
            (
                publication["data"]["n"].as_u64(),
                publication["offset"].as_u64()
            ),
            (Some(n), Some(n))
        );
    }
    let (status, answer) = api(
        nodes[0].addr,
        "POST",
        "/api/broadcast",
        json!({"data": "to all"}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    for client in [&mut member, &mut other] {
        assert_eq!(client.expect("publication").await["data"], "to all");
    }
    // Without Redis nothing is half done: both are refused with 503.
    redis.kill();
    wait_readiness(&nodes[0], 503).await;
    for (path, body) in [
        ("/api/publish", json!({"room": "news", "data": 3})),
        ("/api/broadcast", json!({"data": 3})),
        ("/api/disconnect", json!({"user": "bob"})),
    ] {
        let (status, answer) = api(nodes[0].addr, "POST", path, body).await;
        assert_eq!(status, 503, "{path}: {answer}");
        assert!(
            answer["error"].as_str().unwrap().contains("retry"),
            "{answer}"
        );
    }
    member.expect_silence().await;
}

#[tokio::test]
async fn metrics_show_the_redis_round_trip_and_readiness() {
    let redis = RedisServer::start();
    let nodes = cluster(&redis, &[1]).await;
    // The probe goes out every second: its round trip shows once one came back.
    let sample = |text: &str, name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .map(|value| value.parse::<f64>().unwrap())
    };
    let text = eventually_async(|| async {
        let (_, _, text) = http_get(nodes[0].addr, "/metrics", "").await;
        sample(&text, "wsgate_redis_probe_round_trip_seconds").map(|_| text)
    })
    .await;
    let round_trip = sample(&text, "wsgate_redis_probe_round_trip_seconds").unwrap();
    assert!(round_trip > 0.0 && round_trip < 1.0, "{round_trip}");
    assert_eq!(sample(&text, "wsgate_broker_ready"), Some(1.0));
    assert_eq!(sample(&text, "wsgate_redis_publish_queue"), Some(0.0));
}

/// Polls `read` until it gives something (within a few probe intervals).
#[tokio::test]
async fn the_server_api_lists_rooms_and_members_across_the_cluster() {
    let mut redis = RedisServer::start();
    let mut nodes = cluster(&redis, &[1, 1, 1]).await;
    let mut alice = nodes[0].client_as("alice").await;
    alice.join("a").await;
    alice.join("b").await;
    // Bob is in "b" from two nodes; carol is alone in "c".
    let mut bob_here = nodes[0].client_as("bob").await;
    bob_here.join("b").await;
    let mut bob_there = nodes[1].client_as("bob").await;
    bob_there.join("b").await;
    let mut carol = nodes[1].client_as("carol").await;
    carol.join("c").await;
    // The third node has no member anywhere, and still sees every room.
    let expected = |rooms: &[(&str, u64)]| {
        rooms
            .iter()
            .map(|(r, n)| (r.to_string(), *n))
            .collect::<Vec<_>>()
    };
    let all = expected(&[("a", 1), ("b", 3), ("c", 1)]);
    api_until(&nodes[2], "/api/rooms", |a| room_list(a) == all).await;
    let (_, first) = api(nodes[2].addr, "GET", "/api/rooms?limit=2", Value::Null).await;
    assert_eq!(room_list(&first), expected(&[("a", 1), ("b", 3)]));
    assert_eq!(first["next"], "b");
    let (_, rest) = api(nodes[2].addr, "GET", "/api/rooms?after=b", Value::Null).await;
    assert_eq!(room_list(&rest), expected(&[("c", 1)]));
    assert_eq!(rest["next"], Value::Null);
    // Who is in "b": each user once, their connections on every node counted.
    let (_, b) = api(nodes[2].addr, "GET", "/api/rooms/b", Value::Null).await;
    assert_eq!(b["members"], 3, "{b}");
    let users = support::user_ids(&b);
    assert_eq!(users, ["alice", "bob"]);
    // A node that follows the room answers from its own copy, the same.
    let (_, from_member_node) = api(nodes[0].addr, "GET", "/api/rooms/b", Value::Null).await;
    assert_eq!(from_member_node, b);
    let (_, page) = api(nodes[2].addr, "GET", "/api/rooms/b?limit=1", Value::Null).await;
    assert_eq!(
        (page["users"][0]["userId"].as_str(), page["next"].as_str()),
        (Some("alice"), Some("alice"))
    );
    // Leaving takes a room out; a node that stops takes its members with it.
    carol.send("leave_room", json!({"room": "c"})).await;
    api_until(&nodes[2], "/api/rooms", |a| {
        room_list(a) == expected(&[("a", 1), ("b", 3)])
    })
    .await;
    nodes[1].stop().await;
    api_until(&nodes[2], "/api/rooms", |a| {
        room_list(a) == expected(&[("a", 1), ("b", 2)])
    })
    .await;
    // Counts of a node that is not alive (killed, say) are not members, and such a room leaves
    // the index as a page passes it.
    redis.query::<i64>(
        redis::cmd("HSET")
            .arg(redis.room_key("members", "ghost"))
            .arg("dead-node")
            .arg(5),
    );
    redis.query::<i64>(
        redis::cmd("ZADD")
            .arg(redis.rooms_key())
            .arg(0)
            .arg("ghost"),
    );
    let (_, listed) = api(nodes[2].addr, "GET", "/api/rooms", Value::Null).await;
    assert_eq!(room_list(&listed), expected(&[("a", 1), ("b", 2)]));
    let indexed: Vec<String> =
        redis.query(redis::cmd("ZRANGE").arg(redis.rooms_key()).arg(0).arg(-1));
    assert_eq!(indexed, ["a", "b"]);
    let ghost: i64 = redis.query(redis::cmd("EXISTS").arg(redis.room_key("members", "ghost")));
    assert_eq!(ghost, 0, "the dead node's count is deleted");
    // Without Redis the cluster's rooms cannot be read: 503, not this node's partial view.
    redis.kill();
    wait_readiness(&nodes[0], 503).await;
    for path in ["/api/rooms", "/api/rooms/b"] {
        let (status, answer) = api(nodes[0].addr, "GET", path, Value::Null).await;
        assert_eq!(status, 503, "{path}: {answer}");
    }
}

#[tokio::test]
async fn a_chat_message_with_an_id_is_acknowledged_with_the_offset_redis_gave_it() {
    let mut redis = RedisServer::start();
    let nodes = cluster(&redis, &[1, 1]).await;
    let mut alice = nodes[0].client().await;
    let mut bob = nodes[1].client().await;
    alice.join("r").await;
    bob.join("r").await;
    alice.expect("user_joined").await;
    let send = |id: Value| {
        json!({"type": "chat_message", "payload": {"room": "r", "message": "hi"}, "id": id})
            .to_string()
    };
    alice.send_text(send(json!(1))).await;
    let (ack, message) = alice.ack_and_chat().await;
    assert_eq!(
        ack,
        json!({"type": "ack", "id": 1, "offset": message["offset"]})
    );
    assert_eq!(bob.chats(1).await, vec![(1, "hi".to_owned())]);
    // Refused while Redis is away: the error names the message.
    redis.kill();
    wait_readiness(&nodes[0], 503).await;
    alice.send_text(send(json!("again"))).await;
    let error = alice.next_not_presence().await;
    assert_eq!(
        error,
        json!({"type": "error", "error": "Service unavailable: retry", "id": "again"})
    );
}

#[tokio::test]
async fn a_publication_to_a_user_reaches_its_connections_on_every_node() {
    let mut redis = RedisServer::start();
    let nodes = cluster(&redis, &[1, 2, 1]).await;
    let mut alices = vec![
        user_on(&nodes[0], "alice").await,
        user_on(&nodes[1], "alice").await,
        user_on(&nodes[1], "alice").await,
    ];
    // A user id that needs escaping crosses Redis as it is.
    let odd = "bob\n\"quoted\" é";
    let mut bob = user_on(&nodes[2], odd).await;
    let mut carol = user_on(&nodes[2], "carol").await;
    let (status, answer) = api(
        nodes[2].addr,
        "POST",
        "/api/publish",
        json!({"user": "alice", "data": "hi alice"}),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    for alice in &mut alices {
        assert_eq!(alice.expect("user").await["data"], "hi alice");
    }
    let (status, _) = api(
        nodes[0].addr,
        "POST",
        "/api/publish",
        json!({"user": odd, "data": "hi bob"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(bob.expect("user").await["data"], "hi bob");
    carol.expect_silence().await;
    for alice in &mut alices {
        alice.expect_silence().await;
    }
    // Without Redis it is refused whole, not delivered on one node only.
    redis.kill();
    wait_readiness(&nodes[2], 503).await;
    let (status, answer) = api(
        nodes[2].addr,
        "POST",
        "/api/publish",
        json!({"user": "alice", "data": "lost?"}),
    )
    .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (503, Some("Service unavailable: retry"))
    );
}

#[tokio::test]
async fn a_rooms_history_is_read_from_redis_on_any_node() {
    let mut redis = RedisServer::start();
    let nodes = cluster(&redis, &[1, 1]).await;
    let mut member = nodes[0].client().await;
    let epoch = member.join_room_epoch("h").await;
    for n in 1..=3u64 {
        assert_eq!(publish_surely(&mut member, "h", &format!("m{n}")).await, n);
    }
    // Node 1 has no member in the room and does not follow it: Redis answers.
    let (status, answer) = api(nodes[1].addr, "GET", "/api/history/h?since=1", Value::Null).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        (answer["offset"].as_u64(), answer["epoch"].as_str()),
        (Some(3), Some(epoch.as_str()))
    );
    assert_eq!(support::history_texts(&answer), [(2, "m2"), (3, "m3")]);
    let (_, answer) = api(
        nodes[1].addr,
        "GET",
        "/api/history/h?order=newest&limit=1",
        Value::Null,
    )
    .await;
    assert_eq!(answer["messages"][0]["offset"], 3, "{answer}");
    let (_, answer) = api(nodes[1].addr, "GET", "/api/history/never", Value::Null).await;
    assert_eq!(
        answer,
        json!({"room": "never", "offset": 0, "epoch": null, "messages": []})
    );
    // An entry that is not wsgate's is skipped, and counted.
    let history_key = redis.room_key("history", "h");
    let _: String = redis.query(
        redis::cmd("XADD")
            .arg(&history_key)
            .arg("4-0")
            .arg("m")
            .arg("not json"),
    );
    let before = counter(&nodes[1], "broker_malformed").await;
    let (_, answer) = api(nodes[1].addr, "GET", "/api/history/h?since=3", Value::Null).await;
    assert_eq!(answer["messages"], json!([]), "{answer}");
    assert_eq!(counter(&nodes[1], "broker_malformed").await, before + 1);
    redis.kill();
    wait_readiness(&nodes[1], 503).await;
    let (status, _) = api(nodes[1].addr, "GET", "/api/history/h", Value::Null).await;
    assert_eq!(status, 503);
}

#[tokio::test]
async fn a_chat_message_retried_on_another_node_is_published_once() {
    let redis = RedisServer::start();
    let nodes = cluster(&redis, &[1, 1]).await;
    let mut first = user_on(&nodes[0], "alice").await;
    let mut retry = user_on(&nodes[1], "alice").await;
    let mut bob = user_on(&nodes[1], "bob").await;
    first.join("r").await;
    retry.join("r").await;
    bob.join("r").await;
    let message = json!({"room": "r", "message": "once", "messageId": "m-1"});
    first.send("chat_message", message.clone()).await;
    assert_eq!(bob.chats(1).await, vec![(1, "once".to_owned())]);
    // The client lost its connection before it saw its message, and sends it again elsewhere.
    let again = json!({"type": "chat_message", "payload": message, "id": "retry"});
    retry.send_text(again.to_string()).await;
    // It is a member: the first one reached it too (and only that one: its offset).
    let (ack, message) = retry.ack_and_chat().await;
    assert_eq!(message["offset"], 1, "only the first: {message}");
    assert_eq!(ack, json!({"type": "ack", "id": "retry", "offset": 1}));
    bob.expect_silence().await;
    // A new message id is a new message.
    first
        .send(
            "chat_message",
            json!({"room": "r", "message": "next", "messageId": "m-2"}),
        )
        .await;
    assert_eq!(bob.chats(1).await, vec![(2, "next".to_owned())]);
}
