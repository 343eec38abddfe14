//! The JSON text of one line, written straight into the writer's buffer (no intermediate value), keys
//! in alphabetical order. Strings are escaped beyond what JSON requires: every C0 and C1 control, DEL,
//! U+2028 and U+2029 becomes `\uXXXX`, so no line splitter sees a line end inside a line.

use std::io::Write as _;
use std::time::SystemTime;

use super::FIELD_CAP;
use super::entry::{Entry, Text, capped};
use crate::caller::{Caller, Transport, Unknown};
use crate::process::Process;

/// What is known of the caller's process.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ProcessSeen<'a> {
    /// No lookup was asked for (or a summary line).
    NotAsked,
    /// Found in time.
    Found(&'a Process),
    /// Not finished in time, or no process found.
    Unavailable(&'static str),
}

/// The fields of a rate-limit summary line.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Summary {
    /// Requests it stands for.
    pub(crate) count: u64,
    /// When the first and the last of them were queued.
    pub(crate) first: SystemTime,
    pub(crate) last: SystemTime,
}

/// Appends the line for `entry` (ending in `\n`) to `out`.
pub(crate) fn line(
    out: &mut Vec<u8>,
    entry: &Entry,
    time: SystemTime,
    user: Option<&str>,
    process: ProcessSeen<'_>,
    summary: Option<&Summary>,
) {
    let text = |which| entry.text(which);
    out.extend_from_slice(b"{\"cache\":");
    option_str(out, entry.cache);
    out.extend_from_slice(b",\"caller\":");
    caller(out, &entry.caller, user, process);
    if let Some(s) = summary {
        let _ = write!(out, ",\"count\":{}", s.count);
    }
    out.extend_from_slice(b",\"decision\":");
    string(out, entry.decision);
    out.extend_from_slice(b",\"dialect\":");
    string(out, entry.dialect);
    if let Some(s) = summary {
        out.extend_from_slice(b",\"first\":");
        timestamp(out, s.first);
    }
    out.extend_from_slice(b",\"identity\":");
    option_capped(out, text(Text::Identity));
    if let Some(s) = summary {
        out.extend_from_slice(b",\"last\":");
        timestamp(out, s.last);
    }
    out.extend_from_slice(b",\"latency_ms\":");
    if entry.latency_ms.is_finite() {
        let _ = write!(out, "{}", entry.latency_ms);
    } else {
        out.extend_from_slice(b"null");
    }
    if entry.on_demand {
        out.extend_from_slice(b",\"on_demand\":true");
    }
    out.extend_from_slice(b",\"reason\":");
    option_capped(out, text(Text::Reason));
    out.extend_from_slice(b",\"resource\":");
    option_capped(out, text(Text::Resource));
    out.extend_from_slice(b",\"rule\":");
    match entry.rule {
        Some(r) => {
            let _ = write!(out, "{r}");
        }
        None => out.extend_from_slice(b"null"),
    }
    let _ = write!(out, ",\"status\":{},\"time\":", entry.status);
    timestamp(out, time);
    out.extend_from_slice(b",\"token\":");
    option_capped(out, text(Text::Token));
    out.extend_from_slice(b"}\n");
}

/// The `caller` object, keys in alphabetical order.
fn caller(out: &mut Vec<u8>, caller: &Caller, user: Option<&str>, process: ProcessSeen<'_>) {
    let mut obj = Object::new(out);
    let found = match process {
        ProcessSeen::Found(p) => Some(p),
        _ => None,
    };
    if let Some(p) = found {
        obj.capped("command", p.command.as_deref());
        obj.capped("container", p.container.as_deref());
        obj.capped("exe", p.exe.as_deref());
    }
    let (uid, gid, pid, transport, unknown) = match caller {
        Caller::Known { uid, gid, pid, transport } => (Some(*uid), *gid, *pid, Some(*transport), None),
        Caller::Unknown(why) => (None, None, None, None, Some(*why)),
    };
    if let Some(gid) = gid {
        obj.number("gid", gid);
    }
    if let Some(pid) = found.map(|p| p.pid).or(pid) {
        obj.number("pid", pid);
    }
    if let ProcessSeen::Unavailable(why) = process {
        obj.string("process", why);
    }
    if let Some(t) = transport {
        obj.string(
            "transport",
            match t {
                Transport::Tcp => "tcp",
                Transport::Unix => "unix",
            },
        );
    }
    if let Some(uid) = uid {
        obj.number("uid", uid);
    }
    if let Some(p) = found {
        obj.capped("unit", p.unit.as_deref());
    }
    if let Some(why) = unknown {
        obj.string(
            "unknown",
            match why {
                Unknown::Gone => "socket_gone",
                Unknown::NotFound => "no_such_socket",
                Unknown::LookupFailed => "lookup_failed",
            },
        );
    }
    obj.capped("user", user);
    obj.out.push(b'}');
}

