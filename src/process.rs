//! Which process is on the other end of a connection — pid, executable, systemd unit, container — for the
//! audit log. Looked up at most once per connection, started when the connection is accepted, and never
//! waited for by a request: the audit writer adds what was found by the time it writes the line.
//!
//! - **unix socket**: the pid comes with `SO_PEERCRED`; it is checked against reuse (the process must
//!   belong to the caller's uid and have started before the connection was accepted).
//! - **TCP**: the pid is found from the client socket's inode (from `sock_diag`) among the caller uid's
//!   processes only (`/proc/<pid>/fd`), the processes that held that uid's last sockets first, and the
//!   process's start time is read before and after, so a pid reused meanwhile is dropped rather than
//!   reported.
//!
//! **Bounded work.** The kernel offers no socket → process map, so a TCP lookup walks `/proc`, and its
//! cost grows with the number of processes on the host: a caller must not be able to spend that on
//! tokend's behalf without limit. Lookups run on one thread of their own ([`LOOKUP_THREADS`]), never on
//! Tokio's blocking pool (which also resolves the IdP's name), from a short queue ([`QUEUE`]), within a
//! budget per uid ([`PER_UID`]) and overall ([`OVERALL`]). A lookup that finds the queue full or its
//! budget spent is not done: the audit line says `"process":"not_looked_up"` rather than waiting.
//!
//! What the kernel lets tokend read limits what it learns: `/proc/<pid>/fd` and `/proc/<pid>/exe` of
//! another user need root or `CAP_SYS_PTRACE`; `/proc/<pid>/cgroup` and `comm` are world-readable.
//! Anything not readable is left out of the line, never guessed.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU32;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Instant;

/// Threads that look processes up (one: the work is bounded, not parallel).
pub(crate) const LOOKUP_THREADS: usize = 1;
/// Lookups waiting for the thread at most; more are not done.
pub(crate) const QUEUE: usize = 32;
/// Lookups started per second per uid (and the burst).
pub(crate) const PER_UID: u32 = 50;
/// Lookups started per second in all (and the burst).
pub(crate) const OVERALL: u32 = 200;

/// A process, as far as it could be read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Process {
    /// Its pid (in tokend's pid namespace).
    pub(crate) pid: i32,
    /// `/proc/<pid>/exe`, when readable.
    pub(crate) exe: Option<String>,
    /// `/proc/<pid>/comm`: the command name, readable by anyone.
    pub(crate) command: Option<String>,
    /// The systemd unit (service or scope) from its cgroup, when it is in one.
    pub(crate) unit: Option<String>,
    /// The container id from its cgroup (docker, podman, containerd, CRI-O), when it is in one.
    pub(crate) container: Option<String>,
}

/// Where a connection's lookup stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome<'a> {
    /// Queued or running.
    Pending,
    /// Done: the process.
    Found(&'a Process),
    /// Done: no process of the caller's uid holds the socket any more (or it was not readable).
    NotFound,
    /// Not done: the queue was full or the caller's (or everyone's) lookup budget was spent.
    NotLookedUp,
}

const NEW: u8 = 0;
const QUEUED: u8 = 1;
const DONE: u8 = 2;
const SKIPPED: u8 = 3;

/// The process of one connection, looked up at most once.
#[derive(Debug)]
pub(crate) struct ProcessLookup {
    uid: u32,
    /// From `SO_PEERCRED` (unix socket).
    pid: Option<i32>,
    /// The client socket's inode (TCP).
    inode: Option<u32>,
    /// When the connection was accepted, in clock ticks since boot (the unit of a process's start time).
    accepted: Option<u64>,
    state: AtomicU8,
    found: OnceLock<Option<Process>>,
}

impl ProcessLookup {
    /// A lookup for a connection accepted just now from `uid`, knowing its pid or its socket's inode.
    pub(crate) fn new(uid: u32, pid: Option<i32>, inode: Option<u32>) -> Self {
        Self { uid, pid, inode, accepted: now_ticks(), state: AtomicU8::new(NEW), found: OnceLock::new() }
    }

