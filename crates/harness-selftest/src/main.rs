//! Harness self-test (under construction).
fn main() {}
