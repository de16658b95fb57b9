//! Delivering the protocol core's events to processes: a request into the
//! listener's backlog ring (or a refusal when it is full), connect outcomes
//! into the socket table, event bits, eventfd signals and futex wake-ups.

use super::apps::SockObj;
use super::signal::{complete, raise};
use super::Node;
use crate::proto::Event;
use crate::time::Instant;
use crate::wire::RejectReason;
use dsan_channel::msg::Request;
use dsan_channel::region::{FD_ACCEPT, FD_CONNECT};
use dsan_channel::ring::PushError;
use dsan_channel::sys;
use std::net::SocketAddrV4;
use std::sync::atomic::Ordering;

impl Node {
    pub(super) fn dispatch(&mut self, now: Instant, e: Event) {
        match e {
            Event::Incoming { listener, request } => {
                let members = self.groups.members(listener);
                if members.is_empty() {
                    self.groups.done_with(members);
                    return;
                }
                let left = (request.arrived + self.cfg.proto.connect_budget).saturating_since(now);
                let req = Request {
                    peer: SocketAddrV4::new(request.peer.0, request.peer.1),
                    local: SocketAddrV4::new(request.local.0, request.local.1),
                    conn_id: request.conn_id,
                    expires_ns: sys::monotonic_ns() + left.as_nanos() as u64,
                };
                // Stamped before the push: a spinning accepting thread may
                // take the request the moment it is in the ring.
                self.trace.stamp(request.conn_id, super::Hop::Queued);
                // To the first member (in turn) whose ring takes it.
                let slot = req.to_slot();
                let mut taken = false;
                for &(pid, sock) in &members {
                    let Some(p) = self.procs.get_mut(&pid).filter(|p| !p.condemned) else {
                        continue;
                    };
                    let pushed = match p.backlogs.get_mut(&sock) {
                        Some(ring) => ring.push(&slot),
                        None => Err(PushError::Full),
                    };
                    match pushed {
                        Ok(()) => {
                            let s = p.shared.region.sock(sock as usize);
                            if !raise(s, p.events.get(&sock), FD_ACCEPT) {
                                self.local.event_signal_failed += 1;
                            }
                            taken = true;
                            break;
                        }
                        // The core counts the request as pending, so an
                        // honest application's ring has room; it is full
                        // only when it holds requests that expired before
                        // the application took them: the next member.
                        Err(PushError::Full) => {}
                        Err(PushError::Violation(_)) => self.violation(now, pid),
                    }
                }
                self.groups.done_with(members);
                if !taken {
                    // No ring took it: refused at once, no event.
                    self.ep
                        .refuse(now, request.key(), RejectReason::BacklogFull);
                }
            }
            Event::Connected { conn, .. } | Event::ConnectFailed { conn, .. } => {
                let Some(&(pid, sock)) = self.conn_owner.get(&conn) else {
                    return;
                };
                let Some(p) = self.procs.get_mut(&pid) else {
                    return;
                };
                let Some(SockObj::Attempt {
                    blocking,
                    seq,
                    bufs,
                    ..
                }) = p.socks.get(&sock).copied()
                else {
                    return;
                };
                // The stream's parameters when connected, else the errno.
                let outcome = match e {
                    Event::Connected { params, .. } => Ok(params),
                    Event::ConnectFailed { error, .. } => Err(-error.errno()),
                    _ => return,
                };
                let err = outcome.err().unwrap_or(0);
                let uid = p.shared.uid;
                self.quotas.give_attempt(uid);
                let Some(p) = self.procs.get_mut(&pid) else {
                    return;
                };
                if let Ok(params) = outcome {
                    p.socks.insert(sock, SockObj::Conn(conn));
                    self.open_stream(now, conn, pid, sock, bufs, params);
                } else {
                    p.socks.remove(&sock);
                    self.conn_owner.remove(&conn);
                }
                let Some(p) = self.procs.get(&pid) else {
                    return;
                };
                let s = p.shared.region.sock(sock as usize);
                s.connect_state
                    .store(if err == 0 { 1 } else { err }, Ordering::Release);
                if blocking {
                    s.arrivals.fetch_add(1, Ordering::Release);
                    complete(s, seq, i64::from(err));
                } else {
                    s.connect_error.store(err, Ordering::Release);
                    if !raise(s, p.events.get(&sock), FD_CONNECT) {
                        self.local.event_signal_failed += 1;
                    }
                }
                self.trace.completed(conn);
            }
            Event::Aborted { conn, reason } => {
                self.local.resets[super::streams::reset_index(reason)] += 1;
                self.stream_aborted(conn);
            }
            Event::StreamDone { conn } => self.stream_done(conn),
            Event::Closed { conn } | Event::Reset { conn, .. } => {
                let owner = self.owner(conn);
                self.stream_ended(conn, matches!(e, Event::Reset { .. }));
                self.conn_owner.remove(&conn);
                if let Some((pid, sock)) = owner {
                    if let Some(p) = self.procs.get_mut(&pid) {
                        p.socks.insert(sock, SockObj::Ended);
                    }
                }
            }
        }
    }
}
