//! The connecting side's state: a connect attempt (its behaviour is in
//! `endpoint`, "The client side").

use super::types::*;
use crate::time::Instant;
use crate::wire::{EthernetAddress, Offer};
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
