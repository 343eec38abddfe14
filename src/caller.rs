//! Who is asking, as the kernel says, resolved once per connection before its first request is read:
//! - **unix socket**: `SO_PEERCRED` (uid, gid, pid of the process that connected);
//! - **loopback TCP**: a netlink `sock_diag` *exact lookup* of the client's own socket (its address and
//!   port, ours as the peer), which answers uid and inode in microseconds without privilege. Not
//!   `/proc/net/tcp` (the kernel walks its whole table) and not `SO_PEERCRED` (meaningless on TCP).
//!
//! The exact lookup is not exact: when no connected socket has the 4-tuple asked for, the kernel
//! answers with a *listening* socket on the client's address and port if there is one (it looks the
//! tuple up as it would an arriving packet). A client in another network namespace — a container's
//! root binds any source port — connecting from port 22 would be answered with sshd's `0.0.0.0:22`
//! listener, owned by root. So an answer counts only when it is a connected client socket whose whole
//! 4-tuple (both addresses, both ports; v4-mapped IPv6 compared as the IPv4 address it is) is the
//! accepted connection's, seen from the other end ([`judge`]).
//!
//! A socket that is already gone answers uid 0 with inode 0 (a time-wait entry); that, an answer that
//! is not the client's socket (a listener, another tuple), an error or no answer (a caller in another
//! network namespace) is an **unknown** caller — never root.

use std::fmt;
use std::io;
use std::net::SocketAddr;

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{
    AF_INET, AF_INET6, IPPROTO_TCP, TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_TIME_WAIT,
};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, InetResponseHeader, SocketId, StateFlags};
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
    /// The kernel has no connected socket with the connection's 4-tuple in tokend's network namespace
    /// (e.g. a caller in another one); it may have answered with another socket, such as a listener on
    /// the client's port, which is not the caller.
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
            Ok(Some(answer)) => judge(&answer, peer, local),
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

/// The kernel's answer about one TCP socket: its state, its two ends, its owner and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Answer {
    /// `TCP_ESTABLISHED`, `TCP_LISTEN`, …
    state: u8,
    /// The socket's own address and port.
    source: SocketAddr,
    /// The address and port it is connected to (unspecified, port 0, for a listener).
    destination: SocketAddr,
    uid: u32,
    inode: u32,
}

impl From<&InetResponseHeader> for Answer {
    fn from(h: &InetResponseHeader) -> Self {
        let id = &h.socket_id;
        Self {
            state: h.state,
            source: SocketAddr::new(id.source_address, id.source_port),
            destination: SocketAddr::new(id.destination_address, id.destination_port),
            uid: h.uid,
            inode: h.inode,
        }
    }
}

/// The states a client's socket can be in when tokend looks it up — after `accept`, before reading the
/// first request, so before tokend has sent anything, let alone a FIN:
/// - `ESTABLISHED`: tokend's `accept` returned, so the client's final ACK arrived, which it sends on
///   entering `ESTABLISHED` (tokend does not enable TCP Fast Open, which would accept on the SYN, while
///   the client is still `SYN_SENT`);
/// - `FIN_WAIT1`, `FIN_WAIT2`: the client already shut down its sending side after its request
///   (`shutdown(SHUT_WR)`, as `nc -N` and some HTTP/1.0 clients do) or closed its socket; it is still
///   the caller's socket. One closed and then left as a time-wait entry answers uid 0 and inode 0.
///
/// Never `LISTEN` (a listener, not a client), `SYN_SENT`/`SYN_RECV` (not connected), `CLOSE_WAIT`,
/// `LAST_ACK`, `CLOSING` (each means the client got a FIN that tokend has not sent).
const CONNECTED: [u8; 3] = [TCP_ESTABLISHED, TCP_FIN_WAIT1, TCP_FIN_WAIT2];

/// Whether two ends are the same: address and port, a v4-mapped IPv6 address being its IPv4 address
/// (the kernel answers an IPv4 socket in IPv4 for a lookup in v4-mapped IPv6, as a dual-stack listener
/// sees IPv4 clients).
fn same_end(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && a.ip().to_canonical() == b.ip().to_canonical()
}

/// The caller an answer tells, and the client socket's inode when it is known: the owner of a connected
/// client socket whose source is our `peer` and whose destination is our `local` address, and nobody
/// else — not a listener on the client's port, not a socket of another tuple.
fn judge(answer: &Answer, peer: SocketAddr, local: SocketAddr) -> (Caller, Option<u32>) {
    if !same_end(answer.source, peer) || !same_end(answer.destination, local) {
        tracing::debug!(
            %peer, %local, state = answer.state, source = %answer.source, destination = %answer.destination,
            "sock_diag answered with another socket than the client's; the caller is unknown"
        );
        return (Caller::Unknown(Unknown::NotFound), None);
    }
    if answer.state == TCP_TIME_WAIT || (answer.uid == 0 && answer.inode == 0) {
        return (Caller::Unknown(Unknown::Gone), None);
    }
    if !CONNECTED.contains(&answer.state) {
        tracing::debug!(%peer, state = answer.state, "the client's socket is not connected; the caller is unknown");
        return (Caller::Unknown(Unknown::NotFound), None);
    }
    let inode = (answer.inode != 0).then_some(answer.inode);
    (Caller::Known { uid: answer.uid, gid: None, pid: None, transport: Transport::Tcp }, inode)
}

