//! Validation through the binary.

use super::*;

#[test]
#[ignore = "needs root and network namespaces"]
fn run_validation_passes_after_apply_and_fails_without_rules() {
    if skip_unless_root("run_validation_passes_after_apply_and_fails_without_rules") {
        return;
    }
    let validate_only = |timeout| {
        cat(
            SEED,
            &[
                "--skip-rule-apply",
                "--run-validation",
                "--probe-timeout",
                timeout,
            ],
        )
    };
    let ns = Script::new()
        .run("no-rules", V4, &validate_only("1s"))
        .run("apply", V4, SEED)
        .run("validate", V4, &validate_only("3s"))
        .exec();
    let none = ns.run_rc("no-rules", 126);
    assert!(
        none.ms >= 900 && none.ms < 4000,
        "a failing validation should end at its 1 s timeout, took {} ms\n{}",
        none.ms,
        none.describe()
    );
    let errors = none.error_lines().join("\n");
    assert!(
        errors.contains("IPv4")
            && errors.contains("no connection")
            && errors.contains("redirected"),
        "the error should name the family and say nothing was redirected\n{}",
        none.describe()
    );
    ns.run_rc("apply", 0);
    let ok = ns.run_rc("validate", 0);
    assert!(ok.ms < 3000, "{}", ok.describe());

    // Apply and validate in one run.
    let ns = Script::new()
        .run(
            "both",
            V4,
            &cat(SEED, &["--run-validation", "--probe-timeout", "3s"]),
        )
        .snap("after")
        .exec();
    let both = ns.run_rc("both", 0);
    assert!(
        both.logs().contains("validation passed"),
        "{}",
        both.describe()
    );
}
