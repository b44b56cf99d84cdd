//! The migration stream's frames and messages (docs/migration.md, "Wire
//! format"). Everything here is plain data over `Read`/`Write`, so the
//! framing and every corruption case are tested without a VM.
//!
//! A frame:
//!
//! | bytes | field |
//! |---|---|
//! | 4 | magic `VPMG` |
//! | 2 | protocol version, little-endian ([`PROTOCOL_VERSION`]) |
//! | 1 | message kind ([`Kind`]) |
//! | 1 | reserved, 0 |
//! | 4 | payload length, little-endian, at most [`MAX_PAYLOAD`] |
//! | n | payload |
//! | 4 | CRC-32 (IEEE) of the version, kind, reserved, length and payload |
//!
//! A reader refuses, before acting on any of it, a frame with another magic
//! or version, an unknown kind, a length over the limit, a CRC-32 that does
//! not match, or a payload its kind cannot parse.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use crate::api::types::MigrationRound as RoundReport;
use crate::snapshot::MachineInfo;

/// First bytes of every frame.
pub const MAGIC: [u8; 4] = *b"VPMG";
/// The protocol version this build speaks (and the only one it accepts).
pub const PROTOCOL_VERSION: u16 = 1;
/// Largest payload: a page frame carries at most this much guest memory.
pub const MAX_PAYLOAD: u32 = 4 << 20;
/// Bytes before the payload.
const HEADER: usize = 12;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Source -> destination: the compatibility check's facts ([`Hello`], JSON).
    Hello = 1,
    /// Destination -> source: compatible, send memory (empty).
    Accept = 2,
    /// Destination -> source: refused or failed; the payload is one line of UTF-8.
    Refuse = 3,
    /// Source -> destination: guest pages (address, then whole pages).
    Pages = 4,
    /// Source -> destination: a pre-copy round ended ([`RoundReport`], JSON).
    Round = 5,
    /// Source -> destination: the snapshot's small sections (the VM is paused).
    State = 6,
    /// Destination -> source: the VM is built and waits for [`Kind::Go`] (empty).
    Ready = 7,
    /// Source -> destination: run it; the source has stopped for good (empty).
    Go = 8,
    /// Destination -> source: the VM runs here (empty).
    Running = 9,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Accept,
            3 => Kind::Refuse,
            4 => Kind::Pages,
            5 => Kind::Round,
            6 => Kind::State,
            7 => Kind::Ready,
            8 => Kind::Go,
            9 => Kind::Running,
            _ => return None,
        })
    }
}

/// The facts the destination checks before any memory is sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// vCPUs and RAM, as a snapshot manifest lists them.
    pub machine: MachineInfo,
    /// MPIDR_EL1 of each vCPU, index order.
    pub mpidrs: Vec<u64>,
    /// The counter frequency the guest calibrated on (CNTFRQ_EL0).
    pub cntfrq: u64,
    /// The engine's snapshot now (its pinned configuration and power states).
    pub firmware: Vec<u8>,
    /// Bytes per page in [`Kind::Pages`] frames.
    pub page_size: u64,
}

/// A decoded message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// See [`Kind::Hello`].
    Hello(Hello),
    /// See [`Kind::Accept`].
    Accept,
    /// See [`Kind::Refuse`].
    Refuse(String),
    /// See [`Kind::Pages`]: `data` is whole pages from guest physical `addr`.
    Pages {
        /// Guest physical address of the first page.
        addr: u64,
        /// The pages.
        data: Vec<u8>,
    },
    /// See [`Kind::Round`].
    Round(RoundReport),
    /// See [`Kind::State`]: (file name, bytes) of each small section.
    State(Vec<(String, Vec<u8>)>),
    /// See [`Kind::Ready`].
    Ready,
    /// See [`Kind::Go`].
    Go,
    /// See [`Kind::Running`].
    Running,
}

