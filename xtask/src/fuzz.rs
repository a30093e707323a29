//! `cargo xtask fuzz --seconds N`: runs every cargo-fuzz target for N seconds on
//! nightly, growing the committed corpus, then minimizes that corpus (`cargo fuzz
//! cmin`) so that what is committed and replayed by `cargo test` stays small while
//! covering the same code; a crash fails the command and leaves its input under
//! fuzz/artifacts/.

use std::process::Command;

/// A target: its name, what `cargo fuzz` builds it with beyond its defaults, and
/// what libFuzzer runs it with.
struct Target {
    name: &'static str,
    build: &'static [&'static str],
    run: &'static [&'static str],
}

const TARGETS: &[Target] = &[
    Target::plain("codec_decode"),
    Target::plain("config_load"),
    Target::plain("lua_value"),
    Target::plain("outside_message"),
    Target {
        name: "amqp10_guard",
        // Without debug assertions, as the runtime ships: fe2o3-amqp's decoder, which
        // the target runs on what the guard passed, has integer overflows (an odd map
        // count) that a release build wraps and stops on, but debug assertions turn
        // into panics the fuzzer would report in the guard's place.
        build: &["-O"],
        // The guard refuses what a value claims from 128 MiB on, before the decoder
        // allocates it: a larger allocation is a find.
        run: &["-malloc_limit_mb=160"],
    },
];

impl Target {
    const fn plain(name: &'static str) -> Target {
        Target {
            name,
            build: &[],
            run: &[],
        }
    }
}

/// Leaks LeakSanitizer reports that are not leaks (see the file).
const LSAN_OPTIONS: &str = "suppressions=lsan-suppressions.txt";

/// Runs each target; `Ok(false)` if one crashed.
pub fn run(seconds: u64, only: Option<String>) -> Result<bool, String> {
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    let cargo_fuzz = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if let Some(problem) = missing_tools(nightly, cargo_fuzz) {
        return Err(problem);
    }
    let mut ok = true;
    for Target {
        name: target,
        build,
        run,
    } in TARGETS
        .iter()
        .filter(|t| only.as_deref().is_none_or(|o| o == t.name))
    {
        println!("fuzzing {target} for {seconds}s");
        let status = Command::new("cargo")
            .current_dir("fuzz")
            .env("LSAN_OPTIONS", LSAN_OPTIONS)
            .args(["+nightly", "fuzz", "run"])
            .args(*build)
            .args([*target, &format!("corpus/{target}"), "--"])
            .arg(format!("-max_total_time={seconds}"))
            .arg("-max_len=4096")
            .args(*run)
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
            .args(["+nightly", "fuzz", "cmin"])
            .args(*build)
            .args([*target, &format!("corpus/{target}")])
            .status()
            .map_err(|e| e.to_string())?;
        if !minimized.success() {
            return Err(format!("cargo fuzz cmin {target} failed"));
        }
    }
    Ok(ok)
}

/// What to do when the fuzzing tools are missing, if they are. libFuzzer's
/// instrumentation needs a nightly compiler; on stable, the corpus replay is what runs.
fn missing_tools(nightly: bool, cargo_fuzz: bool) -> Option<String> {
    const ON_STABLE: &str = "Without them, `cargo test -p queue-runtime --test fuzz_corpus` \
        replays the committed corpus on stable (cargo test runs it too).";
    match (nightly, cargo_fuzz) {
        (true, true) => None,
        (false, _) => Some(format!(
            "fuzzing needs a nightly toolchain, and this machine has none: \
             `rustup toolchain install nightly`, then `cargo install cargo-fuzz`. {ON_STABLE}"
        )),
        (true, false) => Some(format!(
            "fuzzing needs cargo-fuzz: `cargo install cargo-fuzz` (nightly is installed). \
             {ON_STABLE}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::missing_tools;

    #[test]
    fn missing_tools_say_how_to_get_them_and_what_runs_on_stable() {
        assert_eq!(missing_tools(true, true), None);
        let no_nightly = missing_tools(false, false).unwrap();
        assert!(
            no_nightly.contains("rustup toolchain install nightly"),
            "{no_nightly}"
        );
        assert!(no_nightly.contains("--test fuzz_corpus"), "{no_nightly}");
        let no_cargo_fuzz = missing_tools(true, false).unwrap();
        assert!(
            no_cargo_fuzz.contains("cargo install cargo-fuzz"),
            "{no_cargo_fuzz}"
        );
        assert!(
            !no_cargo_fuzz.contains("rustup toolchain"),
            "{no_cargo_fuzz}"
        );
    }
}
