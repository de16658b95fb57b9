//! The connecting side: attempts, their retransmissions and outcomes.

use super::connection::{Connection, Role};
use super::endpoint::{Endpoint, EPHEMERAL};
use super::resolve::Lookup;
use super::rng::Rng;
use super::types::*;
use crate::time::Instant;
use crate::wire::{EthernetAddress, Ipv4, Message, Offer, RejectReason, SanHeader};
use std::time::Duration;

#[derive(Debug)]
pub(super) struct Attempt {
    pub(super) local: SockAddr,
    pub(super) peer: SockAddr,
    pub(super) peer_mac: Option<EthernetAddress>,
    pub(super) conn_id: u64,
    pub(super) client_token: u64,
    pub(super) started: Instant,
    pub(super) deadline: Instant,
    pub(super) next_send: Instant,
    pub(super) rto: Duration,
    pub(super) offer: Offer,
}

impl Attempt {
    /// When the attempt next needs attention (a retransmission or giving up).
    pub(super) fn next_timer(&self) -> Instant {
        if self.peer_mac.is_some() {
            self.next_send.min(self.deadline)
        } else {
            self.deadline
        }
    }
}

impl<R: Rng> Endpoint<R> {
    /// Starts connecting to `dst` from `local_ip` (or this host's first
    /// address in the destination's subnet). The result arrives as
    /// [`Event::Connected`] or [`Event::ConnectFailed`].
    ///
    /// # Errors
    /// See [`ConnectError`].
    pub fn connect(
        &mut self,
        now: Instant,
        local_ip: Option<Ipv4>,
        dst: SockAddr,
    ) -> Result<ConnHandle, ConnectError> {
        self.connect_with(now, local_ip, dst, self.cfg.offer(Offer::DEFAULT.window))
    }

    /// [`connect`](Self::connect), offering the peer `offer` (our receive
    /// window and frame size).
    ///
    /// # Errors
    /// See [`ConnectError`].
    pub fn connect_with(
        &mut self,
        now: Instant,
        local_ip: Option<Ipv4>,
        dst: SockAddr,
        offer: Offer,
    ) -> Result<ConnHandle, ConnectError> {
        self.connect_from(now, local_ip, 0, dst, offer)
    }

    /// [`Endpoint::connect_with`] from local port `local_port` (0: one of
    /// the ephemeral range, in turn). The port names the connection only
    /// (the connection id identifies it on the wire); the application's
    /// kernel bind keeps two sockets of a host from sharing one.
    ///
    /// # Errors
    /// As [`Endpoint::connect_with`].
    pub fn connect_from(
        &mut self,
        now: Instant,
        local_ip: Option<Ipv4>,
        local_port: u16,
        dst: SockAddr,
        offer: Offer,
    ) -> Result<ConnHandle, ConnectError> {
        self.connect_for(now, 0, local_ip, local_port, dst, offer)
    }

    /// [`Endpoint::connect_from`] on behalf of `owner` (a user; 0 for
    /// none): if the destination must be resolved, the resolution counts in
    /// the owner's share of the resolver's table.
    ///
    /// # Errors
    /// As [`Endpoint::connect_with`], and [`ConnectError::ResolutionShare`]
    /// when that share is used up.
    pub fn connect_for(
        &mut self,
        now: Instant,
        owner: u32,
        local_ip: Option<Ipv4>,
        local_port: u16,
        dst: SockAddr,
        offer: Offer,
    ) -> Result<ConnHandle, ConnectError> {
        let subnet = self
            .cfg
            .subnets
            .iter()
            .find(|s| s.contains(dst.0))
            .copied()
            .ok_or(ConnectError::HostUnreachable)?;
        let src = match local_ip {
            Some(ip) if self.is_ours(ip) => ip,
            Some(_) => return Err(ConnectError::NoLocalAddress),
            None => self
                .addrs
                .iter()
                .copied()
                .find(|a| subnet.contains(*a))
                .or(self.addrs.first().copied())
                .ok_or(ConnectError::NoLocalAddress)?,
        };
        if self.attempts.len() >= self.cfg.max_attempts {
            return Err(ConnectError::TooManyAttempts);
        }
        if self.resolver.over_share(now, dst.0, owner) {
            return Err(ConnectError::ResolutionShare);
        }
        let mut conn_id = self.rng.next_u64();
        while self.attempt_by_wire.contains_key(&conn_id) {
            conn_id = self.rng.next_u64();
        }
        let port = if local_port != 0 {
            local_port
        } else {
            let p = self.next_port;
            self.next_port = if self.next_port == *EPHEMERAL.end() {
                *EPHEMERAL.start()
            } else {
                self.next_port + 1
            };
            p
        };
        // The handle is our token: the peer echoes it, and it names the
        // slot the connection will take.
        let h = self.conns.new_handle(self.rng.next_u64() as u32);
        let client_token = h.0;
        let lookup = self.resolver.lookup_for(now, dst.0, owner);
        let peer_mac = match lookup {
            Lookup::Found(m) => Some(m),
            Lookup::Pending | Lookup::Failed => None,
        };
        let rto = self.cfg.initial_rto;
        self.attempts.insert(
            h,
            Attempt {
                local: (src, port),
                peer: dst,
                peer_mac,
                conn_id,
                client_token,
                started: now,
                deadline: now + self.cfg.connect_budget,
                next_send: now + rto,
                rto,
                offer,
            },
        );
        self.attempt_by_wire.insert(conn_id, h);
        match lookup {
            Lookup::Found(_) => self.send_request(h),
            Lookup::Pending => self.resolution_timers(now), // sends the resolution request now
            Lookup::Failed => {
                // Nobody answered for this address a moment ago (or the
                // resolver is full): due at once, the next timer pass ends
                // it as the timeout would.
                self.stats.unresolved_fast += 1;
                if let Some(a) = self.attempts.get_mut(&h) {
                    a.deadline = now;
                }
            }
        }
        Ok(h)
    }

