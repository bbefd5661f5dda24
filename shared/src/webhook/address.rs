//! Which URLs a webhook may be sent to: http or https only, and never an address inside our own
//! network (private, loopback, link-local, CGNAT, multicast, reserved) unless the operator allows
//! it (`WEBHOOK_ALLOW_PRIVATE`, for local development and tests). A name is checked again against
//! every address it resolves to at delivery time, so a DNS answer cannot smuggle one in.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use url::{Host, Url};

/// The longest URL accepted.
pub const MAX_URL_LEN: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("not a valid absolute URL")]
    Invalid,
    #[error("only http and https URLs are allowed")]
    Scheme,
    #[error("URLs are at most {MAX_URL_LEN} characters")]
    TooLong,
    #[error("credentials in the URL are not allowed")]
    Credentials,
    #[error("{0} is a private, loopback or link-local address")]
    Private(String),
}

/// Parse and check an endpoint URL.
pub fn check_url(raw: &str, allow_private: bool) -> Result<Url, UrlError> {
    if raw.len() > MAX_URL_LEN {
        return Err(UrlError::TooLong);
    }
    let url = Url::parse(raw).map_err(|_| UrlError::Invalid)?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(UrlError::Scheme);
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(UrlError::Credentials);
    }
    let host = url.host().ok_or(UrlError::Invalid)?;
    if !allow_private {
        let refused = match &host {
            Host::Ipv4(a) => forbidden(IpAddr::V4(*a)),
            Host::Ipv6(a) => forbidden(IpAddr::V6(*a)),
            Host::Domain(d) => {
                let d = d.trim_end_matches('.').to_ascii_lowercase();
                d == "localhost" || d.ends_with(".localhost") || d.ends_with(".internal") || d.ends_with(".local")
            }
        };
        if refused {
            return Err(UrlError::Private(host.to_string()));
        }
    }
    Ok(url)
}

/// An address no webhook may reach from inside our network.
pub fn forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => forbidden_v4(a),
        IpAddr::V6(a) => forbidden_v6(a),
    }
}

fn forbidden_v4(a: Ipv4Addr) -> bool {
    let [o0, o1, o2, _] = a.octets();
    a.is_unspecified()
        || a.is_loopback()
        || a.is_private()
        || a.is_link_local()
        || a.is_broadcast()
        || a.is_multicast()
        || a.is_documentation()
        || o0 == 0 // "this network"
        || (o0 == 100 && (o1 & 0xc0) == 64) // 100.64.0.0/10, carrier-grade NAT
        || (o0 == 192 && o1 == 0 && o2 == 0) // 192.0.0.0/24, protocol assignments
        || (o0 == 198 && (o1 & 0xfe) == 18) // 198.18.0.0/15, benchmarking
        || o0 >= 240 // reserved
}

fn forbidden_v6(a: Ipv6Addr) -> bool {
    if let Some(v4) = a.to_ipv4_mapped() {
        return forbidden_v4(v4);
    }
    let s = a.segments();
    // 64:ff9b::/96 (NAT64) reaches the IPv4 address in its last 32 bits.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return forbidden_v4(Ipv4Addr::new(
            (s[6] >> 8) as u8,
            s[6] as u8,
            (s[7] >> 8) as u8,
            s[7] as u8,
        ));
    }
    a.is_unspecified()
        || a.is_loopback()
        || a.is_multicast()
        || (s[0] & 0xfe00) == 0xfc00 // fc00::/7, unique local
        || (s[0] & 0xffc0) == 0xfe80 // fe80::/10, link-local
        || (s[0] & 0xffc0) == 0xfec0 // fec0::/10, site-local (deprecated)
        || s[0] == 0x2001 && s[1] == 0xdb8 // documentation
        || s[..5] == [0, 0, 0, 0, 0] // IPv4-compatible and other ::/80 forms
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_and_https() {
        assert!(check_url("https://hooks.example.com/credits?x=1", false).is_ok());
        assert!(check_url("http://hooks.example.com:8080/", false).is_ok());
        for bad in [
            "ftp://example.com/",
            "file:///etc/passwd",
            "javascript:alert(1)",
            "gopher://x/",
        ] {
            assert_eq!(check_url(bad, true), Err(UrlError::Scheme), "{bad}");
        }
        for bad in ["", "not a url", "/relative/path", "https://"] {
            assert!(check_url(bad, true).is_err(), "{bad}");
        }
        assert_eq!(check_url("https://u:p@example.com/", true), Err(UrlError::Credentials));
        let long = format!("https://example.com/{}", "a".repeat(MAX_URL_LEN));
        assert_eq!(check_url(&long, true), Err(UrlError::TooLong));
    }

    #[test]
    fn private_loopback_and_link_local_are_refused_unless_allowed() {
        for bad in [
            "http://127.0.0.1:9000/hook",
            "http://127.1.2.3/",
            "http://localhost:8080/",
            "http://api.localhost/",
            "http://LOCALHOST./",
            "http://10.0.0.5/",
            "http://172.16.0.1/",
            "http://172.31.255.255/",
            "http://192.168.1.1/",
            "http://169.254.169.254/latest/meta-data/",
            "http://0.0.0.0/",
            "http://100.64.0.1/",
            "http://[::1]/",
            "http://[::]/",
            "http://[fc00::1]/",
            "http://[fd12:3456::1]/",
            "http://[fe80::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:10.1.2.3]/",
            "http://[64:ff9b::a9fe:a9fe]/",
            "http://2130706433/",
            "http://0x7f.1/",
            "http://metadata.google.internal/",
        ] {
            assert!(matches!(check_url(bad, false), Err(UrlError::Private(_))), "{bad}");
            assert!(check_url(bad, true).is_ok(), "allowed with the flag: {bad}");
        }
        for ok in [
            "https://8.8.8.8/",
            "https://172.32.0.1/",
            "https://[2606:4700::1111]/",
            "https://[::ffff:8.8.8.8]/",
            "https://192.169.0.1/",
        ] {
            assert!(check_url(ok, false).is_ok(), "{ok}");
        }
    }

    #[test]
    fn resolved_addresses_are_judged_the_same_way() {
        assert!(forbidden("10.1.1.1".parse().unwrap()));
        assert!(forbidden("fe80::1".parse().unwrap()));
        assert!(forbidden("255.255.255.255".parse().unwrap()));
        assert!(forbidden("224.0.0.1".parse().unwrap()));
        assert!(!forbidden("1.1.1.1".parse().unwrap()));
        assert!(!forbidden("2a00:1450::1".parse().unwrap()));
    }
}

/// A name that resolved to an address outbound calls may not reach.
#[derive(Debug, thiserror::Error)]
#[error("{0} resolves to {1}, a private, loopback or link-local address")]
pub struct RefusedAddress(pub String, pub IpAddr);

/// Resolves like the system does, then refuses names with any forbidden address, so a DNS
/// answer cannot point a webhook or a charge into our network. The one resolver of every
/// outbound client (webhooks, payment endpoints): pass it to `reqwest::ClientBuilder::dns_resolver`.
pub struct SafeResolver;

impl reqwest::dns::Resolve for SafeResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if let Some(a) = addrs.iter().find(|a| forbidden(a.ip())) {
                return Err(Box::new(RefusedAddress(host, a.ip())) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}
