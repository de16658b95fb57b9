//! Micro-benchmarks of the dataplane without DPDK: the cost per frame through
//! the in-memory loopback device (build + transmit + receive + parse).
#![allow(missing_docs)]

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use dataplane::device::{Device, Loopback, BURST};
use dataplane::wire::{EthernetAddress, Frame, Ipv4, Message, Repr, SanHeader, DEFAULT_ETHERTYPE};

fn loopback_frame(c: &mut Criterion) {
    let a = EthernetAddress([2, 0, 0, 0, 0, 1]);
    let b = EthernetAddress([2, 0, 0, 0, 0, 2]);
    let (mut da, mut db) = Loopback::pair(1024, a, b);
    let repr = Repr {
        header: SanHeader {
            dst_mac: b,
            src_mac: a,
            src_ip: Ipv4::new(198, 18, 0, 1),
            src_port: 0,
            dst_ip: Ipv4::new(198, 18, 0, 2),
            dst_port: 0,
        },
        message: Message::EchoRequest { seq: 1, stamp: 2 },
    };
    let mut g = c.benchmark_group("loopback");
    g.throughput(Throughput::Elements(BURST as u64));
    let mut out = Vec::with_capacity(BURST);
    let mut rx = Vec::with_capacity(BURST);
    g.bench_function("burst_of_32_build_tx_rx_parse", |bch| {
        bch.iter(|| {
            for _ in 0..BURST {
                let mut buf = da.alloc(repr.buffer_len()).unwrap();
                repr.emit(&mut Frame::new_unchecked(&mut buf[..]), DEFAULT_ETHERTYPE);
                out.push(buf);
            }
            da.tx_burst(&mut out);
            db.rx_burst(&mut rx, BURST);
            for f in rx.drain(..) {
                black_box(Repr::parse_bytes(&f, DEFAULT_ETHERTYPE).unwrap());
            }
        })
    });
    g.finish();
}

fn backlog(c: &mut Criterion) {
    use dsan_channel::msg::{Command, Op, Request, RequestKey, Verdict};
    use dsan_channel::region::{layout, Region};
    use std::net::{Ipv4Addr, SocketAddrV4};
    let mut g = c.benchmark_group("backlog");
    // A listener's backlog ring, as the daemon fills it and the application
    // drains it: one request emitted, pushed, popped and parsed.
    let (region, _) = Region::create("dsan-bench").unwrap();
    let mut tx = region.format_backlog(0, 128).unwrap();
    let mut rx = region.open_backlog(0).unwrap();
    let req = Request {
        peer: SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 1), 49152),
        local: SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 2), 80),
        conn_id: 7,
        expires_ns: 1,
    };
    g.bench_function("request_push_pop_parse", |b| {
        b.iter(|| {
            tx.push(&black_box(req).to_slot()).unwrap();
            black_box(Request::parse(&rx.pop().unwrap().unwrap()).unwrap());
        })
    });
    // The command ring: a decision emitted, pushed, popped and parsed.
    let (daemon, mut cmd_rx) = Region::create("dsan-bench-cmd").unwrap();
    // SAFETY: dup of a valid fd gives a new fd we own.
    let dup = unsafe { std::os::fd::FromRawFd::from_raw_fd(libc::dup(daemon.fd())) };
    let (_app, mut cmd_tx) = Region::open(dup, layout::size()).unwrap();
    let cmd = Command {
        sock: 3,
        seq: 1,
        op: Op::Decide {
            key: RequestKey {
                peer_ip: Ipv4Addr::new(198, 18, 0, 1),
                conn_id: 7,
            },
            peer_port: 49152,
            verdict: Verdict::Accept { new_sock: 4 },
        },
    };
    g.bench_function("command_push_pop_parse", |b| {
        b.iter(|| {
            cmd_tx.push(&black_box(cmd).to_slot()).unwrap();
            black_box(Command::parse(&cmd_rx.pop().unwrap().unwrap()).unwrap());
        })
    });
    g.finish();
}

