//! VM networking on a host: one Linux bridge per agent (its `network`), carrying the gateway
//! address of the VM subnet; one tap per NIC, attached to the bridge; one address per VM,
//! handed to the guest kernel with `ip=`.
//!
//! Devices are made in-process, with no helper program: links and addresses over rtnetlink
//! (the kernel interface `ip` itself speaks), and taps with the TUN ioctls on `/dev/net/tun`,
//! since the kernel refuses to create a tap over netlink. A netlink socket acts in the network
//! namespace of the thread that opened it, so everything here happens in the namespace the
//! agent runs in (and a test can confine it to one of its own). What the agent made is plain
//! kernel state, inspected by hand with `ip link` and `ip addr`. Every failure names the step
//! and the interface, with the kernel's errno.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use futures::TryStreamExt;
use rtnetlink::{Handle, LinkBridge, LinkMessageBuilder, LinkUnspec};
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

/// A failed network step, naming the interface it was for.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("cannot open a netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("cannot look up interface {name}: {reason}")]
    Lookup { name: String, reason: String },
    #[error("cannot create bridge {name}: {reason}")]
    CreateBridge { name: String, reason: String },
    #[error("cannot set address {address} on {name}: {reason}")]
    SetAddress {
        name: String,
        address: String,
        reason: String,
    },
    #[error("cannot bring {name} up: {reason}")]
    LinkUp { name: String, reason: String },
    #[error("tap {name} already exists and was not made by this agent for this VM")]
    TapTaken { name: String },
    #[error("cannot create tap {name}: {reason}")]
    CreateTap { name: String, reason: String },
    #[error("cannot attach tap {name} to bridge {bridge}: {reason}")]
    AttachTap {
        name: String,
        bridge: String,
        reason: String,
    },
    #[error("cannot delete tap {name}: {reason}")]
    DeleteTap { name: String, reason: String },
    /// A new tap could not be set up, nor removed again: the name stays taken until an
    /// operator deletes it.
    #[error("{error}; and the new tap is left behind: {cleanup}")]
    LeftBehind {
        error: Box<NetworkError>,
        cleanup: Box<NetworkError>,
    },
}

/// True when an interface of this name exists in the agent's network namespace.
pub fn interface_exists(name: &str) -> bool {
    nix::net::if_::if_nametoindex(name).is_ok()
}

/// The errno a netlink request was refused with, if the kernel refused it.
fn refusal(error: &rtnetlink::Error) -> Option<nix::errno::Errno> {
    match error {
        rtnetlink::Error::NetlinkError(message) => {
            Some(nix::errno::Errno::from_raw(message.raw_code().abs()))
        }
        _ => None,
    }
}

/// A netlink error as the kernel's message ("File exists (os error 17)") rather than rtnetlink's
/// wrapping of it.
fn reason(error: rtnetlink::Error) -> String {
    match error {
        rtnetlink::Error::NetlinkError(message) => message.to_io().to_string(),
        other => other.to_string(),
    }
}

/// One rtnetlink connection, opened in the namespace of the calling thread. Its I/O task runs on
/// the current tokio runtime and ends when the `Netlink` is dropped.
struct Netlink {
    handle: Handle,
}

impl Netlink {
    fn open() -> Result<Netlink, NetworkError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(NetworkError::Socket)?;
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    /// The index of interface `name`, `None` when there is none.
    async fn index(&self, name: &str) -> Result<Option<u32>, NetworkError> {
        let mut links = self.handle.link().get().match_name(name).execute();
        match links.try_next().await {
            Ok(link) => Ok(link.map(|link| link.header.index)),
            Err(error) if refusal(&error) == Some(nix::errno::Errno::ENODEV) => Ok(None),
            Err(error) => Err(NetworkError::Lookup {
                name: name.to_string(),
                reason: reason(error),
            }),
        }
    }

