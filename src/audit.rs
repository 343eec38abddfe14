//! The audit log (`[audit] path`): one JSON line per token decision — who asked (as the kernel says),
//! which identity and resource, the decision and the rule that made it, cache hit or fetch, status,
//! latency and the token's fingerprint, never the token.
//!
//! Written off the hot path: requests put lines on a bounded queue that one writer thread drains, so a
//! slow or full disk never blocks a caller. The writer also adds the caller's user name: an NSS lookup
//! (which can block) happens there, once per uid, never in a request. A line that does not fit is dropped, counted, and logged
//! (at the first drop, every power of two and every thousand, and the total at shutdown).

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::time::SystemTime;

use serde::Serialize;

use crate::caller::{Caller, Transport, Unknown};
use crate::process::ProcessLookup;

/// Lines queued for the writer at most.
const QUEUE: usize = 4096;

/// An open audit log.
#[derive(Debug)]
pub(crate) struct AuditLog {
    tx: SyncSender<Queued>,
    dropped: Arc<AtomicU64>,
    path: PathBuf,
}

/// A line waiting for the writer, with the lookup of the caller's process if it is to be added.
struct Queued {
    line: serde_json::Value,
    process: Option<Arc<ProcessLookup>>,
}

/// Who asked, for the audit line.
#[derive(Debug, Serialize)]
struct CallerRecord {
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pid: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    transport: Option<&'static str>,
    /// Why the caller is unknown, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    unknown: Option<&'static str>,
}

impl From<&Caller> for CallerRecord {
    fn from(c: &Caller) -> Self {
        match c {
            Caller::Known { uid, gid, pid, transport } => Self {
                uid: Some(*uid),
                gid: *gid,
                pid: *pid,
                transport: Some(match transport {
                    Transport::Tcp => "tcp",
                    Transport::Unix => "unix",
                }),
                unknown: None,
            },
            Caller::Unknown(why) => Self {
                uid: None,
                gid: None,
                pid: None,
                transport: None,
                unknown: Some(match why {
                    Unknown::Gone => "socket_gone",
                    Unknown::NotFound => "no_such_socket",
                    Unknown::LookupFailed => "lookup_failed",
                }),
            },
        }
    }
}

/// One decision.
#[derive(Debug, Serialize)]
pub(crate) struct Record<'a> {
    /// `"imds"` or `"app_service"`.
    pub(crate) dialect: &'static str,
    /// The selected identity, when the request got that far.
    pub(crate) identity: Option<&'a str>,
    /// The resource as the caller spelt it.
    pub(crate) resource: Option<&'a str>,
    /// `"issued"`, `"denied"`, `"rate_limited"` or `"error"`.
    pub(crate) decision: &'static str,
    /// The `[[access.rule]]` that allowed it, if one did.
    pub(crate) rule: Option<usize>,
    /// `"hit"` or `"fetch"`, for issued tokens.
    pub(crate) cache: Option<&'static str>,
    /// The HTTP status answered.
    pub(crate) status: u16,
    /// Time from the parsed request to the answer.
    pub(crate) latency_ms: f64,
    /// The token's fingerprint (`sha256:` + 12 hex digits), for issued tokens.
    pub(crate) token: Option<&'a str>,
    /// Why it was refused, for anything but issued (the description the caller got).
    pub(crate) reason: Option<&'a str>,
}

#[derive(Serialize)]
struct Line<'a> {
    time: String,
    caller: CallerRecord,
    #[serde(flatten)]
    record: &'a Record<'a>,
}

impl AuditLog {
    /// Opens `path` for appending (created with mode 0640) and starts the writer thread.
    pub(crate) fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).mode(0o640).open(path)?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Queued>(QUEUE);
        let shown = path.display().to_string();
        std::thread::Builder::new().name("tokend-audit".into()).spawn(move || {
            let mut out = io::BufWriter::new(file);
            let mut users = Users::default();
            while let Ok(line) = rx.recv() {
                let mut written = out.write_all(users.finish(line).as_bytes());
                // Flush when nothing else is queued: lines reach the file promptly, bursts are batched.
                for more in rx.try_iter() {
                    written = written.and_then(|()| out.write_all(users.finish(more).as_bytes()));
                }
                if let Err(e) = written.and_then(|()| out.flush()) {
                    tracing::error!(path = %shown, error = %e, "cannot write the audit log");
                }
            }
        })?;
        Ok(Self { tx, dropped: Arc::new(AtomicU64::new(0)), path: path.to_path_buf() })
    }

    /// Queues the line for one decision; never blocks. With `process`, the writer adds the caller's
    /// pid, executable, unit and container (waiting for the lookup the request started).
    pub(crate) fn record(&self, caller: &Caller, process: Option<Arc<ProcessLookup>>, record: &Record<'_>) {
        let line = Line {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            caller: caller.into(),
            record,
        };
        let value = match serde_json::to_value(&line) {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %e, "cannot serialise an audit line");
                return;
            }
        };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.tx.try_send(Queued { line: value, process })
        {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() || n.is_multiple_of(1000) {
                tracing::warn!(path = %self.path.display(), dropped_total = n, "audit log lines dropped: the writer cannot keep up");
            }
        }
    }
}

