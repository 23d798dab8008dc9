//! Close codes: the one table of why wsgate closes a connection (RFC 6455 §7.4 plus our own).
//!
//! | code | name              | sent when                                                      |
//! |------|-------------------|----------------------------------------------------------------|
//! | 1000 | normal            | answering a client's close without a code (a code is echoed);  |
//! |      |                   | "heartbeat timeout" for a peer that did not answer a ping      |
//! | 1001 | going away        | the server shuts down ("server shutting down")                 |
//! | 1002 | protocol error    | an RFC 6455 violation: unmasked frame, RSV bit, bad opcode, …  |
//! | 1007 | invalid payload   | a text message or close reason that is not UTF-8               |
//! | 1008 | policy violation  | slow consumer: a broadcast would pass `max_queued_bytes`;      |
//! |      |                   | "rate limit exceeded": flooding past the rate limit's strikes  |
//! | 1009 | message too big   | a message over `max_message_size`                              |
//! | 4001 | token expired     | the connection's JWT expired without a `refresh`               |

/// Why a connection must be failed: the close code and reason to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameError {
    pub code: CloseCode,
    pub reason: &'static str,
}

impl FrameError {
    pub(super) const fn protocol(reason: &'static str) -> Self {
        FrameError {
            code: CloseCode::PROTOCOL_ERROR,
            reason,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloseCode(pub u16);

impl CloseCode {
    pub const NORMAL: CloseCode = CloseCode(1000);
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    pub const PROTOCOL_ERROR: CloseCode = CloseCode(1002);
    pub const INVALID_PAYLOAD: CloseCode = CloseCode(1007);
    pub const POLICY_VIOLATION: CloseCode = CloseCode(1008);
    pub const MESSAGE_TOO_BIG: CloseCode = CloseCode(1009);
    /// The server cannot serve the connection now (a backend it needs is away).
    pub const TRY_AGAIN_LATER: CloseCode = CloseCode(1013);
    pub const TOKEN_EXPIRED: CloseCode = CloseCode(4001);
    /// An upgrade refused for its token, told to a client that offered the `wsgate` subprotocol
    /// (browsers cannot read a 401).
    pub const UNAUTHORIZED: CloseCode = CloseCode(4401);
    /// A connection refused (a 403's close code): its `Origin` at the upgrade, told the same way,
    /// or by the connect proxy without a code of its own.
    pub const FORBIDDEN: CloseCode = CloseCode(4403);

    /// Whether a peer may send this code in a close frame (RFC 6455 §7.4.1–2).
    fn is_valid_on_wire(self) -> bool {
        matches!(self.0, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

/// A received close frame's status code and reason.
#[derive(Debug, PartialEq, Eq)]
pub struct CloseFrame<'a> {
    pub code: CloseCode,
    pub reason: &'a str,
}

impl<'a> CloseFrame<'a> {
    /// Parses a close frame payload; `None` is a close without a status code.
    pub fn parse(payload: &'a [u8]) -> Result<Option<Self>, FrameError> {
        match payload {
            [] => Ok(None),
            [_] => Err(FrameError {
                code: CloseCode::PROTOCOL_ERROR,
                reason: "close frame with a 1-byte payload",
            }),
            [hi, lo, reason @ ..] => {
                let code = CloseCode(u16::from_be_bytes([*hi, *lo]));
                if !code.is_valid_on_wire() {
                    return Err(FrameError {
                        code: CloseCode::PROTOCOL_ERROR,
                        reason: "invalid close code",
                    });
                }
                let reason = std::str::from_utf8(reason).map_err(|_| FrameError {
                    code: CloseCode::INVALID_PAYLOAD,
                    reason: "close reason is not UTF-8",
                })?;
                Ok(Some(CloseFrame { code, reason }))
            }
        }
    }
}