    /// Queues the lookup on the lookup thread, within the budgets; never blocks. A lookup that does not
    /// fit is marked not looked up, and `false` says so (the caller counts it).
    pub(crate) fn start(self: &Arc<Self>) -> bool {
        if self.state.compare_exchange(NEW, QUEUED, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return true;
        }
        let queued = Pool::get().is_some_and(|pool| pool.submit(self));
        if !queued {
            self.state.store(SKIPPED, Ordering::Release);
        }
        queued
    }

    /// The process, looked up on this thread now if nobody has (it blocks on `/proc`: call it from a
    /// thread that may block). Concurrent callers wait for the first one's answer.
    pub(crate) fn resolve(&self) -> Option<&Process> {
        self.found.get_or_init(|| self.find(&mut Hints::default())).as_ref()
    }

    /// Where the lookup stands now.
    pub(crate) fn outcome(&self) -> Outcome<'_> {
        match self.state.load(Ordering::Acquire) {
            SKIPPED => Outcome::NotLookedUp,
            _ => match self.found.get() {
                Some(Some(p)) => Outcome::Found(p),
                Some(None) => Outcome::NotFound,
                None if self.state.load(Ordering::Acquire) == NEW => Outcome::NotLookedUp,
                None => Outcome::Pending,
            },
        }
    }

    /// The process if the lookup finished (or finishes) before `deadline`; waits for a queued or running
    /// lookup, never starts one.
    pub(crate) fn wait_until(&self, deadline: Instant) -> Option<&Process> {
        let (lock, done) = &FINISHED;
        let mut guard = lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            match self.outcome() {
                Outcome::Found(p) => return Some(p),
                Outcome::NotFound | Outcome::NotLookedUp => return None,
                Outcome::Pending => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            guard = done.wait_timeout(guard, deadline - now).unwrap_or_else(std::sync::PoisonError::into_inner).0;
        }
    }

    fn find(&self, hints: &mut Hints) -> Option<Process> {
        let proc = Path::new("/proc");
        match (self.pid, self.inode) {
            (Some(pid), _) if pid > 0 => {
                let started = start_time(proc, pid)?;
                // A process that started after the connection was accepted is not the one that connected.
                if self.accepted.is_some_and(|now| started > now) || owner(proc, pid) != Some(self.uid) {
                    tracing::debug!(pid, "the connection's pid now belongs to another process");
                    return None;
                }
                let p = hints.describe(proc, pid, started);
                (start_time(proc, pid) == Some(started)).then_some(p)
            }
            (_, Some(inode)) if inode != 0 => find_by_socket(proc, self.uid, inode, hints),
            _ => None,
        }
    }
}

/// Signalled whenever a queued lookup finishes (one waiter in practice: the audit writer).
static FINISHED: (Mutex<()>, Condvar) = (Mutex::new(()), Condvar::new());

/// The lookup thread's queue and budgets.
struct Pool {
    tx: SyncSender<Arc<ProcessLookup>>,
    per_uid: governor::DefaultKeyedRateLimiter<u32>,
    overall: governor::DefaultDirectRateLimiter,
}

impl Pool {
    /// The pool, started on first use; `None` if its thread could not be started (then nothing is
    /// looked up, and every line says so).
    fn get() -> Option<&'static Self> {
        static POOL: OnceLock<Option<Pool>> = OnceLock::new();
        POOL.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
            let rx = Arc::new(Mutex::new(rx));
            let started = (0..LOOKUP_THREADS).all(|i| {
                let rx = Arc::clone(&rx);
                std::thread::Builder::new().name(format!("tokend-process-{i}")).spawn(move || run(&rx)).is_ok()
            });
            let rate = |n: u32| governor::Quota::per_second(NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN));
            started.then(|| Self {
                tx,
                per_uid: governor::RateLimiter::keyed(rate(PER_UID)),
                overall: governor::RateLimiter::direct(rate(OVERALL)),
            })
        })
        .as_ref()
    }

    fn submit(&self, lookup: &Arc<ProcessLookup>) -> bool {
        // The uid's budget first: one caller's burst does not spend everyone's.
        self.per_uid.check_key(&lookup.uid).is_ok()
            && self.overall.check().is_ok()
            && self.tx.try_send(Arc::clone(lookup)).is_ok()
    }
}

