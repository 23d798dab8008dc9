//! Sending to Redis what the shards queued: records (presence, sessions) and room messages and
//! notices, in pipelines of up to [`PUBLISH_BATCH`] commands, in the order queued.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ::redis::aio::MultiplexedConnection;
use ::redis::{FromRedisValue, RedisError, RedisResult, Value};
use tokio_util::sync::CancellationToken;

use super::keys::{
    BROADCAST_CHANNEL, CONTROL_CHANNEL, ERA_CHANGED, ERA_KEY, Scripts, USERS_CHANNEL, room_channel,
    sessions_key,
};
use super::{META_TTL, NODE_TTL, Outgoing, Queues, Record, empty_room_ttl};
use crate::broker::{Host, Membership, Publisher};
use crate::protocol::ErrorReply;
use crate::rooms::Target;
use crate::rooms::presence::Entry;
use crate::rooms::stream::{Position, new_epoch};

/// Commands per pipeline sent to Redis, at most.
const PUBLISH_BATCH: usize = 512;

/// Why the publisher stopped: the error, and the rooms whose presence records may not have
/// reached Redis (to be written whole at the next connection).
pub struct Failed {
    pub error: RedisError,
    pub rooms: Vec<Arc<str>>,
}

/// Sends what is queued until stopped or a pipeline fails; returns the queues (for the next
/// connection), and why it failed. A room message Redis refused is refused to its sender; one
/// whose fate is unknown (the connection failed on the way) is reported as such. A presence or
/// session record Redis refused ends the connection: the next one writes them whole. So does a
/// script run under a generation that is no longer the cluster's (its message is refused:
/// nothing was written). Once `stop`ped, the room messages already queued are still sent (their
/// senders get an answer before the node closes their connections); records are not (the
/// node's goodbye supersedes them).
///
/// `clock` is raised to the highest era clock the writes got (see `era.lua`).
pub async fn publish_loop(
    mut conn: MultiplexedConnection,
    scripts: Arc<Scripts>,
    mut queues: Queues,
    node: Host,
    clock: Arc<AtomicU64>,
    stop: CancellationToken,
) -> (Queues, Option<Failed>) {
    let mut records = Vec::with_capacity(PUBLISH_BATCH);
    let mut outgoing = Vec::with_capacity(PUBLISH_BATCH);
    loop {
        if stop.is_cancelled() {
            records.clear();
            if queues.outgoing.is_empty() {
                return (queues, None);
            }
        } else {
            let taken = tokio::select! {
                _ = stop.cancelled() => continue,
                taken = queues.records.recv_many(&mut records, PUBLISH_BATCH) => taken,
                taken = queues.outgoing.recv_many(&mut outgoing, PUBLISH_BATCH) => taken,
            };
            if taken == 0 {
                // Every sender is gone: the node is stopping.
                return (queues, None);
            }
            while records.len() < PUBLISH_BATCH
                && let Ok(record) = queues.records.try_recv()
            {
                records.push(record);
            }
        }
        while outgoing.len() < PUBLISH_BATCH
            && let Ok(out) = queues.outgoing.try_recv()
        {
            outgoing.push(out);
        }
        let seen = clock.load(Ordering::Relaxed);
        let mut pipe = ::redis::pipe();
        pipe.ignore_errors();
        // Where the presence scripts' answers (the era's clock, and the changes of who is in
        // the room) are in the pipeline's; the sessions' commands answer counts of their own.
        let mut clocks = Vec::with_capacity(records.len());
        for record in &records {
            if matches!(record, Record::Presence { .. }) {
                clocks.push(pipe.len());
            }
            add_record(&mut pipe, &scripts, &node, record, seen);
        }
        // Where each room message's answer is in the pipeline's.
        let first_outgoing = pipe.len();
        for out in &outgoing {
            add_outgoing(&mut pipe, &scripts, &node, out, seen);
        }
        let sent: RedisResult<Vec<Value>> = pipe.query_async(&mut conn).await;
        let rooms = records.drain(..).filter_map(|record| match record {
            Record::Presence { room, .. } => Some(room),
            _ => None,
        });
        let answers = match sent {
            Ok(answers) => answers,
            Err(error) => {
                // Redis may have run any of them: the senders are told it is unknown.
                for out in outgoing.drain(..) {
                    refuse(&node, out, ErrorReply::MaybeUnavailable);
                }
                let rooms = rooms.collect();
                return (queues, Some(Failed { error, rooms }));
            }
        };
        let mut failure = answers[..first_outgoing]
            .iter()
            .find_map(|answer| match answer {
                Value::ServerError(error) => Some(error.clone()),
                _ => None,
            });
        for &at in &clocks {
            if let Some(written) = presence_answer(&node, &answers[at]) {
                raise(&clock, written);
            }
        }
        let answers = answers.into_iter().skip(first_outgoing);
        for (out, answer) in outgoing.drain(..).zip(answers) {
            if let Outgoing::Control { published, .. } = out {
                // PUBLISH's answer: how many subscribers the order reached.
                if let Value::Int(subscribers) = answer {
                    let _ = published.send(u64::try_from(subscribers).unwrap_or(0));
                }
                continue;
            }
            match answer {
                Value::ServerError(error) => {
                    if error.code() == ERA_CHANGED {
                        failure = Some(error);
                    }
                    refuse(&node, out, ErrorReply::Unavailable);
                }
                answer => {
                    // The publish script's answer: the offset, the era's clock, the epoch.
                    let position = match <(u64, i64, String)>::from_redis_value(answer) {
                        Ok((offset, written, epoch)) => {
                            raise(&clock, written);
                            Some(Position {
                                offset,
                                epoch: epoch.into(),
                            })
                        }
                        Err(_) => None,
                    };
                    if let (
                        Some(position),
                        Outgoing::Message {
                            room,
                            message,
                            from: Publisher::Client(..),
                            ..
                        },
                    ) = (&position, &out)
                    {
                        node.events.client_published(room, message, position.offset);
                    }
                    match out {
                        Outgoing::Message {
                            from: Publisher::Api(reply),
                            ..
                        } => {
                            let _ = reply.send(position.ok_or(ErrorReply::MaybeUnavailable));
                        }
                        Outgoing::Message {
                            from: Publisher::Client(client, Some(request)),
                            ..
                        } => match position {
                            Some(position) => {
                                node.events.published(client, request, position.offset);
                            }
                            None => {
                                let maybe = ErrorReply::MaybeUnavailable;
                                node.events.refused(client, Some(request), maybe);
                            }
                        },
                        _ => {}
                    }
                }
            }
        }
        if let Some(error) = failure {
            let error = RedisError::from(std::io::Error::other(format!(
                "Redis refused a write ({}): reconnecting",
                error.details().unwrap_or(error.code())
            )));
            let rooms = rooms.collect();
            return (queues, Some(Failed { error, rooms }));
        }
    }
}

