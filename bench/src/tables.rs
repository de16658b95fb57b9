//! `dsan-bench tables`: the tables of `docs/benchmarks.md`, generated from
//! the JSON that `scripts/bench.sh` writes under `docs/bench/`. The doc holds
//! each table between `<!-- generated:NAME -->` and `<!-- end:NAME -->`;
//! `--write` replaces those blocks, `--check` fails when one differs from
//! what the JSON gives (the test suite runs it, so no figure in a table can
//! drift from its data file), `--print NAME` prints one block.
//!
//! Every ratio is dsan's figure over kernel TCP's on the same path in the
//! same run: the median of the runs' ratios, with their range.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The blocks, in the order the doc has them.
pub(crate) const BLOCKS: [&str; 7] = [
    "provenance",
    "headline",
    "suite",
    "cpu",
    "data",
    "apps",
    "hosts",
];

/// Where the data files are.
pub(crate) struct Sources {
    pub(crate) dir: PathBuf,
    /// apps.json somewhere else (bench/apps.sh's own --out).
    pub(crate) apps: Option<PathBuf>,
}

impl Sources {
    fn read(&self, rel: &str) -> Result<Value> {
        let p = match (rel, &self.apps) {
            ("apps/apps.json", Some(a)) => a.clone(),
            _ => self.dir.join(rel),
        };
        let t = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&t).with_context(|| format!("parsing {}", p.display()))
    }
}

fn f(v: &Value) -> Option<f64> {
    v.as_f64()
}

/// `0.52x (0.49-0.55)` from a `{median, min, max}` object (or a list of
/// per-run ratios).
fn ratio(v: &Value) -> String {
    let (m, lo, hi) = if let Some(list) = v.as_array() {
        let xs: Vec<f64> = list.iter().filter_map(Value::as_f64).collect();
        match crate::suite::spread(&xs) {
            Some(s) => s,
            None => return "-".into(),
        }
    } else {
        match (f(&v["median"]), f(&v["min"]), f(&v["max"])) {
            (Some(m), Some(lo), Some(hi)) => (m, lo, hi),
            _ => return "-".into(),
        }
    };
    if (hi - lo).abs() < 1e-12 {
        format!("{m:.2}x")
    } else {
        format!("{m:.2}x ({lo:.2}-{hi:.2})")
    }
}

fn us_of_ns(v: &Value) -> String {
    v.as_u64()
        .map_or("-".into(), |n| format!("{:.1}", n as f64 / 1000.0))
}

fn num(v: &Value, digits: usize) -> String {
    f(v).map_or("-".into(), |x| format!("{x:.digits$}"))
}

