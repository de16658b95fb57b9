//! The committed C header matches the code: cbindgen regenerates it and the
//! test fails on any difference (`DSAN_BLESS=1` rewrites it instead).

#[test]
fn committed_header_is_current() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let cfg = cbindgen::Config::from_file(format!("{dir}/cbindgen.toml")).expect("cbindgen.toml");
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(cfg)
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut out);
    let path = format!("{dir}/../include/dsan_switch.h");
    if std::env::var_os("DSAN_BLESS").is_some() {
        std::fs::write(&path, &out).unwrap();
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == out,
        "../include/dsan_switch.h is out of date: run `DSAN_BLESS=1 cargo test -p dsan-switch --test header` and commit it\n--- generated ---\n{}",
        String::from_utf8_lossy(&out)
    );
}
