//! The line protocol the host parses (one line each, on the UART):
//!
//! - `VG-START <program>` when a program starts;
//! - `VG-CHECK <name> PASS [detail]` / `VG-CHECK <name> FAIL <detail>`;
//! - `VG-INFO <text>` for measurements;
//! - `VG-CALL <name>` just before a call that should end the VM (the host
//!   then judges the check from the VMM's side);
//! - `VG-DONE` before the final SYSTEM_OFF.

use core::fmt::{self, Write};

/// A bounded, allocation-free string for failure details.
pub struct Detail {
    buf: [u8; 200],
    len: usize,
}

impl Detail {
    /// An empty detail.
    pub const fn new() -> Detail {
        Detail {
            buf: [0; 200],
            len: 0,
        }
    }

    /// The text (truncated to the buffer).
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("?")
    }
}

impl Default for Detail {
    fn default() -> Self {
        Detail::new()
    }
}

impl Write for Detail {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len < self.buf.len() {
                self.buf[self.len] = if b == b'\n' { b' ' } else { b };
                self.len += 1;
            }
        }
        Ok(())
    }
}

/// The outcome of one check.
pub type CheckResult = Result<(), Detail>;

/// Builds a failed [`CheckResult`] from a format string.
#[macro_export]
macro_rules! fail {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let mut d = $crate::report::Detail::new();
        let _ = d.write_fmt(format_args!($($arg)*));
        Err(d)
    }};
}

/// Fails the enclosing check with the message unless `cond` holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            return $crate::fail!($($arg)*);
        }
    };
}

/// Reports one check.
pub fn check(name: &str, result: CheckResult) {
    match result {
        Ok(()) => crate::println!("VG-CHECK {} PASS", name),
        Err(d) => crate::println!("VG-CHECK {} FAIL {}", name, d.as_str()),
    }
}

/// Runs `f` and reports it under `name`.
pub fn run(name: &str, f: impl FnOnce() -> CheckResult) {
    check(name, f());
}
