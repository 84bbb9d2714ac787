//! Records the git commit the binary is built from, for `--version`: `git rev-parse --short
//! HEAD`, or "unknown" outside a git checkout (a source tarball) or without git.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let commit = git(&["rev-parse", "--short", "HEAD"]);
    if commit.is_some() {
        // Rebuild when HEAD moves: HEAD itself (a checkout), the branch it points to (a
        // commit) and packed-refs (a gc). `--git-path` finds them in a worktree too.
        let mut watch = vec!["HEAD".to_string(), "packed-refs".to_string()];
        if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
            watch.push(branch);
        }
        for name in watch {
            if let Some(path) = git(&["rev-parse", "--git-path", &name]) {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
    println!(
        "cargo:rustc-env=ISTIO_IPTABLES_GIT_COMMIT={}",
        commit.as_deref().unwrap_or("unknown")
    );
}