/// One exact `SOCK_DIAG_BY_FAMILY` request for the client socket; the kernel's answer, which [`judge`]
/// must check, or `None` when it has no socket to answer with (`ENOENT`).
fn exact_lookup(socket: &mut Socket, peer: SocketAddr, local: SocketAddr) -> io::Result<Option<Answer>> {
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
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => Ok(Some(Answer::from(&r.header))),
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

    /// A client that sent its request and shut down its sending side (`FIN_WAIT2`) is still the caller.
    #[tokio::test]
    async fn a_half_closed_client_is_still_its_user() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
        let (server, peer) = listener.accept().await.expect("accept");
        client.write_all(b"GET / HTTP/1.0\r\n\r\n").await.expect("write");
        client.shutdown().await.expect("shutdown(SHUT_WR)");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let (caller, inode) = TcpCallers::default().lookup(peer, server.local_addr().expect("local"));
        let uid = nix::unistd::geteuid().as_raw();
        assert_eq!(caller, Caller::Known { uid, gid: None, pid: None, transport: Transport::Tcp });
        assert!(inode.is_some(), "the client socket's inode");
    }

    #[test]
    fn only_a_connected_socket_with_the_whole_4_tuple_is_the_caller() {
        use netlink_packet_sock_diag::constants::{TCP_CLOSE_WAIT, TCP_LISTEN, TCP_SYN_RECV, TCP_SYN_SENT};
        let a = |s: &str| s.parse::<SocketAddr>().expect("address");
        let (peer, local) = (a("10.0.0.2:22"), a("10.0.0.1:50342"));
        let client = Answer { state: TCP_ESTABLISHED, source: peer, destination: local, uid: 1001, inode: 77 };
        let known = (Caller::Known { uid: 1001, gid: None, pid: None, transport: Transport::Tcp }, Some(77));
        let not_found = (Caller::Unknown(Unknown::NotFound), None);
        let gone = (Caller::Unknown(Unknown::Gone), None);
        let cases = [
            ("the client's socket", client, known),
            ("half-closed after its request", Answer { state: TCP_FIN_WAIT1, ..client }, known),
            ("half-closed, acknowledged", Answer { state: TCP_FIN_WAIT2, ..client }, known),
            ("closed, still draining", Answer { state: TCP_FIN_WAIT1, inode: 0, ..client }, (known.0, None)),
            // What the kernel answers for a tuple nobody has: the listener on the client's port.
            (
                "a wildcard listener",
                Answer { state: TCP_LISTEN, source: a("0.0.0.0:22"), destination: a("0.0.0.0:0"), uid: 0, inode: 9 },
                not_found,
            ),
            ("a listener given the tuple", Answer { state: TCP_LISTEN, ..client }, not_found),
            ("another source port", Answer { source: a("10.0.0.2:23"), ..client }, not_found),
            ("another source address", Answer { source: a("10.0.0.3:22"), ..client }, not_found),
            ("another destination port", Answer { destination: a("10.0.0.1:50343"), ..client }, not_found),
            ("another destination address", Answer { destination: a("10.0.0.9:50342"), ..client }, not_found),
            ("not connected yet", Answer { state: TCP_SYN_SENT, ..client }, not_found),
            ("a server's half-open socket", Answer { state: TCP_SYN_RECV, ..client }, not_found),
            ("told of a FIN tokend never sent", Answer { state: TCP_CLOSE_WAIT, ..client }, not_found),
            ("a time-wait entry", Answer { state: TCP_TIME_WAIT, uid: 0, inode: 0, ..client }, gone),
            ("a time-wait entry in FIN_WAIT2", Answer { state: TCP_FIN_WAIT2, uid: 0, inode: 0, ..client }, gone),
        ];
        for (what, answer, expected) in cases {
            assert_eq!(judge(&answer, peer, local), expected, "{what}");
        }
        // IPv6, and IPv4 as a dual-stack listener sees it: the kernel answers in IPv4.
        let (peer6, local6) = (a("[fd00::2]:22"), a("[fd00::1]:50342"));
        let client6 = Answer { source: peer6, destination: local6, ..client };
        assert_eq!(judge(&client6, peer6, local6), known);
        assert_eq!(judge(&Answer { source: a("[fd00::3]:22"), ..client6 }, peer6, local6), not_found);
        assert_eq!(
            judge(&Answer { source: a("[::]:22"), destination: a("[::]:0"), ..client6 }, peer6, local6),
            not_found
        );
        let (mapped_peer, mapped_local) = (a("[::ffff:10.0.0.2]:22"), a("[::ffff:10.0.0.1]:50342"));
        assert_eq!(judge(&client, mapped_peer, mapped_local), known, "v4-mapped is the IPv4 address");
        assert_eq!(judge(&Answer { source: mapped_peer, destination: mapped_local, ..client }, peer, local), known);
        assert_eq!(judge(&client, a("[::ffff:10.0.0.3]:22"), mapped_local), not_found);
        // `::10.0.0.2` (IPv4-compatible, deprecated) is not 10.0.0.2.
        assert_eq!(judge(&client, a("[::10.0.0.2]:22"), mapped_local), not_found);
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
