//! dsan's control plane.
//!
//! * [`config`]: dsand's TOML configuration and its checks;
//! * [`ctl`]: the control-socket protocol (JSON lines) spoken by dsand and dsanctl;
//! * [`metrics`]: the Prometheus endpoint;
//! * [`lab`]: the NIC-less lab (network namespaces, veths, one dsand per host);
//! * [`lcore`]: asking the dataplane lcore, and rendering its counters;
//! * [`os`]: namespaces, interface addresses, privileges.
//!
//! The binaries are `dsand` (the appliance daemon) and `dsanctl`.
#![deny(unsafe_code)]

pub mod addrwatch;
pub mod config;
pub mod ctl;
pub mod lab;
pub mod lcore;
pub mod metrics;
pub mod os;

/// Parses the command line of one of the daemon's programs; on bad arguments
/// prints one line (`prog: error: ... (see prog --help)`) and exits with 2;
/// `--help` and `--version` print and exit 0.
pub fn parse_args<A: clap::Parser>(prog: &str) -> A {
    use clap::error::ErrorKind;
    match A::try_parse() {
        Ok(a) => a,
        Err(e) => match e.kind() {
            ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
            _ => {
                let text = e.render().to_string();
                let first = text
                    .lines()
                    .next()
                    .unwrap_or("bad arguments")
                    .trim_start_matches("error: ");
                eprintln!("{prog}: error: {first} (see {prog} --help)");
                std::process::exit(2);
            }
        },
    }
}
