//! The daemon's memory per established connection, measured: a counting
//! allocator sees what the protocol core's tables grow by when connections
//! are set up, and what the lcore's stream table and timer set grow by for
//! as many entries of their real sizes. Tables that double as they grow
//! would hold up to twice their entries; these are slabs in fixed chunks
//! and one small hash table, so the measured figure stays within the
//! budget at any fill.
//!
//! Run with `--nocapture` to see the figures (`dsanctl stats` prints the
//! structural sum, `streams.state_bytes_per_connection`).

use dataplane::node::{STREAM_ENTRY_BYTES, STREAM_STATE_BYTES};
use dataplane::proto::rng::SeededRng;
use dataplane::proto::slab::Slab;
use dataplane::proto::*;
use dataplane::time::Instant;
use dataplane::wire::{EthernetAddress, Ipv4};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::BTreeSet;
use std::num::NonZeroU64;
use std::time::Duration;

/// The system allocator, counting this thread's live heap bytes.
struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
}

fn count(d: isize) {
    let _ = LIVE.try_with(|c| c.set(c.get() + d));
}

fn live() -> isize {
    LIVE.with(Cell::get)
}

// SAFETY: every call is passed to the system allocator unchanged; the
// counting only touches a thread-local cell, which allocates nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count(l.size() as isize);
        // SAFETY: the caller's layout contract is passed on as is.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        count(-(l.size() as isize));
        // SAFETY: `p` came from `alloc` with this layout.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        count(new as isize - l.size() as isize);
        // SAFETY: as for `dealloc`, and `new` is the caller's valid size.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

const IA: Ipv4 = Ipv4::new(198, 18, 0, 1);
const IB: Ipv4 = Ipv4::new(198, 18, 0, 2);
const MA: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 1]);
const MB: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 2]);

/// Moves frames and events until both endpoints are quiet; returns b's new
/// requests.
fn shuttle(
    a: &mut Endpoint<SeededRng>,
    b: &mut Endpoint<SeededRng>,
    now: Instant,
) -> Vec<Incoming> {
    let mut reqs = vec![];
    loop {
        let mut moved = false;
        while let Some(f) = a.poll_transmit() {
            moved = true;
            b.handle_frame(now, &f);
        }
        while let Some(f) = b.poll_transmit() {
            moved = true;
            a.handle_frame(now, &f);
        }
        while a.poll_event().is_some() {}
        while let Some(e) = b.poll_event() {
            if let Event::Incoming { request, .. } = e {
                reqs.push(request);
            }
        }
        if !moved {
            return reqs;
        }
    }
}

/// Heap bytes per connection of the protocol core, over both endpoints
/// (each connection is held by a client and a server), with `n` open.
fn core_bytes(n: usize) -> f64 {
    let cfg = ProtoConfig {
        subnets: vec![Subnet {
            addr: IA,
            prefix: 24,
        }],
        ..Default::default()
    };
    let mut a = Endpoint::new(cfg.clone(), MA, vec![IA], SeededRng::new(1));
    let mut b = Endpoint::new(cfg, MB, vec![IB], SeededRng::new(2));
    let mut now = Instant(1_000_000);
    let l = b.listen((Ipv4::UNSPECIFIED, 5000), 64).unwrap();
    // Warm the queues (their capacity stays).
    let _ = a.connect(now, None, (IB, 5000)).unwrap();
    for r in shuttle(&mut a, &mut b, now) {
        b.decide(now, l, r.key(), Decision::Reject).unwrap();
    }
    shuttle(&mut a, &mut b, now);
    let before = live();
    for _ in 0..n {
        a.connect(now, None, (IB, 5000)).unwrap();
        for r in shuttle(&mut a, &mut b, now) {
            b.decide(now, l, r.key(), Decision::Accept).unwrap();
        }
        shuttle(&mut a, &mut b, now);
    }
    // Let the requests' and refusals' records expire: what stays is the
    // connections.
    now = now + Duration::from_secs(600);
    a.handle_timeout(now);
    b.handle_timeout(now);
    shuttle(&mut a, &mut b, now);
    assert_eq!(a.connections().count(), n);
    assert_eq!(b.connections().count(), n);
    (live() - before) as f64 / (2 * n) as f64
}

/// An entry of the stream table's size that, like the real one (which
/// holds an `Arc`), leaves a niche for the empty slot.
type StreamEntry = (NonZeroU64, [u64; STREAM_ENTRY_BYTES / 8 - 1]);

/// Heap bytes per entry of the lcore's stream table and timer set, with
/// entries of the real sizes.
fn lcore_bytes(n: usize) -> f64 {
    assert_eq!(
        std::mem::size_of::<Option<StreamEntry>>(),
        STREAM_ENTRY_BYTES
    );
    let before = live();
    let mut streams: Slab<StreamEntry> = Slab::default();
    let mut timers: BTreeSet<(Instant, ConnHandle)> = BTreeSet::new();
    for i in 0..n as u64 {
        let v = NonZeroU64::new(i + 1).unwrap();
        streams.insert(i as usize, (v, [i; STREAM_ENTRY_BYTES / 8 - 1]));
        timers.insert((Instant(i * 7919 % 1_000_003), ConnHandle(i)));
    }
    let per = (live() - before) as f64 / n as f64;
    assert_eq!((streams.len(), timers.len()), (n, n));
    per
}

#[test]
fn per_connection_state_fits_in_256_bytes() {
    println!("structural: {STREAM_STATE_BYTES} bytes per connection");
    // (`STREAM_STATE_BYTES <= 256` is checked when the crate compiles.)
    // The wire index is a hash table: the figure depends on where n falls.
    // 1,000 is a typical fill, 1,792 a full table, 1,800 one just grown,
    // 10,000 a large host. (With a hundred connections the slabs' one
    // partly used chunk, 10 KiB for the streams, is a third of the figure.)
    for n in [1000, 1792, 1800, 10_000] {
        let (core, lcore) = (core_bytes(n), lcore_bytes(n));
        println!(
            "{n} connections: protocol core {core:.0} + lcore {lcore:.0} = {:.0} bytes per connection, free slots included",
            core + lcore
        );
        assert!(
            core + lcore <= 256.0,
            "{n} connections take {:.0} bytes each",
            core + lcore
        );
    }
}
