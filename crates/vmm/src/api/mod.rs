//! The operator control API: HTTP/1.1 with JSON bodies on a Unix socket
//! (`vpsci run --api-socket PATH`), and its client (`vpsci ctl`).
//!
//! | piece | module |
//! |---|---|
//! | wire types shared by server and client | [`types`] |
//! | request handling: route, decode, act, answer (pure, no sockets) | [`handle`], [`VmApi`] |
//! | the live VM behind it: run state, pause/resume, power actions, wake | [`live`] |
//! | the event log fanned out to streams | [`hub`] |
//! | the socket: `tiny_http` server thread, one thread per event stream and per migration | [`server`] |
//! | the client and `vpsci ctl` | [`client`], [`ctl`] |
//!
//! The HTTP server is `tiny_http` (crates.io): synchronous, small, listens on
//! Unix sockets (`Server::http_unix`), and parses requests itself, so we do not.
//! Firecracker's and cloud-hypervisor's `micro_http` is not published on
//! crates.io, and the crates.io `micro-http` is an unrelated async server; a
//! hyper/tokio stack would bring an async runtime into a VMM whose every other
//! thread is plain. The client parses responses with `httparse` and decodes
//! chunked bodies with `chunked_transfer` (the crate `tiny_http` encodes them
//! with).
//!
//! Nothing here runs on a vCPU thread or takes a lock a vCPU thread waits for
//! longer than a few field reads: `info` reads the engine's lock-free power
//! states and counters, a pause waits on [`crate::vcpu::VmControl`]'s condition
//! variable (bounded), and the event log hands lines to streams with a
//! non-blocking send.

pub mod client;
pub mod ctl;
mod handler;
pub mod hub;
pub mod live;
pub mod server;
pub mod types;

pub use handler::{handle, runs_long, EventStream, Reply, VmApi};
