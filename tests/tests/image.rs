//! Checks the guest image in `images/out/` (built by `images/build.sh`)
//! without booting it: the kernel is a gzip bzImage carrying the config
//! fragment, the initramfs holds /init and busybox, the manifest is right.

use fabric_test_support::image::{
    bzimage_kernel, embedded_config, parse_fragment, read_initramfs, sha256_file,
    unmet_requirements, BzImageHeader, GuestMode, Image, KernelConfig, INITRAMFS, ROOTFS,
    TESTGUEST, VMLINUX, VMLINUZ,
};

/// The image, or a failure telling how to build it (never a silent skip).
fn image() -> Image {
    match Image::load() {
        Ok(image) => image,
        Err(e) => panic!("{e:#}"),
    }
}

#[test]
fn vmlinuz_is_a_gzip_bzimage_with_the_fragment_applied() {
    let image = image();
    let bz = image.read(VMLINUZ).expect("reading vmlinuz");
    let header = BzImageHeader::parse(&bz).expect("vmlinuz is not a valid bzImage");
    assert!(
        header.protocol >= 0x020c,
        "boot protocol {:#x}",
        header.protocol
    );

    let version = header
        .kernel_version(&bz)
        .expect("the bzImage has no kernel version string");
    assert!(
        version.starts_with(&format!("{} ", image.manifest.kernel_release)),
        "bzImage version {version:?} does not match the manifest's kernel_release {:?}",
        image.manifest.kernel_release
    );

    let kernel = bzimage_kernel(&bz).expect("decompressing the bzImage payload");
    let config_text = embedded_config(&kernel).expect("reading the embedded kernel config");
    let config = KernelConfig::parse(&config_text);

    let fragment_path = fabric_test_support::image::fragment_path();
    let fragment_text = std::fs::read_to_string(&fragment_path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", fragment_path.display()));
    let fragment = parse_fragment(&fragment_text);
    assert!(
        fragment.len() > 40,
        "only {} requirements parsed from {}",
        fragment.len(),
        fragment_path.display()
    );
    let unmet = unmet_requirements(&fragment, &config);
    assert!(
        unmet.is_empty(),
        "the kernel in {} does not satisfy {} (stale image? run images/build.sh):\n  {}",
        image.path(VMLINUZ).display(),
        fragment_path.display(),
        unmet.join("\n  ")
    );
    // The .config shipped next to the kernel is the embedded one.
    let shipped =
        std::fs::read_to_string(image.path("kernel.config")).expect("reading kernel.config");
    assert_eq!(
        shipped, config_text,
        "kernel.config differs from the config embedded in vmlinuz"
    );
}

#[test]
fn vmlinux_is_an_x86_64_elf() {
    let image = image();
    let elf = image.read(VMLINUX).expect("reading vmlinux");
    assert!(elf.len() > 64, "vmlinux is too short");
    assert_eq!(&elf[..4], b"\x7fELF", "vmlinux has no ELF magic");
    assert_eq!(elf[4], 2, "vmlinux is not ELFCLASS64");
    assert_eq!(
        u16::from_le_bytes([elf[18], elf[19]]),
        0x3e,
        "vmlinux is not EM_X86_64"
    );
}

#[test]
fn initramfs_holds_init_and_busybox() {
    let image = image();
    let entries = read_initramfs(&image.path(INITRAMFS)).expect("unpacking the initramfs");
    let get = |name: &str| {
        entries
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("the initramfs has no {name}"))
    };

    let init = get("init");
    assert!(
        init.is_file(),
        "/init is not a regular file (mode {:o})",
        init.mode
    );
    assert!(
        init.is_executable(),
        "/init is not executable (mode {:o})",
        init.mode
    );
    let repo_init = fabric_test_support::image::repo_dir().join("images/guest/init");
    let repo_init = std::fs::read(&repo_init)
        .unwrap_or_else(|e| panic!("reading {}: {e}", repo_init.display()));
    assert_eq!(
        init.data, repo_init,
        "/init differs from images/guest/init: run images/build.sh"
    );

    let busybox = get("bin/busybox");
    assert!(
        busybox.is_file() && busybox.is_executable(),
        "bin/busybox mode {:o}",
        busybox.mode
    );
    assert!(
        busybox.data.starts_with(b"\x7fELF"),
        "bin/busybox is not an ELF binary"
    );
    for applet in [
        "bin/sh",
        "sbin/init",
        "sbin/reboot",
        "usr/sbin/httpd",
        "bin/dd",
    ] {
        let link = get(applet);
        assert!(link.is_symlink(), "{applet} is not a symlink");
        assert_eq!(
            link.data, b"/bin/busybox",
            "{applet} does not point to /bin/busybox"
        );
    }

    let inittab = String::from_utf8_lossy(&get("etc/inittab").data).into_owned();
    assert!(
        inittab.contains("::sysinit:/etc/init.d/rcS"),
        "inittab: {inittab}"
    );
    assert!(
        inittab.contains("::ctrlaltdel:/sbin/reboot"),
        "inittab: {inittab}"
    );
    let rcs = get("etc/init.d/rcS");
    assert!(
        rcs.is_file() && rcs.is_executable(),
        "etc/init.d/rcS mode {:o}",
        rcs.mode
    );
    let rcs = String::from_utf8_lossy(&rcs.data).into_owned();
    assert!(
        rcs.contains("fabric-guest: ready "),
        "rcS does not print the ready line"
    );
    assert!(
        rcs.contains("seek=1008"),
        "rcS does not write the boot-complete port"
    );
    assert!(
        entries.iter().all(|e| e.uid == 0 && e.gid == 0),
        "initramfs entries not owned by root"
    );
}

