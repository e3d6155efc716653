//! The `palisade` binary.
//!
//! ```text
//! palisade gateway --config FILE   run the proxy (SIGHUP or a file change reloads; SIGTERM drains)
//! palisade check --config FILE     validate a configuration, print every problem, exit 1 if any
//! palisade demo [--duration 30s]   the gateway in front of built-in failing upstreams, with traffic
//! palisade jobs --database URL ... the durable queue's jobs: list, show, retry, cancel, stats
//! palisade worker --config FILE    deliver the requests the async routes stored
//! palisade sign-url --config FILE --route NAME --path P   a signed link for a route's signed_urls
//! palisade completions SHELL       a completion script for bash, zsh, fish, elvish or PowerShell
//! ```

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use palisade_gateway::Config;
use palisade_gateway::source::ConfigSource;

mod demo;
mod demo_sale;
mod jobs;

/// A resilient reverse proxy (routes, clusters, breakers, retries, health) and its
/// durable job queue.
#[derive(Debug, Parser)]
#[command(
    name = "palisade",
    version,
    propagate_version = true,
    after_help = "Environment:\n  PALISADE_<SECTION>__<KEY>=VALUE  override a configuration value (PALISADE_GATEWAY__LISTEN=0.0.0.0:80)\n  RUST_LOG=info,palisade=debug     log filter"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway (SIGHUP or, with watch_config, an edit reloads; SIGTERM drains).
    Gateway {
        /// The configuration: a TOML file, or `etcd://host:port/key` (the key's
        /// value is the TOML text; it is watched and each valid version applied).
        #[arg(short, long, value_name = "FILE|etcd://HOST:PORT/KEY")]
        config: String,
    },
    /// Validate a configuration: the compilation start-up runs, every problem printed.
    ///
    /// Exits 0 when the file would start, 1 when it has problems (each printed on a
    /// line of its own, naming its field and line).
    Check {
        /// The configuration: a TOML file, or `etcd://host:port/key`.
        #[arg(short, long, value_name = "FILE|etcd://HOST:PORT/KEY")]
        config: String,
    },
    /// Run the gateway in front of built-in failing upstreams, with traffic, printing
    /// what happens each second.
    Demo(DemoArgs),
    /// The durable queue's jobs: list, show, retry, cancel, stats.
    Jobs(jobs::JobsArgs),
    /// Deliver the requests a configuration's async routes stored in its
    /// `[gateway.queue]`, without serving (as many workers as needed, beside the
    /// gateways; SIGTERM or Ctrl-C stops, handing unfinished ones back).
    Worker {
        /// The gateway configuration (TOML) whose routes and clusters deliver.
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Print a signed link (valet key) for a route with `signed_urls`, signed with
    /// its current key: `palisade sign-url -c gateway.toml --route files --path /files/a.pdf --expires-in 1h`.
    SignUrl(SignUrlArgs),
    /// Register an endpoint in an etcd service registry and keep it registered
    /// (a lease renewed every third of its TTL) until SIGTERM or Ctrl-C, which
    /// deregister it: for services that cannot register themselves (a sidecar).
    Register(RegisterArgs),
    /// Print a shell completion script (`palisade completions bash > /etc/bash_completion.d/palisade`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// Options of `palisade demo`.
#[derive(Debug, Default, clap::Args)]
pub struct DemoArgs {
    /// Stop after this long (`30s`, `2m`); until Ctrl-C if not given.
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub duration: Option<Duration>,
    /// Where the demo gateway listens.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<std::net::SocketAddr>,
    /// Where its admin endpoints listen.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<std::net::SocketAddr>,
    /// Show a flash sale instead: the flash-sale service embedded (SQLite, its
    /// stock gate in process) behind the gateway, and thousands of buyers.
    #[arg(long)]
    pub sale: bool,
}

/// Options of `palisade register`.
#[derive(Debug, clap::Args)]
pub struct RegisterArgs {
    /// The etcd member.
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:2379")]
    pub etcd: String,
    /// The service's prefix, as its gateway cluster's `etcd.prefix` names it.
    #[arg(long, value_name = "PREFIX")]
    pub prefix: String,
    /// The endpoint's address.
    #[arg(long, value_name = "IP:PORT")]
    pub address: std::net::SocketAddr,
    /// Its load balancing weight.
    #[arg(long, default_value_t = 1)]
    pub weight: u32,
    /// Its failover tier.
    #[arg(long, default_value_t = 0)]
    pub tier: u8,
    /// How long the endpoint stays registered after this process stops renewing
    /// it (killed, or cut off from etcd).
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "10s")]
    pub ttl: Duration,
}

