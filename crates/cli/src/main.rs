//! The `palisade` binary.
//!
//! ```text
//! palisade gateway --config FILE   run the proxy (SIGHUP or a file change reloads; SIGTERM drains)
//! palisade check --config FILE     validate a configuration, print every problem, exit 1 if any
//! palisade demo [--duration 30s]   the gateway in front of built-in failing upstreams, with traffic
//! ```

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use palisade_gateway::Config;

mod demo;

const USAGE: &str = "\
usage:
  palisade gateway --config FILE   run the gateway
  palisade check --config FILE     validate a configuration file
  palisade demo [--duration DUR] [--listen ADDR] [--admin ADDR]
                                   run the gateway in front of built-in demo upstreams
                                   with built-in traffic, printing what happens each second
options:
  -h, --help                       this text
environment:
  PALISADE_<SECTION>__<KEY>=VALUE  override a configuration value
  RUST_LOG=info,palisade=debug     log filter
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "palisade: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(args: &[String]) -> anyhow::Result<ExitCode> {
    let Some(cmd) = args.first() else {
        let _ = write!(std::io::stderr(), "{USAGE}");
        return Ok(ExitCode::from(2));
    };
    let opts = Options::parse(&args[1..])?;
    match cmd.as_str() {
        "-h" | "--help" | "help" => {
            let _ = write!(std::io::stdout(), "{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        "check" => {
            let path = opts
                .config
                .ok_or_else(|| anyhow::anyhow!("check needs --config FILE"))?;
            // The same compilation as start-up's: every object built, every file the
            // configuration names read. Only host names are left to resolve at start.
            let loaded = Config::load(&path).and_then(palisade_gateway::runtime::Runtime::compile);
            match loaded {
                Ok(rt) => {
                    let _ = writeln!(
                        std::io::stdout(),
                        "{}: ok ({} routes, {} clusters)",
                        path.display(),
                        rt.routes.len(),
                        rt.clusters.len()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    let mut err = std::io::stderr();
                    let _ = writeln!(err, "{}: {} problem(s)", path.display(), e.0.len());
                    for p in &e.0 {
                        let _ = writeln!(err, "  {p}");
                    }
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        "gateway" => {
            init_logs("info");
            let path = opts
                .config
                .ok_or_else(|| anyhow::anyhow!("gateway needs --config FILE"))?;
            let config = Config::load(&path).map_err(|e| anyhow::anyhow!("{}:\n{e}", path.display()))?;
            // The proxy's own worker threads are started by the gateway; this
            // runtime runs the rest (signals, reloads, the admin listener, probes).
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(gateway(config, path))
        }
        "demo" => {
            init_logs("warn");
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(demo::run(opts))?;
            Ok(ExitCode::SUCCESS)
        }
        other => anyhow::bail!("unknown command `{other}`\n{USAGE}"),
    }
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

async fn gateway(config: Config, path: PathBuf) -> anyhow::Result<ExitCode> {
    // Handlers first: a SIGHUP that arrives once the gateway says it serves must
    // reload it, not end it (the default action).
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let handle = palisade_gateway::start(config, Some(path)).await?;
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
                _ = hup.recv() => { let _ = handle.reload_from_file().await; }
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

/// Command-line options shared by the commands.
#[derive(Debug, Default)]
pub struct Options {
    /// `--config FILE`.
    pub config: Option<PathBuf>,
    /// `--duration 30s`.
    pub duration: Option<Duration>,
    /// `--listen ADDR`.
    pub listen: Option<std::net::SocketAddr>,
    /// `--admin ADDR`.
    pub admin: Option<std::net::SocketAddr>,
}

impl Options {
    fn parse(args: &[String]) -> anyhow::Result<Options> {
        let mut o = Options::default();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let (flag, inline) = match a.split_once('=') {
                Some((f, v)) => (f, Some(v.to_string())),
                None => (a.as_str(), None),
            };
            let mut value = || {
                inline
                    .clone()
                    .or_else(|| it.next().cloned())
                    .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))
            };
            match flag {
                "--config" | "-c" => o.config = Some(PathBuf::from(value()?)),
                "--duration" => {
                    let v = value()?;
                    o.duration = Some(
                        palisade_gateway::config::parse_duration(&v)
                            .map_err(|e| anyhow::anyhow!("--duration: {e}"))?,
                    );
                }
                "--listen" => {
                    o.listen = Some(value()?.parse().map_err(|e| anyhow::anyhow!("--listen: {e}"))?)
                }
                "--admin" => o.admin = Some(value()?.parse().map_err(|e| anyhow::anyhow!("--admin: {e}"))?),
                other => anyhow::bail!("unknown option `{other}`"),
            }
        }
        Ok(o)
    }
}