    /// Brings interface `index` (called `name`) up.
    async fn set_up(&self, index: u32, name: &str) -> Result<(), NetworkError> {
        let message = LinkUnspec::new_with_index(index).up().build();
        self.handle
            .link()
            .change(message)
            .execute()
            .await
            .map_err(|error| NetworkError::LinkUp {
                name: name.to_string(),
                reason: reason(error),
            })
    }
}

/// Makes sure the bridge exists, carries the gateway address and is up.
pub async fn ensure_bridge(bridge: &str, subnet: &Subnet) -> Result<(), NetworkError> {
    let netlink = Netlink::open()?;
    let index = match netlink.index(bridge).await? {
        Some(index) => index,
        None => {
            let message = LinkMessageBuilder::<LinkBridge>::new(bridge).build();
            netlink
                .handle
                .link()
                .add(message)
                .execute()
                .await
                .map_err(|error| NetworkError::CreateBridge {
                    name: bridge.to_string(),
                    reason: reason(error),
                })?;
            netlink
                .index(bridge)
                .await?
                .ok_or_else(|| NetworkError::CreateBridge {
                    name: bridge.to_string(),
                    reason: "gone right after it was created".to_string(),
                })?
        }
    };
    // Replace, not add: a restarted agent finds its address already there.
    netlink
        .handle
        .address()
        .add(index, subnet.gateway().into(), subnet.prefix())
        .replace()
        .execute()
        .await
        .map_err(|error| NetworkError::SetAddress {
            name: bridge.to_string(),
            address: format!("{}/{}", subnet.gateway(), subnet.prefix()),
            reason: reason(error),
        })?;
    netlink.set_up(index, bridge).await
}

// TUNSETIFF reads the name and flags from an ifreq and writes the final name back into it.
nix::ioctl_readwrite_bad!(tun_set_iff, libc::TUNSETIFF, libc::ifreq);
nix::ioctl_write_int_bad!(tun_set_persist, libc::TUNSETPERSIST);

/// Creates tap `name` and makes it persistent, so it outlives the descriptor that made it (the
/// VMM opens it again by name). The same calls as `ip tuntap add mode tap`, IFF_TUN_EXCL
/// included: an interface of that name made by someone else in the meantime is an error
/// instead of being taken over.
fn create_persistent_tap(name: &str) -> Result<(), NetworkError> {
    let failed = |reason: String| NetworkError::CreateTap {
        name: name.to_string(),
        reason,
    };
    check_ifname(name).map_err(failed)?;
    let tun: File = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| failed(format!("/dev/net/tun: {e}")))?;
    // SAFETY: ifreq is plain old data (a name array and a union of integers): all-zero is valid.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    // check_ifname above: at most 15 bytes, no NUL, so the name stays NUL-terminated.
    for (dst, &src) in request.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = src as libc::c_char;
    }
    // Casting to c_short keeps the bits: IFF_TUN_EXCL is 0x8000, the sign bit of the field.
    request.ifr_ifru.ifru_flags =
        (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_TUN_EXCL) as libc::c_short;
    // SAFETY: `tun` is an open /dev/net/tun descriptor and `request` a valid, initialised ifreq
    // that lives across the call; TUNSETIFF reads and writes only that struct.
    unsafe { tun_set_iff(tun.as_raw_fd(), &mut request) }.map_err(|errno| match errno {
        nix::errno::Errno::EBUSY => failed("an interface of that name already exists".into()),
        other => failed(format!("TUNSETIFF: {}", std::io::Error::from(other))),
    })?;
    // SAFETY: `tun` is the descriptor just attached to the tap; TUNSETPERSIST takes an int
    // by value and touches no memory of ours.
    unsafe { tun_set_persist(tun.as_raw_fd(), 1) }
        .map_err(|errno| failed(format!("TUNSETPERSIST: {}", std::io::Error::from(errno))))?;
    // Closing `tun` leaves the persistent tap; had TUNSETPERSIST failed, closing it would have
    // removed the half-made tap.
    Ok(())
}

