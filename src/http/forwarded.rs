//! Real client addresses behind proxies: from `trusted_proxies` only, the address a request is
//! for is taken from `Forwarded` (RFC 7239) or `X-Forwarded-For`; from anyone else these headers
//! are ignored (any client can send them).

use std::net::IpAddr;

use hyper::HeaderMap;
use ipnet::IpNet;

/// Which header the trusted proxies write the chain in (`forwarded_header`). Only that one is
/// read: proxies pass the other through as the client wrote it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardedHeader {
    /// `X-Forwarded-For` (nginx's `$proxy_add_x_forwarded_for`, HAProxy's `option forwardfor`).
    #[default]
    XForwardedFor,
    /// `Forwarded` (RFC 7239).
    Forwarded,
}

/// The peers whose word on the client's address is taken, and the header they say it in.
#[derive(Debug, Default)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
    header: ForwardedHeader,
}

impl TrustedProxies {
    /// Parses `trusted_proxies`: CIDR blocks (`10.0.0.0/8`, `fd00::/8`) or single addresses.
    pub fn parse(list: &[String], header: ForwardedHeader) -> Result<Self, String> {
        let nets = list
            .iter()
            .map(|entry| {
                entry
                    .parse::<IpNet>()
                    .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("{entry:?} is not an address or a CIDR block"))
            })
            .collect::<Result<_, _>>()?;
        Ok(TrustedProxies { nets, header })
    }

    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.nets.iter().any(|net| net.contains(&ip))
    }

    /// The client a request from `peer` is for: `peer` itself unless it is a trusted proxy; else
    /// the nearest address of the forwarding chain (read from the right) that is not a trusted
    /// proxy — what the client itself wrote at the left is not believed. A request from a
    /// trusted proxy without the header is the proxy's own. A chain that cannot be read, or
    /// that hides the client (`for=unknown`, an obfuscated name, no `for=`), is an error.
    pub fn client(&self, headers: &HeaderMap, peer: IpAddr) -> Result<IpAddr, &'static str> {
        if !self.trusts(peer) {
            return Ok(peer);
        }
        let hops = match self.header {
            ForwardedHeader::XForwardedFor => x_forwarded_for(headers),
            ForwardedHeader::Forwarded => forwarded_for(headers),
        };
        let Some(hops) = hops else {
            return Ok(peer);
        };
        let hops = hops?;
        let mut client = Err("the forwarding chain names no client address");
        for hop in hops.iter().rev() {
            let address = hop.ok_or("the forwarding chain hides the client's address")?;
            client = Ok(address);
            if !self.trusts(address) {
                break;
            }
        }
        client
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
        let proxies = TrustedProxies::parse(
            &["10.0.0.0/8".into(), "192.0.2.9".into()],
            ForwardedHeader::XForwardedFor,
        )
        .unwrap();
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
        let proxies =
            TrustedProxies::parse(&["10.0.0.0/8".into()], ForwardedHeader::XForwardedFor).unwrap();
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
        // The header the proxies do not write is the client's own: ignored.
        let forged = headers(&[
            ("forwarded", "for=198.51.100.9"),
            ("x-forwarded-for", "203.0.113.7"),
        ]);
        assert_eq!(
            proxies.client(&forged, ip("10.0.0.6")),
            Ok(ip("203.0.113.7"))
        );
    }

    #[test]
    fn forwarded_is_read_with_ports_and_brackets_when_chosen() {
        let proxies =
            TrustedProxies::parse(&["10.0.0.0/8".into()], ForwardedHeader::Forwarded).unwrap();
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
        // A chain that hides the client, or names none, does not make it the proxy.
        for hidden in ["for=unknown, for=10.0.0.5", "for=_gazonk", "proto=https"] {
            let headers = headers(&[("forwarded", hidden)]);
            assert!(
                proxies.client(&headers, ip("10.0.0.6")).is_err(),
                "{hidden}"
            );
        }
    }

    #[test]
    fn unreadable_chains_are_errors_and_bad_config_is_refused() {
        for (header, name, value) in [
            (
                ForwardedHeader::XForwardedFor,
                "x-forwarded-for",
                "203.0.113.7, not-an-address",
            ),
            (ForwardedHeader::XForwardedFor, "x-forwarded-for", ""),
            (
                ForwardedHeader::Forwarded,
                "forwarded",
                "for=\"[2001:db8::7\"",
            ),
            (ForwardedHeader::Forwarded, "forwarded", "for=999.1.1.1"),
        ] {
            let proxies = TrustedProxies::parse(&["10.0.0.0/8".into()], header).unwrap();
            let headers = headers(&[(name, value)]);
            assert!(proxies.client(&headers, ip("10.0.0.6")).is_err(), "{value}");
        }
        let xff = ForwardedHeader::XForwardedFor;
        assert!(TrustedProxies::parse(&["10.0.0.0/33".into()], xff).is_err());
        assert!(TrustedProxies::parse(&["proxy.local".into()], xff).is_err());
    }
}