#[test]
fn manifest_digests_and_sizes_match_the_files() {
    let image = image();
    let m = &image.manifest;
    assert_eq!(m.version, 1);
    let expected = [VMLINUZ, VMLINUX, INITRAMFS, ROOTFS, TESTGUEST];
    for name in expected {
        let info = m.file(name).expect("manifest entry");
        let path = image.path(name);
        let size = std::fs::metadata(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .len();
        assert_eq!(size, info.size, "size of {name} differs from manifest.json");
        let sum = sha256_file(&path).expect("hashing");
        assert_eq!(
            sum, info.sha256,
            "sha256 of {name} differs from manifest.json"
        );
    }
    assert_eq!(
        m.files.len(),
        expected.len(),
        "unexpected files in manifest: {:?}",
        m.files.keys()
    );
    assert!(
        m.kernel_release.starts_with("6.1."),
        "kernel_release {:?}",
        m.kernel_release
    );
    assert_eq!((m.boot_complete.port, m.boot_complete.value), (1008, 123));
}

#[test]
fn manifest_mode_is_consistent() {
    let image = image();
    let m = &image.manifest;
    let base = "console=ttyS0 noxsave clearcpuid=308,141,288,145,298,151,291,296,197,297,580,150,158,306,534 reboot=k panic=-1 pci=off";

    assert_eq!(
        m.kernel_only.cmdline,
        format!("{base} root=/dev/vdz rootwait")
    );
    assert_eq!(
        m.kernel_only.ready_marker,
        "Waiting for root device /dev/vdz..."
    );
    assert_eq!(m.userspace.cmdline, base);
    assert_eq!(m.userspace.ready_marker, "fabric-guest: ready");
    for cmdline in [&m.cmdline, &m.kernel_only.cmdline, &m.userspace.cmdline] {
        assert!(
            !cmdline.split(' ').any(|p| p.starts_with("ip=")),
            "ip= is per VM and must not be in the manifest: {cmdline}"
        );
    }

    assert_eq!(&m.cmdline, &m.mode().cmdline);
    assert_eq!(&m.ready_marker, &m.mode().ready_marker);
    assert_eq!(m.use_initramfs, m.guest_mode == GuestMode::Userspace);

    let host = GuestMode::of_this_host().expect("reading /proc/cpuinfo");
    assert_eq!(
        m.guest_mode,
        host,
        "the image was built for {} hosts but this host is {}: run images/build.sh",
        m.guest_mode.as_str(),
        host.as_str()
    );
}
