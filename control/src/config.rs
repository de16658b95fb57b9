//! dsand's configuration: a TOML file, overridden by command-line flags, checked
//! before anything is started.

use dataplane::engine::IdlePolicy;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Default control socket path when neither the config nor `$DSAN_SOCKET` says.
pub const DEFAULT_SOCKET: &str = "/run/dsan/dsand.sock";

/// A SAN address with its prefix length, e.g. `198.18.0.1/24` (the project's one subnet type).
pub use dsan_channel::net::Subnet as Cidr;

/// The `[eal]` table: EAL arguments in DPDK's usual terms.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EalSection {
    /// `-l`: lcore list; the first (or `main_lcore`) runs the dataplane loop.
    pub lcores: Option<String>,
    /// `--main-lcore`.
    pub main_lcore: Option<u32>,
    /// `--vdev` entries.
    #[serde(default)]
    pub vdev: Vec<String>,
    /// `-a` PCI allow-list.
    #[serde(default)]
    pub allow: Vec<String>,
    /// `--no-pci`.
    #[serde(default)]
    pub no_pci: bool,
    /// `--no-huge`.
    #[serde(default)]
    pub no_huge: bool,
    /// `-m`, MiB.
    pub memory_mb: Option<u32>,
    /// `--file-prefix`.
    pub file_prefix: Option<String>,
    /// Anything else, passed through verbatim.
    #[serde(default)]
    pub extra: Vec<String>,
}

/// The whole configuration file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Host name shown in status and metrics (default: the system host name).
    pub host: Option<String>,
    /// Network namespace to enter before starting DPDK (the lab uses this).
    pub netns: Option<String>,
    /// Kernel interface whose addresses are the host's SAN addresses (when
    /// `san_addrs` is empty) and, for af_packet, the port itself.
    pub iface: Option<String>,
    /// The host's SAN addresses with their subnets.
    #[serde(default)]
    pub san_addrs: Vec<Cidr>,
    /// EAL arguments.
    #[serde(default)]
    pub eal: EalSection,
    /// `poll` or `adaptive`.
    pub idle: Option<String>,
    /// SAN EtherType (default 0x88B5).
    pub ethertype: Option<u16>,
    /// Control socket path.
    pub control_socket: Option<PathBuf>,
    /// Prometheus endpoint address (e.g. `127.0.0.1:9450`); none disables it.
    pub metrics_addr: Option<SocketAddr>,
    /// Mbufs in the pool.
    pub mbufs: Option<u32>,
    /// The SAN link's MTU (default 1500): stream payloads are cut to fit, and
    /// mbufs are sized for it (larger frames: up to `lab::MAX_MTU`).
    pub mtu: Option<u16>,
    /// Protocol limits.
    #[serde(default)]
    pub limits: Limits,
    /// Fault injection on received SAN frames (lab use; off by default).
    #[serde(default)]
    pub faults: FaultsSection,
}

/// The `[faults]` table: probabilities in 0..=1 and a seed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FaultsSection {
    /// Drop this fraction of received SAN frames.
    pub loss: Option<f64>,
    /// Deliver this fraction twice.
    pub dup: Option<f64>,
    /// Hold this fraction back 0.1-2 ms (reordering).
    pub reorder: Option<f64>,
    /// Seed of the injector.
    pub seed: Option<u64>,
}

impl FaultsSection {
    /// The injector's settings; an error for a probability outside 0..=1.
    pub fn faults(&self) -> Result<dataplane::node::Faults, String> {
        let p = |v: Option<f64>, what: &str| {
            let v = v.unwrap_or(0.0);
            if (0.0..=1.0).contains(&v) {
                Ok(v)
            } else {
                Err(format!("faults.{what} must be between 0 and 1, not {v}"))
            }
        };
        Ok(dataplane::node::Faults {
            loss: p(self.loss, "loss")?,
            dup: p(self.dup, "dup")?,
            reorder: p(self.reorder, "reorder")?,
            seed: self.seed.unwrap_or(1),
        })
    }
}

/// The `[limits]` table (defaults in `docs/wire-protocol.md`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Listeners on this host.
    pub max_listeners: Option<usize>,
    /// Connect requests queued in all backlogs together.
    pub max_half_open: Option<usize>,
    /// Connect requests queued from one source address.
    pub max_half_open_per_source: Option<usize>,
    /// Connect attempts in progress.
    pub max_attempts: Option<usize>,
    /// Give up a SAN connect after this long (ETIMEDOUT, so the switch falls back), ms.
    pub connect_budget_ms: Option<u64>,
}

