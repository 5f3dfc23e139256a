//! Running the `limitlab` binary from the repository's root, as users do.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Exit code, stdout and stderr of `limitlab ARGS`.
#[allow(dead_code)]
pub fn limitlab(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_limitlab"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("limitlab runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// A `limitlab` child process (a mock, a proxy), killed when the test ends, and
/// the URLs it printed on its first lines.
// Not every test file that shares this module starts servers.
#[allow(dead_code)]
pub struct Process {
    pub child: Child,
    pub urls: Vec<String>,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `limitlab ARGS` from the repository's root, its stderr into `log` (or
/// nowhere), and reads the URLs of its first `lines` lines.
#[allow(dead_code)]
pub fn spawn(args: &[&str], lines: usize, log: Option<&Path>) -> Process {
    let stderr = log.map_or_else(Stdio::null, |p| Stdio::from(std::fs::File::create(p).expect("a log file")));
    let mut child = Command::new(env!("CARGO_BIN_EXE_limitlab"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("limitlab starts");
    let mut out = BufReader::new(child.stdout.take().expect("piped"));
    let urls = (0..lines)
        .map(|_| {
            let mut line = String::new();
            out.read_line(&mut line).expect("a line");
            let url = line.trim().rsplit(' ').next().unwrap_or_default().to_owned();
            assert!(url.starts_with("http://"), "unexpected line {line:?} from limitlab {args:?}");
            url
        })
        .collect();
    Process { child, urls }
}
