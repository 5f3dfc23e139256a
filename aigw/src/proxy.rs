//! `aigw proxy`: the real gateway.

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
    init_logs(options.log_json);
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = options.threads {
        builder.worker_threads(n.max(1));
    }
    let runtime = builder.enable_all().build().context("cannot start the async runtime")?;
    runtime.block_on(serve(config, options.shutdown_grace))
}

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("AIGW_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,aigw::request=info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match json {
        true => builder.json().try_init(),
        false => builder.try_init(),
    };
}

async fn serve(config: ProxyConfig, grace: Duration) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let admin = tokio::net::TcpListener::bind(&config.admin)
        .await
        .with_context(|| format!("cannot listen on {}", config.admin))?;
    let (front, back) = (listener.local_addr()?, admin.local_addr()?);
    let proxy = Arc::new(proxy::server::Proxy::new(config).map_err(anyhow::Error::msg)?);
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening on http://{front}")?;
    writeln!(out, "admin on http://{back}")?;
    out.flush()?;
    drop(out);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        crate::mock::shutdown_signal().await;
        let _ = stop_tx.send(());
    };
    let serving = proxy::serve(proxy, listener, admin, signal);
    tokio::pin!(serving);
    tokio::select! {
        result = &mut serving => return Ok(result?),
        _ = stop_rx => {}
    }
    // Stopped accepting: in-flight requests and streams get `grace` to finish.
    match tokio::time::timeout(grace, serving).await {
        Ok(result) => Ok(result?),
        Err(_) => {
            eprintln!("shutdown: requests still in flight after {} s; exiting", grace.as_secs());
            Ok(())
        }
    }
}