impl Config {
    /// Reads and parses a TOML file.
    ///
    /// # Errors
    /// A message naming the file and the problem.
    pub fn load(path: &std::path::Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))
    }

    /// The idle policy.
    ///
    /// # Errors
    /// If the name is unknown.
    pub fn idle_policy(&self) -> Result<IdlePolicy, String> {
        self.idle.as_deref().unwrap_or("adaptive").parse()
    }
}

/// Known DPDK virtual-device drivers that the lab and the docs use, checked
/// before EAL sees them (EAL's own error for an unknown vdev is a usage dump).
pub const KNOWN_VDEV_DRIVERS: &[&str] = &[
    "net_af_packet",
    "net_memif",
    "net_ring",
    "net_tap",
    "net_null",
    "net_pcap",
    "net_af_xdp",
    "net_virtio_user",
    "net_vhost",
];

/// The driver part of a `--vdev` string (`net_af_packet0,iface=x` -> `net_af_packet`).
pub fn vdev_driver(vdev: &str) -> &str {
    let name = vdev.split(',').next().unwrap_or("");
    name.trim_end_matches(|c: char| c.is_ascii_digit())
}

/// The value of `key=` in a `--vdev` string.
pub fn vdev_arg<'a>(vdev: &'a str, key: &str) -> Option<&'a str> {
    vdev.split(',')
        .skip(1)
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// Parses an EAL lcore list (`0`, `0,2`, `1-3`) into lcore numbers.
///
/// # Errors
/// On anything that is not a list of numbers and ranges.
pub fn parse_lcores(s: &str) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let bad = || format!("bad lcore list {s:?}");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (
                    a.trim().parse().map_err(|_| bad())?,
                    b.trim().parse().map_err(|_| bad())?,
                );
                if a > b {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.trim().parse().map_err(|_| bad())?),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_config() {
        let c: Config = toml::from_str(
            r#"
            host = "h0"
            iface = "san0"
            san_addrs = ["198.18.0.1/24"]
            idle = "poll"
            metrics_addr = "127.0.0.1:9450"
            [eal]
            lcores = "1"
            vdev = ["net_af_packet0,iface=san0,qdisc_bypass=1"]
            no_pci = true
            no_huge = true
            memory_mb = 256
            file_prefix = "dsan-h0"
            "#,
        )
        .unwrap();
        assert_eq!(c.san_addrs[0].to_string(), "198.18.0.1/24");
        assert!(c.san_addrs[0].contains("198.18.0.200".parse().unwrap()));
        assert!(!c.san_addrs[0].contains("198.19.0.1".parse().unwrap()));
        assert_eq!(c.idle_policy().unwrap(), IdlePolicy::Poll);
        assert_eq!(c.eal.vdev.len(), 1);
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        assert!(toml::from_str::<Config>("hots = \"x\"").is_err());
        assert!(toml::from_str::<Config>("san_addrs = [\"198.18.0.1/40\"]").is_err());
        assert!(Config {
            idle: Some("spin".into()),
            ..Default::default()
        }
        .idle_policy()
        .is_err());
    }

    #[test]
    fn every_deploy_example_parses() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples");
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                let c = Config::load(&p).unwrap_or_else(|e| panic!("{e}"));
                assert!(c.idle_policy().is_ok(), "{}", p.display());
                assert!(
                    !c.eal.vdev.is_empty() || !c.eal.allow.is_empty(),
                    "{} names a port",
                    p.display()
                );
                n += 1;
            }
        }
        assert!(n >= 6, "{n} examples");
    }

    #[test]
    fn vdev_and_lcore_helpers() {
        assert_eq!(vdev_driver("net_af_packet0,iface=san0"), "net_af_packet");
        assert_eq!(vdev_driver("net_memif"), "net_memif");
        assert_eq!(
            vdev_arg("net_af_packet0,iface=san0,qdisc_bypass=1", "iface"),
            Some("san0")
        );
        assert_eq!(parse_lcores("0,2-4").unwrap(), vec![0, 2, 3, 4]);
        assert!(parse_lcores("a").is_err());
        assert!(parse_lcores("3-1").is_err());
    }
}