fn thousands(v: &Value) -> String {
    let Some(x) = f(v) else { return "-".into() };
    let s = format!("{:.0}", x);
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// One block's text (without its markers).
pub(crate) fn block(name: &str, src: &Sources) -> Result<String> {
    match name {
        "provenance" => provenance(src),
        "headline" => headline(src),
        "suite" => suite(src),
        "cpu" => cpu(src),
        "data" => data(src),
        "apps" => apps(src),
        "hosts" => hosts(src),
        _ => bail!("unknown block {name:?} (known: {})", BLOCKS.join(", ")),
    }
}

fn provenance(src: &Sources) -> Result<String> {
    let mut s = String::from(
        "| figures | file | commit | date | command | steal during the run |\n|---|---|---|---|---|---|\n",
    );
    for (what, rel) in [
        ("suite", "suite/summary.json"),
        ("data", "data/data.json"),
        ("command round trip", "connect.json"),
        ("apps", "apps/apps.json"),
        ("hosts", "hosts/hosts.json"),
    ] {
        let d = src.read(rel)?;
        // The Rust benchmarks keep it under "provenance", the scripts at the top.
        let p = if d["provenance"].is_object() {
            &d["provenance"]
        } else {
            &d
        };
        let commit = p["commit"].as_str().unwrap_or("unknown");
        let dirty = match p["dirty"].as_bool() {
            Some(true) => " (dirty)",
            Some(false) => "",
            None => " (dirty: unknown)",
        };
        let steal = d["machine_during_run"]["steal_pct"]
            .as_f64()
            .or_else(|| d["config"]["machine_during_run"]["steal_pct"].as_f64());
        writeln!(
            s,
            "| {what} | `docs/bench/{rel}` | `{}`{dirty} | {} | `{}` | {} |",
            &commit[..commit.len().min(12)],
            p["date"].as_str().unwrap_or("-"),
            p["command"].as_str().unwrap_or("-"),
            steal.map_or("-".into(), |x| format!("{x:.1} %"))
        )?;
    }
    let m = &src.read("suite/summary.json")?["machine"];
    writeln!(
        s,
        "\nMachine: {} x {}, Linux {}.",
        m["cpus"],
        m["cpu_model"].as_str().unwrap_or("?"),
        m["kernel"].as_str().unwrap_or("?")
    )?;
    Ok(s)
}

fn suite_rows(src: &Sources) -> Result<Vec<Value>> {
    let d = src.read("suite/summary.json")?;
    Ok(d["results"].as_array().cloned().unwrap_or_default())
}

fn find<'a>(rows: &'a [Value], r: &Value, transport: &str) -> Option<&'a Value> {
    rows.iter().find(|x| {
        x["transport"] == transport
            && x["scenario"] == r["scenario"]
            && x["policy"] == r["policy"]
            && x["accept"] == r["accept"]
            && x["measure"] == r["measure"]
    })
}

/// The suite's comparisons: each dsan row against each TCP row.
fn suite(src: &Sources) -> Result<String> {
    let rows = suite_rows(src)?;
    let runs = src.read("suite/summary.json")?["config"]["runs"].clone();
    let mut s = format!(
        "{} runs (paths rotated per run); latencies in us; ratios dsan/TCP, median of the runs (min-max). For latencies lower is better for dsan below 1.00x; for rates higher is better.\n\n",
        runs.as_u64().unwrap_or(1)
    );
    s.push_str("| scenario | accept | measure | vs | dsan p50 | TCP p50 | p50 ratio | dsan p99 | TCP p99 | dsan rate/s | TCP rate/s | rate ratio | dsan CPU us/op | TCP CPU us/op | connects over 1 ms dsan / TCP |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for d in rows.iter().filter(|r| r["transport"] == "dsan") {
        for t in ["tcp", "tcp-tuned"] {
            let Some(k) = find(&rows, d, t) else { continue };
            let vs = &d["vs"][t];
            let over = |r: &Value| {
                if r["scenario"]
                    .as_str()
                    .is_some_and(|x| x.starts_with("rate"))
                {
                    r["over_1ms"].to_string()
                } else {
                    "-".into()
                }
            };
            let wall = if k["wall_after"].is_u64() {
                format!(" (wall after {})", k["wall_after"])
            } else {
                String::new()
            };
            writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {}{} |",
                d["scenario"].as_str().unwrap_or("?"),
                d["accept"].as_str().unwrap_or("?"),
                d["measure"].as_str().unwrap_or("?"),
                t,
                us_of_ns(&d["p50_ns"]),
                us_of_ns(&k["p50_ns"]),
                ratio(&vs["p50"]),
                us_of_ns(&d["p99_ns"]),
                us_of_ns(&k["p99_ns"]),
                thousands(&d["rate_per_s"]),
                thousands(&k["rate_per_s"]),
                ratio(&vs["rate"]),
                num(&d["cpu_us_per_setup"], 1),
                num(&k["cpu_us_per_setup"], 1),
                over(d),
                over(k),
                wall
            )?;
        }
    }
    s.push_str("\n(The stream's rate is in Mbit/s and its CPU per MiB; `reject` and `no-listener` rows count refusals: kernel TCP does not refuse a full backlog at all.)\n");
    Ok(s)
}

