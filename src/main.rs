//! The `tokend` command line: parse, set up logging, load the configuration, dispatch. Exit codes:
//! 0 success, 1 runtime failure, 64 (EX_USAGE) configuration error — always before any port is bound.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing_subscriber::EnvFilter;

use tokend::commands::{self, Prepared};
use tokend::config::{Config, ConfigError};

const EX_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(name = "tokend", version, about = "A local token broker that serves managed-identity tokens on loopback")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum AliasAction {
    Setup,
    Teardown,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker.
    Serve {
        /// Configuration file.
        #[arg(long, env = "TOKEND_CONFIG", default_value = "/etc/tokend/tokend.toml")]
        config: PathBuf,
    },
    /// Print `export` lines that point Azure SDKs at the broker (for `eval`).
    Env {
        /// Configuration file.
        #[arg(long, env = "TOKEND_CONFIG", default_value = "/etc/tokend/tokend.toml")]
        config: PathBuf,
    },
    /// Ask the running broker for a token and print only the token.
    Token {
        /// Configuration file (to find the broker's address).
        #[arg(long, env = "TOKEND_CONFIG", default_value = "/etc/tokend/tokend.toml")]
        config: PathBuf,
        /// The resource, e.g. https://storage.azure.com/
        #[arg(long)]
        resource: String,
        /// Select an identity by client id.
        #[arg(long)]
        client_id: Option<String>,
    },
    /// Validate the configuration and fetch one token per identity straight from the IdP.
    Check {
        /// Configuration file.
        #[arg(long, env = "TOKEND_CONFIG", default_value = "/etc/tokend/tokend.toml")]
        config: PathBuf,
        /// Resource to ask for (default: each identity's first resource, else https://management.azure.com/).
        #[arg(long)]
        resource: Option<String>,
    },
    /// Transparent IMDS: alias 169.254.169.254 on `lo` (refusing if a real IMDS answers there), or remove it.
    /// Run as root, e.g. from systemd `ExecStartPre=+` / `ExecStopPost=+`.
    TransparentImds {
        /// `setup` or `teardown`.
        #[arg(value_enum)]
        action: AliasAction,
    },
    /// Development only: run a built-in local issuer and a broker against it. No config, no credentials.
    Dev {
        /// Broker listen address.
        #[arg(long, default_value = tokend::config::DEFAULT_LISTEN)]
        listen: SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tokend: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tokend: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = match std::env::var("TOKEND_LOG") {
        Err(_) => EnvFilter::new("info"),
        Ok(spec) => EnvFilter::try_new(&spec).unwrap_or_else(|e| {
            eprintln!("tokend: TOKEND_LOG={spec:?} is not a valid filter ({e}); logging at info");
            EnvFilter::new("info")
        }),
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn config_error(e: &ConfigError) -> ExitCode {
    eprintln!("tokend: configuration error: {e}");
    ExitCode::from(EX_USAGE)
}

fn load(path: &std::path::Path) -> Result<Prepared, ExitCode> {
    let config = Config::load(path).map_err(|e| config_error(&e))?;
    commands::prepare(config).map_err(|e| config_error(&e))
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve { config } => {
            let prepared = match load(&config) {
                Ok(p) => p,
                Err(code) => return Ok(code),
            };
            // Transparent IMDS: never shadow a metadata service that already answers there.
            for addr in prepared.config.server.listen.iter().filter(|a| tokend::transparent::is_imds_ip(a.ip())) {
                if let Err(e) = tokend::transparent::probe(*addr).await {
                    eprintln!("tokend: {e}");
                    return Ok(ExitCode::from(EX_USAGE));
                }
            }
            let (tracker, cancel) = (TaskTracker::new(), CancellationToken::new());
            commands::run(prepared, Some(config), tracker, cancel, |_| {}, tokend::signal::shutdown()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::TransparentImds { action: AliasAction::Setup } => match tokend::transparent::setup().await {
            Ok(()) => Ok(ExitCode::SUCCESS),
            Err(e) if e.is::<tokend::transparent::ImdsPresent>() => {
                eprintln!("tokend: {e}");
                Ok(ExitCode::from(EX_USAGE))
            }
            Err(e) => Err(e),
        },
        Command::TransparentImds { action: AliasAction::Teardown } => {
            tokend::transparent::teardown()?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Env { config } => {
            let server = match Config::load_server(&config) {
                Ok(s) => s,
                Err(e) => return Ok(config_error(&e)),
            };
            print!("{}", commands::env(&server)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Token { config, resource, client_id } => {
            let server = match Config::load_server(&config) {
                Ok(s) => s,
                Err(e) => return Ok(config_error(&e)),
            };
            println!("{}", commands::token(&server, &resource, client_id.as_deref()).await?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { config, resource } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => return Ok(config_error(&e)),
            };
            for w in &config.warnings {
                println!("warn  {w}");
            }
            let lines = commands::check(&config, resource.as_deref()).await?;
            for l in &lines {
                println!("{}", l.text);
            }
            Ok(if lines.iter().all(|l| l.ok) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Dev { listen } => dev(listen).await,
    }
}

async fn dev(listen: SocketAddr) -> anyhow::Result<ExitCode> {
    if !listen.ip().is_loopback() {
        eprintln!("tokend: --listen {listen} is not a loopback address; tokend dev only listens on loopback");
        return Ok(ExitCode::from(EX_USAGE));
    }
    let (tracker, cancel) = (TaskTracker::new(), CancellationToken::new());
    let issuer = tokend::dev::start_issuer(&tracker, &cancel).await?;
    let config = tokend::dev::dev_config(&issuer, listen)?;
    let prepared = commands::prepare(config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let header = prepared.identity_header.clone();
    let banner = "\
################################################################################
#  tokend dev: DEVELOPMENT ONLY. Tokens come from a built-in fake issuer with  #
#  a throw-away key; no real service accepts them. Never use this in production.#
################################################################################";
    eprintln!("{banner}");
    let on_listening = move |bound: &[SocketAddr]| {
        let addr = bound.first().copied().unwrap_or(listen);
        println!("# Point Azure SDKs at this broker:");
        print!("{}", commands::export_lines(addr, &header));
        println!("# Then, for example:");
        println!(
            "# curl -s -H Metadata:true 'http://{addr}/metadata/identity/oauth2/token?api-version=2018-02-01&resource={}'",
            tokend::dev::DEV_RESOURCE
        );
    };
    commands::run(prepared, None, tracker, cancel, on_listening, tokend::signal::shutdown()).await?;
    Ok(ExitCode::SUCCESS)
}