/// A presence script's answer (presence.lua, presence_node.lua): the era's clock it wrote, after
/// the changes of who is in the room it made are reported to the node.
pub fn presence_answer(node: &Host, answer: &Value) -> Option<i64> {
    let Value::Array(values) = answer else {
        return None;
    };
    let (Value::Int(written), changes) = values.split_first()? else {
        return None;
    };
    report_memberships(node, changes);
    Some(*written)
}

/// Reports the changes of who is in rooms a script made and counted: four values each (see
/// lib.lua's note_change) — the room, the user's presence entry (nil: the room itself), its
/// connections before and after. Anything else is skipped.
pub fn report_memberships(node: &Host, values: &[Value]) {
    for change in values.chunks_exact(4) {
        let counts = (
            String::from_redis_value(change[0].clone()),
            u64::from_redis_value(change[2].clone()),
            u64::from_redis_value(change[3].clone()),
        );
        let (Ok(room), Ok(before), Ok(after)) = counts else {
            continue;
        };
        let room: Arc<str> = room.into();
        let membership = match &change[1] {
            Value::Nil => Membership::Room {
                room,
                occupied: before == 0,
            },
            entry => {
                let json = Vec::<u8>::from_redis_value(entry.clone()).unwrap_or_default();
                let Ok(user) = serde_json::from_slice::<Entry>(&json) else {
                    continue;
                };
                Membership::User {
                    room,
                    user,
                    added: before == 0,
                }
            }
        };
        if (before == 0) != (after == 0) {
            node.events.membership(membership);
        }
    }
}

/// Raises the highest era clock seen to `written`.
pub fn raise(clock: &AtomicU64, written: i64) {
    clock.fetch_max(u64::try_from(written).unwrap_or(0), Ordering::Relaxed);
}

