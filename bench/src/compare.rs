//! `dsan-bench compare OLD.json NEW.json`: whether a change made a row
//! faster, with a confidence interval instead of one run's word.
//!
//! Each row of a `dsan-bench data --repeat N` file keeps every run's rate
//! (`rates`) and every run's dsan/tcp ratio (`ratio_to_tcp_runs`, from runs
//! that alternated dsan and kernel TCP). For each row found in both files,
//! the change is `median(new) / median(old)`, and its 95 % interval comes
//! from a bootstrap: both sets of runs resampled with replacement, 10,000
//! times, with a fixed seed (the same files give the same interval). A row
//! is called faster (or slower) only when the whole interval lies above
//! (or below) 1.0; otherwise "no change shown". The dsan/tcp ratio is
//! compared too: it moves less with the machine's mood than a raw rate.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// Bootstrap resamples.
const RESAMPLES: usize = 10_000;

/// A small deterministic generator (xorshift64*), so that an interval is a
/// function of the files alone.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The change `median(new) / median(old)` and its 95 % bootstrap interval.
pub(crate) fn change(old: &[f64], new: &[f64]) -> (f64, f64, f64) {
    let point = median(&mut new.to_vec()) / median(&mut old.to_vec());
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut ratios = Vec::with_capacity(RESAMPLES);
    let (mut a, mut b) = (vec![0.0; old.len()], vec![0.0; new.len()]);
    for _ in 0..RESAMPLES {
        for x in a.iter_mut() {
            *x = old[rng.below(old.len())];
        }
        for x in b.iter_mut() {
            *x = new[rng.below(new.len())];
        }
        ratios.push(median(&mut b) / median(&mut a));
    }
    ratios.sort_by(f64::total_cmp);
    let lo = ratios[(RESAMPLES as f64 * 0.025) as usize];
    let hi = ratios[(RESAMPLES as f64 * 0.975) as usize - 1];
    (point, lo, hi)
}

/// What an interval shows, for a quantity where higher is better.
pub(crate) fn verdict(lo: f64, hi: f64) -> &'static str {
    if lo > 1.0 {
        "faster"
    } else if hi < 1.0 {
        "slower"
    } else {
        "no change shown"
    }
}

/// The rows of a data file, by their identity.
fn rows(path: &Path) -> Result<BTreeMap<String, Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let Some(results) = v["results"].as_array() else {
        bail!(
            "{}: no \"results\" list (a `dsan-bench data --json` file is expected)",
            path.display()
        );
    };
    let mut m = BTreeMap::new();
    for r in results {
        let key = format!(
            "{} {} mtu {} {} {}",
            r["test"].as_str().unwrap_or("?"),
            r["path"].as_str().unwrap_or("?"),
            r["mtu"],
            r["port"].as_str().unwrap_or("?"),
            r["idle"].as_str().unwrap_or("?"),
        );
        m.insert(key, r.clone());
    }
    Ok(m)
}

fn runs(r: &Value, field: &str) -> Vec<f64> {
    r[field]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

/// Compares two `dsan-bench data --json` files row by row; prints one line
/// per row and per measure. Returns how many lines it printed.
pub(crate) fn run(old: &Path, new: &Path) -> Result<usize> {
    use std::io::Write;
    let (a, b) = (rows(old)?, rows(new)?);
    // (A reader that goes away, as `head` does, ends the listing quietly.)
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{:<44} {:<12} {:>5} {:>5} {:>8} {:>17}  verdict",
        "row", "measure", "n old", "n new", "change", "95% interval"
    );
    let mut lines = 0;
    for (key, ra) in &a {
        let Some(rb) = b.get(key) else { continue };
        for (field, name) in [("rates", "rate"), ("ratio_to_tcp_runs", "dsan/tcp")] {
            let (x, y) = (runs(ra, field), runs(rb, field));
            if x.is_empty() || y.is_empty() {
                continue;
            }
            let (p, lo, hi) = change(&x, &y);
            let v = if x.len() < 3 || y.len() < 3 {
                "too few runs (need >= 3 each)"
            } else {
                verdict(lo, hi)
            };
            let _ = writeln!(
                out,
                "{:<44} {:<12} {:>5} {:>5} {:>7.3}x {:>7.3}x-{:.3}x  {v}",
                key,
                name,
                x.len(),
                y.len(),
                p,
                lo,
                hi
            );
            lines += 1;
        }
    }
    if lines == 0 {
        bail!("no row with runs in both files (same test, path, MTU, port kind and policy)");
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clear_gain_is_called_faster_and_noise_is_not() {
        let old = [100.0, 102.0, 98.0, 101.0, 99.0];
        let new = [150.0, 149.0, 152.0, 151.0, 148.0];
        let (p, lo, hi) = change(&old, &new);
        assert!((p - 1.5).abs() < 0.01, "{p}");
        assert!(lo > 1.4 && hi < 1.6, "{lo} {hi}");
        assert_eq!(verdict(lo, hi), "faster");
        // Overlapping runs: the interval holds 1.0.
        let same = [99.0, 103.0, 97.0, 100.0, 102.0];
        let (_, lo, hi) = change(&old, &same);
        assert_eq!(verdict(lo, hi), "no change shown", "{lo} {hi}");
        let (_, lo, hi) = change(&new, &old);
        assert_eq!(verdict(lo, hi), "slower");
    }

    #[test]
    fn the_same_files_give_the_same_interval() {
        let old = [1.0, 2.0, 3.0];
        let new = [2.0, 3.0, 4.0];
        assert_eq!(change(&old, &new), change(&old, &new));
    }
}
