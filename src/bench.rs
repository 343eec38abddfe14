//! Entry points for the benchmarks in `benches/` (not a stable API): the per-connection caller lookups,
//! which are private to the crate otherwise.

use std::net::SocketAddr;

use crate::caller::{Caller, TcpCallers};
use crate::process::ProcessLookup;

/// The `sock_diag` lookup the accept loop does for every TCP connection.
#[derive(Debug, Default)]
pub struct TcpLookup(TcpCallers);

impl TcpLookup {
    /// The uid and socket inode of the client socket `peer` connected to `local`, if known.
    pub fn lookup(&self, peer: SocketAddr, local: SocketAddr) -> Option<(u32, u32)> {
        match self.0.lookup(peer, local) {
            (Caller::Known { uid, .. }, Some(inode)) => Some((uid, inode)),
            _ => None,
        }
    }
}

/// The pid of `uid`'s process holding socket `inode`, found as the audit log does (one fresh lookup).
pub fn process_of_socket(uid: u32, inode: u32) -> Option<i32> {
    ProcessLookup::new(uid, None, Some(inode)).resolve().map(|p| p.pid)
}

/// What the request path does to the metrics for one served token: count the request and the cache hit.
pub fn count_served_request() {
    let m = crate::metrics::get();
    m.request(crate::metrics::Route::Imds, 0, 200);
    m.served(true);
}
