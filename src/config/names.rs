//! Interface names that native nftables cannot match as iptables does, refused at the door
//! with `--native-nftables` (without it they reach iptables, which takes them).
//!
//! An interface name means the same on both backends: iptables' trailing `+` (any name that
//! starts with what is before it) is nft's quoted trailing `*`, and a literal `*` at the end
//! is nft's `\*` (the nft text is written in `backend/nft/build.rs`). The one name that has
//! no nft form is `+` alone, every interface: nft refuses the pattern `"*"` ("All-wildcard
//! strings are not supported").

use super::values::Src;
use super::{ConfigError, Iface, quoted};
use crate::cli::Args;

/// Why nft cannot match `name` as iptables does, if it cannot.
fn inexpressible(name: &str) -> Option<&'static str> {
    (name == "+").then_some(
        "(every interface) has no native nftables form: nft refuses the all-wildcard \
         pattern \"*\"; list the interfaces, or drop --native-nftables",
    )
}

/// Refuses, with the flag (or env var) and the value, the first name of `-c`
/// (`exclude_interfaces`) or `-k` (`kube_virt_interfaces`) that nft cannot express.
pub(super) fn check_nft(
    args: &Args,
    exclude_interfaces: &[Iface],
    kube_virt_interfaces: &[Iface],
) -> Result<(), ConfigError> {
    let lists = [
        (
            "istio_exclude_interfaces",
            &args.cli.istio_exclude_interfaces,
            exclude_interfaces,
        ),
        (
            "kube_virt_interfaces",
            &args.cli.kube_virt_interfaces,
            kube_virt_interfaces,
        ),
    ];
    for (id, whole, names) in lists {
        for name in names.iter().map(ToString::to_string) {
            if let Some(why) = inexpressible(&name) {
                let reason = format!("interface name {} {why}", quoted(&name));
                return Err(Src::arg(args, id).err(whole, reason));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::inexpressible;

    #[test]
    fn only_every_interface_has_no_nft_form() {
        assert!(inexpressible("+").is_some());
        for name in ["eth+", "*", "eth*", "a+b", "*+", "bridge", "inet"] {
            assert_eq!(inexpressible(name), None, "{name}");
        }
    }
}