/// CPU per operation by class, for the rows that measure it.
fn cpu(src: &Sources) -> Result<String> {
    let rows = suite_rows(src)?;
    let mut s = String::from("CPU microseconds per operation (per MiB for the stream), median of the runs, by class: both daemons; the benchmark's server threads; its client side (connecting threads, provider and switch threads); and, machine-wide, kernel system time (which includes the system part of the classes before it), softirq, idle and steal.\n\n");
    s.push_str("| scenario | path | daemons | server | client | processes | system | softirq | idle | steal |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    for r in rows.iter().filter(|r| r["cpu_per_op"].is_object()) {
        let c = &r["cpu_per_op"];
        writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r["scenario"].as_str().unwrap_or("?"),
            r["transport"].as_str().unwrap_or("?"),
            num(&c["daemons_us"], 1),
            num(&c["server_us"], 1),
            num(&c["client_us"], 1),
            num(&c["processes_us"], 1),
            num(&c["system_us"], 1),
            num(&c["softirq_us"], 1),
            num(&c["idle_us"], 1),
            num(&c["steal_us"], 1),
        )?;
    }
    Ok(s)
}

fn data(src: &Sources) -> Result<String> {
    let d = src.read("data/data.json")?;
    let rows = d["results"].as_array().cloned().unwrap_or_default();
    let mut s = format!(
        "{} runs per row (who goes first alternating); latencies in us, rates per second (the stream in Gbit/s), CPU us per exchange (per MiB for the stream); ratios dsan/TCP, median of the runs (min-max). memif rows put the SAN on shared memory and TCP on the veth: not the same path, so no ratio.\n\n",
        d["runs"].as_u64().unwrap_or(1)
    );
    s.push_str("| idle | port | MTU | test | dsan p50 | TCP p50 | dsan p99 | TCP p99 | dsan rate | TCP rate | rate ratio | dsan CPU | TCP CPU |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in rows.iter().filter(|r| r["path"] == "dsan") {
        let Some(t) = rows.iter().find(|x| {
            x["path"] == "tcp"
                && x["idle"] == r["idle"]
                && x["port"] == r["port"]
                && x["mtu"] == r["mtu"]
                && x["test"] == r["test"]
        }) else {
            continue;
        };
        let stream = r["test"] == "stream";
        let rate = |x: &Value| {
            if stream {
                num(&x["rate"], 2)
            } else {
                thousands(&x["rate"])
            }
        };
        let p = |x: &Value, q: &str| {
            if stream {
                "-".into()
            } else {
                us_of_ns(&x["latency"][q])
            }
        };
        let rr = if r["ratio_to_tcp"].is_object() {
            ratio(&r["ratio_to_tcp"])
        } else if r["port"] == "memif" {
            "other path".into()
        } else {
            ratio(&r["ratio_to_tcp_runs"])
        };
        writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r["idle"].as_str().unwrap_or("?"),
            r["port"].as_str().unwrap_or("?"),
            r["mtu"],
            r["test"].as_str().unwrap_or("?"),
            p(r, "p50_ns"),
            p(t, "p50_ns"),
            p(r, "p99_ns"),
            p(t, "p99_ns"),
            rate(r),
            rate(t),
            rr,
            num(&r["cpu_us"], 1),
            num(&t["cpu_us"], 1),
        )?;
    }
    Ok(s)
}

/// One application's row: the runs' median requests/s and latencies (SAN,
/// TCP) and the medians of the per-run ratios, formatted as the table
/// shows them.
struct AppRow {
    name: String,
    rps: [String; 2],
    rps_ratio: String,
    p50: [String; 2],
    p99: [String; 2],
    p99_ratio: String,
}

