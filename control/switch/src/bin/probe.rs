//! dsan-sw-probe: exercises the switch from the command line (used by the lab
//! tests and handy in the lab).
//!
//! ```text
//! dsan-sw-probe listen ADDR PORT [BACKLOG] [ACCEPTS] [accept|reject|defer2]
//!     prints "listening san=true|false", then one line per accepted
//!     connection: "accepted PEER tcp|san"
//! dsan-sw-probe hold ADDR PORT BACKLOG
//!     a nonblocking listener that accepts only when told: prints
//!     "listening san=true|false", then for each "accept" line on stdin one
//!     accept attempt: "accepted PEER tcp|san" or "error ERRNO"
//! dsan-sw-probe connect IP PORT [SRC]
//!     (bound to SRC first if given) prints "connected tcp|san MS" or "error ERRNO MS"
//! dsan-sw-probe shell
//!     one long-lived process: for each "connect IP PORT" line on stdin, a
//!     connect on a new socket, printed as above
//! dsan-sw-probe echo ADDR PORT [CONNECTIONS]
//!     prints "listening san=...", then for each accepted connection echoes
//!     every byte until the peer's end of stream: "echoed BYTES tcp|san"
//! dsan-sw-probe send IP PORT BYTES
//!     connects, sends BYTES (then SHUT_WR) while a thread waits for the
//!     descriptor to poll readable and reads the echo back:
//!     "sent N received N match true|false tcp|san spurious K"
//!     (K: times the descriptor polled readable but a read found nothing)
//! dsan-sw-probe nbconnect IP PORT
//!     a nonblocking connect: "inprogress again E readable error E second R
//!     tcp|san MS" (the second connect's errno while pending, the error when
//!     the descriptor polled readable, a connect after that)
//! dsan-sw-probe nbclose IP PORT
//!     starts a nonblocking connect and closes at once: "closed MS"
//! ```

use dsan_provider::Decision;
use std::net::SocketAddrV4;
use std::time::Instant;

fn die(msg: &str) -> ! {
    eprintln!("dsan-sw-probe: error: {msg}");
    std::process::exit(2)
}