    /// Abandons a connect attempt in progress (nothing is sent; a late accept
    /// will be answered with a close). Returns whether `h` was an attempt.
    pub(super) fn abandon(&mut self, h: ConnHandle) -> bool {
        match self.attempts.remove(&h) {
            Some(a) => {
                self.attempt_by_wire.remove(&a.conn_id);
                self.conns.release(h);
                true
            }
            None => false,
        }
    }

    pub(super) fn finish_attempt(
        &mut self,
        now: Instant,
        h: ConnHandle,
        outcome: Result<(SanHeader, u64, Offer), ConnectFailure>,
    ) {
        let Some(a) = self.attempts.remove(&h) else {
            return;
        };
        self.attempt_by_wire.remove(&a.conn_id);
        match outcome {
            Ok((hdr, server_token, peer_offer)) => {
                self.stats.attempts[0] += 1;
                let d = now.saturating_since(a.started);
                let secs = d.as_secs_f64();
                let b = CONNECT_BUCKETS_S
                    .iter()
                    .position(|ub| secs <= *ub)
                    .unwrap_or(CONNECT_BUCKETS_S.len());
                self.stats.connect_duration_buckets[b] += 1;
                self.stats.connect_duration_sum_ns += d.as_nanos() as u64;
                let c = Connection::new(
                    Role::Client,
                    a.local,
                    a.peer,
                    hdr.src_mac,
                    a.conn_id,
                    a.client_token,
                    server_token,
                    (a.offer, peer_offer),
                );
                let params = c.stream_params();
                self.conns.insert(h, c);
                self.events.push_back(Event::Connected { conn: h, params });
            }
            Err(e) => {
                self.conns.release(h);
                self.stats.attempts[match e {
                    ConnectFailure::Refused(_) => 1,
                    ConnectFailure::Reset => 2,
                    ConnectFailure::TimedOut => 3,
                }] += 1;
                self.events
                    .push_back(Event::ConnectFailed { conn: h, error: e });
            }
        }
    }

    fn send_request(&mut self, h: ConnHandle) {
        let Some(a) = self.attempts.get(&h) else {
            return;
        };
        let Some(mac) = a.peer_mac else { return };
        let (local, peer, m) = (
            a.local,
            a.peer,
            Message::ConnectRequest {
                conn_id: a.conn_id,
                client_token: a.client_token,
                offer: a.offer,
            },
        );
        self.emit(mac, local, peer, m);
    }

    /// The attempt matching a reply from `src` with `conn_id` and `client_token`
    /// (a wrong token is counted).
    fn attempt_for(&mut self, src: Ipv4, conn_id: u64, client_token: u64) -> Option<ConnHandle> {
        let ah = self.attempt_by_wire.get(&conn_id).copied()?;
        let a = &self.attempts[&ah];
        if a.peer.0 != src || a.client_token != client_token {
            self.stats.bad_token += 1;
            return None;
        }
        Some(ah)
    }

