//! Real client addresses behind proxies: from `trusted_proxies` only, the address a request is
//! for is taken from `Forwarded` (RFC 7239) or `X-Forwarded-For`; from anyone else these headers
//! are ignored (any client can send them).

use std::net::IpAddr;

use hyper::HeaderMap;
use ipnet::IpNet;

use crate::config::ForwardedHeader;

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
        let ip = ip.to_canonical();
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
    for value in values {
        let Some(elements) = forwarded_elements(value) else {
            return Some(Err("malformed Forwarded header"));
        };
        for node in elements {
            // An element without `for=` (a proxy that added only `proto=`, say) hides the
            // address of that hop: what is left of it was written by someone not trusted.
            let Some(node) = node else {
                hops.push(None);
                continue;
            };
            if node.eq_ignore_ascii_case("unknown") || node.starts_with('_') {
                hops.push(None);
                continue;
            }
            match node_address(&node) {
                Some(address) => hops.push(Some(address)),
                None => return Some(Err("malformed Forwarded header")),
            }
        }
    }
    Some(Ok(hops))
}

/// The `for=` value of each element of a `Forwarded` header value, as RFC 7239 writes them:
/// elements separated by commas and pairs by semicolons outside quoted strings, a quoted value
/// with its escapes undone. `None` where the value is not of that grammar (an unterminated quote,
/// a pair without `=`, a parameter twice in one element, stray characters). Unquoted values may
/// hold `:` and `[]` too, as some proxies write ports and IPv6 addresses unquoted.
fn forwarded_elements(value: &str) -> Option<Vec<Option<String>>> {
    let is_token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    let mut chars = value.chars().peekable();
    let mut elements = Vec::new();
    let mut seen: Vec<String> = Vec::new();
    let mut node = None;
    loop {
        while chars.next_if(|c| *c == ' ' || *c == '\t').is_some() {}
        match chars.peek() {
            None => {
                elements.push(node.take());
                return Some(elements);
            }
            Some(',') => {
                chars.next();
                elements.push(node.take());
                seen.clear();
                continue;
            }
            Some(';') => {
                chars.next();
                continue;
            }
            Some(_) => {}
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| is_token(*c)) {
            key.push(c.to_ascii_lowercase());
        }
        if key.is_empty() || chars.next() != Some('=') || seen.contains(&key) {
            return None;
        }
        let mut pair_value = String::new();
        if chars.next_if_eq(&'"').is_some() {
            loop {
                match chars.next()? {
                    '"' => break,
                    '\\' => pair_value.push(chars.next()?),
                    c => pair_value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| is_token(*c) || matches!(c, ':' | '[' | ']')) {
                pair_value.push(c);
            }
            if pair_value.is_empty() {
                return None;
            }
        }
        while chars.next_if(|c| *c == ' ' || *c == '\t').is_some() {}
        if !matches!(chars.peek(), None | Some(',' | ';')) {
            return None;
        }
        if key == "for" {
            node = Some(pair_value);
        }
        seen.push(key);
    }
}

/// An address as proxies write them: `192.0.2.1`, `192.0.2.1:4711`, `2001:db8::1`,
/// `[2001:db8::1]`, `[2001:db8::1]:4711`; an IPv4-mapped one as the IPv4 address it is.
fn node_address(node: &str) -> Option<IpAddr> {
    written_address(node).map(|ip| ip.to_canonical())
}

fn written_address(node: &str) -> Option<IpAddr> {
    // A port, or an obfuscated one (RFC 7239 §6.3: `_` and letters, digits, `.`, `_`, `-`).
    let is_port = |port: &str| {
        port.parse::<u16>().is_ok()
            || port.strip_prefix('_').is_some_and(|rest| {
                !rest.is_empty()
                    && rest
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            })
    };
    if let Some(rest) = node.strip_prefix('[') {
        let (address, port) = rest.split_once(']')?;
        if !(port.is_empty() || is_port(port.strip_prefix(':')?)) {
            return None;
        }
        return address.parse().ok();
    }
    if let Ok(address) = node.parse::<IpAddr>() {
        return Some(address);
    }
    let (address, port) = node.rsplit_once(':')?;
    is_port(port).then_some(())?;
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
    fn forwarded_is_split_outside_quoted_strings_only() {
        let parse =
            |v: &str| forwarded_elements(v).map(|e| e.into_iter().flatten().collect::<Vec<_>>());
        // A comma or semicolon inside a quoted string is part of the value.
        assert_eq!(
            parse(r#"for="198.51.100.1";by="a,b;c", for=192.0.2.1"#),
            Some(vec!["198.51.100.1".to_owned(), "192.0.2.1".to_owned()])
        );
        assert_eq!(
            parse(r#"for="\[2001:db8::1\]:80""#),
            Some(vec!["[2001:db8::1]:80".to_owned()])
        );
        assert_eq!(
            parse("For=192.0.2.1 ; proto=http"),
            Some(vec!["192.0.2.1".to_owned()])
        );
        assert_eq!(parse("proto=https"), Some(vec![]));
        for bad in [
            r#"for="9.9.9.1"#,
            "for=",
            "for",
            "for=1.2.3.4;for=5.6.7.8",
            r#"for="1.2.3.4"x"#,
            "for=1.2.3.4 5.6.7.8",
            "=x",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
        // A quoted comma does not split the chain into a forged hop.
        let proxies =
            TrustedProxies::parse(&["10.0.0.0/8".into()], ForwardedHeader::Forwarded).unwrap();
        let quoted = headers(&[("forwarded", r#"for="10.0.0.1,203.0.113.9""#)]);
        assert!(proxies.client(&quoted, ip("10.0.0.6")).is_err());
        let unterminated = headers(&[("forwarded", r#"for="9.9.9.1"#)]);
        assert!(proxies.client(&unterminated, ip("10.0.0.6")).is_err());
        // A trusted proxy's element without `for=` does not let the client's own word through.
        let spoof = headers(&[("forwarded", "for=1.1.1.1, proto=https")]);
        assert!(proxies.client(&spoof, ip("10.0.0.6")).is_err());
        // Obfuscated ports are RFC 7239's too.
        let obfuscated = headers(&[(
            "forwarded",
            r#"for="192.0.2.1:_p1", for="[2001:db8::1]:_x""#,
        )]);
        assert_eq!(
            proxies.client(&obfuscated, ip("10.0.0.6")),
            Ok(ip("2001:db8::1"))
        );
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
