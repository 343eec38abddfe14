//! Transparent IMDS: tokend answering at `169.254.169.254:80`, the address Go, Rust and older Azure
//! clients hard-code, so that they need no environment variables at all.
//!
//! The address is aliased on the loopback interface (`ip addr add 169.254.169.254/32 dev lo`), which
//! makes it host-local: only processes on this host (or in this network namespace) reach it, so it
//! needs no `allow_non_loopback`. On a cloud VM that has a real metadata service the alias would shadow
//! it for the whole host; tokend refuses that: before it adds the alias or binds the address it asks
//! `GET /metadata/instance` there, and any HTTP answer means something already serves as IMDS.
//!
//! This module also runs `ip` for `tokend transparent-imds setup|teardown` (systemd `ExecStartPre=+` /
//! `ExecStopPost=+`), so the daemon itself needs only `CAP_NET_BIND_SERVICE`.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::net::IMDS_ADDR;

/// How long the probe waits for a connection and for an answer.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

/// Why `tokend transparent-imds` failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AliasError {
    /// A real metadata service answers: refusing to shadow it (a usage error, exit 64).
    #[error(transparent)]
    ImdsPresent(#[from] ImdsPresent),
    /// `ip` could not be run.
    #[error("cannot run `ip` (iproute2): {0}")]
    Spawn(#[source] std::io::Error),
    /// `ip` failed.
    #[error("ip {args}: {stderr}")]
    Ip {
        /// Its arguments.
        args: String,
        /// What it said.
        stderr: String,
    },
}

/// What answered at an IMDS address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "something already answers as IMDS at {addr} ({status_line}); this looks like a cloud VM with a real metadata \
     service, which transparent mode would shadow for the whole host. Remove {addr} from server.listen and point \
     clients at the loopback listener (tokend env), or stop the other service"
)]
pub(crate) struct ImdsPresent {
    /// The probed address.
    pub(crate) addr: SocketAddr,
    /// The first line of its answer.
    pub(crate) status_line: String,
}

/// Asks `GET /metadata/instance` at `addr`. `Ok(())` when nothing answers HTTP there (refused,
/// unreachable, silent); `Err` when something does.
pub(crate) async fn probe(addr: SocketAddr) -> Result<(), ImdsPresent> {
    let Ok(Ok(mut stream)) = tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr)).await else {
        return Ok(());
    };
    let request = format!(
        "GET /metadata/instance?api-version=2021-02-01 HTTP/1.1\r\nHost: {}\r\nMetadata: true\r\nConnection: close\r\n\r\n",
        addr.ip()
    );
    let mut buf = [0u8; 256];
    let answer = tokio::time::timeout(PROBE_TIMEOUT, async {
        stream.write_all(request.as_bytes()).await?;
        stream.read(&mut buf).await
    })
    .await;
    match answer {
        Ok(Ok(n)) if buf[..n].starts_with(b"HTTP/") => {
            let text = String::from_utf8_lossy(&buf[..n]);
            let status_line = text.lines().next().unwrap_or("").trim().to_owned();
            Err(ImdsPresent { addr, status_line })
        }
        _ => Ok(()),
    }
}

/// `tokend transparent-imds setup`: refuses when an IMDS already answers, then aliases the address on `lo`.
pub(crate) async fn setup() -> Result<(), AliasError> {
    probe(IMDS_ADDR).await?;
    run_ip(&["addr", "replace", "169.254.169.254/32", "dev", "lo"]).map(drop)
}

/// `tokend transparent-imds teardown`: removes the alias (absent is fine).
pub(crate) fn teardown() -> Result<(), AliasError> {
    let shown = run_ip(&["-4", "addr", "show", "dev", "lo"])?;
    if shown.contains("169.254.169.254/32") {
        run_ip(&["addr", "del", "169.254.169.254/32", "dev", "lo"])?;
    }
    Ok(())
}

/// Runs `ip ARGS`; its standard output on success.
fn run_ip(args: &[&str]) -> Result<String, AliasError> {
    let out = Command::new("ip").args(args).output().map_err(AliasError::Spawn)?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        return Err(AliasError::Ip { args: args.join(" "), stderr });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn probe_tells_an_http_server_from_nothing() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            if let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").await;
            }
        });
        let err = probe(addr).await.expect_err("an HTTP server answers");
        assert_eq!(err.status_line, "HTTP/1.1 200 OK");
        assert!(err.to_string().contains("server.listen"));
        // A closed port: nothing answers.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("addr");
        assert_eq!(probe(closed).await, Ok(()));
    }
}