/// Adds `record` to `pipe`; `seen` is the highest era clock the node saw (see `era.lua`).
fn add_record(
    pipe: &mut ::redis::Pipeline,
    scripts: &Scripts,
    node: &Host,
    record: &Record,
    seen: u64,
) {
    let node_id = &*node.shared.id;
    match record {
        Record::Presence { room, entry, seq } => {
            let keys = &scripts.keys;
            let written = keys.presence_writes(room, node_id);
            pipe.cmd("EVALSHA")
                .arg(&scripts.presence)
                .arg(written.len())
                .arg(&written)
                .arg(node_id)
                .arg(&*entry.user_id)
                .arg(entry_json(entry))
                .arg(entry.conns)
                .arg(seq)
                .arg(room_channel(room))
                .arg(META_TTL.as_secs())
                .arg(&**room)
                .arg(keys.generation())
                .arg(empty_room_ttl(node.shared.rooms.history_limits()))
                .arg(seen);
        }
        Record::SessionOpened { client_id, record } => {
            let sessions = sessions_key(node_id);
            pipe.cmd("HSET").arg(&sessions).arg(client_id).arg(record);
            // A hash made here lives as long as the node's beats say, and no longer.
            pipe.cmd("PEXPIRE")
                .arg(&sessions)
                .arg(NODE_TTL.as_millis() as u64);
        }
        Record::SessionClosed { client_id } => {
            pipe.cmd("HDEL").arg(sessions_key(node_id)).arg(client_id);
        }
    }
}

/// Adds `out` to `pipe`; `seen` as for [`add_record`].
fn add_outgoing(
    pipe: &mut ::redis::Pipeline,
    scripts: &Scripts,
    node: &Host,
    out: &Outgoing,
    seen: u64,
) {
    match out {
        Outgoing::Message {
            room,
            message,
            dedup,
            ..
        } => {
            let limits = node.shared.rooms.history_limits();
            let keys = &scripts.keys;
            let script = pipe.cmd("EVALSHA").arg(&scripts.publish);
            script.arg(if dedup.is_some() { 5 } else { 4 });
            script
                .arg(keys.meta(room))
                .arg(keys.history(room))
                .arg(ERA_KEY)
                .arg(keys.members(room));
            if let Some(key) = dedup {
                script.arg(keys.dedup(room, key));
            }
            script
                .arg(message.as_slice())
                .arg(limits.size)
                .arg(limits.ttl.as_secs().max(1))
                .arg(META_TTL.as_secs())
                .arg(room_channel(room))
                .arg(&*new_epoch())
                .arg(keys.generation())
                .arg(seen)
                .arg(node.shared.config.dedup_window.as_secs().max(1));
        }
        Outgoing::Notice { target, payload } => {
            let origin = node.shared.id.as_bytes();
            let (channel, envelope) = match target {
                Target::Room(room) => (room_channel(room), [b"p", origin, b"\n", payload].concat()),
                Target::All => (
                    BROADCAST_CHANNEL.to_owned(),
                    [origin, b"\n", payload].concat(),
                ),
                Target::User(user) => {
                    // As a JSON string: a user id may hold any character, a line break too.
                    let user = serde_json::to_vec(&**user).expect("a string serializes");
                    let envelope = [origin, b"\n", &user, b"\n", payload].concat();
                    (USERS_CHANNEL.to_owned(), envelope)
                }
            };
            pipe.cmd("PUBLISH").arg(channel).arg(envelope);
        }
        Outgoing::Control { payload, .. } => {
            let envelope = [node.shared.id.as_bytes(), b"\n", payload].concat();
            pipe.cmd("PUBLISH").arg(CONTROL_CHANNEL).arg(envelope);
        }
    }
}

/// A presence entry as stored and published.
pub fn entry_json(entry: &Entry) -> Vec<u8> {
    serde_json::to_vec(entry).expect("serializing to memory cannot fail")
}

/// Tells the sender of a room message `error`; counts a notice not shared.
pub fn refuse(node: &Host, out: Outgoing, error: ErrorReply<'static>) {
    match out {
        Outgoing::Message { from, .. } => {
            node.shared
                .counters
                .broker_unavailable
                .fetch_add(1, Ordering::Relaxed);
            match from {
                Publisher::Client(client, request) => {
                    node.events.refused(client, request, error);
                }
                Publisher::Api(reply) => {
                    let _ = reply.send(Err(error));
                }
            }
        }
        Outgoing::Notice { .. } => {
            node.shared
                .counters
                .broker_notices_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
        // Its asker hears it was not published (`published` dropped), and counts it.
        Outgoing::Control { .. } => {}
    }
}
