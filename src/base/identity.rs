//! Who is on a connection: what a verified token says (or the shared anonymous identity).

use std::sync::Arc;

use serde_json::value::RawValue;

/// Who is on a connection, from its token's claims.
#[derive(Debug)]
pub struct Identity {
    pub user_id: Arc<str>,
    /// The display name; the same allocation as `user_id` when the token has no `username`.
    pub username: Arc<str>,
    pub roles: Box<[Box<str>]>,
    /// Room patterns this user may join (`None`: any room). A trailing `*` matches a prefix.
    pub rooms: Option<Box<[Box<str>]>>,
    /// When the token expires (Unix seconds); `None` for anonymous connections.
    pub expires_at: Option<u64>,
    /// Every claim of the token, as it was signed: kept only when proxies to the backend are
    /// configured (they pass them on).
    pub claims: Option<Box<RawValue>>,
}

/// The user id of token-less connections (`allow_anonymous`).
pub const ANONYMOUS_USER_ID: &str = "anonymous";

impl Identity {
    pub fn anonymous() -> Self {
        Identity {
            user_id: ANONYMOUS_USER_ID.into(),
            username: Arc::from("Anonymous"),
            roles: Box::new([]),
            rooms: None,
            expires_at: None,
            claims: None,
        }
    }

    pub fn may_join(&self, room: &str) -> bool {
        self.rooms.as_ref().is_none_or(|patterns| {
            patterns.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => room.starts_with(prefix),
                None => **p == *room,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_patterns() {
        let mut id = Identity::anonymous();
        assert!(id.may_join("anything"));
        id.rooms = Some(vec!["general".into(), "team-*".into()].into_boxed_slice());
        assert!(id.may_join("general"));
        assert!(id.may_join("team-a"));
        assert!(id.may_join("team-"));
        assert!(!id.may_join("generalx"));
        assert!(!id.may_join("team"));
    }
}