/// A JSON object being written: a comma before every key but the first.
struct Object<'a> {
    out: &'a mut Vec<u8>,
    empty: bool,
}

impl<'a> Object<'a> {
    fn new(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        Self { out, empty: true }
    }

    fn key(&mut self, key: &str) {
        if !self.empty {
            self.out.push(b',');
        }
        self.empty = false;
        string(self.out, key);
        self.out.push(b':');
    }

    fn number(&mut self, key: &str, n: impl std::fmt::Display) {
        self.key(key);
        let _ = write!(self.out, "{n}");
    }

    fn string(&mut self, key: &str, s: &str) {
        self.key(key);
        string(self.out, s);
    }

    /// A string field cut at [`FIELD_CAP`], left out when absent.
    fn capped(&mut self, key: &str, s: Option<&str>) {
        if let Some(s) = s {
            self.key(key);
            let (kept, cut) = capped(s, FIELD_CAP);
            capped_string(self.out, kept, cut);
        }
    }
}

fn timestamp(out: &mut Vec<u8>, t: SystemTime) {
    let _ = write!(out, "\"{}\"", humantime::format_rfc3339_millis(t));
}

fn option_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => string(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

fn option_capped(out: &mut Vec<u8>, s: Option<(&str, usize)>) {
    match s {
        Some((kept, cut)) => capped_string(out, kept, cut),
        None => out.extend_from_slice(b"null"),
    }
}

fn string(out: &mut Vec<u8>, s: &str) {
    capped_string(out, s, 0);
}

/// `kept` as a JSON string, marked `…(+cut bytes)` when something was cut.
fn capped_string(out: &mut Vec<u8>, kept: &str, cut: usize) {
    out.push(b'"');
    escape(out, kept);
    if cut > 0 {
        let _ = write!(out, "…(+{cut} bytes)");
    }
    out.push(b'"');
}

/// Appends `s` JSON-escaped, with every control (C0, DEL, C1) and U+2028/U+2029 as `\uXXXX`.
pub(crate) fn escape(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let b = s.as_bytes();
    let (mut start, mut i) = (0, 0);
    while i < b.len() {
        // (code point, its length in bytes) of a character to write as \uXXXX.
        let escaped: Option<(u32, usize)> = match b[i] {
            c @ (b'"' | b'\\') => {
                out.extend_from_slice(&b[start..i]);
                out.extend_from_slice(&[b'\\', c]);
                i += 1;
                start = i;
                continue;
            }
            c @ (0x00..=0x1f | 0x7f) => Some((u32::from(c), 1)),
            // U+0080..U+009F are C2 80..C2 9F; the second byte is the code point.
            0xc2 => match b.get(i + 1) {
                Some(&c @ 0x80..=0x9f) => Some((u32::from(c), 2)),
                _ => None,
            },
            // U+2028 and U+2029 are E2 80 A8 and E2 80 A9.
            0xe2 => match (b.get(i + 1), b.get(i + 2)) {
                (Some(0x80), Some(&c @ (0xa8 | 0xa9))) => Some((0x2028 + u32::from(c - 0xa8), 3)),
                _ => None,
            },
            _ => None,
        };
        match escaped {
            Some((cp, len)) => {
                out.extend_from_slice(&b[start..i]);
                let nibble = |shift: u32| HEX[((cp >> shift) & 0xf) as usize];
                out.extend_from_slice(&[b'\\', b'u', nibble(12), nibble(8), nibble(4), nibble(0)]);
                i += len;
                start = i;
            }
            None => i += 1,
        }
    }
    out.extend_from_slice(&b[start..]);
}
