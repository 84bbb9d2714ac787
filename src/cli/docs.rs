//! `completion` and `man`: documents generated from the one clap definition
//! ([`cli::command`]), so that they can never drift from the flags.

use clap_complete::Shell;
use clap_mangen::Man;
use clap_mangen::roff::{Roff, bold, italic, roman};

use crate::cli::{self, Exit, env_only};

/// The name completion scripts register and the man page is titled with.
const NAME: &str = "istio-iptables";

/// The completion script for `shell`.
pub fn completion(shell: Shell) -> Vec<u8> {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cli::completion_command(), NAME, &mut out);
    if shell == Shell::Bash {
        out = fix_bash_states(&String::from_utf8_lossy(&out)).into_bytes();
    }
    out
}

/// clap_complete's bash script (4.6.11) completes nothing after a subcommand when the binary
/// name has a hyphen (clap-rs/clap#6421, open): its loop names the state of `explain`
/// `istio__iptables__subcmd__explain` (the binary name escaped on its own), but its `case`
/// arms escape the whole path at once, `istio__subcmd__iptables__subcmd__explain`, so no arm
/// matches. Spell the arms the way the loop does.
fn fix_bash_states(script: &str) -> String {
    const WRONG: &str = "istio__subcmd__iptables__subcmd__";
    const RIGHT: &str = "istio__iptables__subcmd__";
    let mut out = String::with_capacity(script.len());
    for line in script.split_inclusive('\n') {
        let body = line.trim_start();
        match body.strip_prefix(WRONG) {
            Some(rest) if body.trim_end().ends_with(')') => {
                out.push_str(&line[..line.len() - body.len()]);
                out.push_str(RIGHT);
                out.push_str(rest);
            }
            _ => out.push_str(line),
        }
    }
    out
}

/// The manual page, roff, section 8 (system administration).
pub fn man_page() -> Vec<u8> {
    let cmd = cli::command();
    let man = Man::new(cmd.clone())
        .section("8")
        .manual("System Manager's Manual");
    let mut out = Vec::new();
    // Writing to a Vec cannot fail.
    let _ = man.render_title(&mut out);
    let _ = man.render_name_section(&mut out);
    let _ = man.render_synopsis_section(&mut out);
    let _ = man.render_description_section(&mut out);
    // Every root flag: short and long name, value, default, env var, possible values.
    let _ = man.render_options_section(&mut out);
    out.extend(commands_section(&cmd).render().into_bytes());
    for name in ["explain", "verify"] {
        let Some(sub) = own_options(&cmd, name) else {
            continue;
        };
        let _ = Man::new(sub).render_options_section(&mut out);
    }
    out.extend(closing_sections().render().into_bytes());
    let _ = man.render_version_section(&mut out);
    out
}

/// The subcommands, each with its about text.
fn commands_section(cmd: &clap::Command) -> Roff {
    let mut r = Roff::new();
    r.control("SH", ["COMMANDS"]);
    let apply_only = cli::APPLY_ONLY
        .iter()
        .map(|id| format!("--{}", id.replace('_', "-")))
        .collect::<Vec<_>>()
        .join(", ");
    r.text([roman(format!(
        "Without a command, the capture rules are applied (or printed with --dry-run). \
         explain and verify take the capture flags and env vars above, but not the flags \
         that only concern applying ({apply_only}): given to them, those are an error, and \
         their env vars are ignored."
    ))]);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        r.control("TP", []);
        let usage = match sub.get_name() {
            "explain" => " [FLAGS] --direction inbound|outbound --dst ADDR:PORT [EXPLAIN OPTIONS]",
            "verify" => " [FLAGS] [VERIFY OPTIONS]",
            "completion" => " bash|zsh|fish|powershell",
            "istio-iptables" => " [FLAGS]",
            _ => "",
        };
        r.text([bold(format!("{NAME} {}", sub.get_name())), roman(usage)]);
        if let Some(about) = sub.get_long_about().or_else(|| sub.get_about()) {
            r.text([roman(about.to_string().replace('\n', " "))]);
        }
    }
    r
}

/// A command holding only the options `name` adds to the capture flags, under the heading
/// "NAME OPTIONS", for [`Man::render_options_section`].
fn own_options(cmd: &clap::Command, name: &'static str) -> Option<clap::Command> {
    let sub = cmd.find_subcommand(name)?;
    let heading = match name {
        "explain" => "explain options",
        "verify" => "verify options",
        _ => "options",
    };
    let args = sub
        .get_arguments()
        .filter(|a| !a.is_global_set() && !a.is_hide_set())
        .map(|a| a.clone().help_heading(heading));
    Some(
        clap::Command::new(name)
            .disable_help_flag(true)
            .disable_version_flag(true)
            .args(args),
    )
}

