//! Where a migration goes: `unix:PATH` or `tcp:ADDR:PORT`, and the stream
//! between the two processes.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

/// A migration endpoint as the command line spells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `unix:PATH`: a Unix stream socket on this host.
    Unix(PathBuf),
    /// `tcp:ADDR:PORT`: a TCP address (`127.0.0.1:4444`, `[::1]:4444`).
    Tcp(String),
}

impl std::str::FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Endpoint, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path (unix:PATH)".to_owned());
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = s.strip_prefix("tcp:") {
            let port_ok = addr
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok {
                return Err(format!("{s:?}: expected tcp:ADDR:PORT"));
            }
            return Ok(Endpoint::Tcp(addr.to_owned()));
        }
        Err(format!(
            "{s:?}: a migration endpoint is unix:PATH or tcp:ADDR:PORT"
        ))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
            Endpoint::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

/// A connected migration stream (either kind).
#[derive(Debug)]
pub enum Stream {
    /// Over a Unix socket.
    Unix(UnixStream),
    /// Over TCP.
    Tcp(TcpStream),
}

impl Stream {
    /// Connects to `endpoint`, waiting at most `limit` for a TCP peer.
    pub fn connect(endpoint: &Endpoint, limit: Duration) -> std::io::Result<Stream> {
        match endpoint {
            Endpoint::Unix(path) => UnixStream::connect(path).map(Stream::Unix),
            Endpoint::Tcp(addr) => {
                // Bounded: an address that drops packets must not hang the API.
                let mut last = None;
                for target in addr.to_socket_addrs()? {
                    match TcpStream::connect_timeout(&target, limit) {
                        Ok(s) => {
                            s.set_nodelay(true)?;
                            return Ok(Stream::Tcp(s));
                        }
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "the address resolves to nothing",
                    )
                }))
            }
        }
    }

    /// Every read and write fails after `limit` without progress (a peer
    /// that hangs is a failed migration, not a hung process).
    pub fn set_timeout(&self, limit: Duration) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => {
                s.set_read_timeout(Some(limit))?;
                s.set_write_timeout(Some(limit))
            }
            Stream::Tcp(s) => {
                s.set_read_timeout(Some(limit))?;
                s.set_write_timeout(Some(limit))
            }
        }
    }

    /// Shuts both directions of the connection down (the peer reads EOF).
    pub fn shutdown(&self) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

/// Listens on `endpoint` and takes exactly one connection. A Unix socket
/// file nobody listens on is replaced; anything else at the path is refused.
/// The socket file is removed once the connection is taken.
pub fn accept_one(endpoint: &Endpoint) -> Result<Stream, String> {
    match endpoint {
        Endpoint::Unix(path) => {
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                if !meta.file_type().is_socket() {
                    return Err(format!("--listen {endpoint}: exists and is not a socket"));
                }
                if UnixStream::connect(path).is_ok() {
                    return Err(format!(
                        "--listen {endpoint}: another process is listening on it"
                    ));
                }
                std::fs::remove_file(path).map_err(|e| {
                    format!("--listen {endpoint}: cannot remove the stale socket: {e}")
                })?;
            }
            let listener = UnixListener::bind(path)
                .map_err(|e| format!("--listen {endpoint}: cannot listen: {e}"))?;
            let accepted = listener.accept();
            let _ = std::fs::remove_file(path);
            accepted
                .map(|(s, _)| Stream::Unix(s))
                .map_err(|e| format!("--listen {endpoint}: accept failed: {e}"))
        }
        Endpoint::Tcp(addr) => {
            let listener = TcpListener::bind(addr.as_str())
                .map_err(|e| format!("--listen {endpoint}: cannot listen: {e}"))?;
            let (s, _) = listener
                .accept()
                .map_err(|e| format!("--listen {endpoint}: accept failed: {e}"))?;
            s.set_nodelay(true)
                .map_err(|e| format!("--listen {endpoint}: {e}"))?;
            Ok(Stream::Tcp(s))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_print_back_the_same() {
        for text in ["unix:/tmp/m.sock", "tcp:127.0.0.1:4444", "tcp:[::1]:80"] {
            let e: Endpoint = text.parse().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(e.to_string(), text);
        }
        for bad in [
            "unix:",
            "tcp:127.0.0.1",
            "tcp::80",
            "tcp:host:99999",
            "/tmp/x",
            "http://a",
        ] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad} was accepted");
        }
    }
}