/// User names by uid, resolved in the writer thread and kept for the process's life.
#[derive(Default)]
struct Users(std::collections::HashMap<u32, Option<String>>);

impl Users {
    /// The line as text, with `caller.user` added when the uid has a name, and what is known of the
    /// caller's process.
    fn finish(&mut self, queued: Queued) -> String {
        let Queued { mut line, process } = queued;
        if let (Some(p), Some(caller)) = (process.as_ref().and_then(|p| p.resolve()), line["caller"].as_object_mut()) {
            caller.insert("pid".to_owned(), p.pid.into());
            for (key, value) in
                [("exe", &p.exe), ("command", &p.command), ("unit", &p.unit), ("container", &p.container)]
            {
                if let Some(v) = value {
                    caller.insert(key.to_owned(), v.as_str().into());
                }
            }
        }
        let uid = line["caller"]["uid"].as_u64().and_then(|u| u32::try_from(u).ok());
        if let Some(uid) = uid {
            let name = self.0.entry(uid).or_insert_with(|| {
                nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)).ok().flatten().map(|u| u.name)
            });
            if let (Some(name), Some(caller)) = (name.as_ref(), line["caller"].as_object_mut()) {
                caller.insert("user".to_owned(), serde_json::Value::String(name.clone()));
            }
        }
        let mut text = line.to_string();
        text.push('\n');
        text
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        let n = self.dropped.load(Ordering::Relaxed);
        if n > 0 {
            tracing::warn!(path = %self.path.display(), dropped_total = n, "audit log lines were dropped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_json_line_per_decision() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("audit.jsonl");
        let log = AuditLog::open(&path).expect("open");
        let caller = Caller::Known { uid: 1001, gid: Some(1001), pid: Some(42), transport: Transport::Unix };
        let record = Record {
            dialect: "imds",
            identity: Some("default"),
            resource: Some("https://storage.azure.com"),
            decision: "issued",
            rule: Some(0),
            cache: Some("hit"),
            status: 200,
            latency_ms: 0.25,
            token: Some("sha256:0123456789ab"),
            reason: None,
        };
        log.record(&caller, None, &record);
        log.record(&Caller::Unknown(Unknown::Gone), None, &Record { decision: "denied", status: 403, ..record });
        let me = nix::unistd::geteuid().as_raw();
        let pid = i32::try_from(std::process::id()).expect("pid");
        let mine = Caller::Known { uid: me, gid: None, pid: None, transport: Transport::Tcp };
        log.record(&mine, Some(Arc::new(ProcessLookup::new(me, Some(pid), None))), &record);
        drop(log);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let text = loop {
            let text = std::fs::read_to_string(&path).expect("read");
            if text.lines().count() == 3 || std::time::Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).expect("json")).collect();
        let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(1001)).ok().flatten().map(|u| u.name);
        let mut expected = serde_json::json!({"uid": 1001, "gid": 1001, "pid": 42, "transport": "unix"});
        if let Some(name) = user {
            expected["user"] = name.into();
        }
        assert_eq!(lines[0]["caller"], expected);
        assert_eq!((lines[0]["decision"].as_str(), lines[0]["rule"].as_u64()), (Some("issued"), Some(0)));
        assert!(humantime::parse_rfc3339(lines[0]["time"].as_str().expect("time")).is_ok());
        assert_eq!(lines[1]["caller"], serde_json::json!({"unknown": "socket_gone"}));
        // With a process lookup: the pid, executable and command of this test process.
        assert_eq!(lines[2]["caller"]["pid"], pid);
        let exe = std::env::current_exe().expect("exe");
        assert_eq!(lines[2]["caller"]["exe"].as_str(), exe.to_str());
        assert!(lines[2]["caller"]["command"].is_string(), "{}", lines[2]);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777, 0o640);
    }

    /// Waits until `path` has `n` lines (or 5 s) and returns them, parsed.
    fn lines_of(path: &Path, n: usize) -> (String, Vec<serde_json::Value>) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let text = loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if text.lines().count() >= n || std::time::Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        let lines = text.lines().map(|l| serde_json::from_str(l).expect("json")).collect();
        (text, lines)
    }

    fn issued<'a>(resource: &'a str, reason: Option<&'a str>) -> Record<'a> {
        Record {
            dialect: "imds",
            identity: Some("default"),
            resource: Some(resource),
            decision: "error",
            rule: None,
            cache: None,
            status: 400,
            latency_ms: 0.5,
            token: None,
            reason,
        }
    }

    /// An attacker's resource (echoed in the reason) holding every character a line splitter may take
    /// for a line end, or a terminal for a control sequence: each is escaped, and the line is one line
    /// whichever splitter reads it (Python's `str.splitlines` splits at U+0085, U+2028, U+2029 and
    /// C0 separators; `less` and terminals act on C1 controls such as U+009B CSI).
    #[test]
    fn separators_and_controls_are_escaped() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("audit.jsonl");
        let log = AuditLog::open(&path).expect("open");
        let nasty: String = (0u32..0x20)
            .chain(0x7f..=0x9f)
            .chain([0x2028, 0x2029])
            .filter_map(char::from_u32)
            .flat_map(|c| ['x', c])
            .collect::<String>()
            + "\"\\end";
        let reason = format!("query parameter resource: {nasty}");
        let caller = Caller::Known { uid: 1001, gid: None, pid: None, transport: Transport::Tcp };
        #[allow(clippy::let_unit_value)]
        let _ = log.record(&caller, None, &issued(&nasty, Some(&reason)));
        drop(log);
        let (text, lines) = lines_of(&path, 1);
        let raw: Vec<String> = text
            .chars()
            .filter(|c| {
                (c.is_control() && *c != '\n') || matches!(c, '\u{2028}' | '\u{2029}')
            })
            .map(|c| format!("U+{:04X}", u32::from(c)))
            .collect();
        assert!(raw.is_empty(), "written raw: {raw:?}");
        assert_eq!(text.matches('\n').count(), 1, "one line: {text:?}");
        for escaped in ["\\u2028", "\\u2029", "\\u0085", "\\u009b", "\\u0000", "\\u007f"] {
            assert!(text.contains(escaped), "{escaped} missing in {text}");
        }
        assert_eq!(lines[0]["resource"].as_str(), Some(nasty.as_str()), "the escapes decode to the original");
        assert_eq!(lines[0]["reason"].as_str(), Some(reason.as_str()));
    }

    /// A flood of requests with huge resources cannot grow the log by more than a small bounded
    /// amount per line: every caller-controlled field is cut (on a character boundary) and says how
    /// much was cut.
    #[test]
    fn caller_controlled_fields_are_capped() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("audit.jsonl");
        let log = AuditLog::open(&path).expect("open");
        // Two-byte characters, so that a cut at a fixed byte count would split one.
        let huge = "é".repeat(8000);
        let reason = format!("query parameter resource: {huge}");
        let caller = Caller::Unknown(Unknown::NotFound);
        #[allow(clippy::let_unit_value)]
        let _ = log.record(&caller, None, &issued(&huge, Some(&reason)));
        drop(log);
        let (text, lines) = lines_of(&path, 1);
        assert!(text.len() < 1500, "a line of {} bytes", text.len());
        let resource = lines[0]["resource"].as_str().expect("resource");
        let (kept, marker) = resource.split_once('…').expect("a cut marker");
        assert!(kept.len() <= 256 && kept.chars().all(|c| c == 'é'), "{resource}");
        assert_eq!(marker, format!("(+{} bytes)", huge.len() - kept.len()));
        let reason_field = lines[0]["reason"].as_str().expect("reason");
        assert!(reason_field.starts_with("query parameter resource: é") && reason_field.len() < 300, "{reason_field}");
        assert!(reason_field.ends_with(" bytes)"), "{reason_field}");
    }

}
