//! Real client addresses behind proxies: from `trusted_proxies` only, the address a request is
//! for is taken from `Forwarded` (RFC 7239) or `X-Forwarded-For`; from anyone else these headers
//! are ignored (any client can send them).

use std::net::IpAddr;

use hyper::HeaderMap;
use ipnet::IpNet;

/// The peers whose word on the client's address is taken.
#[derive(Debug, Default)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Parses `trusted_proxies`: CIDR blocks (`10.0.0.0/8`, `fd00::/8`) or single addresses.
    pub fn parse(list: &[String]) -> Result<Self, String> {
        list.iter()
            .map(|entry| {
                entry
                    .parse::<IpNet>()
                    .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("{entry:?} is not an address or a CIDR block"))
            })
            .collect::<Result<_, _>>()
            .map(TrustedProxies)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client a request from `peer` is for: `peer` itself unless it is a trusted proxy; else
    /// the nearest address in the forwarding chain (`Forwarded`, or else `X-Forwarded-For`,
    /// read from the right) that is not a trusted proxy — the first one any client could have
    /// written is not believed. A hop that hid its address (`unknown`, an obfuscated name) stops
    /// the walk at the proxy that reported it. A chain that cannot be read is an error.
    pub fn client(&self, headers: &HeaderMap, peer: IpAddr) -> Result<IpAddr, &'static str> {
        if !self.trusts(peer) {
            return Ok(peer);
        }
        let hops = match forwarded_for(headers) {
            Some(hops) => hops?,
            None => match x_forwarded_for(headers) {
                Some(hops) => hops?,
                None => return Ok(peer),
            },
        };
        let mut client = peer;
        for hop in hops.iter().rev() {
            let Some(address) = hop else {
                return Ok(client);
            };
            client = *address;
            if !self.trusts(client) {
                break;
            }
        }
        Ok(client)
    }
}

/// IPv4-mapped IPv6 addresses as the IPv4 addresses they are.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// Every value of a header, joined with commas (repeated headers are one list).
fn joined<'h>(headers: &'h HeaderMap, name: &str) -> Option<Vec<&'h str>> {
    let values: Vec<&str> = headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap_or("\u{0}"))
        .collect();
    (!values.is_empty()).then_some(values)
}

type Hops = Result<Vec<Option<IpAddr>>, &'static str>;

fn x_forwarded_for(headers: &HeaderMap) -> Option<Hops> {
    let values = joined(headers, "x-forwarded-for")?;
    Some(
        values
            .iter()
            .flat_map(|v| v.split(','))
            .map(|hop| {
                node_address(hop.trim())
                    .map(Some)
                    .ok_or("malformed X-Forwarded-For header")
            })
            .collect(),
    )
}

fn forwarded_for(headers: &HeaderMap) -> Option<Hops> {
    let values = joined(headers, "forwarded")?;
    let mut hops = Vec::new();
    for element in values.iter().flat_map(|v| v.split(',')) {
        let node = element.split(';').find_map(|pair| {
            let (key, value) = pair.trim().split_once('=')?;
            key.eq_ignore_ascii_case("for").then_some(value)
        });
        let Some(node) = node else {
            // An element without `for=` says nothing of the address.
            continue;
        };
        let node = node.trim().trim_matches('"');
        if node.eq_ignore_ascii_case("unknown") || node.starts_with('_') {
            hops.push(None);
            continue;
        }
        match node_address(node) {
            Some(address) => hops.push(Some(address)),
            None => return Some(Err("malformed Forwarded header")),
        }
    }
    Some(Ok(hops))
}

