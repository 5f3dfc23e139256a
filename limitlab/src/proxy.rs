//! `limitlab proxy`: the real gateway.

use anyhow::{Context, Result};
use proxy::ProxyConfig;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub struct Options<'a> {
    pub config: &'a Path,
    pub listen: Option<String>,
    pub admin: Option<String>,
    pub backends: Vec<String>,
    pub log_json: bool,
    pub shutdown_grace: Duration,
    /// Runtime worker threads; `None`: one per core.
    pub threads: Option<usize>,
    /// Where the decision log goes, if anywhere.
    pub decisions: Option<&'a Path>,
}

pub fn run(options: Options<'_>) -> Result<()> {
    let path = options.config;
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut config = ProxyConfig::from_toml(&path.display().to_string(), &text).map_err(anyhow::Error::msg)?;
    for spec in &options.backends {
        config.override_backend(spec).map_err(anyhow::Error::msg)?;
    }
    if let Some(listen) = options.listen {
        config.listen = listen;
    }
    if let Some(admin) = options.admin {
        config.admin = admin;
    }
    // Checked before anything listens: a path that cannot be written is an
    // error now, not a log lost later.
    let decisions = match options.decisions {
        Some(path) => Some(
            std::fs::File::create(path).with_context(|| format!("cannot write the decision log {}", path.display()))?,
        ),
        None => None,
    };
    init_logs(options.log_json);
    let threads = options.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let listener = bind(&config.listen)?;
    let admin = bind(&config.admin)?;
    let (front, back) = (listener.local_addr()?, admin.local_addr()?);
    let mut proxy = proxy::server::Proxy::new(config).map_err(anyhow::Error::msg)?;
    if let Some(file) = decisions {
        proxy.write_decisions(file);
    }
    let proxy = Arc::new(proxy);
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening on http://{front}")?;
    writeln!(out, "admin on http://{back}")?;
    out.flush()?;
    drop(out);
    let grace = options.shutdown_grace;
    let finished = proxy::run_threads(proxy, listener, admin, threads.max(1), crate::mock::shutdown_signal(), grace)?;
    if !finished {
        eprintln!("shutdown: requests still in flight after {} s; exiting", grace.as_secs());
    }
    Ok(())
}

/// A listening socket with the backlog Tokio's own `bind` gives (std's is 128,
/// too few for a burst of new clients).
fn bind(address: &str) -> Result<std::net::TcpListener> {
    use std::net::ToSocketAddrs;
    let listen = |addr: std::net::SocketAddr| -> std::io::Result<std::net::TcpListener> {
        let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        Ok(socket.into())
    };
    let mut last = None;
    for addr in address.to_socket_addrs().with_context(|| format!("cannot listen on {address}"))? {
        match listen(addr) {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    let error = last.unwrap_or_else(|| std::io::Error::other("the address resolves to nothing"));
    Err(anyhow::Error::new(error).context(format!("cannot listen on {address}")))
}

fn init_logs(json: bool) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("LIMITLAB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,limitlab::request=info,limitlab::refusal=info"));
    // Colour only for a person at a terminal: a file or a pipe gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    proxy::logs::write_lines(if json { proxy::logs::Lines::Json } else { proxy::logs::Lines::Text });
    let _ = match json {
        true => builder.json().try_init(),
        false => builder.try_init(),
    };
}
