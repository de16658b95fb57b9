//! Address resolution: SAN IP -> MAC, with a cache, expiry, static entries and
//! bounded retries. Sans-IO: the caller sends what [`Resolver::poll_request`]
//! asks for and feeds replies to [`Resolver::on_reply`].

use crate::time::Instant;
use crate::wire::{EthernetAddress, Ipv4};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// Resolution timing.
#[derive(Debug, Clone, Copy)]
pub struct ResolveConfig {
    /// How long a learned entry stays valid.
    pub ttl: Duration,
    /// Interval between requests for an unresolved address.
    pub retry: Duration,
    /// How many requests before giving up.
    pub max_tries: u32,
    /// Most unresolved addresses tracked at once (a bound on memory).
    pub max_pending: usize,
    /// Most of them that one owner (a user other than root, see
    /// [`Resolver::lookup_for`]) may have started: the rest of the table
    /// stays for everyone else.
    pub max_pending_per_owner: usize,
    /// Most learned entries kept.
    pub max_entries: usize,
    /// How long an address that did not answer is remembered as silent:
    /// lookups fail at once meanwhile (so the switch goes to TCP at once).
    pub negative_ttl: Duration,
}

impl Default for ResolveConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(300),
            retry: Duration::from_millis(100),
            max_tries: 10,
            max_pending: 1024,
            max_pending_per_owner: 256,
            max_entries: 65536,
            negative_ttl: Duration::from_secs(3),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    mac: EthernetAddress,
    /// `None` for static entries.
    expires: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    next_send: Instant,
    tries: u32,
    /// Who started it (0: nobody's share).
    owner: u32,
}

/// The answer of a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Known.
    Found(EthernetAddress),
    /// Being resolved; ask again after a reply or a timeout.
    Pending,
    /// Resolution gave up (no answer after `max_tries` requests).
    Failed,
}

/// The resolution cache and its pending requests.
#[derive(Debug, Default)]
pub struct Resolver {
    cfg: ResolveConfig,
    entries: HashMap<Ipv4, Entry>,
    /// Ordered, so that requests go out in the same order in every run (the simulator replays exactly).
    pending: BTreeMap<Ipv4, Pending>,
    failed: Vec<Ipv4>,
    /// Addresses that did not answer, until when (bounded by `max_pending`).
    silent: HashMap<Ipv4, Instant>,
    /// Replies that named another MAC for a learned address.
    conflicts: u64,
    /// Pending resolutions per owner (not 0), against `max_pending_per_owner`.
    by_owner: HashMap<u32, usize>,
}

impl Resolver {
    /// An empty cache.
    pub fn new(cfg: ResolveConfig) -> Self {
        Self {
            cfg,
            ..Default::default()
        }
    }

    /// Adds a static entry (never expires, not overwritten by replies).
    pub fn add_static(&mut self, ip: Ipv4, mac: EthernetAddress) {
        self.entries.insert(ip, Entry { mac, expires: None });
        self.unpend(&ip);
    }

    /// Forgets the pending resolution of `ip`, if any, and its owner's share.
    fn unpend(&mut self, ip: &Ipv4) -> Option<Pending> {
        let p = self.pending.remove(ip)?;
        if let Some(n) = self.by_owner.get_mut(&p.owner) {
            *n -= 1;
            if *n == 0 {
                self.by_owner.remove(&p.owner);
            }
        }
        Some(p)
    }

    /// Whether a lookup of `ip` for `owner` would be refused because it
    /// would start a resolution and `owner` (not 0) has as many pending as
    /// its share allows. An address that is known, being resolved or
    /// remembered as silent costs nothing.
    pub fn over_share(&self, now: Instant, ip: Ipv4, owner: u32) -> bool {
        if owner == 0 || self.pending.contains_key(&ip) {
            return false;
        }
        if self
            .entries
            .get(&ip)
            .is_some_and(|e| e.expires.is_none_or(|t| t > now))
        {
            return false;
        }
        if self.silent.get(&ip).is_some_and(|until| *until > now) {
            return false;
        }
        self.by_owner.get(&owner).copied().unwrap_or(0) >= self.cfg.max_pending_per_owner
    }

