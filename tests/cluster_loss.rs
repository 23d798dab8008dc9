//! A cluster whose Redis loses data or goes back in time, and nodes that stop while Redis is
//! stalled: nothing is lost or refused without the sender or the members being told.

mod support;

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use support::cluster::*;
use support::redis_server::RedisServer;
use support::{PATIENCE, api};
use tokio_tungstenite::tungstenite::Message;

/// The chat messages (offset, text) in a room's history in Redis.
fn history(redis: &RedisServer, room: &str) -> Vec<(u64, String)> {
    let entries: Vec<(String, Vec<(String, String)>)> = redis.query(
        redis::cmd("XRANGE")
            .arg(redis.room_key("history", room))
            .arg("-")
            .arg("+"),
    );
    entries
        .into_iter()
        .map(|(id, fields)| {
            let message: Value = serde_json::from_str(&fields[0].1).unwrap();
            (
                id.strip_suffix("-0").unwrap().parse().unwrap(),
                message["message"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// What `client` gets until the close frame, which must be 1001 (going away).
async fn until_going_away(client: &mut support::Client) -> Vec<Value> {
    let mut replies = Vec::new();
    loop {
        let msg = tokio::time::timeout(4 * PATIENCE, client.ws.next())
            .await
            .expect("answers and a close")
            .expect("a close frame before the end")
            .expect("no error");
        match msg {
            Message::Text(text) => replies.push(serde_json::from_str(&text).unwrap()),
            Message::Close(frame) => {
                assert_eq!(frame.map(|f| u16::from(f.code)), Some(1001), "going away");
                return replies;
            }
            _ => {}
        }
    }
}

#[tokio::test]
async fn a_redis_restarted_from_an_older_snapshot_starts_every_room_over_and_says_so() {
    let mut redis = RedisServer::start();
    let nodes = cluster(&redis, &[1, 1]).await;
    let mut alice = user_on(&nodes[0], "alice").await;
    let mut bob = user_on(&nodes[1], "bob").await;
    let epoch = alice.join_room_epoch("r").await;
    bob.join("r").await;
    alice.chat("r", "m1").await;
    assert_eq!(bob.chats(1).await, vec![(1, "m1".to_owned())]);
    assert_eq!(alice.chats(1).await, vec![(1, "m1".to_owned())]);
    let generation = redis.generation();
    redis.save();
    for (i, text) in ["m2", "m3", "m4"].iter().enumerate() {
        alice.chat("r", text).await;
        assert_eq!(bob.chats(1).await, vec![(i as u64 + 2, text.to_string())]);
        assert_eq!(alice.chats(1).await, vec![(i as u64 + 2, text.to_string())]);
    }
    // kill -9 and back on the snapshot: the room is at offset 1 again, under the same epoch.
    redis.restart();
    for n in &nodes {
        wait_readiness(n, 200).await;
    }
    assert_ne!(redis.generation(), generation, "a new generation");
    // Both members are told their stream started over; nothing is taken for seen.
    assert_eq!(alice.next_not_presence().await["type"], "resync");
    assert_eq!(bob.next_not_presence().await["type"], "resync");
    let mut offsets = Vec::new();
    for text in ["n1", "n2", "n3", "n4"] {
        offsets.push(publish_surely(&mut alice, "r", text).await);
    }
    assert_eq!(offsets, [1, 2, 3, 4], "a new epoch, from 1");
    let got = bob.chats(4).await;
    assert_eq!(
        got.iter().map(|(_, m)| m.as_str()).collect::<Vec<_>>(),
        ["n1", "n2", "n3", "n4"],
        "every message arrives"
    );
    bob.expect_silence().await;
    assert_eq!(history(&redis, "r").len(), 4);
    // A client holding a position of the old epoch is told it cannot recover, never handed the
    // new epoch's messages as if they followed its own.
    let mut carol = user_on(&nodes[1], "carol").await;
    let joined = carol.join_since("r", Some((4, &epoch))).await;
    assert_eq!(joined["recovered"], false, "{joined}");
    assert_ne!(joined["epoch"], epoch.as_str());
    let started: u64 = counter(&nodes[0], "broker_generations").await
        + counter(&nodes[1], "broker_generations").await;
    assert_eq!(
        started, 1,
        "one node started the new generation, the other joined it"
    );
    // The replaced generation's keys are deleted.
    wait_until("the old generation's keys are gone", || {
        let left: Vec<String> =
            redis.query(redis::cmd("KEYS").arg(format!("wsgate:{generation}:*")));
        left.is_empty()
    })
    .await;
}

#[tokio::test]
async fn a_flushed_redis_is_noticed_without_a_reconnection_and_rooms_start_over() {
    let redis = RedisServer::start();
    let (nodes, mut alice, mut bob) = two_members(&redis, "f").await;
    assert_eq!(publish_surely(&mut alice, "f", "before").await, 1);
    assert_eq!(bob.chats(1).await, vec![(1, "before".to_owned())]);
    let generation = redis.generation();
    let _: String = redis.query(&mut redis::cmd("FLUSHALL"));
    // The beats find the generation gone; the nodes read a new one and the room starts over.
    assert_eq!(alice.next_not_presence().await["type"], "resync");
    assert_eq!(bob.next_not_presence().await["type"], "resync");
    assert_ne!(redis.generation(), generation);
    assert_eq!(publish_surely(&mut alice, "f", "after").await, 1);
    assert_eq!(bob.chats(1).await, vec![(1, "after".to_owned())]);
    // Presence was written again under the new generation: counts are still right.
    let mut carol = user_on(&nodes[1], "carol").await;
    assert_eq!(carol.join("f").await, 3);
}

#[tokio::test]
async fn a_node_that_dies_while_redis_loses_its_data_leaves_no_ghosts() {
    let mut redis = RedisServer::start();
    let doomed = node_process(&redis);
    let survivor = node(&redis, 1);
    wait_readiness(&survivor, 200).await;
    let mut olga = user_on(&survivor, "olga").await;
    olga.join("g").await;
    let mut ghosts = Vec::new();
    for user in ["g1", "g2", "g3"] {
        let mut client = user_on_process(&doomed, user).await;
        client.join("g").await;
        assert_eq!(olga.expect("user_joined").await["userId"], user);
        ghosts.push(client);
    }
    // Redis comes back empty and the node with three members is killed meanwhile.
    redis.kill();
    drop(doomed);
    drop(ghosts);
    redis.restart();
    wait_readiness(&survivor, 200).await;
    // Within the node's time-to-live after the survivor's return, every user of the dead node
    // leaves, as it would with Redis up.
    // The room itself started over in Redis: the survivor's member is told that first.
    assert_eq!(olga.expect("resync").await["room"], "g");
    let mut left = Vec::new();
    while left.len() < 3 {
        let notice = olga
            .expect_within("user_left", Duration::from_secs(25))
            .await;
        left.push(notice["userId"].as_str().unwrap().to_owned());
    }
    left.sort();
    assert_eq!(left, ["g1", "g2", "g3"]);
    let mut lee = user_on(&survivor, "lee").await;
    assert_eq!(lee.join("g").await, 2, "olga and lee: no ghost");
    assert_eq!(olga.expect("user_joined").await["userId"], "lee");
    // The rooms index is Redis's, written by the node after each join (asynchronously).
    let g = [("g".to_owned(), 2)];
    api_until(&survivor, "/api/rooms", |rooms| room_list(rooms) == g).await;
    let (_, room) = api(survivor.addr, "GET", "/api/rooms/g", Value::Null).await;
    assert_eq!(support::user_ids(&room), ["lee", "olga"], "{room}");
    // A ghost user back on the survivor joins and leaves with notices, as any user.
    let mut g1 = user_on(&survivor, "g1").await;
    g1.join("g").await;
    assert_eq!(olga.expect("user_joined").await["userId"], "g1");
    g1.send("leave_room", json!({"room": "g"})).await;
    assert_eq!(olga.expect("user_left").await["userId"], "g1");
}

#[tokio::test]
async fn messages_queued_for_a_stalled_redis_are_answered_before_a_stopping_node_closes() {
    let redis = RedisServer::start();
    let mut nodes = cluster(&redis, &[1]).await;
    let mut alice = user_on(&nodes[0], "alice").await;
    alice.join("s").await;
    assert_eq!(publish_surely(&mut alice, "s", "before").await, 1);
    redis.pause();
    for i in 0..5 {
        alice.chat("s", &format!("stalled{i}")).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = nodes.remove(0);
    let stopped = tokio::spawn(async move {
        let mut node = stopping;
        node.stop().await;
    });
    // Every message gets an answer before the close: refused (not sent), or "maybe" for the one
    // on its way when Redis stopped answering.
    let mut answers = Vec::new();
    for reply in until_going_away(&mut alice).await {
        assert_eq!(reply["type"], "error", "{reply}");
        answers.push(reply["error"].as_str().unwrap().to_owned());
    }
    // "Maybe" for what was on its way when Redis stopped answering (one batch), "retry" for
    // what was still queued.
    let maybe = answers.iter().filter(|a| a.contains("may")).count();
    assert!(
        answers
            .iter()
            .all(|a| a == "Service unavailable: retry" || a.contains("may")),
        "{answers:?}"
    );
    redis.resume();
    stopped.await.unwrap();
    // What was refused as not sent was never published: only "maybe" ones may have been.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stalled = history(&redis, "s")
        .into_iter()
        .filter(|(_, m)| m.starts_with("stalled"))
        .count();
    assert!(stalled <= maybe, "{stalled} published, {answers:?}");
}

/// The keys of the cluster's generation now (room state only: sessions and liveness are not
/// under it).
fn generation_keys(redis: &RedisServer) -> Vec<String> {
    let mut keys: Vec<String> =
        redis.query(redis::cmd("KEYS").arg(format!("wsgate:{}:*", redis.generation())));
    keys.sort();
    keys
}

#[tokio::test]
async fn a_room_nobody_is_in_leaves_redis_with_its_history() {
    let redis = RedisServer::start();
    let url = redis.url();
    let gw = support::TestGateway::start_with(
        move |config| {
            config.broker = wsgate::config::BrokerKind::Redis;
            config.redis_url = url.into();
            config.redis_unsubscribe_grace = Duration::from_millis(200);
            config.history_ttl = Duration::from_secs(2);
        },
        1,
    );
    wait_readiness(&gw, 200).await;
    // A member who stays, quietly, past the history's time-to-live.
    let mut stays = user_on(&gw, "stays").await;
    let epoch = stays.join_room_epoch("kept").await;
    assert_eq!(publish_surely(&mut stays, "kept", "hello").await, 1);
    // A client that joins fresh rooms (one with a message) and goes.
    let mut passer = user_on(&gw, "passer").await;
    for room in ["a1", "a2", "a3"] {
        passer.join(room).await;
    }
    assert_eq!(publish_surely(&mut passer, "a1", "hi").await, 1);
    drop(passer);
    // Its rooms' presence and member counts go with their last member; what is left (their
    // position and history) expires with the history.
    wait_until("the abandoned rooms' presence is gone", || {
        let keys = generation_keys(&redis);
        !keys.iter().any(|k| {
            (k.contains(":presence:") || k.contains(":members:")) && !k.ends_with("{kept}")
        })
    })
    .await;
    for room in ["a1", "a2", "a3"] {
        let ttl: i64 = redis.query(redis::cmd("TTL").arg(redis.room_key("meta", room)));
        assert!((1..=2).contains(&ttl), "{room}: {ttl}");
    }
    wait_until_for(
        "the abandoned rooms leave Redis",
        Duration::from_secs(6),
        || {
            generation_keys(&redis).iter().all(|k| {
                k.contains("{kept}") || k.ends_with(":rooms") || k.contains(":node-rooms:")
            })
        },
    )
    .await;
    let indexed: Vec<String> =
        redis.query(redis::cmd("ZRANGE").arg(redis.rooms_key()).arg(0).arg(-1));
    assert_eq!(indexed, ["kept"]);
    // The node's own list of rooms with its members has only the room still in use.
    let node_id = stays.id.split('.').next().unwrap().to_owned();
    let listed: Vec<String> = redis.query(redis::cmd("SMEMBERS").arg(format!(
        "wsgate:{}:node-rooms:{node_id}",
        redis.generation()
    )));
    assert_eq!(listed, ["kept"]);
    // The room with a member kept its position: no new epoch, no resync, the stream goes on.
    let ttl: i64 = redis.query(redis::cmd("TTL").arg(redis.room_key("meta", "kept")));
    assert!(ttl > 3600, "{ttl}");
    assert_eq!(publish_surely(&mut stays, "kept", "still").await, 2);
    let mut late = user_on(&gw, "late").await;
    assert_eq!(late.join_room_epoch("kept").await, epoch);
}

#[tokio::test]
async fn an_idle_cluster_keeps_its_generation() {
    let redis = RedisServer::start();
    let nodes = cluster(&redis, &[1, 1]).await;
    let generation = redis.generation();
    // Connections write sessions (not room state): no room write counts in the era's clock.
    let mut clients = Vec::new();
    for n in &nodes {
        clients.push(n.client().await);
    }
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(redis.generation(), generation);
    for n in &nodes {
        assert_eq!(counter(n, "broker_generations").await, 0);
        assert_eq!(counter(n, "broker_disconnects").await, 0);
    }
}

#[tokio::test]
async fn a_redis_restored_to_an_older_generation_starts_a_newer_one() {
    let mut redis = RedisServer::start();
    let (_nodes, mut alice, mut bob) = two_members(&redis, "o").await;
    assert_eq!(publish_surely(&mut alice, "o", "first").await, 1);
    assert_eq!(bob.chats(1).await, vec![(1, "first".to_owned())]);
    let first = redis.generation();
    assert!(first.starts_with("1-"), "{first}");
    redis.save();
    let _: String = redis.query(&mut redis::cmd("FLUSHALL"));
    assert_eq!(alice.next_not_presence().await["type"], "resync");
    assert_eq!(bob.next_not_presence().await["type"], "resync");
    let second = redis.generation();
    assert!(second.starts_with("2-"), "{second}");
    assert_eq!(publish_surely(&mut alice, "o", "second").await, 1);
    assert_eq!(bob.chats(1).await, vec![(1, "second".to_owned())]);
    // Back on the snapshot of the first generation: not taken up again, a third one starts.
    redis.restart();
    assert_eq!(alice.next_not_presence().await["type"], "resync");
    assert_eq!(bob.next_not_presence().await["type"], "resync");
    let third = redis.generation();
    assert!(third.starts_with("3-"), "{third}");
    assert_eq!(publish_surely(&mut alice, "o", "third").await, 1);
    assert_eq!(bob.chats(1).await, vec![(1, "third".to_owned())]);
}

#[tokio::test]
async fn a_redis_that_goes_back_in_time_under_open_connections_hands_out_no_offset_twice() {
    let redis = RedisServer::start();
    let (_nodes, mut alice, mut bob) = two_members(&redis, "d").await;
    assert_eq!(publish_surely(&mut alice, "d", "m1").await, 1);
    assert_eq!(bob.chats(1).await, vec![(1, "m1".to_owned())]);
    redis.save();
    for (i, text) in ["m2", "m3"].iter().enumerate() {
        assert_eq!(publish_surely(&mut alice, "d", text).await, i as u64 + 2);
        assert_eq!(bob.chats(1).await, vec![(i as u64 + 2, text.to_string())]);
    }
    // Back on the snapshot in place: the nodes' connections stay open.
    let _: String = redis.query(redis::cmd("DEBUG").arg("RELOAD").arg("NOSAVE"));
    // The next message is refused (retry), never given offset 2 again; the room starts over.
    // (A beat may notice first: then the message is refused as Redis is away.)
    alice.chat("d", "n1").await;
    let mut got = Vec::new();
    for _ in 0..2 {
        let reply = alice.next_not_presence().await;
        got.push(match reply["type"].as_str() {
            Some("error") => reply["error"].as_str().unwrap().to_owned(),
            _ => reply["type"].as_str().unwrap().to_owned(),
        });
    }
    got.sort();
    assert_eq!(got, ["Service unavailable: retry", "resync"]);
    assert_eq!(bob.next_not_presence().await["type"], "resync");
    assert_eq!(publish_surely(&mut alice, "d", "n1").await, 1);
    assert_eq!(bob.chats(1).await, vec![(1, "n1".to_owned())]);
}

#[tokio::test]
async fn a_crashed_nodes_members_do_not_keep_a_room_in_redis() {
    let redis = RedisServer::start();
    let doomed = node_process(&redis);
    let survivor = node(&redis, 1);
    wait_readiness(&survivor, 200).await;
    let mut sam = user_on(&survivor, "sam").await;
    sam.join("c").await;
    let mut vic = user_on_process(&doomed, "vic").await;
    vic.join("c").await;
    assert_eq!(sam.expect("user_joined").await["userId"], "vic");
    drop(doomed);
    drop(vic);
    let left = sam
        .expect_within("user_left", Duration::from_secs(15))
        .await;
    assert_eq!(left["userId"], "vic");
    // The last live member leaves: the dead node's count does not keep the room's keys.
    sam.send("leave_room", json!({"room": "c"})).await;
    wait_until("the room's presence and counts are gone", || {
        let exists: i64 = redis.query(
            redis::cmd("EXISTS")
                .arg(redis.room_key("members", "c"))
                .arg(redis.room_key("presence", "c")),
        );
        exists == 0
    })
    .await;
    let ttl: i64 = redis.query(redis::cmd("TTL").arg(redis.room_key("meta", "c")));
    assert!(
        (1..=300).contains(&ttl),
        "the history's time-to-live: {ttl}"
    );
    let indexed: Vec<String> =
        redis.query(redis::cmd("ZRANGE").arg(redis.rooms_key()).arg(0).arg(-1));
    assert!(indexed.is_empty(), "{indexed:?}");
}

#[tokio::test]
async fn a_stopping_node_delivers_what_it_published_before_closing() {
    let redis = RedisServer::start();
    let mut nodes = cluster(&redis, &[1]).await;
    let mut alice = user_on(&nodes[0], "alice").await;
    alice.join("e").await;
    for i in 0..50 {
        alice.chat("e", &format!("m{i}")).await;
    }
    // Read by the node (an echo is answered in order, without Redis), then it stops.
    alice.send("echo", json!("read")).await;
    let mut answered = 0;
    loop {
        let msg = tokio::time::timeout(4 * PATIENCE, alice.ws.next())
            .await
            .expect("answers and the echo")
            .expect("open")
            .expect("no error");
        let Message::Text(text) = msg else { continue };
        let reply: Value = serde_json::from_str(&text).unwrap();
        match reply["type"].as_str() {
            Some("echo") => break,
            Some("chat_message" | "error") => answered += 1,
            _ => {}
        }
    }
    let mut stopping = nodes.remove(0);
    let stopped = tokio::spawn(async move { stopping.stop().await });
    answered += until_going_away(&mut alice)
        .await
        .iter()
        .filter(|reply| matches!(reply["type"].as_str(), Some("chat_message" | "error")))
        .count();
    stopped.await.unwrap();
    assert_eq!(
        answered, 50,
        "every message answered: its echo, or an error"
    );
}

#[tokio::test]
async fn a_dead_node_leaves_the_rooms_nobody_reads_and_the_nodes_list() {
    let redis = RedisServer::start();
    // A node that died long ago, as Redis would still list it.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let _: i64 = redis.query(
        redis::cmd("HSET")
            .arg("wsgate:nodes")
            .arg("long-gone")
            .arg(now_ms - 600_000),
    );
    let doomed = node_process(&redis);
    let survivor = node(&redis, 1);
    wait_readiness(&survivor, 200).await;
    let nodes: Vec<String> = redis.query(redis::cmd("HKEYS").arg("wsgate:nodes"));
    assert!(
        !nodes.contains(&"long-gone".to_owned()),
        "forgotten: {nodes:?}"
    );
    // Members on the doomed node only: the survivor follows none of these rooms.
    let mut vic = user_on_process(&doomed, "vic").await;
    for room in ["x1", "x2", "x3"] {
        vic.join(room).await;
    }
    let doomed_node = vic.id.split('.').next().unwrap().to_owned();
    wait_until("its rooms are indexed", || {
        let indexed: Vec<String> =
            redis.query(redis::cmd("ZRANGE").arg(redis.rooms_key()).arg(0).arg(-1));
        indexed.len() == 3
    })
    .await;
    drop(doomed);
    // The survivor finds it dead and sweeps its rooms: nothing of them is kept for it.
    wait_until_slowly("the dead node's rooms are swept", || {
        let keys = generation_keys(&redis);
        !keys
            .iter()
            .any(|k| k.contains(":presence:") || k.contains(":members:"))
            && !keys.iter().any(|k| k.contains(&doomed_node))
    })
    .await;
    let indexed: Vec<String> =
        redis.query(redis::cmd("ZRANGE").arg(redis.rooms_key()).arg(0).arg(-1));
    assert!(indexed.is_empty(), "{indexed:?}");
    for room in ["x1", "x2", "x3"] {
        let ttl: i64 = redis.query(redis::cmd("TTL").arg(redis.room_key("meta", room)));
        assert!((1..=300).contains(&ttl), "{room}: {ttl}");
    }
}

#[tokio::test]
async fn an_era_record_that_is_not_wsgates_is_replaced_once_and_nothing_is_published_twice() {
    let redis = RedisServer::start();
    let (nodes, mut alice, mut bob) = two_members(&redis, "z").await;
    assert_eq!(publish_surely(&mut alice, "z", "first").await, 1);
    assert_eq!(bob.chats(1).await, vec![(1, "first".to_owned())]);
    let first = redis.generation();
    // A clock HINCRBY cannot count on, then a forged generation name.
    for (field, value) in [("clock", "1e3"), ("gen", "99999999999999999999-zz")] {
        let _: i64 = redis.query(redis::cmd("HSET").arg("wsgate:era").arg(field).arg(value));
        // The room starts over (once); a message refused meanwhile ("retry") was not published:
        // sent again until it is, it reaches bob exactly once.
        assert_eq!(alice.next_not_presence().await["type"], "resync");
        assert_eq!(bob.next_not_presence().await["type"], "resync");
        let offset = publish_surely(&mut alice, "z", value).await;
        assert_eq!(bob.chats(1).await, vec![(offset, value.to_owned())]);
        bob.expect_silence().await;
    }
    // It settled: the same generation for three beats, every node ready.
    let settled = redis.generation();
    assert_ne!(settled, first);
    assert!(settled.starts_with("3-"), "{settled}");
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(redis.generation(), settled);
    for n in &nodes {
        wait_readiness(n, 200).await;
    }
    let malformed =
        counter(&nodes[0], "broker_malformed").await + counter(&nodes[1], "broker_malformed").await;
    assert!(malformed >= 2, "{malformed}");
    // Only the current generation's keys are left.
    wait_until("earlier generations' keys are deleted", || {
        let keys: Vec<String> = redis.query(redis::cmd("KEYS").arg("wsgate:[0-9]*"));
        keys.iter()
            .all(|k| k.starts_with(&format!("wsgate:{settled}:")))
    })
    .await;
}
