//! The tables of docs/benchmarks.md and the README's benchmark paragraph
//! are generated from the data files under docs/bench: every number in
//! them must be what the JSON gives (`dsan-bench tables --check`), and the
//! check must catch a number changed by hand.

use std::path::PathBuf;
use std::process::Command;

const BENCH: &str = env!("CARGO_BIN_EXE_dsan-bench");

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn check(doc: &std::path::Path) -> std::process::Output {
    Command::new(BENCH)
        .args(["tables", "--check", "--data"])
        .arg(root().join("docs/bench"))
        .arg("--doc")
        .arg(doc)
        .output()
        .unwrap()
}

#[test]
fn the_published_tables_match_their_data_files() {
    for doc in ["docs/benchmarks.md", "README.md"] {
        let o = check(&root().join(doc));
        assert!(
            o.status.success(),
            "{doc}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    // Every block is there, and none is empty.
    let text = std::fs::read_to_string(root().join("docs/benchmarks.md")).unwrap();
    for name in [
        "provenance",
        "headline",
        "suite",
        "cpu",
        "data",
        "apps",
        "hosts",
    ] {
        let b = format!("<!-- generated:{name} -->\n");
        let i = text.find(&b).unwrap_or_else(|| panic!("no {name} block")) + b.len();
        let j = i + text[i..].find(&format!("<!-- end:{name} -->")).unwrap();
        assert!(text[i..j].trim().len() > 20, "{name} block is empty");
    }
}

#[test]
fn a_number_changed_by_hand_is_caught() {
    let text = std::fs::read_to_string(root().join("docs/benchmarks.md")).unwrap();
    let i = text.find("<!-- generated:suite -->").unwrap();
    let j = i + text[i..].find("<!-- end:suite -->").unwrap();
    // The first digit of the closed-loop rate row's figures, changed.
    let row = i + text[i..j]
        .find("| rate-closed |")
        .expect("a rate-closed row");
    let k = row + text[row..j].find(|c: char| c.is_ascii_digit()).unwrap();
    let mut bytes = text.into_bytes();
    bytes[k] = if bytes[k] == b'9' { b'8' } else { bytes[k] + 1 };
    let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("benchmarks-{}.md", std::process::id()));
    std::fs::write(&tmp, bytes).unwrap();
    let o = check(&tmp);
    let _ = std::fs::remove_file(&tmp);
    assert!(!o.status.success(), "a changed figure passed the check");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("\"suite\""),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