    pub(super) fn on_accept(
        &mut self,
        now: Instant,
        h: &SanHeader,
        conn_id: u64,
        client_token: u64,
        server_token: u64,
        offer: Offer,
    ) {
        let confirm = Message::AcceptAck {
            conn_id,
            token: server_token,
        };
        if self.attempt_by_wire.contains_key(&conn_id) {
            if let Some(ah) = self.attempt_for(h.src_ip, conn_id, client_token) {
                self.finish_attempt(now, ah, Ok((*h, server_token, offer)));
                self.reply(h, confirm);
            }
            return;
        }
        let known = self
            .conns
            .by_wire((h.src_ip, conn_id, Role::Client))
            .and_then(|c| self.conns.get(&c));
        match known {
            Some(c) if c.my_token == client_token && c.peer_token == server_token => {
                // A duplicate: our confirmation was lost; confirm again.
                self.stats.late_replies += 1;
                if !c.is_closing() {
                    self.reply(h, confirm);
                }
            }
            Some(_) => self.stats.bad_token += 1,
            None => {
                // The attempt is over (timed out, abandoned): tell the
                // accepting side to drop the connection it made.
                self.stats.late_replies += 1;
                self.reply(
                    h,
                    Message::Close {
                        conn_id,
                        token: server_token,
                    },
                );
            }
        }
    }

    pub(super) fn on_reject(
        &mut self,
        now: Instant,
        h: &SanHeader,
        conn_id: u64,
        client_token: u64,
        reason: RejectReason,
    ) {
        if !self.attempt_by_wire.contains_key(&conn_id) {
            self.stats.late_replies += 1;
            return;
        }
        if let Some(ah) = self.attempt_for(h.src_ip, conn_id, client_token) {
            let e = match reason {
                RejectReason::NoListener => ConnectFailure::Reset,
                r => ConnectFailure::Refused(r),
            };
            self.finish_attempt(now, ah, Err(e));
        }
    }

    /// The accepting side accepted and closed before its accept reached us
    /// (lost or reordered): the attempt succeeded and the connection ended.
    /// Returns false only for a frame with a wrong token (not to be acknowledged).
    pub(super) fn accepted_then_closed(
        &mut self,
        now: Instant,
        h: &SanHeader,
        conn_id: u64,
        token: u64,
    ) -> bool {
        if !self.attempt_by_wire.contains_key(&conn_id) {
            return true;
        }
        let Some(ah) = self.attempt_for(h.src_ip, conn_id, token) else {
            return false;
        };
        self.finish_attempt(now, ah, Ok((*h, 0, crate::wire::Offer::MIN)));
        self.remove_conn(now, ah);
        self.events.push_back(Event::Closed { conn: ah });
        true
    }

    /// Attempts waiting for `ip`'s MAC send their request now (in handle order).
    pub(super) fn resolved(&mut self, ip: Ipv4, mac: EthernetAddress) {
        let waiting: Vec<ConnHandle> = self
            .attempts
            .iter()
            .filter(|(_, a)| a.peer.0 == ip && a.peer_mac.is_none())
            .map(|(h, _)| *h)
            .collect();
        for h in waiting {
            if let Some(a) = self.attempts.get_mut(&h) {
                a.peer_mac = Some(mac);
            }
            self.send_request(h);
        }
    }

    /// Resolution requests due, and attempts whose resolution failed.
    pub(super) fn resolution_timers(&mut self, now: Instant) {
        while let Some(ip) = self.resolver.poll_request(now) {
            let src = self.addrs.first().copied().unwrap_or(Ipv4::UNSPECIFIED);
            self.emit(
                EthernetAddress::BROADCAST,
                (src, 0),
                (ip, 0),
                Message::ResolveRequest,
            );
        }
        while let Some(ip) = self.resolver.poll_failed() {
            let failed: Vec<ConnHandle> = self
                .attempts
                .iter()
                .filter(|(_, a)| a.peer.0 == ip && a.peer_mac.is_none())
                .map(|(h, _)| *h)
                .collect();
            for h in failed {
                self.finish_attempt(now, h, Err(ConnectFailure::TimedOut));
            }
        }
    }

    /// Retransmissions and give-ups of connect attempts (in handle order).
    pub(super) fn attempt_timers(&mut self, now: Instant) {
        let due: Vec<ConnHandle> = self
            .attempts
            .iter()
            .filter(|(_, a)| a.deadline <= now || (a.peer_mac.is_some() && a.next_send <= now))
            .map(|(h, _)| *h)
            .collect();
        for h in due {
            let a = self.attempts.get_mut(&h).expect("listed");
            if a.deadline <= now {
                self.finish_attempt(now, h, Err(ConnectFailure::TimedOut));
                continue;
            }
            a.rto = (a.rto * 2).min(self.cfg.max_rto);
            a.next_send = now + a.rto;
            self.send_request(h);
        }
    }
}
