//! Address checks: which hosts and addresses are local to this machine.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// The IMDS address, which transparent mode aliases on `lo`.
pub(crate) const IMDS_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// Where clients call IMDS.
pub(crate) const IMDS_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(IMDS_IP), 80);

/// Whether `ip` is the IMDS address.
pub(crate) fn is_imds_ip(ip: IpAddr) -> bool {
    ip == IpAddr::V4(IMDS_IP)
}

/// Whether a URL's host is a loopback name or address.
pub(crate) fn host_is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for (url, local) in [
            ("http://localhost:1/x", true),
            ("http://LOCALHOST/x", true),
            ("http://127.0.0.2/x", true),
            ("http://[::1]:9/x", true),
            ("https://login.microsoftonline.com/x", false),
            ("http://169.254.169.254/x", false),
        ] {
            assert_eq!(host_is_loopback(&url::Url::parse(url).expect("url")), local, "{url}");
        }
        assert!(is_imds_ip(IMDS_ADDR.ip()));
        assert!(!is_imds_ip("127.0.0.1".parse().expect("ip")));
    }
}
