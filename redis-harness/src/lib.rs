//! redis-harness: a real `redis-server` for the tests that run replicas against
//! one, on a free loopback port, stopped when dropped. A machine without
//! `redis-server` gets it from Debian's package first (what `.ci/run` does), so
//! that `cargo test --workspace` works on a fresh machine; where that cannot be
//! done (not root, no `apt-get`), the test fails saying what to install. It is
//! never skipped.

use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

/// A `redis-server` without persistence, listening on `127.0.0.1:port`.
pub struct Redis {
    child: Child,
    pub port: u16,
}

impl Redis {
    /// Starts one on a free port.
    pub fn start() -> Redis {
        Redis::start_on(free_port())
    }

    /// Starts one on `port` (a test that restarts the store on the same port).
    pub fn start_on(port: u16) -> Redis {
        ensure_installed();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("redis-server does not start: {e}"));
        // Held from here on, so that a panic below still stops the server.
        let redis = Redis { child, port };
        for _ in 0..500 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return redis;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not listen on {port} within 5 s");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port nothing listened on a moment ago.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port can be bound");
    listener.local_addr().expect("a bound listener has an address").port()
}

/// Makes sure `redis-server` can be run, installing Debian's package if it is
/// missing; panics with what to do if it cannot be. Done once per process;
/// test processes that install at the same time wait for apt's lock.
pub fn ensure_installed() {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    if let Err(e) = INSTALLED.get_or_init(install_if_missing) {
        panic!("{e}");
    }
}

fn install_if_missing() -> Result<(), String> {
    if runs("redis-server", &["--version"]) {
        return Ok(());
    }
    let install = ["-y", "-qq", "-o", "DPkg::Lock::Timeout=300", "install", "redis-server"];
    // A fresh machine may have no package lists yet: fetched, then tried again.
    if !runs("apt-get", &install) {
        runs("apt-get", &["-qq", "-o", "DPkg::Lock::Timeout=300", "update"]);
        runs("apt-get", &install);
    }
    match runs("redis-server", &["--version"]) {
        true => Ok(()),
        false => Err("the tests run replicas against a real redis-server, which is not installed and \
                      could not be installed with apt-get here: install it (Debian: apt install redis-server)"
            .into()),
    }
}

/// Whether `program` with `args` runs and succeeds (its output is not kept).
fn runs(program: &str, args: &[&str]) -> bool {
    let status = Command::new(program)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    status.is_ok_and(|s| s.success())
}