/// An address as proxies write them: `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`,
/// `[2001:db8::1]`, `[2001:db8::1]:4711`.
fn node_address(node: &str) -> Option<IpAddr> {
    if let Some(rest) = node.strip_prefix('[') {
        let (address, port) = rest.split_once(']')?;
        if !(port.is_empty() || port.strip_prefix(':')?.parse::<u16>().is_ok()) {
            return None;
        }
        return address.parse().ok();
    }
    if let Ok(address) = node.parse::<IpAddr>() {
        return Some(address);
    }
    let (address, port) = node.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    address.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, value.parse().unwrap());
        }
        map
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_trusted_peers_are_believed() {
        let proxies = TrustedProxies::parse(&["10.0.0.0/8".into(), "192.0.2.9".into()]).unwrap();
        let xff = headers(&[("x-forwarded-for", "203.0.113.7")]);
        assert_eq!(proxies.client(&xff, ip("10.1.2.3")), Ok(ip("203.0.113.7")));
        assert_eq!(proxies.client(&xff, ip("192.0.2.9")), Ok(ip("203.0.113.7")));
        assert_eq!(
            proxies.client(&xff, ip("198.51.100.1")),
            Ok(ip("198.51.100.1"))
        );
        // A trusted proxy that forwards nothing: the request is its own.
        assert_eq!(
            proxies.client(&HeaderMap::new(), ip("10.1.2.3")),
            Ok(ip("10.1.2.3"))
        );
        // IPv4-mapped IPv6 peers are their IPv4 addresses.
        assert_eq!(
            proxies.client(&xff, ip("::ffff:10.1.2.3")),
            Ok(ip("203.0.113.7"))
        );
    }

    #[test]
    fn the_nearest_untrusted_hop_is_the_client_whatever_the_client_wrote() {
        let proxies = TrustedProxies::parse(&["10.0.0.0/8".into()]).unwrap();
        // The client claimed 1.1.1.1; the edge proxy appended the address it saw; an inner
        // proxy appended the edge's.
        let chain = headers(&[
            ("x-forwarded-for", "1.1.1.1, 203.0.113.7"),
            ("x-forwarded-for", "10.0.0.5"),
        ]);
        assert_eq!(
            proxies.client(&chain, ip("10.0.0.6")),
            Ok(ip("203.0.113.7"))
        );
        // Every hop trusted: the leftmost.
        let inside = headers(&[("x-forwarded-for", "10.0.0.1, 10.0.0.2")]);
        assert_eq!(proxies.client(&inside, ip("10.0.0.6")), Ok(ip("10.0.0.1")));
    }

    #[test]
    fn forwarded_is_read_first_with_ports_brackets_and_hidden_hops() {
        let proxies = TrustedProxies::parse(&["10.0.0.0/8".into()]).unwrap();
        let both = headers(&[
            (
                "forwarded",
                "for=\"[2001:db8::7]:4711\";proto=https, for=10.0.0.5",
            ),
            ("x-forwarded-for", "198.51.100.1"),
        ]);
        assert_eq!(proxies.client(&both, ip("10.0.0.6")), Ok(ip("2001:db8::7")));
        let port = headers(&[("forwarded", "for=192.0.2.60:47011;by=10.0.0.5")]);
        assert_eq!(proxies.client(&port, ip("10.0.0.6")), Ok(ip("192.0.2.60")));
        // A hop that hid the address before it: the proxy that reported it is the client.
        let hidden = headers(&[("forwarded", "for=unknown, for=10.0.0.5")]);
        assert_eq!(proxies.client(&hidden, ip("10.0.0.6")), Ok(ip("10.0.0.5")));
        let obfuscated = headers(&[("forwarded", "for=_gazonk")]);
        assert_eq!(
            proxies.client(&obfuscated, ip("10.0.0.6")),
            Ok(ip("10.0.0.6"))
        );
    }

    #[test]
    fn unreadable_chains_are_errors_and_bad_config_is_refused() {
        let proxies = TrustedProxies::parse(&["10.0.0.0/8".into()]).unwrap();
        for bad in [
            headers(&[("x-forwarded-for", "203.0.113.7, not-an-address")]),
            headers(&[("x-forwarded-for", "")]),
            headers(&[("forwarded", "for=\"[2001:db8::7\"")]),
            headers(&[("forwarded", "for=999.1.1.1")]),
        ] {
            assert!(proxies.client(&bad, ip("10.0.0.6")).is_err(), "{bad:?}");
        }
        assert!(TrustedProxies::parse(&["10.0.0.0/33".into()]).is_err());
        assert!(TrustedProxies::parse(&["proxy.local".into()]).is_err());
    }
}