/// The lookup thread: one lookup at a time, with what it learnt from the last ones.
fn run(rx: &Mutex<Receiver<Arc<ProcessLookup>>>) {
    let mut hints = Hints::default();
    loop {
        let next = rx.lock().unwrap_or_else(std::sync::PoisonError::into_inner).recv();
        let Ok(lookup) = next else { return };
        lookup.found.get_or_init(|| lookup.find(&mut hints));
        lookup.state.store(DONE, Ordering::Release);
        let (lock, done) = &FINISHED;
        drop(lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        done.notify_all();
    }
}

/// What the lookup thread keeps between lookups, to make the next one cheap: the processes that held
/// each uid's last sockets (a client usually opens many connections), and the descriptions of recent
/// processes (by pid and start time, so a reused pid is a new process).
#[derive(Default)]
struct Hints {
    recent: HashMap<u32, VecDeque<i32>>,
    described: HashMap<(i32, u64), Process>,
}

/// Recent processes remembered per uid.
const RECENT: usize = 4;
/// Descriptions remembered in all (forgotten together when full).
const DESCRIBED: usize = 256;

impl Hints {
    fn remember(&mut self, uid: u32, pid: i32) {
        if self.recent.len() > 1024 {
            self.recent.clear();
        }
        let pids = self.recent.entry(uid).or_default();
        pids.retain(|p| *p != pid);
        pids.push_front(pid);
        pids.truncate(RECENT);
    }

    fn describe(&mut self, proc: &Path, pid: i32, started: u64) -> Process {
        if let Some(p) = self.described.get(&(pid, started)) {
            return p.clone();
        }
        if self.described.len() >= DESCRIBED {
            self.described.clear();
        }
        let p = describe(proc, pid);
        self.described.insert((pid, started), p.clone());
        p
    }
}

/// Whether `/proc/<pid>/fd` holds the socket `target` (`socket:[inode]`).
fn holds(proc: &Path, pid: i32, target: &str) -> bool {
    let Ok(fds) = std::fs::read_dir(proc.join(format!("{pid}/fd"))) else { return false };
    fds.flatten().any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == target))
}

/// The process of `uid` holding the socket `inode`, re-checked after it is described.
fn find_by_socket(proc: &Path, uid: u32, inode: u32, hints: &mut Hints) -> Option<Process> {
    let target = format!("socket:[{inode}]");
    let recent: Vec<i32> = hints.recent.get(&uid).map(|r| r.iter().copied().collect()).unwrap_or_default();
    let mut pids: Vec<i32> = std::fs::read_dir(proc)
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .filter(|pid| !recent.contains(pid))
        .collect();
    // Newest first: a client has usually just started (pids wrap, so this is a heuristic only).
    pids.sort_unstable_by(|a, b| b.cmp(a));
    for pid in recent.into_iter().chain(pids) {
        if owner(proc, pid) != Some(uid) {
            continue;
        }
        let Some(started) = start_time(proc, pid) else { continue };
        if holds(proc, pid, &target) {
            let p = hints.describe(proc, pid, started);
            hints.remember(uid, pid);
            return (start_time(proc, pid) == Some(started)).then_some(p);
        }
    }
    None
}

fn describe(proc: &Path, pid: i32) -> Process {
    let dir = proc.join(pid.to_string());
    let exe = std::fs::read_link(dir.join("exe")).ok().map(|p| p.to_string_lossy().into_owned());
    let command = std::fs::read_to_string(dir.join("comm")).ok().map(|s| s.trim_end().to_owned());
    let (unit, container) =
        std::fs::read_to_string(dir.join("cgroup")).map(|c| from_cgroup(&c)).unwrap_or((None, None));
    Process { pid, exe, command, unit, container }
}

/// The uid that owns `/proc/<pid>` (the process's effective uid).
fn owner(proc: &Path, pid: i32) -> Option<u32> {
    std::fs::metadata(proc.join(pid.to_string())).ok().map(|m| m.uid())
}

/// Field 22 of `/proc/<pid>/stat`: the start time in clock ticks since boot.
fn start_time(proc: &Path, pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(proc.join(format!("{pid}/stat"))).ok()?;
    parse_start_time(&stat)
}

