//! The API's client side (what `vpsci ctl` and the tests use): one request per
//! connection over the Unix socket, the response head parsed with `httparse`,
//! a chunked body decoded with `chunked_transfer`, JSON with the shared
//! [`types`](super::types).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use super::types::{
    Action, ActionDone, ApiError, MigrateDone, MigrateRequest, SnapshotDone, SnapshotRequest,
    VmInfo,
};

/// The longest response head the client accepts.
const MAX_HEAD: usize = 16 * 1024;
/// The longest non-streamed body the client accepts.
const MAX_RESPONSE: u64 = 16 * 1024 * 1024;

/// Why a request did not get an answer of the expected type.
#[derive(Debug, Error)]
pub enum ClientError {
    /// Nobody listens on the socket.
    #[error("cannot connect to {}: {source}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The connection failed mid-way.
    #[error("connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// The answer is not the HTTP/JSON the API sends.
    #[error("unexpected answer: {0}")]
    BadResponse(String),
    /// The VMM refused the request with a typed error.
    #[error("{} ({}): {}", error.kind.name(), status, error.message)]
    Api {
        /// HTTP status.
        status: u16,
        /// The error the VMM gave.
        error: ApiError,
    },
}

/// A response: status and a reader over its (decoded) body.
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// The body, de-chunked if it was chunked.
    pub body: Box<dyn BufRead>,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Response")
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// A client of one API socket.
#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
    timeout: Option<Duration>,
}

impl Client {
    /// A client of the socket at `path`; requests wait for answers as long as
    /// `timeout` (none: forever, for event streams).
    pub fn new(path: &Path, timeout: Option<Duration>) -> Client {
        Client {
            path: path.to_owned(),
            timeout,
        }
    }

    /// Sends one request (`Connection: close`) and reads the response head.
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> Result<Response, ClientError> {
        let mut stream =
            UnixStream::connect(&self.path).map_err(|source| ClientError::Connect {
                path: self.path.clone(),
                source,
            })?;
        stream.set_read_timeout(self.timeout)?;
        stream.set_write_timeout(self.timeout)?;
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Content-Length: {}\r\n",
            body.len()
        );
        if !body.is_empty() {
            request.push_str("Content-Type: application/json\r\n");
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes())?;
        stream.write_all(body)?;
        read_response(BufReader::new(stream))
    }

    /// `GET /vm`.
    pub fn info(&self) -> Result<VmInfo, ClientError> {
        json(self.request("GET", "/vm", b"")?)
    }

    /// `PUT /vm/actions` with `action`.
    pub fn act(&self, action: Action) -> Result<ActionDone, ClientError> {
        let body = serde_json::to_vec(&action)
            .map_err(|e| ClientError::BadResponse(format!("cannot encode the action: {e}")))?;
        json(self.request("PUT", "/vm/actions", &body)?)
    }

    /// `PUT /vm/snapshot`: writes a snapshot of the VM into `dir` (on the VMM's host).
    pub fn snapshot(&self, dir: &Path) -> Result<SnapshotDone, ClientError> {
        let body = serde_json::to_vec(&SnapshotRequest {
            dir: dir.to_path_buf(),
        })
        .map_err(|e| ClientError::BadResponse(format!("cannot encode the request: {e}")))?;
        json(self.request("PUT", "/vm/snapshot", &body)?)
    }

    /// `PUT /vm/migrate`: sends the VM to another vpsci (docs/migration.md);
    /// answers once Go was sent and the destination confirmed (or did not:
    /// `confirmed: false`, the VM paused here), or the migration failed.
    pub fn migrate(&self, request: &MigrateRequest) -> Result<MigrateDone, ClientError> {
        let body = serde_json::to_vec(request)
            .map_err(|e| ClientError::BadResponse(format!("cannot encode the request: {e}")))?;
        json(self.request("PUT", "/vm/migrate", &body)?)
    }

    /// `GET /events`: hands each line to `line` until the stream ends or `line`
    /// returns false.
    pub fn events(&self, mut line: impl FnMut(&str) -> bool) -> Result<(), ClientError> {
        let response = self.request("GET", "/events", b"")?;
        if response.status != 200 {
            return Err(api_error(response));
        }
        for text in response.body.lines() {
            if !line(&text?) {
                break;
            }
        }
        Ok(())
    }
}

fn read_response(mut reader: BufReader<UnixStream>) -> Result<Response, ClientError> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let before = head.len();
        let n = (&mut reader)
            .take((MAX_HEAD - head.len()) as u64)
            .read_until(b'\n', &mut head)?;
        if n == 0 {
            return Err(ClientError::BadResponse(if before == 0 {
                "the connection closed without an answer".to_owned()
            } else {
                "the response head is cut short or too long".to_owned()
            }));
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Response::new(&mut headers);
    match parsed.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => {
            return Err(ClientError::BadResponse(
                "incomplete response head".to_owned(),
            ))
        }
        Err(e) => return Err(ClientError::BadResponse(format!("bad response head: {e}"))),
    }
    let status = parsed.code.unwrap_or(0);
    let value = |name: &str| {
        parsed
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
    };
    let chunked = value("transfer-encoding").is_some_and(|v| v.contains("chunked"));
    let length = value("content-length").and_then(|v| v.parse::<u64>().ok());
    let body: Box<dyn BufRead> = if chunked {
        Box::new(BufReader::new(chunked_transfer::Decoder::new(reader)))
    } else {
        Box::new(reader.take(length.unwrap_or(MAX_RESPONSE).min(MAX_RESPONSE)))
    };
    Ok(Response { status, body })
}

fn api_error(mut response: Response) -> ClientError {
    let mut text = Vec::new();
    if let Err(e) = response.body.read_to_end(&mut text) {
        return ClientError::Io(e);
    }
    match serde_json::from_slice::<ApiError>(&text) {
        Ok(error) => ClientError::Api {
            status: response.status,
            error,
        },
        Err(_) => ClientError::BadResponse(format!(
            "status {} with a body that is not an API error ({} bytes)",
            response.status,
            text.len()
        )),
    }
}

fn json<T: serde::de::DeserializeOwned>(mut response: Response) -> Result<T, ClientError> {
    if response.status != 200 {
        return Err(api_error(response));
    }
    let mut text = Vec::new();
    response.body.read_to_end(&mut text)?;
    serde_json::from_slice(&text)
        .map_err(|e| ClientError::BadResponse(format!("the answer does not decode: {e}")))
}
