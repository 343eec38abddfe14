//! Who is asking, as the kernel says, resolved once per connection before its first request is read:
//! - **unix socket**: `SO_PEERCRED` (uid, gid, pid of the process that connected);
//! - **loopback TCP**: a netlink `sock_diag` *exact lookup* of the client's own socket (its address and
//!   port, ours as the peer), which answers uid and inode in microseconds without privilege. Not
//!   `/proc/net/tcp` (the kernel walks its whole table) and not `SO_PEERCRED` (meaningless on TCP).
//!
//! A socket that is already gone answers uid 0 with inode 0 (a time-wait entry); that, an error or no
//! answer (a caller in another network namespace) is an **unknown** caller — never root.

use std::fmt;
use std::io;
use std::net::SocketAddr;

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;
use netlink_sys::{Socket, SocketAddr as NetlinkAddr};
use parking_lot::Mutex;

/// How the caller reached tokend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    /// Loopback (or opted-in) TCP.
    Tcp,
    /// The unix socket.
    Unix,
}

/// The kernel's word on who is on the other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Caller {
    /// A local user; the pid is known over the unix socket only.
    Known {
        /// The user id that owns the client's socket.
        uid: u32,
        /// Its group id (unix socket only).
        gid: Option<u32>,
        /// The process that connected (unix socket only).
        pid: Option<i32>,
        /// How it connected.
        transport: Transport,
    },
    /// Not identified; never treated as root.
    Unknown(Unknown),
}

/// Why a caller could not be identified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unknown {
    /// The client's socket is already gone (the kernel reports uid 0, inode 0).
    Gone,
    /// The kernel has no such socket in tokend's network namespace (e.g. a caller in another one).
    NotFound,
    /// The lookup itself failed.
    LookupFailed,
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Known { uid, pid: Some(pid), .. } => write!(f, "uid {uid} (pid {pid})"),
            Self::Known { uid, .. } => write!(f, "uid {uid}"),
            Self::Unknown(why) => write!(f, "unknown ({why:?})"),
        }
    }
}

impl Caller {
    /// The caller of a unix socket connection, from `SO_PEERCRED`.
    pub(crate) fn of_unix(stream: &tokio::net::UnixStream) -> Self {
        match stream.peer_cred() {
            Ok(cred) => {
                Self::Known { uid: cred.uid(), gid: Some(cred.gid()), pid: cred.pid(), transport: Transport::Unix }
            }
            Err(e) => {
                tracing::debug!(error = %e, "SO_PEERCRED failed");
                Self::Unknown(Unknown::LookupFailed)
            }
        }
    }
}

/// Looks up TCP callers with `sock_diag`: one netlink socket, reused.
#[derive(Debug, Default)]
pub(crate) struct TcpCallers {
    socket: Mutex<Option<Socket>>,
}

impl TcpCallers {
    /// The owner of the client socket `peer` connected to our `local` address, and that socket's inode
    /// when the caller is known.
    pub(crate) fn lookup(&self, peer: SocketAddr, local: SocketAddr) -> (Caller, Option<u32>) {
        let mut guard = self.socket.lock();
        let answer = match guard.as_mut() {
            Some(socket) => exact_lookup(socket, peer, local),
            None => Err(io::Error::other("no socket yet")),
        };
        let answer = match answer {
            Ok(a) => Ok(a),
            // A fresh socket (the first lookup, or after an error that may have left the old one unusable).
            Err(_) => open().and_then(|mut socket| {
                let a = exact_lookup(&mut socket, peer, local);
                *guard = Some(socket);
                a
            }),
        };
        match answer {
            Ok(Some((0, 0))) => (Caller::Unknown(Unknown::Gone), None),
            Ok(Some((uid, inode))) => {
                (Caller::Known { uid, gid: None, pid: None, transport: Transport::Tcp }, Some(inode))
            }
            Ok(None) => (Caller::Unknown(Unknown::NotFound), None),
            Err(e) => {
                tracing::debug!(%peer, error = %e, "sock_diag lookup failed");
                (Caller::Unknown(Unknown::LookupFailed), None)
            }
        }
    }
}

fn open() -> io::Result<Socket> {
    let mut socket = Socket::new(NETLINK_SOCK_DIAG)?;
    socket.bind_auto()?;
    socket.connect(&NetlinkAddr::new(0, 0))?;
    Ok(socket)
}