impl Message {
    /// Its kind.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::Accept => Kind::Accept,
            Message::Refuse(_) => Kind::Refuse,
            Message::Pages { .. } => Kind::Pages,
            Message::Round(_) => Kind::Round,
            Message::State(_) => Kind::State,
            Message::Ready => Kind::Ready,
            Message::Go => Kind::Go,
            Message::Running => Kind::Running,
        }
    }
}

/// Why the stream failed (one line each).
#[derive(Debug, Error)]
pub enum WireError {
    /// Reading or writing made no progress within the connection's timeout.
    #[error("the peer made no progress for {} s (timeout)", super::PEER_TIMEOUT.as_secs())]
    Timeout,
    /// Reading or writing failed (the peer went away).
    #[error("the connection failed: {0}")]
    Io(std::io::Error),
    /// The stream is not a vpsci migration.
    #[error("not a vpsci migration stream (magic {found:02x?})")]
    Magic {
        /// What came instead.
        found: [u8; 4],
    },
    /// The peer speaks another version.
    #[error("migration protocol version {found} is not supported (this vpsci speaks {PROTOCOL_VERSION})")]
    Version {
        /// Its version.
        found: u16,
    },
    /// An unknown message kind.
    #[error("unknown migration message kind {0}")]
    Kind(u8),
    /// A payload longer than any message may be.
    #[error("a migration frame announces {0} bytes, more than {MAX_PAYLOAD}")]
    TooLong(u32),
    /// The frame was damaged on the way.
    #[error("a {kind:?} frame is corrupted: its CRC-32 is {found:#010x}, the frame says {expected:#010x}")]
    Checksum {
        /// Its kind.
        kind: Kind,
        /// Computed.
        found: u32,
        /// Carried.
        expected: u32,
    },
    /// The payload does not parse as its kind.
    #[error("a {kind:?} frame does not parse: {reason}")]
    Payload {
        /// Its kind.
        kind: Kind,
        /// What is wrong.
        reason: String,
    },
}

impl From<std::io::Error> for WireError {
    fn from(e: std::io::Error) -> WireError {
        // A socket timeout shows as WouldBlock (EAGAIN) or TimedOut.
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => WireError::Timeout,
            _ => WireError::Io(e),
        }
    }
}

/// Writes one frame. `corrupt` (test-only fault injection, see
/// [`super::Fault`]) flips a payload bit after the CRC-32 is computed.
pub fn write_frame(
    w: &mut dyn Write,
    kind: Kind,
    payload: &[u8],
    corrupt: bool,
) -> Result<(), WireError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l <= MAX_PAYLOAD)
        .ok_or(WireError::TooLong(u32::MAX))?;
    let mut head = [0u8; HEADER];
    head[..4].copy_from_slice(&MAGIC);
    head[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    head[6] = kind as u8;
    head[8..12].copy_from_slice(&len.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&head[4..]);
    crc.update(payload);
    let crc = crc.finalize();
    w.write_all(&head)?;
    if corrupt && !payload.is_empty() {
        let mut damaged = payload.to_vec();
        damaged[payload.len() / 2] ^= 0x40;
        w.write_all(&damaged)?;
    } else {
        w.write_all(payload)?;
    }
    w.write_all(&crc.to_le_bytes())?;
    Ok(())
}

/// Writes `message` as one frame.
pub fn send(w: &mut dyn Write, message: &Message) -> Result<(), WireError> {
    let json = |r: serde_json::Result<Vec<u8>>| {
        r.map_err(|e| WireError::Payload {
            kind: message.kind(),
            reason: e.to_string(),
        })
    };
    let payload = match message {
        Message::Hello(h) => json(serde_json::to_vec(h))?,
        Message::Round(r) => json(serde_json::to_vec(r))?,
        Message::Refuse(reason) => reason.as_bytes().to_vec(),
        Message::Pages { addr, data } => return send_pages(w, *addr, data, false),
        Message::State(files) => encode_state(files),
        Message::Accept | Message::Ready | Message::Go | Message::Running => Vec::new(),
    };
    write_frame(w, message.kind(), &payload, false)
}

