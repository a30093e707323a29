//! Project automation (`cargo xtask ...`).
fn main() {
    eprintln!("usage: cargo xtask <test-brokers|bench>");
    std::process::exit(2);
}
