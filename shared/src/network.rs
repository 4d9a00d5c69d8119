//! Addresses and networks, for the trusted-proxy list and the rate limiter's keys.

use std::fmt;
use std::net::IpAddr;

/// A network: an address and a prefix length (`10.0.0.0/8`, `::1/128`, `127.0.0.1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    address: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for Network {
    type Err = String;

    fn from_str(text: &str) -> Result<Network, String> {
        let expected = || format!("{text:?} is not an address or a network such as 10.0.0.0/8");
        let (address, prefix) = match text.trim().split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text.trim(), None),
        };
        let address: IpAddr = address.parse().map_err(|_| expected())?;
        let max = if address.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(prefix) => prefix.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(expected)?,
            None => max,
        };
        Ok(Network { address, prefix })
    }
}

impl Network {
    pub fn contains(&self, address: IpAddr) -> bool {
        let address = canonical(address);
        match (self.address, address) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// IPv4-mapped IPv6 addresses as the IPv4 they are.
pub fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        v4 => v4,
    }
}

impl fmt::Display for Network {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_parse_and_match() {
        let net: Network = "10.1.0.0/16".parse().expect("v4 net");
        assert!(net.contains("10.1.200.3".parse().expect("ip")));
        assert!(!net.contains("10.2.0.1".parse().expect("ip")));
        assert!(net.contains("::ffff:10.1.0.9".parse().expect("mapped")));
        let one: Network = "127.0.0.1".parse().expect("host");
        assert!(one.contains("127.0.0.1".parse().expect("ip")) && !one.contains("127.0.0.2".parse().expect("ip")));
        let v6: Network = "fd00::/8".parse().expect("v6 net");
        assert!(v6.contains("fd12::1".parse().expect("ip")) && !v6.contains("fe80::1".parse().expect("ip")));
        let all: Network = "0.0.0.0/0".parse().expect("all");
        assert!(all.contains("8.8.8.8".parse().expect("ip")));
        for bad in ["", "10.0.0.0/33", "::/129", "example.com", "10.0.0.0/x"] {
            assert!(bad.parse::<Network>().is_err(), "{bad}");
        }
    }
}
