//! VM networking on a host: one Linux bridge per agent (its `network`), carrying the gateway
//! address of the VM subnet; one tap per NIC, attached to the bridge; one address per VM,
//! handed to the guest kernel with `ip=`.
//!
//! Devices are made with iproute2 (`ip`), so what the agent does can be repeated and inspected
//! by hand; every failure comes back with `ip`'s own message.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use sha2::{Digest, Sha256};

/// An IPv4 subnet for VMs: the first host address is the gateway (on the bridge), the rest are
/// handed to VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

impl Subnet {
    /// Parses `A.B.C.D/N`, N in 8..=30 (a /31 or /32 has no room for VMs).
    pub fn parse(text: &str) -> Result<Subnet, String> {
        let (addr, prefix) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?}: expected A.B.C.D/PREFIX"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| format!("{text:?}: bad address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| format!("{text:?}: bad prefix length"))?;
        if !(8..=30).contains(&prefix) {
            return Err(format!("{text:?}: prefix length must be 8..=30"));
        }
        let mask = u32::MAX << (32 - prefix);
        Ok(Subnet {
            network: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
        })
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::MAX << (32 - self.prefix))
    }

    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// The lowest VM address (after the gateway, before broadcast) not in `used`.
    pub fn allocate(&self, used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        let first = u32::from(self.network) + 2;
        let broadcast = u32::from(self.network) | !(u32::MAX << (32 - self.prefix));
        (first..broadcast)
            .map(Ipv4Addr::from)
            .find(|ip| !used.contains(ip))
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = u32::MAX << (32 - self.prefix);
        u32::from(ip) & mask == u32::from(self.network)
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// Checks a network interface name: 1..=15 bytes of letters, digits, '-', '_' and '.'.
pub fn check_ifname(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?}: an interface name is 1..=15 letters, digits, '-', '_' or '.'"
        ))
    }
}

/// The tap of NIC `nic_index` (0..=9) of VM `vm_id`: `fv` + 11 hex digits of the id's sha256 +
/// the index. Deterministic, so an operator (or a test) can find a VM's tap from its id.
pub fn tap_name(vm_id: &str, nic_index: usize) -> String {
    let digest = hex::encode(Sha256::digest(vm_id.as_bytes()));
    format!("fv{}{}", &digest[..11], nic_index)
}

/// The most NICs a VM may have (one decimal digit in the tap name).
pub const MAX_NICS: usize = 10;

/// The locally administered MAC derived from a VM id and NIC index, for NICs without one.
pub fn default_mac(vm_id: &str, nic_index: usize) -> String {
    let digest = Sha256::digest(format!("{vm_id}/{nic_index}").as_bytes());
    format!(
        "52:54:{:02x}:{:02x}:{:02x}:{:02x}",
        digest[0], digest[1], digest[2], digest[3]
    )
}

/// Checks a MAC written as six colon-separated hex octets, unicast.
pub fn check_mac(mac: &str) -> Result<(), String> {
    let octets: Vec<&str> = mac.split(':').collect();
    let valid = octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && u8::from_str_radix(o, 16).is_ok());
    if !valid {
        return Err(format!(
            "MAC {mac:?}: expected six hex octets like 52:54:00:12:34:56"
        ));
    }
    let first = u8::from_str_radix(octets[0], 16).unwrap_or(1);
    if first & 1 == 1 {
        return Err(format!(
            "MAC {mac:?}: a multicast address cannot be a NIC's"
        ));
    }
    Ok(())
}

/// True when an interface of this name exists in the agent's network namespace.
pub fn interface_exists(name: &str) -> bool {
    let Ok(c_name) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: `c_name` is a valid NUL-terminated string that outlives the call.
    unsafe { libc::if_nametoindex(c_name.as_ptr()) != 0 }
}

/// Runs `ip ARGS`, returning its error output on failure.
async fn ip(args: &[&str]) -> Result<(), String> {
    let output = tokio::process::Command::new("ip")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot run `ip`: {e} (is iproute2 installed?)"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Makes sure the bridge exists, carries the gateway address and is up.
pub async fn ensure_bridge(bridge: &str, subnet: &Subnet) -> Result<(), String> {
    if !interface_exists(bridge) {
        ip(&["link", "add", "name", bridge, "type", "bridge"]).await?;
    }
    let gateway = format!("{}/{}", subnet.gateway(), subnet.prefix());
    ip(&["addr", "replace", &gateway, "dev", bridge]).await?;
    ip(&["link", "set", "dev", bridge, "up"]).await
}

/// Creates tap `name` on `bridge`. `ours` says the agent made a tap of this name for this VM
/// before (a restart of the VM or of the agent): it is then reused; any other existing
/// interface of that name is an error.
pub async fn create_tap(name: &str, bridge: &str, ours: bool) -> Result<(), String> {
    if interface_exists(name) {
        if !ours {
            return Err(format!(
                "tap {name} already exists and was not made by this agent for this VM"
            ));
        }
    } else {
        ip(&["tuntap", "add", "dev", name, "mode", "tap"]).await?;
    }
    if let Err(err) = ip(&["link", "set", "dev", name, "master", bridge, "up"]).await {
        if !ours {
            let _ = delete_tap(name).await;
        }
        return Err(err);
    }
    Ok(())
}

/// Deletes tap `name`; a tap that is already gone is fine.
pub async fn delete_tap(name: &str) -> Result<(), String> {
    if !interface_exists(name) {
        return Ok(());
    }
    ip(&["link", "del", "dev", name]).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_allocate_after_the_gateway_and_before_broadcast() {
        let s = Subnet::parse("10.1.2.77/29").unwrap();
        assert_eq!(s.to_string(), "10.1.2.72/29");
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 1, 2, 73));
        assert_eq!(s.netmask(), Ipv4Addr::new(255, 255, 255, 248));
        let mut used = BTreeSet::new();
        let mut got = Vec::new();
        while let Some(ip) = s.allocate(&used) {
            used.insert(ip);
            got.push(ip.octets()[3]);
        }
        assert_eq!(got, [74, 75, 76, 77, 78]);
        assert!(s.contains(Ipv4Addr::new(10, 1, 2, 79)));
        assert!(!s.contains(Ipv4Addr::new(10, 1, 2, 80)));
        for bad in [
            "10.0.0.0",
            "10.0.0.0/31",
            "10.0.0.0/7",
            "x/24",
            "10.0.0.0/a",
        ] {
            assert!(Subnet::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tap_names_fit_and_are_stable() {
        let a = tap_name("vm-1", 0);
        assert_eq!(a.len(), 14);
        assert_eq!(a, tap_name("vm-1", 0));
        assert_ne!(a, tap_name("vm-1", 1));
        assert_ne!(a, tap_name("vm-2", 0));
        check_ifname(&a).unwrap();
        check_mac(&default_mac("vm-1", 0)).unwrap();
    }

    #[test]
    fn macs_and_names_are_checked() {
        check_mac("52:54:00:12:34:56").unwrap();
        for bad in [
            "52:54:00:12:34",
            "zz:54:00:12:34:56",
            "01:00:5e:00:00:01",
            "",
        ] {
            assert!(check_mac(bad).is_err(), "{bad}");
        }
        for bad in ["", "sixteen-chars-xx", "a b", "a/b"] {
            assert!(check_ifname(bad).is_err(), "{bad}");
        }
    }
}