/// Creates tap `name` on `bridge`. `ours` says the agent made a tap of this name for this VM
/// before (a restart of the VM or of the agent): it is then reused; any other existing
/// interface of that name is an error.
pub async fn create_tap(name: &str, bridge: &str, ours: bool) -> Result<(), NetworkError> {
    let netlink = Netlink::open()?;
    if netlink.index(name).await?.is_some() {
        if !ours {
            return Err(NetworkError::TapTaken {
                name: name.to_string(),
            });
        }
    } else {
        create_persistent_tap(name)?;
    }
    if let Err(err) = attach_tap(&netlink, name, bridge).await {
        // A tap that is not ours is not in the VM's record, so nothing else would ever delete
        // it, and the next start would find the name taken: remove it here, and say so if that
        // fails too.
        if !ours {
            if let Err(cleanup) = delete_tap_with(&netlink, name).await {
                return Err(NetworkError::LeftBehind {
                    error: Box::new(err),
                    cleanup: Box::new(cleanup),
                });
            }
        }
        return Err(err);
    }
    Ok(())
}

/// Enslaves tap `name` to `bridge` and brings it up (`ip link set dev NAME master BRIDGE up`).
async fn attach_tap(netlink: &Netlink, name: &str, bridge: &str) -> Result<(), NetworkError> {
    let failed = |reason: String| NetworkError::AttachTap {
        name: name.to_string(),
        bridge: bridge.to_string(),
        reason,
    };
    let bridge_index = netlink
        .index(bridge)
        .await?
        .ok_or_else(|| failed(format!("no interface {bridge}")))?;
    let tap_index = netlink
        .index(name)
        .await?
        .ok_or_else(|| failed(format!("no interface {name}")))?;
    let message = LinkUnspec::new_with_index(tap_index)
        .controller(bridge_index)
        .up()
        .build();
    netlink
        .handle
        .link()
        .change(message)
        .execute()
        .await
        .map_err(|error| failed(reason(error)))
}

/// Deletes tap `name`; a tap that is already gone is fine.
pub async fn delete_tap(name: &str) -> Result<(), NetworkError> {
    delete_tap_with(&Netlink::open()?, name).await
}

