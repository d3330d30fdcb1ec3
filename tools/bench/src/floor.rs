//! Runs a built floor-bench in the same run, one mode at a time, right before the turnd mode
//! it is compared with (so both see the same machine), and returns its `--json` object.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tokio::process::Command;

/// floor-bench's database: [`run`] passes no --database-url, so it is floor-bench's default
/// (on the server of turnd-bench's default --database-url).
pub const DATABASE: &str = "floorbench";

/// `floor-bench --json <args…>`; its human line (stderr) is echoed to our stderr.
pub async fn run(floor: &Path, amqp_url: &str, args: &[String]) -> Result<Value> {
    let mut cmd = Command::new(floor);
    cmd.arg("--json")
        .arg("--amqp-url")
        .arg(amqp_url)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let what = format!("{} --json {}", floor.display(), args.join(" "));
    let output = tokio::time::timeout(Duration::from_secs(900), cmd.output())
        .await
        .with_context(|| format!("{what} did not finish within 15 minutes"))?
        .with_context(|| format!("run {what} (see --floor)"))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        eprintln!("  floor: {line}");
    }
    if !output.status.success() {
        bail!("{what} failed ({}): {}", output.status, stderr.trim());
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .with_context(|| format!("{what} printed no JSON object"))?;
    serde_json::from_str(line).with_context(|| format!("{what} printed invalid JSON"))
}
