//! SAN addresses: the one subnet type of the project (the daemon's
//! configuration, the protocol core's routing, the switch's rules).

use std::net::Ipv4Addr;

/// An IPv4 address with its prefix length, e.g. `198.18.0.1/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(try_from = "String", into = "String")
)]
pub struct Subnet {
    /// The address (any address in the subnet).
    pub addr: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub prefix: u8,
}

impl Subnet {
    /// Whether `ip` lies in this subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix.min(32)))
        };
        u32::from(ip) & mask == u32::from(self.addr) & mask
    }
}

impl std::str::FromStr for Subnet {
    type Err = String;
    /// `a.b.c.d/p`, or `a.b.c.d` for a /32.
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s.split_once('/').unwrap_or((s, "32"));
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("{s:?} is not an IPv4 address with an optional /prefix"))?;
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("{s:?} has a bad prefix length"))?;
        Ok(Subnet { addr, prefix })
    }
}

impl TryFrom<String> for Subnet {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Subnet> for String {
    fn from(c: Subnet) -> String {
        c.to_string()
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_print_contain() {
        let s: Subnet = "198.18.0.1/24".parse().unwrap();
        assert!(s.contains(Ipv4Addr::new(198, 18, 0, 200)));
        assert!(!s.contains(Ipv4Addr::new(198, 18, 1, 1)));
        assert_eq!(s.to_string(), "198.18.0.1/24");
        let host: Subnet = "198.18.0.9".parse().unwrap();
        assert_eq!(host.prefix, 32);
        assert!("198.18.0.1/33".parse::<Subnet>().is_err());
        assert!("x/24".parse::<Subnet>().is_err());
        let all: Subnet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(10, 1, 2, 3)));
    }
}
