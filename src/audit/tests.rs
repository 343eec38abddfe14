//! The audit log's tests: the line's fields, escaping, caps, failures, rotation and summaries.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::caller::{Transport, Unknown};

#[test]
fn one_json_line_per_decision() {
    let d = tempfile::tempdir().expect("tempdir");
    let path = d.path().join("audit.jsonl");
    let log = AuditLog::open(&path, OnFailure::Drop).expect("open");
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
        on_demand: false,
    };
    assert_eq!(log.record(&caller, None, &record), Ok(()));
    let denied = Record { decision: "denied", status: 403, ..record };
    assert_eq!(log.record(&Caller::Unknown(Unknown::Gone), None, &denied), Ok(()));
    let me = nix::unistd::geteuid().as_raw();
    let pid = i32::try_from(std::process::id()).expect("pid");
    let mine = Caller::Known { uid: me, gid: None, pid: None, transport: Transport::Tcp };
    let lookup = Arc::new(ProcessLookup::new(me, Some(pid), None));
    lookup.start();
    assert_eq!(log.record(&mine, Some(lookup), &record), Ok(()));
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

fn errored<'a>(resource: &'a str, reason: Option<&'a str>) -> Record<'a> {
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
        on_demand: false,
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
    let log = AuditLog::open(&path, OnFailure::Drop).expect("open");
    let nasty: String = (0u32..0x20)
        .chain(0x7f..=0x9f)
        .chain([0x2028, 0x2029])
        .filter_map(char::from_u32)
        .flat_map(|c| ['x', c])
        .collect::<String>()
        + "\"\\end";
    let reason = format!("query parameter resource: {nasty}");
    let caller = Caller::Known { uid: 1001, gid: None, pid: None, transport: Transport::Tcp };
    assert_eq!(log.record(&caller, None, &errored(&nasty, Some(&reason))), Ok(()));
    drop(log);
    let (text, lines) = lines_of(&path, 1);
    let raw: Vec<String> = text
        .chars()
        .filter(|c| (c.is_control() && *c != '\n') || matches!(c, '\u{2028}' | '\u{2029}'))
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
    let log = AuditLog::open(&path, OnFailure::Drop).expect("open");
    // Two-byte characters, so that a cut at a fixed byte count would split one.
    let huge = "é".repeat(8000);
    let reason = format!("query parameter resource: {huge}");
    let caller = Caller::Unknown(Unknown::NotFound);
    assert_eq!(log.record(&caller, None, &errored(&huge, Some(&reason))), Ok(()));
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

/// A settings with short intervals, for tests.
fn quick(on_failure: OnFailure) -> Settings {
    Settings {
        on_failure,
        queue: QUEUE,
        process_wait: Duration::from_millis(50),
        summary_interval: Duration::from_millis(300),
        retry: Duration::from_millis(20),
    }
}

fn rate_limited() -> Record<'static> {
    Record {
        decision: "rate_limited",
        status: 429,
        reason: Some("rate limit exceeded: 20/s per caller"),
        ..errored("https://storage.azure.com", None)
    }
}

fn uid(n: u32) -> Caller {
    Caller::Known { uid: n, gid: None, pid: None, transport: Transport::Tcp }
}

/// The process fields are caller-controlled too (a process names its own command, executable path,
/// and the cgroup a user may create): escaped and capped like the rest.
#[test]
fn process_fields_are_escaped_and_capped() {
    let p = crate::process::Process {
        pid: 7,
        exe: Some(format!("/home/mallory/{}", "x".repeat(5000))),
        command: Some("evil\u{9b}2J\u{2028}".to_owned()),
        unit: Some(format!("{}.service", "u".repeat(300))),
        container: None,
    };
    let entry = Entry::new(&uid(1001), None, &errored("r", None), Instant::now());
    let mut out = Vec::new();
    render::line(&mut out, &entry, std::time::SystemTime::now(), Some("mallory"), render::ProcessSeen::Found(&p), None);
    let text = String::from_utf8(out).expect("utf-8");
    assert!(text.len() < 1200 && text.ends_with("}\n") && text.matches('\n').count() == 1, "{text}");
    let line: serde_json::Value = serde_json::from_str(&text).expect("json");
    let caller = &line["caller"];
    assert_eq!(caller["command"], "evil\u{9b}2J\u{2028}");
    assert!(text.contains("evil\\u009b2J\\u2028"), "{text}");
    assert!(caller["exe"].as_str().is_some_and(|e| e.ends_with("…(+4758 bytes)")), "{caller}");
    assert!(caller["unit"].as_str().is_some_and(|u| u.ends_with("…(+52 bytes)")), "{caller}");
    assert_eq!((&caller["pid"], &caller["user"], &caller["uid"]), (&7.into(), &"mallory".into(), &1001.into()));
}

