//! Routing rules (`DSAN_PRELOAD_CONF`) and the decision log
//! (`DSAN_PRELOAD_LOG=1`).
//!
//! One rule per line, `#` starts a comment, the first rule that matches
//! decides:
//!
//! ```text
//! # action  role     program  address
//! tcp       client   curl     198.18.1.0/24:8080
//! san       server   *        *:6379
//! both      any      nginx    *
//! ```
//!
//! * action: `san` (the SAN only: a server listens on kernel TCP and the
//!   SAN, as WSD always does; a client's SAN connect that cannot be made
//!   fails instead of falling back), `tcp` (the kernel only), `both` (WSD's
//!   rules: the default);
//! * role: `client` (connect), `server` (listen) or `any`;
//! * program: the program's name (argv[0] without its directory) or `*`;
//! * address: `*`, `ADDR`, `ADDR/PREFIX`, each optionally with `:PORT`
//!   (`*:PORT` for any address): the destination of a connect, the bound
//!   address of a listener.
#![allow(unsafe_code)] // the log line written with the C library's write: a SAFETY comment

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::OnceLock;

/// What a rule says to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    San,
    Tcp,
    Both,
}

/// Which call a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Client,
    Server,
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    /// Its line in the file (from 1).
    line: usize,
    action: Action,
    role: Role,
    program: Option<String>,
    net: Option<(u32, u32)>,
    port: Option<u16>,
}

impl Rule {
    fn matches(&self, role: Role, program: &str, a: SocketAddrV4) -> bool {
        (self.role == Role::Any || self.role == role)
            && self.program.as_deref().is_none_or(|p| p == program)
            && self
                .net
                .is_none_or(|(ip, mask)| u32::from(*a.ip()) & mask == ip & mask)
            && self.port.is_none_or(|p| p == a.port())
    }
}

/// A network (address, mask) and a port, each optional (`*`).
type Match = (Option<(u32, u32)>, Option<u16>);

fn parse_addr(s: &str) -> Result<Match, String> {
    let (addr, port) = match s.rsplit_once(':') {
        Some((a, p)) => (
            a,
            Some(p.parse::<u16>().map_err(|_| format!("bad port {p:?}"))?),
        ),
        None => (s, None),
    };
    if addr == "*" {
        return Ok((None, port));
    }
    let (ip, prefix) = match addr.split_once('/') {
        Some((ip, len)) => (
            ip,
            len.parse::<u32>()
                .ok()
                .filter(|l| *l <= 32)
                .ok_or_else(|| format!("bad prefix length {len:?}"))?,
        ),
        None => (addr, 32),
    };
    let ip: Ipv4Addr = ip.parse().map_err(|_| format!("bad IPv4 address {ip:?}"))?;
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    Ok((Some((u32::from(ip), mask)), port))
}

fn parse_line(n: usize, line: &str) -> Result<Option<Rule>, String> {
    let line = line.split('#').next().unwrap_or("").trim();
    if line.is_empty() {
        return Ok(None);
    }
    let w: Vec<&str> = line.split_whitespace().collect();
    if w.len() != 4 {
        return Err("expected four fields: action role program address".into());
    }
    let action = match w[0] {
        "san" => Action::San,
        "tcp" => Action::Tcp,
        "both" => Action::Both,
        a => return Err(format!("unknown action {a:?} (san, tcp, both)")),
    };
    let role = match w[1] {
        "client" => Role::Client,
        "server" => Role::Server,
        "any" => Role::Any,
        r => return Err(format!("unknown role {r:?} (client, server, any)")),
    };
    let program = (w[2] != "*").then(|| w[2].to_string());
    let (net, port) = parse_addr(w[3])?;
    Ok(Some(Rule {
        line: n,
        action,
        role,
        program,
        net,
        port,
    }))
}

struct Config {
    rules: Vec<Rule>,
    log: bool,
}

