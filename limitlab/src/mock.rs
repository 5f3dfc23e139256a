//! `limitlab mock`: the Azure OpenAI stand-in as a server.

use anyhow::{Context, Result};
use mock_aoai::MockConfig;
use std::io::Write;
use std::path::Path;

pub fn run(config: Option<&Path>, listen: &str) -> Result<()> {
    let config = match config {
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            MockConfig::from_toml(&path.display().to_string(), &text).map_err(anyhow::Error::msg)?
        }
        None => {
            eprintln!("no --config given: serving the built-in example (deployments `gpt-4o` and `gpt-35-turbo`)");
            MockConfig::example()
        }
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let listener =
            tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
        let addr = listener.local_addr()?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{addr}")?;
        out.flush()?;
        drop(out);
        mock_aoai::server::serve(listener, config, shutdown_signal()).await?;
        Ok(())
    })
}

/// Ctrl-C or SIGTERM: stop accepting and let requests in progress finish.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
