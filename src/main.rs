//! The `roundabout` binary: parses the command line, loads the configuration, sets up
//! logging, and hands over to [`roundabout::run`].

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use roundabout::config::Config;

#[cfg(feature = "dhat-heap")]
mod dhat_heap;

/// A small HTTP load balancer: round robin and friends, health checks, per-IP rate limits
/// in Redis, and an admin API.
#[derive(Debug, Parser)]
#[command(name = "roundabout", version, about)]
struct Cli {
    /// The configuration file (TOML); `ROUNDABOUT__SECTION__KEY` variables override it.
    #[arg(
        long,
        short,
        value_name = "FILE",
        default_value = "config/default.toml"
    )]
    config: PathBuf,

    /// Validate the configuration, print it as resolved, and exit (0 valid, 1 not).
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    // Held to the end of `main`: the profile is written then, if not before.
    #[cfg(feature = "dhat-heap")]
    let _profiling = dhat_heap::start();
    #[cfg(not(feature = "dhat-heap"))]
    roundabout::allocator::configure();
    let cli = Cli::parse();
    // While the process has one thread (the environment is not safe to change with more):
    // the sockets systemd or an upgrading roundabout hands over, and where to say it serves.
    let mut inherited = roundabout::Inherited::from_env();
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("roundabout: invalid configuration: {e}");
            inherited.fail(&format!("invalid configuration: {e}"));
            return ExitCode::FAILURE;
        }
    };
    if cli.check {
        print!("{}", config.to_toml());
        eprintln!(
            "roundabout: {}: configuration is valid",
            cli.config.display()
        );
        return ExitCode::SUCCESS;
    }

    let mut logger = env_logger::Builder::new();
    logger.filter_level(config.log_level());
    // The limiter logs a Redis outage once; the Redis client's own lines would repeat it at
    // every reconnect attempt (RUST_LOG=redis=debug shows them).
    logger.filter_module("redis", log::LevelFilter::Off);
    match std::env::var_os("RUST_LOG") {
        Some(_) => {
            logger.parse_env("RUST_LOG");
        }
        // actix-server's start lines ("starting 1 workers", "Actix runtime found", ...),
        // once per listener, say nothing our own start line does not.
        None => {
            logger.filter_module(
                "actix_server",
                config.log_level().min(log::LevelFilter::Warn),
            );
        }
    }
    logger.format_timestamp_millis().init();

    let system = actix_rt::System::new();
    match system.block_on(roundabout::run(config, inherited)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("roundabout: {e}");
            ExitCode::FAILURE
        }
    }
}