/// Keys in alphabetical order (as the old writer's `serde_json::Value` wrote them: tooling that
/// matches text sees the same order), absent record fields as `null`.
#[test]
fn keys_are_in_alphabetical_order() {
    let entry = Entry::new(&Caller::Unknown(Unknown::NotFound), None, &errored("r", Some("no")), Instant::now());
    let mut out = Vec::new();
    render::line(&mut out, &entry, std::time::SystemTime::UNIX_EPOCH, None, render::ProcessSeen::NotAsked, None);
    let text = String::from_utf8(out).expect("utf-8");
    assert_eq!(
        text,
        "{\"cache\":null,\"caller\":{\"unknown\":\"no_such_socket\"},\"decision\":\"error\",\"dialect\":\"imds\",\
         \"identity\":\"default\",\"latency_ms\":0.5,\"reason\":\"no\",\"resource\":\"r\",\"rule\":null,\
         \"status\":400,\"time\":\"1970-01-01T00:00:00.000Z\",\"token\":null}\n"
    );
}

/// A lookup that cannot find the process (a pid that does not exist) leaves a mark rather than nothing.
#[test]
fn a_process_not_found_in_time_is_marked() {
    let d = tempfile::tempdir().expect("tempdir");
    let path = d.path().join("audit.jsonl");
    let log = AuditLog::with(&path, quick(OnFailure::Drop)).expect("open");
    let me = nix::unistd::geteuid().as_raw();
    let gone = Arc::new(ProcessLookup::new(me, Some(i32::MAX), None));
    gone.start();
    assert_eq!(log.record(&uid(me), Some(gone), &errored("r", None)), Ok(()));
    // Never started (as when the lookup queue is full or the budget spent).
    let skipped = Arc::new(ProcessLookup::new(me, Some(i32::MAX), None));
    assert_eq!(log.record(&uid(me), Some(skipped), &errored("r", None)), Ok(()));
    drop(log);
    let (_, lines) = lines_of(&path, 2);
    assert_eq!(lines[0]["caller"]["process"], "not_found", "{}", lines[0]);
    assert_eq!(lines[1]["caller"]["process"], "not_looked_up", "{}", lines[1]);
}

/// An attacker who floods the writer cannot make lines vanish unnoticed: the writer is blocked (its
/// file is a FIFO nobody reads — the stand-in for a disk that stalls), the queue fills, and every line
/// `record` did not accept is counted; every line it accepted is written once the reader drains it.
#[test]
fn a_full_queue_is_counted_and_said() {
    let d = tempfile::tempdir().expect("tempdir");
    let path = d.path().join("audit.fifo");
    let made = std::process::Command::new("mkfifo").arg(&path).status().expect("mkfifo (coreutils)");
    assert!(made.success());
    use std::os::unix::fs::OpenOptionsExt;
    // The read end first (non-blocking), so that the writer's open does not wait for a reader.
    let mut reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK)
        .open(&path)
        .expect("open the fifo's read end");
    let log = AuditLog::with(&path, Settings { queue: 8, ..quick(OnFailure::Drop) }).expect("open");
    let (mut accepted, mut refused) = (0u64, 0u64);
    let huge = "r".repeat(200);
    while refused < 50 {
        match log.record(&uid(1001), None, &errored(&huge, None)) {
            Ok(()) => accepted += 1,
            Err(NotAudited::QueueFull) => refused += 1,
            Err(e) => panic!("unexpected {e}"),
        }
        assert!(accepted < 100_000, "the queue never filled");
    }
    assert_eq!(log.counts().1, refused, "every refused line counted");
    let drain = std::thread::spawn(move || {
        use std::io::Read;
        let mut all = Vec::new();
        let mut buf = [0u8; 65536];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break all,
                Ok(n) => all.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("read: {e}"),
            }
        }
    });
    let counts = {
        let c = log.counts();
        drop(log);
        c
    };
    let text = String::from_utf8(drain.join().expect("reader")).expect("utf-8");
    assert_eq!(text.lines().count() as u64, accepted, "every accepted line written, once");
    assert_eq!(counts.1, refused);
}