/// The program's name (argv[0] without its directory).
fn program() -> &'static str {
    static P: OnceLock<String> = OnceLock::new();
    P.get_or_init(|| {
        std::env::args_os()
            .next()
            .and_then(|a| {
                std::path::Path::new(&a)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
            })
            .unwrap_or_default()
    })
}

/// Reads the rules and the log setting now, from the environment as the
/// program was started with (the library calls it when it is loaded:
/// programs may clear their environment later, as nginx's workers do).
pub(crate) fn init() {
    let _ = config();
}

fn config() -> &'static Config {
    static C: OnceLock<Config> = OnceLock::new();
    C.get_or_init(|| {
        let log = std::env::var_os("DSAN_PRELOAD_LOG").is_some_and(|v| v != "0" && !v.is_empty());
        let mut rules = Vec::new();
        if let Some(path) = std::env::var_os("DSAN_PRELOAD_CONF") {
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    for (i, line) in text.lines().enumerate() {
                        match parse_line(i + 1, line) {
                            Ok(Some(r)) => rules.push(r),
                            Ok(None) => {}
                            Err(e) => say(&format!(
                                "{}:{}: {e}; line ignored",
                                path.to_string_lossy(),
                                i + 1
                            )),
                        }
                    }
                }
                Err(e) => say(&format!(
                    "cannot read DSAN_PRELOAD_CONF {}: {e}; no rules",
                    path.to_string_lossy()
                )),
            }
        }
        Config { rules, log }
    })
}

/// Writes one line to standard error (always: configuration errors).
pub(crate) fn say(msg: &str) {
    let line = format!("dsan-preload[{}]: {msg}\n", std::process::id());
    // SAFETY: a valid buffer on the standard error descriptor (the C
    // library's write: this thread is inside the library).
    unsafe { crate::real::write()(2, line.as_ptr().cast(), line.len()) };
}

/// Whether decisions are logged.
pub(crate) fn logging() -> bool {
    config().log
}

/// Logs a routing decision when `DSAN_PRELOAD_LOG` is set.
pub(crate) fn log(msg: impl FnOnce() -> String) {
    if logging() {
        say(&msg());
    }
}

/// What to do for a connect to (client) or a listener on (server) `a`:
/// the action and the line of the rule that decided, if one did.
pub(crate) fn decide(role: Role, a: SocketAddrV4) -> (Action, Option<usize>) {
    let c = config();
    c.rules
        .iter()
        .find(|r| r.matches(role, program(), a))
        .map_or((Action::Both, None), |r| (r.action, Some(r.line)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn lines_parse_and_match() {
        let r = parse_line(1, "tcp client curl 198.18.1.0/24:8080 # x")
            .unwrap()
            .unwrap();
        assert!(r.matches(Role::Client, "curl", a("198.18.1.7:8080")));
        assert!(!r.matches(Role::Client, "curl", a("198.18.2.7:8080")));
        assert!(!r.matches(Role::Client, "curl", a("198.18.1.7:80")));
        assert!(!r.matches(Role::Server, "curl", a("198.18.1.7:8080")));
        assert!(!r.matches(Role::Client, "wget", a("198.18.1.7:8080")));
        let r = parse_line(1, "san any * *:6379").unwrap().unwrap();
        assert!(r.matches(Role::Server, "redis-server", a("0.0.0.0:6379")));
        let r = parse_line(1, "both server * 198.18.0.1").unwrap().unwrap();
        assert!(r.matches(Role::Server, "x", a("198.18.0.1:1")));
        assert_eq!(parse_line(1, "  # only a comment").unwrap(), None);
        assert!(parse_line(1, "fast client * *").is_err());
        assert!(parse_line(1, "san client *").is_err());
        assert!(parse_line(1, "san client * 1.2.3.4/33").is_err());
        assert!(parse_line(1, "san client * 1.2.3:5").is_err());
        assert!(parse_line(1, "san client * *:99999").is_err());
    }
}