fn name(t: dsan_switch::Transport) -> &'static str {
    match t {
        dsan_switch::Transport::Tcp => "tcp",
        dsan_switch::Transport::San => "san",
    }
}

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let addr = |i: usize| -> SocketAddrV4 {
        let ip = a.get(i).unwrap_or_else(|| die("missing address"));
        let port = a.get(i + 1).unwrap_or_else(|| die("missing port"));
        format!("{ip}:{port}")
            .parse()
            .unwrap_or_else(|_| die("bad address or port"))
    };
    match a.first().map(String::as_str) {
        Some("listen") => {
            let at = addr(1);
            let backlog: i32 = a.get(3).and_then(|s| s.parse().ok()).unwrap_or(16);
            let n: usize = a.get(4).and_then(|s| s.parse().ok()).unwrap_or(1);
            let s = dsan_switch::socket().unwrap_or_else(|e| die(&format!("socket: errno {e}")));
            dsan_switch::bind(s, at).unwrap_or_else(|e| die(&format!("bind: errno {e}")));
            match a.get(5).map(String::as_str) {
                Some("reject") => {
                    dsan_switch::set_condition(s, Some(Box::new(|_| Decision::Reject))).unwrap()
                }
                Some("defer2") => {
                    // Defers each request twice, then accepts it.
                    let mut asked = 0u32;
                    dsan_switch::set_condition(
                        s,
                        Some(Box::new(move |_| {
                            asked += 1;
                            if asked.is_multiple_of(3) {
                                Decision::Accept
                            } else {
                                Decision::Defer
                            }
                        })),
                    )
                    .unwrap()
                }
                _ => {}
            }
            let san = dsan_switch::listen(s, backlog).unwrap_or_else(|e| die(&format!("listen: errno {e}")));
            println!("listening san={san}");
            for _ in 0..n {
                match dsan_switch::accept(s) {
                    Ok((c, peer)) => println!("accepted {peer} {}", name(dsan_switch::transport(c).unwrap())),
                    Err(e) => println!("error {e}"),
                }
            }
        }
        Some("hold") => {
            let at = addr(1);
            let backlog: i32 = a.get(3).and_then(|s| s.parse().ok()).unwrap_or(16);
            let s = dsan_switch::socket().unwrap_or_else(|e| die(&format!("socket: errno {e}")));
            dsan_switch::bind(s, at).unwrap_or_else(|e| die(&format!("bind: errno {e}")));
            let san = dsan_switch::listen(s, backlog).unwrap_or_else(|e| die(&format!("listen: errno {e}")));
            // SAFETY: F_SETFL on the switch's descriptor, which we own.
            unsafe { libc::fcntl(s, libc::F_SETFL, libc::fcntl(s, libc::F_GETFL) | libc::O_NONBLOCK) };
            println!("listening san={san}");
            for line in std::io::stdin().lines() {
                if line.map_or(true, |l| l.trim() != "accept") {
                    break;
                }
                match dsan_switch::accept(s) {
                    Ok((c, peer)) => println!("accepted {peer} {}", name(dsan_switch::transport(c).unwrap())),
                    Err(e) => println!("error {e}"),
                }
            }
        }
        Some("shell") => {
            for line in std::io::stdin().lines() {
                let Ok(line) = line else { break };
                let w: Vec<&str> = line.split_whitespace().collect();
                let [_, ip, port] = w[..] else { break };
                let Ok(to) = format!("{ip}:{port}").parse::<SocketAddrV4>() else {
                    break;
                };
                let s = dsan_switch::socket().unwrap_or_else(|e| die(&format!("socket: errno {e}")));
                let t = Instant::now();
                match dsan_switch::connect(s, to) {
                    Ok(tr) => println!("connected {} {:.1}", name(tr), t.elapsed().as_secs_f64() * 1e3),
                    Err(e) => println!("error {e} {:.1}", t.elapsed().as_secs_f64() * 1e3),
                }
                let _ = dsan_switch::close(s);
            }
        }
        Some("connect") => {
            let to = addr(1);
            let s = dsan_switch::socket().unwrap_or_else(|e| die(&format!("socket: errno {e}")));
            if let Some(src) = a.get(3) {
                // bind before connect: the source address the connection uses.
                let src: std::net::Ipv4Addr = src.parse().unwrap_or_else(|_| die("bad source address"));
                dsan_switch::bind(s, SocketAddrV4::new(src, 0))
                    .unwrap_or_else(|e| die(&format!("bind: errno {e}")));
            }
            let t = Instant::now();
            match dsan_switch::connect(s, to) {
                Ok(tr) => {
                    assert_eq!(dsan_switch::transport(s), Ok(tr));
                    println!("connected {} {:.1}", name(tr), t.elapsed().as_secs_f64() * 1e3)
                }
                Err(e) => println!("error {e} {:.1}", t.elapsed().as_secs_f64() * 1e3),
            }
        }
        Some("echo") => {
            let at = addr(1);
            let n: usize = a.get(3).and_then(|s| s.parse().ok()).unwrap_or(1);
            let s = dsan_switch::socket().unwrap_or_else(|e| die(&format!("socket: errno {e}")));
            dsan_switch::bind(s, at).unwrap_or_else(|e| die(&format!("bind: errno {e}")));
            let san = dsan_switch::listen(s, 16).unwrap_or_else(|e| die(&format!("listen: errno {e}")));
            println!("listening san={san}");
            for _ in 0..n {
                let (c, _) = dsan_switch::accept(s).unwrap_or_else(|e| die(&format!("accept: errno {e}")));
                let mut b = vec![0u8; 65536];
                let mut total = 0u64;
                loop {
                    match dsan_switch::recv(c, &mut b, 0) {
                        Ok(0) => break,
                        Ok(k) => {
                            let mut off = 0;
                            while off < k {
                                off += dsan_switch::send(c, &b[off..k], 0)
                                    .unwrap_or_else(|e| die(&format!("send: errno {e}")));
                            }
                            total += k as u64;
                        }
                        Err(e) => die(&format!("recv: errno {e}")),
                    }
                }
                let _ = dsan_switch::shutdown(c, libc::SHUT_WR);
                println!("echoed {total} {}", name(dsan_switch::transport(c).unwrap()));
                let _ = dsan_switch::close(c);
            }
        }
        Some("send") => {
            let to = addr(1);
            let bytes: u64 = a.get(3).and_then(|s| s.parse().ok()).unwrap_or(1 << 20);
            let s = dsan_switch::socket().unwrap_or_else(|e| die(&format!("socket: errno {e}")));
            let tr = dsan_switch::connect(s, to).unwrap_or_else(|e| die(&format!("connect: errno {e}")));
            let byte = |i: u64| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8;
            let reader = std::thread::spawn(move || {
                let mut b = vec![0u8; 65536];
                let (mut got, mut ok, mut spurious) = (0u64, true, 0u64);
                loop {
                    let mut p = libc::pollfd { fd: s, events: libc::POLLIN, revents: 0 };
                    // SAFETY: one valid pollfd.
                    if unsafe { libc::poll(&mut p, 1, 10_000) } != 1 {
                        die("the descriptor never polled readable");
                    }
                    match dsan_switch::recv(s, &mut b, libc::MSG_DONTWAIT) {
                        Ok(0) => break,
                        Ok(k) => {
                            ok &= b[..k].iter().enumerate().all(|(i, x)| *x == byte(got + i as u64));
                            got += k as u64;
                        }
                        Err(libc::EAGAIN) => spurious += 1,
                        Err(e) => die(&format!("recv: errno {e}")),
                    }
                }
                (got, ok, spurious)
            });
            let mut off = 0u64;
            let mut buf = vec![0u8; 65536];
            while off < bytes {
                let k = (bytes - off).min(buf.len() as u64) as usize;
                for (i, x) in buf[..k].iter_mut().enumerate() {
                    *x = byte(off + i as u64);
                }
                let n = dsan_switch::send(s, &buf[..k], 0).unwrap_or_else(|e| die(&format!("send: errno {e}")));
                off += n as u64;
            }
            dsan_switch::shutdown(s, libc::SHUT_WR).unwrap_or_else(|e| die(&format!("shutdown: errno {e}")));
            let (got, ok, spurious) = reader.join().unwrap_or_else(|_| die("reader panicked"));
            println!("sent {off} received {got} match {ok} {} spurious {spurious}", name(tr));
        }
        Some("nbconnect") => {
            let to = addr(1);
            let s = dsan_switch::socket().unwrap_or_else(|e| die(&format!("socket: errno {e}")));
            // SAFETY: F_SETFL on the switch's descriptor, which we own.
            unsafe { libc::fcntl(s, libc::F_SETFL, libc::fcntl(s, libc::F_GETFL) | libc::O_NONBLOCK) };
            let t = Instant::now();
            match dsan_switch::connect(s, to) {
                Err(libc::EINPROGRESS) => {}
                other => die(&format!("expected EINPROGRESS, got {other:?}")),
            }
            let again = match dsan_switch::connect(s, to) {
                Ok(_) => 0,
                Err(e) => -e,
            };
            let mut p = libc::pollfd { fd: s, events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut p, 1, 10_000) } != 1 {
                die("the descriptor never polled readable");
            }
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let err = dsan_switch::error(s).unwrap_or_else(|e| die(&format!("error: errno {e}")));
            let second = match dsan_switch::connect(s, to) {
                Ok(_) => 0,
                Err(e) => -e,
            };
            let tr = dsan_switch::transport(s).map(name).unwrap_or("none");
            println!("inprogress again {again} readable error {err} second {second} {tr} {ms:.1}");
        }
        Some("nbclose") => {
            let to = addr(1);
            let s = dsan_switch::socket().unwrap_or_else(|e| die(&format!("socket: errno {e}")));
            // SAFETY: F_SETFL on the switch's descriptor, which we own.
            unsafe { libc::fcntl(s, libc::F_SETFL, libc::fcntl(s, libc::F_GETFL) | libc::O_NONBLOCK) };
            match dsan_switch::connect(s, to) {
                Err(libc::EINPROGRESS) => {}
                other => die(&format!("expected EINPROGRESS, got {other:?}")),
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            let t = Instant::now();
            dsan_switch::close(s).unwrap_or_else(|e| die(&format!("close: errno {e}")));
            println!("closed {:.1}", t.elapsed().as_secs_f64() * 1e3);
        }
        _ => die("usage: dsan-sw-probe listen ADDR PORT [BACKLOG] [ACCEPTS] [accept|reject|defer2] | hold ADDR PORT BACKLOG | connect IP PORT | shell | echo ADDR PORT [N] | send IP PORT BYTES | nbconnect IP PORT | nbclose IP PORT"),
    }
}