/// Server side of the protocol core on raw bytes: parse a connect request,
/// handle it, resolve it, emit the answer into a frame buffer.
fn proto(c: &mut Criterion) {
    use dataplane::proto::rng::SeededRng;
    use dataplane::proto::{Decision, Endpoint, ProtoConfig};
    use std::time::{Duration, Instant};

    let (a, b) = (
        EthernetAddress([2, 0, 0, 0, 0, 1]),
        EthernetAddress([2, 0, 0, 0, 0, 2]),
    );
    let (ia, ib) = (Ipv4::new(198, 18, 0, 1), Ipv4::new(198, 18, 0, 2));
    let request = |conn_id: u64| {
        Repr {
            header: SanHeader {
                dst_mac: b,
                src_mac: a,
                src_ip: ia,
                src_port: 40000,
                dst_ip: ib,
                dst_port: 80,
            },
            message: Message::ConnectRequest {
                conn_id,
                client_token: !conn_id,
                offer: dataplane::wire::Offer::DEFAULT,
            },
        }
        .to_bytes(DEFAULT_ETHERTYPE)
    };
    let fresh = |backlog: i64| {
        let mut e = Endpoint::new(ProtoConfig::default(), b, vec![ib], SeededRng::new(1));
        let l = e.listen((ib, 80), backlog).unwrap();
        (e, l)
    };
    const CHUNK: u64 = 4096;
    // Pre-built requests with distinct ids, as a stream of new clients.
    let frames: Vec<Vec<u8>> = (1..=CHUNK).map(request).collect();
    let mut out = [0u8; 64];
    let mut g = c.benchmark_group("proto");
    g.bench_function("connect_request_parse_handle_accept_emit", |bch| {
        bch.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut done = 0;
            while done < iters {
                let (mut e, l) = fresh(4096);
                let n = (iters - done).min(CHUNK);
                let t = Instant::now();
                for f in &frames[..n as usize] {
                    let r = Repr::parse_bytes(f, DEFAULT_ETHERTYPE).unwrap();
                    e.handle_frame(dataplane::time::Instant(1), &r);
                    let Some(dataplane::proto::Event::Incoming { request, .. }) = e.poll_event()
                    else {
                        panic!("queued")
                    };
                    e.decide(
                        dataplane::time::Instant(1),
                        l,
                        request.key(),
                        Decision::Accept,
                    )
                    .unwrap();
                    let reply = e.poll_transmit().unwrap();
                    reply.emit(
                        &mut Frame::new_unchecked(&mut out[..reply.buffer_len()]),
                        DEFAULT_ETHERTYPE,
                    );
                }
                total += t.elapsed();
                done += n;
            }
            total
        })
    });
    g.bench_function(
        "connect_request_parse_handle_reject_emit_backlog_full",
        |bch| {
            bch.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut done = 0;
                while done < iters {
                    let (mut e, _l) = fresh(1);
                    // Fill the one-entry backlog.
                    e.handle_frame(
                        dataplane::time::Instant(1),
                        &Repr::parse_bytes(&request(0), DEFAULT_ETHERTYPE).unwrap(),
                    );
                    while e.poll_transmit().is_some() {}
                    let n = (iters - done).min(CHUNK);
                    let t = Instant::now();
                    for f in &frames[..n as usize] {
                        let r = Repr::parse_bytes(f, DEFAULT_ETHERTYPE).unwrap();
                        e.handle_frame(dataplane::time::Instant(1), &r);
                        let reply = e.poll_transmit().unwrap();
                        reply.emit(
                            &mut Frame::new_unchecked(&mut out[..reply.buffer_len()]),
                            DEFAULT_ETHERTYPE,
                        );
                    }
                    total += t.elapsed();
                    done += n;
                }
                total
            })
        },
    );
    g.finish();
}

criterion_group!(benches, loopback_frame, backlog, proto);
criterion_main!(benches);
