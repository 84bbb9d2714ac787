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
        // commit) and packed-refs (a gc). `--git-path` finds them in a worktree too. Only
        // existing paths are watched (cargo reruns the script on every build for a missing
        // one); a branch that is only in packed-refs (a fresh clone) gets its directory
        // watched instead, where a commit will create it.
        let mut watch = vec!["HEAD".to_string(), "packed-refs".to_string()];
        if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
            watch.push(branch);
        }
        for name in watch {
            let Some(path) = git(&["rev-parse", "--git-path", &name]) else {
                continue;
            };
            let path = std::path::PathBuf::from(path);
            let watched = if path.exists() {
                Some(path.as_path())
            } else {
                path.parent().filter(|dir| dir.is_dir())
            };
            if let Some(p) = watched {
                println!("cargo:rerun-if-changed={}", p.display());
            }
        }
    }
    println!(
        "cargo:rustc-env=ISTIO_IPTABLES_GIT_COMMIT={}",
        commit.as_deref().unwrap_or("unknown")
    );
}