fn parse_start_time(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Clock ticks since boot now (`CLOCK_BOOTTIME`, the clock of `/proc/<pid>/stat`).
fn now_ticks() -> Option<u64> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).ok()?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok()??;
    let hz = u64::try_from(hz).ok()?;
    let secs = u64::try_from(now.tv_sec()).ok()?;
    let nanos = u64::try_from(now.tv_nsec()).ok()?;
    // Rounded up: a process started in the current tick counts as started before now.
    Some(secs * hz + (nanos * hz).div_ceil(1_000_000_000))
}

/// The systemd unit and the container id in `/proc/<pid>/cgroup` (v2, or v1's systemd hierarchy).
fn from_cgroup(text: &str) -> (Option<String>, Option<String>) {
    let path = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .or_else(|| text.lines().find_map(|l| l.split_once(":name=systemd:").map(|(_, p)| p)))
        .unwrap_or("");
    let mut container = None;
    let mut unit = None;
    for part in path.split('/').rev() {
        if container.is_none()
            && let Some(id) = container_id(part)
        {
            container = Some(id.to_owned());
            continue;
        }
        if unit.is_none() && (part.ends_with(".service") || part.ends_with(".scope")) {
            unit = Some(part.to_owned());
        }
    }
    (unit, container)
}

/// A 64-hex-digit container id in one cgroup path component: `docker-ID.scope`, `libpod-ID.scope`,
/// `crio-ID.scope`, `cri-containerd-ID.scope`, or a bare `ID` (cgroupfs driver).
fn container_id(part: &str) -> Option<&str> {
    let part = part.strip_suffix(".scope").unwrap_or(part);
    let id = part.rsplit('-').next()?;
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f4e2b1a0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f";

    #[test]
    fn units_and_containers_come_from_the_cgroup_path() {
        let cases = [
            ("0::/system.slice/ci-agent.service\n", (Some("ci-agent.service"), None)),
            ("0::/user.slice/user-1000.slice/session-4.scope\n", (Some("session-4.scope"), None)),
            (
                "0::/user.slice/user-1000.slice/user@1000.service/app.slice/build.service\n",
                (Some("build.service"), None),
            ),
            (&format!("0::/system.slice/docker-{ID}.scope\n"), (None, Some(ID))),
            (&format!("0::/machine.slice/libpod-{ID}.scope/container\n"), (None, Some(ID))),
            (
                &format!(
                    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-{ID}.scope\n"
                ),
                (None, Some(ID)),
            ),
            (&format!("12:pids:/docker/{ID}\n1:name=systemd:/docker/{ID}\n"), (None, Some(ID))),
            ("0::/\n", (None, None)),
            ("", (None, None)),
        ];
        for (text, (unit, container)) in cases {
            let (u, c) = from_cgroup(text);
            assert_eq!((u.as_deref(), c.as_deref()), (unit, container), "{text}");
        }
    }

    #[test]
    fn the_start_time_survives_odd_command_names() {
        let stat = "4242 (a) b (c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_start_time(stat), Some(987_654));
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn this_process_is_found_by_pid_and_by_socket_inode() {
        let uid = nix::unistd::geteuid().as_raw();
        let pid = i32::try_from(std::process::id()).expect("pid");
        let me = ProcessLookup::new(uid, Some(pid), None);
        let found = me.resolve().expect("this process");
        assert_eq!(found.pid, pid);
        assert_eq!(found.exe.as_deref(), std::env::current_exe().ok().as_deref().and_then(Path::to_str));
        // Another uid's claim on this pid is refused: the pid "belongs to another process".
        assert_eq!(ProcessLookup::new(uid.wrapping_add(1), Some(pid), None).resolve(), None);
        // A process that started after the connection was accepted is not the one that connected.
        let early = ProcessLookup { accepted: Some(0), ..ProcessLookup::new(uid, Some(pid), None) };
        assert_eq!(early.resolve(), None);

        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let inode =
            std::fs::metadata(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&client))).expect("fd").ino();
        let by_socket = ProcessLookup::new(uid, None, Some(u32::try_from(inode).expect("inode")));
        assert_eq!(by_socket.resolve().map(|p| p.pid), Some(pid));
        assert_eq!(ProcessLookup::new(uid, None, Some(1)).resolve(), None, "nobody holds socket 1");
    }
}
