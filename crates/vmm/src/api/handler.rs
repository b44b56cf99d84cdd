//! One request in, one answer out, with no socket in sight: the server feeds
//! it what `tiny_http` parsed, the tests and the fuzz target call it directly.
//! Routes come from [`ROUTES`]; every failure is an [`ApiError`] whose kind
//! fixes the status; a refused request changes nothing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use super::types::{
    Action, ActionDone, ApiError, ErrorKind, MigrateDone, MigrateRequest, SnapshotDone,
    SnapshotRequest, VmInfo, MAX_BODY, ROUTES,
};

/// What the server needs from the VM (the live session, or a test's fake).
pub trait VmApi: Send + Sync {
    /// The VM as it is now (always answers, also once the VM stopped).
    fn info(&self) -> VmInfo;
    /// Carries `action` out, or refuses it changing nothing.
    fn act(&self, action: Action) -> Result<ActionDone, ApiError>;
    /// A new stream of event log lines from now on.
    fn subscribe(&self) -> Result<EventStream, ApiError>;
    /// Writes a snapshot of the VM into `request.dir` (`PUT /vm/snapshot`).
    fn snapshot(&self, request: &SnapshotRequest) -> Result<SnapshotDone, ApiError>;
    /// Sends the VM to another vpsci (`PUT /vm/migrate`); on success this VM
    /// has stopped for good, on an error it runs on as it was. Called on a
    /// thread of its own ([`runs_long`]), concurrently with the other methods,
    /// which must keep answering meanwhile.
    fn migrate(&self, request: &MigrateRequest) -> Result<MigrateDone, ApiError>;
}

/// Event log lines for one `GET /events` client, each a complete JSON line.
#[derive(Debug)]
pub struct EventStream {
    /// The lines; the sender side closes when the VM's session ends.
    pub lines: Receiver<Arc<[u8]>>,
    /// Set when the stream fell behind and was cut off (lines were lost).
    pub lagged: Arc<AtomicBool>,
    /// Cleared when this stream is dropped, so its slot is freed.
    pub alive: Arc<AtomicBool>,
}

impl EventStream {
    /// Whether the stream was cut off for falling behind.
    pub fn lagged(&self) -> bool {
        self.lagged.load(Ordering::Relaxed)
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::Relaxed);
    }
}

/// The answer to one request.
#[derive(Debug)]
pub enum Reply {
    /// A JSON body with this status.
    Json {
        /// HTTP status.
        status: u16,
        /// The body (a result type or an [`ApiError`]).
        body: Vec<u8>,
        /// For a 405, the methods the route takes.
        allow: Option<&'static str>,
    },
    /// `200` and a chunked stream of JSON lines.
    Events(EventStream),
}

impl Reply {
    fn ok<T: serde::Serialize>(value: &T) -> Reply {
        Reply::Json {
            status: 200,
            // The answer types hold strings, numbers, enums and string-keyed maps,
            // which always serialise.
            body: serde_json::to_vec(value).unwrap_or_default(),
            allow: None,
        }
    }

    /// The reply carrying `error` with its kind's status.
    pub fn error(error: ApiError) -> Reply {
        Reply::Json {
            status: error.kind.status(),
            // An ApiError always serialises (two plain fields).
            body: serde_json::to_vec(&error).unwrap_or_default(),
            allow: None,
        }
    }

    /// The status code.
    pub fn status(&self) -> u16 {
        match self {
            Reply::Json { status, .. } => *status,
            Reply::Events(_) => 200,
        }
    }
}

/// Whether a request may run for long (a migration: seconds to minutes), so
/// the server answers it on a thread of its own and goes on answering the
/// others meanwhile ([`VmApi::migrate`] holds no lock while it runs).
pub fn runs_long(method: &str, url: &str) -> bool {
    method == "PUT" && url.split('?').next() == Some("/vm/migrate")
}

