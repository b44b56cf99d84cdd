//! Pulling a vCPU thread out of `KVM_RUN` (a "kick").
//!
//! The kicker sends a real-time signal to the vCPU thread. The signal makes a
//! running `KVM_RUN` return `-EINTR`. A signal that lands after the thread has
//! checked its work but before it entered `KVM_RUN` would be lost, so the
//! handler, which runs on the vCPU thread itself, also sets
//! `kvm_run.immediate_exit` through a thread-local pointer: the next `KVM_RUN`
//! then returns at once (the pattern `Documentation/virt/kvm/api.rst`
//! recommends instead of `KVM_SET_SIGNAL_MASK`). The caller must publish the
//! reason for the kick (e.g. a hold counter) before kicking, and the vCPU
//! thread must clear `immediate_exit` after `KVM_RUN` returns and before it
//! reads that state again; [`crate::KvmVcpu::run`] does the clearing.

use std::cell::Cell;
use std::sync::{Arc, Mutex, PoisonError};

use kvm_bindings::kvm_run;

use crate::KvmError;

thread_local! {
    /// The `kvm_run` of the vCPU this thread is running, or null.
    static RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used for kicks.
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_signal: libc::c_int) {
    // `try_with` never allocates here: the thread-local is const-initialised
    // and has no destructor, so reading it is async-signal-safe.
    let ptr = RUN_PTR
        .try_with(|p| p.get())
        .unwrap_or(std::ptr::null_mut());
    if !ptr.is_null() {
        // SAFETY: the pointer was registered by this very thread while it owns
        // the vCPU's kvm_run mapping and is cleared before that mapping goes
        // away (`KickRegistration::drop`); a volatile byte store is all the
        // handler does.
        unsafe { std::ptr::addr_of_mut!((*ptr).immediate_exit).write_volatile(1) };
    }
}

/// Installs the kick signal handler for the process. Idempotent; call it once
/// before starting vCPU threads.
pub fn install_kick_handler() -> Result<(), KvmError> {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; we
    // then fill in the handler, which is an `extern "C" fn(c_int)` that only
    // performs async-signal-safe work.
    let rc = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_kick as *const () as libc::sighandler_t;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(kick_signal(), &action, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(KvmError::Ioctl {
            op: "sigaction(kick signal)",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Target of kicks for one vCPU; shared between its thread and kickers.
#[derive(Debug, Default)]
pub(crate) struct KickTarget {
    /// The thread currently running the vCPU, while registered (a
    /// `pthread_t` kept as an integer so the type is `Send` on musl too).
    thread: Mutex<Option<usize>>,
}

/// A cloneable handle that kicks one vCPU out of `KVM_RUN`.
#[derive(Debug, Clone)]
pub struct VcpuKicker {
    pub(crate) target: Arc<KickTarget>,
}

impl VcpuKicker {
    /// Kicks the vCPU's thread if one is registered. Returns whether a
    /// signal was sent. Publish the reason for the kick before calling.
    pub fn kick(&self) -> bool {
        let guard = self
            .target
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match *guard {
            Some(thread) => {
                // SAFETY: the thread is registered, and it unregisters only
                // under this same lock before it exits, so it is alive while
                // we signal it.
                unsafe { libc::pthread_kill(thread as libc::pthread_t, kick_signal()) == 0 }
            }
            None => false,
        }
    }
}

/// Registration of the current thread as the runner of one vCPU; dropping it
/// unregisters the thread (kicks are then ignored).
#[derive(Debug)]
pub struct KickRegistration {
    target: Arc<KickTarget>,
}

impl KickRegistration {
    pub(crate) fn register(target: &Arc<KickTarget>, run: *mut kvm_run) -> KickRegistration {
        RUN_PTR.with(|p| p.set(run));
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        *target.thread.lock().unwrap_or_else(PoisonError::into_inner) = Some(me as usize);
        KickRegistration {
            target: Arc::clone(target),
        }
    }
}

impl Drop for KickRegistration {
    fn drop(&mut self) {
        *self
            .target
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
    }
}
