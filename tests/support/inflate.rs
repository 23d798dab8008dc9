//! permessage-deflate's receiving side, as a client that keeps no more window than it asked for:
//! for the integration tests and the unit tests, independently of wsgate's own inflater.

use flate2::{Decompress, FlushDecompress};

/// Inflates a compressed message's payload (sync tail stripped) with a window of `window_bits`
/// (9 to 15), into 64-byte pieces, so that every back-reference must come from the window (zlib
/// serves them from the output when it can). Panics if the data needs a larger window.
pub fn inflate_in_window(payload: &[u8], window_bits: u8) -> Vec<u8> {
    let input = [payload, &[0, 0, 0xff, 0xff]].concat();
    let mut inflater = Decompress::new_with_window_bits(false, window_bits);
    let (mut out, mut piece, mut at) = (Vec::new(), [0u8; 64], 0);
    loop {
        let before = (inflater.total_in(), inflater.total_out());
        inflater
            .decompress(&input[at..], &mut piece, FlushDecompress::Sync)
            .unwrap_or_else(|e| panic!("inflates within a {window_bits}-bit window: {e}"));
        at += (inflater.total_in() - before.0) as usize;
        let n = (inflater.total_out() - before.1) as usize;
        out.extend_from_slice(&piece[..n]);
        if n < piece.len() && (at == input.len() || inflater.total_in() == before.0) {
            return out;
        }
    }
}
