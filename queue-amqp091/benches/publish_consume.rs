//! Driver vs raw lapin (filled in with the bench work).
fn main() {}