    /// Looks `ip` up, starting resolution if it is unknown. An address that
    /// did not answer within the last `negative_ttl` fails at once.
    pub fn lookup(&mut self, now: Instant, ip: Ipv4) -> Lookup {
        self.lookup_for(now, ip, 0)
    }

    /// [`lookup`](Self::lookup) on behalf of `owner` (a user; 0 for none):
    /// a resolution it starts counts in its share until it ends (see
    /// [`over_share`](Self::over_share), which the caller checks first).
    pub fn lookup_for(&mut self, now: Instant, ip: Ipv4, owner: u32) -> Lookup {
        if let Some(e) = self.entries.get(&ip) {
            match e.expires {
                Some(t) if t <= now => {
                    self.entries.remove(&ip);
                }
                _ => return Lookup::Found(e.mac),
            }
        }
        if self.pending.contains_key(&ip) {
            return Lookup::Pending;
        }
        match self.silent.get(&ip) {
            Some(until) if *until > now => return Lookup::Failed,
            Some(_) => {
                self.silent.remove(&ip);
            }
            None => {}
        }
        if self.pending.len() >= self.cfg.max_pending {
            return Lookup::Failed;
        }
        self.pending.insert(
            ip,
            Pending {
                next_send: now,
                tries: 0,
                owner,
            },
        );
        if owner != 0 {
            *self.by_owner.entry(owner).or_insert(0) += 1;
        }
        Lookup::Pending
    }

    /// A reply from `ip` saying it is at `mac`. It is learned only if this
    /// host asked (a lookup is pending): an unsolicited reply, from any
    /// station on the segment, cannot redirect connects; static entries always
    /// win. Returns whether it completed a pending resolution.
    pub fn on_reply(&mut self, now: Instant, ip: Ipv4, mac: EthernetAddress) -> bool {
        if mac.is_multicast() {
            return false;
        }
        if self.unpend(&ip).is_none() {
            return false;
        }
        self.silent.remove(&ip);
        match self.entries.get(&ip) {
            Some(Entry { expires: None, .. }) => {}
            _ if self.entries.contains_key(&ip) || self.entries.len() < self.cfg.max_entries => {
                self.entries.insert(
                    ip,
                    Entry {
                        mac,
                        expires: Some(now + self.cfg.ttl),
                    },
                );
            }
            _ => {}
        }
        true
    }

    /// A reply nobody was waiting for, from `ip` saying it is at `mac`. If
    /// it contradicts a learned entry (two stations answer for one address:
    /// one of them lies, and the first answer is not the more trustworthy),
    /// the entry is dropped and counted, so that the next lookup asks again
    /// instead of trusting the first answer for its whole lifetime. Static
    /// entries are never dropped. Returns whether it was a conflict.
    pub fn on_unsolicited(&mut self, ip: Ipv4, mac: EthernetAddress) -> bool {
        match self.entries.get(&ip) {
            Some(e) if e.expires.is_some() && e.mac != mac => {
                self.entries.remove(&ip);
                self.conflicts += 1;
                true
            }
            _ => false,
        }
    }

    /// Replies that contradicted a learned entry (see [`on_unsolicited`](Self::on_unsolicited)).
    pub fn conflicts(&self) -> u64 {
        self.conflicts
    }

    /// The next address to send a request for, if one is due.
    pub fn poll_request(&mut self, now: Instant) -> Option<Ipv4> {
        let mut give_up = None;
        let mut send = None;
        for (ip, p) in self.pending.iter_mut() {
            if p.next_send > now {
                continue;
            }
            if p.tries >= self.cfg.max_tries {
                give_up = Some(*ip);
                break;
            }
            p.tries += 1;
            p.next_send = now + self.cfg.retry;
            send = Some(*ip);
            break;
        }
        if let Some(ip) = give_up {
            self.unpend(&ip);
            self.failed.push(ip);
            if self.silent.len() >= self.cfg.max_pending {
                self.silent.retain(|_, until| *until > now);
            }
            if self.silent.len() < self.cfg.max_pending {
                self.silent.insert(ip, now + self.cfg.negative_ttl);
            }
            return self.poll_request(now);
        }
        send
    }

