//! Lists from files: `-x @/etc/istio-iptables/exclude.txt`.
//!
//! Linux caps one argument or environment string at 128 KiB (`MAX_ARG_STRLEN`), about 5,000
//! CIDRs; past that, `execve` fails with "Argument list too long" before this program even
//! starts. So every list flag, its env var, and the two owner-group knobs also take `@PATH`:
//! the items are read from that file, separated by commas, spaces or newlines, `#` starting
//! a comment that runs to the end of the line.
//!
//! This is a step in front of [`Config::build`], not a second validator: each `@PATH` value
//! is replaced by its items joined with commas, exactly as if they had been typed, and
//! `Config::build` validates them as usual. An error about an item read from a file then
//! shows `@PATH` as the value (not the whole joined list), names the flag or env var, and
//! says on which line the bad item is and what is wrong with it, but never shows the item:
//! Istio's injector copies annotations such as `excludeOutboundIPRanges` into `-x`, so
//! whoever writes a pod's annotations chooses the path, and this program reads it as root
//! (`-x @/proc/self/environ` must not print the environment).

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use crate::cli::{Args, Cli, env_only};
use crate::config::{Config, ConfigError, source_name};

/// The largest list file read: 4 MiB is about 250,000 CIDRs, far past anything iptables
/// handles well, and small enough that a wrong path (a log file, say) fails quickly.
pub const MAX_BYTES: u64 = 4 * 1024 * 1024;

/// The env-only knobs that take `@PATH`.
pub const ENV_LISTS: [&str; 2] = [
    env_only::OWNER_GROUPS_INCLUDE,
    env_only::OWNER_GROUPS_EXCLUDE,
];

/// The list flags (clap ids) and their values, to be expanded in place.
fn list_fields(cli: &mut Cli) -> [(&'static str, Option<&mut String>); 10] {
    [
        ("proxy_uid", cli.proxy_uid.as_mut()),
        ("proxy_gid", cli.proxy_gid.as_mut()),
        ("istio_inbound_ports", Some(&mut cli.istio_inbound_ports)),
        (
            "istio_local_exclude_ports",
            Some(&mut cli.istio_local_exclude_ports),
        ),
        (
            "istio_exclude_interfaces",
            Some(&mut cli.istio_exclude_interfaces),
        ),
        ("istio_service_cidr", Some(&mut cli.istio_service_cidr)),
        (
            "istio_service_exclude_cidr",
            Some(&mut cli.istio_service_exclude_cidr),
        ),
        ("istio_outbound_ports", Some(&mut cli.istio_outbound_ports)),
        (
            "istio_local_outbound_ports_exclude",
            Some(&mut cli.istio_local_outbound_ports_exclude),
        ),
        ("kube_virt_interfaces", Some(&mut cli.kube_virt_interfaces)),
    ]
}

/// The path of an `@PATH` value, if it is one.
pub fn at_path(raw: &str) -> Option<&str> {
    raw.trim().strip_prefix('@')
}

/// The items of one line of a list file: separated by commas and whitespace, `#` to the end
/// of the line being a comment, empty items dropped.
fn line_items(line: &str) -> impl Iterator<Item = &str> {
    let line = line.split_once('#').map_or(line, |(before, _)| before);
    line.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|item| !item.is_empty())
}

/// The items of a list file, line by line ([`line_items`]).
pub fn items(text: &str) -> Vec<&str> {
    text.lines().flat_map(line_items).collect()
}

/// Where `item` first is in a list file's `text`, in words: "the item on line 3", or "item 2
/// on line 3" when that line holds several.
fn locate(text: &str, item: &str) -> Option<String> {
    text.lines().enumerate().find_map(|(n, line)| {
        let on_line: Vec<&str> = line_items(line).collect();
        let i = on_line.iter().position(|i| *i == item)?;
        Some(if on_line.len() == 1 {
            format!("the item on line {}", n + 1)
        } else {
            format!("item {} on line {}", i + 1, n + 1)
        })
    })
}

/// An error about one item of a list read from a file (its value is `@PATH`): the item is
/// replaced by the line it is on (the file is read again, for the message only), so that
/// none of the file's content is shown.
pub fn hide_content(e: &mut ConfigError) {
    let Some(path) = at_path(&e.value) else {
        return;
    };
    let Some(item) = e.item.take() else { return };
    let place = read(path)
        .ok()
        .and_then(|text| locate(&text, &item))
        .unwrap_or_else(|| "an item".to_string());
    e.reason = format!("{place} {}", e.reason);
}

