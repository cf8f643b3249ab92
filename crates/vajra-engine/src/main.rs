//! `vajra-engine`: run a Hugging Face model folder on the shared scheduler.
fn main() {}