fn app_rows(d: &Value) -> Vec<AppRow> {
    let rows = d["results"].as_array().cloned().unwrap_or_default();
    let mut names: Vec<String> = Vec::new();
    for r in &rows {
        let a = r["app"].as_str().unwrap_or("?").to_string();
        if !names.contains(&a) {
            names.push(a);
        }
    }
    let mut out = Vec::new();
    for a in names {
        let of = |t: &str| -> Vec<&Value> {
            rows.iter()
                .filter(|r| r["app"] == a.as_str() && r["transport"] == t)
                .collect()
        };
        let (san, tcp) = (of("san"), of("tcp"));
        if san.is_empty() || tcp.is_empty() {
            continue;
        }
        let med = |v: &[&Value], k: &str| {
            let xs: Vec<f64> = v.iter().filter_map(|r| r[k].as_f64()).collect();
            serde_json::json!(crate::median(&xs))
        };
        // Runs paired by their number (the first run's SAN with its TCP).
        let per_run = |k: &str| -> String {
            let v: Vec<f64> = san
                .iter()
                .filter_map(|s| {
                    let t = tcp.iter().find(|t| t["run"] == s["run"])?;
                    Some(s[k].as_f64()? / t[k].as_f64()?)
                })
                .collect();
            ratio(&serde_json::json!(v))
        };
        let both = |k: &str, f: &dyn Fn(&Value) -> String| [f(&med(&san, k)), f(&med(&tcp, k))];
        out.push(AppRow {
            rps: both("rps", &thousands),
            rps_ratio: per_run("rps"),
            p50: both("p50_ms", &|v| num(v, 3)),
            p99: both("p99_ms", &|v| num(v, 3)),
            p99_ratio: per_run("p99_ms"),
            name: a,
        });
    }
    out
}

/// Per application: the runs' median requests/s and latencies, and the
/// median of the per-run ratios.
fn apps(src: &Sources) -> Result<String> {
    let d = src.read("apps/apps.json")?;
    let mut s = format!(
        "{} runs (SAN first in odd runs, kernel TCP first in even ones); medians of the runs; ratios SAN/TCP per run, median (min-max). For p99 a ratio above 1.00x means the SAN is slower.\n\n",
        d["runs"].as_u64().unwrap_or(1)
    );
    s.push_str("| workload | SAN req/s | TCP req/s | ratio | SAN p50 ms | TCP p50 ms | SAN p99 ms | TCP p99 ms | p99 ratio |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|\n");
    for r in app_rows(&d) {
        writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.name,
            r.rps[0],
            r.rps[1],
            r.rps_ratio,
            r.p50[0],
            r.p50[1],
            r.p99[0],
            r.p99[1],
            r.p99_ratio,
        )?;
    }
    Ok(s)
}

fn hosts(src: &Sources) -> Result<String> {
    let d = src.read("hosts/hosts.json")?;
    let mut s = String::from("| hosts | idle CPU per daemon (mean / max, % of a core) | all daemons | ping h0-h1 p50 / p99 us | ping h0-last p50 / p99 us |\n|---|---|---|---|---|\n");
    for r in d["results"].as_array().cloned().unwrap_or_default() {
        writeln!(
            s,
            "| {} | {} / {} | {} | {} / {} | {} / {} |",
            r["hosts"],
            num(&r["idle_cpu_pct_per_daemon"]["mean"], 3),
            num(&r["idle_cpu_pct_per_daemon"]["max"], 3),
            num(&r["idle_cpu_pct_all_daemons"], 2),
            num(&r["ping_h1"]["p50_us"], 1),
            num(&r["ping_h1"]["p99_us"], 1),
            num(&r["ping_last"]["p50_us"], 1),
            num(&r["ping_last"]["p99_us"], 1),
        )?;
    }
    Ok(s)
}