    /// Addresses whose resolution failed since the last call.
    pub fn poll_failed(&mut self) -> Option<Ipv4> {
        self.failed.pop()
    }

    /// When a request is next due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.next_send).min()
    }

    /// Learned and static entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Unresolved addresses being asked for.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP: Ipv4 = Ipv4::new(198, 18, 0, 2);
    const MAC: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 2]);

    #[test]
    fn resolves_caches_and_expires() {
        let mut r = Resolver::new(ResolveConfig {
            ttl: Duration::from_secs(1),
            ..Default::default()
        });
        let t0 = Instant(0);
        assert_eq!(r.lookup(t0, IP), Lookup::Pending);
        assert_eq!(r.poll_request(t0), Some(IP));
        assert_eq!(
            r.poll_request(t0),
            None,
            "not again before the retry interval"
        );
        assert!(r.on_reply(t0, IP, MAC));
        assert_eq!(r.lookup(t0, IP), Lookup::Found(MAC));
        assert_eq!(
            r.lookup(t0 + Duration::from_secs(2), IP),
            Lookup::Pending,
            "expired"
        );
    }

    #[test]
    fn a_conflicting_answer_drops_the_entry_and_is_counted() {
        let mut r = Resolver::new(ResolveConfig::default());
        let t0 = Instant(0);
        assert_eq!(r.lookup(t0, IP), Lookup::Pending);
        assert_eq!(r.poll_request(t0), Some(IP));
        // A liar answers first; the real station's answer comes next.
        let liar = EthernetAddress([2, 0, 0, 0, 0, 0x66]);
        assert!(r.on_reply(t0, IP, liar));
        assert!(!r.on_reply(t0, IP, MAC));
        assert!(r.on_unsolicited(IP, MAC));
        assert_eq!(r.conflicts(), 1);
        // Not pinned: the next lookup asks again.
        assert_eq!(r.lookup(t0, IP), Lookup::Pending);
        // A repeated answer with the same MAC is no conflict; a static entry
        // is never dropped.
        assert!(r.on_reply(t0, IP, MAC));
        assert!(!r.on_unsolicited(IP, MAC));
        r.add_static(IP, MAC);
        assert!(!r.on_unsolicited(IP, liar));
        assert_eq!(r.lookup(t0, IP), Lookup::Found(MAC));
    }

    #[test]
    fn a_silent_address_fails_at_once_for_a_while() {
        let mut r = Resolver::new(ResolveConfig {
            max_tries: 2,
            negative_ttl: Duration::from_secs(3),
            ..Default::default()
        });
        let ip = Ipv4::new(198, 18, 0, 99);
        let mut now = Instant(1);
        assert_eq!(r.lookup(now, ip), Lookup::Pending);
        while r.poll_failed().is_none() {
            now = now + Duration::from_millis(100);
            while r.poll_request(now).is_some() {}
        }
        // Remembered as silent: no new resolution, an immediate failure.
        assert_eq!(r.lookup(now, ip), Lookup::Failed);
        assert_eq!(r.pending_len(), 0);
        // Forgotten after the negative lifetime: resolution starts again.
        now = now + Duration::from_secs(3);
        assert_eq!(r.lookup(now, ip), Lookup::Pending);
    }

    #[test]
    fn unsolicited_replies_teach_nothing() {
        let mut r = Resolver::new(ResolveConfig::default());
        let ip = Ipv4::new(198, 18, 0, 7);
        let good = EthernetAddress([2, 0, 0, 0, 0, 7]);
        let evil = EthernetAddress([2, 0, 0, 0, 0, 66]);
        let now = Instant(1);
        // Nobody asked: a forged reply is not learned.
        assert!(!r.on_reply(now, ip, evil));
        assert_eq!(r.len(), 0);
        // Asked and answered: learned.
        assert_eq!(r.lookup(now, ip), Lookup::Pending);
        assert!(r.on_reply(now, ip, good));
        // A later unsolicited reply cannot redirect the entry.
        assert!(!r.on_reply(now, ip, evil));
        assert_eq!(r.lookup(now, ip), Lookup::Found(good));
    }

    #[test]
    fn gives_up_after_max_tries() {
        let mut r = Resolver::new(ResolveConfig {
            max_tries: 3,
            ..Default::default()
        });
        let mut now = Instant(0);
        r.lookup(now, IP);
        let mut sent = 0;
        for _ in 0..10 {
            if r.poll_request(now).is_some() {
                sent += 1;
            }
            now = now + Duration::from_millis(100);
        }
        assert_eq!(sent, 3);
        assert_eq!(r.poll_failed(), Some(IP));
        assert_eq!(r.pending_len(), 0);
    }

    #[test]
    fn static_entries_win_and_pending_is_bounded() {
        let mut r = Resolver::new(ResolveConfig {
            max_pending: 1,
            ..Default::default()
        });
        r.add_static(IP, MAC);
        r.on_reply(Instant(0), IP, EthernetAddress([2, 9, 9, 9, 9, 9]));
        assert_eq!(r.lookup(Instant(u64::MAX / 2), IP), Lookup::Found(MAC));
        assert_eq!(
            r.lookup(Instant(0), Ipv4::new(198, 18, 0, 3)),
            Lookup::Pending
        );
        assert_eq!(
            r.lookup(Instant(0), Ipv4::new(198, 18, 0, 4)),
            Lookup::Failed
        );
        assert!(!r.on_reply(
            Instant(0),
            Ipv4::new(198, 18, 0, 5),
            EthernetAddress::BROADCAST
        ));
    }

    #[test]
    fn one_owner_starts_at_most_its_share_of_resolutions() {
        let mut r = Resolver::new(ResolveConfig {
            max_pending: 8,
            max_pending_per_owner: 2,
            max_tries: 1,
            ..Default::default()
        });
        let t0 = Instant(0);
        let ip = |i: u8| Ipv4::new(198, 18, 0, i);
        for i in 10..12 {
            assert!(!r.over_share(t0, ip(i), 7));
            assert_eq!(r.lookup_for(t0, ip(i), 7), Lookup::Pending);
        }
        // A third unknown address is over its share; what is already being
        // resolved (by anyone) or known costs nothing.
        assert!(r.over_share(t0, ip(12), 7));
        assert!(!r.over_share(t0, ip(11), 7));
        r.add_static(ip(3), MAC);
        assert!(!r.over_share(t0, ip(3), 7));
        // Another owner, and nobody's lookups, still get the rest.
        assert!(!r.over_share(t0, ip(12), 8));
        assert_eq!(r.lookup_for(t0, ip(12), 8), Lookup::Pending);
        assert!(!r.over_share(t0, ip(13), 0));
        assert_eq!(r.lookup(t0, ip(13)), Lookup::Pending);
        // A reply ends one of the owner's resolutions: room for one more.
        assert!(r.on_reply(t0, ip(10), MAC));
        assert!(!r.over_share(t0, ip(14), 7));
        assert_eq!(r.lookup_for(t0, ip(14), 7), Lookup::Pending);
        assert!(r.over_share(t0, ip(15), 7));
        // Giving up ends them too (the silent addresses then cost nothing).
        while r.poll_request(t0).is_some() {}
        let later = t0 + Duration::from_secs(1);
        while r.poll_request(later).is_some() {}
        assert_eq!(r.pending_len(), 0);
        assert!(!r.over_share(later, ip(15), 7));
        assert!(!r.over_share(later, ip(11), 7), "silent: fails at once");
    }
}
