//! Build script for `dpdk-sys`, in three steps:
//! 1. find DPDK 22.11 with pkg-config (or fail with a message that says what to install);
//! 2. run bindgen over `wrapper.h` with an allowlist of exactly what the dataplane calls;
//! 3. compile `src/shim.c`, the wrappers around DPDK's static inline functions.

use std::env;
use std::path::PathBuf;

/// Functions the dataplane calls (bound by bindgen).
const FUNCTIONS: &[&str] = &[
    "rte_eal_init",
    "rte_eal_cleanup",
    "rte_strerror",
    "rte_log_set_global_level",
    "rte_socket_id",
    "rte_pktmbuf_pool_create",
    "rte_mempool_free",
    "rte_eth_dev_count_avail",
    "rte_eth_dev_is_valid_port",
    "rte_eth_dev_get_name_by_port",
    "rte_eth_dev_info_get",
    "rte_eth_dev_configure",
    "rte_eth_rx_queue_setup",
    "rte_eth_tx_queue_setup",
    "rte_eth_dev_start",
    "rte_eth_dev_stop",
    "rte_eth_dev_close",
    "rte_eth_dev_socket_id",
    "rte_eth_macaddr_get",
    "rte_eth_promiscuous_enable",
    "rte_eth_stats_get",
    "rte_eth_dev_rx_intr_enable",
    "rte_eth_dev_rx_intr_disable",
    "rte_eth_dev_rx_intr_ctl_q_get_fd",
    "rte_telemetry_register_cmd",
    "rte_tel_data_start_dict",
    "rte_tel_data_add_dict_u64",
    "rte_tel_data_add_dict_string",
    "rte_tel_data_start_array",
    "rte_tel_data_add_array_string",
    "rte_tel_data_add_dict_container",
    "rte_tel_data_alloc",
    "rte_tel_data_free",
    // shim.c
    "rte_errno_",
    "rte_eth_rx_burst_",
    "rte_eth_tx_burst_",
    "rte_pktmbuf_alloc_",
    "rte_pktmbuf_free_",
    "rte_pktmbuf_append_",
    "rte_pktmbuf_mtod_",
    "rte_pktmbuf_data_len_",
];

/// Types and constants the dataplane uses directly.
const TYPES: &[&str] = &[
    "rte_mbuf",
    "rte_mempool",
    "rte_eth_conf",
    "rte_eth_dev_info",
    "rte_eth_stats",
    "rte_ether_addr",
    "rte_eth_rxconf",
    "rte_eth_txconf",
    "rte_tel_data",
];
const VARS: &[&str] = &[
    "RTE_MAX_ETHPORTS",
    "RTE_MBUF_DEFAULT_BUF_SIZE",
    "RTE_ETH_NAME_MAX_LEN",
    "RTE_ETH_XSTATS_NAME_SIZE",
    "RTE_LOG_.*",
    "RTE_TEL_MAX_STRING_LEN",
    "SOCKET_ID_ANY",
];

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rerun-if-changed=src/shim.c");
    println!("cargo:rerun-if-changed=src/shim.h");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");

    // 1. pkg-config.
    let lib = match pkg_config::Config::new()
        .range_version("22.11".."22.12")
        .cargo_metadata(true)
        .probe("libdpdk")
    {
        Ok(lib) => lib,
        Err(e) => {
            eprintln!(
                "\nerror: DPDK 22.11 LTS was not found with pkg-config ({e}).\n\
                 dsan needs Debian's DPDK 22.11 development files. Install them with:\n    \
                 apt-get install -y dpdk dpdk-dev libdpdk-dev pkg-config clang libclang-dev\n\
                 or run scripts/setup.sh from the repository root.\n"
            );
            std::process::exit(1);
        }
    };
    // DPDK's PMDs are plugins loaded by EAL at run time; EAL itself must be linked
    // even though `--as-needed` would otherwise drop the net libraries we reference.
    let clang_args: Vec<String> = lib
        .include_paths
        .iter()
        .map(|p| format!("-I{}", p.display()))
        .chain(["-include".to_string(), "rte_config.h".to_string()])
        .collect();

    // 2. bindgen.
    let mut b = bindgen::Builder::default()
        .header("wrapper.h")
        .clang_args(&clang_args)
        .derive_default(true)
        .layout_tests(false)
        .generate_comments(false)
        .prepend_enum_name(false)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
    for f in FUNCTIONS {
        b = b.allowlist_function(f);
    }
    for t in TYPES {
        b = b.allowlist_type(t);
    }
    for v in VARS {
        b = b.allowlist_var(v);
    }
    let bindings = b.generate().unwrap_or_else(|e| {
        eprintln!("error: bindgen failed on DPDK headers: {e} (is libclang-dev installed?)");
        std::process::exit(1);
    });
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("writing bindings.rs");

    // 3. the shim, compiled with DPDK's own include paths, no -march=native.
    // DPDK's own compile flags (its baseline ISA, e.g. -march=corei7 on Debian,
    // which its headers' intrinsics need), never -march=native.
    let mut cc = cc::Build::new();
    cc.file("src/shim.c");
    for flag in other_cflags() {
        cc.flag(&flag);
    }
    for p in &lib.include_paths {
        cc.include(p);
    }
    cc.warnings(false).compile("dsan_dpdk_shim");
}

/// `pkg-config --cflags-only-other libdpdk`, split on whitespace.
fn other_cflags() -> Vec<String> {
    let out = std::process::Command::new(env::var("PKG_CONFIG").unwrap_or("pkg-config".into()))
        .args(["--cflags-only-other", "libdpdk"])
        .output()
        .expect("running pkg-config");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}
