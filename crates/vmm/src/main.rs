//! The `vpsci` command (under construction).
fn main() {}
