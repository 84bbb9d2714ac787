//! What doctor shows of the iptables backend: both flavours of both families as the read
//! saw them (an installed flavour the read skipped holds nothing), the kernel features the
//! config's rules need in the flavour they go to, and notes (empty legacy tables, tables
//! iptables-nft-save cannot show).

use super::detect::{self as detection, Program};
use super::{State, our_rules};
use crate::backend::{Inventory, Note, Place, PlaceView};
use crate::config::Flavor;
use crate::model::{Family, Rule};
use crate::system::Env;
use crate::system::kernel_support::Feature;
use crate::system::nftprobe::NfFamily;

use super::build::Plan;

/// The iptables backend's [`Inventory`].
pub fn of(rules: &Plan, state: &State, chosen: bool, env: &Env<'_>) -> Inventory {
    let mut inv = Inventory::default();
    for family in [Family::V4, Family::V6] {
        for flavor in [Flavor::Legacy, Flavor::Nft] {
            inv.places.push(view(family, flavor, state, env));
        }
        // The unflavoured programs, where neither flavour is installed.
        for p in state
            .places
            .iter()
            .filter(|p| p.program.family == family && p.program.flavor.is_none())
        {
            inv.places.push(read_view(p, env));
        }
    }
    for p in state.places.iter().filter(|p| p.target && chosen) {
        let family = p.program.family;
        let wanted = rules.rules(family);
        for f in needs(family, p.program.flavor, wanted) {
            if !inv.needs.contains(&f) {
                inv.needs.push(f);
            }
        }
        // A legacy table a probe made (`iptables-legacy -L`), holding nothing: detection
        // does not count it (istio#61020).
        let legacy = env.probe.legacy_tables(family);
        let legacy_rules = state.places.iter().any(|q| {
            q.program.family == family
                && q.program.flavor == Some(Flavor::Legacy)
                && !q.before.tables_with_rules().is_empty()
        });
        if p.program.flavor == Some(Flavor::Nft) && !legacy.is_empty() && !legacy_rules {
            inv.notes.push(Note {
                problem: format!(
                    "{family}: this namespace has legacy tables ({}) that hold no rules (a \
                     probe such as `iptables-legacy -L` makes them): detection does not count \
                     them and chooses iptables-nft (Istio releases before istio#61024 chose \
                     legacy here)",
                    legacy.join(", ")
                ),
                fix: "nothing to do; FORCE_IPTABLES_BINARY=legacy would choose legacy anyway"
                    .into(),
                blocking: false,
            });
        }
        for name in &p.before.incompatible {
            inv.notes.push(Note {
                problem: format!(
                    "{family}: {} cannot show the nf_tables table {name} (another nft tool, \
                     or a newer one than this image's, wrote it; istio#58492)",
                    p.program.save_program()
                ),
                fix: format!(
                    "look with `nft list table {} {name}`; use an image whose iptables is at \
                     least the node's, or FORCE_IPTABLES_BINARY=legacy",
                    p.program.nft_family()
                ),
                blocking: false,
            });
        }
    }
    inv
}

/// One flavour of one family: as read, installed but empty, or missing.
fn view(family: Family, flavor: Flavor, state: &State, env: &Env<'_>) -> PlaceView {
    if let Some(p) = state
        .places
        .iter()
        .find(|p| p.program.family == family && p.program.flavor == Some(flavor))
    {
        return read_view(p, env);
    }
    let installed = detection::installed(family, flavor, env.probe);
    let program = Program {
        family,
        flavor: Some(flavor),
        reason: String::new(),
    };
    // The read skips a flavour whose tables hold nothing: their names, from the kernel.
    let tables = match (installed.is_some(), flavor) {
        (false, _) => Vec::new(),
        (true, Flavor::Legacy) => env.probe.legacy_tables(family),
        (true, Flavor::Nft) => env
            .probe
            .nft_structure(NfFamily::of(family))
            .map(|t| t.names())
            .unwrap_or_default(),
    };
    PlaceView {
        place: Place::Iptables(family, Some(flavor)),
        installed: installed.is_some(),
        version: installed
            .as_ref()
            .and_then(|_| env.probe.version(&program.restore_program())),
        program: program.restore_program(),
        target: None,
        tables: tables.into_iter().map(|t| (t, 0, 0)).collect(),
    }
}

