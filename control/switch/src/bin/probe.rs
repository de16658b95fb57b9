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
//! dsan-sw-probe connect IP PORT
//!     prints "connected tcp|san MS" or "error ERRNO MS"
//! dsan-sw-probe shell
//!     one long-lived process: for each "connect IP PORT" line on stdin, a
//!     connect on a new socket, printed as above
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
            let t = Instant::now();
            match dsan_switch::connect(s, to) {
                Ok(tr) => {
                    assert_eq!(dsan_switch::transport(s), Ok(tr));
                    println!("connected {} {:.1}", name(tr), t.elapsed().as_secs_f64() * 1e3)
                }
                Err(e) => println!("error {e} {:.1}", t.elapsed().as_secs_f64() * 1e3),
            }
        }
        _ => die("usage: dsan-sw-probe listen ADDR PORT [BACKLOG] [ACCEPTS] [accept|reject|defer2] | hold ADDR PORT BACKLOG | connect IP PORT | shell"),
    }
}
