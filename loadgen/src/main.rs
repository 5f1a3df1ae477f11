//! corebus-loadgen: the bundled load generator (being built: see its issue).
fn main() {
    eprintln!("corebus-loadgen: not built yet");
    std::process::exit(2);
}
