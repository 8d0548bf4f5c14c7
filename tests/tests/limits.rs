//! The limits the controller checks on behalf of the hosts (issue 15): a spec it accepts must
//! boot on a host, so what it counts for the agent's and fabric-vmm's additions (devices,
//! kernel command line) must be at least what they really add.

use fabric_controller::validate;

#[test]
fn the_controller_counts_at_least_what_hosts_add() {
    assert_eq!(
        validate::HOST_MAX_CMDLINE,
        fabric_vmm::config::MAX_CMDLINE_LEN - 1,
        "the command line fabric-vmm passes, less the NUL"
    );
    assert_eq!(
        validate::HOST_MAX_DEVICES,
        fabric_vmm::devices::virtio::MAX_VIRTIO_DEVICES
    );
    // With the space before the spec's own line.
    let base = format!("{} ", fabric_agent::kvm::BASE_CMDLINE);
    assert!(base.len() <= validate::HOST_CMDLINE_BASE, "{base:?}");
    assert_eq!(" root=/dev/vda rw".len(), validate::HOST_CMDLINE_ROOT);
    let ip = " ip=255.255.255.255::255.255.255.255:255.255.255.255::eth0:off";
    assert!(ip.len() <= validate::HOST_CMDLINE_IP, "{}", ip.len());
    for index in 0..fabric_vmm::devices::virtio::MAX_VIRTIO_DEVICES {
        let slot = fabric_vmm::devices::virtio::MmioSlot::for_index(index).expect("a slot");
        let announced = format!(" {}", slot.cmdline_arg());
        assert!(
            announced.len() <= validate::HOST_CMDLINE_PER_DEVICE,
            "{announced:?}"
        );
    }
}
