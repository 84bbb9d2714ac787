//! What doctor shows of the native nftables backend: the `inet` tables (ours as the read
//! saw them, and the others'), `nft` and its version, the kernel features the config's
//! rules need, and what stops an apply (no `nft`, one too old).

use super::State;
use super::build::{Ruleset, Table};
use super::commit::check_nft;
use crate::backend::{Inventory, Note, Place, PlaceView};
use crate::system::Env;
use crate::system::kernel_support::Feature;
use crate::system::nftprobe::NfFamily;

/// The native nftables backend's [`Inventory`].
pub fn of(rules: &Ruleset, state: &State, chosen: bool, env: &Env<'_>) -> Inventory {
    let mut tables: Vec<(String, usize, usize)> = state
        .live
        .state
        .tables
        .iter()
        .map(|(t, ts)| {
            let n = ts.chains.iter().map(|c| c.rules.len()).sum();
            (t.name().to_string(), n, n)
        })
        .collect();
    // The others' inet tables (rules counted in base chains, as netlink shows them).
    if let Some(nf) = env.probe.nft_structure(NfFamily::Inet) {
        for t in nf
            .tables
            .iter()
            .filter(|t| Table::from_name(&t.name).is_none())
        {
            let n = t.chains.iter().filter_map(|c| c.rules).sum();
            tables.push((t.name.clone(), n, 0));
        }
    }
    let mut inv = Inventory {
        places: vec![PlaceView {
            place: Place::Nftables,
            program: "nft".into(),
            installed: env.probe.in_path("nft"),
            version: env.probe.version("nft"),
            target: chosen.then(|| "--native-nftables".to_string()),
            tables,
        }],
        ..Inventory::default()
    };
    if !chosen {
        return inv;
    }
    if let Err(e) = check_nft(env) {
        inv.notes.push(Note {
            problem: e.to_string(),
            fix: "install nftables (nft 1.0.1 or later) in this container's image, or run \
                  without --native-nftables (NATIVE_NFTABLES=false)"
                .into(),
            blocking: true,
        });
    }
    inv.needs = needs(rules);
    inv
}

/// The kernel features `rules` need: nat chains, and the expressions they use.
fn needs(rules: &Ruleset) -> Vec<Feature> {
    let mut out: Vec<Feature> = Vec::new();
    let mut push = |part: &str| {
        if let Some(f) = Feature::nft(part)
            && !out.contains(&f)
        {
            out.push(f);
        }
    };
    for r in &rules.rules {
        if r.table == Table::Nat {
            push("nat");
        }
        let words: Vec<&str> = r.expr.split_whitespace().collect();
        for (i, w) in words.iter().enumerate() {
            match *w {
                "redirect" => push("redir"),
                "tproxy" => push("tproxy"),
                "socket" => push("socket"),
                "ct" => {
                    push("ct");
                    if words.get(i + 1) == Some(&"zone") {
                        push("zones");
                    }
                }
                _ => {}
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::{SEED, build};

    #[test]
    fn needs_follow_the_expressions() {
        let names = |argv: &[&str]| -> Vec<String> {
            let (cfg, facts) = build(argv, &[]).unwrap();
            needs(&super::super::build::build(&cfg, &facts))
                .into_iter()
                .map(|f| f.name)
                .collect()
        };
        let mut redirect = vec!["--native-nftables"];
        redirect.extend_from_slice(SEED);
        let r = names(&redirect);
        assert!(r.contains(&"nft redirect".to_string()), "{r:?}");
        assert!(r.contains(&"nft nat chains".to_string()), "{r:?}");
        assert!(!r.contains(&"nft tproxy".to_string()), "{r:?}");
        let tproxy: Vec<&str> = redirect
            .iter()
            .map(|w| if *w == "REDIRECT" { "TPROXY" } else { w })
            .collect();
        let t = names(&tproxy);
        for n in ["nft tproxy", "nft ct"] {
            assert!(t.contains(&n.to_string()), "{n}: {t:?}");
        }
    }
}