/// Why a list file could not be read (the message names the path; the caller names the
/// flag).
#[derive(Debug, thiserror::Error)]
pub enum ListFileError {
    #[error("`@` must be followed by the path of a file")]
    NoPath,
    #[error("cannot read {path}: {error}")]
    Io {
        path: String,
        /// Printed in the message, so not exposed as `source` too.
        error: std::io::Error,
    },
    #[error("cannot read {path}: it is {kind}, not a regular file")]
    NotAFile { path: String, kind: &'static str },
    #[error("{path} is larger than {} MiB", MAX_BYTES >> 20)]
    TooBig { path: String },
    #[error("{path} is not UTF-8 text (invalid byte at offset {offset})")]
    NotUtf8 { path: String, offset: usize },
}

/// Reads a list file: a regular file (following symlinks, as a ConfigMap volume has them) of
/// at most [`MAX_BYTES`], UTF-8.
pub fn read(path: &str) -> Result<String, ListFileError> {
    if path.is_empty() {
        return Err(ListFileError::NoPath);
    }
    let io = |error| ListFileError::Io {
        path: path.to_string(),
        error,
    };
    // O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below.
    let mut file = File::options()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(Path::new(path))
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let kind = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() || kind.is_block_device() {
            "a device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(ListFileError::NotAFile {
            path: path.to_string(),
            kind,
        });
    }
    let too_big = || ListFileError::TooBig {
        path: path.to_string(),
    };
    if meta.len() > MAX_BYTES {
        return Err(too_big());
    }
    // The size can change between fstat and read: never read more than the cap.
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    (&mut file)
        .take(MAX_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_BYTES {
        return Err(too_big());
    }
    let mut text = String::from_utf8(bytes).map_err(|e| ListFileError::NotUtf8 {
        path: path.to_string(),
        offset: e.utf8_error().valid_up_to(),
    })?;
    // A byte-order mark (some editors start UTF-8 text with one) is not an item.
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    Ok(text)
}

/// The list an `@PATH` value stands for, as typed: its items joined with commas.
pub fn expand(raw: &str) -> Option<Result<String, ListFileError>> {
    let path = at_path(raw)?;
    Some(read(path).map(|text| items(&text).join(",")))
}

/// A value that came from a file: where errors about it are reported.
struct FromFile {
    /// How errors name its flag or env var.
    source_name: String,
    /// The list it was expanded to.
    joined: String,
    /// `@PATH`, as given.
    raw: String,
}

