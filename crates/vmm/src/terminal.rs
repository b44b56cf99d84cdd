//! `vpsci run`'s standard input as the guest's console input.
//!
//! A thread copies standard input into the UART's [`ConsoleInput`] until end
//! of file. When standard input is a terminal, [`InteractiveTerminal`] turns
//! off its line editing and echo for the run, so each key reaches the guest
//! as it is typed and only the guest echoes it; signals stay on (Ctrl-C
//! still stops vpsci). The terminal's settings come back when the guard is
//! dropped, and also when SIGINT, SIGTERM or SIGHUP end the process.

use std::io::Read;
use std::sync::{Arc, OnceLock};

use crate::devices::console::ConsoleInput;

/// Copies `reader` into `input` until end of file or a read error (a closed
/// or absent standard input simply means no input).
pub fn forward_input(mut reader: impl Read, input: &ConsoleInput) {
    let mut buf = [0u8; 256];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => input.push(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
}

/// Starts the thread that feeds standard input to `input` (detached: a read
/// of standard input cannot be interrupted, and the process ends with it).
pub fn spawn_stdin_reader(input: Arc<ConsoleInput>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("console-input".to_owned())
        .spawn(move || forward_input(std::io::stdin().lock(), &input))
        .map(drop)
}

/// The terminal settings to restore (set once, read by the signal handler).
static ORIGINAL: OnceLock<libc::termios> = OnceLock::new();

/// Standard input in character-at-a-time mode without echo, for as long as
/// this lives.
#[derive(Debug)]
pub struct InteractiveTerminal {
    _private: (),
}

impl InteractiveTerminal {
    /// Switches a terminal on standard input; `None` when standard input is
    /// not a terminal (a pipe, a file, nothing) or cannot be switched.
    pub fn enter() -> Option<InteractiveTerminal> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it for a valid fd.
        let mut original: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `original` is a valid, writable termios.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut original) } != 0 {
            return None;
        }
        let original = *ORIGINAL.get_or_init(|| original);
        let mut raw = original;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: the handler only calls async-signal-safe functions
            // (tcsetattr, signal, raise) on data set before it is installed.
            unsafe {
                libc::signal(
                    signal,
                    restore_and_reraise as *const () as libc::sighandler_t,
                );
            }
        }
        // SAFETY: `raw` is a valid termios derived from the current one.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(InteractiveTerminal { _private: () })
    }
}

impl Drop for InteractiveTerminal {
    fn drop(&mut self) {
        if let Some(original) = ORIGINAL.get() {
            // SAFETY: `original` is the termios tcgetattr returned.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, original) };
        }
    }
}

extern "C" fn restore_and_reraise(signal: libc::c_int) {
    if let Some(original) = ORIGINAL.get() {
        // SAFETY: async-signal-safe calls on the saved settings; the default
        // action is then re-delivered so the process ends as it would have.
        unsafe {
            libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, original);
        }
    }
    // SAFETY: as above.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        libc::raise(signal);
    }
}
