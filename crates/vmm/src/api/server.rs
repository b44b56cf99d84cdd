//! The API's socket: a `tiny_http` server on a Unix socket, one thread taking
//! requests one after another (each answered at once, a pause within its
//! bound, a snapshot once written), one thread per open event stream, and one
//! per `PUT /vm/migrate` ([`runs_long`]), which answers when its migration
//! ends while the server thread goes on with the other requests. Before the
//! server thread ends it waits for those answers: a VMM that stops because
//! its VM migrated away still tells the client so.
//!
//! `tiny_http` parses the HTTP itself; a request it cannot parse (no request
//! line, broken headers) it answers with its own bodiless 400 and never hands
//! to us. Everything it hands over gets [`handle`]'s typed answer.

use std::io::{Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use thiserror::Error;

use super::handler::{handle, runs_long, EventStream, Reply, VmApi};
use super::types::MAX_BODY;

/// The API socket could not be set up.
#[derive(Debug, Error)]
pub enum ApiServerError {
    /// Something other than a dead socket is at the path.
    #[error("--api-socket {}: {reason}", path.display())]
    PathInUse {
        /// The path.
        path: PathBuf,
        /// What is there.
        reason: &'static str,
    },
    /// Listening failed.
    #[error("--api-socket {}: cannot listen: {reason}", path.display())]
    Listen {
        /// The path.
        path: PathBuf,
        /// What the OS or the server said.
        reason: String,
    },
}

/// A running API server; dropping it stops the server thread and removes the
/// socket file.
pub struct ApiServer {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ApiServer {
    /// Listens on `path` and serves `vm`. A socket file nobody listens on
    /// (left by a process that died) is replaced; a live socket or any other
    /// file is refused.
    pub fn start(path: &Path, vm: Arc<dyn VmApi>) -> Result<ApiServer, ApiServerError> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            let in_use = |reason| ApiServerError::PathInUse {
                path: path.to_owned(),
                reason,
            };
            if !meta.file_type().is_socket() {
                return Err(in_use("exists and is not a socket"));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(in_use("another process is listening on it"));
            }
            std::fs::remove_file(path)
                .map_err(|_| in_use("a stale socket that cannot be removed"))?;
        }
        let server = tiny_http::Server::http_unix(path).map_err(|e| ApiServerError::Listen {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let server = Arc::new(server);
        let serving = Arc::clone(&server);
        let thread = std::thread::Builder::new()
            .name("api".to_owned())
            .spawn(move || serve(&serving, &vm))
            .map_err(|e| ApiServerError::Listen {
                path: path.to_owned(),
                reason: format!("cannot start the server thread: {e}"),
            })?;
        Ok(ApiServer {
            server,
            thread: Some(thread),
            path: path.to_owned(),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(server: &tiny_http::Server, vm: &Arc<dyn VmApi>) {
    let mut long: Vec<JoinHandle<()>> = Vec::new();
    for request in server.incoming_requests() {
        long.retain(|t| !t.is_finished());
        if runs_long(request.method().as_str(), request.url()) {
            long.extend(answer_on_own_thread(request, vm));
        } else {
            answer(request, vm.as_ref());
        }
    }
    for t in long {
        let _ = t.join();
    }
}

/// Answers `request` on a new thread and returns it; if none can be started,
/// answers it here (other requests then wait, as they did before).
fn answer_on_own_thread(
    request: tiny_http::Request,
    vm: &Arc<dyn VmApi>,
) -> Option<JoinHandle<()>> {
    // The request goes over a channel so that it is still ours when the
    // thread cannot be started.
    let (tx, rx) = mpsc::channel::<tiny_http::Request>();
    let serving = Arc::clone(vm);
    let spawned = std::thread::Builder::new()
        .name("api-migrate".to_owned())
        .spawn(move || {
            if let Ok(request) = rx.recv() {
                answer(request, serving.as_ref());
            }
        });
    let unsent = match spawned {
        Ok(thread) => match tx.send(request) {
            Ok(()) => return Some(thread),
            Err(mpsc::SendError(request)) => request,
        },
        Err(_) => request,
    };
    answer(unsent, vm.as_ref());
    None
}

fn answer(mut request: tiny_http::Request, vm: &dyn VmApi) {
    let mut body = Vec::new();
    // One byte more than allowed is enough to tell that it is too long.
    let read = request
        .as_reader()
        .take(MAX_BODY as u64 + 1)
        .read_to_end(&mut body);
    let reply = match read {
        Ok(_) => handle(vm, request.method().as_str(), request.url(), &body),
        Err(e) => Reply::error(super::types::ApiError::new(
            super::types::ErrorKind::InvalidRequest,
            format!("cannot read the body: {e}"),
        )),
    };
    match reply {
        Reply::Json {
            status,
            body,
            allow,
        } => {
            let mut response = tiny_http::Response::from_data(body).with_status_code(status);
            add_header(&mut response, "Content-Type", "application/json");
            if let Some(allow) = allow {
                add_header(&mut response, "Allow", allow);
            }
            // The client may be gone already: nothing to tell it then.
            let _ = request.respond(response);
        }
        Reply::Events(stream) => {
            let writer = request.into_writer();
            let spawned = std::thread::Builder::new()
                .name("api-events".to_owned())
                .spawn(move || stream_events(writer, &stream));
            // Without a thread the writer is dropped and the client sees the
            // connection close.
            drop(spawned);
        }
    }
}

/// Adds a header of ours (ASCII constants, which tiny_http always accepts).
fn add_header<R: Read>(response: &mut tiny_http::Response<R>, name: &str, value: &str) {
    if let Ok(h) = tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()) {
        response.add_header(h);
    }
}

/// Writes the stream's lines as a chunked body, one chunk per line sent at
/// once, until the session ends (the channel closes) or the client goes away.
/// `tiny_http`'s own response writer copies a body through an 8 KiB buffer
/// without flushing between reads, so a live stream takes the raw connection
/// and writes the status line and headers itself.
fn stream_events(mut writer: Box<dyn Write + Send>, stream: &EventStream) {
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n\
                Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
    if writer.write_all(head.as_bytes()).is_err() || writer.flush().is_err() {
        return;
    }
    let mut body = chunked_transfer::Encoder::with_flush_after_write(writer);
    for line in stream.lines.iter() {
        if body.write_all(&line).is_err() || body.get_mut().flush().is_err() {
            return;
        }
    }
    if stream.lagged() {
        let note = b"{\"kind\":\"stream_lagged\",\"message\":\"this stream fell behind and was cut off; lines were lost\"}\n";
        let _ = body.write_all(note);
    }
    // Dropping the encoder writes the last (empty) chunk.
    drop(body);
}