/// ENVIRONMENT (the knobs without a flag), EXIT STATUS, FILES (@PATH lists), EXAMPLES.
fn closing_sections() -> Roff {
    let mut r = Roff::new();
    r.control("SH", ["ENVIRONMENT"]);
    r.text([roman(
        "Every flag above names its environment variable; a flag on the command line beats \
         its variable, which beats the default. These variables have no flag:",
    )]);
    for (var, default, meaning) in env_only::DOCS {
        r.control("TP", []);
        r.text([bold(*var)]);
        r.text([roman(format!("{meaning} [default: {default}]"))]);
    }
    r.control("TP", []);
    r.text([bold("RUST_LOG")]);
    r.text([roman(
        "a tracing filter (debug, trace, ...) that replaces the level of --log_output_level",
    )]);

    r.control("SH", ["LISTS FROM FILES"]);
    r.text([
        roman("Every list flag (-i -x -b -d -q -o -k -c -u -g), its variable, and "),
        bold(env_only::OWNER_GROUPS_INCLUDE),
        roman(" and "),
        bold(env_only::OWNER_GROUPS_EXCLUDE),
        roman(" also take "),
        bold("@"),
        italic("PATH"),
        roman(
            ": the items are read from that file, separated by commas, spaces or newlines, \
             a # starting a comment that runs to the end of the line. Each item is \
             validated as if it had been typed. This is how lists longer than the kernel's \
             128 KiB limit on one argument or variable are given. The file must be a \
             regular file of at most 4 MiB; a missing or unreadable file is an error (exit \
             2) that names the flag or variable and the path.",
        ),
    ]);

    r.control("SH", ["EXIT STATUS"]);
    for exit in Exit::ALL {
        r.control("TP", []);
        r.text([bold(exit.code().to_string())]);
        r.text([roman(exit.meaning())]);
    }

    r.control("SH", ["EXAMPLES"]);
    r.text([roman(
        "Kubernetes init container, as Istio's sidecar injector runs it (the first word is \
         accepted and skipped, as pilot-agent's is):",
    )]);
    example(
        &mut r,
        &[
            "istio-iptables istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT \\",
            "    -i '*' -x '' -b '*' -d 15090,15021,15020 --log_output_level=default:info",
        ],
    );
    r.control("PP", []);
    r.text([roman(
        "A VM: write the rules as a script to read and run at boot, or apply them directly \
         and check them:",
    )]);
    example(
        &mut r,
        &[
            "ENVOY_USER=istio-proxy istio-iptables --dry-run -p 15001 -z 15006 \\",
            "    -m REDIRECT -i '*' -x '' -b '*' -d 15090,15021 > setup.sh",
            "sudo istio-iptables -p 15001 -z 15006 -m REDIRECT -i '*' \\",
            "    -x @/etc/istio-iptables/exclude.txt -b '*' -d 15090,15021",
            "sudo istio-iptables verify -p 15001 -z 15006 -m REDIRECT -i '*' \\",
            "    -x @/etc/istio-iptables/exclude.txt -b '*' -d 15090,15021",
        ],
    );
    r.control("PP", []);
    r.text([roman("Why is a connection to 10.1.2.3:80 (not) captured?")]);
    example(
        &mut r,
        &["istio-iptables explain -u 1337 -i '*' --direction outbound --dst 10.1.2.3:80"],
    );
    r.control("SH", ["SEE ALSO"]);
    r.text([roman(
        "iptables(8), iptables-restore(8), ip(8); istio-iptables --help lists the same flags.",
    )]);
    r
}

/// A literal, indented block of shell lines.
fn example(r: &mut Roff, lines: &[&str]) {
    r.control("RS", ["4"]);
    r.control("nf", []);
    for line in lines {
        r.text([roman(*line)]);
    }
    r.control("fi", []);
    r.control("RE", []);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn man() -> String {
        String::from_utf8(man_page()).expect("utf-8 roff")
    }

    #[test]
    fn man_page_is_section_8_with_every_part() {
        let m = man();
        assert!(m.contains(".TH istio-iptables 8 "), "{m}");
        for section in [
            ".SH OPTIONS",
            ".SH COMMANDS",
            "EXPLAIN OPTIONS",
            "VERIFY OPTIONS",
            ".SH ENVIRONMENT",
            ".SH \"EXIT STATUS\"",
            ".SH EXAMPLES",
        ] {
            assert!(m.contains(section), "no {section}:\n{m}");
        }
        for (var, _, _) in env_only::DOCS {
            assert!(m.contains(var), "no {var}");
        }
        assert!(m.contains("direction"), "explain's own options are listed");
    }

    #[test]
    fn completion_scripts_name_the_binary() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish, Shell::PowerShell] {
            let s = String::from_utf8(completion(shell)).unwrap();
            assert!(s.contains("istio-iptables"), "{shell}");
            assert!(s.contains("istio-service-exclude-cidr"), "{shell}");
        }
    }
}
