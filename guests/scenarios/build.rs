//! Links every guest program with the runtime's linker script.
fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    println!("cargo:rustc-link-arg=-T{dir}/../rt/link.ld");
    println!("cargo:rerun-if-changed=../rt/link.ld");
}
