//! Room streams on one node: every room message has an offset, every member sees the room's
//! messages in one order whichever shard they come from, a join during traffic starts right after
//! its reply's offset, and a client that reconnects with `since` gets exactly what it missed — or
//! is told it cannot, never given part of it.

mod support;

use serde_json::{Value, json};
use support::{Client, TestGateway, http_get};

#[tokio::test]
async fn concurrent_publishers_on_every_shard_give_every_member_the_same_order() {
    const EACH: usize = 100;
    let gw = TestGateway::start(2);
    let mut members = Vec::new();
    for shard in [0, 1, 0, 1] {
        let mut c = gw.client_on_shard(shard).await;
        c.join("order").await;
        members.push(c);
    }
    // Two publishers (one per shard) send at the same time.
    let (mut p0, mut p1) = (members.remove(0), members.remove(0));
    let sending = tokio::join!(
        async {
            for i in 0..EACH {
                p0.chat("order", &format!("a{i}")).await;
            }
        },
        async {
            for i in 0..EACH {
                p1.chat("order", &format!("b{i}")).await;
            }
        }
    );
    let _: ((), ()) = sending;
    members.push(p0);
    members.push(p1);
    let mut seen = Vec::new();
    for member in &mut members {
        seen.push(member.chats(2 * EACH).await);
    }
    for (offsets, expected) in seen[0].iter().map(|(o, _)| *o).zip(1..) {
        assert_eq!(offsets, expected, "gap-free offsets from 1");
    }
    for other in &seen[1..] {
        assert_eq!(*other, seen[0], "the same order for every member");
    }
    // Each sender's messages in the order sent.
    for prefix in ["a", "b"] {
        let mine: Vec<&String> = seen[0]
            .iter()
            .map(|(_, m)| m)
            .filter(|m| m.starts_with(prefix))
            .collect();
        let sent: Vec<String> = (0..EACH).map(|i| format!("{prefix}{i}")).collect();
        assert_eq!(mine, sent.iter().collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn a_join_during_traffic_starts_right_after_its_replys_offset() {
    let gw = TestGateway::start(2);
    let mut talker = gw.client_on_shard(0).await;
    talker.join("busy").await;
    let (joined_tx, mut joined_rx) = tokio::sync::oneshot::channel::<()>();
    // Talks until 100 messages after the join, to a bound of 1,000,000 messages or 20 s (under
    // a loaded machine, finding a client on shard 1 takes a while).
    let talking = tokio::spawn(async move {
        let mut after_join = None;
        let deadline = tokio::time::Instant::now() + 4 * support::PATIENCE;
        for i in 0..1_000_000u32 {
            if tokio::time::Instant::now() > deadline {
                break;
            }
            talker.chat("busy", &i.to_string()).await;
            if after_join.is_none() && joined_rx.try_recv().is_ok() {
                after_join = Some(i);
            }
            if after_join.is_some_and(|at| i >= at + 100) {
                // Kept open: a client that closes with unread input resets its connection, and
                // the gateway would lose what it had not read yet.
                return (i + 1, talker);
            }
            tokio::task::yield_now().await;
        }
        panic!("the join never happened");
    });
    // Join from the other shard while messages flow.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let mut late = gw.client_on_shard(1).await;
    let joined = late.join_since("busy", None).await;
    joined_tx.send(()).unwrap();
    let start = joined["offset"].as_u64().unwrap();
    assert!(start > 0, "messages were flowing");
    assert!(joined["epoch"].is_string());
    assert!(
        joined.get("recovered").is_none(),
        "only for a join with since"
    );
    let (sent, _talker) = talking.await.unwrap();
    let sent = u64::from(sent);
    let got = late.chats((sent - start) as usize).await;
    let offsets: Vec<u64> = got.iter().map(|(o, _)| *o).collect();
    assert_eq!(
        offsets,
        (start + 1..=sent).collect::<Vec<_>>(),
        "nothing before the join, nothing missed after it"
    );
}

#[tokio::test]
async fn a_reconnecting_client_gets_exactly_what_it_missed() {
    let gw = TestGateway::start(2);
    let mut stays = gw.client_on_shard(0).await;
    stays.join("r").await;
    let mut leaves = gw.client_on_shard(1).await;
    let joined = leaves.join_since("r", None).await;
    let epoch = joined["epoch"].as_str().unwrap().to_owned();
    stays.chat("r", "before").await;
    let last_seen = leaves.chats(1).await[0].0;
    stays.chats(1).await;
    drop(leaves);
    // Its leave is through before it comes back (else `back` could see it).
    assert_eq!(stays.expect("user_left").await["userId"], "anonymous");
    for i in 0..3 {
        stays.chat("r", &format!("missed {i}")).await;
    }
    stays.chats(3).await;

    // Back, on either shard, with where it was.
    let mut back = gw.client().await;
    let rejoined = back.join_since("r", Some((last_seen, &epoch))).await;
    assert_eq!(rejoined["recovered"], true, "{rejoined}");
    assert_eq!(rejoined["offset"], last_seen + 3);
    let missed = back.chats(3).await;
    assert_eq!(
        missed,
        (0..3)
            .map(|i| (last_seen + 1 + i, format!("missed {i}")))
            .collect::<Vec<_>>()
    );
    // Then live messages, none twice.
    stays.chat("r", "live").await;
    assert_eq!(
        back.chats(1).await,
        vec![(last_seen + 4, "live".to_owned())]
    );
    back.expect_silence().await;
}

#[tokio::test]
async fn what_cannot_be_recovered_whole_is_not_recovered_at_all() {
    let gw = TestGateway::start_with(|c| c.history_size = 2, 1);
    let mut a = gw.client().await;
    let epoch = a.join_room_epoch("r").await;
    for i in 0..5 {
        a.chat("r", &i.to_string()).await;
    }
    a.chats(5).await;
    let mut b = gw.client().await;
    // Offsets 2..=5 missed, but only 4 and 5 are kept: no partial replay.
    let joined = b.join_since("r", Some((1, &epoch))).await;
    assert_eq!(
        (&joined["recovered"], &joined["offset"]),
        (&json!(false), &json!(5))
    );
    // Another epoch (the stream started over): nothing either.
    let mut c = gw.client().await;
    let joined = c.join_since("r", Some((4, "0bad0bad"))).await;
    assert_eq!(joined["recovered"], false);
    // What is still kept is given.
    let mut d = gw.client().await;
    let joined = d.join_since("r", Some((3, &epoch))).await;
    assert_eq!(joined["recovered"], true);
    assert_eq!(
        d.chats(2).await,
        vec![(4, "3".to_owned()), (5, "4".to_owned())]
    );
    // Nothing else was replayed to anyone: the next message each gets is the live one.
    a.chat("r", "live").await;
    for client in [&mut b, &mut c, &mut d] {
        assert_eq!(client.chats(1).await, vec![(6, "live".to_owned())]);
    }
}

#[tokio::test]
async fn a_room_keeps_its_history_after_its_last_member_left() {
    let gw = TestGateway::start(1);
    let mut a = gw.client().await;
    let epoch = a.join_room_epoch("quiet").await;
    a.chat("quiet", "one").await;
    a.chats(1).await;
    drop(a);
    gw.wait_for_connections(0).await;
    let (_, _, body) = http_get(gw.addr, "/healthz", "").await;
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["rooms"], 0, "no room with members");
    let mut b = gw.client().await;
    let joined = b.join_since("quiet", Some((0, &epoch))).await;
    assert_eq!(
        (&joined["recovered"], &joined["epoch"]),
        (&json!(true), &json!(epoch))
    );
    assert_eq!(b.chats(1).await, vec![(1, "one".to_owned())]);
}

/// A sender on shard 0 and a receiver on shard 1 in room "burst", with a small inbox per shard.
async fn burst_room(history: usize) -> (TestGateway, Client, Client) {
    let gw = TestGateway::start_with(
        |c| {
            c.max_shard_inbox_bytes = 2048;
            c.history_size = history;
        },
        2,
    );
    let mut sender = gw.client_on_shard(0).await;
    sender.join("burst").await;
    let mut receiver = gw.client_on_shard(1).await;
    receiver.join("burst").await;
    sender.expect("user_joined").await;
    (gw, sender, receiver)
}

/// Sends a burst of 100 messages (faster than a 2 KiB inbox takes them), then, once it is
/// delivered, `marker`, which reveals a gap if there is one. Returns the offsets the receiver got
/// up to the marker, and whether it was told to resync.
async fn burst(sender: &mut Client, receiver: &mut Client, marker: &str) -> (Vec<u64>, bool) {
    let text = "x".repeat(200);
    for _ in 0..100 {
        sender.chat("burst", &text).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    sender.chat("burst", marker).await;
    let (mut offsets, mut resynced) = (Vec::new(), false);
    loop {
        let msg = receiver.recv().await;
        match msg["type"].as_str() {
            Some("chat_message") => {
                offsets.push(msg["offset"].as_u64().unwrap());
                if msg["message"] == marker {
                    return (offsets, resynced);
                }
            }
            Some("resync") => {
                assert_eq!(msg["room"], "burst");
                resynced = true;
            }
            _ => panic!("unexpected {msg}"),
        }
    }
}

#[tokio::test]
async fn messages_lost_between_shards_are_filled_from_history() {
    let (gw, mut sender, mut receiver) = burst_room(1000).await;
    // Drops land on either shard's inbox: burst until the receiver's shard (1) lost some.
    for attempt in 0..10 {
        let before = receiver_shard_drops(&gw).await;
        let (offsets, resynced) = burst(&mut sender, &mut receiver, &format!("m{attempt}")).await;
        let first = offsets[0];
        assert_eq!(
            offsets,
            (first..first + 101).collect::<Vec<_>>(),
            "every one, in order"
        );
        assert!(!resynced);
        if receiver_shard_drops(&gw).await > before {
            return;
        }
    }
    panic!("the receiver's inbox never overflowed in 10 bursts");
}

async fn receiver_shard_drops(gw: &TestGateway) -> u64 {
    health(gw).await["inbox_dropped_by_shard"][1]
        .as_u64()
        .unwrap()
}

#[tokio::test]
async fn without_history_members_that_lost_messages_are_told_to_resync() {
    let (gw, mut sender, mut receiver) = burst_room(0).await;
    // Drops land on either shard's inbox: burst until the receiver's lost some.
    for attempt in 0..10 {
        let (offsets, resynced) = burst(&mut sender, &mut receiver, &format!("m{attempt}")).await;
        let gap = offsets.windows(2).any(|w| w[1] != w[0] + 1);
        assert_eq!(
            gap, resynced,
            "a gap is always told, and only a gap: {offsets:?}"
        );
        if resynced {
            assert!(health(&gw).await["refused"]["resyncs"].as_u64().unwrap() > 0);
            return;
        }
    }
    panic!("the receiver's inbox never overflowed in 10 bursts");
}

async fn health(gw: &TestGateway) -> Value {
    let (_, _, body) = http_get(gw.addr, "/healthz", "").await;
    serde_json::from_str(&body).unwrap()
}
