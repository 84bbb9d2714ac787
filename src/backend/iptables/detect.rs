//! Which iptables to drive: legacy or nft, decided the way Istio master does (istio#61024),
//! without side effects: legacy when its binary exists and this namespace's legacy tables
//! hold a rule (an `-A`/`-I` line of `iptables-legacy-save`: an empty legacy table, which a
//! mere `iptables-legacy -L` or `-C` creates, does not count), otherwise nft when installed,
//! otherwise legacy, otherwise the plain `iptables-restore` on PATH. `--force-iptables-binary`
//! overrides. Pure over [`Probe`] (what is installed) and the legacy tables the caller read.

use std::fmt;

use crate::config::Flavor;
use crate::model::Family;
use crate::system::host_view::Probe;

/// The iptables programs chosen for one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program {
    pub family: Family,
    /// None: the unflavoured `iptables-*` programs on PATH.
    pub flavor: Option<Flavor>,
    /// Why it was chosen, for the log.
    pub reason: String,
}

impl Program {
    fn base(&self) -> &'static str {
        match self.family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    /// e.g. `iptables-nft-save`.
    pub fn save_program(&self) -> String {
        match self.flavor {
            Some(f) => format!("{}-{f}-save", self.base()),
            None => format!("{}-save", self.base()),
        }
    }

    /// The place as logs name it: `iptables-nft`, `ip6tables-legacy` (`iptables`
    /// unflavoured): the program names the family too, and has no space in a log field.
    pub fn place_name(&self) -> String {
        match self.flavor {
            Some(f) => format!("{}-{f}", self.base()),
            None => self.base().to_string(),
        }
    }

    /// e.g. `ip6tables-legacy-restore`.
    pub fn restore_program(&self) -> String {
        match self.flavor {
            Some(f) => format!("{}-{f}-restore", self.base()),
            None => format!("{}-restore", self.base()),
        }
    }

    /// Whether the xtables lock applies (legacy, or unknown flavour).
    pub fn uses_lock(&self) -> bool {
        self.flavor != Some(Flavor::Nft)
    }

    /// The nft family name of this backend's tables.
    pub fn nft_family(&self) -> &'static str {
        match self.family {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }
}

impl fmt::Display for Program {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.restore_program(), self.reason)
    }
}

/// No usable iptables.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("no {program} found in PATH: install iptables (legacy or nft)")]
pub struct NotInstalled {
    pub program: String,
}
/// The programs of `flavor` for `family`, when both its restore and save are installed.
pub fn installed(family: Family, flavor: Flavor, probe: &dyn Probe) -> Option<Program> {
    detect(family, Some(flavor), probe, &[])
        .ok()
        .map(|p| Program {
            reason: "read: it may hold state of ours".into(),
            ..p
        })
}

/// Chooses the backend for `family`; `legacy_with_rules`: the legacy tables of `family`
/// that hold a rule (read with `iptables-legacy-save`).
pub fn detect(
    family: Family,
    forced: Option<Flavor>,
    probe: &dyn Probe,
    legacy_with_rules: &[String],
) -> Result<Program, NotInstalled> {
    let base = match family {
        Family::V4 => "iptables",
        Family::V6 => "ip6tables",
    };
    let have = |f: Flavor| {
        probe.in_path(&format!("{base}-{f}-restore")) && probe.in_path(&format!("{base}-{f}-save"))
    };
    if let Some(f) = forced {
        if !have(f) {
            return Err(NotInstalled {
                program: format!("{base}-{f}-restore"),
            });
        }
        return Ok(Program {
            family,
            flavor: Some(f),
            reason: "forced by --force-iptables-binary".into(),
        });
    }
    if !legacy_with_rules.is_empty() && have(Flavor::Legacy) {
        return Ok(Program {
            family,
            flavor: Some(Flavor::Legacy),
            reason: format!(
                "this namespace's legacy tables hold rules ({})",
                legacy_with_rules.join(", ")
            ),
        });
    }
    if have(Flavor::Nft) {
        return Ok(Program {
            family,
            flavor: Some(Flavor::Nft),
            reason: "no legacy rules in this namespace".into(),
        });
    }
    if have(Flavor::Legacy) {
        return Ok(Program {
            family,
            flavor: Some(Flavor::Legacy),
            reason: "iptables-nft is not installed".into(),
        });
    }
    if probe.in_path(&format!("{base}-restore")) && probe.in_path(&format!("{base}-save")) {
        return Ok(Program {
            family,
            flavor: None,
            reason: "only the unflavoured iptables is installed".into(),
        });
    }
    Err(NotInstalled {
        program: format!("{base}-restore"),
    })
}
#[cfg(test)]
mod tests {
    use super::*;

    struct Fake {
        installed: Vec<&'static str>,
        legacy: Vec<&'static str>,
    }

    impl Probe for Fake {
        fn in_path(&self, p: &str) -> bool {
            // An entry names a program, or a flavour prefix such as `iptables-nft`.
            self.installed
                .iter()
                .any(|i| p == *i || p.starts_with(&format!("{i}-")))
        }
        fn legacy_tables(&self, _: Family) -> Vec<String> {
            Vec::new()
        }
    }

    fn detect(
        family: Family,
        forced: Option<Flavor>,
        fake: &Fake,
    ) -> Result<Program, NotInstalled> {
        let with_rules: Vec<String> = fake.legacy.iter().map(|s| s.to_string()).collect();
        super::detect(family, forced, fake, &with_rules)
    }

    #[test]
    fn legacy_only_when_its_tables_hold_rules() {
        let both = vec!["iptables-legacy", "iptables-nft"];
        let b = detect(
            Family::V4,
            None,
            &Fake {
                installed: both.clone(),
                legacy: vec![],
            },
        )
        .unwrap();
        assert_eq!(b.restore_program(), "iptables-nft-restore");
        let b = detect(
            Family::V4,
            None,
            &Fake {
                installed: both.clone(),
                legacy: vec!["nat"],
            },
        )
        .unwrap();
        assert_eq!(b.restore_program(), "iptables-legacy-restore");
        assert!(b.reason.contains("nat"));
        let b = detect(
            Family::V4,
            Some(Flavor::Nft),
            &Fake {
                installed: both,
                legacy: vec!["nat"],
            },
        )
        .unwrap();
        assert_eq!(b.save_program(), "iptables-nft-save");
    }

    #[test]
    fn fallbacks_and_missing() {
        let b = detect(
            Family::V6,
            None,
            &Fake {
                installed: vec!["ip6tables-legacy"],
                legacy: vec![],
            },
        )
        .unwrap();
        assert_eq!(b.restore_program(), "ip6tables-legacy-restore");
        let plain = vec!["ip6tables-restore", "ip6tables-save"];
        let b = detect(
            Family::V6,
            None,
            &Fake {
                installed: plain,
                legacy: vec![],
            },
        )
        .unwrap();
        assert_eq!(b.restore_program(), "ip6tables-restore");
        assert!(
            detect(
                Family::V4,
                None,
                &Fake {
                    installed: vec![],
                    legacy: vec![]
                }
            )
            .is_err()
        );
        assert!(
            detect(
                Family::V4,
                Some(Flavor::Legacy),
                &Fake {
                    installed: vec!["iptables-nft"],
                    legacy: vec![]
                }
            )
            .is_err()
        );
    }
}