/// Writes a [`Kind::Pages`] frame without copying `data` into a message.
pub fn send_pages(
    w: &mut dyn Write,
    addr: u64,
    data: &[u8],
    corrupt: bool,
) -> Result<(), WireError> {
    let mut payload = Vec::with_capacity(8 + data.len());
    payload.extend_from_slice(&addr.to_le_bytes());
    payload.extend_from_slice(data);
    write_frame(w, Kind::Pages, &payload, corrupt)
}

fn encode_state(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&(files.len() as u32).to_le_bytes());
    for (name, bytes) in files {
        out.push(name.len().min(255) as u8);
        out.extend_from_slice(&name.as_bytes()[..name.len().min(255)]);
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    out
}

fn decode_state(mut p: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    fn take<'a>(p: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
        if p.len() < n {
            return Err("cut short".to_owned());
        }
        let (head, rest) = p.split_at(n);
        *p = rest;
        Ok(head)
    }
    let u32_at = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let count = u32_at(take(&mut p, 4)?);
    if count > 16 {
        return Err(format!("{count} sections"));
    }
    let mut files = Vec::new();
    for _ in 0..count {
        let len = take(&mut p, 1)?[0] as usize;
        let name = std::str::from_utf8(take(&mut p, len)?)
            .map_err(|_| "a section name is not UTF-8".to_owned())?
            .to_owned();
        let size = u32_at(take(&mut p, 4)?) as usize;
        files.push((name, take(&mut p, size)?.to_vec()));
    }
    if !p.is_empty() {
        return Err(format!("{} bytes after the last section", p.len()));
    }
    Ok(files)
}

/// Reads one frame and decodes its message.
pub fn receive(r: &mut dyn Read) -> Result<Message, WireError> {
    let mut head = [0u8; HEADER];
    r.read_exact(&mut head)?;
    let magic = [head[0], head[1], head[2], head[3]];
    if magic != MAGIC {
        return Err(WireError::Magic { found: magic });
    }
    let version = u16::from_le_bytes([head[4], head[5]]);
    if version != PROTOCOL_VERSION {
        return Err(WireError::Version { found: version });
    }
    let kind = Kind::from_byte(head[6]).ok_or(WireError::Kind(head[6]))?;
    let len = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    if len > MAX_PAYLOAD {
        return Err(WireError::TooLong(len));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)?;
    let mut crc = [0u8; 4];
    r.read_exact(&mut crc)?;
    let expected = u32::from_le_bytes(crc);
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&head[4..]);
    hasher.update(&payload);
    let found = hasher.finalize();
    if found != expected {
        return Err(WireError::Checksum {
            kind,
            found,
            expected,
        });
    }
    let bad = |reason: String| WireError::Payload { kind, reason };
    let empty = |m: Message| {
        if payload.is_empty() {
            Ok(m)
        } else {
            Err(bad(format!("{} unexpected bytes", payload.len())))
        }
    };
    match kind {
        Kind::Hello => serde_json::from_slice(&payload)
            .map(Message::Hello)
            .map_err(|e| bad(crate::text::one_line(e))),
        Kind::Round => serde_json::from_slice(&payload)
            .map(Message::Round)
            .map_err(|e| bad(crate::text::one_line(e))),
        Kind::Refuse => Ok(Message::Refuse(
            String::from_utf8_lossy(&payload).replace('\n', " "),
        )),
        Kind::Pages => {
            if payload.len() < 8 {
                return Err(bad("no address".to_owned()));
            }
            let data = payload.split_off(8);
            let addr = u64::from_le_bytes(payload[..8].try_into().unwrap_or([0; 8]));
            Ok(Message::Pages { addr, data })
        }
        Kind::State => decode_state(&payload).map(Message::State).map_err(bad),
        Kind::Accept => empty(Message::Accept),
        Kind::Ready => empty(Message::Ready),
        Kind::Go => empty(Message::Go),
        Kind::Running => empty(Message::Running),
    }
}
