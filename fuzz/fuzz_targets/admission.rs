//! Admission under any sequence of sockets and upgrades opening and closing: its counts match a
//! model, per-address caps hold, and every place given back is reusable.
#![no_main]

use std::collections::HashMap;
use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use wsgate::Config;
use wsgate::conn::limits::{Admission, Refusal};

const MAX_SOCKETS: usize = 8;
const MAX_PER_IP: u32 = 3;
const MAX_WEBSOCKETS: usize = 5;

fuzz_target!(|ops: Vec<(u8, u8)>| {
    let config = Config {
        max_connections: MAX_WEBSOCKETS,
        max_connections_per_ip: MAX_PER_IP,
        max_handshakes_per_ip: 1e9,
        ..Config::default()
    };
    let admission = Admission::new(&config, MAX_SOCKETS);
    // The model: open sockets per address, and how many of them are WebSockets.
    let mut sockets: HashMap<IpAddr, (u32, u32)> = HashMap::new();
    for (op, who) in ops {
        let ip = IpAddr::from([10, 0, 0, who % 4]);
        let (open, upgraded) = sockets.entry(ip).or_default();
        match op % 4 {
            0 => match admission.admit_socket(Some(ip)) {
                Ok(()) => *open += 1,
                Err(Refusal::TooManyConnections) => assert_eq!(*open, MAX_PER_IP),
                Err(refusal) => assert_eq!(refusal, Refusal::ServerFull),
            },
            1 if *open > *upgraded => {
                admission.release_socket(ip);
                *open -= 1;
            }
            2 if *open > *upgraded => {
                if admission.admit_upgrade(ip).is_ok() {
                    *upgraded += 1;
                }
            }
            3 if *upgraded > 0 => {
                admission.release_upgrade();
                admission.release_socket(ip);
                *upgraded -= 1;
                *open -= 1;
            }
            _ => {}
        }
        let open_total: u32 = sockets.values().map(|(o, _)| o).sum();
        let upgraded_total: u32 = sockets.values().map(|(_, u)| u).sum();
        assert_eq!(admission.sockets(), open_total as usize);
        assert!(open_total as usize <= MAX_SOCKETS);
        assert!(upgraded_total as usize <= MAX_WEBSOCKETS);
        assert!(sockets.values().all(|(o, _)| *o <= MAX_PER_IP));
    }
});
