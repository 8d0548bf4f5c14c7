#!/usr/bin/env bash
# Build the default Fabric guest image into images/out/ (see images/README.md).
#
#   bash images/build.sh
#
# Inputs come from Debian packages only (apt-get download + dpkg-deb -x):
# linux-source-6.1 (the kernel, built once per machine and cached in
# ${FABRIC_CACHE_DIR:-/var/cache/fabric}) and busybox-static (the guest's user
# space). Host build tools are installed with scripts/deps.sh. Runs as root,
# non-interactively; a run with nothing changed does no work ("up to date").
set -Eeuo pipefail
shopt -s nullglob

SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
IMAGES_DIR=$(dirname "$SCRIPT")
REPO_DIR=$(dirname "$IMAGES_DIR")
OUT_DIR=$IMAGES_DIR/out
CACHE_DIR=${FABRIC_CACHE_DIR:-/var/cache/fabric}
FRAGMENT=$IMAGES_DIR/kernel/fabric.config
PATCH_DIR=$IMAGES_DIR/kernel/patches
GUEST_DIR=$IMAGES_DIR/guest

export DEBIAN_FRONTEND=noninteractive
export LC_ALL=C

log() { printf '%s build.sh: %s\n' "$(date '+%Y-%m-%d %H:%M:%S')" "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}
trap 'log "ERROR: command failed (exit $?) at line $LINENO: $BASH_COMMAND"' ERR

TMP_DIRS=()
cleanup() { ((${#TMP_DIRS[@]} == 0)) || rm -rf "${TMP_DIRS[@]}"; }
trap cleanup EXIT

sha256_of_stdin() { sha256sum | cut -d' ' -f1; }

# The text between two marker lines of this script (hashed into cache keys so
# that editing a part of the script rebuilds what that part produces).
script_part() { sed -n "/^# >>> $1 >>>\$/,/^# <<< $1 <<<\$/p" "$SCRIPT"; }

# Candidate version of a Debian package (apt-get update once if unknown).
APT_UPDATED=0
pkg_version() {
    local v
    v=$(apt-cache show --no-all-versions "$1" 2>/dev/null | awk '/^Version: / { print $2; exit }' || true)
    if [[ -z $v && $APT_UPDATED -eq 0 ]]; then
        log "apt does not know $1 yet: running apt-get update"
        apt-get -q update >&2 || die "apt-get update failed"
        APT_UPDATED=1
        v=$(apt-cache show --no-all-versions "$1" 2>/dev/null | awk '/^Version: / { print $2; exit }' || true)
    fi
    [[ -n $v ]] || die "package $1 is not available from the configured apt sources"
    printf '%s\n' "$v"
}

# Path of the .deb of PKG=VERSION, downloaded once into the cache.
fetch_deb() {
    local pkg=$1 ver=$2 dir="$CACHE_DIR/debs/$1/$2" debs
    debs=("$dir"/*.deb)
    if ((${#debs[@]} != 1)); then
        log "downloading $pkg=$ver (apt-get download)"
        rm -rf "$dir" "$dir.tmp"
        mkdir -p "$dir.tmp"
        (cd "$dir.tmp" && apt-get download -q -o APT::Sandbox::User=root "$pkg=$ver" >&2) ||
            die "apt-get download $pkg=$ver failed"
        mv -T "$dir.tmp" "$dir"
        debs=("$dir"/*.deb)
        ((${#debs[@]} == 1)) || die "apt-get download $pkg=$ver did not produce one .deb in $dir"
    fi
    [[ $(dpkg-deb -f "${debs[0]}" Package) == "$pkg" && $(dpkg-deb -f "${debs[0]}" Version) == "$ver" ]] ||
        die "${debs[0]} is not $pkg=$ver"
    printf '%s\n' "${debs[0]}"
}

# Copy SRC to DST (atomically) unless DST already has the same content.
install_file() {
    local src=$1 dst=$2
    if [[ -f $dst ]] && cmp -s "$src" "$dst"; then
        return 0
    fi
    cp --sparse=always "$src" "$dst.tmp.$$"
    mv -f "$dst.tmp.$$" "$dst"
    log "wrote $dst"
}

fmt_duration() { printf '%dm%02ds (%d s)' $(($1 / 60)) $(($1 % 60)) "$1"; }

# ------------------------------------------------------------------------------
log "Fabric guest image -> $OUT_DIR (cache: $CACHE_DIR)"
[[ -f $FRAGMENT ]] || die "missing $FRAGMENT"
[[ -d $GUEST_DIR ]] || die "missing $GUEST_DIR"

# shellcheck source=scripts/deps.sh disable=SC1091
source "$REPO_DIR/scripts/deps.sh"
fabric_need_packages build-essential bc flex bison libelf-dev libssl-dev cpio \
    e2fsprogs xz-utils gzip patch util-linux apt ||
    die "could not install the host build tools (run as root with apt sources available)"

mkdir -p "$CACHE_DIR" "$OUT_DIR" || die "cannot create $CACHE_DIR and $OUT_DIR (run as root or set FABRIC_CACHE_DIR)"
exec 9>"$CACHE_DIR/.build.lock"
flock -w 10800 9 || die "timed out waiting for another images/build.sh (lock $CACHE_DIR/.build.lock)"

# Outputs whose digests no longer match what the last run recorded are redone.
if [[ -f $OUT_DIR/.sha256sums ]] && ! (cd "$OUT_DIR" && sha256sum --quiet --check --strict .sha256sums >/dev/null 2>&1); then
    log "outputs in $OUT_DIR differ from the recorded digests: regenerating them"
    rm -f "$OUT_DIR/.sha256sums" "$OUT_DIR/.stamp-kernel" "$OUT_DIR/.stamp-userspace" "$OUT_DIR/.stamp-testguest"
fi
CHANGED=0

# >>> kernel >>>
# The kernel: tinyconfig + images/kernel/fabric.config + images/kernel/patches,
# built from linux-source-6.1 once per machine (cache key: package version,
# fragment, patches, this part of the script).
KERNEL_PKG=linux-source-6.1
KERNEL_VERSION=$(pkg_version "$KERNEL_PKG")
PATCHES=("$PATCH_DIR"/*.patch)
PATCHES_HASH=$(for p in "${PATCHES[@]}"; do
    printf '=== %s\n' "${p##*/}"
    cat "$p"
done | sha256_of_stdin)
KERNEL_KEY=$({
    printf 'package %s=%s\npatches %s\n=== fragment\n' "$KERNEL_PKG" "$KERNEL_VERSION" "$PATCHES_HASH"
    cat "$FRAGMENT"
    printf '=== script\n'
    script_part kernel
} | sha256_of_stdin)
KWORK=$CACHE_DIR/kernel/work
KSRC=$KWORK/$KERNEL_PKG
KBUILD=$KWORK/build
KRESULT=$CACHE_DIR/kernel/results/$KERNEL_KEY

kmake() {
    make -C "$KSRC" O="$KBUILD" ARCH=x86_64 KBUILD_BUILD_USER=fabric KBUILD_BUILD_HOST=fabric "$@"
}

# Unpacked, patched source in $KSRC (kept across fragment changes so that
# rebuilds are incremental); redone when the package version or patches change.
KERNEL_COLD=0
prepare_kernel_source() {
    local want="$KERNEL_PKG=$KERNEL_VERSION patches=$PATCHES_HASH" deb p out
    if [[ -f $KWORK/source.stamp && $(<"$KWORK/source.stamp") == "$want" && -f $KSRC/Makefile ]]; then
        log "kernel: reusing unpacked source $KSRC (incremental build)"
        return 0
    fi
    KERNEL_COLD=1
    deb=$(fetch_deb "$KERNEL_PKG" "$KERNEL_VERSION")
    log "kernel: unpacking $KERNEL_PKG $KERNEL_VERSION into $KWORK"
    rm -rf "$KWORK"
    mkdir -p "$KWORK/deb"
    dpkg-deb -x "$deb" "$KWORK/deb"
    [[ -f $KWORK/deb/usr/src/$KERNEL_PKG.tar.xz ]] || die "$deb has no usr/src/$KERNEL_PKG.tar.xz"
    tar -xJf "$KWORK/deb/usr/src/$KERNEL_PKG.tar.xz" -C "$KWORK"
    rm -rf "$KWORK/deb"
    [[ -f $KSRC/Makefile ]] || die "unpacked source has no $KSRC/Makefile"
    ((${#PATCHES[@]} > 0)) || die "no patches in $PATCH_DIR"
    for p in "${PATCHES[@]}"; do
        log "kernel: applying ${p#"$REPO_DIR"/}"
        if ! out=$(patch -d "$KSRC" -p1 --batch --forward --fuzz=0 --no-backup-if-mismatch -r - <"$p" 2>&1); then
            printf '%s\n' "$out" >&2
            die "patch ${p#"$REPO_DIR"/} does not apply cleanly to $KERNEL_PKG $KERNEL_VERSION"
        fi
    done
    # The kernel-only ready marker in the manifest is this printk.
    grep -qF 'printk(KERN_INFO "Waiting for root device %s...\n",' "$KSRC/init/do_mounts.c" ||
        die "init/do_mounts.c no longer prints \"Waiting for root device %s...\": update KERNEL_ONLY_MARKER"
    printf '%s\n' "$want" >"$KWORK/source.stamp"
}

# Every CONFIG_X=v / "# CONFIG_X is not set" line of the fragment must hold in
# the final .config (a symbol absent from .config counts as not set).
verify_kernel_config() {
    local config=$1 line sym have n=0 bad=()
    while IFS= read -r line; do
        if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
            sym=${BASH_REMATCH[1]}
            have=$(grep -m1 -E "^($sym=|# $sym is not set\$)" "$config" || true)
            [[ $have == "$line" ]] || bad+=("$line   (final .config: ${have:-absent})")
        elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
            sym=${BASH_REMATCH[1]}
            have=$(grep -m1 -E "^$sym=" "$config" || true)
            [[ -z $have ]] || bad+=("$line   (final .config: $have)")
        else
            continue
        fi
        n=$((n + 1))
    done <"$FRAGMENT"
    if ((${#bad[@]} > 0)); then
        log "kernel: ${#bad[@]} option(s) of ${FRAGMENT#"$REPO_DIR"/} did not end up as requested:"
        printf '    %s\n' "${bad[@]}" >&2
        die "kernel configuration check failed (missing dependencies? see $config)"
    fi
    log "kernel: all $n options of the fragment hold in the final .config"
}

build_kernel() {
    local start end secs pid tick=0 release tmp
    start=$(date +%s)
    prepare_kernel_source
    log "kernel: configuring (tinyconfig + fragment, olddefconfig)"
    mkdir -p "$KBUILD"
    kmake -s tinyconfig >"$KWORK/config.log" 2>&1 ||
        { cat "$KWORK/config.log" >&2; die "make tinyconfig failed"; }
    "$KSRC/scripts/kconfig/merge_config.sh" -m -O "$KBUILD" "$KBUILD/.config" "$FRAGMENT" >>"$KWORK/config.log" 2>&1 ||
        { cat "$KWORK/config.log" >&2; die "merge_config.sh failed"; }
    kmake -s olddefconfig >>"$KWORK/config.log" 2>&1 ||
        { cat "$KWORK/config.log" >&2; die "make olddefconfig failed"; }
    verify_kernel_config "$KBUILD/.config"

    log "kernel: make -j$(nproc) bzImage (log: $KWORK/build.log; takes minutes when cold)"
    kmake -j"$(nproc)" bzImage >"$KWORK/build.log" 2>&1 &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        sleep 2
        tick=$((tick + 2))
        if ((tick % 60 == 0)) && kill -0 "$pid" 2>/dev/null; then
            log "kernel: still building ($(fmt_duration "$(($(date +%s) - start))")): $(tail -n1 "$KWORK/build.log" | cut -c1-100)"
        fi
    done
    if ! wait "$pid"; then
        tail -n 40 "$KWORK/build.log" >&2
        die "kernel build failed; full log: $KWORK/build.log"
    fi
    end=$(date +%s)
    secs=$((end - start))
    release=$(<"$KBUILD/include/config/kernel.release")
    [[ -f $KBUILD/arch/x86/boot/bzImage && -f $KBUILD/vmlinux ]] || die "kernel build produced no bzImage/vmlinux"

    tmp=$KRESULT.tmp.$$
    rm -rf "$tmp"
    mkdir -p "$tmp"
    cp "$KBUILD/arch/x86/boot/bzImage" "$tmp/bzImage"
    cp "$KBUILD/vmlinux" "$tmp/vmlinux"
    cp "$KBUILD/.config" "$tmp/config"
    printf '%s\n' "$release" >"$tmp/kernel.release"
    printf 'seconds=%s\ncold=%s\ndate=%s\n' "$secs" "$KERNEL_COLD" "$(date -u '+%Y-%m-%dT%H:%M:%SZ')" >"$tmp/build-info"
    rm -rf "$KRESULT"
    mv -T "$tmp" "$KRESULT"
    if ((KERNEL_COLD)); then
        cp "$KRESULT/build-info" "$CACHE_DIR/kernel/cold-build-info"
    fi
    log "kernel: built $release in $(fmt_duration "$secs") ($( ((KERNEL_COLD)) && echo cold || echo incremental))"
}

if [[ -f $OUT_DIR/.stamp-kernel && $(<"$OUT_DIR/.stamp-kernel") == "$KERNEL_KEY" &&
    -f $OUT_DIR/vmlinuz && -f $OUT_DIR/vmlinux && -f $OUT_DIR/kernel.config && -f $OUT_DIR/kernel.release ]]; then
    log "kernel: up to date ($KERNEL_PKG $KERNEL_VERSION, key ${KERNEL_KEY:0:12})"
else
    if [[ -f $KRESULT/bzImage && -f $KRESULT/vmlinux && -f $KRESULT/config && -f $KRESULT/kernel.release ]]; then
        log "kernel: using the cached build $KRESULT"
    else
        build_kernel
    fi
    install_file "$KRESULT/bzImage" "$OUT_DIR/vmlinuz"
    install_file "$KRESULT/vmlinux" "$OUT_DIR/vmlinux"
    install_file "$KRESULT/config" "$OUT_DIR/kernel.config"
    install_file "$KRESULT/kernel.release" "$OUT_DIR/kernel.release"
    printf '%s\n' "$KERNEL_KEY" >"$OUT_DIR/.stamp-kernel"
    CHANGED=1
fi
# <<< kernel <<<

# >>> userspace >>>
# The guest's user space: busybox-static plus images/guest/*, packed as a
# gzip'd cpio (initramfs) and an ext4 image with the same tree.
BUSYBOX_PKG=busybox-static
BUSYBOX_VERSION=$(pkg_version "$BUSYBOX_PKG")
ROOTFS_SIZE_MIB=64
TREE_EPOCH=${SOURCE_DATE_EPOCH:-1704067200}
USERSPACE_KEY=$({
    printf 'package %s=%s\nrootfs %s MiB\nepoch %s\n' "$BUSYBOX_PKG" "$BUSYBOX_VERSION" "$ROOTFS_SIZE_MIB" "$TREE_EPOCH"
    (cd "$GUEST_DIR" && find . -type f -printf '%P\n' | sort) | while IFS= read -r f; do
        printf '=== %s %s\n' "$f" "$([[ -x $GUEST_DIR/$f ]] && echo 755 || echo 644)"
        cat "$GUEST_DIR/$f"
    done
    printf '=== script\n'
    script_part userspace
} | sha256_of_stdin)

build_userspace() {
    local deb work tree path f uuid
    deb=$(fetch_deb "$BUSYBOX_PKG" "$BUSYBOX_VERSION")
    mkdir -p "$CACHE_DIR/tmp"
    work=$(mktemp -d "$CACHE_DIR/tmp/userspace.XXXXXX")
    TMP_DIRS+=("$work")
    tree=$work/root
    log "userspace: assembling the guest tree ($BUSYBOX_PKG $BUSYBOX_VERSION + ${GUEST_DIR#"$REPO_DIR"/})"
    dpkg-deb -x "$deb" "$work/deb"
    [[ -x $work/deb/bin/busybox ]] || die "$deb has no bin/busybox"
    mkdir -p "$tree"/{bin,sbin,usr/bin,usr/sbin,etc/init.d,proc,sys,dev,run,tmp,root,mnt}
    install -m 0755 "$work/deb/bin/busybox" "$tree/bin/busybox"
    # `busybox --install -s`, done on the host: one symlink per applet.
    "$tree/bin/busybox" --list-full | while IFS= read -r path; do
        [[ -n $path && $path != bin/busybox ]] || continue
        mkdir -p "$tree/$(dirname "$path")"
        ln -sfn /bin/busybox "$tree/$path"
    done
    [[ -L $tree/sbin/init && -L $tree/bin/sh && -L $tree/usr/sbin/httpd ]] || die "busybox applet links missing"
    cp -R "$GUEST_DIR/." "$tree/"
    find "$tree" -type d -exec chmod 0755 {} +
    (cd "$GUEST_DIR" && find . -type f -printf '%P\n') | while IFS= read -r f; do
        if [[ -x $GUEST_DIR/$f ]]; then chmod 0755 "$tree/$f"; else chmod 0644 "$tree/$f"; fi
    done
    chmod 0700 "$tree/root"
    chmod 1777 "$tree/tmp"
    [[ -x $tree/init && -x $tree/etc/init.d/rcS && -f $tree/etc/inittab ]] || die "guest tree lacks /init, rcS or inittab"
    find "$tree" -exec touch -h -d "@$TREE_EPOCH" {} +

    log "userspace: packing initramfs.cpio.gz (cpio newc, gzip)"
    (cd "$tree" && find . -mindepth 1 -printf '%P\n' | sort |
        cpio --quiet -o -H newc -R 0:0 --reproducible) | gzip -9 -n >"$work/initramfs.cpio.gz"

    log "userspace: making rootfs.ext4 (${ROOTFS_SIZE_MIB} MiB, mkfs.ext4 -d, label fabric-root)"
    uuid=$(printf '%s' "$USERSPACE_KEY" | sed -E 's/^(.{8})(.{4})(.{4})(.{4})(.{12}).*/\1-\2-\3-\4-\5/')
    truncate -s "${ROOTFS_SIZE_MIB}M" "$work/rootfs.ext4"
    E2FSPROGS_FAKE_TIME=$TREE_EPOCH mkfs.ext4 -q -F -L fabric-root -U "$uuid" \
        -E "root_owner=0:0,hash_seed=$uuid" -d "$tree" "$work/rootfs.ext4" >&2 ||
        die "mkfs.ext4 failed"

    install_file "$work/initramfs.cpio.gz" "$OUT_DIR/initramfs.cpio.gz"
    install_file "$work/rootfs.ext4" "$OUT_DIR/rootfs.ext4"
}

if [[ -f $OUT_DIR/.stamp-userspace && $(<"$OUT_DIR/.stamp-userspace") == "$USERSPACE_KEY" &&
    -f $OUT_DIR/initramfs.cpio.gz && -f $OUT_DIR/rootfs.ext4 ]]; then
    log "userspace: up to date ($BUSYBOX_PKG $BUSYBOX_VERSION, key ${USERSPACE_KEY:0:12})"
else
    build_userspace
    printf '%s\n' "$USERSPACE_KEY" >"$OUT_DIR/.stamp-userspace"
    CHANGED=1
fi
# <<< userspace <<<

# >>> testguest >>>
# The freestanding test guest of the device tests (images/testguest: a few KiB of C, no Linux),
# built with the host's gcc (cache key: its sources, the compiler version, this part of the script).
TESTGUEST_DIR=$IMAGES_DIR/testguest
TESTGUEST_KEY=$({
    printf 'cc %s\n' "$(gcc --version | head -n1)"
    (cd "$TESTGUEST_DIR" && find . -path ./build -prune -o -type f -printf '%P\n' | sort) | while IFS= read -r f; do
        printf '=== %s\n' "$f"
        cat "$TESTGUEST_DIR/$f"
    done
    printf '=== script\n'
    script_part testguest
} | sha256_of_stdin)

if [[ -f $OUT_DIR/.stamp-testguest && $(<"$OUT_DIR/.stamp-testguest") == "$TESTGUEST_KEY" && -f $OUT_DIR/testguest.elf ]]; then
    log "testguest: up to date (key ${TESTGUEST_KEY:0:12})"
else
    mkdir -p "$CACHE_DIR/tmp"
    TESTGUEST_WORK=$(mktemp -d "$CACHE_DIR/tmp/testguest.XXXXXX")
    TMP_DIRS+=("$TESTGUEST_WORK")
    log "testguest: building ${TESTGUEST_DIR#"$REPO_DIR"/}"
    make -s -C "$TESTGUEST_DIR" OUT="$TESTGUEST_WORK" >&2 || die "the test guest does not build (make -C $TESTGUEST_DIR)"
    install_file "$TESTGUEST_WORK/testguest.elf" "$OUT_DIR/testguest.elf"
    printf '%s\n' "$TESTGUEST_KEY" >"$OUT_DIR/.stamp-testguest"
    CHANGED=1
fi
# <<< testguest <<<

# ------------------------------------------------------------------------------
# Manifest.
FILES=(vmlinuz vmlinux initramfs.cpio.gz rootfs.ext4 testguest.elf)
if ((CHANGED)) || [[ ! -f $OUT_DIR/.sha256sums ]]; then
    log "computing digests"
    (cd "$OUT_DIR" && sha256sum "${FILES[@]}" kernel.config kernel.release >.sha256sums.tmp && mv -f .sha256sums.tmp .sha256sums)
fi

json_str() {
    local s=$1
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    printf '"%s"' "$s"
}

BASE_CMDLINE="console=ttyS0 noxsave clearcpuid=308,141,288,145,298,151,291,296,197,297,580,150,158,306,534 reboot=k panic=-1 pci=off"
USERSPACE_CMDLINE=$BASE_CMDLINE
USERSPACE_MARKER="fabric-guest: ready"
KERNEL_ONLY_CMDLINE="$BASE_CMDLINE root=/dev/vdz rootwait"
KERNEL_ONLY_MARKER="Waiting for root device /dev/vdz..."
if grep -qwE 'vmx|svm' /proc/cpuinfo; then
    GUEST_MODE=userspace CMDLINE=$USERSPACE_CMDLINE USE_INITRAMFS=true READY_MARKER=$USERSPACE_MARKER
else
    GUEST_MODE=kernel-only CMDLINE=$KERNEL_ONLY_CMDLINE USE_INITRAMFS=false READY_MARKER=$KERNEL_ONLY_MARKER
fi
KERNEL_RELEASE=$(<"$OUT_DIR/kernel.release")

manifest() {
    local i f sum
    printf '{\n  "version": 1,\n  "kernel_release": %s,\n  "files": {\n' "$(json_str "$KERNEL_RELEASE")"
    for i in "${!FILES[@]}"; do
        f=${FILES[$i]}
        sum=$(awk -v f="$f" '$2 == f { print $1 }' "$OUT_DIR/.sha256sums")
        [[ $sum =~ ^[0-9a-f]{64}$ ]] || die "no digest recorded for $f"
        printf '    %s: { "sha256": "%s", "size": %s }%s\n' "$(json_str "$f")" "$sum" \
            "$(stat -c %s "$OUT_DIR/$f")" "$( ((i + 1 < ${#FILES[@]})) && echo ,)"
    done
    printf '  },\n'
    printf '  "guest_mode": %s,\n' "$(json_str "$GUEST_MODE")"
    printf '  "cmdline": %s,\n' "$(json_str "$CMDLINE")"
    printf '  "use_initramfs": %s,\n' "$USE_INITRAMFS"
    printf '  "ready_marker": %s,\n' "$(json_str "$READY_MARKER")"
    printf '  "userspace": { "cmdline": %s, "ready_marker": %s },\n' \
        "$(json_str "$USERSPACE_CMDLINE")" "$(json_str "$USERSPACE_MARKER")"
    printf '  "kernel_only": { "cmdline": %s, "ready_marker": %s },\n' \
        "$(json_str "$KERNEL_ONLY_CMDLINE")" "$(json_str "$KERNEL_ONLY_MARKER")"
    printf '  "boot_complete": { "port": 1008, "value": 123 }\n}\n'
}
NEW_MANIFEST=$(manifest)
if [[ -f $OUT_DIR/manifest.json && $(<"$OUT_DIR/manifest.json") == "$NEW_MANIFEST" ]]; then
    ((CHANGED)) || log "up to date: nothing to do"
else
    printf '%s\n' "$NEW_MANIFEST" >"$OUT_DIR/manifest.json.tmp"
    mv -f "$OUT_DIR/manifest.json.tmp" "$OUT_DIR/manifest.json"
    log "wrote $OUT_DIR/manifest.json"
fi

# Summary.
info() { [[ -f $1 ]] && sed -n "s/^$2=//p" "$1" | head -n1; }
log "kernel $KERNEL_RELEASE, guest_mode=$GUEST_MODE, outputs in $OUT_DIR: ${FILES[*]} manifest.json"
if secs=$(info "$KRESULT/build-info" seconds) && [[ -n $secs ]]; then
    log "this kernel was built in $(fmt_duration "$secs") ($( [[ $(info "$KRESULT/build-info" cold) == 1 ]] && echo cold || echo incremental), $(info "$KRESULT/build-info" date))"
fi
if secs=$(info "$CACHE_DIR/kernel/cold-build-info" seconds) && [[ -n $secs ]]; then
    log "last cold kernel build on this machine: $(fmt_duration "$secs") with $(nproc) CPUs ($(info "$CACHE_DIR/kernel/cold-build-info" date))"
fi