/// One exact `SOCK_DIAG_BY_FAMILY` request: `(uid, inode)` of the client socket, `None` when the kernel
/// has no such socket (`ENOENT`).
fn exact_lookup(socket: &mut Socket, peer: SocketAddr, local: SocketAddr) -> io::Result<Option<(u32, u32)>> {
    let family = if peer.is_ipv4() { AF_INET } else { AF_INET6 };
    let mut socket_id = if peer.is_ipv4() { SocketId::new_v4() } else { SocketId::new_v6() };
    // The client's socket: its source is the peer, its destination is us.
    socket_id.source_address = peer.ip();
    socket_id.source_port = peer.port();
    socket_id.destination_address = local.ip();
    socket_id.destination_port = local.port();
    socket_id.cookie = [0xff; 8]; // INET_DIAG_NOCOOKIE
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST;
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id,
        })
        .into(),
    );
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf);
    socket.send(&buf, 0)?;
    let mut answer = vec![0; 8192];
    let n = socket.recv(&mut &mut answer[..], 0)?;
    let reply = NetlinkMessage::<SockDiagMessage>::deserialize(&answer[..n])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
    match reply.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => Ok(Some((r.header.uid, r.header.inode))),
        NetlinkPayload::Error(e) if e.code.is_some_and(|c| c.get() == -2) => Ok(None), // ENOENT
        NetlinkPayload::Error(e) => Err(io::Error::other(format!("sock_diag: {e}"))),
        other => Err(io::Error::other(format!("sock_diag: unexpected answer {other:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_loopback_tcp_caller_is_this_processs_user() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = tokio::net::TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
        let (server, peer) = listener.accept().await.expect("accept");
        let callers = TcpCallers::default();
        let uid = nix::unistd::geteuid().as_raw();
        let (caller, inode) = callers.lookup(peer, server.local_addr().expect("local"));
        assert_eq!(caller, Caller::Known { uid, gid: None, pid: None, transport: Transport::Tcp });
        assert!(inode.is_some_and(|i| i != 0), "the client socket's inode");
        // Reused socket, same answer.
        assert_eq!(callers.lookup(peer, server.local_addr().expect("local")), (caller, inode));
        // A port nobody uses: no such socket.
        let nobody = SocketAddr::from(([127, 0, 0, 1], 9));
        assert_eq!(
            callers.lookup(nobody, server.local_addr().expect("local")),
            (Caller::Unknown(Unknown::NotFound), None)
        );
        drop(client);
    }

    /// The kernel answers an exact lookup of a 4-tuple that no connected socket has with a *listening*
    /// socket on the client's port, if there is one; its owner is not the caller. Only a netlink query:
    /// no packet goes to the TEST-NET addresses asked about.
    #[tokio::test]
    async fn a_listener_on_the_clients_port_is_not_the_caller() {
        let local = SocketAddr::from(([127, 0, 0, 1], 50342));
        let callers = TcpCallers::default();
        for wildcard in ["0.0.0.0:0", "[::]:0"] {
            let listener = std::net::TcpListener::bind(wildcard).expect("bind");
            let port = listener.local_addr().expect("addr").port();
            let (peer, local) = if wildcard.starts_with('[') {
                (
                    SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, 2], port)),
                    SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1], 50342)),
                )
            } else {
                (SocketAddr::from(([192, 0, 2, 2], port)), local)
            };
            assert_eq!(callers.lookup(peer, local), (Caller::Unknown(Unknown::NotFound), None), "{wildcard}");
            // And as a dual-stack listener sees an IPv4 client: v4-mapped addresses.
            if wildcard.starts_with('[') {
                let mapped =
                    |ip: [u8; 4], port| SocketAddr::new(std::net::Ipv4Addr::from(ip).to_ipv6_mapped().into(), port);
                assert_eq!(
                    callers.lookup(mapped([192, 0, 2, 2], port), mapped([192, 0, 2, 1], 50342)),
                    (Caller::Unknown(Unknown::NotFound), None),
                    "v4-mapped"
                );
            }
        }
    }

    #[tokio::test]
    async fn a_socket_that_is_gone_is_an_unknown_caller_never_root() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let client = tokio::net::TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
        let (mut server, peer) = listener.accept().await.expect("accept");
        let local = server.local_addr().expect("local");
        // The client closes first, then we do: its socket is left in TIME_WAIT (uid 0, inode 0).
        drop(client);
        let mut buf = [0u8; 1];
        assert_eq!(server.read(&mut buf).await.expect("eof"), 0);
        drop(server);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(TcpCallers::default().lookup(peer, local), (Caller::Unknown(Unknown::Gone), None));
    }

    #[tokio::test]
    async fn a_unix_caller_has_uid_gid_and_pid() {
        let (a, _b) = tokio::net::UnixStream::pair().expect("pair");
        let caller = Caller::of_unix(&a);
        assert_eq!(
            caller,
            Caller::Known {
                uid: nix::unistd::geteuid().as_raw(),
                gid: Some(nix::unistd::getegid().as_raw()),
                pid: Some(i32::try_from(std::process::id()).expect("pid")),
                transport: Transport::Unix,
            }
        );
        assert!(caller.to_string().starts_with("uid "), "{caller}");
    }
}