/// The few sentences the README and the doc quote, every number from the
/// data files.
fn headline(src: &Sources) -> Result<String> {
    let rows = suite_rows(src)?;
    let get = |scenario: &str, accept: &str| {
        rows.iter().find(|r| {
            r["transport"] == "dsan" && r["scenario"] == scenario && r["accept"] == accept
        })
    };
    let mut s = String::new();
    if let Some(r) = get("rate-closed", "waiting") {
        writeln!(
            s,
            "* Closed-loop connection set-up rate, dsan over kernel TCP: {} against TCP with its defaults, {} against tuned TCP.",
            ratio(&r["vs"]["tcp"]["rate"]),
            ratio(&r["vs"]["tcp-tuned"]["rate"])
        )?;
    }
    if let Some(r) = get("connect", "waiting") {
        writeln!(
            s,
            "* Connect latency (the accepting thread waiting), p50: dsan {} us, kernel TCP {} us (dsan over TCP: {}).",
            us_of_ns(&r["p50_ns"]),
            find(&rows, r, "tcp").map_or("-".into(), |t| us_of_ns(&t["p50_ns"])),
            ratio(&r["vs"]["tcp"]["p50"])
        )?;
    }
    if let Some(r) = get("reject", "-").or_else(|| {
        rows.iter()
            .find(|r| r["transport"] == "dsan" && r["scenario"] == "reject")
    }) {
        writeln!(
            s,
            "* A connect into a full backlog is refused in {} us (p50); kernel TCP does not refuse it.",
            us_of_ns(&r["p50_ns"])
        )?;
    }
    let c = src.read("connect.json")?;
    if let Some(r) = c["results"]
        .as_array()
        .and_then(|v| v.iter().find(|r| r["what"] == "command_rtt"))
    {
        writeln!(
            s,
            "* The provider's command round trip (process to the daemon's lcore and back through the shared region): {} us at p50, {} us at p99.",
            us_of_ns(&r["latency"]["p50_ns"]),
            us_of_ns(&r["latency"]["p99_ns"])
        )?;
    }
    let d = src.read("data/data.json")?;
    // (1500: the classic frame; 61346: the lab's default, for bulk bytes.)
    for (test, mtu) in [
        ("pingpong-64", 1500),
        ("stream", 1500),
        ("stream", 61346),
        ("crr", 1500),
    ] {
        if let Some(r) = d["results"].as_array().and_then(|v| {
            v.iter().find(|r| {
                r["path"] == "dsan"
                    && r["test"] == test
                    && r["port"] == "af_packet"
                    && r["mtu"] == mtu
            })
        }) {
            writeln!(
                s,
                "* Byte streams, {test} (af_packet, MTU {mtu}), dsan's rate over kernel TCP's: {}.",
                ratio(&r["ratio_to_tcp"])
            )?;
        }
    }
    for r in app_rows(&src.read("apps/apps.json")?) {
        writeln!(
            s,
            "* {} (preloaded, unmodified), requests/s over kernel TCP's: {}; p99 latency over TCP's: {}.",
            r.name, r.rps_ratio, r.p99_ratio
        )?;
    }
    Ok(s)
}

/// `doc` with every generated block replaced by what the data gives.
pub(crate) fn rewrite(doc: &str, src: &Sources) -> Result<String> {
    let mut out = doc.to_string();
    for name in BLOCKS {
        let (b, e) = (
            format!("<!-- generated:{name} -->\n"),
            format!("<!-- end:{name} -->"),
        );
        let Some(i) = out.find(&b) else { continue };
        let j = out[i..]
            .find(&e)
            .map(|j| i + j)
            .ok_or_else(|| anyhow!("<!-- generated:{name} --> has no <!-- end:{name} -->"))?;
        let body = block(name, src)?;
        out.replace_range(i + b.len()..j, &body);
    }
    Ok(out)
}

/// Checks `doc`'s generated blocks against the data; the differing blocks'
/// names in the error.
pub(crate) fn check(doc: &Path, src: &Sources) -> Result<()> {
    let text =
        std::fs::read_to_string(doc).with_context(|| format!("reading {}", doc.display()))?;
    let want = rewrite(&text, src)?;
    if want == text {
        return Ok(());
    }
    let differ: Vec<&str> = BLOCKS
        .iter()
        .copied()
        .filter(|n| {
            let part = |t: &str| {
                let b = format!("<!-- generated:{n} -->");
                let e = format!("<!-- end:{n} -->");
                t.find(&b)
                    .and_then(|i| t[i..].find(&e).map(|j| t[i..i + j].to_string()))
            };
            part(&text) != part(&want)
        })
        .collect();
    bail!(
        "{}: the generated blocks {differ:?} do not match the data under {} (run `dsan-bench tables --write`)",
        doc.display(),
        src.dir.display()
    )
}