async fn delete_tap_with(netlink: &Netlink, name: &str) -> Result<(), NetworkError> {
    let Some(index) = netlink.index(name).await? else {
        return Ok(());
    };
    match netlink.handle.link().del(index).execute().await {
        Ok(()) => Ok(()),
        // Gone between the look-up and the delete: the same outcome.
        Err(error) if refusal(&error) == Some(nix::errno::Errno::ENODEV) => Ok(()),
        Err(error) => Err(NetworkError::DeleteTap {
            name: name.to_string(),
            reason: reason(error),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::address::AddressAttribute;
    use rtnetlink::packet_route::link::{
        InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
    };

    /// Runs `test` on a thread of its own, in a network namespace of its own (unshare) and on a
    /// current-thread runtime, so the netlink sockets it opens act there. The namespace has no
    /// name and nothing else holds it: it and every link made in it go away when the thread
    /// ends, whether the test passed, failed or panicked. Needs root, as the agent does.
    fn in_private_netns<F, Fut>(test: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        let thread = std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("unshare(CLONE_NEWNET) (the network tests run as root)");
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime")
                .block_on(test());
        });
        if let Err(panic) = thread.join() {
            std::panic::resume_unwind(panic);
        }
    }

    /// What the kernel says of link `name` (over a connection of the test's own), or `None`.
    async fn link(name: &str) -> Option<LinkMessage> {
        let netlink = Netlink::open().unwrap();
        let found = netlink
            .handle
            .link()
            .get()
            .match_name(name)
            .execute()
            .try_next()
            .await;
        match found {
            Ok(link) => link,
            Err(error) if refusal(&error) == Some(nix::errno::Errno::ENODEV) => None,
            Err(error) => panic!("look up {name}: {error}"),
        }
    }

    fn kind(link: &LinkMessage) -> Option<InfoKind> {
        link.attributes
            .iter()
            .find_map(|attribute| match attribute {
                LinkAttribute::LinkInfo(infos) => infos.iter().find_map(|info| match info {
                    LinkInfo::Kind(kind) => Some(kind.clone()),
                    _ => None,
                }),
                _ => None,
            })
    }

    fn controller(link: &LinkMessage) -> Option<u32> {
        link.attributes
            .iter()
            .find_map(|attribute| match attribute {
                LinkAttribute::Controller(index) => Some(*index),
                _ => None,
            })
    }

    /// The IPv4 addresses on interface `index`, as "A.B.C.D/N".
    async fn addresses(index: u32) -> Vec<String> {
        let netlink = Netlink::open().unwrap();
        let messages: Vec<_> = netlink
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .unwrap();
        messages
            .iter()
            .flat_map(|message| {
                message
                    .attributes
                    .iter()
                    .filter_map(move |attribute| match attribute {
                        AddressAttribute::Address(ip @ std::net::IpAddr::V4(_)) => {
                            Some(format!("{ip}/{}", message.header.prefix_len))
                        }
                        _ => None,
                    })
            })
            .collect()
    }

    #[test]
    fn bridge_is_made_once_with_the_gateway_address_and_up() {
        in_private_netns(|| async {
            let subnet = Subnet::parse("10.77.3.0/24").unwrap();
            assert!(!interface_exists("fbr0"));
            ensure_bridge("fbr0", &subnet).await.unwrap();
            let bridge = link("fbr0").await.expect("bridge made");
            assert_eq!(kind(&bridge), Some(InfoKind::Bridge));
            assert!(bridge.header.flags.contains(LinkFlags::Up));
            assert!(interface_exists("fbr0"));
            assert_eq!(addresses(bridge.header.index).await, ["10.77.3.1/24"]);

            // Idempotent: the same bridge, still one address.
            ensure_bridge("fbr0", &subnet).await.unwrap();
            let again = link("fbr0").await.unwrap();
            assert_eq!(again.header.index, bridge.header.index);
            assert_eq!(addresses(again.header.index).await, ["10.77.3.1/24"]);
        });
    }

    #[test]
    fn taps_are_made_on_the_bridge_reused_only_when_ours_and_deleted_once() {
        in_private_netns(|| async {
            let subnet = Subnet::parse("10.77.4.0/24").unwrap();
            ensure_bridge("fbr0", &subnet).await.unwrap();
            let bridge = link("fbr0").await.unwrap().header.index;

            create_tap("fvtap0", "fbr0", false).await.unwrap();
            let tap = link("fvtap0").await.expect("tap made");
            assert_eq!(kind(&tap), Some(InfoKind::Tun));
            assert_eq!(controller(&tap), Some(bridge));
            assert!(tap.header.flags.contains(LinkFlags::Up));

            // Someone else's interface of that name is never taken over.
            let err = create_tap("fvtap0", "fbr0", false).await.unwrap_err();
            assert!(matches!(err, NetworkError::TapTaken { .. }), "{err}");
            assert!(err.to_string().contains("fvtap0"), "{err}");
            assert!(
                link("fvtap0").await.is_some(),
                "a refused tap is not deleted"
            );
            // Ours (the VM or the agent restarted): reused as it is.
            create_tap("fvtap0", "fbr0", true).await.unwrap();
            assert_eq!(link("fvtap0").await.unwrap().header.index, tap.header.index);

            delete_tap("fvtap0").await.unwrap();
            assert!(link("fvtap0").await.is_none());
            delete_tap("fvtap0").await.unwrap();

            // Ours but gone (the host rebooted): made again.
            create_tap("fvtap0", "fbr0", true).await.unwrap();
            assert_eq!(controller(&link("fvtap0").await.unwrap()), Some(bridge));
        });
    }

    #[test]
    fn a_tap_that_cannot_join_its_bridge_is_not_left_behind() {
        in_private_netns(|| async {
            let err = create_tap("fvtap1", "nobridge", false).await.unwrap_err();
            let message = err.to_string();
            assert!(
                message.contains("fvtap1") && message.contains("nobridge"),
                "{message}"
            );
            assert!(link("fvtap1").await.is_none(), "the new tap was removed");
        });
    }

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