/// A file that cannot be written (here `/dev/full`, through a symlink, as a full disk): the failure is
/// counted and the write retried; with `on_failure = "refuse"` `record` refuses while it lasts (the
/// request path answers 503), and once the file is writable again (the symlink points at a real file
/// and the log is reopened) what was accepted is written exactly once.
#[test]
fn a_failing_file_is_retried_and_refused_meanwhile() {
    for on_failure in [OnFailure::Refuse, OnFailure::Drop] {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("audit.jsonl");
        std::os::unix::fs::symlink("/dev/full", &path).expect("symlink");
        let log = AuditLog::with(&path, quick(on_failure)).expect("open");
        assert_eq!(log.refuses(), on_failure == OnFailure::Refuse);
        let (mut accepted, mut failing) = (0u64, 0u64);
        let deadline = Instant::now() + Duration::from_secs(5);
        while failing < 20 {
            match log.record(&uid(1001), None, &errored("r", None)) {
                Ok(()) => accepted += 1,
                Err(NotAudited::WriteFailing) => {
                    failing += 1;
                    // With "drop", the line is queued anyway and written if the file recovers.
                    if on_failure == OnFailure::Drop {
                        accepted += 1;
                    }
                }
                Err(e) => panic!("unexpected {e}"),
            }
            assert!(Instant::now() < deadline, "{on_failure:?}: the failure never showed");
            std::thread::sleep(Duration::from_millis(1));
        }
        let (written, _, dropped) = log.counts();
        assert_eq!(written, 0);
        let expect_dropped = if on_failure == OnFailure::Refuse { failing } else { 0 };
        assert_eq!(dropped, expect_dropped, "{on_failure:?}: refused lines counted as write_failed");
        // The disk is back: the path is a real file again.
        let real = d.path().join("real.jsonl");
        std::fs::write(&real, "").expect("create");
        std::fs::remove_file(&path).expect("unlink");
        std::os::unix::fs::symlink(&real, &path).expect("symlink");
        log.reopen();
        let deadline = Instant::now() + Duration::from_secs(5);
        while log.record(&uid(1001), None, &errored("r", None)).is_err() {
            assert!(Instant::now() < deadline, "{on_failure:?}: never writable again");
            if on_failure == OnFailure::Drop {
                accepted += 1;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        accepted += 1;
        drop(log);
        let text = std::fs::read_to_string(&real).expect("read");
        assert_eq!(text.lines().count() as u64, accepted, "{on_failure:?}: every accepted line, once");
        for l in text.lines() {
            serde_json::from_str::<serde_json::Value>(l).expect("whole JSON lines");
        }
    }
}

/// `reopen` (SIGHUP after a rotation renamed the file): lines before it are in the renamed file,
/// lines after in a new file created with mode 0640; none lost, none twice.
#[test]
fn reopen_follows_a_rename() {
    let d = tempfile::tempdir().expect("tempdir");
    let path = d.path().join("audit.jsonl");
    let rotated = d.path().join("audit.jsonl.1");
    let log = AuditLog::with(&path, quick(OnFailure::Drop)).expect("open");
    let mut sent = 0;
    for round in 0..3 {
        for _ in 0..100 {
            assert_eq!(log.record(&uid(1001), None, &errored("r", None)), Ok(()));
            sent += 1;
        }
        if round < 2 {
            let (text, _) = lines_of(&path, 100);
            assert_eq!(text.lines().count(), 100);
            std::fs::rename(&path, d.path().join(format!("audit.jsonl.{}", round + 1))).expect("rename");
            let ticket = log.reopen();
            let deadline = Instant::now() + Duration::from_secs(5);
            while !log.reopened(ticket) {
                assert!(Instant::now() < deadline, "not reopened");
                std::thread::sleep(Duration::from_millis(5));
            }
            assert!(path.exists(), "created again");
        }
    }
    drop(log);
    let total: usize = ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
        .iter()
        .map(|f| std::fs::read_to_string(d.path().join(f)).expect("read").lines().count())
        .sum();
    assert_eq!(total, sent);
    assert!(rotated.exists());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777, 0o640);
}

/// A flood of rate-limited requests writes, per caller (uid, or unknown) and interval, the first
/// line at once and one summary with the count after; other decisions keep their lines; what is
/// open at shutdown is written then. Every request is accounted for.
#[test]
fn rate_limited_floods_become_one_summary_per_caller_and_interval() {
    let d = tempfile::tempdir().expect("tempdir");
    let path = d.path().join("audit.jsonl");
    let log = AuditLog::with(&path, quick(OnFailure::Drop)).expect("open");
    let unknown = Caller::Unknown(Unknown::NotFound);
    for i in 0..50 {
        assert_eq!(log.record(&uid(1001), None, &rate_limited()), Ok(()));
        if i < 20 {
            assert_eq!(log.record(&unknown, None, &rate_limited()), Ok(()));
        }
        if i == 25 {
            assert_eq!(log.record(&uid(1001), None, &errored("r", None)), Ok(()));
        }
    }
    assert_eq!(log.record(&uid(1002), None, &rate_limited()), Ok(()));
    // The interval ends (300 ms): the summaries are written without further lines.
    let (_, lines) = lines_of(&path, 6);
    assert_eq!(lines.len(), 6, "{lines:?}");
    // A new interval; its summary is written at shutdown.
    for _ in 0..6 {
        assert_eq!(log.record(&uid(1001), None, &rate_limited()), Ok(()));
    }
    drop(log);
    let (text, lines) = lines_of(&path, 8);
    assert_eq!(lines.len(), 8, "{text}");
    let who = |l: &serde_json::Value| l["caller"]["uid"].as_u64().map_or("unknown".to_owned(), |u| u.to_string());
    let summary: Vec<(String, &str, Option<u64>)> =
        lines.iter().map(|l| (who(l), l["decision"].as_str().unwrap_or_default(), l["count"].as_u64())).collect();
    let s = |w: &str, d: &'static str, c: Option<u64>| (w.to_owned(), d, c);
    assert_eq!(
        summary,
        [
            s("1001", "rate_limited", None),
            s("unknown", "rate_limited", None),
            s("1001", "error", None),
            s("1002", "rate_limited", None),
            s("1001", "rate_limited", Some(49)),
            s("unknown", "rate_limited", Some(19)),
            s("1001", "rate_limited", None),
            s("1001", "rate_limited", Some(5)),
        ],
        "{text}"
    );
    let requests: u64 =
        lines.iter().filter(|l| l["decision"] == "rate_limited").map(|l| l["count"].as_u64().unwrap_or(1)).sum();
    assert_eq!(requests, 50 + 20 + 1 + 6);
    for l in lines.iter().filter(|l| l["count"].is_u64()) {
        let t = |k: &str| humantime::parse_rfc3339(l[k].as_str().expect("a time")).expect("rfc 3339");
        assert!(t("first") <= t("last") && l["time"] == l["first"], "{l}");
        assert_eq!((&l["status"], &l["resource"]), (&429.into(), &"https://storage.azure.com".into()));
    }
}

/// The longest line a caller can cause: every caller-controlled string long and made of characters
/// that escape to six bytes. Still bounded (under 16 KiB), however long the caller's input.
#[test]
fn the_worst_line_is_bounded() {
    let worst = "\u{1}".repeat(100_000);
    let p = crate::process::Process {
        pid: 7,
        exe: Some(worst.clone()),
        command: Some(worst.clone()),
        unit: Some(worst.clone()),
        container: Some(worst.clone()),
    };
    let record = Record { identity: Some(&worst), ..errored(&worst, Some(&worst)) };
    let entry = Entry::new(&uid(1001), None, &record, Instant::now());
    let mut out = Vec::new();
    render::line(&mut out, &entry, std::time::SystemTime::now(), Some(&worst), render::ProcessSeen::Found(&p), None);
    assert!(out.len() < 16 << 10, "{} bytes", out.len());
    let line: serde_json::Value = serde_json::from_slice(&out).expect("json");
    assert!(line["resource"].as_str().is_some_and(|r| r.ends_with(&format!("…(+{} bytes)", 100_000 - 256))));
}
