//! `dsan-bench compare` on the committed data file: a file compared with
//! itself shows no change on any row, and a file that is not a data file
//! is refused with a reason.

use std::path::PathBuf;
use std::process::Command;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dsan-bench"))
}

#[test]
fn a_file_compared_with_itself_shows_no_change() {
    let f = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/bench/data/data.json");
    let o = bench().arg("compare").arg(&f).arg(&f).output().unwrap();
    assert!(o.status.success(), "{o:?}");
    let out = String::from_utf8_lossy(&o.stdout);
    let rows: Vec<&str> = out.lines().skip(1).collect();
    assert!(rows.len() >= 4, "{out}");
    for l in rows {
        assert!(l.contains(" 1.000x "), "{l}");
        assert!(l.ends_with("no change shown"), "{l}");
    }
}

#[test]
fn a_file_that_is_not_a_data_file_is_refused() {
    let dir = std::env::temp_dir().join(format!("dsan-compare-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("x.json");
    std::fs::write(&f, "{\"benchmark\": \"something else\"}").unwrap();
    let o = bench().arg("compare").arg(&f).arg(&f).output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no \"results\" list"));
    let _ = std::fs::remove_dir_all(&dir);
}
