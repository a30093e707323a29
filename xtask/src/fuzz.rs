//! `cargo xtask fuzz --seconds N`: runs every cargo-fuzz target for N seconds on
//! nightly, growing the committed corpus, then minimizes that corpus (`cargo fuzz
//! cmin`) so that what is committed and replayed by `cargo test` stays small while
//! covering the same code; a crash fails the command and leaves its input under
//! fuzz/artifacts/.

use std::process::Command;

const TARGETS: &[&str] = &[
    "codec_decode",
    "config_load",
    "lua_value",
    "outside_message",
];

/// Leaks LeakSanitizer reports that are not leaks (see the file).
const LSAN_OPTIONS: &str = "suppressions=lsan-suppressions.txt";

/// Runs each target; `Ok(false)` if one crashed.
pub fn run(seconds: u64, only: Option<String>) -> Result<bool, String> {
    let has_fuzz = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_fuzz {
        return Err("cargo-fuzz on nightly is needed: cargo install cargo-fuzz (a nightly toolchain is installed here)".into());
    }
    let mut ok = true;
    for target in TARGETS
        .iter()
        .filter(|t| only.as_deref().is_none_or(|o| o == **t))
    {
        println!("fuzzing {target} for {seconds}s");
        let status = Command::new("cargo")
            .current_dir("fuzz")
            .env("LSAN_OPTIONS", LSAN_OPTIONS)
            .args([
                "+nightly",
                "fuzz",
                "run",
                target,
                &format!("corpus/{target}"),
                "--",
            ])
            .arg(format!("-max_total_time={seconds}"))
            .arg("-max_len=4096")
            .status()
            .map_err(|e| e.to_string())?;
        if !status.success() {
            eprintln!(
                "{target}: the fuzzer found a failure; its input is under fuzz/artifacts/{target}/"
            );
            ok = false;
            continue;
        }
        println!("minimizing the {target} corpus");
        let minimized = Command::new("cargo")
            .current_dir("fuzz")
            .args([
                "+nightly",
                "fuzz",
                "cmin",
                target,
                &format!("corpus/{target}"),
            ])
            .status()
            .map_err(|e| e.to_string())?;
        if !minimized.success() {
            return Err(format!("cargo fuzz cmin {target} failed"));
        }
    }
    Ok(ok)
}
