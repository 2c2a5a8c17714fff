//! The end-to-end demo (placeholder until the demo lands in this file).
fn main() {}
