//! The daemon's control socket: one JSON object per line each way.
//!
//! Requests are `{"cmd": "...", ...}`; replies are `{"ok": true, ...}` or
//! `{"ok": false, "error": "..."}`. `docs/operations.md` lists the commands.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Most probes one `ping` may send.
pub const PING_MAX_COUNT: u64 = 1_000_000;
/// Longest pause between probes, microseconds (10 s).
pub const PING_MAX_INTERVAL_US: u64 = 10_000_000;
/// Longest wait for one reply, milliseconds (10 s).
pub const PING_MAX_TIMEOUT_MS: u64 = 10_000;
/// Longest a whole `ping` may run, seconds: the daemon serves one at a time,
/// and cancels one that runs longer.
pub const PING_MAX_SECS: u64 = 600;

/// Checks a ping's numbers; returns how long the whole probe may take.
///
/// # Errors
/// A sentence naming the argument out of range.
pub fn ping_budget(count: u64, interval_us: u64, timeout_ms: u64) -> Result<Duration, String> {
    if count == 0 || count > PING_MAX_COUNT {
        return Err(format!("count must be between 1 and {PING_MAX_COUNT}"));
    }
    if interval_us > PING_MAX_INTERVAL_US {
        return Err(format!(
            "interval must be at most {PING_MAX_INTERVAL_US} us"
        ));
    }
    if timeout_ms == 0 || timeout_ms > PING_MAX_TIMEOUT_MS {
        return Err(format!(
            "timeout must be between 1 and {PING_MAX_TIMEOUT_MS} ms"
        ));
    }
    let per_probe = Duration::from_micros(interval_us) + Duration::from_millis(timeout_ms);
    let n = u32::try_from(count).expect("count checked");
    let worst = Duration::from_millis(timeout_ms)
        .saturating_mul(2)
        .saturating_add(per_probe.saturating_mul(n));
    // The daemon cancels a ping still running after PING_MAX_SECS (the
    // replies so far are lost with it: ask for fewer probes).
    Ok(worst
        .min(Duration::from_secs(PING_MAX_SECS))
        .saturating_add(Duration::from_secs(5)))
}

/// Sends one request and reads one reply.
///
/// # Errors
/// If the daemon cannot be reached, or it answers `ok: false` (the error text
/// is returned).
pub fn request(socket: &Path, req: &Value, timeout: Duration) -> Result<Value, String> {
    let mut s = UnixStream::connect(socket)
        .map_err(|e| format!("cannot reach dsand at {}: {e}", socket.display()))?;
    s.set_read_timeout(Some(timeout)).ok();
    let mut line = req.to_string();
    line.push('\n');
    s.write_all(line.as_bytes())
        .map_err(|e| format!("sending to dsand: {e}"))?;
    let mut r = BufReader::new(s);
    let mut out = String::new();
    r.read_line(&mut out)
        .map_err(|e| format!("reading from dsand: {e}"))?;
    if out.is_empty() {
        return Err("dsand closed the connection without answering".into());
    }
    let v: Value =
        serde_json::from_str(&out).map_err(|e| format!("dsand sent a malformed reply: {e}"))?;
    if v["ok"] == json!(true) {
        Ok(v)
    } else {
        Err(v["error"].as_str().unwrap_or("unknown error").to_string())
    }
}

/// The socket path to use: an explicit one, else `$DSAN_SOCKET`, else the default.
pub fn socket_path(explicit: Option<&Path>) -> std::path::PathBuf {
    explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("DSAN_SOCKET").map(Into::into))
        .unwrap_or_else(|| crate::config::DEFAULT_SOCKET.into())
}
