//! Where a bench writes what `cargo xtask bench` reads.

use std::path::{Path, PathBuf};

/// `target/` of the workspace, where `cargo xtask bench` reads `bench/*.json`: cargo
/// runs benches from the package's directory, not the workspace's.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    // Cargo puts this executable in `target/<profile>/deps/`.
    let from_exe = || {
        let exe = std::env::current_exe().ok()?;
        let deps = exe.parent()?;
        if deps.file_name()? != "deps" {
            return None;
        }
        Some(deps.parent()?.parent()?.to_path_buf())
    };
    from_exe().unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}