/// Handles one request: `method` and `url` as the request line gave them,
/// `body` as read (the server reads at most [`MAX_BODY`] + 1 bytes, so a
/// longer body is seen as too long).
pub fn handle(vm: &dyn VmApi, method: &str, url: &str, body: &[u8]) -> Reply {
    // A query string selects nothing here.
    let path = url.split('?').next().unwrap_or(url);
    if !ROUTES.iter().any(|&(_, p)| p == path) {
        return Reply::error(ApiError::new(
            ErrorKind::NotFound,
            format!(
                "no route {path:?} (routes: /vm, /vm/actions, /events, /vm/snapshot, /vm/migrate)"
            ),
        ));
    }
    let Some(&(allowed, _)) = ROUTES.iter().find(|&&(m, p)| p == path && m == method) else {
        let allow = ROUTES
            .iter()
            .find(|&&(_, p)| p == path)
            .map_or("GET", |&(m, _)| m);
        let mut reply = Reply::error(ApiError::new(
            ErrorKind::MethodNotAllowed,
            format!("{path} takes {allow}, not {method}"),
        ));
        if let Reply::Json { allow: a, .. } = &mut reply {
            *a = Some(allow);
        }
        return reply;
    };
    if body.len() > MAX_BODY {
        return Reply::error(ApiError::new(
            ErrorKind::BodyTooLarge,
            format!("the body is longer than {MAX_BODY} bytes"),
        ));
    }
    if allowed == "GET" && !body.is_empty() {
        return Reply::error(ApiError::new(
            ErrorKind::InvalidRequest,
            format!("GET {path} takes no body"),
        ));
    }
    match path {
        "/vm" => Reply::ok(&vm.info()),
        "/vm/actions" => match parse_action(body) {
            Ok(action) => match vm.act(action) {
                Ok(done) => Reply::ok::<ActionDone>(&done),
                Err(e) => Reply::error(e),
            },
            Err(e) => Reply::error(e),
        },
        "/events" => match vm.subscribe() {
            Ok(stream) => Reply::Events(stream),
            Err(e) => Reply::error(e),
        },
        "/vm/snapshot" => match serde_json::from_slice::<SnapshotRequest>(body) {
            Ok(request) => match vm.snapshot(&request) {
                Ok(done) => Reply::ok::<SnapshotDone>(&done),
                Err(e) => Reply::error(e),
            },
            Err(e) => Reply::error(ApiError::new(
                ErrorKind::InvalidRequest,
                format!("not a snapshot request: {e} (expected {{\"dir\": \"PATH\"}})")
                    .replace('\n', " "),
            )),
        },
        "/vm/migrate" => match serde_json::from_slice::<MigrateRequest>(body) {
            Ok(request) => match vm.migrate(&request) {
                Ok(done) => Reply::ok::<MigrateDone>(&done),
                Err(e) => Reply::error(e),
            },
            Err(e) => Reply::error(ApiError::new(
                ErrorKind::InvalidRequest,
                format!(
                    "not a migrate request: {e} (expected {{\"to\": \"unix:PATH|tcp:ADDR:PORT\"}})"
                )
                .replace('\n', " "),
            )),
        },
        _ => Reply::error(ApiError::new(
            ErrorKind::NotFound,
            format!("no route {path:?}"),
        )),
    }
}

/// Decodes an action body: bad JSON and JSON that is not an action are told apart.
fn parse_action(body: &[u8]) -> Result<Action, ApiError> {
    serde_json::from_slice::<Action>(body).map_err(|e| {
        use serde_json::error::Category;
        let actions: Vec<&str> = Action::ALL.iter().map(|a| a.name()).collect();
        match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => ApiError::new(
                ErrorKind::MalformedJson,
                format!("the body is not valid JSON: {e}"),
            ),
            Category::Data => ApiError::new(
                ErrorKind::InvalidRequest,
                format!(
                    "not an action: {e} (expected {{\"action\": one of {}}})",
                    actions.join(", ")
                ),
            ),
        }
    })
}
