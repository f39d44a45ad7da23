//! `anomos-tracker`: parse the arguments, set up logging, run the tracker.

use std::path::PathBuf;

use anomos_tracker::config_file;
use tracing_subscriber::EnvFilter;

/// The anomos tracker: peer registry, neighbor graph and tracking-code issuer.
#[derive(clap::Parser, Debug)]
#[command(name = "anomos-tracker", version, about)]
struct Cli {
    /// TOML config file (its `[anomos-tracker]` section and top-level keys). Environment variables
    /// (`ANOMOS_TRACKER_<FLAG>`) override it, flags override both.
    #[arg(long, value_name = "FILE", env = "ANOMOS_TRACKER_CONFIG")]
    config: Option<PathBuf>,

    #[command(flatten)]
    args: anomos_tracker::TrackerArgs,

    /// Log filter (tracing `EnvFilter` syntax, e.g. `info` or `anomos_tracker=debug`); `RUST_LOG` overrides it.
    #[arg(long, value_name = "FILTER", default_value = "info")]
    log_level: String,

    /// Log line format.
    #[arg(long, value_name = "FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn main() -> std::process::ExitCode {
    let cli: Cli = config_file::parse(&config_file::TRACKER);
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cli.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Logs go to stderr: stdout carries only the ready line. Colours only on a terminal (log files stay plain).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if cli.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("anomos-tracker: starting the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(anomos_tracker::run(cli.args, None)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "tracker stopped");
            eprintln!("anomos-tracker: {e}");
            std::process::ExitCode::FAILURE
        }
    };
    // The state is written and its database closed: sessions still open and the memory they hold are left to
    // the exit, not closed and freed one by one first (most of a second at 100,000 peers).
    runtime.shutdown_background();
    code
}
