//! What nodes publish on a room's channel, and the parsing of it. Each publication starts with
//! its kind:
//! - `s<offset> <epoch>\n<JSON>`: a room message with its place in the room's stream;
//! - `u<node> <seq>\n<entry>`: a node's presence change; `U<node> <seq>\n[<entry>, …]`: all of a
//!   node's presence in the room;
//! - `p<node>\n<JSON>`: a notice (typing, a library publication); on `wsgate:broadcast` without
//!   the `p`;
//! - on `wsgate:users`: `<node>\n<user as a JSON string>\n<JSON>`: a publication for one user;
//! - on `wsgate:control`: `<node>\n{"user","code","reason","answer_id"}`: close a user's
//!   connections, and answer how many under `answer_id` (see [`super::answers`]).
//!
//! Anything else — or a message that is not a JSON object, a count that cannot be real — is not
//! wsgate's and is refused here (`None`), so that it never reaches a client.

use std::sync::Arc;

use crate::broker::Disconnect;
use crate::protocol;
use crate::rooms::presence::{Entry, MAX_CONNS};

/// A room message: its offset, its epoch and its JSON text.
pub fn room_message(envelope: &[u8]) -> Option<(u64, &str, &[u8])> {
    let (offset, epoch, json) = numbered(envelope)?;
    protocol::is_json_object(json).then_some((offset, epoch, json))
}

/// A presence change: the node, its change number, and the entries (one, or all of the node's
/// when `whole`).
pub fn presence_change(envelope: &[u8], whole: bool) -> Option<(Arc<str>, u64, Vec<Entry>)> {
    let (seq, node, json) = numbered_from(envelope)?;
    let entries = if whole {
        serde_json::from_slice::<Vec<Entry>>(json).ok()?
    } else {
        vec![serde_json::from_slice::<Entry>(json).ok()?]
    };
    entries
        .iter()
        .all(|e| e.conns <= MAX_CONNS)
        .then(|| (Arc::from(node), seq, entries))
}

/// A notice: the node it comes from, and its JSON text.
pub fn notice(envelope: &[u8]) -> Option<(&[u8], &[u8])> {
    let (origin, json) = split_line(envelope)?;
    protocol::is_json_object(json).then_some((origin, json))
}

/// A publication for one user: the node it comes from, the user, and its JSON text.
pub fn user_notice(envelope: &[u8]) -> Option<(&[u8], String, &[u8])> {
    let (origin, rest) = split_line(envelope)?;
    let (user, json) = split_line(rest)?;
    let user: String = serde_json::from_slice(user).ok()?;
    (!user.is_empty() && protocol::is_json_object(json)).then_some((origin, user, json))
}

/// An order to every node: a disconnect, and the id the asker awaits the counts under (absent
/// from nodes of versions that did not wait for them).
#[derive(serde::Serialize, serde::Deserialize)]
struct Order {
    #[serde(flatten)]
    disconnect: Disconnect,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    answer_id: Option<u64>,
}

/// The JSON of an order (see [`control`]).
pub fn control_order(disconnect: &Disconnect, answer_id: u64) -> Vec<u8> {
    let order = Order {
        disconnect: disconnect.clone(),
        answer_id: Some(answer_id),
    };
    serde_json::to_vec(&order).expect("serializing to memory cannot fail")
}

/// An order from a node: the node it comes from, the disconnect it asks for, and the id to
/// answer with, if any.
pub fn control(envelope: &[u8]) -> Option<(&[u8], Disconnect, Option<u64>)> {
    let (origin, json) = split_line(envelope)?;
    let order: Order = serde_json::from_slice(json).ok()?;
    let Disconnect { user, code, reason } = order.disconnect;
    // Checked as when it was given.
    let disconnect = Disconnect::new(&user, code, &reason).ok()?;
    Some((origin, disconnect, order.answer_id))
}

/// `<number> <word>\n<rest>`.
fn numbered(envelope: &[u8]) -> Option<(u64, &str, &[u8])> {
    let (header, rest) = split_line(envelope)?;
    let (number, word) = std::str::from_utf8(header).ok()?.split_once(' ')?;
    Some((parse_u64(number.as_bytes())?, word, rest))
}

/// `<word> <number>\n<rest>`.
fn numbered_from(envelope: &[u8]) -> Option<(u64, &str, &[u8])> {
    let (header, rest) = split_line(envelope)?;
    let (word, number) = std::str::from_utf8(header).ok()?.split_once(' ')?;
    Some((parse_u64(number.as_bytes())?, word, rest))
}

/// `head\nrest` split at the first line feed.
pub fn split_line(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let at = bytes.iter().position(|&b| b == b'\n')?;
    Some((&bytes[..at], &bytes[at + 1..]))
}

pub fn parse_u64(digits: &[u8]) -> Option<u64> {
    std::str::from_utf8(digits).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wsgates_publications_are_read_and_others_refused() {
        assert_eq!(
            room_message(b"7 ab12\n{\"a\":1}"),
            Some((7, "ab12", &b"{\"a\":1}"[..]))
        );
        for bad in [
            &b"7 ab\n{}"[..],
            b"x ab\n{\"a\":1}",
            b"7ab\n{\"a\":1}",
            b"7 ab {\"a\":1}",
        ] {
            assert_eq!(room_message(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        let (node, seq, entries) =
            presence_change(b"n1 3\n{\"user\":\"u\",\"name\":\"U\",\"conns\":2}", false).unwrap();
        assert_eq!((&*node, seq, entries[0].conns), ("n1", 3, 2));
        assert!(presence_change(b"n1 3\n[]", true).unwrap().2.is_empty());
        assert!(
            presence_change(
                b"n1 3\n{\"user\":\"u\",\"name\":\"U\",\"conns\":99999999}",
                false
            )
            .is_none()
        );
        assert_eq!(
            notice(b"n1\n{\"a\":1}"),
            Some((&b"n1"[..], &b"{\"a\":1}"[..]))
        );
        assert_eq!(notice(b"n1\n[1]"), None);
        assert_eq!(parse_u64(b"-1"), None);
    }

    #[test]
    fn orders_carry_their_answer_id_and_older_ones_are_read_without() {
        let disconnect = Disconnect::new("bob", 4003, "banned").unwrap();
        let envelope = [&b"n1\n"[..], &control_order(&disconnect, 7)].concat();
        let (origin, read, answer) = control(&envelope).unwrap();
        assert_eq!(
            (origin, &*read.user, read.code, answer),
            (&b"n1"[..], "bob", 4003, Some(7))
        );
        let older = b"n1\n{\"user\":\"bob\",\"code\":4000,\"reason\":\"\"}";
        assert_eq!(control(older).unwrap().2, None);
        let not_an_application_code = b"n1\n{\"user\":\"bob\",\"code\":1000,\"reason\":\"\"}";
        assert!(control(not_an_application_code).is_none());
    }
}
