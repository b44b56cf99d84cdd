//! vpsci KVM backend (under construction).
