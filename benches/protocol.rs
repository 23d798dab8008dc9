//! JSON protocol: parsing real client messages with simd-json in place (the gateway's path)
//! against serde_json, and serializing + framing a server message.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use serde::Deserialize;
use wsgate::protocol::{ClientMessage, JsonParser, ServerMessage};

const MESSAGES: &[(&str, &str)] = &[
    (
        "join_room",
        r#"{"type":"join_room","payload":{"room":"general"}}"#,
    ),
    (
        "chat_message",
        r#"{"type":"chat_message","payload":{"room":"general","message":"Hello everyone, how is the migration going? Ping me when the dashboards are back."}}"#,
    ),
    (
        "typing",
        r#"{"type":"typing","payload":{"room":"general","isTyping":true}}"#,
    ),
];

/// What serde_json needs to read the same messages, borrowing strings where it can.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    payload: Option<Payload<'a>>,
}

#[derive(Deserialize)]
struct Payload<'a> {
    #[serde(borrow)]
    room: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    message: Option<std::borrow::Cow<'a, str>>,
    #[serde(rename = "isTyping")]
    is_typing: Option<bool>,
}

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("protocol/parse");
    for (name, json) in MESSAGES {
        group.throughput(Throughput::Bytes(json.len() as u64));
        group.bench_with_input(BenchmarkId::new("simd-json-tape", name), json, |b, json| {
            let mut parser = JsonParser::default();
            let mut buf = json.as_bytes().to_vec();
            b.iter(|| {
                // simd-json unescapes in place, so each round starts from a fresh copy.
                buf.copy_from_slice(json.as_bytes());
                parser.parse(black_box(&mut buf), |m| match m {
                    Ok(ClientMessage::JoinRoom { room, .. }) => room.len(),
                    Ok(ClientMessage::Chat { message, .. }) => message.len(),
                    Ok(ClientMessage::Typing { is_typing, .. }) => is_typing as usize,
                    _ => unreachable!(),
                })
            });
        });
        group.bench_with_input(BenchmarkId::new("serde_json", name), json, |b, json| {
            b.iter(|| {
                let env: Envelope = serde_json::from_str(black_box(json)).unwrap();
                let p = env.payload.unwrap();
                env.kind.len()
                    + p.room.map_or(0, |r| r.len())
                    + p.message.map_or(0, |m| m.len())
                    + p.is_typing.unwrap_or(false) as usize
            });
        });
    }
    group.finish();
}

fn encode(c: &mut Criterion) {
    c.bench_function("protocol/encode/chat_message", |b| {
        b.iter(|| {
            ServerMessage::ChatMessage {
                room: black_box("general"),
                username: "Anonymous",
                user_id: "anonymous",
                message: black_box("Hello everyone, how is the migration going?"),
                timestamp: 1_764_000_000_000,
            }
            .encode()
        })
    });
}

criterion_group!(benches, parse, encode);
criterion_main!(benches);