fn read_view(p: &super::commit::Place, env: &Env<'_>) -> PlaceView {
    let restore = p.program.restore_program();
    PlaceView {
        place: Place::Iptables(p.program.family, p.program.flavor),
        installed: true,
        version: p
            .before
            .version
            .clone()
            .or_else(|| env.probe.version(&restore)),
        program: restore,
        target: p.target.then(|| p.program.reason.clone()),
        tables: p
            .before
            .tables
            .iter()
            .map(|(name, ts)| (name.clone(), ts.rules.len(), our_rules(ts)))
            .collect(),
    }
}

/// The kernel features `rules` need in `flavor`: the tables (legacy: x_tables' own; nft:
/// nat chains, and x_tables in nftables for every match and target), each `-m` and `-j`
/// extension, conntrack zones for `--zone`.
fn needs(family: Family, flavor: Option<Flavor>, rules: &[Rule]) -> Vec<Feature> {
    let mut out: Vec<Feature> = Vec::new();
    let mut push = |f: Option<Feature>| {
        if let Some(f) = f
            && !out.contains(&f)
        {
            out.push(f);
        }
    };
    for r in rules {
        let table = r.table.name();
        match flavor {
            Some(Flavor::Nft) => {
                if table == "nat" {
                    push(Feature::nft("nat"));
                }
            }
            _ => push(Feature::legacy_table(family, table)),
        }
        let mut words = r.args.iter().map(|t| t.as_ref());
        while let Some(w) = words.next() {
            match w {
                "-m" | "--match" => {
                    if flavor == Some(Flavor::Nft) {
                        push(Feature::nft("compat"));
                    }
                    push(words.next().and_then(|m| Feature::xt_match(family, m)));
                }
                "-j" | "--jump" => {
                    let target = words.next().and_then(|t| Feature::xt_target(family, t));
                    if target.is_some() && flavor == Some(Flavor::Nft) {
                        push(Feature::nft("compat"));
                    }
                    push(target);
                }
                "--zone" => push(Feature::nft("zones")),
                _ => {}
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{SEED, build, plan};

    #[test]
    fn needs_follow_the_rules_and_the_flavour() {
        let p = plan(build(SEED, &[]).unwrap());
        let names = |flavor| -> Vec<String> {
            needs(Family::V4, flavor, p.rules(Family::V4))
                .into_iter()
                .map(|f| f.name)
                .collect()
        };
        let nft = names(Some(Flavor::Nft));
        assert!(nft.contains(&"IPv4 -m owner".to_string()), "{nft:?}");
        assert!(nft.contains(&"IPv4 -j REDIRECT".to_string()), "{nft:?}");
        assert!(nft.contains(&"nft compat (x_tables in nftables)".to_string()));
        assert!(!nft.iter().any(|n| n.contains("TPROXY")), "{nft:?}");
        let legacy = names(Some(Flavor::Legacy));
        assert!(
            legacy.contains(&"IPv4 nat table (iptables-legacy)".to_string()),
            "{legacy:?}"
        );
        let tproxy: Vec<&str> = SEED
            .iter()
            .map(|w| if *w == "REDIRECT" { "TPROXY" } else { w })
            .collect();
        let p = plan(build(&tproxy, &[]).unwrap());
        let f: Vec<String> = needs(Family::V4, Some(Flavor::Nft), p.rules(Family::V4))
            .into_iter()
            .map(|f| f.name)
            .collect();
        for n in [
            "IPv4 -j TPROXY",
            "IPv4 -m connmark",
            "IPv4 -j CONNMARK",
            "IPv4 -j MARK",
        ] {
            assert!(f.contains(&n.to_string()), "{n}: {f:?}");
        }
    }
}