/// [`Config::build`], with every `@PATH` list expanded first. A file that cannot be read is
/// an error naming the flag (or env var) and the path; an invalid item read from a file is
/// reported with `@PATH` as the value.
pub fn build_config(
    args: &Args,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigError> {
    let mut expanded = args.clone();
    let mut from_files = Vec::new();
    for (id, value) in list_fields(&mut expanded.cli) {
        let Some(value) = value else { continue };
        let Some(result) = expand(value) else {
            continue;
        };
        let source_name = source_name(args, id);
        let joined = result.map_err(|e| ConfigError {
            source_name: source_name.clone(),
            value: value.clone(),
            reason: e.to_string(),
            item: None,
        })?;
        from_files.push(FromFile {
            source_name,
            joined: joined.clone(),
            raw: std::mem::replace(value, joined),
        });
    }
    let mut env_lists = HashMap::new();
    for var in ENV_LISTS {
        let Some(raw) = env(var) else { continue };
        let Some(result) = expand(&raw) else { continue };
        let source_name = format!("env {var}");
        let joined = result.map_err(|e| ConfigError {
            source_name: source_name.clone(),
            value: raw.clone(),
            reason: e.to_string(),
            item: None,
        })?;
        env_lists.insert(var, joined.clone());
        from_files.push(FromFile {
            source_name,
            joined,
            raw,
        });
    }
    let env = |k: &str| env_lists.get(k).cloned().or_else(|| env(k));
    // A value read from a file is named by its `@PATH`, also in the errors the host facts
    // find later (an owner name of -u/-g that does not exist).
    let as_given = |source_name: &str, value: &mut String| {
        if let Some(f) = from_files
            .iter()
            .find(|f| f.source_name == source_name && f.joined == *value)
        {
            value.clone_from(&f.raw);
        }
    };
    let mut cfg = Config::build(&expanded, &env).map_err(|mut e| {
        as_given(&e.source_name, &mut e.value);
        hide_content(&mut e);
        e
    })?;
    if !from_files.is_empty() {
        let given = &mut cfg.given;
        for g in [
            &mut given.proxy_uid,
            &mut given.proxy_gid,
            &mut given.owner_groups,
        ] {
            as_given(&g.source_name(), &mut g.value);
        }
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HostFacts;
    use crate::config::tests::SEED;
    // One builder, as main runs it; `build_typed` names it where the input is typed out.
    use crate::config::tests::{build, build as build_typed};
    use std::io::Write as _;
    use std::path::PathBuf;

    /// A temp file holding `text`, removed on drop.
    struct Temp(PathBuf);
    impl Temp {
        fn new(name: &str, text: &[u8]) -> Temp {
            let path = std::env::temp_dir().join(format!(
                "istio-iptables-listfile-{}-{name}",
                std::process::id()
            ));
            let mut f = File::create(&path).unwrap();
            f.write_all(text).unwrap();
            Temp(path)
        }
        fn at(&self) -> String {
            format!("@{}", self.0.display())
        }
    }
    impl Drop for Temp {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn items_split_on_commas_spaces_newlines_and_drop_comments() {
        let text = "# excluded ranges\n10.0.0.0/8, 172.16.0.0/12\t192.168.0.0/16 # RFC 1918\n\n\
                    ,,fd00::/8\r\n#10.9.9.9\n";
        assert_eq!(
            items(text),
            ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fd00::/8"]
        );
        assert!(items("# nothing\n\n").is_empty());
    }

    #[test]
    fn a_list_from_a_file_is_the_list_typed() {
        let f = Temp::new("same", b"10.0.0.0/8\n# comment\nfd00::/8, 1.2.3.4 # host\n");
        let typed = build_typed(&["-x", "10.0.0.0/8,fd00::/8,1.2.3.4"], &[]).unwrap();
        assert_eq!(build(&["-x", &f.at()], &[]).unwrap(), typed);
        // (Flags' env vars are read by clap from the process: tests/cli_extras.rs has them.)

        let ports = Temp::new("ports", b"15090\n15020 15021\n");
        let mut argv = SEED.to_vec();
        let at = ports.at();
        *argv.last_mut().unwrap() = &at;
        let mut typed_argv = SEED.to_vec();
        *typed_argv.last_mut().unwrap() = "15090,15020,15021";
        assert_eq!(
            build(&argv, &[]).unwrap(),
            build_typed(&typed_argv, &[]).unwrap()
        );
    }

    #[test]
    fn twenty_thousand_cidrs_from_a_file_print_the_script_of_the_typed_list() {
        // In-process there is no argv limit, so the typed list can be as long as the file.
        let cidrs: Vec<String> = (0..20_000u32)
            .map(|i| format!("10.{}.{}.0/24", i / 256, i % 256))
            .collect();
        let f = Temp::new("20k", (cidrs.join("\n") + "\n").as_bytes());
        let typed = cidrs.join(",");
        let script = |(c, f): &(Config, HostFacts)| {
            crate::backend::iptables::script::render(
                c,
                f,
                &crate::backend::iptables::build::build(c, f),
            )
        };
        let from_file = build(&["-n", "-i", "*", "-x", &f.at()], &[]).unwrap();
        let from_typed = build_typed(&["-n", "-i", "*", "-x", &typed], &[]).unwrap();
        assert_eq!(from_file.0.outbound_exclude.v4.len(), 20_000);
        assert!(script(&from_file) == script(&from_typed), "same script");
    }

    #[test]
    fn owner_group_knobs_take_files_too() {
        let f = Temp::new("groups", b"java\n202\n");
        let (c, _) = build(&[], &[("ISTIO_OUTBOUND_OWNER_GROUPS", &f.at())]).unwrap();
        let (typed, _) = build_typed(&[], &[("ISTIO_OUTBOUND_OWNER_GROUPS", "java,202")]).unwrap();
        assert_eq!(c.owner_groups, typed.owner_groups);
        let (c, _) = build(&[], &[("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", &f.at())]).unwrap();
        let typed = build_typed(&[], &[("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "java,202")]);
        assert_eq!(c.owner_groups, typed.unwrap().0.owner_groups);
    }

    #[test]
    fn an_unreadable_file_names_the_flag_or_env_var_and_the_path() {
        let e = build(&["-x", "@/nonexistent/exclude.txt"], &[]).unwrap_err();
        assert_eq!(e.source_name, "--istio-service-exclude-cidr");
        assert_eq!(e.value, "@/nonexistent/exclude.txt");
        assert!(e.reason.contains("/nonexistent/exclude.txt"), "{e}");
        assert!(e.reason.contains("No such file"), "{e}");

        let e = build(
            &[],
            &[("ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE", "@/nonexistent/g")],
        )
        .unwrap_err();
        assert_eq!(e.source_name, "env ISTIO_OUTBOUND_OWNER_GROUPS_EXCLUDE");

        let e = build(&["-u", "@"], &[]).unwrap_err();
        assert!(e.reason.contains("followed by the path"), "{e}");
        let e = build(
            &["-c", &format!("@{}", std::env::temp_dir().display())],
            &[],
        )
        .unwrap_err();
        assert!(e.reason.contains("a directory"), "{e}");
        let e = build(&["-k", "@/dev/null"], &[]).unwrap_err();
        assert!(e.reason.contains("a device"), "{e}");
    }

    #[test]
    fn a_byte_order_mark_is_not_an_item() {
        let f = Temp::new("bom", "\u{feff}10.0.0.0/8\n".as_bytes());
        let typed = build_typed(&["-x", "10.0.0.0/8"], &[]).unwrap();
        assert_eq!(build(&["-x", &f.at()], &[]).unwrap(), typed);
    }

    #[test]
    fn too_large_or_binary_files_are_refused() {
        let big = Temp::new("big", &vec![b'\n'; MAX_BYTES as usize + 1]);
        let e = build(&["-i", &big.at()], &[]).unwrap_err();
        assert!(e.reason.contains("larger than 4 MiB"), "{e}");
        let exactly = Temp::new("exact", &vec![b' '; MAX_BYTES as usize]);
        assert!(build(&["-i", &exactly.at()], &[]).is_ok());
        let bin = Temp::new("bin", b"10.0.0.0/8\n\xff\xfe");
        let e = build(&["-i", &bin.at()], &[]).unwrap_err();
        assert!(e.reason.contains("not UTF-8"), "{e}");
    }

    #[test]
    fn a_bad_item_in_a_file_is_reported_with_the_path() {
        let f = Temp::new("bad", b"10.0.0.0/8\n10.0.0.0/33\n");
        let e = build(&["-x", &f.at()], &[]).unwrap_err();
        assert_eq!(e.source_name, "--istio-service-exclude-cidr");
        assert_eq!(e.value, f.at());
        assert_eq!(e.item, None);
        assert!(e.reason.starts_with("the item on line 2 is not"), "{e}");
        assert!(!e.to_string().contains("10.0.0.0/33"), "{e}");
        let secret = Temp::new(
            "secret",
            b"# app\nuser=app\n10.0.0.0/8 db_password=hunter2\n",
        );
        let e = build(&["-x", &secret.at()], &[]).unwrap_err().to_string();
        assert!(
            e.contains("the item on line 2") && !e.contains("user=app"),
            "{e}"
        );
        let e = build(&["-x", &secret.at()], &[]).unwrap_err().to_string();
        assert!(!e.contains("app"), "{e}");
        let line3 = Temp::new("line3", b"10.0.0.0/8\n\n10.1.0.0/16, db_password=hunter2\n");
        let e = build(&["-x", &line3.at()], &[]).unwrap_err().to_string();
        assert!(
            e.contains("item 2 on line 3") && !e.contains("hunter2"),
            "{e}"
        );
        // Names that do not exist on the host: the line too, not the name.
        let users = Temp::new("users", b"0\nno-such-user-9\n");
        let e = build(&["-u", &users.at()], &[]).unwrap_err().to_string();
        assert!(e.contains("line 2") && !e.contains("no-such-user-9"), "{e}");
        let groups = Temp::new("groups-bad", b"java\nsecret-group\n");
        let e = build(&[], &[("ISTIO_OUTBOUND_OWNER_GROUPS", &groups.at())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && !e.contains("secret-group"), "{e}");
        // `*` is refused in -x whether typed or read, and `@` does not nest.
        let star = Temp::new("star", b"*\n");
        assert!(build(&["-x", &star.at()], &[]).is_err());
        let nested = Temp::new("nested", format!("{}\n", f.at()).as_bytes());
        let e = build(&["-x", &nested.at()], &[]).unwrap_err();
        assert_eq!(e.value, nested.at());
        // ... while `*` read from a file means "all" where typing it does.
        let c = build(&["-i", &star.at()], &[]).unwrap();
        assert_eq!(c, build_typed(&["-i", "*"], &[]).unwrap());
    }
}
