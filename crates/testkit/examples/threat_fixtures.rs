//! Write the threat fixtures (docs/release-format.md) to the directory given, `tests/data` by
//! default: `cargo xtask fixtures`.

fn main() -> std::io::Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "tests/data".to_owned());
    cardeploy_testkit::threats::generate(std::path::Path::new(&dir))?;
    eprintln!("threat fixtures written to {dir}");
    Ok(())
}