/// Options of `palisade sign-url`.
#[derive(Debug, clap::Args)]
pub struct SignUrlArgs {
    /// The gateway configuration (TOML) holding the route and its keys.
    #[arg(short, long, value_name = "FILE")]
    pub config: PathBuf,
    /// The route (its `name`) whose `signed_urls` keys sign the link.
    #[arg(long)]
    pub route: String,
    /// The path and query the link is for (`/files/report.pdf?v=2`).
    #[arg(long)]
    pub path: String,
    /// The method it allows.
    #[arg(long, default_value = "GET")]
    pub method: String,
    /// How long it works (`15m`, `1h`, `7d`... as durations are written).
    #[arg(long, value_name = "DURATION", value_parser = duration, default_value = "1h")]
    pub expires_in: Duration,
    /// The only client address it works for.
    #[arg(long, value_name = "ADDR")]
    pub ip: Option<std::net::IpAddr>,
    /// Printed before the path (`https://files.example.com`).
    #[arg(long, default_value = "")]
    pub base: String,
}

fn duration(text: &str) -> Result<Duration, String> {
    palisade_core::config::parse_duration(text)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "palisade: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Check { config } => check(&config),
        Command::Gateway { config } => {
            init_logs("info");
            let source = ConfigSource::parse(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
            // The proxy's own worker threads are started by the gateway; this
            // runtime runs the rest (signals, reloads, the admin listener, probes).
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(gateway(source))
        }
        Command::Demo(args) => {
            // The sale demo's unpaid orders are cancelled by design: not warnings.
            init_logs(if args.sale {
                "warn,palisade_flow::saga=error"
            } else {
                "warn"
            });
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(async {
                    if args.sale {
                        demo_sale::run(args).await
                    } else {
                        demo::run(args).await
                    }
                })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Worker { config: path } => {
            init_logs("info");
            let config = Config::load(&path).map_err(|e| anyhow::anyhow!("{}:\n{e}", path.display()))?;
            let Some(section) = config.gateway.queue.clone() else {
                anyhow::bail!(
                    "{}: no [gateway.queue] table: there is nothing to deliver",
                    path.display()
                );
            };
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(async {
                    let runtime = palisade_gateway::runtime::Runtime::build(config)
                        .await
                        .map_err(|e| anyhow::anyhow!("{}:\n{e}", path.display()))?;
                    let runtime = std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(runtime));
                    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
                    let until = async move {
                        tokio::select! {
                            _ = term.recv() => {}
                            _ = tokio::signal::ctrl_c() => {}
                        }
                    };
                    palisade_gateway::jobs::work(runtime, section, until).await?;
                    Ok(ExitCode::SUCCESS)
                })
        }
        Command::Jobs(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(jobs::run(args)),
        Command::SignUrl(args) => sign_url(&args),
        Command::Register(args) => {
            init_logs("info");
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(register(args))
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "palisade", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `palisade check`: the same reading and compilation as start-up's, every object
/// built and every file the configuration names read; only host names are left
/// to resolve.
fn check(arg: &str) -> anyhow::Result<ExitCode> {
    let source = ConfigSource::parse(arg).map_err(|e| anyhow::anyhow!("{e}"))?;
    let loaded = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(source.load());
    match loaded.and_then(|l| palisade_gateway::runtime::Runtime::compile(l.config)) {
        Ok(rt) => {
            let _ = writeln!(
                std::io::stdout(),
                "{source}: ok ({} routes, {} clusters)",
                rt.routes.len(),
                rt.clusters.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let mut err = std::io::stderr();
            let n = e.0.len();
            let _ = writeln!(err, "{source}: {n} problem{}", if n == 1 { "" } else { "s" });
            for p in &e.0 {
                let _ = writeln!(err, "  {p}");
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

/// `palisade sign-url`: the link, on a line.
fn sign_url(a: &SignUrlArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&a.config).map_err(|e| anyhow::anyhow!("{}:\n{e}", a.config.display()))?;
    let Some((i, route)) = config.routes.iter().enumerate().find(|(_, r)| r.name == a.route) else {
        anyhow::bail!("{}: no route named {:?}", a.config.display(), a.route);
    };
    let Some(table) = &route.signed_urls else {
        anyhow::bail!(
            "{}: route {:?} has no signed_urls table",
            a.config.display(),
            a.route
        );
    };
    if !a.path.starts_with('/') {
        anyhow::bail!("--path must start with /: {:?}", a.path);
    }
    let at = format!("routes[{i}] ({}).signed_urls", route.name);
    let signer = palisade_gateway::guard::url_signer(table, &at)
        .map_err(|e| anyhow::anyhow!("{}:\n{e}", a.config.display()))?;
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .saturating_add(a.expires_in)
        .as_secs();
    let method = a.method.to_ascii_uppercase();
    let link = signer.sign(&method, &a.path, expires, a.ip);
    writeln!(std::io::stdout(), "{}{link}", a.base.trim_end_matches('/'))?;
    Ok(ExitCode::SUCCESS)
}

/// `palisade register`: the endpoint kept in the registry until told to stop.
async fn register(a: RegisterArgs) -> anyhow::Result<ExitCode> {
    use palisade_gateway::registry::{Registration, register};
    let base: http::Uri = (a.etcd.parse().ok())
        .filter(|u: &http::Uri| u.scheme_str() == Some("http") && u.host().is_some())
        .ok_or_else(|| anyhow::anyhow!("--etcd: `{}` is not an http:// URL of an etcd member", a.etcd))?;
    if !a.prefix.starts_with('/') {
        anyhow::bail!("--prefix must start with /: {:?}", a.prefix);
    }
    if a.ttl < Duration::from_secs(1) {
        anyhow::bail!("--ttl must be at least 1s (etcd's leases count whole seconds)");
    }
    let etcd = palisade_gateway::etcd::Etcd::new(base, Duration::from_secs(5));
    let key = format!("{}{}", a.prefix, a.address);
    let me = Registration {
        address: a.address,
        weight: a.weight,
        tier: a.tier,
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stop = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    register(&etcd, &key, &me, a.ttl, stop).await;
    Ok(ExitCode::SUCCESS)
}

fn init_logs(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .try_init();
}

async fn gateway(source: ConfigSource) -> anyhow::Result<ExitCode> {
    // Handlers first: a SIGHUP that arrives once the gateway says it serves must
    // reload it, not end it (the default action).
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let loaded = source
        .load()
        .await
        .map_err(|e| anyhow::anyhow!("{source}:\n{e}"))?;
    let handle = palisade_gateway::start(loaded.config, Some((source, loaded.version))).await?;
    tracing::info!(listen = %handle.addr, admin = ?handle.admin_addr, "palisade gateway serving");
    {
        // Watching ends only at shutdown (or at once when off); never poll it again.
        let watch = async {
            handle.watch_config().await;
            std::future::pending::<()>().await
        };
        tokio::pin!(watch);
        loop {
            tokio::select! {
                _ = hup.recv() => { let _ = handle.reload_from_source().await; }
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
                _ = &mut watch => {}
            }
        }
    }
    tracing::info!("shutting down: draining requests in flight");
    handle.shutdown().await;
    Ok(ExitCode::SUCCESS)
}
