//! The `tokend` command line: parse, set up logging, start the runtime, dispatch to
//! [`tokend::commands`]. Exit codes come from [`tokend::Error::exit_code`]: 0 success, 1 runtime
//! failure (or a failed `check`), 64 (EX_USAGE) configuration error — always before any port is bound.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokend::commands;
use tracing_subscriber::EnvFilter;

/// `tokend --version`: the crate version and the commit it was built from.
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("TOKEND_COMMIT"), ")");

#[derive(Debug, Parser)]
#[command(name = "tokend", version = VERSION, about = "A local token broker that serves managed-identity tokens on loopback")]
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
    /// Print `unset` and `export` lines that point Azure SDKs at the broker (for `eval`).
    Env {
        /// Configuration file.
        #[arg(long, env = "TOKEND_CONFIG", default_value = "/etc/tokend/tokend.toml")]
        config: PathBuf,
        /// Which clients: app-service (IDENTITY_ENDPOINT + IDENTITY_HEADER: every current SDK), azureml
        /// (MSI_ENDPOINT + MSI_SECRET, as on Azure ML compute), imds (AZURE_POD_IDENTITY_AUTHORITY_HOST),
        /// cloud-shell (MSI_ENDPOINT only). The other dialects' variables are unset.
        #[arg(long, default_value = commands::ENV_DIALECTS[0], value_parser = clap::builder::PossibleValuesParser::new(commands::ENV_DIALECTS))]
        dialect: String,
    },
    /// Reload the running broker and wait for the verdict (systemd's ExecReload=): exit 0 when the new
    /// configuration was applied, 1 when it was rejected (the previous one keeps serving).
    Reload {
        /// The broker's pid.
        #[arg(long, env = "MAINPID")]
        pid: Option<u32>,
        /// Where the broker reports reloads (systemd's RuntimeDirectory=).
        #[arg(long)]
        state_dir: Option<PathBuf>,
    },
    /// Ask the running broker whether it is ready (every configured token cached): one line, exit 0 or 1.
    Health {
        /// Configuration file (to find the broker's address).
        #[arg(long, env = "TOKEND_CONFIG", default_value = "/etc/tokend/tokend.toml")]
        config: PathBuf,
        /// Only whether it is alive (/healthz), not whether its tokens are cached: a liveness probe.
        #[arg(long)]
        live: bool,
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
        /// Broker listen address, IP:PORT.
        #[arg(long, default_value = tokend::DEFAULT_LISTEN, value_parser = listen_addr)]
        listen: SocketAddr,
        /// A resource the built-in issuer accepts besides the well-known Azure ones (repeatable); any
        /// other gets Entra's "resource principal not found" (400 invalid_resource), so typos show up.
        #[arg(long = "resource")]
        resources: Vec<String>,
    },
}

/// `--listen`: an IP:PORT address; a host name gets a hint (they are not resolved).
fn listen_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| {
        let hint = if text.starts_with("localhost") { "127.0.0.1" } else { "an IP address" };
        format!("{text:?} is not IP:PORT; host names are not resolved, use {hint}, e.g. 127.0.0.1:50343")
    })
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
    let json_logs = matches!(cli.log_format, LogFormat::Json);
    match runtime.block_on(dispatch(cli.command, json_logs)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("tokend: {e}");
            ExitCode::from(e.exit_code())
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
        LogFormat::Json => builder.event_format(JsonLines).init(),
    }
}

/// JSON log lines shaped like tracing-subscriber's (`timestamp`, `level`, `fields`, `target`), except
/// that a field logged as a list or a map (`?vec`) is a JSON array or object, not a string of Debug text.
struct JsonLines;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for JsonLines
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut fields = serde_json::Map::new();
        event.record(&mut JsonFields(&mut fields));
        let meta = event.metadata();
        let line = serde_json::json!({
            "timestamp": humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            "level": meta.level().as_str(),
            "fields": fields,
            "target": meta.target(),
        });
        writeln!(writer, "{line}")
    }
}

struct JsonFields<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for JsonFields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        // Debug of a list of strings or numbers is JSON already; anything else stays a string.
        let value = (field.name() != "message" && (text.starts_with('[') || text.starts_with('{')))
            .then(|| serde_json::from_str(&text).ok())
            .flatten()
            .unwrap_or(serde_json::Value::String(text));
        self.0.insert(field.name().to_owned(), value);
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().to_owned(), value.into());
    }
}

/// Runs one subcommand; `Ok(false)` is a failure that was already reported (a failed `check`).
async fn dispatch(command: Command, json_logs: bool) -> Result<bool, tokend::Error> {
    match command {
        Command::Serve { config } => commands::serve(&config).await?,
        Command::Dev { listen, resources } => commands::dev(listen, resources, json_logs).await?,
        Command::Env { config, dialect } => print!("{}", commands::env(&config, &dialect)?),
        Command::Reload { pid, state_dir } => println!("{}", commands::reload(pid, state_dir.as_deref()).await?),
        Command::Health { config, live } => println!("{}", commands::health(&config, live).await?),
        Command::Token { config, resource, client_id } => {
            println!("{}", commands::token(&config, &resource, client_id.as_deref()).await?);
        }
        Command::Check { config, resource } => return commands::check(&config, resource.as_deref()).await,
        Command::TransparentImds { action: AliasAction::Setup } => commands::transparent_imds_setup().await?,
        Command::TransparentImds { action: AliasAction::Teardown } => commands::transparent_imds_teardown()?,
    }
    Ok(true)
}
